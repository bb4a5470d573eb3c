"""rlhfkit against TRL and against the bare PyTorch step, in one command (issue #10).

    python benchmarks/vs_trl.py                                    # 1.2M and 8.4M, every trainer, 3 reps
    python benchmarks/vs_trl.py --sizes 1.2M --trainers sft,dpo --reps 1 --steps 6   # a quick look

For each size and trainer the three implementations run in alternation (rlhfkit, TRL, bare,
rlhfkit, TRL, bare, ...), each measurement in a fresh subprocess, on the same tiny Llama
(`rlhfkit.models.tiny`), the same rows, batch, lengths, steps and thread count. Printed per
trainer and size: median step time, items/s, peak RSS of the child (ru_maxrss) and the ratios
rlhfkit/TRL, rlhfkit/bare, TRL/bare; also rollout tokens/s, rlhfkit's `generate` against bare
`model.generate`. Everything lands in ``benchmarks/results/vs_trl.json`` as well.

Shapes (the baseline's of issue #10): batch 8, prompts of 32 tokens, completions of 31 tokens +
EOS; GRPO 8 prompts x G = 4 samples, PPO 8 prompts, 32 new tokens, 1 epoch, one mini-batch.
fp32, no gradient checkpointing, no evaluation, TensorBoard or checkpoints during the timed steps.

Step times, first ``--warmup`` steps dropped, median over the rest, then the median over reps:
* rlhfkit: the public ``train(cfg)`` of each trainer with ``log_every=1``; differences of the
  cumulative ``train/seconds`` (SFT, RM, DPO, KTO) or ``time/step`` (GRPO, PPO) in metrics.jsonl.
* TRL: a TrainerCallback; the time between consecutive ``on_step_end`` calls, so that data
  loading and logging count as they do in rlhfkit's cumulative clock (``on_step_begin`` →
  ``on_step_end`` is kept in the JSON as ``inner``). TRL 1.16 for SFT/RM/DPO/KTO/GRPO (the
  ``[bench]`` extra); PPO with TRL 1.12.0, the last release with ``PPOTrainer``, installed by
  this script into ``benchmarks/.venv-trl112`` (a ``--system-site-packages`` venv plus
  ``pip install trl==1.12.0 --no-deps``, so torch/transformers are the ones being measured).
* bare: ``model(input_ids)`` on the whole batch, cross-entropy over every position, backward,
  AdamW step, plus one no-grad forward per reference pass the method needs:
    sft   train step on (8, 64)
    rm    train step on (16, 64): chosen and rejected (an LM head, not a score head)
    dpo   train step on (16, 64) + reference forward on (16, 64)
    kto   train step on (8, 64) + policy forward of the mismatched pairs (8, 64) + reference (16, 64)
    grpo  model.generate of 32 samples x 32 new tokens + train step on (32, 64); no reference
          (TRL's default beta = 0, rlhfkit's kl_coef = 0)
    ppo   model.generate of 8 x 32 new tokens + no-grad forwards of reference, reward model and
          critic on (8, 64) + train steps of policy and critic on (8, 64): four full models
  Models as the methods hold them: PPO's bare step has four full models, GRPO's one.

What runs against what: rlhfkit's PPO runs the whole stack on one base model (shared mode): actor
and critic are LoRA adapters (rank 16, all linear layers and the output head, its default), the
reference is the base with adapters off, and the reward model is a third LoRA adapter with its own
score head (``SharedBaseRoles.add_reward_adapter``): a LoRA reward model (rank 16, every linear layer
but the head) that rlhfkit's own ``rm`` trainer makes on the same base in the setup (4 steps of 8
pairs, unnormalised; ``{size}-rm-lora`` beside the models). TRL's PPO runs as its examples do, with
four full models (policy, reference, reward, value): its trainer takes the reward model as a separate
module. For GRPO both libraries train the same LoRA (rank 16, every linear layer but the head: TRL
1.16 refuses a LoRA on lm_head) through ``peft_config`` in TRL. Rewards: GRPO a cheap length function
for both; PPO for TRL (and the bare step) a one-label sequence classifier made from the same tiny
model, for rlhfkit the reward adapter above (briefly trained, so the two score differently: what is
compared is the cost of a step and its memory, not what is learnt).

The machine is usually shared: figures are rough; compare ratios from one run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
TRL112_VENV = HERE / ".venv-trl112"

# name -> (hidden size, layers, heads); params with the describe task's 591-token vocabulary
SIZES = {"1.2M": (128, 4, 4), "8.4M": (256, 8, 8), "42M": (512, 10, 8)}
TRAINERS = ("sft", "rm", "dpo", "kto", "grpo", "ppo", "rollout")
IMPLS = {"rollout": ("rlhfkit", "bare")}  # every other trainer: rlhfkit, trl, bare
# GRPO's adapters in both libraries: every linear layer but the output head (TRL 1.16 refuses a LoRA
# on lm_head, since its log-probs read lm_head.weight directly); rlhfkit's own default adds the head
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class Shapes:
    """Sizes shared by every implementation."""

    batch: int = 8  # examples (pairs for RM/DPO, prompts for GRPO/PPO) per optimiser step
    prompt_tokens: int = 32
    completion_tokens: int = 32  # EOS included
    group: int = 4  # GRPO samples per prompt

    @property
    def seq(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def items_per_step(trainer: str, s: Shapes) -> int:
    """Examples (SFT, KTO), pairs (RM, DPO), completions (GRPO, PPO) or generated tokens (rollout)."""
    return {"grpo": s.batch * s.group, "rollout": s.batch * s.completion_tokens}.get(trainer, s.batch)


def length_reward(completions, **kwargs) -> list[float]:
    """GRPO's reward in every implementation: cheap, so the trainers are what is timed."""
    return [-len(c) / 100 for c in completions]


# --------------------------------------------------------------------------- assets (parent)


def fixed_length(tokenizer, pieces: list[str], n: int, keep: str) -> str:
    """Text of about ``n`` tokens: the pieces joined, cut to n tokens at the start or the end."""
    ids: list[int] = []
    for p in pieces:
        ids += tokenizer(p, add_special_tokens=False).input_ids
        if len(ids) >= n:
            break
    return tokenizer.decode(ids[-n:] if keep == "end" else ids[:n])


def make_data(model_dir: Path, out: Path, s: Shapes, rows: int = 256) -> dict[str, str]:
    """The describe task stretched to ~32-token prompts and ~31-token completions (+ EOS)."""
    from transformers import AutoTokenizer

    from rlhfkit.data.tasks import describe

    tok = AutoTokenizer.from_pretrained(model_dir)
    task = describe.generate()
    pairs, sft = task["preference"], task["sft"]
    texts = [r["chosen"] for r in pairs] + [r["rejected"] for r in pairs]

    def prompt(i: int) -> str:  # earlier prompts as context; ends with this one's "\nAssistant:"
        return fixed_length(tok, [pairs[(i - k) % len(pairs)]["prompt"] for k in range(6)][::-1],
                            s.prompt_tokens, keep="end")

    def answer(first: str, i: int) -> str:
        return fixed_length(tok, [first] + texts[i + 1: i + 8], s.completion_tokens - 1, keep="start")

    out.mkdir(parents=True, exist_ok=True)
    files = {
        "sft": [{"prompt": prompt(i), "completion": answer(sft[i]["completion"], i)} for i in range(rows)],
        "pairs": [{"prompt": prompt(i), "chosen": answer(pairs[i]["chosen"], i),
                   "rejected": answer(pairs[i]["rejected"], i + 3)} for i in range(rows)],
        "unpaired": [{"prompt": prompt(i), "completion": answer(sft[i]["completion"], i), "label": i % 2 == 0}
                     for i in range(rows)],
        "prompts": [{"prompt": prompt(i)} for i in range(rows)],
    }
    paths = {}
    for name, records in files.items():
        paths[name] = str(out / f"{name}.jsonl")
        Path(paths[name]).write_text("".join(json.dumps(r) + "\n" for r in records))
    return paths


def make_reward_adapter(model_dir: Path, out: Path, pairs: str, steps: int = 4) -> None:
    """rlhfkit's PPO reward: a LoRA reward model on the PPO base, from rlhfkit's own `rm` (a few steps).

    PPO in shared mode loads it as a third adapter on its one base (``SharedBaseRoles.add_reward_adapter``).
    The adapter records its base's path, which PPO checks: ``model_dir`` is absolute. Trained in a
    process of its own: a child's ru_maxrss starts from its parent's peak RSS (Linux carries the
    high-water mark across exec), so a parent that had trained a model would inflate every
    measurement below it (1894 MB for a PPO child that peaks at ~1500 MB on its own).
    """
    subprocess.run([sys.executable, "-m", "rlhfkit.cli", "rm", "--model", str(model_dir), "--data", pairs,
                    "--out", str(out), "--lora.enabled", "true", "--train.max_steps", str(steps),
                    "--train.batch_size", "8", "--train.log_every", str(steps), "--train.eval_every", "0",
                    "--train.tensorboard", "false", "--train.device", "cpu", "--model.dtype", "float32",
                    "--normalize", "false", "--eval_fraction", "0", "--train.overwrite_output_dir", "true"],
                   check=True)


def make_assets(work: Path, sizes: list[str], s: Shapes) -> dict:
    """Per size a tiny Llama, a full reward model made from it (TRL's PPO, the bare step) and a LoRA reward
    model trained on it by rlhfkit (rlhfkit's PPO); one data set (the tokenizer is the same)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rlhfkit.models.tiny import make_tiny_model

    assets: dict = {"models": {}, "reward_models": {}, "reward_adapters": {}, "params": {}}
    for size in sizes:
        model_dir, rm_dir = (work / "models" / size).resolve(), work / "models" / f"{size}-rm"
        hidden, layers, heads = SIZES[size]
        if not (model_dir / "config.json").is_file():
            make_tiny_model("llama", model_dir, hidden_size=hidden, num_layers=layers, num_heads=heads)
        if not (rm_dir / "config.json").is_file():
            torch.manual_seed(0)
            rm = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
            tok = AutoTokenizer.from_pretrained(model_dir)
            rm.config.pad_token_id = tok.pad_token_id
            rm.save_pretrained(rm_dir, safe_serialization=True)
            tok.save_pretrained(rm_dir)
        from transformers import AutoConfig
        cfg = AutoConfig.from_pretrained(model_dir)
        assets["params"][size] = (cfg.vocab_size * hidden + layers * (4 * hidden ** 2 + 3 * hidden * 4 * hidden
                                                                      + 2 * hidden) + hidden)
        assets["models"][size], assets["reward_models"][size] = str(model_dir), str(rm_dir)
    assets["data"] = make_data(Path(assets["models"][sizes[0]]), work / "data", s)
    for size in sizes:
        adapter_dir = work / "models" / f"{size}-rm-lora"
        if not (adapter_dir / "adapter_config.json").is_file():
            make_reward_adapter(Path(assets["models"][size]), adapter_dir, assets["data"]["pairs"])
        assets["reward_adapters"][size] = str(adapter_dir)
    return assets


def trl112_python() -> str:
    """The venv holding TRL 1.12.0 beside this environment's torch and transformers; made once."""
    python = TRL112_VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(TRL112_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "trl==1.12.0", "--no-deps"], check=True)
    return str(python)


# --------------------------------------------------------------------------- rlhfkit (child)


def _train_section(job: dict, batches: bool = True) -> dict:
    """The train section of a job; ``batches``: with its batch size (the supervised trainers'; PPO and GRPO
    set theirs in their own sections and refuse this one)."""
    return {"out": job["out"], **({"batch_size": job["shapes"]["batch"]} if batches else {}),
            "max_steps": job["steps"], "log_every": 1, "eval_every": 0, "save_every": 0, "tensorboard": False,
            "device": "cpu", "seed": 0, "overwrite_output_dir": True}  # profile_steps.py reruns into the same dir


def _metric_times(out: str, key: str, cumulative: bool) -> list[float]:
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    values = [r[key] for r in rows if key in r]
    if cumulative:
        values = [b - a for a, b in zip([0.0] + values[:-1], values)]
    return values


def run_rlhfkit(job: dict) -> dict:
    from rlhfkit.config import from_dict

    trainer, data, s = job["trainer"], job["data"], Shapes(**job["shapes"])
    model = {"path": job["model"], "dtype": "float32"}
    common = {"max_length": 4 * s.seq, "model": model, "train": _train_section(job), "optim": {"lr": 1e-4}}
    if trainer == "sft":
        from rlhfkit.trainers.sft import SFTConfig, train

        train(from_dict(SFTConfig, {**common, "data": data["sft"], "eval_fraction": 0.0}))
    elif trainer == "rm":
        from rlhfkit.trainers.reward import RewardConfig, train

        train(from_dict(RewardConfig, {**common, "data": data["pairs"], "eval_fraction": 0.0, "normalize": False}))
    elif trainer in ("dpo", "kto"):
        from rlhfkit.trainers.preference import DPOConfig, KTOConfig, train

        cls, rows = (DPOConfig, data["pairs"]) if trainer == "dpo" else (KTOConfig, data["unpaired"])
        train(from_dict(cls, {**common, "data": rows}))
    elif trainer == "grpo":
        from rlhfkit.rewards import CombinedReward, Reward
        from rlhfkit.trainers.online import GRPOConfig, train

        cfg = from_dict(GRPOConfig, {
            "prompts": data["prompts"], "group_size": s.group, "prompts_per_step": s.batch,
            "mini_batch_size": s.batch * s.group, "epochs": 1, "model": model,
            "train": _train_section(job, batches=False),
            "lora": {"enabled": True, "target_modules": ",".join(LORA_TARGETS)},
            "generation": {"max_new_tokens": s.completion_tokens, "batch_size": s.batch * s.group}})
        train(cfg, reward=CombinedReward([Reward("length", length_reward)]))
    elif trainer == "ppo":
        from rlhfkit.trainers.ppo import PPOConfig, train

        # the reward adapter (make_assets); a job without one (profile_steps.py's) scores with the full model
        train(from_dict(PPOConfig, {
            "prompts": data["prompts"], "reward_model": job.get("reward_adapter", job["reward_model"]),
            "mode": "shared",
            "rollout_batch_size": s.batch, "mini_batch_size": s.batch, "ppo_epochs": 1, "model": model,
            "train": _train_section(job, batches=False),
            "generation": {"max_new_tokens": s.completion_tokens, "batch_size": s.batch}}))
    elif trainer == "rollout":
        return {"step_times": rollout_times(job, use_rlhfkit=True)}
    if trainer in ("grpo", "ppo"):
        return {"step_times": _metric_times(job["out"], "time/step", cumulative=False)}
    return {"step_times": _metric_times(job["out"], "train/seconds", cumulative=True)}


def rollout_times(job: dict, use_rlhfkit: bool) -> list[float]:
    """Seconds per generate call of ``batch`` prompts x ``completion_tokens`` new tokens, sampling at T = 1."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhfkit.config import GenerationConfig
    from rlhfkit.data.collate import encode_prompt, pad_batch
    from rlhfkit.rollout.generate import generate

    s = Shapes(**job["shapes"])
    tok = AutoTokenizer.from_pretrained(job["model"])
    model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32).eval()
    prompts = [json.loads(line)["prompt"] for line in Path(job["data"]["prompts"]).read_text().splitlines()]
    gen = GenerationConfig(max_new_tokens=s.completion_tokens, batch_size=s.batch)
    times = []
    for step in range(job["steps"]):
        batch = prompts[step * s.batch: (step + 1) * s.batch]
        if use_rlhfkit:  # the whole call: tokenising, sampling, cutting at EOS, decoding
            t0 = time.perf_counter()
            generate(model, tok, batch, gen, seed=step)
        else:  # bare: pre-tokenised prompts, the same sampling (T = 1, no top-k / top-p)
            input_ids = pad_batch([encode_prompt(tok, p) for p in batch], tok.pad_token_id, side="left")
            t0 = time.perf_counter()
            with torch.no_grad():
                model.generate(input_ids=input_ids, attention_mask=input_ids.ne(tok.pad_token_id).long(),
                               do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                               max_new_tokens=s.completion_tokens, pad_token_id=tok.pad_token_id)
        times.append(time.perf_counter() - t0)
    return times


# --------------------------------------------------------------------------- TRL (child)


def _step_timer():
    """A TrainerCallback recording wall-clock times at train begin and at each step's begin and end."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.start, self.begins, self.ends = None, [], []

        def on_train_begin(self, args, state, control, **kw):
            self.start = time.perf_counter()

        def on_step_begin(self, args, state, control, **kw):
            self.begins.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            self.ends.append(time.perf_counter())

        def result(self) -> dict:
            ends = [self.start] + self.ends
            inner = [e - b for b, e in zip(self.begins, self.ends)] if len(self.begins) == len(self.ends) else []
            return {"step_times": [b - a for a, b in zip(ends[:-1], ends[1:])], "inner": inner}

    return StepTimer()


def _trl_common(job: dict) -> dict:
    """TrainingArguments every TRL config shares: fp32 on the CPU, no checkpointing, no reports, no saves."""
    return dict(output_dir=job["out"], per_device_train_batch_size=job["shapes"]["batch"], max_steps=job["steps"],
                learning_rate=1e-4, logging_steps=1, report_to=[], save_strategy="no", eval_strategy="no",
                gradient_checkpointing=False, bf16=False, fp16=False, use_cpu=True, disable_tqdm=True,
                dataloader_num_workers=0, seed=0)


def run_trl(job: dict) -> dict:
    import torch
    from datasets import load_dataset
    from transformers import AutoTokenizer

    if job["trainer"] == "ppo":
        return run_trl_ppo(job)
    import trl

    trainer_name, data, s = job["trainer"], job["data"], Shapes(**job["shapes"])
    tok = AutoTokenizer.from_pretrained(job["model"])
    timer = _step_timer()
    common = {**_trl_common(job), "model_init_kwargs": {"dtype": torch.float32}}
    seq = {"max_length": 4 * s.seq}

    def dataset(name: str):
        return load_dataset("json", data_files=data[name], split="train")

    if trainer_name == "sft":
        trainer = trl.SFTTrainer(model=job["model"], args=trl.SFTConfig(**common, **seq), train_dataset=dataset("sft"),
                                 processing_class=tok, callbacks=[timer])
    elif trainer_name == "rm":
        trainer = trl.RewardTrainer(model=job["model"], args=trl.RewardConfig(**common, **seq),
                                    train_dataset=dataset("pairs"), processing_class=tok, callbacks=[timer])
    elif trainer_name == "dpo":
        trainer = trl.DPOTrainer(model=job["model"], args=trl.DPOConfig(**common, **seq, beta=0.1),
                                 train_dataset=dataset("pairs"), processing_class=tok, callbacks=[timer])
    elif trainer_name == "kto":
        trainer = trl.KTOTrainer(model=job["model"], args=trl.KTOConfig(**common, **seq, beta=0.1),
                                 train_dataset=dataset("unpaired"), processing_class=tok, callbacks=[timer])
    elif trainer_name == "grpo":
        from peft import LoraConfig

        common["per_device_train_batch_size"] = s.batch * s.group  # completions per step
        args = trl.GRPOConfig(**common, num_generations=s.group, max_completion_length=s.completion_tokens,
                              temperature=1.0, top_k=0, top_p=1.0, beta=0.0, num_iterations=1)
        lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
        trainer = trl.GRPOTrainer(model=job["model"], reward_funcs=length_reward, args=args,
                                  train_dataset=dataset("prompts"), processing_class=tok, peft_config=lora,
                                  callbacks=[timer])
    else:
        raise ValueError(f"no TRL runner for {trainer_name}")
    trainer.train()
    return {**timer.result(), "trl_version": trl.__version__}


def run_trl_ppo(job: dict) -> dict:
    """TRL 1.12's PPOTrainer with four full models, as its examples run it (in the TRL 1.12 venv)."""
    import torch
    import trl
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    s = Shapes(**job["shapes"])
    tok = AutoTokenizer.from_pretrained(job["model"], padding_side="left")

    def lm():
        return AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32)

    def scorer():
        return AutoModelForSequenceClassification.from_pretrained(job["reward_model"], num_labels=1,
                                                                  dtype=torch.float32)

    prompts = load_dataset("json", data_files=job["data"]["prompts"], split="train")
    prompts = prompts.map(lambda r: {"input_ids": tok(r["prompt"]).input_ids}, remove_columns=["prompt"])
    args = PPOConfig(**_trl_common(job), num_mini_batches=1, num_ppo_epochs=1, response_length=s.completion_tokens,
                     total_episodes=job["steps"] * s.batch, local_rollout_forward_batch_size=s.batch,
                     stop_token="eos", num_sample_generations=0, temperature=1.0)
    timer = _step_timer()
    trainer = PPOTrainer(args=args, processing_class=tok, model=lm(), ref_model=lm(), reward_model=scorer(),
                         value_model=scorer(), train_dataset=prompts, callbacks=[timer])
    trainer.train()
    return {**timer.result(), "trl_version": trl.__version__}


# --------------------------------------------------------------------------- bare PyTorch (child)


def run_bare(job: dict) -> dict:
    """The work each step cannot avoid, with nothing around it (see the module docstring)."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    trainer, s = job["trainer"], Shapes(**job["shapes"])
    if trainer == "rollout":
        return {"step_times": rollout_times(job, use_rlhfkit=False)}
    torch.manual_seed(0)

    def lm(train: bool):
        model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32)
        return model.train() if train else model.eval().requires_grad_(False)

    vocab = lm(False).config.vocab_size
    policy = lm(True)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-4)

    def train_step(model, opt, ids):  # ids (B, T)
        logits = model(input_ids=ids).logits  # (B, T, V)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    @torch.no_grad()
    def forward(model, ids):
        model(input_ids=ids)

    def ids(rows: int):
        return torch.randint(3, vocab, (rows, s.seq))

    B = s.batch
    if trainer in ("dpo", "kto", "ppo"):
        reference = lm(False)
    if trainer == "ppo":
        reward, critic = lm(False), lm(True)
        critic_opt = torch.optim.AdamW(critic.parameters(), lr=1e-4)
    if trainer in ("grpo", "ppo"):
        tok = AutoTokenizer.from_pretrained(job["model"], padding_side="left")
        prompts = [json.loads(line)["prompt"] for line in Path(job["data"]["prompts"]).read_text().splitlines()]
        rows = B * s.group if trainer == "grpo" else B
        prompt_ids = tok(prompts[:rows], return_tensors="pt", padding=True).input_ids  # ~32 tokens each

    def sample():  # (rows, P + 32)
        policy.eval()
        with torch.no_grad():
            out = policy.generate(input_ids=prompt_ids, attention_mask=prompt_ids.ne(tok.pad_token_id).long(),
                                  do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                  max_new_tokens=s.completion_tokens, min_new_tokens=s.completion_tokens,
                                  pad_token_id=tok.pad_token_id)
        policy.train()
        return out

    def ppo_step():  # experience (sample + three no-grad forwards), then policy and critic updates
        seqs = sample()
        for model in (reference, reward, critic):
            forward(model, seqs)
        train_step(policy, optimizer, seqs)
        train_step(critic, critic_opt, seqs)

    steps = {
        "sft": lambda: train_step(policy, optimizer, ids(B)),
        "rm": lambda: train_step(policy, optimizer, ids(2 * B)),
        "dpo": lambda: (train_step(policy, optimizer, ids(2 * B)), forward(reference, ids(2 * B))),
        "kto": lambda: (train_step(policy, optimizer, ids(B)), forward(policy, ids(B)), forward(reference, ids(2 * B))),
        "grpo": lambda: train_step(policy, optimizer, sample()),
        "ppo": ppo_step,
    }
    times = []
    for _ in range(job["steps"]):
        t0 = time.perf_counter()
        steps[trainer]()
        times.append(time.perf_counter() - t0)
        after_bare_step()
    return {"step_times": times}


def after_bare_step() -> None:
    """Called after each bare step; benchmarks/profile_steps.py replaces it to mark profiler steps."""


# --------------------------------------------------------------------------- one measurement (child)


def child(job: dict) -> None:
    import torch

    torch.set_num_threads(job["threads"])
    runner = {"rlhfkit": run_rlhfkit, "trl": run_trl, "bare": run_bare}[job["impl"]]
    t0 = time.perf_counter()
    result = runner(job)
    result["wall"] = time.perf_counter() - t0
    result["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    Path(job["result"]).write_text(json.dumps(result))


def measure(job: dict, work: Path) -> dict:
    """Run one job in a fresh process; its result, or the error and the log file to read."""
    name = f"{job['trainer']}-{job['size']}-{job['impl']}-{job['rep']}"
    job = {**job, "out": str(work / "runs" / name), "result": str(work / "results" / f"{name}.json")}
    log = work / "logs" / f"{name}.log"
    for d in (Path(job["result"]).parent, log.parent):
        d.mkdir(parents=True, exist_ok=True)
    python = trl112_python() if job["impl"] == "trl" and job["trainer"] == "ppo" else sys.executable
    env = {**os.environ, "OMP_NUM_THREADS": str(job["threads"]), "MKL_NUM_THREADS": str(job["threads"]),
           "TOKENIZERS_PARALLELISM": "false", "TRL_EXPERIMENTAL_SILENCE": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    Path(job["result"]).unlink(missing_ok=True)
    with open(log, "w") as f:
        proc = subprocess.run([python, str(Path(__file__).resolve()), "--child", json.dumps(job)],
                              stdout=f, stderr=subprocess.STDOUT, env=env)
    subprocess.run(["rm", "-rf", job["out"]])  # saved models are not needed, and the disk is shared
    if proc.returncode != 0 or not Path(job["result"]).is_file():
        tail = log.read_text().strip().splitlines()[-1:] or ["(no output)"]
        return {"error": f"exit {proc.returncode}: {tail[0][:300]}", "log": str(log)}
    result = json.loads(Path(job["result"]).read_text())
    timed = result["step_times"][job["warmup"]:]
    result["median_step"] = statistics.median(timed) if timed else float("nan")
    return result


# --------------------------------------------------------------------------- summary (parent)


def summarise(runs: list[dict], s: Shapes) -> list[dict]:
    """Per (trainer, size): medians over reps of each implementation, and the ratios."""
    rows = []
    for key in dict.fromkeys((r["trainer"], r["size"]) for r in runs):
        row = {"trainer": key[0], "size": key[1]}
        for impl in ("rlhfkit", "trl", "bare"):
            ok = [r for r in runs if (r["trainer"], r["size"], r["impl"]) == (*key, impl) and "error" not in r]
            if not ok:
                continue
            step = statistics.median(r["median_step"] for r in ok)
            row[impl] = {"step_s": step, "items_per_s": items_per_step(key[0], s) / step,
                         "peak_rss_mb": statistics.median(r["max_rss_mb"] for r in ok), "reps": len(ok),
                         "spread_s": [min(r["median_step"] for r in ok), max(r["median_step"] for r in ok)]}
        for a, b in (("rlhfkit", "trl"), ("rlhfkit", "bare"), ("trl", "bare")):
            if a in row and b in row:
                row[f"{a}/{b}"] = row[a]["step_s"] / row[b]["step_s"]
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    def cell(row, impl, field, fmt):
        return format(row[impl][field], fmt) if impl in row else "-"

    def ratio(row, key):
        return f"{row[key]:.2f}" if key in row else "-"

    head = ("| trainer | size | step s rlhfkit / TRL / bare | items/s rlhfkit / TRL / bare "
            "| peak RSS MB rlhfkit / TRL / bare | rlhfkit/TRL | rlhfkit/bare | TRL/bare |")
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        if r["trainer"] == "rollout":
            continue
        lines.append(f"| {r['trainer']} | {r['size']} | "
                     + " / ".join(cell(r, i, "step_s", ".3f") for i in ("rlhfkit", "trl", "bare")) + " | "
                     + " / ".join(cell(r, i, "items_per_s", ".1f") for i in ("rlhfkit", "trl", "bare")) + " | "
                     + " / ".join(cell(r, i, "peak_rss_mb", ".0f") for i in ("rlhfkit", "trl", "bare")) + " | "
                     + " | ".join(ratio(r, k) for k in ("rlhfkit/trl", "rlhfkit/bare", "trl/bare")) + " |")
    rollout = [r for r in rows if r["trainer"] == "rollout"]
    if rollout:
        lines += ["", "| rollout | size | tokens/s rlhfkit `generate` | tokens/s bare `model.generate` "
                      "| rlhfkit / bare (tokens/s) |", "|---|---|---|---|---|"]
        for r in rollout:
            speed = (f"{r['bare']['step_s'] / r['rlhfkit']['step_s']:.2f}" if "bare" in r and "rlhfkit" in r else "-")
            lines.append(f"| generate | {r['size']} | {cell(r, 'rlhfkit', 'items_per_s', '.0f')} | "
                         f"{cell(r, 'bare', 'items_per_s', '.0f')} | {speed} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", default="1.2M,8.4M", help=f"comma-separated, of {','.join(SIZES)}")
    p.add_argument("--trainers", default=",".join(TRAINERS), help=f"comma-separated, of {','.join(TRAINERS)}")
    p.add_argument("--reps", type=int, default=3, help="repetitions of each measurement (alternating)")
    p.add_argument("--steps", type=int, default=8, help="optimiser steps (or generate calls) per measurement")
    p.add_argument("--warmup", type=int, default=2, help="first steps left out of the median")
    p.add_argument("--threads", type=int, default=1, help="torch threads (and OMP_NUM_THREADS) of each child")
    p.add_argument("--work", default="runs/bench_vs_trl", help="models, data, logs and per-run results")
    p.add_argument("--out", default=str(HERE / "results" / "vs_trl.json"), help="the JSON summary")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(json.loads(args.child))

    sizes, trainers = args.sizes.split(","), args.trainers.split(",")
    for name, allowed in ((sizes, SIZES), (trainers, TRAINERS)):
        bad = [x for x in name if x not in allowed]
        if bad:
            raise SystemExit(f"unknown {bad}; choose from {', '.join(allowed)}")
    if args.steps <= args.warmup:
        raise SystemExit("--steps must exceed --warmup")
    s, work = Shapes(), Path(args.work).resolve()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    assets = make_assets(work, sizes, s)
    if "ppo" in trainers:
        trl112_python()
    commit = subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    started, runs = time.time(), []  # src/ may change under a long run in a shared tree: commit at the start
    for size in sizes:
        for trainer in trainers:
            for rep in range(args.reps):
                for impl in IMPLS.get(trainer, ("rlhfkit", "trl", "bare")):
                    job = {"trainer": trainer, "size": size, "impl": impl, "rep": rep, "steps": args.steps,
                           "warmup": args.warmup, "threads": args.threads, "shapes": asdict(s),
                           "model": assets["models"][size], "reward_model": assets["reward_models"][size],
                           "reward_adapter": assets["reward_adapters"][size], "data": assets["data"]}
                    result = measure(job, work)
                    runs.append({k: job[k] for k in ("trainer", "size", "impl", "rep")} | result)
                    status = result.get("error") or f"{result['median_step']:.3f} s/step"
                    print(f"[{time.time() - started:6.0f}s] {trainer:7s} {size:5s} {impl:7s} rep {rep}: {status}",
                          flush=True)
    rows = summarise(runs, s)
    dirty = subprocess.run(["git", "-C", str(HERE), "status", "--porcelain", "--", "../src"], capture_output=True,
                           text=True)
    settings = {**vars(args), "shapes": asdict(s), "params": assets["params"], "commit": commit.stdout.strip(),
                "src_dirty": bool(dirty.stdout.strip()), "cpus": os.cpu_count(), "seconds": time.time() - started}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"settings": settings, "summary": rows, "runs": runs}, indent=1))
    print(f"\nmedian step times over {args.reps} reps x {args.steps - args.warmup} steps, {args.threads} thread(s); "
          f"params {', '.join(f'{k}: {v / 1e6:.2f}M' for k, v in assets['params'].items())}\n")
    print(table(rows))
    print(f"\n{out}")


if __name__ == "__main__":
    main()
