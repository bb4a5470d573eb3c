"""Why the KL penalty matters: PPO at β = 0 vs the default β, on the built-in task.

    python benchmarks/ppo_kl.py [--out DIR] [--seed 0] [--steps 80] [--betas 0,0.1]

Prepares the task, a tiny model, SFT and a reward model once (as `rlhfkit quickstart`
does), then runs PPO for each β and prints, every 10 steps, the proxy score and the gold
reward of the rollouts and the KL to the SFT model, then a held-out table (256 test
prompts, one sample each at temperature 1): gold reward ± stderr, proxy score, KL to SFT.
Over-optimisation shows as a proxy that keeps rising while the gold reward falls.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from rlhfkit.data.formats import load_prompts
from rlhfkit.models.load import load_causal_lm, load_tokenizer
from rlhfkit.models.reward import RewardModel
from rlhfkit.quickstart import CPU, evaluate_model, gold_probe, ppo_config, prepare
from rlhfkit.config import ModelConfig
from rlhfkit.trainers import ppo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/ppo_kl")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--betas", default="0,0.1")
    parser.add_argument("--target_kl", type=float, default=None, help="PPO's early stop within a step (default: off)")
    a = parser.parse_args()
    out = Path(a.out)
    data, _ = prepare(out, a.seed)
    betas = [float(b) for b in a.betas.split(",")]
    for beta in betas:
        cfg = dataclasses.replace(ppo_config(out, out / f"ppo_beta{beta:g}", data, a.seed, a.steps, beta),
                                  target_kl=a.target_kl)
        ppo.train(cfg, probe=gold_probe)

    print(f"\nrollouts during training (64 prompts a step, seed {a.seed}): proxy score / gold reward / KL to SFT")
    print("| step | " + " | ".join(f"β = {b:g}" for b in betas) + " |")
    print("|---|" + "---|" * len(betas))
    logs = {b: [json.loads(line) for line in (out / f"ppo_beta{b:g}" / "metrics.jsonl").read_text().splitlines()]
            for b in betas}
    for i in list(range(0, a.steps, 10)) + [a.steps - 1]:
        cells = [f"{r['rollout/score']:+.2f} / {r['rollout/gold']:.3f} / {r['rollout/kl']:.1f}"
                 for r in (logs[b][i] for b in betas)]
        print(f"| {i + 1} | " + " | ".join(cells) + " |")

    prompts = [r["prompt"] for r in load_prompts(data["prompts_test"])]
    rm = RewardModel.from_pretrained(str(out / "rm"), device=CPU)
    tokenizer = load_tokenizer(str(out / "sft"))
    reference = load_causal_lm(ModelConfig(path=str(out / "sft")), CPU)
    rows = {"SFT": evaluate_model(str(out / "sft"), None, tokenizer, prompts, rm, a.seed)}
    for b in betas:
        rows[f"PPO β = {b:g}"] = evaluate_model(str(out / f"ppo_beta{b:g}"), reference, tokenizer, prompts, rm, a.seed)
    print(f"\nheld-out test prompts ({len(prompts)}, one sample each, temperature 1)")
    print("| model | gold reward | proxy score | KL to SFT |")
    print("|---|---|---|---|")
    for name, r in rows.items():
        kl = f"{r['kl_to_sft']:.2f} ± {r['kl_to_sft_stderr']:.2f}" if "kl_to_sft" in r else "-"
        print(f"| {name} | {r['gold_reward_mean']:.3f} ± {r['gold_reward_stderr']:.3f} | "
              f"{r['proxy_reward_mean']:+.2f} | {kl} |")
    (out / "ppo_kl.json").write_text(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "samples"}
                                                 for k, v in rows.items()}, indent=2))


if __name__ == "__main__":
    main()
