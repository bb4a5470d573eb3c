"""rlhfkit's supervised-style steps (SFT, RM, DPO, KTO) against the bare PyTorch step, in one process.

    OMP_NUM_THREADS=1 python benchmarks/supervised_steps.py --sizes 1.2M,8.4M --trainers sft,dpo --rounds 15

A quicker, less noisy companion to ``benchmarks/vs_trl.py`` (issue #10) for speed work on these
trainers: each trainer's public ``train(cfg)`` is run with ``trainers.loop.run`` replaced by a
function that keeps what it was handed (model, ``loss_fn``, config); this script then times the
body of the loop's step itself (indices → ``loss_fn`` → ``.item()`` → backward → gradient scaling →
``optimizer_step``)
and, in alternation with it, the bare step of ``vs_trl.run_bare`` at the same shapes (one training
step over all positions plus a no-grad forward per reference pass). Printed per trainer and size:
median ms per step of each and their ratio. Models and data are vs_trl.py's (made if missing).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vs_trl  # noqa: E402  (benchmarks/ is not a package)


def our_step(trainer: str, model_dir: str, data: dict, s: vs_trl.Shapes, out: str, extra: dict):
    """A closure running one optimiser step of rlhfkit's ``trainer`` exactly as ``loop.run`` does."""
    import rlhfkit.trainers.loop as loop
    from rlhfkit.config import from_dict

    captured = {}

    def capture(**kw):
        captured.update(kw)
        return {}

    common = {"max_length": 4 * s.seq, "model": {"path": model_dir, "dtype": "float32"}, "optim": {"lr": 1e-4},
              "train": {"out": out, "batch_size": s.batch, "max_steps": 1, "log_every": 1, "eval_every": 0,
                        "save_every": 0, "tensorboard": False, "device": "cpu", "seed": 0,
                        "overwrite_output_dir": True}, **extra}  # reruns go into the same directory
    if trainer == "sft":
        import rlhfkit.trainers.sft as mod

        cfg = from_dict(mod.SFTConfig, {**common, "data": data["sft"], "eval_fraction": 0.0})
    elif trainer == "rm":
        import rlhfkit.trainers.reward as mod

        cfg = from_dict(mod.RewardConfig, {**common, "data": data["pairs"], "eval_fraction": 0.0, "normalize": False})
    else:
        import rlhfkit.trainers.preference as mod

        cls = {"dpo": mod.DPOConfig, "kto": mod.KTOConfig, "orpo": mod.ORPOConfig, "simpo": mod.SimPOConfig}[trainer]
        cfg = from_dict(cls, {**common, "data": data["unpaired" if trainer == "kto" else "pairs"]})
    real_run = mod.run
    mod.run = capture
    mod.save_model = lambda *a, **k: None
    try:
        mod.train(cfg)
    finally:
        mod.run = real_run
    model, loss_fn, n, tcfg, optim = (captured[k] for k in ("model", "loss_fn", "n_examples", "cfg", "optim"))
    optimizer, scheduler = loop.build_optimizer(model.parameters(), optim, 10_000)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    model.train()
    counter = iter(range(10**9))

    def step():
        indices = loop.batch_indices(next(counter), n, tcfg.batch_size, tcfg.seed)
        loss, weight, metrics = loss_fn(indices)
        loss.item()
        (loss * weight).backward()
        {k: float(v) for k, v in metrics.items()}
        loop.distributed.average_gradients(params, weight)
        loop.optimizer_step(optimizer, scheduler, optim.max_grad_norm)

    return step


def bare_step(trainer: str, model_dir: str, s: vs_trl.Shapes):
    """vs_trl.run_bare's step for ``trainer``: train step over all positions + reference forwards."""
    from transformers import AutoModelForCausalLM

    def lm(train: bool):
        m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        return m.train() if train else m.eval().requires_grad_(False)

    policy = lm(True)
    vocab = policy.config.vocab_size
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-4)
    reference = lm(False) if trainer in ("dpo", "kto") else None

    def ids(rows):
        return torch.randint(3, vocab, (rows, s.seq))

    def train_step(rows):
        x = ids(rows)
        logits = policy(input_ids=x).logits
        F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def forward(model, rows):
        model(input_ids=ids(rows))

    B = s.batch
    return {"sft": lambda: train_step(B), "rm": lambda: train_step(2 * B), "orpo": lambda: train_step(2 * B),
            "simpo": lambda: train_step(2 * B),
            "dpo": lambda: (train_step(2 * B), forward(reference, 2 * B)),
            "kto": lambda: (train_step(B), forward(policy, B), forward(reference, 2 * B))}[trainer]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1.2M,8.4M")
    p.add_argument("--trainers", default="sft,rm,dpo,kto")
    p.add_argument("--rounds", type=int, default=15, help="alternating (ours, bare) pairs after warm-up")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--work", default="runs/bench_vs_trl")
    p.add_argument("--lora", action="store_true", help="train LoRA adapters (all-linear+head) in our step")
    args = p.parse_args()
    torch.set_num_threads(1)
    s, work = vs_trl.Shapes(), Path(args.work).resolve()
    sizes = args.sizes.split(",")
    assets = vs_trl.make_assets(work, sizes, s)
    extra = {"lora": {"enabled": True, "target_modules": "all-linear+head"}} if args.lora else {}
    for size in sizes:
        for trainer in args.trainers.split(","):
            torch.manual_seed(0)
            ours = our_step(trainer, assets["models"][size], assets["data"], s,
                            str(work / "runs" / f"steps-{trainer}-{size}"), extra)
            bare = bare_step(trainer, assets["models"][size], s)
            times = {"ours": [], "bare": []}
            for r in range(args.warmup + args.rounds):
                for name, fn in (("ours", ours), ("bare", bare)) if r % 2 == 0 else (("bare", bare), ("ours", ours)):
                    t0 = time.perf_counter()
                    fn()
                    if r >= args.warmup:
                        times[name].append(time.perf_counter() - t0)
            o, b = statistics.median(times["ours"]), statistics.median(times["bare"])
            ratios = sorted(x / y for x, y in zip(times["ours"], times["bare"]))
            print(f"{trainer:5s} {size:5s} ours {o * 1e3:7.1f} ms  bare {b * 1e3:7.1f} ms  ratio {o / b:.3f}  "
                  f"(pairwise median {statistics.median(ratios):.3f}, IQR {ratios[len(ratios) // 4]:.2f}-"
                  f"{ratios[3 * len(ratios) // 4]:.2f})", flush=True)


if __name__ == "__main__":
    main()
