"""Peak memory of PPO: shared base (one model + LoRA actor/critic) vs four separate models.

    python benchmarks/ppo_memory.py [--hidden 512] [--layers 8] [--steps 2]

Makes a tiny Llama of the given size, a full reward model and a LoRA reward model from it
(`rlhfkit rm`, one step each), then runs the same `rlhfkit ppo` for a few steps in each mode,
each in a fresh process, and prints peak RSS (ru_maxrss) with the ratio to separate. Modes:
separate (four full models, the critic from the reward model), shared (one base + LoRA actor and
critic, the full reward model beside it) and shared with the reward as a third adapter on the
base (the whole stack on one model). The baseline row is a process that only imports rlhfkit,
torch and transformers and loads the model once, in the same run.
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
if args["mode"] == "baseline":
    from rlhfkit.config import ModelConfig
    from rlhfkit.models.load import load_causal_lm
    import torch
    load_causal_lm(ModelConfig(path=args["model"]), torch.device("cpu"))
else:
    from rlhfkit.cli import main
    rc = main(["ppo", "--model", args["model"], "--reward_model", args["rm"], "--prompts", args["prompts"],
               "--out", args["out"], "--mode", args["mode"], "--train.max_steps", str(args["steps"]),
               "--rollout_batch_size", "16", "--mini_batch_size", "8", "--generation.max_new_tokens", "16",
               "--train.tensorboard", "false", "--critic_init", "reward"])
    assert rc == 0
print("PEAK_RSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def peak_rss_mb(args: dict) -> float:
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    line = next(x for x in out.stdout.splitlines() if x.startswith("PEAK_RSS_KB"))
    return int(line.split()[1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2)
    a = parser.parse_args()

    from rlhfkit.cli import main as cli
    from rlhfkit.data.tasks import describe
    from rlhfkit.models.tiny import make_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = describe.write(tmp / "data")
        model = make_tiny_model("llama", tmp / "model", hidden_size=a.hidden, num_layers=a.layers, num_heads=8)
        for rm, lora in (("rm", "false"), ("rm-lora", "true")):  # the LoRA one: PPO's third adapter on the base
            assert cli(["rm", "--model", str(model), "--data", str(data["preference"]), "--out", str(tmp / rm),
                        "--train.max_steps", "1", "--train.batch_size", "4", "--train.tensorboard", "false",
                        "--normalize", "false", "--eval_fraction", "0", "--lora.enabled", lora]) == 0
        import torch
        from transformers import AutoModelForCausalLM

        n_params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model).parameters())
        common = {"model": str(model), "prompts": str(data["prompts_train"]), "steps": a.steps}
        runs = {"baseline": ("baseline", "rm"), "separate": ("separate", "rm"), "shared": ("shared", "rm"),
                "shared + reward adapter": ("shared", "rm-lora")}  # row -> (PPO mode, reward model)
        rows = {row: peak_rss_mb({**common, "mode": mode, "rm": str(tmp / rm), "out": str(tmp / f"run{i}")})
                for i, (row, (mode, rm)) in enumerate(runs.items())}
    base = rows["baseline"]
    print(f"\nPPO peak RSS, tiny Llama of {n_params / 1e6:.1f}M parameters (fp32, CPU, torch {torch.__version__})\n")
    print("| mode | peak RSS (MB) | above baseline (MB) | ratio to separate |")
    print("|---|---|---|---|")
    for mode, mb in rows.items():
        print(f"| {mode} | {mb:.0f} | {mb - base:.0f} | {mb / rows['separate']:.2f} |")
    print()
    for row in ("shared", "shared + reward adapter"):
        print(f"{row} / separate peak RSS: {rows[row] / rows['separate']:.2f}; "
              f"above the baseline process: {(rows[row] - base) / (rows['separate'] - base):.2f}")


if __name__ == "__main__":
    main()
