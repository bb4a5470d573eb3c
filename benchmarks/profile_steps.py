"""Where rlhfkit's step time goes, next to the bare PyTorch step (issue #10).

    python benchmarks/profile_steps.py --sizes 1.2M,8.4M --trainers sft,dpo,ppo

Uses the models and data `benchmarks/vs_trl.py` made (run it first, or with `--reps 1` on the
sizes you want). Each (trainer, size, implementation) runs in this process under
``torch.profiler`` for ``--steps`` steps, the first ``--warmup`` not recorded: step boundaries
come from wrapping ``rlhfkit.trainers.loop.optimizer_step`` (SFT, DPO), ``rlhfkit.trainers.ppo.learn``
(PPO) and ``vs_trl.after_bare_step`` (bare). Printed per run: wall ms per step (under the
profiler), the matmul GFLOP and aten calls per step (machine-independent: the work done), and
self time grouped: python (time in no aten operator: the step's own Python, generation's
per-token loop, data, logging), matmul, attention, softmax-family (log-softmax, logsumexp,
softmax, gather, sampling), optimizer (AdamW's foreach ops), other aten ops; then the top ops.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, schedule

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vs_trl  # noqa: E402  (benchmarks/ is not a package)

GROUPS = {
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"),
    "attention": ("aten::_scaled_dot_product", "aten::_flash_attention", "aten::_efficient_attention"),
    "softmax-family": ("aten::_log_softmax", "aten::logsumexp", "aten::_softmax", "aten::log_softmax",
                       "aten::softmax", "aten::nll_loss", "aten::gather", "aten::exp", "aten::multinomial"),
    "optimizer": ("aten::_foreach", "aten::addcdiv", "aten::lerp", "aten::sqrt"),
}


def group_of(name: str) -> str:
    return next((g for g, prefixes in GROUPS.items() if name.startswith(prefixes)), "other")


def profile_run(job: dict, steps: int, warmup: int) -> dict:
    """Run ``job`` once under the profiler; per-step wall time and self time by operator."""
    import rlhfkit.trainers.loop as loop
    import rlhfkit.trainers.ppo as ppo

    captured = []  # the one recorded cycle's operator table
    prof = profile(activities=[ProfilerActivity.CPU], with_flops=True,
                   on_trace_ready=lambda p: captured.append(p.key_averages()),
                   schedule=schedule(wait=0, warmup=warmup, active=steps - warmup, repeat=1))
    marks: list[float] = []

    def mark():
        marks.append(time.perf_counter())  # before prof.step(), which at the window's end builds the table
        prof.step()

    originals = (loop.optimizer_step, ppo.learn, vs_trl.after_bare_step)

    def step_then_mark(*a, **kw):
        out = originals[0](*a, **kw)
        mark()
        return out

    def learn_then_mark(*a, **kw):
        out = originals[1](*a, **kw)
        mark()
        return out

    loop.optimizer_step, ppo.learn, vs_trl.after_bare_step = step_then_mark, learn_then_mark, mark
    try:
        with prof:
            {"rlhfkit": vs_trl.run_rlhfkit, "bare": vs_trl.run_bare}[job["impl"]](job)
    finally:
        loop.optimizer_step, ppo.learn, vs_trl.after_bare_step = originals
    active = steps - warmup
    wall = (marks[warmup + active - 1] - marks[warmup - 1]) / active  # seconds per recorded step
    ops, calls, flops = defaultdict(float), 0, 0
    for e in captured[0]:
        ops[e.key] += e.self_cpu_time_total / 1e6 / active  # seconds per step
        if e.key.startswith("aten::"):
            calls += e.count
            flops += e.flops
    groups = defaultdict(float)
    for name, sec in ops.items():
        # time not inside any aten operator: the step's own Python (ProfilerStep*) and Python-level ranges
        groups[group_of(name) if name.startswith("aten::") else "python"] += sec
    return {"wall_s": wall, "groups": dict(groups), "aten_calls": calls / active, "gflop": flops / 1e9 / active,
            "top": sorted(ops.items(), key=lambda kv: -kv[1])[:10]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1.2M,8.4M")
    p.add_argument("--trainers", default="sft,dpo,ppo")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--work", default="runs/bench_vs_trl", help="vs_trl.py's work directory (models, data)")
    p.add_argument("--out", default=str(vs_trl.HERE / "results" / "profile_steps.json"))
    args = p.parse_args()
    torch.set_num_threads(1)
    work = Path(args.work).resolve()
    s = vs_trl.Shapes()
    results = []
    for size in args.sizes.split(","):
        model, rm = work / "models" / size, work / "models" / f"{size}-rm"
        if not (model / "config.json").is_file():
            raise SystemExit(f"no model at {model}: run benchmarks/vs_trl.py --sizes {size} first")
        for trainer in args.trainers.split(","):
            for impl in ("rlhfkit", "bare"):
                job = {"trainer": trainer, "size": size, "impl": impl, "steps": args.steps, "shapes": vars(s),
                       "threads": 1, "model": str(model), "reward_model": str(rm),
                       "data": {k: str(work / "data" / f"{k}.jsonl") for k in ("sft", "pairs", "unpaired", "prompts")},
                       "out": str(work / "profile" / f"{trainer}-{size}-{impl}")}
                if (work / "models" / f"{size}-rm-lora").is_dir():  # PPO scores as in vs_trl.py: a reward adapter
                    job["reward_adapter"] = str(work / "models" / f"{size}-rm-lora")
                r = profile_run(job, args.steps, args.warmup)
                results.append({"trainer": trainer, "size": size, "impl": impl, **r})
                groups = "  ".join(f"{g} {v * 1e3:.0f}" for g, v in sorted(r["groups"].items(), key=lambda kv: -kv[1]))
                print(f"\n{trainer} {size} {impl}: {r['wall_s'] * 1e3:.0f} ms/step, {r['gflop']:.2f} GFLOP "
                      f"(matmuls), {r['aten_calls']:.0f} aten calls; self time by group (ms): {groups}")
                for name, sec in r["top"]:
                    print(f"    {sec * 1e3:8.1f} ms  {name}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
