"""Time of SFT's forward and backward over packed batches (``--packing true``: examples end to end in rows of up
to max_length tokens) against padded ones (the baseline, measured in the same run).

    python benchmarks/sft_packing.py [--hidden 512] [--layers 8] [--batch 16] [--max_length 512] [--steps 8]
                                     [--repeats 4]

Builds a tiny Llama and ``--steps`` batches of ``--batch`` examples of random ids whose lengths are skewed as
chat data's are (prompts 8-64 tokens; completions log-normal, median 48, cut to fit ``--max_length``), then
times ``sft.completion_nll`` + backward over all the batches in each layout, alternating (which runs first swaps
every repeat) after one untimed warm-up of each; median over ``--repeats``. Both give the same loss and
gradients (tests/models/test_sft.py: the same weights after training). Prints seconds, their ratio, the share
of the computed (row, column) cells that are padding in each layout, and the rows each layout runs.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time

import torch


def make_examples(n: int, vocab: int, max_length: int, seed: int):
    """``n`` Encoded examples of random ids (3 .. vocab): a prompt of 8-64 tokens, a log-normal completion."""
    from rlhfkit.data.collate import Encoded

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = rng.randint(8, 64)
        completion = max(2, min(int(rng.lognormvariate(3.9, 0.8)), max_length - prompt))
        ids = [rng.randrange(3, vocab) for _ in range(prompt + completion)]
        out.append(Encoded(ids, [0] * prompt + [1] * completion))
    return out


def run(model, batches, layout) -> float:
    from rlhfkit.trainers.sft import completion_nll

    t0 = time.perf_counter()
    for items in batches:
        nll, n = completion_nll(model, layout(items))
        (nll / n).backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max_length", type=int, default=512)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args()

    from rlhfkit.config import ModelConfig
    from rlhfkit.data.collate import collate, pack
    from rlhfkit.models.load import load_causal_lm
    from rlhfkit.models.tiny import make_tiny_model

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = make_tiny_model("llama", tmp, hidden_size=args.hidden, num_layers=args.layers,
                               num_heads=max(1, args.hidden // 64))
        model = load_causal_lm(ModelConfig(path=str(path)), torch.device("cpu"))
    model.train()
    vocab = model.get_input_embeddings().num_embeddings
    examples = make_examples(args.batch * args.steps, vocab, args.max_length, seed=0)
    batches = [examples[i: i + args.batch] for i in range(0, len(examples), args.batch)]
    layouts = {"padded": lambda items: collate(items, 0), "packed": lambda items: pack(items, args.max_length, 0)}
    cells = {name: sum(layout(b)["input_ids"].numel() for b in batches) for name, layout in layouts.items()}
    tokens = sum(len(e.input_ids) for e in examples)
    rows = {name: sum(layout(b)["input_ids"].shape[0] for b in batches) for name, layout in layouts.items()}
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M Llama, {len(batches)} batches of {args.batch} "
          f"examples, {tokens} tokens (lengths {min(len(e.input_ids) for e in examples)}-"
          f"{max(len(e.input_ids) for e in examples)}, max_length {args.max_length})")
    for name, layout in layouts.items():
        run(model, batches, layout)  # warm-up
    times = {name: [] for name in layouts}
    for repeat in range(args.repeats):
        order = list(layouts) if repeat % 2 == 0 else list(reversed(layouts))
        for name in order:
            times[name].append(run(model, batches, layouts[name]))
    base = statistics.median(times["padded"])
    for name in layouts:
        t = statistics.median(times[name])
        print(f"{name:7s} {t:7.2f} s  ({t / base:.2f}x padded)  rows {rows[name]:4d}  padding "
              f"{1 - tokens / cells[name]:.0%} of {cells[name]} cells")


if __name__ == "__main__":
    main()
