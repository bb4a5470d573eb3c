"""Typed configs: nested dataclasses filled from a YAML file and `--key value` overrides.

A config is a dataclass whose fields each carry a one-line help text; a field whose type
is itself a dataclass is a section, set as `section.key` (STYLE.md habit 8)::

    @dataclass
    class OptimConfig:
        learning_rate: float = arg(1e-5, "peak learning rate")

    @dataclass
    class SFTConfig:
        optim: OptimConfig = arg(OptimConfig, "optimiser")
        max_steps: int = arg(1000, "optimiser steps")

    cfg = parse_args(SFTConfig, ["--config", "sft.yaml", "--max-steps", "10", "--optim.learning_rate=3e-5"])

The file is read first, command-line values go on top, and every value is checked against
its annotation. An unknown key is an error that names the file or the command line and the
closest valid name (habit 14). Configs are not changed after parsing; declare them
`@dataclass(frozen=True)` to have Python enforce that (both kinds load), and make derived
sizes properties. `config` is reserved for the `--config FILE.yaml` flag.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import os
import reprlib
import sys
import types
import typing
from collections.abc import Callable, Hashable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

C = TypeVar("C")
_TRUE, _FALSE, _NONE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}, {"none", "null", "~"}
_MISSING = dataclasses.MISSING


class ConfigError(ValueError):
    """A config that cannot be loaded; the message names the file or flag, the key and the fix."""


# a seed's range (keyword arguments of `arg`): numpy's size, either sign, which torch's generators still take once
# the data order scales it (loop.batch_indices); past 2**64 torch had failed naming no setting
SEED_BOUNDS = {"gt": -2**32, "lt": 2**32}
_BOUNDS = {"ge": (">=", lambda v, b: v >= b), "gt": (">", lambda v, b: v > b),
           "le": ("<=", lambda v, b: v <= b), "lt": ("<", lambda v, b: v < b)}


def arg(default: Any, help: str, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
        lt: float | None = None, split: bool = True, elsewhere: dict[str, str] | None = None, **kw: Any) -> Any:
    """A dataclass field with a one-line `help`. A list, dict or dataclass default (type or
    instance) becomes a default_factory, so instances never share it; `dataclasses.MISSING` makes
    the field required. `ge`, `gt`, `le`, `lt`: bounds a value read from a file or the command line
    must keep (each item of a list; NaN keeps none). `split=False`: a list field takes a lone string
    as one item, not as comma-separated items (prompts, which hold commas). `elsewhere`: values this field
    refuses that another command takes → what to do instead, added to the error."""
    bounds = {name: b for name, b in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if b is not None}
    kw["metadata"] = {**kw.get("metadata", {}), "help": help, "bounds": bounds, "split": split,
                      "elsewhere": elsewhere or {}}
    if isinstance(default, type) and dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=default, **kw)
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), **kw)
    return dataclasses.field(default=default, **kw)


# ---- reading values -------------------------------------------------------------------------

def _fields(cls: type) -> list[tuple[dataclasses.Field, Any]]:
    """(field, type) for each init field; get_type_hints resolves `from __future__` string annotations."""
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls) if f.init]


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not _MISSING else f.default


def _section_of(tp: Any) -> type | None:
    """The section (dataclass) a field of type `tp` holds: `tp` itself, or the one in `Section | None`."""
    if _is_section(tp):
        return tp
    if typing.get_origin(tp) in (Union, types.UnionType):
        return next(filter(_is_section, typing.get_args(tp)), None)
    return None


def _names(cls: type, prefix: str = "") -> list[str]:
    """Every dotted name settable in `cls`: its fields, and the fields inside its sections."""
    out = []
    for f, tp in _fields(cls):
        out.append(prefix + f.name)
        if _section_of(tp):
            out += _names(_section_of(tp), f"{prefix}{f.name}.")
    return out


# names a transformers / TRL user types, and ours, the first a config has (suggested, not accepted: one name each)
_TRL_NAMES = {"learning_rate": ["lr"], "per_device_train_batch_size": ["rollout_batch_size", "prompts_per_step",
              "batch_size"], "num_train_epochs": ["epochs"], "gradient_accumulation_steps": ["grad_accum"],
              "output_dir": ["out"], "lr_scheduler_type": ["schedule"], "logging_steps": ["log_every"],
              "save_steps": ["save_every"],
              "eval_steps": ["eval_every"], "save_total_limit": ["keep_checkpoints"], "lora_r": ["r"],
              "lora_alpha": ["alpha"], "lora_dropout": ["dropout"], "max_completion_length": ["max_new_tokens"],
              "num_generations": ["group_size"], "resume_from_checkpoint": ["resume"], "use_peft": ["enabled"],
              "bf16": ["dtype"], "torch_dtype": ["dtype"], "report_to": ["tensorboard", "wandb_project"],
              "dataset_name": ["data"], "model_name_or_path": ["path"],
              # OpenRLHF's
              "advantage_estimator": ["advantage"], "generate_max_len": ["max_new_tokens"],
              "prompt_max_len": ["max_prompt_length", "max_length"], "max_len": ["max_length", "max_new_tokens"],
              "train_batch_size": ["mini_batch_size", "batch_size"], "n_samples_per_prompt": ["group_size", "n"],
              "best_of_n": ["n"], "num_return_sequences": ["n"],
              "init_kl_coef": ["kl_coef", "beta"], "actor_learning_rate": ["lr"], "critic_learning_rate": ["critic_lr"],
              "pretrain": ["path"], "reward_pretrain": ["reward_model", "rewards"], "save_path": ["out"],
              "max_epochs": ["ppo_epochs", "epochs"], "eps_clip": ["clip_eps"], "value_clip": ["value_clip_eps"],
              "lambd": ["lam"], "zero_stage": ["deepspeed"], "l2": ["weight_decay"], "max_norm": ["max_grad_norm"],
              "adam_betas": ["betas"], "lr_scheduler": ["schedule"], "lr_warmup_ratio": ["warmup_ratio"],
              "use_tensorboard": ["tensorboard"],
              "use_wandb": ["wandb_project"], "load_checkpoint": ["resume"], "lora_rank": ["r"],
              "prompt_data": ["prompts"], "dataset": ["data", "prompts"], "eval_dataset": ["eval_data", "eval_prompts"],
              "micro_train_batch_size": ["micro_batch_size"],
              # TRL's GRPO
              "epsilon": ["clip_eps"], "epsilon_high": ["clip_eps_high"],
              "mask_truncated_completions": ["mask_truncated"],
              # the NLL of the chosen answer beside a preference loss: TRL's DPO and CPO, OpenRLHF's DPO
              "rpo_alpha": ["nll_weight"], "cpo_alpha": ["nll_weight"], "nll_loss_coef": ["nll_weight"],
              "importance_sampling_level": ["importance_sampling"], "overlong_buffer_len": ["overlong_buffer"],
              "overlong_penalty_factor": ["overlong_penalty"], "center_rewards_coefficient": ["center_rewards"],
              "entropy_loss_coef": ["entropy_coef"], "entropy_coeff": ["entropy_coef"]}
_NOT_HERE = {"micro_train_batch_size": "a micro-batch is train.batch_size / train.grad_accum here (sft, rm, the DPO "
                                       "family); ppo and the online methods have micro_batch_size",
             "apply_chat_template": "chat messages always go through the tokenizer's chat template, plain strings "
                                    "never",
             **{key: f"name the file's column with --columns {ours}=COLUMN" for key, ours in
                {"input_key": "prompt", "output_key": "completion", "chosen_key": "chosen",
                 "rejected_key": "rejected", "label_key": "label"}.items()}}


def _suggest(key: str, names: list[str]) -> str:
    leaf = key.rsplit(".", 1)[-1]
    leaves: dict[str, str] = {}  # each leaf name's shallowest full name (the first of those, in field order)
    for name in sorted(names, key=lambda n: n.count(".")):
        leaves.setdefault(name.rsplit(".", 1)[-1], name)
    if leaf in _NOT_HERE and not any(ours in leaves for ours in _TRL_NAMES.get(leaf, [])):
        return f"; {_NOT_HERE[leaf]}"
    if leaf in _TRL_NAMES and leaf not in leaves and not any(ours in leaves for ours in _TRL_NAMES[leaf]):
        # another library's name for a setting this command lacks: a near spelling would be a wrong guess
        return f"; this command has no setting for it (in others: {' or '.join(_TRL_NAMES[leaf])})"
    leaf = next((ours for ours in _TRL_NAMES.get(leaf, []) if ours in leaves), leaf)
    if leaf in leaves:  # the right name in the wrong section (or TRL's name for it)
        hit = [leaves[leaf]]
    else:
        hit = difflib.get_close_matches(key, names, n=1)
    if not hit:  # a misspelt name in the wrong section: match on the last part alone
        hit = [leaves[m] for m in difflib.get_close_matches(leaf, list(leaves), n=1)]
    return f"; did you mean '{hit[0]}'?" if hit else ""


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "{" + ",".join(map(str, args)) + "}"
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is not None:
        return f"{origin.__name__}[{', '.join('...' if a is ... else _type_name(a) for a in args)}]"
    return "None" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _to_bool(v: Any) -> bool:
    if isinstance(v, bool) or isinstance(v, str) and v.lower() in _TRUE | _FALSE:
        return v if isinstance(v, bool) else v.lower() in _TRUE
    raise ValueError(v)


def _to_int(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, float, str)) or isinstance(v, float) and not v.is_integer():
        raise ValueError(v)
    return int(v)


def _to_float(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise ValueError(v)
    return float(v)  # strings too: PyYAML reads `1e-5` (no dot) as a string


def _to_str(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError(v)
    return v


_SCALARS = {bool: _to_bool, int: _to_int, float: _to_float, str: _to_str}
_HINTS = {bool: " (use true/false)", str: " (quote it in YAML)"}


class Repeated(list):
    """The values of a flag given more than once on the command line, in order."""


def _takes_list(tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return any(map(_takes_list, typing.get_args(tp)))
    return origin in (list, tuple) or tp in (list, tuple)


_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 80
_SHORT.maxlist = _SHORT.maxdict = 4
_SHORT.maxlevel = 3


def _shown(value: Any) -> str:
    """``repr(value)`` cut short: a YAML value built of aliases (a billion laughs) is cheap to hold, not to print."""
    return _SHORT.repr(value)


def _convert(value: Any, tp: Any, key: str, where: Callable[[str], str], split: bool = True) -> Any:
    """`value` (from YAML, or a string from the command line) as type `tp`, else ConfigError. `split`: a
    string for a list is comma-separated items (else one item)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if isinstance(value, Repeated) and dict in (origin, tp) and all(isinstance(v, str) for v in value):
        value = ",".join(value)  # --columns prompt=q --columns completion=a: one mapping, a later key winning
    elif isinstance(value, Repeated) and not _takes_list(tp):
        value = value[-1]  # a flag given again for one value: the last wins, as argparse has it

    def bad(hint: str = "") -> ConfigError:
        return ConfigError(f"bad value for '{key}' in {where(key)}: expected {_type_name(tp)}, "
                           f"got {_shown(value)}{hint}")

    if tp is Any:
        return value
    if _is_section(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, Mapping):
            return _build(tp, value, where, key + ".")
        raise bad(f"; '{key}' is a section, set its keys as '{key}.NAME'")
    if origin is Literal:
        for choice in args:
            try:
                if _convert(value, type(choice), key, where) == choice:
                    return choice
            except ConfigError:
                pass
        hit = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
        raise ConfigError(f"bad value for '{key}' in {where(key)}: expected one of {', '.join(map(repr, args))}, "
                          f"got {_shown(value)}" + (f"; did you mean '{hit[0]}'?" if hit else ""))
    if origin in (Union, types.UnionType):
        if type(None) in args and (value is None or isinstance(value, str) and value.lower() in _NONE):
            return None
        options = [a for a in args if a is not type(None)]
        if isinstance(value, Mapping) and any(map(_is_section, options)):  # keep the section's own errors
            return _convert(value, next(filter(_is_section, options)), key, where)
        for option in options:
            try:
                return _convert(value, option, key, where, split)
            except ConfigError:
                pass
        raise bad()
    if tp in _SCALARS:
        try:
            return _SCALARS[tp](value)
        except (TypeError, ValueError):
            raise bad(_HINTS.get(tp, "")) from None
    if origin in (list, tuple) or tp in (list, tuple):
        if isinstance(value, str) and not split:  # one item that may hold commas
            value = [value]
        elif isinstance(value, str):  # from the command line: --layers 0,1,2
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise bad()
        items = [_convert(v, args[0] if args else Any, f"{key}[{i}]", where) for i, v in enumerate(value)]
        return tuple(items) if tuple in (origin, tp) else items
    if origin is dict or tp is dict:
        if isinstance(value, str):  # from the command line: --columns prompt=question,completion=answer
            items = [item.partition("=") for item in value.split(",") if item.strip()]
            if not all(sep and k.strip() for k, sep, _ in items):
                raise bad("; write KEY=VALUE pairs separated by commas")
            value = {k.strip(): v.strip() for k, _, v in items}
        if not isinstance(value, Mapping):
            raise bad()
        kt, vt = args or (Any, Any)
        return {_convert(k, kt, key, where): _convert(v, vt, f"{key}.{k}", where) for k, v in value.items()}
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    try:  # any other class from its string form, e.g. pathlib.Path
        if isinstance(tp, type) and isinstance(value, str):
            return tp(value)
    except (TypeError, ValueError):
        pass
    raise bad()


def _rule(bounds: dict[str, float]) -> str:
    """A field's bounds in words: '>= 0 and finite', '> 0 and <= 1'."""
    return " and ".join("finite" if b == float("inf") else f"{_BOUNDS[n][0]} {b}" for n, b in bounds.items())


def _check_bounds(value: Any, bounds: dict[str, float], key: str, where: Callable[[str], str]) -> None:
    """ConfigError naming `key` when `value` (or an item of it) breaks one of its field's `bounds`."""
    for item in value if isinstance(value, (list, tuple)) else [value]:
        if item is not None and not all(_BOUNDS[name][1](item, b) for name, b in bounds.items()):
            raise ConfigError(f"bad value for '{key}' in {where(key)}: must be {_rule(bounds)}, got {item!r}")


def check_bounds(cfg: Any, prefix: str = "", source: str = "") -> None:
    """ConfigError for the first field of ``cfg`` (a config dataclass, its sections too) outside its bounds:
    a config built in Python skips the check that reading one from a file or the command line makes."""
    source = source or f"the {type(cfg).__name__} built in Python"
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            check_bounds(value, f"{prefix}{f.name}.", source)
        else:
            _check_bounds(value, f.metadata.get("bounds", {}), prefix + f.name, lambda key: source)


def _type_at(cls: type, dotted: str) -> Any:
    """The annotation of dotted name ``dotted`` in ``cls`` (through its sections), or None where it names none."""
    tp: Any = cls
    for part in dotted.split("."):
        section = _section_of(tp)
        tp = next((t for f, t in _fields(section) if f.name == part), None) if section else None
        if tp is None:
            return None
    return tp


def _check_sections(cls: type, data: Any, where: Callable[[str], str], prefix: str = "") -> None:
    """ConfigError (the one building the config gives) for a section of ``cls`` that ``data`` sets to a value
    that is no mapping (``lora: true``; None where the section may be None is one): a ``--lora.r 8`` merged on
    top would replace it unseen, and the run go on without the setting the file meant."""
    if not isinstance(data, Mapping):
        return
    for key, value in data.items():
        tp = _type_at(cls, prefix + key) if isinstance(key, str) else None
        if _section_of(tp) is None:
            continue
        if isinstance(value, Mapping):
            _check_sections(cls, value, where, f"{prefix}{key}.")
        else:
            _convert(value, tp, prefix + key, where)  # raises, unless a section that may be None is set so


def _check_keys(cls: type, data: Any, where: Callable[[str], str], names: list[str], prefix: str = "") -> None:
    """ConfigError for the first key of `data` that `cls` does not have, naming the closest of the
    config's dotted `names` (all of them: the right name may sit in another section)."""
    if not isinstance(data, Mapping):
        return
    sections = {f.name: tp for f, tp in _fields(cls)}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in sections:
            while isinstance(value, Mapping) and len(value) == 1:  # --generation.top_p: name what was typed
                key, value = next(iter(value.items()))
                full += f".{key}"
            raise ConfigError(f"unknown key '{full}' in {where(full)}" + _suggest(full, names))
        if _section_of(sections[key]):
            _check_keys(_section_of(sections[key]), value, where, names, full + ".")


def _build(cls: type[C], data: Any, where: Callable[[str], str], prefix: str = "") -> C:
    """An instance of `cls` from nested dicts; `where(dotted_key)` names the source of a key. Its keys are
    known ones: `_check_keys` has checked the whole config first."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"config in {where(prefix[:-1])} must be a mapping of keys to values, got {data!r}")
    fields = _fields(cls)
    kwargs = {}
    for f, tp in fields:
        key = prefix + f.name
        if f.name in data:
            value, default = data[f.name], _default(f)
            if _is_section(tp) and isinstance(value, Mapping) and isinstance(default, tp):
                value = _merge(to_dict(default), value)  # keys not given keep the parent's default section
            try:
                kwargs[f.name] = _convert(value, tp, key, where, f.metadata.get("split", True))
            except ConfigError as e:
                given = value[-1] if isinstance(value, Repeated) else value
                # a string alone: str() of a value built of YAML aliases would expand it whole (a billion laughs)
                instead = f.metadata.get("elsewhere", {}).get(given) if isinstance(given, str) else None
                if instead is None:
                    raise
                raise ConfigError(f"{e}; {instead}") from None
            _check_bounds(kwargs[f.name], f.metadata.get("bounds", {}), key, where)
        elif f.default is _MISSING and f.default_factory is _MISSING:
            raise ConfigError(f"missing required key '{key}' ({f.metadata.get('help', _type_name(tp))}) in "
                              f"{where(key)}; set it in the YAML file or with --{key} VALUE")
    try:
        return cls(**kwargs)  # runs the dataclass's own __post_init__ checks
    except (TypeError, ValueError) as e:
        section = f" (section '{prefix[:-1]}')" if prefix else ""
        raise ConfigError(f"invalid {cls.__name__}{section} in {where(prefix[:-1])}: {e}") from e


def from_dict(cls: type[C], data: Mapping[str, Any], source: str = "<dict>") -> C:
    """An instance of dataclass `cls` from (nested) `data`; `source` names it in errors."""
    _check_keys(cls, data, lambda key: source, _names(cls))
    return _build(cls, data, lambda key: source)


# ---- files and the command line -------------------------------------------------------------

class _SafeUniqueLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (where the last would silently win)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: merged keys may be overridden
                continue
            key = self.construct_object(key_node, deep=True)  # as PyYAML builds keys: whole
            if not isinstance(key, Hashable):  # `? [a, b]`: PyYAML's own check comes after ours
                raise yaml.constructor.ConstructorError(
                    None, None, f"a {'list' if isinstance(key, list) else 'mapping'} as a key ({_shown(key)}): "
                    "keys are names (write 'name: value')", key_node.start_mark)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice in one mapping",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_json_object(path: Path, expected: str, fix: str) -> dict:
    """The JSON object in file ``path`` (a run's small side file: meta.json, score_normalization.json), or a
    ConfigError naming the file (and the line and column of a syntax error) and saying ``fix``; ``expected`` says
    what the object should hold ("with 'mean' and 'std'")."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text; {fix}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}, line {e.lineno}, column {e.colno}: not valid JSON ({e.msg}); {fix}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object {expected}, got a {type(data).__name__}; {fix}")
    return data


def load_yaml(path: str | os.PathLike) -> dict:
    """The mapping in YAML file `path` (an empty file is {}). Uses the safe loader: tags such as
    `!!python/object` are refused, never executed; a key given twice in a mapping is refused."""
    try:
        data = yaml.load(Path(path).read_text(encoding="utf-8"), Loader=_SafeUniqueLoader)
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"cannot read config file {path}: not UTF-8 text (byte {e.start}: "
                          f"{e.object[e.start:e.start + 1]!r}); save it as UTF-8") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"cannot parse config file {path}{_yaml_problem(e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values, got {type(data).__name__}")
    return _undotted(data, path)


def _yaml_problem(e: yaml.YAMLError) -> str:
    """PyYAML's error on one line, placed by the file's line and column (its own text names "<unicode string>"
    and quotes the line on two more)."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    problem = getattr(e, "problem", None) or getattr(e, "context", None) or str(e)
    context, context_mark = getattr(e, "context", None), getattr(e, "context_mark", None)
    text = f", line {mark.line + 1}, column {mark.column + 1}: " if mark else ": "
    text += problem
    if context and context != problem:  # "while scanning a quoted scalar" from the line it started on
        text += f" ({context}" + (f" from line {context_mark.line + 1})" if context_mark else ")")
    return " ".join(text.split("\n"))


def _undotted(data: dict, path, prefix: str = "") -> dict:
    """``data`` with a dotted key (``model.path: x``, as the command line spells it) nested as its sections
    (``model: {path: x}``), at any depth; a setting given both ways is refused."""
    out: dict = {}
    for key, value in data.items():
        if isinstance(value, dict):
            value = _undotted(value, path, f"{prefix}{key}.")
        parts = key.split(".") if isinstance(key, str) else [key]
        for part in reversed(parts[1:]):
            value = {part: value}
        _merge_apart(out, {parts[0]: value}, path, prefix)
    return out


def _merge_apart(base: dict, over: dict, path, prefix: str) -> None:
    """Merge ``over`` into ``base`` in place, refusing a key both set (sections merge)."""
    for k, v in over.items():
        if k not in base:
            base[k] = v
        elif isinstance(base[k], dict) and isinstance(v, dict):
            _merge_apart(base[k], v, path, f"{prefix}{k}.")
        else:
            raise ConfigError(f"cannot parse config file {path}: '{prefix}{k}' is given twice (dotted and nested)")


def _merge(base: dict, over: Mapping) -> dict:
    """Deep-merge `over` into `base` in place (values in `over` win); returns `base`."""
    for k, v in over.items():
        if isinstance(base.get(k), dict) and isinstance(v, Mapping):
            _merge(base[k], v)
        else:
            base[k] = copy.deepcopy(v)
    return base


def set_dotted(d: dict, key: str, value: Any) -> dict:
    """Merge `value` into `d` at dotted `key` ("a.b.c" → d["a"]["b"]["c"]), making sections as needed."""
    for part in reversed(key.split(".")):
        value = {part: value}
    return _merge(d, value)


def parse_overrides(argv: list[str]) -> dict[str, str | list[str]]:
    """{"section.key": "raw string"} from `--key value`, `--section.key value`, `--key=value` and a
    bare `--flag` ("true"). Dashes in names read as underscores. A repeated flag gives the list of
    its values (``Repeated``): a list field's items, which may hold commas (`--prompt "Hi, you" --prompt Bye`);
    any other field takes the last."""
    out, i = {}, 0
    while i < len(argv):
        token = argv[i]
        name, eq, value = token[2:].partition("=")
        if not token.startswith("--") or not name:
            raise ConfigError(f"unexpected argument {token!r}: options are --key value, --section.key value "
                              "or --key=value")
        if not eq:
            has_value = i + 1 < len(argv) and not argv[i + 1].startswith("--")
            value = argv[i + 1] if has_value else "true"
            i += has_value
        name = name.replace("-", "_")
        if name in out:  # a repeated flag collects its values
            out[name] = Repeated([*(out[name] if isinstance(out[name], Repeated) else [out[name]]), value])
        else:
            out[name] = value
        i += 1
    return out


def parse_args(cls: type[C], argv: list[str] | None = None, prog: str = "rlhfkit <cmd>") -> C:
    """`cls` from `--config FILE.yaml` (read first) and `--key value` overrides (which win).
    `-h`/`--help` prints help_text and exits. `argv` defaults to sys.argv[1:]."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "-h" in argv or "--help" in argv:
        print(help_text(cls, prog))
        raise SystemExit(0)
    overrides = parse_overrides(argv)
    paths = overrides.pop("config", None)
    paths = [paths] if isinstance(paths, str) else paths or []  # several: merged in order, the later win
    data = {}
    for file in paths:
        loaded = load_yaml(file)
        _check_sections(cls, loaded, lambda key, file=file: str(file))  # before a flag or a later file merges in
        _merge(data, loaded)
    for key in overrides:  # `--lora true --lora.r 8`: the second would replace the first unseen
        parts = key.split(".")
        for outer in (".".join(parts[:i]) for i in range(1, len(parts))):
            if outer in overrides and _section_of(_type_at(cls, outer)):
                _convert(overrides[outer], _type_at(cls, outer), outer, lambda _: "the command line")
    path = ", ".join(paths)
    mappings = {f.name: tp for f, tp in _fields(cls) if dict in (typing.get_origin(tp), tp)}
    for key, value in overrides.items():
        if key in mappings and isinstance(data.get(key), Mapping):  # --columns a=b beside a file's columns: both
            value = {**data[key], **_convert(value, mappings[key], key, lambda _: "the command line")}
        set_dotted(data, key, value)

    def where(key: str) -> str:  # which of the file and the command line set `key` (or keys inside it)
        parts = key.split(".")
        if not path or any(".".join(parts[:i]) in overrides for i in range(1, len(parts) + 1)):
            return "the command line"
        inside = any(k.startswith(key + ".") for k in overrides) if key else bool(overrides)
        return f"{path} and the command line" if inside else str(path)

    _check_keys(cls, data, where, _names(cls))
    cfg = _build(cls, data, where)
    cfg.__dict__["_given"] = frozenset(_leaf_keys(data))  # what the user set, for defaults taken from elsewhere
    return cfg


def _leaf_keys(data: Mapping, prefix: str = "") -> list[str]:
    return [k for key, value in data.items()
            for k in (_leaf_keys(value, f"{prefix}{key}.") if isinstance(value, Mapping) else [prefix + key])]


def given_keys(cfg: Any) -> frozenset[str]:
    """The dotted keys of ``cfg`` a config file or the command line set (``parse_args``); none for a config
    built in Python."""
    return cfg.__dict__.get("_given", frozenset())


def _doc(cls: type) -> str:
    doc = (cls.__doc__ or "").strip()
    return "" if doc.startswith(cls.__name__ + "(") else (doc.splitlines() or [""])[0]  # skip dataclass's auto-doc


def _show(v: Any) -> str:
    if v is _MISSING:
        return "required"
    if v is None or isinstance(v, bool):
        return str(v).lower()  # as typed on the command line
    return repr(v) if isinstance(v, str) else str(v)


def help_text(cls: type, prog: str = "rlhfkit <cmd>") -> str:
    """Usage and every field of `cls` (sections as dotted names) with its type, default and help. A class
    attribute ``HELP`` (dotted name → text) words a shared section's field for this command; None leaves out
    one it does not read."""
    lines = [f"usage: {prog} [--config FILE.yaml] [--KEY VALUE | --SECTION.KEY=VALUE ...]", ""]
    if _doc(cls):
        lines += [_doc(cls), ""]
    lines += ["Options come from --config FILE.yaml first, then the command line (which wins). Dashes and",
              "underscores in names are the same; a bare --FLAG means true; 'none' means None; a list is a,b,c",
              "or the flag repeated.",
              "", "  --config FILE.yaml",
              "        YAML file of options (read with the safe loader); repeated, the files merge in order",
              "  -h, --help", "        show this message and exit"]

    own_help = getattr(cls, "HELP", {})  # dotted name → this command's help for a shared field; None: unread

    def section(c: type, prefix: str, title: str, defaults: Any) -> None:
        # `defaults` is the section's default instance: a parent may set `arg(Optim(lr=3e-5), ...)`
        fields = [(f, tp, getattr(defaults, f.name) if dataclasses.is_dataclass(defaults) else _default(f))
                  for f, tp in _fields(c) if own_help.get(prefix + f.name, "") is not None]
        rows = [(f, tp, v) for f, tp, v in fields if not _is_section(tp)]
        if rows:
            lines.extend(["", title])
        for f, tp, v in rows:
            # a command wording a shared field states its own bounds (rollouts: max_steps 1 or more, not >= 0)
            bounds = None if own_help.get(prefix + f.name) else f.metadata.get("bounds")
            lines.extend([f"  --{prefix}{f.name} {_type_name(tp)}  (default: {_show(v)}"
                          f"{'; ' + _rule(bounds) if bounds else ''})",
                          f"        {own_help.get(prefix + f.name) or f.metadata.get('help', '')}"])
        for f, tp, v in fields:
            if _is_section(tp):
                name = f"{prefix}{f.name}"
                section(tp, name + ".", f"{name}: {f.metadata.get('help') or _doc(tp)}", v)

    section(cls, "", "options:", _MISSING)
    return "\n".join(lines)


def _plain(x: Any) -> Any:
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {f.name: _plain(getattr(x, f.name)) for f in dataclasses.fields(x) if f.init}
    if isinstance(x, Mapping):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return os.fspath(x) if isinstance(x, os.PathLike) else x


def to_dict(cfg: Any) -> dict:
    """Dataclass `cfg` as plain nested dicts, lists and scalars (init fields only), for YAML and from_dict."""
    return _plain(cfg)


def save_config(cfg: Any, path: str | os.PathLike) -> Path:
    """Write the resolved `cfg` as YAML to `path` (beside a run's outputs); load_yaml + from_dict read it back."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return path


def columns_arg() -> Any:
    """The ``columns`` field of a command that reads data files: the file's column names for ours."""
    return arg({}, "your file's column for each of ours, e.g. prompt=question,completion=answer (YAML: a mapping); "
               "empty = the files use our names")


# ---------------------------------------------------------------------------------------------
# Sections shared by every command. Each command's own config (SFTConfig, ...) composes them.


@dataclasses.dataclass
class ModelConfig:
    """Which model to start from and how to load it."""

    path: str = arg("", "model directory or hub name, loaded with from_pretrained")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = arg(
        "auto", "weights dtype; auto = float32 on CPU (and on GPUs before Ampere); on a GPU with native bf16, frozen "
        "weights in bfloat16 and trained ones (and a reference beside a fully trained policy) in float32, computing "
        "in bf16 (mixed precision); float16 is refused for trained weights (no loss scaling)")
    trust_remote_code: bool = arg(False, "run modelling code shipped with the model (only for models you trust)")
    allow_pickle: bool = arg(False, "allow loading pickled .bin weights when no safetensors exist (unsafe)")
    chat_template: str = arg("", "the chat template for chat data, for a tokenizer without one (a base "
                             "model) or in place of its own: a Jinja file, or a model directory or hub name whose "
                             "tokenizer's template to take; saved with the trained model (TRL's chat_template_path)")

    def __post_init__(self) -> None:
        self.path = os.fspath(self.path)  # a pathlib.Path from Python, as a string
        if self.path.startswith("~"):  # a YAML value, or --model=~/...: no shell expanded it
            self.path = os.path.expanduser(self.path)


@dataclasses.dataclass
class LoraConfig:
    """LoRA adapters (peft). Off = full fine-tuning."""

    enabled: bool = arg(False, "train LoRA adapters instead of all weights")
    r: int = arg(16, "adapter rank", ge=1)
    alpha: int = arg(32, "scaling numerator (scale = alpha / r)", gt=0)
    dropout: float = arg(0.0, "dropout on the adapter input", ge=0, lt=1)
    target_modules: str | list[str] = arg("all-linear", "modules to adapt: 'all-linear' (not the output head), "
                                          "'all-linear+head', or module names (comma-separated, or a YAML list)")


@dataclasses.dataclass
class OptimConfig:
    """AdamW with linear warm-up then a cosine, linear or constant schedule."""

    lr: float = arg(2e-5, "peak learning rate", ge=0, lt=float("inf"))
    weight_decay: float = arg(0.0, "AdamW weight decay, on matrices only (biases and norm weights are not decayed)",
                              ge=0, lt=float("inf"))
    betas: list[float] = arg([0.9, 0.999], "AdamW betas (two)", ge=0, lt=1)
    warmup_steps: int = arg(10, "linear warm-up steps", ge=0)
    warmup_ratio: float = arg(0.0, "warm-up as a fraction of the run's updates (rounded up); > 0 replaces "
                              "warmup_steps", ge=0, lt=1)
    schedule: Literal["cosine", "linear", "constant"] = arg("cosine", "learning-rate schedule after warm-up: "
                                                            "cosine or linear decay, or constant")
    min_lr_ratio: float = arg(0.0, "where cosine and linear decay end, as a fraction of lr", ge=0, le=1)
    max_grad_norm: float = arg(1.0, "clip the global gradient norm to this (0 = no clipping)", ge=0,
                              lt=float("inf"))

    def __post_init__(self) -> None:
        if len(self.betas) != 2:
            raise ValueError(f"betas takes two values (beta1, beta2), got {list(self.betas)}")
        if self.min_lr_ratio and self.schedule == "constant":
            raise ValueError(f"min_lr_ratio {self.min_lr_ratio} is where a decay ends; the constant schedule has "
                             "none: choose schedule cosine or linear, or min_lr_ratio 0")


@dataclasses.dataclass
class TrainConfig:
    """How long to train, how often to log, evaluate and save."""

    out: str = arg("runs/out", "output directory (model, config, logs, checkpoints)")
    seed: int = arg(0, "random seed for initialisation, data order and sampling", **SEED_BOUNDS)
    batch_size: int = arg(32, "examples per optimiser step", ge=1)
    grad_accum: int = arg(1, "micro-batches per step (batch_size must divide by it)", ge=1)
    gradient_checkpointing: bool = arg(False, "recompute each layer's activations in the backward instead of "
                                       "keeping them from the forward: less memory for one more forward of the "
                                       "layers (transformers' checkpointing)")
    epochs: float = arg(1.0, "passes over the training data (ignored when max_steps > 0)", gt=0,
                        lt=float("inf"))
    max_steps: int = arg(0, "optimiser steps; 0 = derive from epochs", ge=0)
    log_every: int = arg(10, "log metrics every N steps", ge=1)
    eval_every: int = arg(0, "evaluate every N steps (0 = only at the end)", ge=0)
    save_every: int = arg(0, "write a checkpoint every N steps (0 = only the final model)", ge=0)
    keep_checkpoints: int = arg(2, "keep the newest N checkpoints", ge=1)
    on_nan: Literal["stop", "skip"] = arg("stop", "a NaN/inf loss or gradient: stop naming the step and the last "
                                          "checkpoint, or skip that update (counted in the logs)")
    resume: str = arg("", "resume from a checkpoint: 'latest' (newest under OUT/checkpoints), 'auto' (latest if "
                      "there is one, else start afresh: one command for a job that may be restarted) or its directory")
    overwrite_output_dir: bool = arg(False, "a fresh run (no resume) into an out directory that holds an earlier "
                                     "run's model or checkpoints replaces them (true) or refuses to start (false)")
    device: str = arg("auto", "auto, cpu, cuda, cuda:1, ...")
    fsdp: Literal["auto", "off", "full_shard", "shard_grad_op"] = arg(
        "auto", "shard weights, gradients and AdamW state over the processes (FSDP2; every trainer): "
        "full_shard ~ ZeRO-3, shard_grad_op ~ ZeRO-2; auto = as the accelerate launch config says, else off")
    deepspeed: Literal["auto", "off", "zero1", "zero2", "zero3"] = arg(
        "auto", "DeepSpeed ZeRO over the processes (sft, rm, dpo family; ppo mode separate and the "
        "online methods with lora.enabled false; pip install deepspeed): zero1 partitions AdamW's state, zero2 the "
        "gradients too, zero3 the weights too; auto = as the accelerate launch config says")
    dist_timeout: int = arg(1800, "seconds a process waits for the others at a collective before the run stops "
                            "(several processes; HF Trainer's ddp_timeout): process 0 saves checkpoints and "
                            "evaluates alone meanwhile, so raise it for large models", gt=0)
    tensorboard: bool = arg(True, "also write TensorBoard event files")
    wandb_project: str = arg("", "also log to Weights & Biases in this project ('' = off; pip install wandb; "
                             "WANDB_MODE=offline writes OUT/wandb without an account)")


@dataclasses.dataclass
class GenerationConfig:
    """Sampling settings (DESIGN.md §3: temperature 1, no top-k / top-p cut-off by default)."""

    max_new_tokens: int = arg(32, "tokens generated after the prompt at most", ge=1)
    temperature: float = arg(1.0, "softmax temperature; 0 = greedy", ge=0, lt=float("inf"))
    top_k: int = arg(0, "sample from the k most likely tokens (0 = all)", ge=0)
    top_p: float = arg(1.0, "nucleus sampling mass (1 = all)", gt=0, le=1)
    min_p: float = arg(0.0, "sample only tokens at least min_p times as likely as the most likely one (0 = all)",
                       ge=0, le=1)
    max_prompt_length: int = arg(0, "training prompts longer than this many tokens are dropped, and counted, "
                                 "before a rollout trainer starts (0 = keep all)", ge=0)
    batch_size: int = arg(64, "prompts per generation batch", ge=1)
    backend: Literal["auto", "loop", "hf"] = arg("auto", "sampler: our KV-cache loop (auto: where it is tested) or "
                                                 "Hugging Face generate; the same samples either way")

    @property
    def logprob_temperature(self) -> float:
        """The temperature log-probs are scored at to match the sampled distribution (greedy scores at 1)."""
        return self.temperature if self.temperature > 0 else 1.0
