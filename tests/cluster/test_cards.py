"""The 24/40/80 GB card recipes (spoxl.cluster.cards): each fits its card by preflight's
prediction, and docs/training.md shows exactly the table the code computes."""

from pathlib import Path

import pytest

from spoxl.cluster import cards

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def predictions():
    return [cards.predict(r) for r in cards.CARD_RECIPES]


def test_pickscore_backbone_size():
    # CLIP ViT-H/14 (open_clip laion2b): 986.1 M parameters.
    assert cards.step_aware_preference_model_params() == pytest.approx(986.1e6, rel=0.002)


def test_every_card_recipe_fits_its_card_with_headroom(predictions):
    assert [(p.recipe.card_gb, p.recipe.name) for p in predictions] == [
        (24, "LoRA"), (24, "full"), (40, "LoRA"), (40, "full"), (80, "LoRA"), (80, "full")]
    for p in predictions:
        assert p.fits, f"{p.recipe.card_gb} GB {p.recipe.name}: {p.per_rank / 1e9:.1f} GB predicted"
    by = {(p.recipe.card_gb, p.recipe.name): p for p in predictions}
    # ZeRO-3 (24 GB) shards the full fine-tuning states that ZeRO-2 (40 GB) keeps whole in part.
    assert by[24, "full"].model_states < 0.6 * by[40, "full"].model_states
    # Without checkpointing (40/80 GB LoRA) a micro-step's activations dwarf the 24 GB recipe's
    # (whose figure is its bf16 decode of 2 images), and grow with the micro-batch.
    assert by[40, "LoRA"].activations > 5 * by[24, "LoRA"].activations
    assert by[80, "LoRA"].activations == pytest.approx(2 * by[40, "LoRA"].activations, rel=0.1)
    # The 40 GB full recipe's figure is its sampling step (fp32 VAE decode of 4 images), not training.
    assert by[40, "full"].activations > 2 * by[24, "full"].activations


def test_a_recipe_that_does_not_fit_is_reported_as_such(predictions):
    """The check can fail: the 80 GB full recipe (ZeRO-2, bf16 policy + reference whole) on a 24 GB card."""
    p = next(p for p in predictions if (p.recipe.card_gb, p.recipe.name) == (80, "full"))
    small = cards.CardPrediction(cards.CardRecipe(24, "full", p.recipe.overrides, ""), p.model_states,
                                 p.activations, p.preference_model, p.host_per_node)
    assert not small.fits


def test_docs_show_the_computed_table(predictions):
    assert cards.markdown_table(predictions) in (ROOT / "docs" / "training.md").read_text()
