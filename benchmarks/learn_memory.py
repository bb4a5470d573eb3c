"""Peak memory and time of PPO's learn pass with micro-batches (``micro_batch_size``) and gradient checkpointing
(``train.gradient_checkpointing``), against neither.

    python benchmarks/learn_memory.py [--hidden 512] [--layers 8] [--mini 32] [--new_tokens 96] [--micro 8,2]

Makes a tiny Llama of the given size and a full reward model from it (`rlhfkit rm`, one step), then runs the
same `rlhfkit ppo` (mode shared: one base with LoRA actor and critic; one step of one rollout batch of
``--mini`` prompts learned from as one mini-batch, two epochs) once per setting, each in a fresh process:
the whole mini-batch in one forward and backward (the baseline, measured in the same run), each
``--micro`` size, gradient checkpointing, and checkpointing with the first micro size. Prints peak RSS
(ru_maxrss, the whole process's), the learn phase's seconds (``time/learn``), on a GPU the learn pass's own
peak allocated memory (``torch.cuda.max_memory_allocated``, reset as it starts), and their ratios to the
baseline; memory is compared above a process that imports rlhfkit, torch and transformers and loads the
model once ("load only"). Every setting gives the same update (tests/models/test_ppo.py,
test_checkpointing.py); only memory and time differ.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import json, resource, sys
args = json.loads(sys.argv[1])
if args["micro"] is None:  # load only
    from rlhfkit.config import ModelConfig
    from rlhfkit.models.load import load_causal_lm
    import torch
    load_causal_lm(ModelConfig(path=args["model"]), torch.device("cpu"))
    learn = 0.0
else:
    import torch
    import rlhfkit.trainers.ppo as ppo
    from rlhfkit.cli import main
    learn_peak, learn_pass = [0.0], ppo.learn

    def measured(*a, **k):  # the GPU's peak within the learn pass alone (not the rollout's KV cache or the load)
        if torch.cuda.is_available():
            torch.cuda.synchronize(), torch.cuda.reset_peak_memory_stats()
        out = learn_pass(*a, **k)
        if torch.cuda.is_available():
            learn_peak[0] = max(learn_peak[0], torch.cuda.max_memory_allocated() / 2**20)
        return out

    ppo.learn = measured
    rc = main(["ppo", "--model", args["model"], "--reward_model", args["rm"], "--prompts", args["prompts"],
               "--out", args["out"], "--mode", "shared", "--train.max_steps", "1",
               "--rollout_batch_size", str(args["mini"]), "--mini_batch_size", str(args["mini"]),
               "--ppo_epochs", "2", "--micro_batch_size", str(args["micro"]),
               "--train.gradient_checkpointing", str(args["checkpointing"]).lower(),
               "--generation.max_new_tokens", str(args["new_tokens"]), "--train.tensorboard", "false"])
    assert rc == 0
    logged = [json.loads(line) for line in open(args["out"] + "/metrics.jsonl")]
    learn = logged[-1]["time/learn"]
    learn_gpu = learn_peak[0]
import torch
gpu = learn_gpu if args["micro"] is not None else 0.0  # the run's device: auto
print("RESULT", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, learn, gpu)
"""


def run(args: dict) -> tuple[float, float, float]:
    """(peak RSS MB, learn seconds, peak GPU memory allocated MB: 0 without a GPU) of one fresh process."""
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    _, kb, learn, gpu = next(x for x in out.stdout.splitlines() if x.startswith("RESULT")).split()
    return int(kb) / 1024, float(learn), float(gpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--mini", type=int, default=32, help="prompts per step, learned from as one mini-batch")
    parser.add_argument("--new_tokens", type=int, default=96)
    parser.add_argument("--micro", default="8,2", help="micro_batch_size values beside the whole mini-batch")
    a = parser.parse_args()
    micros = [int(m) for m in a.micro.split(",")]

    from rlhfkit.cli import main as cli
    from rlhfkit.data.tasks import describe
    from rlhfkit.models.tiny import make_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = describe.write(tmp / "data")
        model = make_tiny_model("llama", tmp / "model", hidden_size=a.hidden, num_layers=a.layers, num_heads=8)
        assert cli(["rm", "--model", str(model), "--data", str(data["preference"]), "--out", str(tmp / "rm"),
                    "--train.max_steps", "1", "--train.batch_size", "4", "--train.tensorboard", "false",
                    "--normalize", "false", "--eval_fraction", "0"]) == 0
        import torch
        from transformers import AutoModelForCausalLM

        n_params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model).parameters())
        common = {"model": str(model), "rm": str(tmp / "rm"), "prompts": str(data["prompts_train"]),
                  "mini": a.mini, "new_tokens": a.new_tokens}
        settings = {"whole mini-batch": (0, False), **{f"micro_batch_size {m}": (m, False) for m in micros},
                    "gradient checkpointing": (0, True),
                    f"checkpointing + micro_batch_size {micros[0]}": (micros[0], True)}
        rows = {"load only": run({**common, "micro": None, "checkpointing": False, "out": str(tmp / "load")})}
        for i, (row, (micro, checkpointing)) in enumerate(settings.items()):
            rows[row] = run({**common, "micro": micro, "checkpointing": checkpointing, "out": str(tmp / f"run{i}")})
    base_mb, base_learn, base_gpu = rows["whole mini-batch"]
    load = rows["load only"][0]
    print(f"\nPPO (shared) learn pass, tiny Llama of {n_params / 1e6:.1f}M parameters, a mini-batch of {a.mini} "
          f"rollouts of up to {a.new_tokens} new tokens, 2 epochs (fp32, CPU, torch {torch.__version__})\n")
    gpu = base_gpu > 0  # on a GPU the run's activations are GPU memory: its peak allocation, and the ratio
    print("| run | peak RSS (MB) | above load only (MB) | ratio (above load) | learn (s) | learn ratio |"
          + (" GPU peak (MB) | GPU ratio |" if gpu else ""))
    print("|---|---|---|---|---|---|" + ("---|---|" if gpu else ""))
    for row, (mb, learn, peak) in rows.items():
        if row == "load only":
            print(f"| {row} | {mb:.0f} | 0 | | | |" + (" | |" if gpu else ""))
            continue
        above = f"{(mb - load) / (base_mb - load):.2f}" if base_mb > load else "-"  # a model too small to show
        print(f"| {row} | {mb:.0f} | {mb - load:.0f} | {above} | {learn:.1f} | "
              f"{learn / base_learn:.2f} |" + (f" {peak:.0f} | {peak / base_gpu:.2f} |" if gpu else ""))


if __name__ == "__main__":
    main()
