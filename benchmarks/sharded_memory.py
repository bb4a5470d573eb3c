"""Peak memory per process of training in 2 CPU processes: replicas, FSDP and DeepSpeed ZeRO.

    python benchmarks/sharded_memory.py [--trainer sft|ppo|ppo-shared] [--hidden 512] [--layers 8] [--steps 3]
                                        [--modes ...]

Makes a tiny Llama of the given size and runs the same command in each mode with
`torchrun --nproc_per_node 2`, each launch fresh: `rlhfkit sft` (full fine-tuning, AdamW), or PPO
(`ppo`: `--mode separate`, full actor and critic, a frozen reference, a reward model; `ppo-shared`: one
base with LoRA actor and critic adapters; DeepSpeed ZeRO-1/2 runs `separate` only), and prints each process's peak
RSS during the training steps (the mean over the 2 processes; the kernel's high-water mark reset as
the loop starts, after the models were loaded whole and sharded) and its ratio to replicas, above a
baseline of 2 processes that import rlhfkit, torch, transformers and DeepSpeed and open the process
group, in the same run; each process's peak over its whole life (ru_maxrss), which on a CPU
includes the model loaded whole before sharding and gathered whole for the final save. DeepSpeed modes need
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

# run by torchrun in each process: train (or, for the baseline, only import and open the process group), and
# write two figures: the peak RSS of the training steps (the kernel's high-water mark reset, after handing freed
# memory back, when the loop starts: after the models were loaded whole and sharded; read when the loop ends,
# before the final model is gathered and saved) and the peak of the whole process (ru_maxrss)
CHILD = """
import ctypes, json, os, resource, sys
from pathlib import Path
args = json.loads(sys.argv[1])
libc = ctypes.CDLL("libc.so.6")


def reset_peak():
    libc.malloc_trim(0)  # what was freed (the whole model loaded before sharding) back to the system
    Path("/proc/self/clear_refs").write_text("5")  # the high-water mark of the RSS starts again from here


def high_water_kb():
    return int(next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM")).split()[1])


steps_peak = 0
if args["mode"] == "baseline":
    import deepspeed, torch
    from rlhfkit import distributed
    import rlhfkit.trainers.sft
    distributed.setup(torch.device("cpu"))
    reset_peak()
    distributed.barrier()
    steps_peak = high_water_kb()
else:
    from rlhfkit.cli import main
    from rlhfkit.trainers import checkpoint, loop
    rewind, at_end = loop.Logger.rewind, checkpoint.Checkpoints.at_end

    def rewind_then_reset(self, step):  # every trainer calls it once, right before its first step
        rewind(self, step)
        reset_peak()

    def read_then_end(self, step):  # every trainer calls it once, when its last step is done
        global steps_peak
        steps_peak = high_water_kb()
        return at_end(self, step)

    loop.Logger.rewind, checkpoint.Checkpoints.at_end = rewind_then_reset, read_then_end
    rc = main([*args["command"], "--out", args["out"], "--train.max_steps", str(args["steps"]),
               "--train.tensorboard", "false", "--train.fsdp", args["fsdp"], "--train.deepspeed", args["deepspeed"]])
    assert rc == 0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
Path(args["out"], f"peak-{os.environ.get('RANK', '0')}.json").write_text(json.dumps([steps_peak, peak]))
"""

MODES = {  # name → (train.fsdp, train.deepspeed); PPO separate: the first five, PPO shared: the first three
    "replicas": ("off", "off"), "fsdp shard_grad_op": ("shard_grad_op", "off"),
    "fsdp full_shard": ("full_shard", "off"),
    "zero1": ("off", "zero1"), "zero2": ("off", "zero2"), "zero3": ("off", "zero3"),
    "zero3 live 1e7": ("off", "zero3"),  # with LIVE_SETTINGS
}
# DeepSpeed keeps up to stage3_max_live_parameters (1e9 by default) gathered weights in each process, and those it
# will use again within stage3_max_reuse_distance: below ~1e9 parameters, nothing is released between layers
LIVE_SETTINGS = {"zero_optimization": {"stage3_max_live_parameters": 10**7, "stage3_max_reuse_distance": 10**7}}


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def peak_rss_mb(args: dict, out: Path) -> tuple[float, float]:
    """The mean over 2 processes of each one's peak RSS in its training steps and over its whole life, in MB."""
    out.mkdir(parents=True, exist_ok=True)
    script = out / "child.py"
    script.write_text(CHILD)
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
              "--master_port", _free_port(), str(script), json.dumps({**args, "out": str(out)})]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if args.get("settings"):  # read by rlhfkit.zero as an accelerate launch's deepspeed_config_file
        (out / "ds.json").write_text(json.dumps(args["settings"]))
        env["ACCELERATE_DEEPSPEED_CONFIG_FILE"] = str(out / "ds.json")
    done = subprocess.run(launch, capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    peaks = [json.loads((out / f"peak-{r}.json").read_text()) for r in (0, 1)]
    return tuple(sum(p[i] for p in peaks) / len(peaks) / 1024 for i in (0, 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trainer", choices=("sft", "ppo", "ppo-shared"), default="sft")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--modes", default="", help=f"comma-separated, of: {', '.join(MODES)} (default: all the "
                        "trainer runs)")
    a = parser.parse_args()
    modes = a.modes.split(",") if a.modes else list(MODES)[:{"ppo": 5, "ppo-shared": 3}.get(a.trainer, len(MODES))]

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
        if a.trainer == "sft":
            command = ["sft", "--model", str(model), "--data", str(data["sft"]), "--eval_fraction", "0",
                       "--train.batch_size", "8", "--max_length", "64"]
            what = "full SFT"
        else:  # a reward model to score with (and, separate, the critic to start from): one step of `rlhfkit rm`
            from rlhfkit.cli import main as cli

            assert cli(["rm", "--model", str(model), "--data", str(data["preference"]), "--out", str(root / "rm"),
                        "--train.max_steps", "1", "--train.batch_size", "8", "--max_length", "64",
                        "--train.tensorboard", "false"]) == 0
            mode = "separate" if a.trainer == "ppo" else "shared"
            command = ["ppo", "--mode", mode, "--model", str(model), "--reward_model", str(root / "rm"),
                       "--prompts", str(data["prompts_train"]), "--rollout_batch_size", "8", "--mini_batch_size", "4",
                       "--ppo_epochs", "1", "--generation.max_new_tokens", "16"]
            what = f"PPO mode {mode}"
        common = {"command": command, "steps": a.steps}
        print(f"{what}, {params / 1e6:.1f}M parameters a model ({4 * params / 2**20:.0f} MB in float32), AdamW, 2 "
              f"processes (gloo), {a.steps} steps; torch {torch.__version__}; peak RSS per process, mean of the 2")
        base, _ = peak_rss_mb({**common, "mode": "baseline"}, root / "baseline")
        print(f"{'mode':>20} {'steps peak MB':>14} {'above baseline':>15} {'/ replicas':>11} {'process peak MB':>16}")
        print(f"{'baseline':>20} {base:14.0f}")
        rows = {}
        for name in modes:
            fsdp, ds = MODES[name]
            run = {**common, "mode": "train", "fsdp": fsdp, "deepspeed": ds,
                   "settings": LIVE_SETTINGS if name.endswith("live 1e7") else None}
            rows[name], whole = peak_rss_mb(run, root / name)
            ref = rows.get("replicas")
            ratio = f"{(rows[name] - base) / (ref - base):.2f}x" if ref else ""
            print(f"{name:>20} {rows[name]:14.0f} {rows[name] - base:15.0f} {ratio:>11} {whole:16.0f}", flush=True)

if __name__ == "__main__":
    main()
