"""Rollout tokens/s: rlhfkit's sampling loop against bare Hugging Face ``model.generate`` (issue #10).

    OMP_NUM_THREADS=1 python benchmarks/rollout.py [--sizes 1.2M,42M] [--batch 8] [--reps 7]

Makes tiny Llamas with ``rlhfkit tiny-model`` (1.2M: hidden 128 × 4 layers; 8.4M: 256 × 8;
42M: 512 × 10), then for each size samples the same prompts (about 32 tokens, left-padded to
one width) with temperature 1 and no top-k / top-p cut-off, ``--new-tokens`` new tokens:

- ``hf``: ``model.generate(do_sample=True)`` on the already tokenised batch, under inference mode;
- ``ours``: ``rlhfkit.rollout.generate.generate`` from prompt strings to decoded texts
  (tokenising, per-row seeds and decoding included).

The two alternate within each repetition. Tokens = rows × decoding steps run (EOS can end a
batch early, which neither side forces off). Prints medians and the ratio ours / hf.

``--group G`` is GRPO's / RLOO's batch: ``--batch / G`` prompts, each repeated G times in a row (the
rows' seeds differ). It adds a third contestant, ``unshared``: ours with group prefill sharing off
(``decode(share=False)``: every row runs its own prefill), and prints ours / unshared as well:

    OMP_NUM_THREADS=1 python benchmarks/rollout.py --sizes 8.4M --batch 32 --group 4

``--kv-heads K``: the Llamas use grouped-query attention, K key/value heads (as Llama 3, Qwen2 and
Mistral do):

    OMP_NUM_THREADS=1 python benchmarks/rollout.py --sizes 8.4M,42M --batch 32 --kv-heads 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from unittest import mock

SIZES = {"1.2M": (128, 4, 4), "8.4M": (256, 8, 8), "42M": (512, 10, 8)}  # hidden, layers, heads


def make_prompts(tokenizer, n: int, tokens: int) -> list[str]:
    """``n`` prompt strings of ``tokens - 3 .. tokens`` tokens, from the built-in task's text."""
    from rlhfkit.data.collate import encode_prompt
    from rlhfkit.data.tasks import describe

    words = " ".join(describe.corpus()).split()
    prompts = []
    for i in range(n):
        target, text, k = tokens - i % 4, "", (i * 37) % len(words)
        while len(encode_prompt(tokenizer, text + " " + words[k % len(words)])) <= target:
            text, k = text + " " + words[k % len(words)], k + 1
        prompts.append(text.strip())
    return prompts


def bench_size(path: str, batch: int, prompt_tokens: int, new_tokens: int, reps: int, group: int = 1) -> dict:
    import torch

    from rlhfkit.config import GenerationConfig
    from rlhfkit.data.collate import encode_prompt, pad_batch
    from rlhfkit.models.load import load_tokenizer
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = load_tokenizer(path)
    prompts = [p for p in make_prompts(tokenizer, batch // group, prompt_tokens) for _ in range(group)]
    ids = [encode_prompt(tokenizer, p) for p in prompts]
    input_ids = pad_batch(ids, tokenizer.pad_token_id, side="left")
    attention_mask = pad_batch([[1] * len(r) for r in ids], 0, side="left")
    cfg = GenerationConfig(max_new_tokens=new_tokens, temperature=1.0, batch_size=batch)

    from rlhfkit.rollout import engine
    from rlhfkit.rollout.generate import generate

    def hf(rep: int) -> int:
        torch.manual_seed(rep)
        with torch.inference_mode():
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=True,
                                 temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new_tokens,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        return batch * (out.shape[1] - input_ids.shape[1])

    def ours(rep: int) -> int:
        gens = generate(model, tokenizer, prompts, cfg, seed=rep)
        return batch * max(len(c) for c in gens.completion_ids)

    def unshared(rep: int) -> int:  # generate's loop with every row running its own prefill
        with mock.patch.object(engine, "decode", partial(engine.decode, share=False)):
            return ours(rep)

    runs = {"hf": hf, "ours": ours, **({"unshared": unshared} if group > 1 else {})}
    for f in runs.values():  # warm-up
        f(0)
    rates: dict[str, list[float]] = {k: [] for k in runs}
    for rep in range(reps):
        order = list(runs) if rep % 2 == 0 else list(runs)[::-1]
        for name in order:
            t0 = time.perf_counter()
            tokens = runs[name](rep + 1)
            rates[name].append(tokens / (time.perf_counter() - t0))
    params = sum(p.numel() for p in model.parameters())
    return {"params": params, "width": input_ids.shape[1], **{k: statistics.median(v) for k, v in rates.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1.2M,42M", help=f"comma-separated, of {sorted(SIZES)}")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--group", type=int, default=1, help="repeat each of batch / group prompts group times")
    parser.add_argument("--kv-heads", type=int, default=0, help="key/value heads (grouped-query attention; 0 = heads)")
    parser.add_argument("--models", default="", help="directory to keep the models in (default: a temporary one)")
    a = parser.parse_args()

    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(a.models or tmp)
        if a.batch % a.group:
            parser.error(f"--batch {a.batch} is not a multiple of --group {a.group}")
        grouped = f" ({a.batch // a.group} prompts x {a.group})" if a.group > 1 else ""
        gqa = f", {a.kv_heads} key/value heads" if a.kv_heads else ""
        print(f"batch {a.batch}{grouped}{gqa}, ~{a.prompt_tokens} prompt + {a.new_tokens} new tokens, {a.reps} reps, "
              f"{torch.get_num_threads()} thread(s), torch {torch.__version__}")
        extra = f" {'unshared tok/s':>15} {'ours/unshared':>14}" if a.group > 1 else ""
        print(f"{'size':>6} {'params':>8} {'hf tok/s':>10} {'ours tok/s':>11} {'ours/hf':>8}{extra}")
        for size in a.sizes.split(","):
            hidden, layers, heads = SIZES[size]
            path = root / (f"llama-{size}" + (f"-kv{a.kv_heads}" if a.kv_heads else ""))
            if not (path / "config.json").exists():
                cli = [sys.executable, "-m", "rlhfkit.cli", "tiny-model"]  # = `rlhfkit tiny-model`
                subprocess.run(cli + ["--arch", "llama", "--out", str(path), "--hidden_size", str(hidden),
                                      "--num_layers", str(layers), "--num_heads", str(heads),
                                      "--num_kv_heads", str(a.kv_heads)],
                               check=True, capture_output=True)
            r = bench_size(str(path), a.batch, a.prompt_tokens, a.new_tokens, a.reps, a.group)
            extra = f" {r['unshared']:15.0f} {r['ours'] / r['unshared']:13.2f}×" if a.group > 1 else ""
            print(f"{size:>6} {r['params'] / 1e6:7.2f}M {r['hf']:10.0f} {r['ours']:11.0f} {r['ours'] / r['hf']:7.2f}×"
                  f"{extra}", flush=True)


if __name__ == "__main__":
    main()
