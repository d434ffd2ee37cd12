"""Where a toy SPO LoRA's held-out gains and losses come from: the LoRA switched on only at the
low-noise timesteps it was trained on, against the same LoRA on every step.

    python benchmarks/toy_timestep_gating.py runs/demo/export/pytorch_lora_weights.safetensors \
        [--gates 1000 451 251 201] [--early 251] [--seeds 4]

The demo (configs/toy_spo.yaml) trains on pools branched at the last 5 of 20 steps (t <= 201),
but a LoRA acts at every step when sampling. For each gate g of --gates this samples the held-out
captions as `spoxl eval` does (20 DDIM steps, eta 0, CFG 5, the same seeds) with the adapters
enabled only while t <= g (g >= 951: the plain LoRA, which must reproduce `spoxl eval`'s figures);
for each g of --early, only while t > g (the complement). It reports the paired difference and win
rate against the base (ties count half), colour accuracy, the number of items that lose more than
2 points, and the win rate among items the base already draws well (base score >= 65) and badly
(< 40). Writes benchmarks/results/toy_timestep_gating_cpu2.csv. docs/toy_world.md reads it.
"""

from __future__ import annotations

import argparse
import copy
import csv
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


class TimestepGatedUNet(torch.nn.Module):
    """The LoRA UNet with its adapters enabled only for timesteps <= gate (late=True) or > gate
    (late=False); one t per call, as spoxl.sampling's samplers call it."""

    def __init__(self, unet, gate: int, late: bool = True):
        super().__init__()
        self.unet, self.gate, self.late = unet, gate, late

    @property
    def config(self):
        return self.unet.config

    def forward(self, x, t, **kwargs):
        on = (int(torch.as_tensor(t).flatten()[0]) <= self.gate) == self.late
        (self.unet.enable_adapters if on else self.unet.disable_adapters)()
        return self.unet(x, t, **kwargs)


def win_rate(diff: torch.Tensor) -> float:
    """Wins over items, ties counting half (spoxl.evaluation.paired_stats' rule)."""
    return float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean())


@torch.no_grad()
def main(argv=None) -> int:
    from spoxl.commands.eval import resolve_prompts
    from spoxl.evaluation import paired_stats, score_images
    from spoxl.imaging import sample_images
    from spoxl.models.loading import load_sdxl
    from spoxl.models.lora import load_lora_into_unet
    from spoxl.preference_models import build_preference_model

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("lora", help="a toy SPO LoRA (runs/demo/export/pytorch_lora_weights.safetensors)")
    p.add_argument("--gates", type=int, nargs="*", default=[1000, 451, 251, 201], help="LoRA on while t <= g")
    p.add_argument("--early", type=int, nargs="*", default=[251], help="LoRA on while t > g")
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "toy_timestep_gating_cpu2.csv"))
    args = p.parse_args(argv)
    if not Path(args.lora).is_file():
        p.error(f"no LoRA file at {args.lora}")

    prompts = resolve_prompts("held-out", None)
    batch = [q for q in prompts for _ in range(args.seeds)]
    scorer = build_preference_model("fidelity")
    comps = load_sdxl("toy")
    base_unet = comps.unet

    def scores_of(unet):
        comps.unet = unet
        try:  # spoxl eval's sampler settings and seeds
            images = sample_images(comps, batch, steps=20, cfg_scale=5.0, eta=0.0, seed=100_000, batch_size=64)
        finally:
            comps.unet = base_unet
        scores, _, correct = score_images(scorer, images, batch)
        return scores.double(), float(correct["colour"].double().mean())

    base, base_colour = scores_of(base_unet)
    print(f"base: mean fidelity {float(base.mean()):.2f}, colour accuracy {100 * base_colour:.0f}%", flush=True)
    tuned = copy.deepcopy(base_unet)
    load_lora_into_unet(tuned, args.lora)
    rows = []
    for gate, late in [(g, True) for g in args.gates] + [(g, False) for g in args.early]:
        s, colour = scores_of(TimestepGatedUNet(tuned, gate, late))
        st, diff = paired_stats(base, s), s - base
        good, bad = base >= 65, base < 40
        rows.append({"device": "cpu-amd-epyc-2-cores", "lora": args.lora, "lora_on": f"t <= {gate}" if late else f"t > {gate}",
                     "n": st["n"], "diff_mean": round(st["diff_mean"], 3), "diff_stderr": round(st["diff_stderr"], 3),
                     "win_rate": round(st["win_rate"], 4), "win_low": round(st["win_rate_ci95"][0], 4),
                     "win_high": round(st["win_rate_ci95"][1], 4), "colour_acc": round(colour, 4), "base_colour_acc": round(base_colour, 4),
                     "items_losing_over_2": int((diff < -2).sum()),
                     "win_rate_base_ge_65": round(win_rate(diff[good]), 3), "n_base_ge_65": int(good.sum()),
                     "win_rate_base_lt_40": round(win_rate(diff[bad]), 3), "n_base_lt_40": int(bad.sum())})  # fmt: skip
        r = rows[-1]
        print(f"LoRA on {r['lora_on']:9s}: diff {r['diff_mean']:+.2f} +- {r['diff_stderr']:.2f}, win {100 * r['win_rate']:.0f}% "
              f"[{100 * r['win_low']:.0f}, {100 * r['win_high']:.0f}], colour acc {100 * colour:.0f}%, "
              f"{r['items_losing_over_2']} items lose > 2; "
              f"win on base >= 65: {100 * r['win_rate_base_ge_65']:.0f}% of {r['n_base_ge_65']}, "
              f"base < 40: {100 * r['win_rate_base_lt_40']:.0f}% of {r['n_base_lt_40']}", flush=True)  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {out} (cpu, {torch.get_num_threads()} threads)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
