"""`rlhfkit quickstart --fast`: the pipeline in one process, every stage evaluated on the test prompts."""

import json

import pytest

from rlhfkit.cli import main


@pytest.mark.slow
def test_quickstart_fast_ppo_beats_sft_with_a_complete_summary(tmp_path, capsys):
    out = tmp_path / "qs"
    assert main(["quickstart", "--fast", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    stages = summary["stages"]
    for name in ("sft", "ppo"):
        s = stages[name]
        assert s["n"] >= 200 and 0.0 <= s["gold_reward_mean"] <= 1.0 and s["gold_reward_stderr"] > 0
        assert s["seconds"] > 0 and "proxy_reward_mean" in s
    assert stages["ppo"]["kl_to_sft"] > 0  # the policy moved away from the SFT model
    assert 0.4 < stages["sft"]["gold_reward_mean"] < 0.75
    # PPO beats SFT on held-out gold reward by more than two standard errors and by at least 0.05,
    # at a bounded KL, while the proxy score rises too
    sft, ppo = stages["sft"], stages["ppo"]
    gap = ppo["gold_reward_mean"] - sft["gold_reward_mean"]
    assert gap > max(0.05, 2 * (sft["gold_reward_stderr"] ** 2 + ppo["gold_reward_stderr"] ** 2) ** 0.5), gap
    assert ppo["kl_to_sft"] < 10 and ppo["proxy_reward_mean"] > sft["proxy_reward_mean"]
    assert stages["rm"]["accuracy"] > 0.6 and stages["rm"]["accuracy_ceiling"] > 0.6
    # every model is a standard HF directory; every stage left plottable logs
    assert (out / "sft" / "model.safetensors").is_file() and (out / "rm" / "model.safetensors").is_file()
    assert (out / "ppo" / "adapter_config.json").is_file()
    for stage in ("sft", "rm", "ppo"):
        assert (out / stage / "metrics.jsonl").stat().st_size > 0
        assert any((out / stage / "tensorboard").iterdir())
    assert "gold reward" in capsys.readouterr().out
