"""The quickstart report: a self-contained page over a fake run directory written here."""

import json
import re

import pytest

from rlhfkit.report import read_metrics, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
EVIL = "<script>alert('x')</script> describe a cat"
GOLD = {"sft": (0.4981, 0.0152), "sft_chosen": (0.5312, 0.0149), "best_of_4": (0.6104, 0.0141),
        "ppo": (0.7423, 0.0138), "dpo": (0.6987, 0.0144)}


def model_stage(name: str) -> dict:
    mean, stderr = GOLD[name]
    prompts = [EVIL] + [f"describe item {i}" for i in range(7)]
    row = {"gold_reward_mean": mean, "gold_reward_stderr": stderr, "n": 200, "eos_rate": 1.0,
           "proxy_reward_mean": 1.5, "seconds": 12.0,
           "samples": [{"prompt": p, "completion": f"{name} says {i} & more", "gold": 0.5}
                       for i, p in enumerate(prompts)]}
    if name != "sft":
        row["kl_to_sft"], row["kl_to_sft_stderr"] = 3.81, 0.12
    return row


def write_metrics(path, records) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.fixture
def run_dir(tmp_path):
    stages = {name: model_stage(name) for name in GOLD}
    stages["rm"] = {"accuracy": 0.656, "accuracy_stderr": 0.017, "gold_agreement": 0.767,
                    "gold_agreement_stderr": 0.016, "accuracy_ceiling": 0.784, "seconds": 10.0}
    stages["data+tiny_model"] = {"seconds": 3.0}
    summary = {"seed": 7, "decoding": "sampling, temperature 1.0", "ppo": {"steps": 20, "beta": 0.1},
               "stages": stages, "seconds": 71.0}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    for stage in ("sft", "sft_chosen"):
        write_metrics(tmp_path / stage, [{"step": s, "train/loss": 3.0 / s} for s in range(1, 30)]
                      + [{"step": 29, "eval/loss": 0.2}])
    write_metrics(tmp_path / "rm", [{"step": s, "train/loss": 0.7 - s / 100, "train/accuracy": 0.6}
                                    for s in range(1, 9)])
    write_metrics(tmp_path / "ppo", [{"step": s, "rollout/score": s / 10, "rollout/gold": 0.5 + s / 100,
                                      "rollout/kl": s / 5, "loss/policy": -0.01, "loss/value": 0.3 / s,
                                      "value/explained_variance": 0.1} for s in range(1, 21)])
    write_metrics(tmp_path / "dpo", [{"step": s, "train/loss": 0.69 - s / 100, "train/rewards/accuracy": 0.7}
                                     for s in range(1, 11)])
    return tmp_path


def image_sources(page: str) -> list[str]:
    return re.findall(r'<img[^>]*src="([^"]*)"', page)


def test_page_shows_every_stage_and_its_gold_reward(run_dir):
    path = write_report(run_dir)
    assert path == run_dir / "report.html"
    page = path.read_text(encoding="utf-8")
    for name, (mean, stderr) in GOLD.items():
        assert f">{name}<" in page
        assert f"{mean:.3f} ± {stderr:.3f}" in page
    assert "data+tiny_model" in page and "0.656 ± 0.017" in page and "0.784" in page
    assert "seed 7" in page and "71 s" in page and "sampling, temperature 1.0" in page


def test_page_references_only_existing_local_pngs(run_dir):
    page = write_report(run_dir).read_text(encoding="utf-8")
    sources = image_sources(page)
    assert sorted(sources) == ["plots/gold.png", "plots/losses.png", "plots/ppo.png"]
    for src in sources:
        assert (run_dir / src).read_bytes()[:8] == PNG_SIGNATURE


def test_page_is_self_contained(run_dir):
    page = write_report(run_dir).read_text(encoding="utf-8")
    assert not re.search(r"https?://", page)
    assert "<script" not in page.lower() and "<link" not in page.lower()


def test_text_from_the_run_is_escaped(run_dir):
    page = write_report(run_dir).read_text(encoding="utf-8")
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert "ppo says 0 &amp; more" in page


def test_side_by_side_table_has_sft_ppo_and_dpo_only(run_dir):
    page = write_report(run_dir).read_text(encoding="utf-8")
    side_by_side = page.split("side by side")[1]
    assert re.findall(r"<th>(\w+)</th>", side_by_side) == ["prompt", "sft", "ppo", "dpo"]
    assert "best_of_4 says" not in side_by_side


def test_missing_ppo_metrics_still_makes_a_report(run_dir):
    (run_dir / "ppo" / "metrics.jsonl").unlink()
    page = write_report(run_dir).read_text(encoding="utf-8")
    assert sorted(image_sources(page)) == ["plots/gold.png", "plots/losses.png"]
    assert "0.742 ± 0.014" in page


def test_bare_summary_without_metrics_or_samples(tmp_path):
    summary = {"stages": {"sft": {"gold_reward_mean": 0.5}, "rm": {"seconds": 1.0}, "custom": {"seconds": 2.0}}}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    (tmp_path / "custom").mkdir()
    (tmp_path / "custom" / "metrics.jsonl").write_text('{"step": 1, "train/loss": "nan?"}\n{"step": 2, "trai')
    page = write_report(tmp_path).read_text(encoding="utf-8")
    assert image_sources(page) == ["plots/gold.png"]
    assert "0.500 ± –" in page and "custom" in page and "Reward model" not in page


def test_missing_summary_says_what_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="rlhfkit quickstart --out"):
        write_report(tmp_path)


def test_read_metrics_keeps_the_last_run_and_skips_broken_lines(tmp_path):
    lines = ['{"step": 1, "a": 1}', '{"step": 2, "a": 2}', "not json", '{"step": 1, "a": 10}', '{"no_step": 0}',
             '{"step": 2, "a": 20}', '{"step": 2, "b": 0}', '{"step": 3, "a": 3']
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines))
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 1, "a": 10}, {"step": 2, "a": 20}, {"step": 2, "b": 0}]
    assert read_metrics(tmp_path / "missing.jsonl") == []


def test_verifiable_table_appears_when_present(run_dir):
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["verifiable"] = {"sft": {"accuracy": 0.24, "accuracy_stderr": 0.02, "gain_over_sft": 0.0,
                                     "gain_stderr": 0.0, "seconds": 79},
                             "grpo": {"accuracy": 0.523, "accuracy_stderr": 0.032, "gain_over_sft": 0.283,
                                      "gain_stderr": 0.035, "seconds": 60}}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    page = write_report(run_dir).read_text()
    assert "Verifiable task" in page and "0.523 ± 0.032" in page and "0.283 ± 0.035" in page
