"""Peak memory and time of SFT's forward and backward with the output head run in chunks (``--logits_chunk N``)
against the whole batch at once (the baseline, measured in the same run).

    python benchmarks/logits_memory.py [--vocab 65536] [--hidden 256] [--layers 2] [--batch 8] [--length 512]
                                       [--chunks 0,1024,256]

With a large vocabulary the (positions, vocabulary) logits, their softmax and their gradients outweigh a small
model's activations: the head runs on the completion positions alone (``forward.masked_logprobs``), but all of
them at once. Each setting runs in a process of its own (a fresh peak): a random Llama of ``--vocab`` tokens,
one batch of ``--batch`` rows of ``--length`` random ids whose last three quarters are the completion,
``sft.completion_nll`` and its backward, twice (the second timed). Prints the peak resident memory above the
model loaded (``ru_maxrss``), the seconds, and both as ratios to chunk 0. Both give the same loss and gradients
(tests/models/test_forward.py).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = """
import json, resource, sys, time
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from rlhfkit.trainers.sft import completion_nll

a = json.loads(sys.argv[1])
torch.manual_seed(0)
torch.set_num_threads(2)
config = LlamaConfig(vocab_size=a["vocab"], hidden_size=a["hidden"], intermediate_size=4 * a["hidden"],
                     num_hidden_layers=a["layers"], num_attention_heads=a["hidden"] // 64,
                     num_key_value_heads=a["hidden"] // 64, tie_word_embeddings=False)
model = LlamaForCausalLM(config).train()
ids = torch.randint(3, a["vocab"], (a["batch"], a["length"]))
completion = torch.zeros_like(ids)
completion[:, a["length"] // 4:] = 1
batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": completion}
loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
seconds = []
for _ in range(2):
    t0 = time.perf_counter()
    nll, n = completion_nll(model, batch, a["chunk"])
    (nll / n).backward()
    model.zero_grad(set_to_none=True)
    seconds.append(time.perf_counter() - t0)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"mb": (peak - loaded) / 1024, "seconds": seconds[-1], "loss": (nll / n).item()}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=65536)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--chunks", default="0,1024,256")
    args = parser.parse_args()
    positions = args.batch * (args.length - args.length // 4)
    print(f"Llama: vocabulary {args.vocab}, hidden {args.hidden}, {args.layers} layers; {args.batch} rows x "
          f"{args.length} tokens, {positions} completion positions: one (positions, vocabulary) float32 tensor is "
          f"{positions * args.vocab * 4 / 2**20:.0f} MB")
    base = None
    for chunk in (int(c) for c in args.chunks.split(",")):
        settings = {**vars(args), "chunk": chunk}
        out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(settings)], capture_output=True, text=True)
        if out.returncode:
            sys.exit(out.stderr[-2000:])
        result = json.loads(out.stdout.strip().splitlines()[-1])
        base = base or result
        print(f"logits_chunk {chunk:5d}: peak {result['mb']:7.0f} MB above the model ({result['mb'] / base['mb']:.2f}x)"
              f", {result['seconds']:6.2f} s ({result['seconds'] / base['seconds']:.2f}x), loss {result['loss']:.6f}")


if __name__ == "__main__":
    main()
