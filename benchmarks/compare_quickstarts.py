"""Two quickstart runs side by side (a CPU and a GPU one, say): gold reward, tokens/s and ms per step of
each stage, and whether each run keeps the quickstart's ordering (the end-to-end test's checks).

    python benchmarks/compare_quickstarts.py runs/gpu/qs_cpu/summary.json runs/gpu/qs_cuda/summary.json

Exits 1 when a run breaks the ordering. ``benchmarks/gpu.sh`` writes the two summaries.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "e2e"))
from test_quickstart import check_the_ordering  # noqa: E402  (the end-to-end test's own claims)

STAGES = ("sft", "rm", "sft_chosen", "best_of_4", "ppo", "dpo")


def label(summary: dict) -> str:
    return f"{summary.get('device', 'cpu')} {summary.get('dtype', 'float32')}"


def table(a: dict, b: dict) -> list[str]:
    lines = [f"A = {label(a)}, B = {label(b)}; tokens/s and ms/step: medians over each stage's logged steps",
             f"{'stage':<11} {'gold A':>14} {'gold B':>14} {'tokens/s A':>11} {'tokens/s B':>11} {'B/A':>6} "
             f"{'ms/step A':>10} {'ms/step B':>10} {'s A':>6} {'s B':>6}"]

    def gold(s):
        return f"{s['gold_reward_mean']:.3f} ± {s['gold_reward_stderr']:.3f}" if "gold_reward_mean" in s else "-"

    def num(s, key, scale=1.0):
        return f"{s[key] * scale:,.0f}" if key in s else "-"

    for name in STAGES:
        sa, sb = a["stages"].get(name, {}), b["stages"].get(name, {})
        both = "tokens_per_s" in sa and "tokens_per_s" in sb
        ratio = f"{sb['tokens_per_s'] / sa['tokens_per_s']:.2f}" if both else "-"
        lines.append(f"{name:<11} {gold(sa):>14} {gold(sb):>14} {num(sa, 'tokens_per_s'):>11} "
                     f"{num(sb, 'tokens_per_s'):>11} {ratio:>6} {num(sa, 'step_seconds', 1000):>10} "
                     f"{num(sb, 'step_seconds', 1000):>10} {num(sa, 'seconds'):>6} {num(sb, 'seconds'):>6}")
    lines.append(f"{'total':<11} {'':>14} {'':>14} {'':>11} {'':>11} {'':>6} {'':>10} {'':>10} "
                 f"{a['seconds']:>6.0f} {b['seconds']:>6.0f}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("first", type=Path)
    parser.add_argument("second", type=Path)
    args = parser.parse_args()
    runs = [json.loads(p.read_text()) for p in (args.first, args.second)]
    print("\n".join(table(*runs)))
    ok = True
    for path, summary in zip((args.first, args.second), runs):
        try:
            check_the_ordering(summary["stages"])
            print(f"{label(summary)} ({path}): the ordering holds (PPO and DPO beat SFT by > 2 SE and 0.05)")
        except (AssertionError, KeyError) as exc:
            ok = False
            print(f"{label(summary)} ({path}): the ordering FAILS: {exc!r}")
        print(f"  versions: {summary.get('versions')}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
