"""`rlhfkit quickstart`: the whole pipeline on the built-in task, on CPU, in one process.

make the task → make a tiny model → SFT → reward model → PPO, each stage evaluated on the
same held-out test prompts with the gold reward, written to ``OUT/summary.json``. Every
model is a standard HF directory under OUT; every stage logs ``metrics.jsonl`` and
TensorBoard events. The gold reward is used here for evaluation only, never as a
training signal.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhfkit.config import GenerationConfig, LoraConfig, ModelConfig, OptimConfig, TrainConfig, arg
from rlhfkit.data.formats import load_preference, load_prompts
from rlhfkit.data.tasks import describe
from rlhfkit.evaluate import gold_eval, kl_to_reference, reward_model_eval
from rlhfkit.models.load import load_causal_lm, load_tokenizer
from rlhfkit.models.reward import RewardModel
from rlhfkit.models.tiny import make_tiny_model
from rlhfkit.trainers import ppo, reward, sft


@dataclass
class QuickstartConfig:
    """`rlhfkit quickstart`: task → tiny model → SFT → reward model → PPO, evaluated with the gold reward."""

    out: str = arg("runs/quickstart", "directory for every model, log and summary.json")
    seed: int = arg(0, "seed of the task, the model and every stage")
    fast: bool = arg(False, "a shorter run (for tests): fewer epochs and PPO steps")
    ppo_steps: int = arg(60, "PPO steps (rollout batches of 64 prompts)")
    beta: float = arg(0.1, "PPO's KL penalty β")
    arch: str = arg("llama", "architecture of the tiny model")


def _eval_stage(name: str, model, tokenizer, prompts, reference, rm: RewardModel, gen: GenerationConfig,
                seed: int) -> dict:
    """Gold reward, proxy score and (against ``reference``) KL on one sample per test prompt."""
    result = gold_eval(model, tokenizer, prompts, gen, seed=seed)
    row = {"stage": name, **result.summary(),
           "proxy_reward_mean": rm.score(prompts, result.completions).mean().item()}
    if reference is not None:
        row["kl_to_sft"], row["kl_to_sft_stderr"] = kl_to_reference(model, reference, result.generations,
                                                                    tokenizer.pad_token_id)
    row["samples"] = [{"prompt": p, "completion": c, "gold": r}
                      for p, c, r in zip(result.prompts[:8], result.completions[:8], result.rewards[:8])]
    return row


def run(cfg: QuickstartConfig) -> dict:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    summary: dict = {"seed": cfg.seed, "decoding": "sampling, temperature 1.0, 1 sample per test prompt",
                     "stages": {}}
    gen = GenerationConfig(max_new_tokens=24)

    def timed(name, fn):
        t0 = time.perf_counter()
        value = fn()
        summary["stages"].setdefault(name, {})["seconds"] = time.perf_counter() - t0
        return value

    data = timed("data", lambda: describe.write(out / "data", describe.TaskSpec(seed=cfg.seed)))
    tiny = timed("tiny_model", lambda: make_tiny_model(cfg.arch, out / "tiny", seed=cfg.seed))
    test_prompts = [r["prompt"] for r in load_prompts(data["prompts_test"])]
    tb = True

    sft_cfg = sft.SFTConfig(data=str(data["sft"]), model=ModelConfig(path=str(tiny)),
                            optim=OptimConfig(lr=3e-3, warmup_steps=10),
                            train=TrainConfig(out=str(out / "sft"), epochs=6.0 if cfg.fast else 10.0, batch_size=32,
                                              seed=cfg.seed, tensorboard=tb))
    timed("sft", lambda: sft.train(sft_cfg))

    rm_cfg = reward.RewardConfig(data=str(data["preference"]), model=ModelConfig(path=str(out / "sft")),
                                 optim=OptimConfig(lr=1e-3, warmup_steps=10),
                                 train=TrainConfig(out=str(out / "rm"), epochs=1.0 if cfg.fast else 2.0,
                                                   batch_size=32, seed=cfg.seed, tensorboard=tb))
    timed("rm", lambda: reward.train(rm_cfg))
    rm = RewardModel.from_pretrained(str(out / "rm"), device=torch.device("cpu"))
    rm_result = reward_model_eval(rm, load_preference(data["preference_test"]))
    meta = json.loads(data["meta"].read_text())
    summary["stages"]["rm"].update({**rm_result, "accuracy_ceiling": meta["label_accuracy_ceiling_test"]})

    ppo_cfg = ppo.PPOConfig(prompts=str(data["prompts_train"]), reward_model=str(out / "rm"), beta=cfg.beta,
                            model=ModelConfig(path=str(out / "sft")), lora=LoraConfig(enabled=True, r=16, alpha=32),
                            optim=OptimConfig(lr=3e-4, warmup_steps=0, schedule="constant"), generation=gen,
                            train=TrainConfig(out=str(out / "ppo"), max_steps=cfg.ppo_steps // (2 if cfg.fast else 1),
                                              log_every=1, seed=cfg.seed, tensorboard=tb))
    timed("ppo", lambda: ppo.train(ppo_cfg, probe=lambda p, t: {
        "rollout/gold": sum(describe.gold_reward(a, b) for a, b in zip(p, t)) / len(t)}))

    tokenizer = load_tokenizer(str(out / "sft"))
    reference = load_causal_lm(ModelConfig(path=str(out / "sft")), torch.device("cpu"))
    for name in ("sft", "ppo"):
        model = reference if name == "sft" else load_causal_lm(ModelConfig(path=str(out / name)), torch.device("cpu"))
        row = _eval_stage(name, model, tokenizer, test_prompts, None if name == "sft" else reference, rm, gen,
                          cfg.seed)
        summary["stages"][name].update(row)
    summary["seconds"] = time.perf_counter() - t_start
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def format_summary(summary: dict) -> str:
    stages = summary["stages"]
    lines = [f"rlhfkit quickstart (seed {summary['seed']}), {summary['seconds']:.0f} s; test prompts, "
             f"{summary['decoding']}", "",
             f"{'stage':<6} {'gold reward':>15} {'KL to SFT':>10} {'proxy':>7} {'seconds':>8}"]
    for name in ("sft", "ppo"):
        s = stages[name]
        kl = f"{s['kl_to_sft']:.2f}" if "kl_to_sft" in s else "-"
        lines.append(f"{name:<6} {s['gold_reward_mean']:>8.3f} ± {s['gold_reward_stderr']:.3f} {kl:>10} "
                     f"{s['proxy_reward_mean']:>7.2f} {s['seconds']:>8.0f}")
    rm = stages["rm"]
    lines += ["", f"reward model: held-out accuracy {rm['accuracy']:.3f} ± {rm['accuracy_stderr']:.3f} "
                  f"(label-noise ceiling {rm['accuracy_ceiling']:.3f}), agreement with gold "
                  f"{rm['gold_agreement']:.3f} ± {rm['gold_agreement_stderr']:.3f}"]
    return "\n".join(lines)
