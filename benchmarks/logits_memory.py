"""Peak memory and time of SFT's forward and backward with the output head run in chunks (``--logits_chunk N``)
against the whole batch at once (the baseline, measured in the same run); with ``--pass rollout`` the online
methods' and PPO's learn pass instead.

    python benchmarks/logits_memory.py [--pass sft|rollout] [--vocab 65536] [--hidden 256] [--layers 2]
                                       [--batch 8] [--length 512] [--chunks 0,1024,256]

With a large vocabulary the (positions, vocabulary) logits, their softmax and their gradients outweigh a small
model's activations: the head runs on the completion positions alone (``forward.masked_logprobs``), but all of
them at once. Each setting runs in a process of its own (a fresh peak): a random Llama of ``--vocab`` tokens,
one batch of ``--batch`` rows of ``--length`` random ids whose last three quarters are the completion,
``sft.completion_nll`` and its backward, twice (the second timed). Prints the peak resident memory above the
model loaded (``ru_maxrss``), the seconds, and both as ratios to chunk 0. Both give the same loss and gradients
(tests/models/test_forward.py).

``--pass rollout``: the same rows as a rollout's batch (a quarter prompt, then the response window, the responses
of rows 1, 3, ... half as long: padding), ``forward.response_logprobs`` at temperature 0.7 with the entropies, and
the backward of a policy-gradient loss with an entropy bonus (what GRPO's learn pass with ``entropy_coef`` runs).
Unchunked, the head runs on the whole response window, padding included; chunked, on response tokens alone.
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
from rlhfkit.models.forward import response_logprobs
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
if a["pass"] == "rollout":
    action = completion[:, a["length"] // 4:].clone()
    action[1::2, action.shape[1] // 2:] = 0  # every other response half as long, padded on the right
    batch["attention_mask"][:, a["length"] // 4:] = action
    batch["action_mask"] = action
    advantages = torch.randn(action.shape, generator=torch.Generator().manual_seed(1))


def loss_of(batch):
    if a["pass"] == "sft":
        nll, n = completion_nll(model, batch, a["chunk"])
        return nll / n
    lp, entropy = response_logprobs(model, batch, 0.7, entropy="grad", chunk=a["chunk"])
    mask = batch["action_mask"]
    return -((lp * advantages + 0.01 * entropy) * mask).sum() / mask.sum()


loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
seconds = []
for _ in range(2):
    t0 = time.perf_counter()
    loss = loss_of(batch)
    loss.backward()
    model.zero_grad(set_to_none=True)
    seconds.append(time.perf_counter() - t0)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"mb": (peak - loaded) / 1024, "seconds": seconds[-1], "loss": loss.item()}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pass", dest="pass", choices=["sft", "rollout"], default="sft")
    parser.add_argument("--vocab", type=int, default=65536)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--chunks", default="0,1024,256")
    args = parser.parse_args()
    positions = args.batch * (args.length - args.length // 4)
    print(f"{getattr(args, 'pass')} pass; "
          f"Llama: vocabulary {args.vocab}, hidden {args.hidden}, {args.layers} layers; {args.batch} rows x "
          f"{args.length} tokens, {positions} completion positions: one (positions, vocabulary) float32 tensor is "
          f"{positions * args.vocab * 4 / 2**20:.0f} MB")
    if getattr(args, "pass") == "rollout":
        window = args.length - args.length // 4
        tokens = (args.batch - args.batch // 2) * window + args.batch // 2 * (window - window // 2)
        print(f"the response window: {positions} positions, {tokens} of them response tokens (the rest padding)")
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
