"""`rlhfkit quickstart`: the whole pipeline on the built-in task, in one process (CPU, or a GPU with --device).

make the task → make a tiny model → SFT → reward model → PPO and DPO (+ two baselines),
each stage evaluated on the same held-out test prompts with the gold reward, written to
``OUT/summary.json`` and an HTML report ``OUT/report.html`` with its plots in ``OUT/plots``. Every
model is a standard HF directory under OUT; every stage logs ``metrics.jsonl`` and
TensorBoard events. The gold reward is used here for evaluation only, never as a
training signal. The stage functions are reused by ``benchmarks/``.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from rlhfkit.config import SEED_BOUNDS, GenerationConfig, ModelConfig, OptimConfig, TrainConfig, arg
from rlhfkit.data.formats import load_preference, load_prompts
from rlhfkit.data.tasks import describe
from rlhfkit.evaluate import gold_eval, kl_to_reference, reward_model_eval
from rlhfkit.models.load import load_causal_lm, load_tokenizer, resolve_device
from rlhfkit.models.reward import RewardModel
from rlhfkit.models.tiny import make_tiny_model
from rlhfkit.ops import mean_stderr
from rlhfkit.rollout.generate import generate
from rlhfkit.trainers import ppo, preference, reward, sft

CPU = torch.device("cpu")
THROUGHPUT = {"sft": "train/tokens_per_s", "rm": "train/tokens_per_s", "dpo": "train/tokens_per_s",
              "sft_chosen": "train/tokens_per_s", "ppo": "time/tokens_per_s"}  # stage → its metrics.jsonl key
STAGE_ORDER = ("sft", "sft_chosen", "best_of_4", "ppo", "dpo", "orpo", "simpo", "kto")


def stage_train(**settings) -> TrainConfig:
    """A stage's training settings. Its directory under OUT is the quickstart's own, so a rerun deletes any
    checkpoints an interrupted run left there instead of refusing to start (``train.overwrite_output_dir``)."""
    return TrainConfig(overwrite_output_dir=True, **settings)


def extra_methods(root: Path, data: dict, seed: int, device: str = "auto", dtype: str = "auto") -> dict:
    """`--all`: the other direct methods from the SFT model (settings of benchmarks/preference_methods.py)."""
    def common(name, epochs=1.0, lr=5e-4):
        return dict(model=ModelConfig(path=str(root / "sft"), dtype=dtype), optim=OptimConfig(lr=lr, warmup_steps=10),
                    train=stage_train(out=str(root / name), epochs=epochs, seed=seed, device=device))

    return {"orpo": preference.ORPOConfig(data=str(data["preference"]), lam=0.5, **common("orpo", lr=1e-3)),
            "simpo": preference.SimPOConfig(data=str(data["preference"]), beta=2.0, gamma=0.5,
                                            **common("simpo", lr=3e-4)),
            "kto": preference.KTOConfig(data=str(data["unpaired"]), beta=0.1, **common("kto", epochs=2.0))}
GENERATION = GenerationConfig(max_new_tokens=24)  # answers are ~10 tokens; room to ramble


@dataclass
class QuickstartConfig:
    """`rlhfkit quickstart`: task → tiny model → SFT → reward model → PPO and DPO, with two baselines
    (SFT on the chosen answers; best-of-4 SFT samples ranked by the reward model), all evaluated with the
    gold reward on the same held-out test prompts."""

    out: str = arg("runs/quickstart", "directory for every model, log and summary.json")
    seed: int = arg(0, "seed of the task, the model and every stage", **SEED_BOUNDS)
    fast: bool = arg(False, "a shorter run (for tests): half the PPO steps")
    ppo_steps: int = arg(40, "PPO steps (rollout batches of 64 prompts); halved by --fast", ge=1)
    beta: float = arg(0.1, "PPO's KL penalty β")
    arch: str = arg("llama", "architecture of the tiny model")
    threads: int = arg(1, "CPU threads for torch (0 = torch's default); tiny models run fastest on one")
    device: str = arg("cpu", "where every stage trains and is evaluated: cpu, cuda, cuda:1, or auto (a GPU when "
                             "there is one); the figures in the README are the CPU's")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = arg(
        "auto", "weights dtype; auto = float32 on CPU; bf16 mixed precision on a GPU that has it (frozen weights "
        "in bfloat16, trained ones in float32)")
    all: bool = arg(False, "also ORPO, SimPO and KTO; and GRPO, RLOO, REINFORCE++ on the arithmetic task "
                           "(a second table, by held-out accuracy; about 2 minutes more on a 2-core CPU)")


def gold_probe(prompts, texts) -> dict[str, float]:
    """Mean gold reward of a rollout batch, logged beside the proxy score (never trained on)."""
    return {"rollout/gold": sum(describe.gold_reward(p, t) for p, t in zip(prompts, texts)) / len(texts)}


def prepare(out: Path, seed: int, arch: str = "llama", device: str = "cpu", dtype: str = "auto"
            ) -> tuple[dict, dict[str, float]]:
    """Task, tiny model, SFT model and reward model under ``out``; returns the task paths and seconds per stage."""
    seconds = {}
    t0 = time.perf_counter()
    data = describe.write(out / "data", describe.TaskSpec(seed=seed))
    tiny = make_tiny_model(arch, out / "tiny", seed=seed)
    seconds["data+tiny_model"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    sft.train(sft.SFTConfig(data=str(data["sft"]), model=ModelConfig(path=str(tiny), dtype=dtype),
                            optim=OptimConfig(lr=3e-3, warmup_steps=10),
                            train=stage_train(out=str(out / "sft"), epochs=10.0, batch_size=32,
                                              seed=seed, device=device)))
    seconds["sft"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    reward.train(reward.RewardConfig(data=str(data["preference"]),
                                     model=ModelConfig(path=str(out / "sft"), dtype=dtype),
                                     optim=OptimConfig(lr=1e-3, warmup_steps=10),
                                     train=stage_train(out=str(out / "rm"), epochs=2.0,
                                                       batch_size=32, seed=seed, device=device)))
    seconds["rm"] = time.perf_counter() - t0
    return data, seconds


def ppo_config(root: Path, out: Path, data: dict, seed: int, steps: int, beta: float, device: str = "cpu",
               dtype: str = "auto") -> ppo.PPOConfig:
    """PPO from ``root/sft`` against ``root/rm``: shared base, LoRA actor/critic (output head included)."""
    return ppo.PPOConfig(prompts=str(data["prompts_train"]), reward_model=str(root / "rm"), beta=beta,
                         model=ModelConfig(path=str(root / "sft"), dtype=dtype), critic_lr=1e-3,
                         optim=OptimConfig(lr=1e-3, warmup_steps=0, schedule="constant"), generation=GENERATION,
                         train=stage_train(out=str(out), max_steps=steps, log_every=1, seed=seed, device=device))


def _samples(prompts, completions, rewards) -> list[dict]:
    return [{"prompt": p, "completion": c, "gold": r} for p, c, r in list(zip(prompts, completions, rewards))[:8]]


def evaluate_model(path: str, reference, tokenizer, prompts: list[str], rm: RewardModel, seed: int,
                   device: torch.device = CPU, dtype: str = "auto") -> dict:
    """Gold reward, proxy score and KL to ``reference`` on one sample per test prompt."""
    model = load_causal_lm(ModelConfig(path=path, dtype=dtype), device)
    result = gold_eval(model, tokenizer, prompts, GENERATION, seed=seed)
    row = {**result.summary(), "proxy_reward_mean": rm.score(prompts, result.completions).mean().item(),
           "samples": _samples(result.prompts, result.completions, result.rewards), "gold_rewards": result.rewards}
    if reference is not None:
        row["kl_to_sft"], row["kl_to_sft_stderr"] = kl_to_reference(model, reference, result.generations,
                                                                    tokenizer.pad_token_id)
    return row


def best_of_n(model, tokenizer, prompts: list[str], rm: RewardModel, n: int, seed: int) -> dict:
    """Baseline: n samples per prompt from ``model``, the one the reward model scores highest.

    Its KL to the sampling model is at most log n − (n − 1)/n (Stiennon et al. 2020), reported as such.
    """
    candidates = [generate(model, tokenizer, prompts, GENERATION, seed=seed * 1000 + k).texts for k in range(n)]
    scores = torch.stack([rm.score(prompts, texts) for texts in candidates])  # (n, B)
    best = scores.argmax(0).tolist()
    picks = [candidates[k][i] for i, k in enumerate(best)]
    rewards = [describe.gold_reward(p, c) for p, c in zip(prompts, picks)]
    mean, stderr = mean_stderr(rewards)
    return {"gold_reward_mean": mean, "gold_reward_stderr": stderr, "n": len(prompts),
            "proxy_reward_mean": scores.max(0).values.mean().item(),
            "kl_to_sft": math.log(n) - (n - 1) / n, "kl_to_sft_stderr": 0.0,
            "samples": _samples(prompts, picks, rewards), "gold_rewards": rewards}


def verifiable(root: Path, seed: int, device: str = "cpu", dtype: str = "auto") -> dict:
    """`--all`'s second table: the critic-free methods on the arithmetic task (settings of
    benchmarks/online_methods.py), by held-out accuracy, 4 samples per test prompt at temperature 1."""
    from rlhfkit.data.tasks import arithmetic
    from rlhfkit.evaluate import per_prompt_accuracy
    from rlhfkit.trainers import online

    out = root / "arithmetic"
    files = arithmetic.write(out / "data", arithmetic.TaskSpec(seed=seed))
    table, seconds = {}, {}
    t0 = time.perf_counter()
    sft.train(sft.SFTConfig(data=str(files["sft"]), model=ModelConfig(path=str(root / "tiny"), dtype=dtype),
                            optim=OptimConfig(lr=3e-3, warmup_steps=10),
                            train=stage_train(out=str(out / "sft"), epochs=30.0, batch_size=32, seed=seed,
                                              device=device)))
    seconds["sft"] = time.perf_counter() - t0
    common = dict(prompts=str(files["prompts_train"]), model=ModelConfig(path=str(out / "sft"), dtype=dtype),
                  rewards=["rlhfkit.data.tasks.arithmetic:exact_answer", "rlhfkit.data.tasks.arithmetic:answer_format"],
                  reward_weights=[1.0, 0.2], group_size=8, prompts_per_step=16, mini_batch_size=64,
                  optim=OptimConfig(lr=2e-3, warmup_steps=0, schedule="constant"),
                  generation=GenerationConfig(max_new_tokens=16))
    methods = {"grpo": online.GRPOConfig, "rloo": online.RLOOConfig, "reinforce_pp": online.ReinforcePPConfig}
    for name, method in methods.items():
        t0 = time.perf_counter()
        online.train(method(**common, train=stage_train(out=str(out / name), max_steps=60, log_every=1, seed=seed,
                                                        device=device)))
        seconds[name] = time.perf_counter() - t0
    rows = load_prompts(files["prompts_test"])
    tokenizer = load_tokenizer(str(out / "sft"))
    sft_hits = None
    for name in ("sft", *methods):
        hits = per_prompt_accuracy(load_causal_lm(ModelConfig(path=str(out / name), dtype=dtype),
                                                  resolve_device(device)), tokenizer, rows,
                                   GenerationConfig(max_new_tokens=16), 4, seed)
        sft_hits = sft_hits or hits
        mean, stderr = mean_stderr(hits)
        gain, gain_se = mean_stderr([h - s for h, s in zip(hits, sft_hits)])
        table[name] = {"accuracy": mean, "accuracy_stderr": stderr, "gain_over_sft": gain,
                       "gain_stderr": gain_se, "n": len(rows), "seconds": seconds[name]}
    return table


def run(cfg: QuickstartConfig) -> dict:
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    device = resolve_device(cfg.device)
    place = dict(device=str(device), dtype=cfg.dtype)
    data, seconds = prepare(out, cfg.seed, cfg.arch, **place)
    epochs = 1.0  # DPO and its baseline: one pass over the preference pairs

    def timed(name, fn):
        t0 = time.perf_counter()
        fn()
        seconds[name] = time.perf_counter() - t0

    steps = max(1, cfg.ppo_steps // 2) if cfg.fast else cfg.ppo_steps
    timed("ppo", lambda: ppo.train(ppo_config(out, out / "ppo", data, cfg.seed, steps, cfg.beta, **place),
                                   probe=gold_probe))
    timed("dpo", lambda: preference.train(preference.DPOConfig(
        data=str(data["preference"]), beta=0.25, model=ModelConfig(path=str(out / "sft"), dtype=cfg.dtype),
        optim=OptimConfig(lr=5e-4, warmup_steps=10),
        train=stage_train(out=str(out / "dpo"), epochs=epochs, seed=cfg.seed, device=str(device)))))
    # baseline at DPO's budget: keep fine-tuning the SFT model, on the chosen answers only
    chosen = out / "data" / "sft_chosen.jsonl"
    chosen.write_text("".join(json.dumps({"prompt": r["prompt"], "completion": r["chosen"]}) + "\n"
                              for r in load_preference(data["preference"])))
    timed("sft_chosen", lambda: sft.train(sft.SFTConfig(
        data=str(chosen), model=ModelConfig(path=str(out / "sft"), dtype=cfg.dtype),
        optim=OptimConfig(lr=1e-3, warmup_steps=10),
        train=stage_train(out=str(out / "sft_chosen"), epochs=epochs, seed=cfg.seed, device=str(device)))))

    extra = extra_methods(out, data, cfg.seed, **place) if cfg.all else {}
    for name, method_cfg in extra.items():
        timed(name, lambda: preference.train(method_cfg))

    prompts = [r["prompt"] for r in load_prompts(data["prompts_test"])]
    rm = RewardModel.from_pretrained(str(out / "rm"), device=device, dtype=cfg.dtype)
    tokenizer = load_tokenizer(str(out / "sft"))
    reference = load_causal_lm(ModelConfig(path=str(out / "sft"), dtype=cfg.dtype), device)
    evaluate = dict(device=device, dtype=cfg.dtype)
    stages = {"rm": {**reward_model_eval(rm, load_preference(data["preference_test"])),
                     "accuracy_ceiling": json.loads(data["meta"].read_text())["label_accuracy_ceiling_test"]},
              "sft": evaluate_model(str(out / "sft"), None, tokenizer, prompts, rm, cfg.seed, **evaluate)}
    t0 = time.perf_counter()
    stages["best_of_4"] = best_of_n(reference, tokenizer, prompts, rm, 4, cfg.seed)
    seconds["best_of_4"] = time.perf_counter() - t0
    for name in ("sft_chosen", "ppo", "dpo", *extra):
        stages[name] = evaluate_model(str(out / name), reference, tokenizer, prompts, rm, cfg.seed, **evaluate)
    for name, s in seconds.items():
        stages.setdefault(name, {})["seconds"] = s
    for name, key in THROUGHPUT.items():
        stages[name].update(throughput(out / name / "metrics.jsonl", key))
    summary = {"seed": cfg.seed, "decoding": "sampling, temperature 1.0, 1 sample per test prompt",
               "device": str(device), "dtype": str(next(reference.parameters()).dtype).removeprefix("torch."),
               "ppo": {"steps": steps, "beta": cfg.beta}, "stages": stages, "versions": versions()}
    if cfg.all:
        summary["verifiable"] = verifiable(out, cfg.seed, **place)
    summary["seconds"] = time.perf_counter() - t_start
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    from rlhfkit.report import write_report

    summary["report"] = str(write_report(out))
    return summary


def versions() -> dict[str, str]:
    """The libraries whose numerics the figures depend on (a new transformers release can move them)."""
    from importlib.metadata import version

    return {name: version(name) for name in ("torch", "transformers", "peft", "tokenizers")}


def throughput(metrics_file: Path, key: str) -> dict[str, float]:
    """A stage's median tokens per second and seconds per step over its logged steps (the first left out: warm-up)."""
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines()] if metrics_file.is_file() else []
    rows = [r for r in rows if key in r][1:] or [r for r in rows if key in r]
    if not rows:
        return {}
    step = "time/step" if key.startswith("time/") else "train/step_seconds"
    return {"tokens_per_s": statistics.median(r[key] for r in rows),
            "step_seconds": statistics.median(r[step] for r in rows)}


def format_summary(summary: dict) -> str:
    stages = summary["stages"]
    place = f", {summary['device']} {summary['dtype']}" if "device" in summary else ""
    lines = [f"rlhfkit quickstart (seed {summary['seed']}{place}), {summary['seconds']:.0f} s; "
             f"{stages['sft']['n']} test prompts, {summary['decoding']}", "",
             f"{'stage':<10} {'gold reward':>15} {'KL to SFT':>10} {'proxy':>7} {'seconds':>8}"]
    for name in STAGE_ORDER:
        s = stages.get(name)
        if s is None or "gold_reward_mean" not in s:
            continue
        kl = f"{s['kl_to_sft']:.2f}" if "kl_to_sft" in s else "-"
        lines.append(f"{name:<10} {s['gold_reward_mean']:>8.3f} ± {s['gold_reward_stderr']:.3f} {kl:>10} "
                     f"{s['proxy_reward_mean']:>7.2f} {s.get('seconds', 0):>8.0f}")
    if "verifiable" in summary:
        lines += ["", "arithmetic task (verifiable reward): test accuracy, 4 samples per prompt at temperature 1",
                  f"{'method':<13} {'accuracy':>15} {'gain over SFT':>17} {'seconds':>8}"]
        for name, r in summary["verifiable"].items():
            gain = "-" if name == "sft" else f"{r['gain_over_sft']:+.3f} ± {r['gain_stderr']:.3f}"
            lines.append(f"{name:<13} {r['accuracy']:>8.3f} ± {r['accuracy_stderr']:.3f} {gain:>17} "
                         f"{r['seconds']:>8.0f}")
    rm = stages["rm"]
    lines += ["", f"reward model: held-out accuracy {rm['accuracy']:.3f} ± {rm['accuracy_stderr']:.3f} "
                  f"(label-noise ceiling {rm['accuracy_ceiling']:.3f}), agreement with gold "
                  f"{rm['gold_agreement']:.3f} ± {rm['gold_agreement_stderr']:.3f}"]
    timed = [(name, stages[name]) for name in THROUGHPUT if "tokens_per_s" in stages.get(name, {})]
    if timed:
        lines += ["training, median over logged steps: " + ", ".join(
            f"{name} {s['tokens_per_s']:,.0f} tokens/s ({s['step_seconds'] * 1000:.0f} ms/step)" for name, s in timed)]
    return "\n".join(lines)
