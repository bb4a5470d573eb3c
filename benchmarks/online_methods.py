"""GRPO, Dr. GRPO, RLOO and REINFORCE++ on the arithmetic task, from one SFT model: one command.

    python benchmarks/online_methods.py [--out DIR] [--seed N] [--steps N] [--methods GRPO,...]

Writes the arithmetic task (single-digit sums, rlhfkit.data.tasks.arithmetic) and a tiny Llama (default
sizes: hidden 128, 2 layers), fine-tunes it on the mixed-quality demonstrations (half of them wrong), runs
each method from that SFT model through the `rlhfkit` command (each in its own process), with the reward
exact_answer + 0.2 · answer_format, then measures held-out accuracy (exact_answer) on the test prompts:
four samples per prompt at temperature 1 (mean ± standard error over prompts), the paired gain over SFT
(± its standard error over prompts), and greedy accuracy. About seven minutes on a 2-core CPU; figures in
results.json under --out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from statistics import mean, stdev

import torch

from rlhfkit.config import GenerationConfig, ModelConfig
from rlhfkit.data.formats import load_prompts
from rlhfkit.data.tasks import arithmetic
from rlhfkit.evaluate import per_prompt_accuracy
from rlhfkit.models.load import load_causal_lm, load_tokenizer
from rlhfkit.models.tiny import make_tiny_model

# SFT long enough that the tiny model learns the sums it was shown (half of them wrong), then every
# method with the same budget: steps × 16 prompts × 8 samples. Tuned on seed 0 (valid split).
SFT = ["--optim.lr", "3e-3", "--train.epochs", "30", "--train.batch_size", "32"]
REWARDS = ["--rewards", "rlhfkit.data.tasks.arithmetic:exact_answer,rlhfkit.data.tasks.arithmetic:answer_format",
           "--reward_weights", "1,0.2"]
COMMON = ["--group_size", "8", "--prompts_per_step", "16", "--mini_batch_size", "64", "--optim.lr", "2e-3",
          "--generation.max_new_tokens", "16"]
METHODS = [
    ("GRPO", "grpo", []),
    ("Dr. GRPO", "grpo", ["--advantage", "dr_grpo"]),
    ("RLOO", "rloo", []),
    ("REINFORCE++", "reinforce-pp", ["--beta", "0.01"]),
    ("REINFORCE++-baseline", "reinforce-pp", ["--beta", "0.01", "--baseline", "group"]),  # group mean off first
    # the full model trained (no LoRA: TRL's default), at a learning rate for full weights
    ("GRPO full model", "grpo", ["--lora.enabled", "false", "--optim.lr", "2e-4"]),
]
SAMPLES = 4  # samples per test prompt at temperature 1


def run_command(argv: list[str], log: Path) -> float:
    """Run `rlhfkit ARGV` in a child process on one thread; returns its wall seconds."""
    start = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "w") as f:
        rc = subprocess.call([sys.executable, "-m", "rlhfkit.cli", *argv, "--train.tensorboard", "false",
                              "--train.overwrite_output_dir", "true"],  # its directories are this script's own
                             stdout=f, stderr=subprocess.STDOUT, env=env)
    if rc:
        raise SystemExit(f"rlhfkit {argv[0]} failed (exit {rc}); see {log}")
    return time.perf_counter() - start


def stderr(values: list[float]) -> float:
    return stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench-online", help="directory for data, models and logs")
    parser.add_argument("--seed", type=int, default=0, help="seed of the task, the model, training and sampling")
    parser.add_argument("--steps", type=int, default=60, help="RL steps per method (16 prompts × 8 samples each)")
    parser.add_argument("--methods", default="", help="comma-separated names from the table (default: all); "
                        f"of {', '.join(name for name, _, _ in METHODS)}")
    args = parser.parse_args()
    chosen = [m for m in METHODS if not args.methods or m[0] in args.methods.split(",")]
    torch.set_num_threads(1)
    out = Path(args.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    data = out / "data"
    arithmetic.write(data, arithmetic.TaskSpec(seed=args.seed))
    make_tiny_model("llama", out / "tiny", seed=args.seed)
    seed = ["--seed", str(args.seed)]
    runs = {}

    def train(name: str, argv: list[str]) -> None:
        print(f"training {name} ...", file=sys.stderr, flush=True)
        slug = name.lower().replace(" ", "-").replace(".", "").replace("+", "p")
        wall = run_command([*argv, "--out", str(out / slug), *seed], out / "logs" / f"{slug}.txt")
        runs[name] = {"dir": str(out / slug), "wall_s": wall}

    train("SFT", ["sft", "--model", str(out / "tiny"), "--data", str(data / "sft.jsonl"), *SFT])
    for name, command, options in chosen:
        common = [a for k, v in zip(COMMON[::2], COMMON[1::2]) if k not in options for a in (k, v)]  # options win
        train(name, [command, "--model", runs["SFT"]["dir"], "--prompts", str(data / "prompts_train.jsonl"),
                     "--eval_prompts", str(data / "prompts_valid.jsonl"), "--train.max_steps", str(args.steps),
                     *REWARDS, *common, *options])

    rows = load_prompts(data / "prompts_test.jsonl")
    cpu = torch.device("cpu")
    tokenizer = load_tokenizer(runs["SFT"]["dir"])
    sampled, greedy = GenerationConfig(max_new_tokens=16), GenerationConfig(max_new_tokens=16, temperature=0.0)
    results, sft_hits = [], None
    for name, run in runs.items():
        print(f"evaluating {name} ...", file=sys.stderr, flush=True)
        model = load_causal_lm(ModelConfig(path=run["dir"]), cpu)
        hits = per_prompt_accuracy(model, tokenizer, rows, sampled, SAMPLES, args.seed)
        greedy_hits = per_prompt_accuracy(model, tokenizer, rows, greedy, 1, args.seed)
        sft_hits = sft_hits or hits
        gain = [h - s for h, s in zip(hits, sft_hits)]
        results.append({"method": name, "accuracy": mean(hits), "accuracy_stderr": stderr(hits),
                        "gain_over_sft": mean(gain), "gain_stderr": stderr(gain),
                        "greedy_accuracy": mean(greedy_hits), "greedy_stderr": stderr(greedy_hits), **run})
    (out / "results.json").write_text(json.dumps(results, indent=1))

    print(f"\nseed {args.seed}, {len(rows)} held-out test prompts, {SAMPLES} samples each at temperature 1 "
          f"(± standard error over prompts); {args.steps} RL steps of 16 prompts × 8 samples per method\n")
    print("| method | test accuracy (T=1) | gain over SFT (paired) | greedy accuracy | wall time (s) |")
    print("|---|---|---|---|---|")
    for r in results:
        gain = "-" if r["method"] == "SFT" else f"{r['gain_over_sft']:+.3f} ± {r['gain_stderr']:.3f}"
        print(f"| {r['method']} | {r['accuracy']:.3f} ± {r['accuracy_stderr']:.3f} | {gain} | "
              f"{r['greedy_accuracy']:.3f} ± {r['greedy_stderr']:.3f} | {r['wall_s']:.0f} |")


if __name__ == "__main__":
    main()
