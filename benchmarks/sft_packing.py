"""Time of the forward and backward over packed batches (``--packing true``: sequences end to end in rows of up
to max_length tokens) against padded ones (the baseline, measured in the same run), for SFT or the DPO family.

    python benchmarks/sft_packing.py [--method sft|dpo] [--hidden 512] [--layers 8] [--batch 16]
                                     [--max_length 512] [--steps 8] [--repeats 4]

Builds a tiny Llama and ``--steps`` batches of ``--batch`` examples of random ids whose lengths are skewed as
chat data's are (prompts 8-64 tokens; completions log-normal, median 48, cut to fit ``--max_length``; ``dpo``:
pairs, a second completion drawn so for the same prompt), then times ``sft.completion_nll`` (``dpo``: the
chosen and rejected log-probs of ``preference.completion_logps``, the padded pair sharing its prompt's forward)
+ backward over all the batches in each layout, alternating (which runs first swaps every repeat) after one
untimed warm-up of each; median over ``--repeats``. Both give the same loss and gradients (tests/models/
test_sft.py, test_preference.py: the same weights after training). Prints seconds, their ratio, the share of the
computed (row, column) cells that are padding in each layout, and the rows each layout runs.
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


def as_pairs(examples, vocab: int, max_length: int, seed: int):
    """Each example with a second completion for its prompt (log-normal as the first): [firsts..., seconds...]."""
    from rlhfkit.data.collate import Encoded

    rng = random.Random(seed)
    seconds = []
    for e in examples:
        prompt = e.completion_mask.index(1)
        completion = max(2, min(int(rng.lognormvariate(3.9, 0.8)), max_length - prompt))
        seconds.append(Encoded(e.input_ids[:prompt] + [rng.randrange(3, vocab) for _ in range(completion)],
                               [0] * prompt + [1] * completion))
    return examples, seconds


def run(model, batches, layout, method: str) -> float:
    from rlhfkit.trainers.preference import completion_logps
    from rlhfkit.trainers.sft import completion_nll

    t0 = time.perf_counter()
    for items in batches:
        if method == "sft":
            nll, n = completion_nll(model, layout(items))
            (nll / n).backward()
        else:
            chosen, rejected = completion_logps(model, layout(items), average=False).chunk(2)
            (rejected - chosen).mean().backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=["sft", "dpo"], default="sft")
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
    if args.method == "dpo":  # each batch's chosen, then its rejected: one forward, as the DPO family runs them
        batches = [[*first, *second] for first, second in (as_pairs(b, vocab, args.max_length, i)
                                                            for i, b in enumerate(batches))]
        examples = [e for b in batches for e in b]
    layouts = {"padded": lambda items: collate(items, 0), "packed": lambda items: pack(items, args.max_length, 0)}
    cells = {name: sum(layout(b)["input_ids"].numel() for b in batches) for name, layout in layouts.items()}
    tokens = sum(len(e.input_ids) for e in examples)
    rows = {name: sum(layout(b)["input_ids"].shape[0] for b in batches) for name, layout in layouts.items()}
    unit = "examples" if args.method == "sft" else "pairs"
    lengths = [len(e.input_ids) for e in examples]
    print(f"{args.method}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M Llama, {len(batches)} batches of "
          f"{args.batch} {unit}, {tokens} tokens (lengths {min(lengths)}-{max(lengths)}, max_length {args.max_length})")
    for name, layout in layouts.items():
        run(model, batches, layout, args.method)  # warm-up
    times = {name: [] for name in layouts}
    for repeat in range(args.repeats):
        order = list(layouts) if repeat % 2 == 0 else list(reversed(layouts))
        for name in order:
            times[name].append(run(model, batches, layouts[name], args.method))
    base = statistics.median(times["padded"])
    for name in layouts:
        t = statistics.median(times[name])
        print(f"{name:7s} {t:7.2f} s  ({t / base:.2f}x padded)  rows {rows[name]:4d}  padding "
              f"{1 - tokens / cells[name]:.0%} of {cells[name]} cells")


if __name__ == "__main__":
    main()
