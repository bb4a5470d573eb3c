"""Time of PPO's learn pass with each mini- / micro-batch cut to its own longest row (``Experience.trimmed``)
against the buffer's padded width (the baseline, measured in the same run).

    python benchmarks/learn_padding.py [--hidden 512] [--layers 8] [--rows 32] [--new_tokens 96]
                                       [--settings 32:0,8:0,32:8,32:2]

A rollout buffer's rows are padded to its longest prompt and its longest response; a mini-batch (and each
micro-batch of ``micro_batch_size`` rows) picked from it ran at that width whatever its own rows. This builds
one buffer of ``--rows`` rollouts on a tiny Llama (PPO's shared mode: LoRA actor and critic on one base),
prompts of 8–48 tokens and responses of 1–``--new_tokens`` tokens drawn uniformly (a model that stops at its
EOS at varied lengths; a random model never does), and times ``ppo.learn`` (2 epochs; each ``--settings``
entry mini_batch_size:micro_batch_size, micro 0 = a process's whole share) with and without the cut,
alternating (which runs first swaps every repeat) after one untimed warm-up run, the adapters reset before
each run; the whole buffer in one pass (32:0) has nothing to cut: its ratio is the measurement's noise. Both
give the same update up to float rounding (tests/models/test_ppo.py). Prints seconds, their ratio, and the
share of the forwards' token cells that are padding either way.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch


@contextmanager
def untrimmed():
    """Every ``Experience.trimmed`` returns the experience as it is: the baseline's padded widths."""
    from rlhfkit.rollout.experience import Experience

    trimmed = Experience.trimmed
    Experience.trimmed = lambda self: self
    try:
        yield
    finally:
        Experience.trimmed = trimmed


def padding_share(buffer, mini: int, micro: int, trim: bool) -> float:
    """The share of the learn forwards' (row, column) cells that are padding, over one epoch of the buffer
    shuffled as ``ppo.learn``'s first epoch is."""
    from rlhfkit import distributed

    cells = padded = 0
    for idx in torch.randperm(len(buffer), generator=torch.Generator().manual_seed(0)).split(mini):
        for rows, _ in distributed.micro_splits(len(idx), len(idx), micro):
            mb = buffer[idx][rows].trimmed() if trim else buffer[idx][rows]
            cells += mb.attention_mask.numel()
            padded += int((mb.attention_mask == 0).sum())
    return padded / cells


def make_buffer(roles, rows: int, new_tokens: int, vocab: int, seed: int):
    """``rows`` rollouts of random ids, prompts 8–48 tokens, responses 1–``new_tokens``, with old log-probs
    and values from the roles and random advantages and returns: what ``ppo.learn`` reads."""
    from rlhfkit.models.forward import join_prompt_response
    from rlhfkit.rollout.experience import Experience

    g = torch.Generator().manual_seed(seed)

    def ids(n: int) -> list[int]:
        return torch.randint(10, vocab, (n,), generator=g).tolist()

    prompts = [ids(int(torch.randint(8, 49, (), generator=g))) for _ in range(rows)]
    responses = [ids(int(torch.randint(1, new_tokens + 1, (), generator=g))) for _ in range(rows)]
    batch = join_prompt_response(prompts, responses, 0)
    mask = batch["action_mask"].float()
    with torch.no_grad():
        old = roles.actor_logprobs(batch) * mask
        values = roles.critic_values(batch) * mask
    noise = torch.randn(mask.shape, generator=g) * mask
    return Experience(batch["input_ids"], batch["attention_mask"], batch["action_mask"], old, old.clone(), values,
                      noise, noise.clone(), values + noise, torch.zeros(rows), torch.ones(rows, dtype=torch.bool))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--rows", type=int, default=32, help="rollouts in the buffer")
    parser.add_argument("--new_tokens", type=int, default=96, help="the longest response")
    parser.add_argument("--settings", default="32:0,8:0,32:8,32:2",
                        help="mini_batch_size:micro_batch_size pairs (micro 0: a process's whole share)")
    parser.add_argument("--repeats", type=int, default=4, help="runs of each setting; the median is printed")
    a = parser.parse_args()

    from rlhfkit.config import ModelConfig
    from rlhfkit.models.tiny import make_tiny_model
    from rlhfkit.trainers.checkpoint import NonFinite
    from rlhfkit.trainers.loop import build_optimizer
    from rlhfkit.trainers.ppo import PPOConfig, build_roles, learn

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = make_tiny_model("llama", Path(tmp) / "model", hidden_size=a.hidden, num_layers=a.layers, num_heads=8)
        base = PPOConfig(model=ModelConfig(path=str(path)), rollout_batch_size=a.rows, mini_batch_size=a.rows)
        roles = build_roles(base, torch.device("cpu"))
    vocab = roles.model.config.vocab_size
    n_params = sum(p.numel() for p in roles.model.parameters())
    buffer = make_buffer(roles, a.rows, a.new_tokens, vocab, seed=0)
    trained = roles.actor_parameters() + roles.critic_parameters()
    start = [p.detach().clone() for p in trained]

    def run(mini: int, micro: int, trim: bool) -> float:
        with torch.no_grad():
            for p, p0 in zip(trained, start):
                p.copy_(p0)
        cfg = PPOConfig(model=base.model, rollout_batch_size=a.rows, mini_batch_size=mini, micro_batch_size=micro)
        actor_opt = build_optimizer(roles.actor_parameters(), cfg.optim, 10)
        critic_opt = build_optimizer(roles.critic_parameters(), cfg.optim, 10)
        generator, nonfinite = torch.Generator().manual_seed(0), NonFinite("stop", None)
        t0 = time.perf_counter()
        with nullcontext() if trim else untrimmed():
            learn(roles, buffer, cfg, actor_opt, critic_opt, generator, nonfinite, 1)
        return time.perf_counter() - t0

    settings = [tuple(int(x) for x in s.split(":")) for s in a.settings.split(",")]
    times = {(s, t): [] for s in settings for t in (False, True)}
    run(*settings[0], True)  # warm-up: the first run pays for allocations and lazy imports
    for r in range(a.repeats):
        for s in settings:
            # alternating, each first in every other repeat, so drift in the machine's speed falls on both
            for trim in (False, True) if r % 2 == 0 else (True, False):
                times[(s, trim)].append(run(*s, trim))
    lengths = buffer.action_mask.sum(-1)
    print(f"\nPPO (shared) learn pass, 2 epochs over a buffer of {a.rows} rollouts, tiny Llama of "
          f"{n_params / 1e6:.1f}M parameters (fp32, CPU, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}); responses of {int(lengths.min())}–{int(lengths.max())} tokens (mean "
          f"{float(lengths.float().mean()):.0f}), buffer width {buffer.input_ids.shape[1]}; median of {a.repeats}\n")
    print("| mini_batch_size | micro_batch_size | padding, buffer width | padding, trimmed | learn (s), buffer width "
          "| learn (s), trimmed | ratio |")
    print("|---|---|---|---|---|---|---|")
    for s in settings:
        before, after = statistics.median(times[(s, False)]), statistics.median(times[(s, True)])
        print(f"| {s[0]} | {s[1] or 'whole share'} | {padding_share(buffer, *s, False):.0%} | "
              f"{padding_share(buffer, *s, True):.0%} | {before:.1f} | {after:.1f} | {after / before:.2f} |")


if __name__ == "__main__":
    main()
