"""Where a toy SPO LoRA's held-out gains and losses come from: the LoRA switched on only at the
low-noise timesteps it was trained on, against the same LoRA on every step.

    python benchmarks/toy_timestep_gating.py runs/demo/export/pytorch_lora_weights.safetensors \
        [--gates 1000 451 251 201] [--seeds 4]

The demo (configs/toy_spo.yaml) trains on pools branched at the last 5 of 20 steps (t <= 201),
but a LoRA acts at every step when sampling. For each gate g this samples the held-out captions
as `spoxl eval` does (20 DDIM steps, eta 0, CFG 5, the same seeds) with the adapters enabled
only while t <= g (g >= 951: the plain LoRA, which must reproduce `spoxl eval`'s figures), and
reports the paired difference and win rate against the base, the number of items that lose more
than 2 points, and the win rate among items the base already draws well (base score >= 65) and
badly (< 40). Writes benchmarks/results/toy_timestep_gating_cpu2.csv. docs/toy_world.md reads it.
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
    """The LoRA UNet with its adapters enabled only for timesteps <= gate (one t per call, as
    spoxl.sampling's samplers call it)."""

    def __init__(self, unet, gate: int):
        super().__init__()
        self.unet, self.gate = unet, gate

    @property
    def config(self):
        return self.unet.config

    def forward(self, x, t, **kwargs):
        (self.unet.enable_adapters if int(torch.as_tensor(t).flatten()[0]) <= self.gate else self.unet.disable_adapters)()
        return self.unet(x, t, **kwargs)


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
    p.add_argument("--gates", type=int, nargs="+", default=[1000, 451, 251, 201])
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
        return score_images(scorer, images, batch)[0].double()

    base = scores_of(base_unet)
    tuned = copy.deepcopy(base_unet)
    load_lora_into_unet(tuned, args.lora)
    rows = []
    for gate in args.gates:
        s = scores_of(TimestepGatedUNet(tuned, gate))
        st, diff = paired_stats(base, s), s - base
        good, bad = base >= 65, base < 40
        rows.append({"device": "cpu-amd-epyc-2-cores", "lora": args.lora, "lora_on_t_at_most": gate, "n": st["n"],
                     "diff_mean": round(st["diff_mean"], 3), "diff_stderr": round(st["diff_stderr"], 3),
                     "win_rate": round(st["win_rate"], 4), "win_low": round(st["win_rate_ci95"][0], 4),
                     "win_high": round(st["win_rate_ci95"][1], 4), "items_losing_over_2": int((diff < -2).sum()),
                     "win_rate_base_ge_65": round(float((diff[good] > 0).double().mean()), 3), "n_base_ge_65": int(good.sum()),
                     "win_rate_base_lt_40": round(float((diff[bad] > 0).double().mean()), 3), "n_base_lt_40": int(bad.sum())})  # fmt: skip
        r = rows[-1]
        print(f"LoRA on t <= {gate:4d}: diff {r['diff_mean']:+.2f} +- {r['diff_stderr']:.2f}, win {100 * r['win_rate']:.0f}% "
              f"[{100 * r['win_low']:.0f}, {100 * r['win_high']:.0f}], {r['items_losing_over_2']} items lose > 2; "
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
