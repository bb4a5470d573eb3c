"""DPO, ORPO, SimPO and KTO on the built-in task, from one SFT model: one command.

    python benchmarks/preference_methods.py [--out DIR] [--seed N]

Writes the task and a tiny Llama (default sizes), fine-tunes it with the settings of
scripts/demo.sh, trains every method from that SFT model through the `rlhfkit` command
(each in its own process, so that its wall time and peak resident memory are its own),
then samples one completion per held-out test prompt (temperature 1) from each model and
prints a markdown table: mean gold reward ± standard error, and the KL to the SFT model
(mean over prompts of Σ_t log π(y_t) − log π_sft(y_t) on the model's own samples).
About ten minutes on a 2-core CPU; figures in results.json under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import torch

from rlhfkit.config import GenerationConfig, ModelConfig
from rlhfkit.data.formats import load_prompts
from rlhfkit.data.tasks import describe
from rlhfkit.evaluate import gold_eval, kl_to_reference
from rlhfkit.models.load import load_causal_lm, load_tokenizer
from rlhfkit.models.tiny import make_tiny_model

# SFT as in scripts/demo.sh; then (row, command, data file, options). One epoch of the 2304 pairs is
# 72 steps of 32. Settings tuned on seed 0: full fine-tuning of a tiny model needs learning rates far
# above those for 7B models, and a firmer leash (DPO beta 0.25, KTO beta 1 on the skewed data) than
# the defaults, or it drifts into repetition that the gold reward punishes.
SFT = ["--optim.lr", "3e-3", "--train.epochs", "10", "--train.batch_size", "32"]
METHODS = [
    ("DPO", "dpo", "preference.jsonl", ["--beta", "0.25", "--optim.lr", "5e-4", "--train.epochs", "1"]),
    ("ORPO", "orpo", "preference.jsonl", ["--lam", "0.5", "--optim.lr", "1e-3", "--train.epochs", "1"]),
    ("SimPO", "simpo", "preference.jsonl", ["--beta", "2.0", "--gamma", "0.5", "--optim.lr", "3e-4",
                                             "--train.epochs", "1"]),
    ("KTO", "kto", "unpaired.jsonl", ["--beta", "0.1", "--optim.lr", "5e-4", "--train.epochs", "2"]),
    # 1 desirable : 4 undesirable; lambda_D n_D / (lambda_U n_U) = 4 / 4 = 1, the KTO paper's advice
    ("KTO 1:4, desirable_weight 4", "kto", "unpaired_1to4.jsonl",
     ["--beta", "1.0", "--desirable_weight", "4", "--optim.lr", "3e-4", "--train.epochs", "3"]),
    ("KTO 1:4, unweighted", "kto", "unpaired_1to4.jsonl",
     ["--beta", "1.0", "--desirable_weight", "1", "--optim.lr", "3e-4", "--train.epochs", "3"]),
]


def run_command(argv: list[str], log: Path) -> tuple[float, float]:
    """Run `rlhfkit ARGV` in a child process; returns (wall seconds, peak RSS in MiB) of that child."""
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "rlhfkit.cli", *argv, "--train.tensorboard", "false",
                                 "--train.overwrite_output_dir", "true"],  # its directories are this script's own
                                stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage; ru_maxrss is KiB on Linux
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, so tell Popen
    if proc.returncode:
        raise SystemExit(f"rlhfkit {argv[0]} failed (exit {proc.returncode}); see {log}")
    return time.perf_counter() - start, usage.ru_maxrss / 1024


def write_imbalanced(unpaired: Path, out: Path, seed: int) -> Path:
    """Every undesirable example and a quarter as many desirable ones (1:4)."""
    rows = [json.loads(line) for line in unpaired.read_text().splitlines()]
    good, bad = [r for r in rows if r["label"]], [r for r in rows if not r["label"]]
    rng = random.Random(seed)
    subset = rng.sample(good, len(bad) // 4) + bad
    rng.shuffle(subset)
    out.write_text("".join(json.dumps(r) + "\n" for r in subset))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench-preference", help="directory for data, models and logs")
    parser.add_argument("--seed", type=int, default=0, help="seed of the task, the model, training and sampling")
    args = parser.parse_args()
    out = Path(args.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    data = out / "data"
    describe.write(data, describe.TaskSpec(seed=args.seed))
    write_imbalanced(data / "unpaired.jsonl", data / "unpaired_1to4.jsonl", args.seed)
    make_tiny_model("llama", out / "tiny", seed=args.seed)
    seed = ["--seed", str(args.seed)]

    runs = {}  # table row → its model directory, wall seconds and peak RSS

    def train(name: str, argv: list[str]) -> None:
        print(f"training {name} ...", file=sys.stderr, flush=True)
        slug = name.lower().replace(" ", "-").replace(",", "").replace(":", "to")
        wall, rss = run_command([*argv, "--out", str(out / slug), *seed], out / "logs" / f"{slug}.txt")
        runs[name] = {"dir": str(out / slug), "wall_s": wall, "peak_rss_mib": rss}

    train("SFT", ["sft", "--model", str(out / "tiny"), "--data", str(data / "sft.jsonl"), *SFT])
    for name, command, file, options in METHODS:
        train(name, [command, "--model", runs["SFT"]["dir"], "--data", str(data / file), *options])

    prompts = [r["prompt"] for r in load_prompts(data / "prompts_test.jsonl")]
    cpu = torch.device("cpu")
    tokenizer = load_tokenizer(runs["SFT"]["dir"])
    sft = load_causal_lm(ModelConfig(path=runs["SFT"]["dir"]), cpu)
    results = []
    for name, run in runs.items():
        print(f"evaluating {name} ...", file=sys.stderr, flush=True)
        model = load_causal_lm(ModelConfig(path=run["dir"]), cpu)
        gold = gold_eval(model, tokenizer, prompts, GenerationConfig(temperature=1.0), seed=args.seed)
        kl, kl_err = kl_to_reference(model, sft, gold.generations, tokenizer.pad_token_id)
        results.append({"method": name, "gold": gold.mean, "gold_stderr": gold.stderr, "kl_to_sft": kl,
                        "kl_stderr": kl_err, "eos_rate": gold.eos_rate, **run})
    (out / "results.json").write_text(json.dumps(results, indent=1))

    print(f"\nseed {args.seed}, {len(prompts)} test prompts, sampling at temperature 1; "
          "wall time and peak RSS of each training process\n")
    print("| method | gold reward ± stderr | KL to SFT | wall time (s) | peak RSS (MiB) |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['method']} | {r['gold']:.3f} ± {r['gold_stderr']:.3f} | {r['kl_to_sft']:.2f} | "
              f"{r['wall_s']:.0f} | {r['peak_rss_mib']:.0f} |")


if __name__ == "__main__":
    main()
