"""Loading and saving Hugging Face models the safe way, with or without LoRA adapters.

Every trainer loads through here, with ``from_pretrained``, whether the path names a
tiny test model or a 7B checkpoint: nothing is special-cased. Safe defaults (DESIGN.md §5):
safetensors only unless ``allow_pickle``; ``trust_remote_code`` off unless asked for.
A directory holding a LoRA adapter (``adapter_config.json``) loads as base + adapter.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
import sys
import warnings
from pathlib import Path
from typing import Callable, ContextManager

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from rlhfkit import distributed, fsdp, zero
from rlhfkit.config import ConfigError, LoraConfig, ModelConfig

hf_logging.disable_progress_bar()  # one progress bar per stage is ours; no per-shard bars


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` → the first CUDA GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:  # "gpu", "cuda0", ...
        raise ConfigError(f"train.device {name!r} is not a device: use auto, cpu, cuda or cuda:N") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device {name!r}: this torch sees no CUDA GPU (torch {torch.__version__}); use "
                          "cpu, or auto")
    return device


def bf16_gpu(device: torch.device) -> bool:
    """A GPU that computes in bfloat16 natively (Ampere, compute capability 8.0, and later), where ``dtype: auto``
    means bf16 compute; a V100 or T4 emulates it slowly (torch's is_bf16_supported() says yes there)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


def resolve_dtype(name: str, device: torch.device, trainable: bool = False) -> torch.dtype:
    """The weights' dtype. ``auto`` on a bf16 GPU: bfloat16 for weights that stay frozen (a reference,
    a reward model, a LoRA base), float32 for weights the optimiser updates (bf16 mixed precision:
    they compute in bf16 under ``mixed_precision``; in pure bf16 small updates round away). ``auto``
    elsewhere: float32 (bf16 is slow on CPUs). A named dtype is taken as it is, except float16 for trained
    weights: without loss scaling, which rlhfkit does not do, their small gradients underflow."""
    if name == "float16" and trainable:
        raise ConfigError("model.dtype float16 for weights that are trained in full: float16 training needs loss "
                          "scaling, which rlhfkit does not do; use bfloat16, auto (bf16 mixed precision on a GPU "
                          "that has it) or float32")
    if name == "auto":
        return torch.bfloat16 if bf16_gpu(device) and not trainable else torch.float32
    return getattr(torch, name)


def mixed_precision(name: str, device: torch.device) -> Callable[[], ContextManager]:
    """A context factory for the forwards of a run whose model dtype is ``name``: autocast to bfloat16
    where ``auto`` resolves to bf16 compute (a bf16 GPU), nothing elsewhere or for a named dtype."""
    if name == "auto" and bf16_gpu(device):
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def check_weights_format(path: str, allow_pickle: bool) -> None:
    """Refuse pickled weights in a local directory unless the user opted in."""
    p = Path(path)
    if not p.is_dir() or allow_pickle:
        return
    names = {f.name for f in p.iterdir()}
    has_safe = any(n.endswith(".safetensors") or n.endswith(".safetensors.index.json") for n in names)
    has_pickle = any(n.endswith(".bin") or n.endswith(".pt") for n in names)
    if has_pickle and not has_safe:
        raise ValueError(f"{path} holds only pickled weights (.bin), which can run code when loaded; "
                         "convert them to safetensors, or set model.allow_pickle: true if you trust the file")


def check_model_path(path: str, what: str = "model") -> None:
    """A clear error for a model path that names nothing: empty; a local path (absolute, relative with ./ or
    ../, or with more than one /, or in a folder holding rlhfkit runs) that does not exist; a directory that is no
    saved model. A hub name (``org/name``) not found locally goes to ``from_pretrained`` as it is."""
    if not path:
        raise ConfigError(f"no {what} given: pass --model DIR (a Hugging Face directory or hub name)")
    p = Path(path).expanduser()
    if p.is_dir() and (p / VALUE_HEAD_FILE).is_file():
        raise ConfigError(f"{path} is PPO's critic (an adapter and a value head): it scores states and writes no "
                          f"text; give the actor's directory, {p.parent}")
    if p.is_dir():
        if not (p / "config.json").is_file() and not is_adapter_dir(p):
            raise ConfigError(f"{path} is not a saved {what}: a Hugging Face model directory holds config.json "
                              "(a LoRA adapter directory, adapter_config.json)")
    elif p.exists():
        raise ConfigError(f"{what} {path} is a file: give the directory that holds it")
    elif (path.startswith(("/", "./", "../", "~")) or path.count("/") > 1 or os.sep != "/" and os.sep in path
          or "/" in path and any(p.parent.glob("*/rlhfkit_config.yaml"))):  # runs/my-sfft: a typo in a runs folder
        raise ConfigError(f"{what} directory {path} does not exist")
    elif "/" in path and p.parent.is_dir():  # a hub organisation, or a typo: say which before the hub is asked
        _note_hub_name(path, str(p.parent))


@contextlib.contextmanager
def loading(path: str, what: str = "model"):
    """``from_pretrained``'s OSError for ``path`` (a hub name not found or not reachable, a directory without
    weights or tokenizer files) as a ConfigError naming ``what`` and the path: one line, not a traceback from
    inside transformers."""
    try:
        yield
    except OSError as e:
        raise ConfigError(f"could not load the {what} {path}: {' '.join(str(e).split()) or type(e).__name__}") from e


@functools.cache  # once per name: a run checks its model path at each load (config, tokenizer, weights)
def _note_hub_name(path: str, folder: str) -> None:
    print(f"{path} is not a directory here (though {folder} is): trying it as a hub name", file=sys.stderr)


VALUE_HEAD_FILE = "value_head.safetensors"  # beside PPO's critic adapter (roles)
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
# a full model's files (its weights in one file or shards): what transformers loads from a directory that has them
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
               "model-*-of-*.safetensors", "pytorch_model.bin", "pytorch_model.bin.index.json",
               "pytorch_model-*-of-*.bin")


def is_adapter_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def saved_config(path: str | os.PathLike) -> dict:
    """A local model directory's own config: ``adapter_config.json`` for a LoRA adapter, else ``config.json``."""
    return json.loads((Path(path) / ("adapter_config.json" if is_adapter_dir(path) else "config.json")).read_text())


def adapter_base(path: str | os.PathLike) -> str:
    """The base model a LoRA adapter directory was trained on (its ``base_model_name_or_path``). A local base
    that is no longer where the adapter recorded it (an absolute path, as rlhfkit saves it) is a ConfigError
    saying how to point the adapter at it."""
    base = saved_config(path)["base_model_name_or_path"]
    if base and Path(base).is_absolute() and not Path(base).exists():
        raise ConfigError(f"the base model of the adapter {path}, {base}, is not there any more: put it back, or set "
                          f"base_model_name_or_path in {Path(path) / 'adapter_config.json'} to where it is now (a "
                          "directory or hub name)")
    return base


def is_classifier_dir(path: str | os.PathLike) -> bool:
    """Whether the local model directory ``path`` holds a sequence classifier (a reward model): its config names
    a ``*ForSequenceClassification`` architecture, or it is a LoRA adapter trained as one (task type SEQ_CLS,
    which saves the score head beside it)."""
    config = saved_config(path)
    if is_adapter_dir(path):
        return config.get("task_type") == "SEQ_CLS"
    return any(a.endswith("ForSequenceClassification") for a in config.get("architectures") or [])


def position_limit(cfg: ModelConfig) -> int | None:
    """How many positions the model ``cfg.path`` (an adapter's base) has, from its config
    (``max_position_embeddings``, GPT-2's ``n_positions``); None when it does not say."""
    from transformers import AutoConfig

    check_model_path(cfg.path)
    path = adapter_base(cfg.path) if is_adapter_dir(cfg.path) else cfg.path
    with loading(path, "model config"):
        config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code).get_text_config()
    limits = [getattr(config, name, None) for name in ("max_position_embeddings", "n_positions")]
    limit = next((n for n in limits if isinstance(n, int) and n > 0), None)
    scaling = getattr(config, "rope_scaling", None) or getattr(config, "rope_parameters", None) or {}
    factor = scaling.get("factor") if scaling.get("rope_type", scaling.get("type")) not in (None, "default") else None
    original = scaling.get("original_max_position_embeddings")
    if limit and factor and factor > 1 and (not original or original >= limit):  # not already stretched (Llama 3.1)
        limit = int(limit * factor)  # positions stretched by a RoPE scaling (linear, dynamic, YaRN) the config asks for
    return limit


def check_max_length(cfg: ModelConfig, max_length: int) -> None:
    """ConfigError when ``max_length`` tokens are more than the model has positions for (an embedding lookup
    past its table fails mid-run; rotary models drift out of what they were trained on)."""
    limit = position_limit(cfg)
    if limit and max_length > limit:
        raise ConfigError(f"max_length {max_length} is over the {limit} positions {cfg.path} has (its config's "
                          f"max_position_embeddings): set --max_length {limit} or less")


def prompt_room(cfg: ModelConfig, max_new_tokens: int) -> int | None:
    """The prompt tokens the model ``cfg.path`` has positions for beside ``max_new_tokens`` sampled ones and the
    EOS a scorer appends to a row cut off at that length (None when its config does not say)."""
    limit = position_limit(cfg)
    if limit is not None and max_new_tokens + 1 >= limit:
        raise ConfigError(f"generation.max_new_tokens {max_new_tokens} leaves no room for a prompt in the {limit} "
                          f"positions {cfg.path} has: set it lower")
    return None if limit is None else limit - max_new_tokens - 1


SAMPLING_FIELDS = ("temperature", "top_k", "top_p", "min_p")


def model_sampling(path: str) -> dict:
    """How a local model directory's ``generation_config.json`` (an adapter's own, else its base's) says to sample,
    as GenerationConfig fields: ``do_sample`` false is greedy (temperature 0); true, the temperature, top_k, top_p
    and min_p it names. {} where it does not say ``do_sample`` (or names no file), as Hugging Face's generate then
    decodes greedily whatever else it names, a default rlhfkit does not take."""
    folder = Path(path)
    if is_adapter_dir(folder) and not (folder / "generation_config.json").is_file():
        folder = Path(adapter_base(folder))
    file = folder / "generation_config.json"
    if not file.is_file():
        return {}
    try:
        saved = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if saved.get("do_sample") is False:
        return {"temperature": 0.0}
    if saved.get("do_sample") is not True:
        return {}
    picked = {k: saved[k] for k in SAMPLING_FIELDS if isinstance(saved.get(k), (int, float))}
    return {k: v for k, v in picked.items() if not (k == "top_k" and v < 0) and not (k == "top_p" and not 0 < v <= 1)}


def refuse_adapter_dir(path: str, starts_from: str) -> None:
    """ConfigError when ``path`` is a LoRA adapter directory where a full model is wanted (``starts_from``
    says what starts from it): peft would wrap the adapter in a second one, or train nothing."""
    if is_adapter_dir(path):
        raise ConfigError(f"{path} is a LoRA adapter directory: {starts_from} starts from a full model; merge it "
                          f"first (rlhfkit export --model {path} --out DIR) and pass DIR")


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """The model's tokenizer, with a pad token (EOS when the model has none). A LoRA adapter directory saved
    without tokenizer files (peft's own save_pretrained writes none) takes its base model's."""
    check_model_path(path)
    if is_adapter_dir(path) and not has_tokenizer_files(path):
        path = absolute_if_local(adapter_base(path))
    with loading(path, "tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tokenizer_of(cfg: ModelConfig):
    """The tokenizer of the model ``cfg`` names (``load_tokenizer``), with ``cfg.chat_template`` when it gives one."""
    tokenizer = load_tokenizer(cfg.path, cfg.trust_remote_code)
    if cfg.chat_template:
        set_chat_template(tokenizer, cfg.chat_template, cfg.trust_remote_code)
    return tokenizer


def set_chat_template(tokenizer, spec: str, trust_remote_code: bool = False) -> None:
    """Give ``tokenizer`` the chat template ``model.chat_template`` names: a Jinja file's text, or the template of
    the tokenizer of a model directory or hub name. A token it writes in the ``<|...|>`` form that the tokenizer
    lacks is spelt out in several tokens: a warning says so."""
    path = Path(spec).expanduser()
    if path.is_file():
        try:
            template = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read --model.chat_template {spec}: {e}") from e
    elif path.suffix in (".jinja", ".j2", ".txt"):
        raise ConfigError(f"--model.chat_template {spec}: no such file")
    else:
        template = getattr(load_tokenizer(str(path) if spec.startswith("~") else spec, trust_remote_code),
                           "chat_template", None)
        if isinstance(template, dict):  # named templates: the default one
            template = template.get("default")
        if not template:
            raise ConfigError(f"--model.chat_template {spec}: its tokenizer has no chat template; give a Jinja file, "
                              "or a model whose tokenizer has one")
    missing = sorted({t for t in re.findall(r"<\|[^|<>\s]+\|>", template) if t not in tokenizer.get_vocab()})
    if missing:
        warnings.warn(f"the chat template writes {', '.join(missing[:3])}, which the tokenizer has no token for: each "
                      "is spelt out in several tokens; choose a template of tokens the model has, or add them to its "
                      "tokenizer as special tokens (and resize its embeddings) first", stacklevel=2)
    tokenizer.chat_template = template


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def has_tokenizer_files(path: str | os.PathLike) -> bool:
    """Whether the local directory ``path`` holds a tokenizer's files."""
    return any((Path(path) / name).exists() for name in TOKENIZER_FILES)


def check_same_tokenizer(tokenizer, path: str, what: str, fix: str, trust_remote_code: bool = False) -> None:
    """Refuse ``what`` at ``path`` when its tokenizer's vocabulary is not ``tokenizer``'s: a model that reads
    another model's token ids (PPO's critic reads the policy's samples) would read other words, or ids past its
    embeddings. A local directory without tokenizer files is not checked."""
    if Path(path).is_dir() and not has_tokenizer_files(path):
        return
    other = load_tokenizer(path, trust_remote_code)
    if other.get_vocab() != tokenizer.get_vocab():
        raise ConfigError(f"{what} {path} has another tokenizer than the policy's ({len(other)} tokens against "
                          f"{len(tokenizer)}): it would read the policy's token ids as other words. {fix}")


def absolute_if_local(path: str) -> str:
    """A local directory as an absolute path (what an adapter saved on top of it records as its base,
    so it loads from any working directory); a hub name unchanged."""
    return str(Path(path).resolve()) if Path(path).is_dir() else path


def refuse_classifier(path: str) -> None:
    """ConfigError when the local directory ``path`` holds a sequence classifier (a reward model, or a LoRA one):
    loaded as a causal LM it would get a random output head and write noise."""
    if Path(path).is_dir() and is_classifier_dir(path):
        raise ConfigError(f"{path} is a reward model (a sequence classifier): it scores text and has no language-model "
                          "head to write with; pass a causal LM (the SFT or policy model)")


def load_causal_lm(cfg: ModelConfig, device: torch.device | None = None, trainable: bool = False):
    """A causal LM from ``cfg.path``; an adapter directory gives base + adapter (peft). ``trainable``:
    its own weights will be trained (full fine-tuning), which ``dtype: auto`` keeps in float32."""
    check_model_path(cfg.path)
    refuse_classifier(cfg.path)
    device = device or resolve_device()
    dtype = resolve_dtype(cfg.dtype, device, trainable)
    kwargs = dict(dtype=dtype, trust_remote_code=cfg.trust_remote_code, use_safetensors=not cfg.allow_pickle or None)
    if is_adapter_dir(cfg.path):
        from peft import PeftModel

        from rlhfkit.models.lora import lean_lora, peft_quietly

        base_path = adapter_base(cfg.path)
        check_weights_format(cfg.path, cfg.allow_pickle)  # the adapter's own weights, then its base's
        check_weights_format(base_path, cfg.allow_pickle)
        with loading(base_path, f"base model of the adapter {cfg.path}:"):
            base = AutoModelForCausalLM.from_pretrained(base_path, **kwargs)
        with peft_quietly(), loading(cfg.path, "adapter"):
            model = lean_lora(PeftModel.from_pretrained(base, cfg.path, is_trainable=False))
    else:
        check_weights_format(cfg.path, cfg.allow_pickle)
        with loading(cfg.path):
            model = AutoModelForCausalLM.from_pretrained(absolute_if_local(cfg.path), **kwargs)
    from rlhfkit.models.forward import backbone_and_head

    model = model.to(device)
    backbone_and_head(model)  # its logits probed now, before any sharding, for the head-only log-prob paths
    return model


def checkpoint_activations(model) -> None:
    """Gradient checkpointing (``train.gradient_checkpointing``): each of ``model``'s layers (a peft model's base's)
    keeps its input only and runs its forward again in the backward (transformers' checkpointing, non-reentrant:
    frozen inputs need no gradient, so LoRA works as it is). Active where a layer is in training mode with
    gradients on: see ``learn_mode``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise ConfigError(f"{type(base).__name__} does not support gradient checkpointing in transformers: set "
                          "train.gradient_checkpointing false")
    kwargs = {"use_reentrant": False}
    if hasattr(base, "activation_checkpointing_enable"):  # transformers ≥ 5.2x's name; 5.17 has only the old one
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def learn_mode(model, dropout: bool) -> None:
    """``model.train(dropout)``, its checkpointed layers (``checkpoint_activations``) in training mode either way:
    transformers checkpoints a layer only then, and the DPO family and the rollout trainers learn in eval mode
    (no dropout), which the layers' own dropout modules keep. A later ``eval()`` (an evaluation, sampling) turns
    checkpointing off with the rest."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    model.train(dropout)
    if not dropout:
        for module in model.modules():
            if isinstance(module, GradientCheckpointingLayer) and module.gradient_checkpointing:
                module.training = True


@contextlib.contextmanager
def eval_mode(model):
    """``model`` in eval mode (no dropout) inside, each module's mode restored as it was after (``learn_mode``
    leaves checkpointed layers in training mode under an eval-mode model)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, mode in modes:
            m.training = mode


def lora_targets(model, spec: str | list[str]):
    """peft ``target_modules`` from our spelling: 'all-linear' (peft's: every linear layer but
    the output head), 'all-linear+head' (the output head too), or 'a,b,c' / [a, b, c] (module names)."""
    if isinstance(spec, list):
        return [name.strip() for name in spec]
    if spec == "all-linear":
        return spec
    if spec == "all-linear+head":
        from transformers.pytorch_utils import Conv1D

        return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                       if isinstance(m, (torch.nn.Linear, Conv1D)) and "score" not in name})
    return [name.strip() for name in spec.split(",")]


def peft_lora_config(cfg: LoraConfig, model, task_type: str = "CAUSAL_LM"):
    """Our LoRA section as a peft ``LoraConfig`` for ``model``."""
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                          target_modules=lora_targets(model, cfg.target_modules), task_type=task_type)


def add_lora(model, cfg: LoraConfig, adapter_name: str = "default", task_type: str = "CAUSAL_LM",
             float32: bool = False):
    """Wrap ``model`` with a fresh trainable LoRA adapter (base weights frozen).

    With ``task_type="SEQ_CLS"`` peft also trains and saves the score head. ``float32``: every
    trainable weight in float32 (mixed precision on a bf16 base; peft upcasts the adapters only)."""
    from peft import get_peft_model

    from rlhfkit.models.lora import lean_lora, peft_quietly

    with peft_quietly():
        model = lean_lora(get_peft_model(model, peft_lora_config(cfg, model, task_type), adapter_name=adapter_name))
    if float32:
        for p in model.parameters():
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()
    return model


def saved_keys(model) -> set[str] | None:
    """The state-dict entries a peft model's ``save_pretrained`` writes (every adapter's weights, and the
    embedding layers an adapter on them brings), picked by peft's own selection from the tensors as they are,
    nothing gathered; None for a model that is not peft's, or when peft's selection makes tensors of its own."""
    if not hasattr(model, "peft_config"):
        return None
    from peft.utils.save_and_load import get_peft_model_state_dict

    state = model.state_dict()
    source = {id(v): k for k, v in state.items()}
    picked = [v for name in trained_adapters(model) for v in get_peft_model_state_dict(
        model, state_dict=state, adapter_name=name, save_embedding_layers=False).values()]
    return {source[id(v)] for v in picked} if all(id(v) in source for v in picked) else None


def trained_adapters(model) -> list[str]:
    """A peft model's adapters that were trained: not one loaded frozen (PPO's reward adapter on the shared base,
    the reward model's own adapter, which PPO reads and does not change); every adapter when none was trained."""
    trained = [name for name, config in model.peft_config.items() if not config.inference_mode]
    return trained or list(model.peft_config)


def adapter_saving(model) -> dict:
    """``save_pretrained``'s options for ``model``: for a peft model, its trained adapters alone (a frozen one
    re-saved beside them lacked its score head: OUT/reward was a reward model no command could load), and not
    the frozen layers an adapter on the output head brings (all-linear+head: peft saved the head, vocab x hidden,
    GBs for a large vocabulary, in every adapter and checkpoint; the base holds it, unchanged, and loads it)."""
    if not hasattr(model, "peft_config"):
        return {}
    return {"save_embedding_layers": False, "selected_adapters": trained_adapters(model)}


def save_model(model, tokenizer, out: str | os.PathLike) -> Path:
    """Write a standard HF directory (safetensors): full weights, or the adapter for peft models.
    In a multi-process run only rank 0 writes; a sharded or ZeRO-3 model is gathered by every process first
    (of a sharded peft model, what its adapter directory holds: not the frozen base).

    Every file is written whole before it takes its name: the save goes to ``out/.tmp-model``, flushed to the
    disk, then each file is renamed into place, so a run stopped while saving never leaves a truncated file (its
    checkpoints resume it; the disk holds the earlier files and the new ones until then). Before the configs,
    renamed last, the model and adapter files of an earlier save that this one did not write go: an earlier
    run's adapter there would be loaded instead of these weights, its full model loaded under this adapter, a
    shard of a larger model left beside these."""
    from rlhfkit.trainers.checkpoint import fsync, fsync_tree

    out = Path(out)
    if fsdp.is_sharded(model):  # collectives: every process gathers
        full = {"state_dict": fsdp.full_state_dict(model, saved_keys(model))}
    else:
        full = {"state_dict": zero.full_state_dict(model)} if zero.partitioned(model) else {}
    if not distributed.is_main():
        return out
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".tmp-model"
    shutil.rmtree(tmp, ignore_errors=True)  # a save cut short
    try:
        model.save_pretrained(tmp, safe_serialization=True, **full, **adapter_saving(model))
        tokenizer.save_pretrained(tmp)
        fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # not GBs of a failed save left in OUT
        raise
    written = {p.relative_to(tmp) for p in tmp.rglob("*") if p.is_file()}

    def move(names) -> None:
        for name in sorted(names, key=str):
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp / name, out / name)

    configs = {name for name in written if name.name.endswith("config.json")}
    move(written - configs)  # the weights and the tokenizer: the earlier configs still name the earlier layout
    # peft writes an adapter other than the default one into its own folder (PPO's critic in OUT/critic); one it
    # does not save (a frozen reward adapter) keeps its folder as it is: it may be the reward model the run reads
    saved = trained_adapters(model) if hasattr(model, "peft_config") else []
    folders = [out, *(out / name for name in saved if name != "default")]
    for folder in folders:
        for pattern in MODEL_FILES + ADAPTER_FILES:
            for stale in folder.glob(pattern):
                if stale.relative_to(out) not in written:
                    stale.unlink()
        card = folder / "README.md"  # the model card peft wrote for an earlier adapter here: "library_name: peft"
        if card.relative_to(out) not in written and card.is_file() and "library_name: peft" in card.read_text(
                encoding="utf-8", errors="replace")[:2000]:
            card.unlink()
    move(configs)  # last: a directory whose configs are new holds every new file and none of the earlier ones
    for folder in {out / name.parent for name in written}:
        fsync(folder)  # the renames and removals
    shutil.rmtree(tmp, ignore_errors=True)
    if hasattr(model, "peft_config"):
        write_adapter_cards(model, out)
    return out


def write_adapter_cards(model, out: Path) -> None:
    """A README.md beside each adapter a peft ``model`` saves in ``out`` (the default one there, another in its
    folder), in place of peft's empty template: what it is, how plain peft loads it, and how to merge it."""
    hf = model.get_base_model()
    head = hf.get_output_embeddings()
    head_name = next((n for n, m in hf.named_modules() if m is head), "lm_head").rsplit(".", 1)[-1]
    tied = bool(getattr(hf.config.get_text_config(), "tie_word_embeddings", False))
    for name in trained_adapters(model):
        config, folder = model.peft_config[name], out if name == "default" else out / name
        base = config.base_model_name_or_path
        targets = config.target_modules if isinstance(config.target_modules, (set, list, tuple)) else []
        if name == "critic":
            what = ("PPO's critic: this adapter on the base, with value_head.safetensors beside it, a "
                    "Linear(hidden, 1) read at each position's last hidden state (the value of the text so far). It "
                    "writes no text; rlhfkit reads it when a PPO run resumes.")
            load = merge = ""
        else:
            seq_cls = str(config.task_type).endswith("SEQ_CLS")
            cls = "AutoPeftModelForSequenceClassification" if seq_cls else "AutoPeftModelForCausalLM"
            what = ("A reward model: a sequence classifier with one output, the score read at the last token (rlhfkit "
                    "standardises it as a score_normalization.json beside it says: (score - mean) / std)."
                    if seq_cls else "A causal LM.")
            load = (f"\n\nWith peft: `{cls}.from_pretrained(\"{folder}\"{', num_labels=1' if seq_cls else ''})`.")
            merge = f"\n\nA standalone model: `rlhfkit export --model {folder} --out MERGED`."
            if tied and head_name in targets:
                merge += (f" Its LoRA adapts the output head ({head_name}), which this base ties to the input "
                          "embeddings: peft's `merge_and_unload()` would change the input embeddings with it, "
                          "where `rlhfkit export` unties them first.")
        card = (f"---\nbase_model: {base}\nlibrary_name: peft\ntags:\n- rlhfkit\n- lora\n---\n\n"
                f"# A LoRA adapter trained with rlhfkit\n\n{what} Base model: `{base}`.{load}{merge}\n")
        write_atomically(folder / "README.md", lambda path, text=card: path.write_text(text, encoding="utf-8"))


def write_atomically(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` into a temporary file beside ``path``, flushed to the disk, then renamed to ``path``: a
    stop while writing never leaves a truncated file under that name."""
    from rlhfkit.trainers.checkpoint import fsync

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        fsync(tmp)
        os.replace(tmp, path)
        fsync(path.parent)  # the rename too
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def base_dtype(path: str) -> torch.dtype:
    """The dtype a LoRA adapter's base model was saved in (its config's ``dtype``; float32 when it names none)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(absolute_if_local(adapter_base(path)))
    saved = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(saved, str):
        saved = getattr(torch, saved, None)
    return saved if isinstance(saved, torch.dtype) and saved.is_floating_point else torch.float32


def merge_adapters(path: str, out: str, allow_pickle: bool = False, dtype: str = "auto") -> Path:
    """Merge a LoRA adapter directory into its base: a standalone directory without peft. The merge is computed in
    float32; the merged weights are saved in ``dtype`` (auto: the base's own, as peft's merge_and_unload keeps it,
    not twice its size in float32)."""
    if not Path(path).exists():
        raise ValueError(f"{path} does not exist: export merges a local LoRA adapter directory")
    if not is_adapter_dir(path):
        raise ValueError(f"{path} holds no LoRA adapter (no adapter_config.json); nothing to merge")
    target = base_dtype(path) if dtype == "auto" else getattr(torch, dtype)
    if is_classifier_dir(path):
        return _merge_reward_adapter(path, out, allow_pickle, target)
    model = load_causal_lm(ModelConfig(path=path, dtype="float32", allow_pickle=allow_pickle), torch.device("cpu"))
    base = model.get_base_model()
    output, inputs = base.get_output_embeddings(), base.get_input_embeddings()
    tied = output is not None and getattr(output, "base_layer", output).weight is inputs.weight
    if tied and hasattr(output, "base_layer"):
        # the adapter changes the output head only: untie it so merging leaves the input embeddings alone
        output.base_layer.weight = torch.nn.Parameter(inputs.weight.detach().clone())
        base.config.tie_word_embeddings = False
        base.config.get_text_config().tie_word_embeddings = False
    merged = model.merge_and_unload().to(target)
    return save_model(merged, load_tokenizer(path), out)


def _merge_reward_adapter(path: str, out: str, allow_pickle: bool, dtype: torch.dtype) -> Path:
    """``merge_adapters`` for a LoRA reward model: a sequence classifier with its trained score head, and the
    score normalisation it was saved with."""
    from rlhfkit.models.reward import NORMALIZATION_FILE, load_reward_backbone

    merged = load_reward_backbone(ModelConfig(path=path, dtype="float32", allow_pickle=allow_pickle),
                                  torch.device("cpu"), trainable=True).to(dtype)  # trainable: the adapter merged in
    tokenizer = load_tokenizer(path)
    merged.config.pad_token_id = tokenizer.pad_token_id  # as `rm` sets it: transformers pads a batch with it
    saved = save_model(merged, tokenizer, out)
    if (Path(path) / NORMALIZATION_FILE).is_file():
        write_atomically(saved / NORMALIZATION_FILE, lambda tmp: shutil.copyfile(Path(path) / NORMALIZATION_FILE, tmp))
    return saved
