"""Every method at equal compute on the toy world: base vs SPO vs LPO vs Diffusion-DPO vs MaPO vs NCP.

    python benchmarks/alignment.py [--budgets 2 5] [--methods spo lpo dpo mapo ncp_dpo ncp_cpo] [--seeds 4]
    python benchmarks/alignment.py --methods lpo --merge      # add or redo methods' rows in the CSV
    python benchmarks/alignment.py --pair-source counterfactual --methods dpo mapo ncp_dpo ncp_cpo --budgets 2

For each method and each wall-clock budget B (minutes), one training run through the deepspeed
launcher on 2 CPU ranks (configs/toy_<method>.yaml with train.max_minutes=B: the training loop
stops at the first step boundary past B; setup, launch and export are not in B but are reported),
then ONE `spoxl eval` over all the trained LoRAs and the base, on the held-out captions and seeds.

The offline methods train on one shared preference set drawn from the toy model's own samples
(`spoxl toy pairs`, labelled by the fidelity scorer: the same judge SPO uses as its step-aware
preference model). Drawing it costs time that SPO spends inside its budget, so the CSV states both
ways: `train_s` (the budget as trained) and `total_s` (plus the pair set's generation, once per
offline method). `--pair-source counterfactual` trains them instead on exact renderings against
one-attribute-wrong renderings of the training captions (`spoxl toy pairs --source
counterfactual`: clean labels, no sampling cost), the diagnostic that separates "the pairs carry
too little signal" from "the method cannot learn"; its files get a `_counterfactual` suffix.

Writes benchmarks/results/alignment_<device>.csv (method, budget, score, paired difference vs base
with its standard error, win rate with its 95% interval, peak memory, optimizer steps, UNet sample
evaluations, seconds, and each LoRA's held-out preference accuracy on 64 counterfactual pairs of
held-out captions: learned preference, as against better samples) and alignment_<device>.png (held-out fidelity vs wall-clock per method).
`--merge` keeps the rows already in the CSV for the methods not run now and replaces (or adds)
those of the methods run: the evaluation is deterministic (same captions, seeds and sampler), so
the base and every earlier row stay comparable; the .json records which methods each run added.
Runs in runs/alignment/ (kept: the LoRAs, logs, eval grid). Needs `make venv`; about
(sum of budgets) x (methods) + 15 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = {  # name in the CSV -> (recipe, trains on the offline pair set)
    "spo": ("configs/toy_spo.yaml", False),
    "lpo": ("configs/toy_lpo.yaml", False),  # its toy LRM was trained once, beforehand (spoxl/toy/lrm/lrm.json)
    "dpo": ("configs/toy_dpo.yaml", True),
    "mapo": ("configs/toy_mapo.yaml", True),
    "ncp_dpo": ("configs/toy_ncp.yaml", True),
    "ncp_cpo": ("configs/toy_ncp_cpo.yaml", True),
}
COLUMNS = ["method", "budget_min", "train_s", "total_s", "steps", "s_per_step", "unet_samples", "peak_rss_mib",
           "cuda_peak_mib", "score", "base_score", "diff_vs_base", "diff_stderr", "win_rate", "win_ci95_low",
           "win_ci95_high", "colour_acc", "shape_acc", "position_acc", "n_eval", "heldout_pref_acc",
           "heldout_pref_margin_z"]
PROBE_PAIRS, PROBE_DRAWS = 64, 16


def device_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0).replace(" ", "_")
    except ImportError:
        pass
    return f"cpu{os.cpu_count()}"


def env(threads: int = 1) -> dict:
    """Offline CPU settings; `threads` intra-op threads per process (1 per rank when 2 ranks share the
    2 cores, as `make demo`: more would oversubscribe them and slow every step unevenly)."""
    e = dict(os.environ)
    e["OMP_NUM_THREADS"] = str(threads)
    e.setdefault("DS_ACCELERATOR", "cpu")
    e.setdefault("HF_HUB_OFFLINE", "1")
    e.setdefault("TRANSFORMERS_OFFLINE", "1")
    e.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".venv" / "torch_extensions"))
    return e


def run(cmd: list[str], log: Path, threads: int = 1) -> float:
    """Run cmd from the repository root, its output to log; seconds taken. Stops the benchmark on failure."""
    print("$", " ".join(cmd), flush=True)
    started = time.perf_counter()
    with open(log, "w") as f:
        code = subprocess.call(cmd, cwd=ROOT, env=env(threads), stdout=f, stderr=subprocess.STDOUT)
    if code:
        sys.exit(f"alignment: command failed (exit {code}); see {log}")
    return time.perf_counter() - started


def make_pairs(out: Path, n: int, source: str = "samples") -> float:
    pairs = out / "pairs.parquet"
    timing = out / "pairs_seconds.json"
    if pairs.exists() and timing.exists():  # reused: the recorded generation time still counts
        return json.loads(timing.read_text())["seconds"]
    how = ["--model", "toy", "--margin", "5"] if source == "samples" else ["--source", "counterfactual"]
    seconds = run(["spoxl", "toy", "pairs", *how, "--n", str(n), "--out", str(pairs)],
                  out / "pairs.log", threads=os.cpu_count() or 1)
    timing.write_text(json.dumps({"seconds": seconds, "n": n}))
    return seconds


def train(out: Path, method: str, budget: float, nproc: int) -> dict:
    recipe, offline = METHODS[method]
    run_dir = out / f"{method}_{budget:g}min"
    lora = run_dir / "export" / "pytorch_lora_weights.safetensors"
    summary = run_dir / "summary.json"
    if not (lora.exists() and summary.exists()):
        sets = [f"run.output_dir={run_dir}", f"train.max_minutes={budget:g}", "train.max_steps=1000000",
                "logging.sample_every=0", "checkpoint.every=0", "export.formats=[diffusers]"]
        if offline:
            sets += [f"data.path={out / 'pairs.parquet'}", f"data.cache_dir={out / 'pairs_cache'}"]
        cmd = ["deepspeed", "--num_gpus", str(nproc), "--master_port", str(29700 + nproc), "--module", "spoxl.train",
               "--config", recipe]
        for s in sets:
            cmd += ["--set", s]
        if run_dir.exists():  # an unfinished earlier attempt: start it again
            import shutil

            shutil.rmtree(run_dir)
        launch_s = run(cmd, out / f"{method}_{budget:g}min.log")
        data = json.loads(summary.read_text())
        data["launch_s"] = launch_s
        summary.write_text(json.dumps(data, indent=1))
    return {"lora": lora, **json.loads(summary.read_text())}


def memory_run(out: Path, method: str, steps: int, nproc: int) -> dict:
    """A short FULL fine-tuning run (no LoRA): Diffusion-DPO then keeps a frozen reference copy of
    the UNet and runs it every step, MaPO keeps none; peak memory and seconds per step tell."""
    recipe, _ = METHODS[method]
    run_dir = out / f"{method}_fullft_{steps}steps"
    summary = run_dir / "summary.json"
    if not summary.exists():
        if run_dir.exists():
            import shutil

            shutil.rmtree(run_dir)
        cmd = ["deepspeed", "--num_gpus", str(nproc), "--master_port", str(29800 + nproc), "--module", "spoxl.train",
               "--config", recipe]
        for s in [f"run.output_dir={run_dir}", "lora.enabled=false", f"train.max_steps={steps}", "train.lr=1e-5",
                  "logging.sample_every=0", "checkpoint.save_final=false", "export.at_end=false",
                  f"data.path={out / 'pairs.parquet'}", f"data.cache_dir={out / 'pairs_cache'}"]:
            cmd += ["--set", s]
        run(cmd, out / f"{method}_fullft.log")
    return json.loads(summary.read_text())


def evaluate(out: Path, runs: dict, seeds: int) -> dict:
    ev = out / "eval"
    done = ev / "eval.json"
    if done.exists():  # a rerun after adding nothing: the same models and seeds were scored already
        data = json.loads(done.read_text())
        if [m["model"] for m in data["models"]] == ["base", *runs] and data.get("seeds") == seeds:
            return {m["model"]: m for m in data["models"]}
    cmd = ["spoxl", "eval", "--model", "toy", "--prompts", "held-out", "--seeds", str(seeds), "--scorer", "fidelity",
           "--out", str(ev)]
    for key, r in runs.items():
        cmd += ["--lora", str(r["lora"]), "--name", key]
    run(cmd, out / "eval.log", threads=os.cpu_count() or 1)
    return {m["model"]: m for m in json.loads((ev / "eval.json").read_text())["models"]}


def preference_probe(out: Path, runs: dict) -> dict:
    """Each LoRA's held-out preference accuracy: on 64 counterfactual pairs of HELD-OUT captions
    (exact rendering vs one attribute wrong), how often the tuned UNet denoises the winner better
    than the loser relative to the base (spoxl.evaluation.preference_accuracy, 16 shared draws), and
    the mean margin in standard errors. It tells "learned the preference" apart from "samples got
    better", which the held-out fidelity measures. Cached in <out>/probe.json."""
    import torch

    from spoxl.evaluation import preference_accuracy
    from spoxl.models.loading import load_sdxl
    from spoxl.models.lora import load_lora_into_unet
    from spoxl.toy import world
    from spoxl.toy.pairs import counterfactual_pairs, pair_items

    cache = out / "probe.json"
    done = json.loads(cache.read_text()) if cache.exists() else {}
    todo = [k for k in runs if k not in done]
    if todo:
        torch.set_num_threads(os.cpu_count() or 1)
        items = pair_items(counterfactual_pairs(world.held_out_scenes(), PROBE_PAIRS, seed=1))
        for key in todo:
            components = load_sdxl("toy")
            load_lora_into_unet(components.unet, runs[key]["lora"])
            r = preference_accuracy(components, components.unet, items, draws=PROBE_DRAWS, seed=7)
            done[key] = {"accuracy": r["accuracy"], "margin_z": r["mean_margin"] / r["margin_stderr"]}
            print(f"{key}: held-out preference accuracy {r['accuracy']:.2f}", flush=True)
        cache.write_text(json.dumps(done, indent=1))
    return done


def rows(runs: dict, scores: dict, pair_s: float, probe: dict) -> list[dict]:
    base = scores["base"]
    out = []
    for key, r in runs.items():
        method, budget = key.rsplit("@", 1)
        s = scores[key]
        offline = METHODS[method][1]
        out.append({
            "method": method, "budget_min": float(budget.rstrip("m")), "train_s": round(r["seconds"], 1),
            "total_s": round(r["seconds"] + (pair_s if offline else 0.0), 1), "steps": r["steps"],
            "s_per_step": round(r["seconds"] / max(r["steps"], 1), 3), "unet_samples": int(r["unet_samples"]),
            "peak_rss_mib": round(r["peak_rss_mib"]), "cuda_peak_mib": round(r.get("cuda_peak_mib", 0.0)),
            "score": round(s["mean"], 3), "base_score": round(base["mean"], 3),
            "diff_vs_base": round(s["diff_mean"], 3), "diff_stderr": round(s["diff_stderr"], 3),
            "win_rate": round(s["win_rate"], 4), "win_ci95_low": round(s["win_rate_ci95"][0], 4),
            "win_ci95_high": round(s["win_rate_ci95"][1], 4), "colour_acc": round(s["accuracy"]["colour"], 4),
            "shape_acc": round(s["accuracy"]["shape"], 4), "position_acc": round(s["accuracy"]["position"], 4),
            "n_eval": s["n"], "heldout_pref_acc": round(probe[key]["accuracy"], 4),
            "heldout_pref_margin_z": round(probe[key]["margin_z"], 2),
        })  # fmt: skip
    return out


def plot(table: list[dict], base: float, path: Path, device: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in dict.fromkeys(r["method"] for r in table):
        pts = sorted((r["train_s"] / 60, r["score"], r["diff_stderr"]) for r in table if r["method"] == method)
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[2 * p[2] for p in pts], marker="o", capsize=3,
                    label=method)
    ax.axhline(base, color="grey", linestyle="--", label="base")
    ax.set_xlabel("training wall-clock (minutes, 2 CPU ranks; pair generation not included)")
    ax.set_ylabel("held-out fidelity (toy scorer, 0-100)")
    ax.set_title(f"Toy world, equal compute ({device}); bars: 2 s.e. of the paired difference")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _num(value) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def markdown(table: list[dict]) -> str:
    head = ("| method | budget | steps | s/step | UNet samples | peak RSS | held-out fidelity | vs base | win rate [95%] "
            "| held-out pref. acc. |")
    lines = [head, "|---|---|---|---|---|---|---|---|---|---|"]
    for r in table:
        lines.append(f"| {r['method']} | {r['budget_min']:g} min | {r['steps']} | {r['s_per_step']:.2f} | "
                     f"{r['unet_samples']:,} | {r['peak_rss_mib']} MiB | {r['score']:.1f} | "
                     f"{r['diff_vs_base']:+.2f} ± {r['diff_stderr']:.2f} | {100 * r['win_rate']:.0f}% "
                     f"[{100 * r['win_ci95_low']:.0f}, {100 * r['win_ci95_high']:.0f}] | "
                     f"{_num(r.get('heldout_pref_acc'))} |")  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budgets", type=float, nargs="+", default=[2.0, 5.0], help="minutes of training per run")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--seeds", type=int, default=4, help="seeds per held-out caption in the evaluation")
    p.add_argument("--pairs", type=int, default=1024, help="size of the offline preference set")
    p.add_argument("--nproc", type=int, default=2, help="ranks per training run")
    p.add_argument("--pair-source", choices=("samples", "counterfactual"), default="samples",
                   help="the offline methods' pairs: the toy model's scored samples (default) or exact "
                        "counterfactual renderings (the diagnostic; results get a _counterfactual suffix)")
    p.add_argument("--out", default=None,
                   help="where the runs, pairs and eval go, reused if present (default runs/alignment, "
                        "runs/alignment_counterfactual for counterfactual pairs)")
    p.add_argument("--results", default="benchmarks/results")
    p.add_argument("--merge", action="store_true",
                   help="keep the CSV's rows of the methods not run now; replace those of the methods run")
    p.add_argument("--memory-steps", type=int, default=20,
                   help="steps of the full fine-tuning memory runs of DPO and MaPO (0: skip them)")
    args = p.parse_args(argv)
    if any(b <= 0 for b in args.budgets):
        sys.exit("alignment: --budgets must be > 0 minutes")

    suffix = "" if args.pair_source == "samples" else "_counterfactual"
    out = ROOT / (args.out or f"runs/alignment{suffix}")
    out.mkdir(parents=True, exist_ok=True)
    pair_s = make_pairs(out, args.pairs, args.pair_source) if any(METHODS[m][1] for m in args.methods) else 0.0
    runs = {}
    for budget in args.budgets:
        for method in args.methods:
            runs[f"{method}@{budget:g}m"] = train(out, method, budget, args.nproc)
    scores = evaluate(out, runs, args.seeds)
    table = rows(runs, scores, pair_s, preference_probe(out, runs))
    memory = {m: memory_run(out, m, args.memory_steps, args.nproc) for m in ("dpo", "mapo")
              if m in args.methods and args.memory_steps}

    device = device_name()
    results = ROOT / args.results
    results.mkdir(parents=True, exist_ok=True)
    csv_path = results / f"alignment_{device}{suffix}.csv"
    json_path = results / f"alignment_{device}{suffix}.json"
    merged_from = None
    if args.merge and csv_path.exists():
        with open(csv_path, newline="") as f:
            kept = [r for r in csv.DictReader(f) if r["method"] not in args.methods]
        base_before = {float(r["base_score"]) for r in kept}
        if base_before and any(abs(b - scores["base"]["mean"]) > 1e-3 for b in base_before):
            sys.exit(f"alignment --merge: the base scores {sorted(base_before)} in {csv_path}, {scores['base']['mean']:.3f} "
                     f"now: the evaluation changed, rerun every method")
        order = list(METHODS)
        table = sorted(kept + table, key=lambda r: (float(r["budget_min"]), order.index(r["method"])))
        merged_from = json.loads(json_path.read_text()) if json_path.exists() else {}
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(table)
    ints = ("steps", "unet_samples", "peak_rss_mib", "cuda_peak_mib", "n_eval")
    # rows read back from the CSV (--merge) are text; a column an older run did not have is empty
    table = [{k: (None if v == "" else (int(float(v)) if k in ints else float(v)))
              if k != "method" and isinstance(v, str) else v for k, v in r.items()} for r in table]
    plot(table, scores["base"]["mean"], results / f"alignment_{device}{suffix}.png", device)
    meta = {"device": device, "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "pairs": args.pairs, "pair_source": args.pair_source, "pair_generation_s": round(pair_s, 1), "seeds": args.seeds,
            "budgets_min": args.budgets, "base_score": scores["base"]["mean"],
            "base_accuracy": scores["base"]["accuracy"],
            "full_finetune_memory": {m: {"peak_rss_mib": round(r["peak_rss_mib"]), "cuda_peak_mib": round(r.get("cuda_peak_mib", 0)),
                                         "s_per_step": round(r["seconds"] / max(r["steps"], 1), 3),
                                         "unet_samples_per_step": r["unet_samples"] / max(r["steps"], 1)}
                                     for m, r in memory.items()}}
    if merged_from is not None:  # the earlier run's record stays; this run's is added under merges
        merges = merged_from.pop("merges", []) + [{**meta, "methods": args.methods}]
        meta = {**merged_from, "merges": merges}
        if not memory:
            meta["full_finetune_memory"] = merged_from.get("full_finetune_memory", {})
    json_path.write_text(json.dumps(meta, indent=1) + "\n")
    print(f"base held-out fidelity {scores['base']['mean']:.2f}; pair set: {args.pairs} pairs in {pair_s:.0f} s")
    print(markdown(table))
    for m, r in meta["full_finetune_memory"].items():
        print(f"full fine-tuning, {m}: peak RSS {r['peak_rss_mib']} MiB per rank, {r['s_per_step']:.2f} s/step, "
              f"{r['unet_samples_per_step']:.0f} UNet samples/step")
    print(f"wrote {csv_path} and its .png / .json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
