"""The main job, measured: `rlhfkit quickstart` for several seeds, wall time and the ordering.

    python benchmarks/quickstart.py [--seeds 0,1,2] [--fast] [--out runs/bench_quickstart]

Runs the quickstart once per seed, each in a fresh process (wall time includes start-up),
and prints per seed: seconds, gold reward of SFT / PPO / DPO and the two baselines, and
PPO − SFT and DPO − SFT with standard errors clustered by prompt (the same 256 test
prompts answered by both models: the SE of the per-prompt differences). Then the median
wall time and whether PPO and DPO beat SFT by more than two standard errors and by at
least 0.05 for every seed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path


def paired(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean of b − a and its standard error over prompts."""
    d = [y - x for x, y in zip(a, b)]
    return statistics.mean(d), statistics.stdev(d) / len(d) ** 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--fast", action="store_true")
    parser.add_argument("--out", default="runs/bench_quickstart")
    a = parser.parse_args()
    rows, ok = [], True
    for seed in (int(s) for s in a.seeds.split(",")):
        out = Path(a.out) / f"seed{seed}"
        t0 = time.perf_counter()
        cmd = [sys.executable, "-m", "rlhfkit.cli", "quickstart", "--seed", str(seed), "--out", str(out)]
        subprocess.run(cmd + (["--fast"] if a.fast else []), check=True, capture_output=True)
        seconds = time.perf_counter() - t0
        st = json.loads((out / "summary.json").read_text())["stages"]
        gains = {m: paired(st["sft"]["gold_rewards"], st[m]["gold_rewards"]) for m in ("ppo", "dpo")}
        ok &= all(g > max(0.05, 2 * se) for g, se in gains.values())
        rows.append((seed, seconds, st, gains))
    print(f"\nrlhfkit quickstart{' --fast' if a.fast else ''}: gold reward on 256 test prompts (one sample each, "
          "temperature 1); gains clustered by prompt\n")
    print("| seed | seconds | SFT | SFT on chosen | best-of-4 | PPO | DPO | PPO − SFT | DPO − SFT |")
    print("|---|---|---|---|---|---|---|---|---|")
    for seed, seconds, st, gains in rows:
        cells = [f"{st[m]['gold_reward_mean']:.3f}" for m in ("sft", "sft_chosen", "best_of_4", "ppo", "dpo")]
        diffs = [f"{g:+.3f} ± {se:.3f}" for g, se in gains.values()]
        print(f"| {seed} | {seconds:.0f} | " + " | ".join(cells + diffs) + " |")
    print(f"\nmedian wall time: {statistics.median(r[1] for r in rows):.0f} s; "
          f"PPO and DPO above SFT by > 2 SE and ≥ 0.05 for every seed: {'yes' if ok else 'NO'}")


if __name__ == "__main__":
    main()
