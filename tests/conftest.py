"""Shared fixtures: tiny models of real architectures, made once per test session."""

import os

# Tiny models run about twice as fast on one thread on these 2-core machines, and a test that starts a
# subprocess (the demo), or runs beside a second test process (pytest -n 2), must not fight the others for
# cores (OpenMP oversubscription crawls).
if not os.environ.get("OMP_NUM_THREADS", "").isdigit():
    os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))



@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A function arch → directory of a tiny random model (hidden 32, 1 layer) with its tokenizer.
    ``"llama-gqa"`` (also qwen2, mistral): grouped-query attention, 4 query heads sharing 2 key/value heads."""
    from rlhfkit.models.tiny import make_tiny_model

    made = {}

    def get(arch: str = "llama"):
        if arch not in made:
            name, gqa = arch.removesuffix("-gqa"), arch.endswith("-gqa")
            heads = dict(num_heads=4, num_kv_heads=2) if gqa else dict(num_heads=2)
            made[arch] = make_tiny_model(name, tmp_path_factory.mktemp(arch), hidden_size=32, num_layers=1, **heads)
        return str(made[arch])

    return get


@pytest.fixture(scope="session")
def task_dir(tmp_path_factory):
    """The built-in task written to disk once."""
    from rlhfkit.data.tasks import describe

    out = tmp_path_factory.mktemp("data")
    describe.write(out)
    return out


@pytest.fixture(scope="session")
def ppo_setup(tiny_model_dir, task_dir, tmp_path_factory):
    """For the multi-process PPO tests (test_fsdp, test_zero): a reward model whose scores spread (see
    test_distributed's), a LoRA one (PPO's third adapter on the shared base), and prompts that repeat: a
    process whose rows repeat a prompt would share its prefix in one more forward than one whose rows do
    not, so the processes must agree on it (a sharded forward is collective)."""
    from rlhfkit.cli import main

    root = tmp_path_factory.mktemp("ppo-setup")
    for name, extra in (("rm", ["--optim.lr", "1e-3"]), ("rm-lora", ["--lora.enabled", "true", "--optim.lr", "1e-2"])):
        assert main(["rm", "--model", tiny_model_dir("llama"), "--data", str(task_dir / "preference.jsonl"), *extra,
                     "--train.max_steps", "2", "--train.batch_size", "8", "--train.tensorboard", "false",
                     "--out", str(root / name)]) == 0
    rows = (task_dir / "prompts_train.jsonl").read_text().splitlines()[:5]
    (root / "prompts.jsonl").write_text("\n".join(rows * 3) + "\n")
    return root


@pytest.fixture
def launcher_env(monkeypatch):
    """A function that sets the variables an accelerate launch would, every other ``ACCELERATE_*`` and
    ``FSDP_*`` variable unset for the test."""
    for key in [k for k in os.environ if k.startswith(("ACCELERATE_", "FSDP_"))]:
        monkeypatch.delenv(key)

    def set_env(**values):
        for key, value in values.items():
            monkeypatch.setenv(key, value)

    return set_env


@pytest.fixture
def head_calls(monkeypatch):
    """The set of (chunk, gradients on, entropy) of every call of the output head's log-prob pass
    (``forward._masked_head_logprobs``) in the test: which passes took ``logits_chunk``. Clear it between runs."""
    from rlhfkit.models import forward

    real, seen = forward._masked_head_logprobs, set()

    def recorded(head, hidden, input_ids, mask, chunk=0, temperature=1.0, entropy="none"):
        seen.add((chunk, torch.is_grad_enabled(), entropy))
        return real(head, hidden, input_ids, mask, chunk, temperature, entropy)

    monkeypatch.setattr(forward, "_masked_head_logprobs", recorded)
    return seen
