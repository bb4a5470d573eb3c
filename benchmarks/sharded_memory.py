"""Peak memory per process of full-parameter SFT in 2 CPU processes: replicas, FSDP and DeepSpeed ZeRO.

    python benchmarks/sharded_memory.py [--hidden 512] [--layers 8] [--steps 3] [--modes ...]

Makes a tiny Llama of the given size and runs the same `rlhfkit sft` (full fine-tuning, AdamW)
with `torchrun --nproc_per_node 2` in each mode, each launch fresh, and prints each process's peak
RSS (ru_maxrss, the mean over the 2 processes) and its ratio to replicas. The baseline row is 2
processes that import rlhfkit, torch, transformers and DeepSpeed, open the process group and load
the model once, in the same run: what every mode pays before training. DeepSpeed modes need
`pip install deepspeed`. CPU RSS also counts what each library allocates for itself (DeepSpeed's
buckets, gloo's buffers), so the ratios are what a CPU run pays, an upper bound of a GPU's savings.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

# run by torchrun in each process: train (or, for the baseline, load the model once), then report the peak
CHILD = """
import json, os, resource, sys
args = json.loads(sys.argv[1])
if args["mode"] == "baseline":
    import deepspeed, torch
    from rlhfkit import distributed
    from rlhfkit.config import ModelConfig
    from rlhfkit.models.load import load_causal_lm
    distributed.setup(torch.device("cpu"))
    load_causal_lm(ModelConfig(path=args["model"]), torch.device("cpu"), trainable=True)
    distributed.barrier()
else:
    from rlhfkit.cli import main
    rc = main(["sft", "--model", args["model"], "--data", args["data"], "--out", args["out"], "--eval_fraction", "0",
               "--train.max_steps", str(args["steps"]), "--train.batch_size", "8", "--max_length", "64",
               "--train.tensorboard", "false", "--train.fsdp", args["fsdp"], "--train.deepspeed", args["deepspeed"]])
    assert rc == 0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
Path = __import__("pathlib").Path
Path(args["out"], f"peak-{os.environ.get('RANK', '0')}.txt").write_text(str(peak))
"""

MODES = {  # name → (train.fsdp, train.deepspeed)
    "replicas": ("off", "off"), "fsdp shard_grad_op": ("shard_grad_op", "off"), "fsdp full_shard": ("full_shard", "off"),
    "zero1": ("off", "zero1"), "zero2": ("off", "zero2"), "zero3": ("off", "zero3"),
}


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def peak_rss_mb(args: dict, out: Path) -> float:
    """The mean over 2 processes of each one's peak RSS, in MB."""
    out.mkdir(parents=True, exist_ok=True)
    script = out / "child.py"
    script.write_text(CHILD)
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
              "--master_port", _free_port(), str(script), json.dumps({**args, "out": str(out)})]
    done = subprocess.run(launch, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    peaks = [int((out / f"peak-{r}.txt").read_text()) / 1024 for r in (0, 1)]
    return sum(peaks) / len(peaks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of: {', '.join(MODES)}")
    a = parser.parse_args()

    from rlhfkit.data.tasks import describe
    from rlhfkit.models.tiny import make_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = make_tiny_model("llama", root / "model", hidden_size=a.hidden, num_layers=a.layers,
                                num_heads=max(1, a.hidden // 64))
        data = describe.write(root / "data")
        import torch
        from transformers import AutoModelForCausalLM

        params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model).parameters())
        common = {"model": str(model), "data": str(data["sft"]), "steps": a.steps}
        print(f"full SFT, {params / 1e6:.1f}M parameters ({4 * params / 2**20:.0f} MB in float32), AdamW, 2 processes "
              f"(gloo), {a.steps} steps; torch {torch.__version__}; peak RSS per process, mean of the 2")
        base = peak_rss_mb({**common, "mode": "baseline"}, root / "baseline")
        print(f"{'mode':>20} {'peak MB':>9} {'above baseline':>15} {'ratio to replicas (above baseline)':>35}")
        print(f"{'baseline':>20} {base:9.0f}")
        rows = {}
        for name in a.modes.split(","):
            fsdp, ds = MODES[name]
            rows[name] = peak_rss_mb({**common, "mode": "train", "fsdp": fsdp, "deepspeed": ds}, root / name)
            ref = rows.get("replicas")
            ratio = f"{(rows[name] - base) / (ref - base):.2f}x" if ref else ""
            print(f"{name:>20} {rows[name]:9.0f} {rows[name] - base:15.0f} {ratio:>35}", flush=True)


if __name__ == "__main__":
    main()
