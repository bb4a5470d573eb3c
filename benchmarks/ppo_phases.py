"""Where rlhfkit's PPO step goes, phase by phase, and the same against an earlier commit, alternating.

    python benchmarks/ppo_phases.py                           # this tree: 8.4M, 10 steps, 1 rep
    python benchmarks/ppo_phases.py --against f684b9d --reps 3   # earlier commit vs this tree, in turns

The job is `vs_trl.py`'s rlhfkit PPO job (same model, data, shapes, reward adapter; its assets are
made if missing), run in a fresh process per measurement. Printed per run: the medians of
``time/step``, ``time/generate`` (rollout), ``time/forward`` (reference pass), ``time/score``
(reward) and ``time/learn`` over the steps after ``--warmup``, and the child's peak RSS. With
``--against REV`` the commit is checked out in a temporary git worktree and its ``src/`` put first
on ``PYTHONPATH``; the two alternate, so the machine's drift falls on both.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
PHASES = ("time/step", "time/generate", "time/forward", "time/score", "time/learn")


def child(size: str, steps: int, warmup: int, work: str) -> None:
    import torch

    import vs_trl

    torch.set_num_threads(1)
    s = vs_trl.Shapes()
    assets = vs_trl.make_assets(Path(work).resolve(), [size], s)
    with tempfile.TemporaryDirectory() as out:
        job = {"trainer": "ppo", "size": size, "impl": "rlhfkit", "rep": 0, "steps": steps, "warmup": warmup,
               "threads": 1, "shapes": asdict(s), "model": assets["models"][size],
               "reward_model": assets["reward_models"][size], "reward_adapter": assets["reward_adapters"][size],
               "data": assets["data"], "out": out}
        vs_trl.run_rlhfkit(job)
        rows = [json.loads(line) for line in open(Path(out) / "metrics.jsonl")]
    rows = [r for r in rows if "time/step" in r][warmup:]
    result = {k: statistics.median(r[k] for r in rows) for k in PHASES}
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result), flush=True)


def measure(src: Path, args) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(src), str(HERE)])}
    proc = subprocess.run([sys.executable, __file__, "--child", "--size", args.size, "--steps", str(args.steps),
                           "--warmup", str(args.warmup), "--work", args.work], env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"the PPO job failed ({src}):\n{proc.stderr[-2000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="8.4M", help="a size of vs_trl.py: 1.2M, 8.4M or 42M")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--against", help="an earlier commit to run in turns with this tree")
    p.add_argument("--work", default="runs/bench_vs_trl", help="vs_trl.py's models and data")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.size, args.steps, args.warmup, args.work)
    trees = {"this tree": HERE.parent / "src"}
    with tempfile.TemporaryDirectory() as tmp:
        if args.against:
            subprocess.run(["git", "-C", str(HERE), "worktree", "add", "--detach", "-q", f"{tmp}/wt", args.against],
                           check=True)
            trees = {args.against: Path(tmp) / "wt" / "src", **trees}
        try:
            runs: dict[str, list[dict]] = {name: [] for name in trees}
            for rep in range(args.reps):
                for name, src in trees.items():
                    r = measure(src, args)
                    runs[name].append(r)
                    print(f"rep {rep} {name:>10s}: " + "  ".join(f"{k[5:]} {r[k]:.3f}" for k in PHASES)
                          + f"  peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
        finally:
            if args.against:
                subprocess.run(["git", "-C", str(HERE), "worktree", "remove", "--force", f"{tmp}/wt"])
    print(f"\nmedians over {args.reps} rep(s), {args.size}, {args.steps - args.warmup} timed steps each")
    for name, rs in runs.items():
        print(f"{name:>10s}: " + "  ".join(f"{k[5:]} {statistics.median(r[k] for r in rs):.3f}" for k in PHASES)
              + f"  peak RSS {statistics.median(r['peak_rss_mb'] for r in rs):.0f} MB")
    if args.against:
        before, after = (statistics.median(r["time/step"] for r in rs) for rs in runs.values())
        print(f"step time, this tree / {args.against}: {after / before:.3f}")


if __name__ == "__main__":
    main()
