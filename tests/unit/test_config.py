"""rlhfkit.config: YAML + command-line overrides into typed, nested dataclasses."""

from __future__ import annotations  # as config modules may use it: types must resolve via get_type_hints

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import pytest

from rlhfkit.config import (
    ConfigError, arg, from_dict, help_text, load_yaml, parse_args, parse_overrides, save_config, set_dotted,
    to_dict,
)


@dataclass(frozen=True)
class Lora:
    """LoRA adapters."""

    r: int = arg(8, "adapter rank")
    target_modules: tuple[str, ...] = arg(("q_proj", "v_proj"), "modules that get adapters")

    def __post_init__(self):
        if self.r <= 0:
            raise ValueError(f"lora rank must be positive, got {self.r}")


@dataclass
class Model:
    name: str = arg("gpt2", "model id or path")
    revision: Optional[str] = arg(None, "hub revision")
    lora: Lora = arg(Lora, "adapters")


@dataclass
class Optim:
    learning_rate: float = arg(1e-5, "peak learning rate")
    betas: list[float] = arg([0.9, 0.999], "Adam betas")
    schedule: Literal["cosine", "linear", "constant"] = arg("cosine", "learning-rate schedule")


@dataclass
class Train:
    """Toy trainer config."""

    model: Model = arg(Model, "policy model")
    optim: Optim = arg(Optim(learning_rate=3e-5, schedule="linear"), "optimiser")
    max_steps: int = arg(100, "optimiser steps")
    bf16: bool = arg(False, "train in bfloat16")
    eval_every: int | None = arg(None, "steps between evaluations; none = never")
    loss: Literal["sigmoid", "ipo"] = arg("sigmoid", "preference loss")
    tags: list[str] = arg([], "run tags")


@dataclass
class Needs:
    data_path: str = arg(dataclasses.MISSING, "training data")


@dataclass
class Extras:
    out: Path = arg(Path("runs/x"), "output folder")
    weights: dict[str, float] = arg({"a": 1.0}, "reward weights by name")
    ref: Optional[Lora] = arg(None, "optional section")


def write(tmp_path, text, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# ---- defaults and arg() ---------------------------------------------------------------------

def test_defaults_and_instance_section_default():
    cfg = from_dict(Train, {})
    assert cfg == Train()
    assert (cfg.optim.learning_rate, cfg.optim.schedule) == (3e-5, "linear")  # the parent's section default
    assert cfg.model.lora == Lora(8, ("q_proj", "v_proj"))


def test_arg_copies_mutable_defaults():
    a, b = Train(), Train()
    a.tags.append("x")
    a.optim.betas[0] = 0.0
    assert b.tags == [] and b.optim.betas == [0.9, 0.999]
    assert a.optim is not b.optim
    assert dataclasses.fields(Train)[2].metadata["help"] == "optimiser steps"


def test_partial_section_keeps_parent_default_for_other_keys():
    cfg = from_dict(Train, {"optim": {"betas": [0.8, 0.9]}})
    assert cfg.optim == Optim(learning_rate=3e-5, betas=[0.8, 0.9], schedule="linear")


# ---- parse_overrides / set_dotted ----------------------------------------------------------

def test_parse_overrides_forms():
    argv = ["--max-steps", "10", "--optim.learning-rate=2e-5", "--bf16", "--model.name", "m",
            "--eval_every", "-1", "--tags=a=b", "--flag"]
    assert parse_overrides(argv) == {
        "max_steps": "10", "optim.learning_rate": "2e-5", "bf16": "true", "model.name": "m",
        "eval_every": "-1", "tags": "a=b", "flag": "true",
    }


def test_repeated_flag_gives_a_list_whose_items_keep_commas():
    assert parse_overrides(["--x", "1", "--x=2", "--x", "3"]) == {"x": ["1", "2", "3"]}
    assert parse_args(Train, ["--tags", "a, b", "--tags", "c"]).tags == ["a, b", "c"]
    assert parse_args(Train, ["--max_steps", "1", "--max_steps", "2"]).max_steps == 2  # one value: the last


def test_a_repeated_mapping_flag_adds_its_pairs():
    from rlhfkit.trainers.sft import SFTConfig

    argv = ["--columns", "prompt=question", "--columns", "completion=answer,prompt=q2"]
    assert parse_args(SFTConfig, argv).columns == {"prompt": "q2", "completion": "answer"}  # a later key wins


def test_a_mapping_flag_adds_its_pairs_to_the_file_s(tmp_path):
    from rlhfkit.trainers.sft import SFTConfig

    path = write(tmp_path, "columns: {prompt: question, completion: answer}\n")
    cfg = parse_args(SFTConfig, ["--config", str(path), "--columns", "completion=reply"])
    assert cfg.columns == {"prompt": "question", "completion": "reply"}
    with pytest.raises(ConfigError, match=r"bad value for 'columns' in the command line.*KEY=VALUE"):
        parse_args(SFTConfig, ["--config", str(path), "--columns", "reply"])


@pytest.mark.parametrize("argv", [["stray"], ["-x", "1"], ["--max_steps", "1", "extra"], ["--=3"]])
def test_parse_overrides_rejects_stray_tokens(argv):
    with pytest.raises(ConfigError, match="unexpected argument"):
        parse_overrides(argv)


def test_set_dotted_merges_into_nested_dicts():
    d = {"a": {"b": 1, "c": {"d": 2}}, "z": 0}
    set_dotted(d, "a.c.e", 3)
    set_dotted(d, "a.f", 4)
    set_dotted(d, "z.y", 5)  # a scalar in the way is replaced by a section
    assert d == {"a": {"b": 1, "c": {"d": 2, "e": 3}, "f": 4}, "z": {"y": 5}}


# ---- parse_args: YAML then command line -----------------------------------------------------

def test_yaml_then_cli_precedence(tmp_path):
    path = write(tmp_path, """
max_steps: 50
bf16: true
optim:
  learning_rate: 1e-4   # PyYAML reads this as a string; the float field converts it
  schedule: cosine
model:
  lora: {r: 4}
""")
    cfg = parse_args(Train, ["--config", path, "--max-steps", "10", "--optim.schedule", "constant",
                             "--model.lora.r=16"])
    assert cfg.max_steps == 10  # CLI wins
    assert cfg.bf16 is True  # from YAML
    assert cfg.optim.learning_rate == 1e-4  # YAML value kept beside the CLI's optim.schedule
    assert cfg.optim.schedule == "constant"
    assert cfg.optim.betas == [0.9, 0.999]
    assert cfg.model.lora.r == 16 and cfg.model.name == "gpt2"


def test_cli_only_and_bare_flag():
    cfg = parse_args(Train, ["--bf16", "--max_steps", "7"])
    assert cfg.bf16 is True and cfg.max_steps == 7


@pytest.mark.parametrize("raw,expected", [
    ("true", True), ("False", False), ("yes", True), ("no", False), ("1", True), ("0", False), ("ON", True),
])
def test_bool_strings(raw, expected):
    assert parse_args(Train, ["--bf16", raw]).bf16 is expected


def test_none_and_optional():
    cfg = parse_args(Train, ["--eval_every", "none", "--model.revision", "null"])
    assert cfg.eval_every is None and cfg.model.revision is None
    cfg = parse_args(Train, ["--eval_every", "25", "--model.revision", "main"])
    assert cfg.eval_every == 25 and cfg.model.revision == "main"
    assert from_dict(Train, {"eval_every": None}).eval_every is None  # YAML null


def test_lists_from_comma_strings_and_yaml():
    cfg = parse_args(Train, ["--optim.betas", "0.8, 0.95", "--tags", "a,b", "--model.lora.target_modules", "q,k,v"])
    assert cfg.optim.betas == [0.8, 0.95]
    assert cfg.tags == ["a", "b"]
    assert cfg.model.lora.target_modules == ("q", "k", "v")
    assert parse_args(Train, ["--tags", ""]).tags == []
    assert from_dict(Train, {"optim": {"betas": [1, 0.5]}}).optim.betas == [1.0, 0.5]  # ints accepted as floats


def test_numbers():
    assert from_dict(Train, {"max_steps": 1000.0}).max_steps == 1000
    assert from_dict(Train, {"optim": {"learning_rate": 2}}).optim.learning_rate == 2.0
    assert isinstance(from_dict(Train, {"optim": {"learning_rate": 2}}).optim.learning_rate, float)


# ---- errors ---------------------------------------------------------------------------------

def test_unknown_top_level_key_suggests_and_names_source():
    with pytest.raises(ConfigError, match=r"unknown key 'max_step' in cfg\.yaml; did you mean 'max_steps'\?"):
        from_dict(Train, {"max_step": 3}, source="cfg.yaml")


def test_unknown_nested_key_suggests_dotted_name():
    msg = r"unknown key 'optim\.lerning_rate' in cfg\.yaml; did you mean 'optim\.learning_rate'\?"
    with pytest.raises(ConfigError, match=msg):
        from_dict(Train, {"optim": {"lerning_rate": 1e-4}}, source="cfg.yaml")
    with pytest.raises(ConfigError, match=r"'model\.lora\.rank'.*did you mean 'model\.lora\.r'"):
        from_dict(Train, {"model": {"lora": {"rank": 4}}})


def test_key_in_wrong_section_suggests_where_it_lives():
    with pytest.raises(ConfigError, match=r"unknown key 'learning_rate'.*did you mean 'optim\.learning_rate'\?"):
        from_dict(Train, {"learning_rate": 1e-4})


def test_unknown_key_names_yaml_file_or_command_line(tmp_path):
    path = write(tmp_path, "optim:\n  lerning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=rf"'optim\.lerning_rate' in {path}; did you mean 'optim\.learning_rate'"):
        parse_args(Train, ["--config", path])
    path = write(tmp_path, "max_steps: 3\n", name="ok.yaml")
    with pytest.raises(ConfigError, match=r"unknown key 'max_stesp' in the command line; did you mean 'max_steps'"):
        parse_args(Train, ["--config", path, "--max-stesp", "4"])


def test_unknown_key_without_close_match_has_no_suggestion():
    with pytest.raises(ConfigError) as err:
        from_dict(Train, {"zzzzqqqq": 1})
    assert "did you mean" not in str(err.value)


@pytest.mark.parametrize("data,words", [
    ({"max_steps": "ten"}, ["'max_steps'", "int", "'ten'"]),
    ({"max_steps": 2.5}, ["'max_steps'", "int", "2.5"]),
    ({"max_steps": True}, ["'max_steps'", "int", "True"]),
    ({"bf16": "maybe"}, ["'bf16'", "bool", "'maybe'", "true/false"]),
    ({"optim": {"learning_rate": "fast"}}, ["'optim.learning_rate'", "float", "'fast'"]),
    ({"model": {"name": 123}}, ["'model.name'", "str", "123", "quote"]),
    ({"optim": {"betas": [0.9, "x"]}}, ["'optim.betas[1]'", "float", "'x'"]),
    ({"eval_every": "soon"}, ["'eval_every'", "int | None", "'soon'"]),
    ({"optim": 3}, ["'optim'", "section", "optim.NAME"]),
])
def test_wrong_type_names_key_type_and_value(data, words):
    with pytest.raises(ConfigError) as err:
        from_dict(Train, data, source="cfg.yaml")
    message = str(err.value)
    assert "cfg.yaml" in message
    for word in words:
        assert word in message, message


def test_literal_error_lists_choices():
    with pytest.raises(ConfigError) as err:
        parse_args(Train, ["--loss", "ipoo"])
    message = str(err.value)
    assert "'loss'" in message and "'sigmoid', 'ipo'" in message and "'ipoo'" in message
    assert "did you mean 'ipo'" in message
    assert parse_args(Train, ["--loss", "ipo"]).loss == "ipo"


def test_post_init_runs_and_its_error_names_the_section():
    with pytest.raises(ConfigError, match=r"Lora \(section 'model\.lora'\) in cfg\.yaml: lora rank must be positive"):
        from_dict(Train, {"model": {"lora": {"r": 0}}}, source="cfg.yaml")


def test_error_names_both_sources_when_a_section_mixes_them(tmp_path):
    path = write(tmp_path, "model:\n  lora:\n    target_modules: [q]\n")
    with pytest.raises(ConfigError, match=rf"in {path} and the command line: lora rank must be positive"):
        parse_args(Train, ["--config", path, "--model.lora.r", "0"])


def test_frozen_sections_load_and_stay_frozen():
    cfg = parse_args(Train, ["--model.lora.r", "2"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model.lora.r = 3


def test_missing_required_key():
    with pytest.raises(ConfigError, match=r"missing required key 'data_path' \(training data\).*--data_path"):
        parse_args(Needs, [])
    assert parse_args(Needs, ["--data-path", "d.jsonl"]).data_path == "d.jsonl"


# ---- YAML files -----------------------------------------------------------------------------

def test_load_yaml_refuses_python_tags(tmp_path):
    marker = tmp_path / "pwned"
    path = write(tmp_path, f"max_steps: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match=rf"cannot parse config file {path}"):
        load_yaml(path)
    with pytest.raises(ConfigError):
        parse_args(Train, ["--config", path])
    assert not marker.exists()


@pytest.mark.parametrize("text,match", [
    ("- a\n- b\n", "must hold a mapping"),
    ("a: [1, 2\n", "cannot parse"),
])
def test_load_yaml_bad_files_name_the_file(tmp_path, text, match):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=match) as err:
        load_yaml(path)
    assert path in str(err.value)


def test_load_yaml_missing_and_empty(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file .*nope.yaml"):
        load_yaml(tmp_path / "nope.yaml")
    assert load_yaml(write(tmp_path, "")) == {}


def test_save_load_round_trip(tmp_path):
    cfg = parse_args(Train, ["--optim.learning_rate", "1e-5", "--optim.betas", "0.5,0.6", "--loss", "ipo",
                             "--model.lora.target_modules", "q", "--tags", "yes,no", "--bf16",
                             "--model.revision", "none", "--eval_every", "5"])
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert path.exists()
    data = load_yaml(path)
    assert data["model"]["lora"]["target_modules"] == ["q"]  # plain YAML, no python tags
    assert from_dict(Train, data, source=str(path)) == cfg
    assert to_dict(cfg)["optim"] == {"learning_rate": 1e-5, "betas": [0.5, 0.6], "schedule": "linear"}


# ---- help -----------------------------------------------------------------------------------

EVERY_FIELD = [  # (dotted name, type, default, help)
    ("model.name", "str", "'gpt2'", "model id or path"),
    ("model.revision", "str | None", "none", "hub revision"),
    ("model.lora.r", "int", "8", "adapter rank"),
    ("model.lora.target_modules", "tuple[str, ...]", "('q_proj', 'v_proj')", "modules that get adapters"),
    ("optim.learning_rate", "float", "3e-05", "peak learning rate"),
    ("optim.betas", "list[float]", "[0.9, 0.999]", "Adam betas"),
    ("optim.schedule", "{cosine,linear,constant}", "'linear'", "learning-rate schedule"),
    ("max_steps", "int", "100", "optimiser steps"),
    ("bf16", "bool", "false", "train in bfloat16"),
    ("eval_every", "int | None", "none", "steps between evaluations; none = never"),
    ("loss", "{sigmoid,ipo}", "'sigmoid'", "preference loss"),
    ("tags", "list[str]", "[]", "run tags"),
]


def test_help_lists_every_field_with_type_default_and_help():
    lines = help_text(Train, "rlhfkit toy").splitlines()
    assert lines[0].startswith("usage: rlhfkit toy [--config FILE.yaml]")
    assert "Toy trainer config." in lines
    for name, type_name, default, help in EVERY_FIELD:
        [i] = [i for i, line in enumerate(lines) if line.startswith(f"  --{name} ")]
        assert lines[i] == f"  --{name} {type_name}  (default: {default})"
        assert lines[i + 1].strip() == help
    assert len([line for line in lines if line.startswith("  --")]) == len(EVERY_FIELD) + 1  # + --config
    for section in ("model: policy model", "model.lora: adapters", "optim: optimiser"):
        assert section in lines


@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_help_flag_prints_and_exits(capsys, flag):
    with pytest.raises(SystemExit) as exit_:
        parse_args(Train, ["--max_steps", "3", flag], prog="rlhfkit toy")
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "usage: rlhfkit toy" in out and "--model.lora.r int  (default: 8)" in out


# ---- other field types ----------------------------------------------------------------------

def test_path_dict_and_optional_section(tmp_path):
    cfg = parse_args(Extras, ["--out", "runs/y", "--weights.b", "2", "--ref.r", "4"])
    assert cfg == Extras(out=Path("runs/y"), weights={"b": 2.0}, ref=Lora(4))
    assert parse_args(Extras, ["--ref", "none"]).ref is None
    with pytest.raises(ConfigError, match=r"unknown key 'ref\.rank'.*did you mean 'ref\.r'"):
        parse_args(Extras, ["--ref.rank", "4"])
    with pytest.raises(ConfigError, match=r"'weights\.b'.*expected float, got 'x'"):
        parse_args(Extras, ["--weights.b", "x"])
    path = save_config(cfg, tmp_path / "extras.yaml")
    assert from_dict(Extras, load_yaml(path)) == cfg


def test_a_dict_from_one_flag():
    assert parse_args(Extras, ["--weights", "b=2, c = 0.5"]).weights == {"b": 2.0, "c": 0.5}
    for bad in ("b", "=2", "b=2,c"):
        with pytest.raises(ConfigError, match="expected dict.*write KEY=VALUE pairs separated by commas"):
            parse_args(Extras, ["--weights", bad])
    with pytest.raises(ConfigError, match=r"'weights\.b'.*expected float, got 'x'"):
        parse_args(Extras, ["--weights", "b=x"])


def test_only_the_writing_process_reports_the_saved_model(monkeypatch, capsys):
    from rlhfkit.cli import _report

    monkeypatch.setenv("RANK", "1")
    _report({"loss": 1.5}, "model saved to out/")
    assert capsys.readouterr().out == ""  # another rank wrote nothing: it says nothing
    monkeypatch.setenv("RANK", "0")
    _report({"loss": 1.5}, "model saved to out/")
    out = capsys.readouterr().out
    assert '"loss": 1.5' in out and out.rstrip().endswith("model saved to out/")


@dataclass
class Bounded:
    lr: float = arg(1e-3, "learning rate", ge=0, lt=float("inf"))
    top_p: float = arg(1.0, "nucleus mass", gt=0, le=1)
    betas: list[float] = arg([0.9, 0.999], "Adam betas", ge=0, lt=1)
    prompt: list[str] = arg([], "prompts", split=False)
    steps: int | None = arg(None, "steps", ge=1)


@pytest.mark.parametrize("argv, message", [
    (["--lr", "-1"], r"'lr' in the command line: must be >= 0 and finite, got -1\.0"),
    (["--lr", "nan"], r"'lr' .* must be >= 0 and finite, got nan"),
    (["--lr", "inf"], r"'lr' .* must be >= 0 and finite, got inf"),
    (["--top_p", "0"], r"'top_p' .* must be > 0 and <= 1, got 0\.0"),
    (["--top_p", "1.5"], r"'top_p' .* must be > 0 and <= 1, got 1\.5"),
    (["--betas", "0.9,1.0"], r"'betas' .* must be >= 0 and < 1, got 1\.0"),
    (["--steps", "0"], r"'steps' .* must be >= 1, got 0"),
])
def test_a_value_out_of_its_bounds_names_the_key_and_the_rule(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_args(Bounded, argv)


def test_values_at_their_bounds_and_none_are_accepted(tmp_path):
    cfg = parse_args(Bounded, ["--lr", "0", "--top_p", "1", "--betas", "0,0.5", "--steps", "none"])
    assert (cfg.lr, cfg.top_p, cfg.betas, cfg.steps) == (0.0, 1.0, [0.0, 0.5], None)
    with pytest.raises(ConfigError, match=rf"'lr' in {tmp_path / 'c.yaml'}: must be >= 0"):  # from a file too
        parse_args(Bounded, ["--config", write(tmp_path, "lr: -0.5\n", name="c.yaml")])
    assert "(default: 1.0; > 0 and <= 1)" in help_text(Bounded)


def test_a_config_built_in_python_gets_the_same_bounds_check_before_a_run():
    from rlhfkit.config import TrainConfig, check_bounds
    from rlhfkit.trainers.sft import SFTConfig
    from rlhfkit.trainers.loop import start_run

    check_bounds(SFTConfig(data="d.jsonl"))  # the defaults are inside their bounds
    bad = SFTConfig(data="d.jsonl", train=TrainConfig(keep_checkpoints=-1))
    with pytest.raises(ConfigError, match=r"'train.keep_checkpoints' in the SFTConfig built in Python: must be >= "):
        check_bounds(bad)
    with pytest.raises(ConfigError, match="keep_checkpoints"):  # before the run makes its directory
        start_run(bad)
    with pytest.raises(ConfigError, match=r"'betas' in the Bounded built in Python: must be >= 0 and < 1, got 1\.0"):
        check_bounds(Bounded(betas=[0.9, 1.0]))


def test_a_flag_given_again_for_one_value_takes_the_last():
    # as argparse has it: a script's own overrides after shared ones (they were refused as a list)
    cfg = parse_args(Bounded, ["--lr", "0.1", "--top_p", "0.5", "--lr", "0.2", "--steps", "3", "--steps", "none"])
    assert (cfg.lr, cfg.top_p, cfg.steps) == (0.2, 0.5, None)
    with pytest.raises(ConfigError, match=r"'lr' in the command line: must be >= 0"):  # the last is checked
        parse_args(Bounded, ["--lr", "0.1", "--lr", "-1"])
    assert parse_args(Bounded, ["--prompt", "a", "--prompt", "b"]).prompt == ["a", "b"]  # a list collects them


def test_a_list_that_does_not_split_keeps_commas(tmp_path):
    # a prompt holds commas: one --prompt (or one YAML string) is one prompt; a repeated flag gives several
    assert parse_args(Bounded, ["--prompt", "Describe the river, please."]).prompt == ["Describe the river, please."]
    assert parse_args(Bounded, ["--prompt", "a, b", "--prompt", "c"]).prompt == ["a, b", "c"]
    assert parse_args(Bounded, ["--config", write(tmp_path, "prompt: Hello, you\n")]).prompt == ["Hello, you"]
    assert parse_args(Bounded, ["--betas", "0.5,0.6"]).betas == [0.5, 0.6]  # the others still split


def test_load_yaml_refuses_a_key_given_twice(tmp_path):
    # the first block would be dropped silently: the run would train with the second
    path = write(tmp_path, "optim:\n  learning_rate: 0.1\nmax_steps: 3\noptim:\n  schedule: constant\n")
    with pytest.raises(ConfigError, match=r"cannot parse config file .*'optim' is given twice"):
        load_yaml(path)
    with pytest.raises(ConfigError, match="'lr' is given twice"):
        load_yaml(write(tmp_path, "a:\n  lr: 1\n  lr: 2\n", name="nested.yaml"))


def test_load_yaml_reads_dotted_keys_as_sections_and_refuses_a_setting_given_both_ways(tmp_path):
    text = "optim.lr: 0.1\noptim:\n  schedule: constant\ntrain:\n  log.every: 2\n"
    assert load_yaml(write(tmp_path, text)) == {"optim": {"lr": 0.1, "schedule": "constant"},
                                                "train": {"log": {"every": 2}}}
    with pytest.raises(ConfigError, match=r"'optim\.lr' is given twice \(dotted and nested\)"):
        load_yaml(write(tmp_path, "optim:\n  lr: 1\noptim.lr: 2\n", name="both.yaml"))


def test_load_yaml_that_is_not_utf8_names_the_file(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("model:\n  path: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"cannot read config file .*latin1\.yaml: not UTF-8 text"):
        load_yaml(path)


def test_a_name_from_another_section_or_from_trl_is_suggested_where_it_lives():
    # the exact name in another section wins over a near spelling in the same one (train.lr is not train.out)
    with pytest.raises(ConfigError, match=r"unknown key 'model\.learning_rate'.*did you mean 'optim\.learning_rate'"):
        from_dict(Train, {"model": {"learning_rate": 1e-4}})
    from rlhfkit.trainers.sft import SFTConfig

    for typed, meant in [("train.lr", "optim.lr"), ("learning_rate", "optim.lr"), ("num_train_epochs", "train.epochs"),
                         ("lora_r", "lora.r"), ("output_dir", "train.out"), ("use_peft", "lora.enabled"),
                         ("bf16", "model.dtype"), ("report_to", "train.tensorboard"), ("dataset_name", "data")]:
        with pytest.raises(ConfigError, match=rf"unknown key '{typed}' .*did you mean '{meant}'\?"):
            parse_args(SFTConfig, [f"--{typed}", "1"])
    from rlhfkit.trainers.online import GRPOConfig
    from rlhfkit.trainers.ppo import PPOConfig

    for cls, meant in [(PPOConfig, "rollout_batch_size"), (GRPOConfig, "prompts_per_step")]:  # their own batches
        with pytest.raises(ConfigError, match=rf"did you mean '{meant}'\?"):
            parse_args(cls, ["--per_device_train_batch_size", "4"])
    with pytest.raises(ConfigError, match=r"unknown key 'generation\.top_p' in the command line$"):
        parse_args(SFTConfig, ["--generation.top_p", "0.5"])  # named as typed, no far-fetched guess
    with pytest.raises(ConfigError, match=r"'gradient_checkpointing' .*did you mean 'train.gradient_checkpointing'"):
        parse_args(SFTConfig, ["--gradient_checkpointing"])  # not train.keep_checkpoints
    # OpenRLHF's names (they pointed at unrelated settings: advantage_estimator at kl_estimator)
    for cls, typed, meant in [(GRPOConfig, "advantage_estimator", "advantage"),
                              (GRPOConfig, "generate_max_len", "generation.max_new_tokens"),
                              (GRPOConfig, "n_samples_per_prompt", "group_size"),
                              (GRPOConfig, "init_kl_coef", "kl_coef"), (PPOConfig, "init_kl_coef", "beta"),
                              (PPOConfig, "train_batch_size", "mini_batch_size"),
                              (SFTConfig, "train_batch_size", "train.batch_size"),
                              (PPOConfig, "pretrain", "model.path"),
                              (PPOConfig, "reward_pretrain", "reward_model"), (SFTConfig, "max_len", "max_length"),
                              (GRPOConfig, "reward_pretrain", "rewards"),
                              (PPOConfig, "max_len", "generation.max_new_tokens"),
                              (GRPOConfig, "micro_train_batch_size", "micro_batch_size"),
                              (PPOConfig, "micro_train_batch_size", "micro_batch_size")]:
        with pytest.raises(ConfigError, match=rf"unknown key '{typed}' .*did you mean '{meant}'\?"):
            parse_args(cls, [f"--{typed}", "1"])
    for cls, typed in [(PPOConfig, "advantage_estimator"), (SFTConfig, "num_generations")]:  # not a near spelling
        with pytest.raises(ConfigError, match=f"unknown key '{typed}' .*; this command has no setting for it"):
            parse_args(cls, [f"--{typed}", "1"])
    with pytest.raises(ConfigError, match="micro-batch is train.batch_size / train.grad_accum here"):
        parse_args(SFTConfig, ["--micro_train_batch_size", "2"])  # a size, where grad_accum counts micro-batches
    with pytest.raises(ConfigError, match="name the file's column with --columns prompt=COLUMN"):
        parse_args(PPOConfig, ["--input_key", "question"])


def test_lora_target_modules_may_be_a_yaml_list(tmp_path):
    from rlhfkit.models.load import lora_targets
    from rlhfkit.trainers.sft import SFTConfig

    yaml = "data: d.jsonl\nlora:\n  target_modules: [q_proj, v_proj]\n"
    listed = parse_args(SFTConfig, ["--config", write(tmp_path, yaml)])
    typed = parse_args(SFTConfig, ["--data", "d.jsonl", "--lora.target_modules", "q_proj, v_proj"])
    assert lora_targets(None, listed.lora.target_modules) == lora_targets(None, typed.lora.target_modules) == [
        "q_proj", "v_proj"]


def test_several_config_files_merge_in_order(tmp_path):
    first = write(tmp_path, "max_steps: 3\noptim:\n  learning_rate: 0.1\n", name="a.yaml")
    second = write(tmp_path, "optim:\n  schedule: constant\nmax_steps: 5\n", name="b.yaml")
    cfg = parse_args(Train, ["--config", first, "--config", second, "--bf16"])
    assert (cfg.max_steps, cfg.optim.learning_rate, cfg.optim.schedule, cfg.bf16) == (5, 0.1, "constant", True)
    typo = write(tmp_path, "max_stesp: 1\n", name="c.yaml")
    with pytest.raises(ConfigError, match=rf"'max_stesp' in {first}, {typo}"):
        parse_args(Train, ["--config", first, "--config", typo])


def test_yaml_merge_keys_load_and_may_be_overridden(tmp_path):
    path = write(tmp_path, "base: &base\n  learning_rate: 0.1\n  schedule: linear\noptim:\n  <<: *base\n"
                           "  schedule: constant\n", name="merge.yaml")
    assert load_yaml(path)["optim"] == {"learning_rate": 0.1, "schedule": "constant"}


def test_a_rollout_command_s_help_leaves_out_the_supervised_batch_settings_it_refuses():
    from rlhfkit.trainers.online import GRPOConfig
    from rlhfkit.trainers.ppo import PPOConfig
    from rlhfkit.trainers.sft import SFTConfig

    for cls in (PPOConfig, GRPOConfig):
        text = help_text(cls)
        assert "--train.max_steps int  (default: 0)" in text or "--train.max_steps int  (default: 50)" in text
        assert "rollout steps (1 or more)" in text  # the shared field's bound (>= 0) is not shown beside it
        assert not any(f"--train.{k} " in text for k in ("batch_size", "grad_accum", "epochs"))
    assert all(f"--train.{k} " in help_text(SFTConfig) for k in ("batch_size", "grad_accum", "epochs"))


def test_settings_that_would_silently_train_nothing_or_backwards_are_refused():
    from rlhfkit.trainers.online import GRPOConfig
    from rlhfkit.trainers.ppo import PPOConfig
    from rlhfkit.trainers.preference import KTOConfig, ORPOConfig, SimPOConfig

    assert parse_args(PPOConfig, ["--reward_clip", "none"]).reward_clip is None  # no clipping
    refused = [(PPOConfig, "reward_clip", "0", "> 0"),  # clamp(-0, 0) zeroed every score
               (PPOConfig, "missing_eos_penalty", "-1", ">= 0"),  # subtracted, as TRL's: -1 would reward cut-offs
               (GRPOConfig, "missing_eos_penalty", "-1", ">= 0"),
               (KTOConfig, "beta", "0", "> 0"), (SimPOConfig, "beta", "-2", "> 0"), (ORPOConfig, "lam", "-0.1", ">= 0")]
    for cls, key, value, rule in refused:
        with pytest.raises(ConfigError, match=f"bad value for '{key}'.*must be {rule}"):
            parse_args(cls, [f"--{key}", value])
    for method in ("grpo", "dr_grpo"):  # one sample per prompt: every advantage 0
        with pytest.raises(ConfigError, match=f"{method} needs group_size >= 2"):
            parse_args(GRPOConfig, ["--advantage", method, "--group_size", "1", "--rewards", "m:f"])
    from rlhfkit.trainers.online import ReinforcePPConfig
    assert parse_args(ReinforcePPConfig, ["--group_size", "1"]).group_size == 1  # its baseline is the batch's


def test_a_value_built_of_yaml_aliases_is_refused_without_printing_it_whole(tmp_path):
    from rlhfkit.trainers.sft import SFTConfig

    # a billion laughs: cheap to hold (shared references), 10^9 items to print; the error printed all of them
    lines = ['l0: &l0 ["x", "x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, 9)]
    path = write(tmp_path, "\n".join(lines) + "\n", name="anchors.yaml")
    data = load_yaml(path)
    with pytest.raises(ConfigError, match="expected str | list") as info:
        from_dict(SFTConfig, {"lora": {"target_modules": data["l8"]}})
    assert len(str(info.value)) < 1000


@pytest.mark.parametrize("text, flags, section", [
    ("lora: true\n", ["--lora.r", "8"], "lora"),  # trained the full model, the saved config saying lora off
    ("train: 5\n", ["--train.out", "o"], "train"),
    ("train: 5\n", ["--train.seed", "1", "--optim.lr", "0.1"], "train"),
])
def test_a_section_a_file_sets_to_a_scalar_is_refused_with_a_flag_inside_it_too(tmp_path, text, flags, section):
    from rlhfkit.trainers.sft import SFTConfig

    path = write(tmp_path, text)
    message = rf"bad value for '{section}' in {path}: .*'{section}' is a section, set its keys as '{section}\.NAME'"
    with pytest.raises(ConfigError, match=message):  # the file alone
        parse_args(SFTConfig, ["--config", path])
    with pytest.raises(ConfigError, match=message):  # a flag in the section had replaced the file's value unseen
        parse_args(SFTConfig, ["--config", path, *flags])
    with pytest.raises(ConfigError, match=message):  # as had a later file setting a key in it
        later = write(tmp_path, f"{section}:\n  {flags[0].split('.')[1]}: {flags[1]}\n", "later.yaml")
        parse_args(SFTConfig, ["--config", path, "--config", later])
    with pytest.raises(ConfigError, match=rf"'{section}' in the command line: .*is a section"):  # flags alone
        parse_args(SFTConfig, [f"--{section}", "true", *flags])


def test_a_section_that_may_be_none_set_so_in_a_file_takes_keys_from_the_command_line(tmp_path):
    assert parse_args(Extras, ["--config", write(tmp_path, "ref: null\n"), "--ref.r", "4"]).ref == Lora(r=4)


@pytest.mark.parametrize("text, line, what", [
    ("? [a, b]\n: 1\n", 1, r"a list as a key \(\['a', 'b'\]\)"),
    ("max_steps: 3\ntrain: {? {x: 1} : 2}\n", 2, r"a mapping as a key \(\{'x': 1\}\)"),
    ("max_steps: 64\nmax_steps: 32\n", 2, "key 'max_steps' is given twice in one mapping"),
    ("max_steps: 64\n  bad indent: 3\n", 2, "mapping values are not allowed here"),
])
def test_yaml_that_cannot_be_read_is_one_line_naming_the_file_and_line(tmp_path, text, line, what):
    # a complex key failed with TypeError (unhashable); the others ran to three lines placed in "<unicode string>"
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=rf"cannot parse config file {path}, line {line}, column \d+: {what}") as e:
        load_yaml(path)
    assert "\n" not in str(e.value) and "<unicode string>" not in str(e.value)


def test_a_seed_past_what_torch_takes_names_the_setting():
    from rlhfkit.trainers.sft import SFTConfig

    # "Overflow when unpacking long long" from torch, naming no setting
    with pytest.raises(ConfigError, match=r"'train\.seed' in the command line: must be > -4294967296 and < "
                                          r"4294967296, got 99999999999999999999999"):
        parse_args(SFTConfig, ["--train.seed", "99999999999999999999999"])
    assert parse_args(SFTConfig, ["--train.seed", "-7"]).train.seed == -7  # a negative one still seeds
    from rlhfkit.quickstart import QuickstartConfig

    with pytest.raises(ConfigError, match=r"'seed' in the command line: must be > -4294967296"):
        parse_args(QuickstartConfig, ["--seed", "99999999999999999999"])
