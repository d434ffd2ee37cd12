"""`spoxl toy lrm --out DIR`: the toy world's latent reward model (LPO), from the shipped toy model.

  1. exact counterfactual pairs (spoxl.toy.pairs.counterfactual_pairs): each TRAINING caption's
     rendering against the same rendering with one attribute wrong; and, for the report,
     counterfactual pairs of the HELD-OUT captions (combinations the LRM never sees);
  2. an LRM initialised from the toy model (its UNet up to the mid block, both text encoders, a
     fresh projection), its UNet part and head (the text encoders stay the toy model's) trained by the LRM trainer (spoxl.commands.train_preference_model: noisy
     latents on the 20-step grid, the pair loss) on the training pairs;
  3. DIR: the LRM folder, plus lrm.json (settings, held-out pairwise accuracy by timestep before
     and after, seconds, CPU seconds).

The shipped spoxl/toy/lrm/ came from `spoxl toy lrm --out spoxl/toy/lrm` with the defaults below.
"""

from __future__ import annotations

import json
import resource
import tempfile
import time
from pathlib import Path

DEFAULTS = {"pairs": 4096, "held_out_pairs": 256, "steps": 600, "batch_size": 16, "lr": 1e-4, "seed": 0}
# --source candidates (spoxl.commands.toy_candidate_lrm): pool candidates of the toy model's own samples,
# ordered by the exact fidelity scorer, from the shipped counterfactual LRM (`init`).
CANDIDATE_DEFAULTS = {"passes": 2, "divert_start_step": 15, "min_gap": 0.2, "pairs_per_pool": "best_worst",
                      "steps": 1000, "batch_size": 16, "lr": 1e-4, "seed": 0, "init": "toy"}  # fmt: skip


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _save_with_record(model, out: Path, settings: dict, before: dict, after: dict, start: float, cpu0: float,
                      **counts) -> dict:  # fmt: skip
    """Save the LRM to `out` with its lrm.json: the settings, the held-out pairwise accuracy by t
    before and after training, wall and CPU seconds since (start, cpu0). Returns the record."""
    model.save(out)
    record = {
        "settings": {**settings, "text_encoders": "frozen (the toy model's)"},
        **counts,
        "held_out_accuracy_before": {str(t): round(v, 4) for t, v in before.items()},
        "held_out_accuracy_after": {str(t): round(v, 4) for t, v in after.items()},
        "seconds": round(time.time() - start, 1),
        "cpu_seconds": round(_cpu_seconds() - cpu0, 1),
    }
    (Path(out) / "lrm.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def make_toy_lrm(out: Path, *, pairs: int, held_out_pairs: int, steps: int, batch_size: int, lr: float, seed: int,
                 log=print) -> dict:  # fmt: skip
    from spoxl.commands.train_preference_model import train_lrm
    from spoxl.data.pairs import PreferencePairDataset
    from spoxl.models.loading import load_sdxl
    from spoxl.models.lrm import LatentRewardModel
    from spoxl.toy import world
    from spoxl.toy.pairs import counterfactual_pairs, write_parquet

    start, cpu0 = time.time(), _cpu_seconds()
    components = load_sdxl("toy")
    with tempfile.TemporaryDirectory() as tmp:
        train_file = write_parquet(counterfactual_pairs(world.train_scenes(), pairs, seed=seed), Path(tmp) / "train.parquet")
        held_file = write_parquet(counterfactual_pairs(world.held_out_scenes(), held_out_pairs, seed=seed + 1),
                                  Path(tmp) / "held_out.parquet")  # fmt: skip
        resolution = 8 * components.unet.config.sample_size
        train_set = PreferencePairDataset(train_file, resolution, drop_ties=False, seed=seed)
        held_set = PreferencePairDataset(held_file, resolution, drop_ties=False)
        # The toy text encoders stay as the toy model has them (frozen at their random init, shared
        # with the policy); the official LRM trains its encoders too (`--kind lrm` does).
        model = LatentRewardModel.from_components(components, train_text_encoders=False)
        result = train_lrm(model, components, train_set, held_set, steps=steps, batch_size=batch_size, lr=lr,
                           seed=seed, log=lambda s, h: log(f"step {s + 1}/{steps} loss {h['loss']:.4f} acc {h['acc']:.2f}")
                           if (s + 1) % 50 == 0 else None)  # fmt: skip
    settings = {"pairs": pairs, "held_out_pairs": held_out_pairs, "steps": steps, "batch_size": batch_size, "lr": lr,
                "seed": seed, "data": "counterfactual pairs of the training captions (exact renderings)"}  # fmt: skip
    return _save_with_record(model, out, settings, result["before"], result["after"], start, cpu0)


def make_toy_lrm_from_candidates(out: Path, *, passes: int, divert_start_step: int, min_gap: float,
                                 pairs_per_pool: str, steps: int, batch_size: int, lr: float, seed: int, init: str,
                                 log=print) -> dict:  # fmt: skip
    """The toy LRM taught to rank the candidates of one pool (spoxl.commands.toy_candidate_lrm): `passes`
    passes over the TRAINING captions sampled with pools from `divert_start_step`, one pass over the
    HELD-OUT captions for the report (pairwise accuracy by the pool's t, before and after). The
    training pairs of a pool: its best and worst, or with pairs_per_pool "all" every two candidates
    over min_gap; the held-out ones are always best and worst (what LPO's selection asks)."""
    import random

    from spoxl.models.loading import load_sdxl
    from spoxl.models.lrm import LatentRewardModel
    from spoxl.preference_models import build_lrm
    from spoxl.toy import world
    from spoxl.commands.toy_candidate_lrm import pair_accuracy, sample_candidate_pairs, train_on_candidates

    start, cpu0 = time.time(), _cpu_seconds()
    components = load_sdxl("toy")
    if init == "fresh":  # built before the sampling, so that a bad --init fails in seconds, not after it
        model = LatentRewardModel.from_components(components, train_text_encoders=False)
    else:  # "toy" (the shipped counterfactual LRM) or an LRM folder
        model = build_lrm(init, components=components).freeze_text_encoders()  # the toy model's (as `spoxl toy lrm`)
    captions = [s.caption() for s in world.train_scenes()] * passes
    random.Random(seed).shuffle(captions)
    held = [s.caption() for s in world.held_out_scenes()]
    kw = dict(divert_start_step=divert_start_step, min_gap=min_gap)
    train_pairs, train_captions = sample_candidate_pairs(components, captions, seed=seed, pairs_per_pool=pairs_per_pool,
                                                         **kw)  # fmt: skip
    held_pairs, held_captions = sample_candidate_pairs(components, held, seed=seed + 1, **kw)
    log(f"{len(train_pairs)} training pairs from {len(captions)} sampled captions, {len(held_pairs)} held-out pairs")
    before = pair_accuracy(model, held_pairs, held_captions)
    train_on_candidates(model, train_pairs, train_captions, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                        log=lambda s, h: log(f"step {s + 1}/{steps} loss {h['loss']:.4f} acc {h['acc']:.2f}")
                        if (s + 1) % 100 == 0 else None)  # fmt: skip
    after = pair_accuracy(model, held_pairs, held_captions)
    settings = {"source": "candidates", "passes": passes, "divert_start_step": divert_start_step, "min_gap": min_gap,
                "pairs_per_pool": pairs_per_pool, "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "init": init,
                "data": ("best vs worst candidate" if pairs_per_pool == "best_worst" else "every two candidates")
                        + " x_{t-1} of each pool of the toy model's own samples (held-out: best vs worst), ordered by "
                          "the exact fidelity scorer on their decoded predicted x0 (SPO's judge)"}  # fmt: skip
    return _save_with_record(model, out, settings, before, after, start, cpu0,
                             train_pairs=len(train_pairs), held_out_pairs=len(held_pairs))  # fmt: skip
