"""How well a toy scorer's verdict at a denoising step predicts the FINAL image's fidelity.

    python benchmarks/toy_step_agreement.py [--prompts 24] [--k 4] [--steps 20]

SPO keeps the best and worst of k candidates drawn from one x_t, judged by the step-aware
preference model on each candidate's predicted x0 at the next timestep. That pair is only a
useful label if the step's winner also ends up the better final image. For the toy model and the
toy scorers this measures it: from a shared trajectory (DDIM eta 1, CFG 5), at several steps,
draw k candidates (spoxl.kernels.pool_step, as the sampler does), score their predicted x0, then
finish every candidate deterministically (DDIM eta 0) and score the final images. Reports, per
step and per scorer: how often the step's best-vs-worst order agrees with the final fidelity
order, and the mean final fidelity gap (scaled units). Writes
benchmarks/results/toy_step_agreement_cpu.csv. It explains configs/toy_spo.yaml's
divert_start_step (docs/toy_world.md). `--lrm toy` adds LPO's judge: the toy latent reward model
scoring the candidates themselves at the branching step's t (docs/lpo.md). `--lookahead 2 3` adds
the judge of `method.lookahead_steps` L (rows `fidelity_look{L}`): the fidelity of where L
deterministic DDIM jumps from the predicted x0 lead (spoxl.spo.pool_sampler.lookahead_x0).
"""

from __future__ import annotations

import argparse
import csv
import random
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

KEYS = ("fidelity", "colour", "shape", "position", "size", "background")


@torch.no_grad()
def main(argv=None) -> int:
    from spoxl import kernels, sampling
    from spoxl.models.loading import load_sdxl
    from spoxl.models.text import encode_with_negative, make_time_ids
    from spoxl.spo.pool_sampler import lookahead_x0
    from spoxl.toy import world
    from spoxl.toy.scorers import ToyScorer

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=24)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--at", type=int, nargs="+", default=[2, 6, 10, 14, 17], help="steps to branch at")
    p.add_argument("--lrm", default=None,
                   help="also judge each pool by this latent reward model (an LRM folder, or toy), as LPO does: "
                        "the candidates themselves, at the current t (row scorer 'lrm')")
    p.add_argument("--lookahead", type=int, nargs="*", default=[],
                   help="also judge each pool as method.lookahead_steps L does (rows fidelity_look{L})")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "toy_step_agreement_cpu.csv"))
    args = p.parse_args(argv)

    comps = load_sdxl("toy")
    prompts = random.Random(0).sample([s.caption() for s in world.train_scenes()], args.prompts)
    n, k, steps = len(prompts), args.k, args.steps
    cond, uncond = encode_with_negative(comps, prompts)
    time_ids = make_time_ids(n, (64, 64))
    sched = comps.scheduler
    grid = [int(t) for t in sampling.inference_timesteps(sched, steps)]
    scorer = ToyScorer()
    lrm = None
    if args.lrm:
        from spoxl.preference_models import build_lrm

        lrm = build_lrm(args.lrm, components=comps)
    arange = torch.arange(n)

    def alphas(t):
        return sampling.alpha_bar(sched, t), sampling.alpha_bar(sched, sampling.prev_timestep(sched, t, steps))

    def guided(x, t, copies):
        rep = (lambda e: e.repeat_interleave(copies)) if copies > 1 else (lambda e: e)
        out = sampling.guided_output(comps.unet, x, t, rep(cond), rep(uncond), time_ids.repeat_interleave(copies, 0), 5.0)
        return out

    rows = []
    x = torch.randn((n, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    for i in range(steps):
        t = grid[i]
        a, a_prev = alphas(t)
        _, eps = sampling.split_prediction(guided(x, t, 1), x, a)
        if i in args.at and i + 1 < steps:
            cand = kernels.pool_step(x, eps, a, a_prev, 1.0, k, seed=1000 + i)[0].float().flatten(0, 1)
            t_next = grid[i + 1]
            x0, eps_next = sampling.split_prediction(guided(cand, t_next, k), cand, sampling.alpha_bar(sched, t_next))
            per_prompt = [q for q in prompts for _ in range(k)]
            at_step = scorer.similarities(sampling.decode_latents(comps.vae, x0), per_prompt)
            for L in args.lookahead:  # as the pool sampler: never more jumps than the grid has left
                ahead = lookahead_x0(lambda y, tj: sampling.split_prediction(guided(y, tj, k), y, sampling.alpha_bar(sched, tj)),
                                     sched, t_next, x0, eps_next, min(L, steps - i - 1))  # fmt: skip
                at_step[f"fidelity_look{L}"] = scorer.similarities(sampling.decode_latents(comps.vae, ahead), per_prompt)["fidelity"]
            y = cand
            for j in range(i + 1, steps):  # finish every candidate deterministically
                aj, aj_prev = alphas(grid[j])
                y = sampling.ddim_step(guided(y, grid[j], k), y, aj, aj_prev, 0.0, None, "epsilon")[0]
            final = scorer.similarities(sampling.decode_latents(comps.vae, y), per_prompt)
            f = final["fidelity"].view(n, k)
            if lrm is not None:
                at_step["lrm"] = lrm.score(cand, per_prompt, t)
            for key in KEYS + tuple(f"fidelity_look{L}" for L in args.lookahead) + (("lrm",) if lrm is not None else ()):
                s = at_step[key].view(n, k)
                best, worst = s.argmax(1), s.argmin(1)
                rows.append({"step": i, "timestep": t, "scorer": key,
                             "agree_final_fidelity": float((f[arange, best] > f[arange, worst]).float().mean()),
                             "final_fidelity_gap": float((f[arange, best] - f[arange, worst]).mean()) * 100})  # fmt: skip
                print(f"step {i:2d} t={t:3d} {key:10s} step-winner has the better final fidelity on "
                      f"{100 * rows[-1]['agree_final_fidelity']:3.0f}% of prompts, final gap {rows[-1]['final_fidelity_gap']:+.1f}")
        x = kernels.pool_step(x, eps, a, a_prev, 1.0, 1, seed=100 + i)[0][:, 0].float()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {out} (device: cpu, {torch.get_num_threads()} threads; toy model, {n} prompts, k={k})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
