"""Reward models: a score head (hidden → 1) read at each sequence's last real token.

A reward model is an ``AutoModelForSequenceClassification`` with one label, so what we
save loads anywhere with ``from_pretrained``. We pool ourselves instead of relying on the
pad token id (which some models share with EOS): the score is read at the last position
of the attention mask, whatever the padding side. Shapes: B batch, T sequence, H hidden.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification

from rlhfkit.config import ConfigError, ModelConfig, load_json_object
from rlhfkit.data.collate import collate, encode_reply
from rlhfkit.fsdp import run_as_forward
from rlhfkit.models.forward import backbone_hidden, prompt_width
from rlhfkit.models.load import (absolute_if_local, adapter_base, check_model_path, check_weights_format,
                                 is_adapter_dir, is_classifier_dir, load_tokenizer, loading, position_limit,
                                 resolve_device, resolve_dtype, saved_config)
from rlhfkit.ops import scalar_head

NORMALIZATION_FILE = "score_normalization.json"
IDENTITY = {"mean": 0.0, "std": 1.0}


def score_normalization(path: str | Path) -> dict | None:
    """The score mean and std a reward-model directory was saved with (``rlhfkit rm --normalize``), or None.
    ConfigError naming the file and the field where it cannot be read, or holds no finite mean and positive std
    (a hand-edited or damaged file had failed with a KeyError, or a JSON error naming no file)."""
    norm = Path(path) / NORMALIZATION_FILE
    if not norm.is_file():
        return None
    fix = "`rlhfkit rm` writes it (the training scores' mean and std): train the reward model again, or delete it"
    stats = load_json_object(norm, "with 'mean' and 'std'", fix)
    for key in ("mean", "std"):
        value = stats.get(key)
        number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not number or key == "std" and value <= 0:
            got = f"got {value!r:.80}" if key in stats else "it has none"
            raise ConfigError(f"{norm}: '{key}' must be a finite number{' above 0' if key == 'std' else ''}, {got}; "
                              f"{fix}")
    return stats


def _hf_model(model):
    """The transformers model inside a peft wrapper (LoRA layers still active), or the model."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last 1 in each row: (B, T) → (B,). Works for left and right padding."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.long() * positions).argmax(-1)


def sequence_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, prefix_width: int = 0
                    ) -> torch.Tensor:
    """Score of each sequence, read at its last real token: (B, T), (B, T) → (B,) float32.

    Rows equal on their first ``prefix_width`` columns (a pair's prompt) run those columns once."""
    hf = _hf_model(model)
    # the body and the score head are called, not the model: under FSDP the call still counts as its forward
    return run_as_forward(model, _scores, getattr(hf, hf.base_model_prefix), hf.score, input_ids, attention_mask,
                          prefix_width)


def _scores(backbone, score, input_ids: torch.Tensor, attention_mask: torch.Tensor, prefix_width: int
            ) -> torch.Tensor:
    """``sequence_scores`` from the body and the score head: (B, T), (B, T) → (B,) float32."""
    hidden = backbone_hidden(backbone, input_ids, attention_mask, prefix_width)  # (B, T, H)
    last = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_token_index(attention_mask)]  # (B, H)
    return scalar_head(score, last).squeeze(-1).float()


def packed_sequence_scores(model, input_ids: torch.Tensor, position_ids: torch.Tensor, sequence_ids: torch.Tensor
                           ) -> torch.Tensor:
    """Score of each of N sequences packed end to end in R rows (``collate.pack``: positions restarting at 0 with
    each, no attention mask; ``sequence_ids`` -1 on padding), read at each one's last token: (R, L) each → (N,)
    float32, in the sequences' own order."""
    from rlhfkit.models.forward import _quiet_about_the_missing_attention_mask

    _quiet_about_the_missing_attention_mask()
    return run_as_forward(model, _packed_scores, reward_backbone(model), _hf_model(model).score, input_ids,
                          position_ids, sequence_ids)


def _packed_scores(backbone, score, input_ids: torch.Tensor, position_ids: torch.Tensor, sequence_ids: torch.Tensor
                   ) -> torch.Tensor:
    hidden = backbone(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state  # (R, L, H)
    owner = sequence_ids.reshape(-1)  # (R L,)
    kept = owner >= 0
    places = torch.arange(owner.numel(), device=owner.device)
    last = torch.zeros(int(owner.max()) + 1, dtype=torch.long, device=owner.device)
    last = last.scatter_reduce(0, owner[kept], places[kept], reduce="amax")  # (N,) each one's last place
    return scalar_head(score, hidden.reshape(-1, hidden.shape[-1])[last]).squeeze(-1).float()


def reward_backbone(model):
    """The body of a reward model (its LoRA layers active): what runs before the score head."""
    hf = _hf_model(model)
    return getattr(hf, hf.base_model_prefix)


def check_reward_dir(path: str) -> None:
    """ConfigError unless the local directory ``path`` holds a trained reward model: a sequence classifier
    (``architectures`` in its config), or a LoRA adapter trained as one (task type SEQ_CLS, which saves the
    score head beside it). A causal LM loaded as a classifier gets a random score head, and scores noise."""
    check_model_path(path, "reward model")
    p = Path(path)
    if p.is_dir() and p.name == "critic" and (p.parent / "rlhfkit_config.yaml").is_file():
        raise ConfigError(f"{path} is PPO's critic: a value model trained to predict returns from each token, not "
                          "a reward model, though it is saved as a classifier; pass the reward model the run read "
                          f"(reward_model in {p.parent / 'rlhfkit_config.yaml'})")
    if not p.is_dir() or is_classifier_dir(path):  # a hub name: not known before it is downloaded
        return
    config = saved_config(path)
    what = (f"a LoRA adapter of task type {config.get('task_type')}" if is_adapter_dir(path)
            else f"a {', '.join(config.get('architectures') or ['model'])}")
    raise ConfigError(f"{path} is not a reward model: it is {what}, without a trained score head, so its scores "
                      "would be a random head's. Train one with `rlhfkit rm --model MODEL --data PAIRS --out DIR` "
                      "and pass DIR")


def load_reward_backbone(cfg: ModelConfig, device: torch.device, trainable: bool = False):
    """A one-label sequence classifier from a causal-LM or reward-model directory (or adapter);
    ``trainable`` as in ``load_causal_lm``."""
    check_model_path(cfg.path, "reward model")
    kwargs = dict(num_labels=1, dtype=resolve_dtype(cfg.dtype, device, trainable),
                  trust_remote_code=cfg.trust_remote_code, use_safetensors=not cfg.allow_pickle or None)
    if is_adapter_dir(cfg.path):
        from peft import PeftModel

        from rlhfkit.models.lora import lean_lora, peft_quietly

        base = adapter_base(cfg.path)
        check_weights_format(cfg.path, cfg.allow_pickle)  # the adapter's own weights, then its base's
        check_weights_format(base, cfg.allow_pickle)
        with loading(base, f"base model of the adapter {cfg.path}:"), _new_score_head_quietly(base):
            backbone = AutoModelForSequenceClassification.from_pretrained(base, **kwargs)
        with peft_quietly(), loading(cfg.path, "adapter"):
            model = PeftModel.from_pretrained(backbone, cfg.path)
        # trained in full (PPO's critic from a LoRA reward model): the adapter merged into every weight
        model = model.merge_and_unload().requires_grad_(True) if trainable else lean_lora(model)
    else:
        check_weights_format(cfg.path, cfg.allow_pickle)
        with loading(cfg.path, "reward model"), _new_score_head_quietly(cfg.path):
            model = AutoModelForSequenceClassification.from_pretrained(absolute_if_local(cfg.path), **kwargs)
    return model.to(device)


@contextlib.contextmanager
def _new_score_head_quietly(path: str):
    """A causal LM's directory loaded as a classifier gets a new score head, as it should (a reward model or a critic
    starts so): transformers' load report of it as missing, a warning every run printed, is left out. A classifier's
    directory (a trained reward model), or a hub name, loads with the report."""
    if not (Path(path).is_dir() and not is_classifier_dir(path)):
        yield
        return
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


class RewardModel:
    """Scores (prompt, response) texts with a trained reward model, batched and padding-safe.

    Responses are encoded exactly as in reward-model training (prompt + response + EOS; after chat messages the
    response as the chat template writes it).
    When the directory holds ``score_normalization.json`` (written by ``rlhfkit rm`` with
    ``normalize: true``), scores come out standardised: (s − mean) / std over the training set.
    """

    def __init__(self, model, tokenizer, mean: float = 0.0, std: float = 1.0, max_length: int = 512):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.mean, self.std, self.max_length = mean, std, max_length

    @classmethod
    def from_pretrained(cls, path: str, device: torch.device | str | None = None, **model_kwargs) -> "RewardModel":
        device = resolve_device(device or "auto") if not isinstance(device, torch.device) else device
        cfg = ModelConfig(path=path, **model_kwargs)
        check_reward_dir(path)
        stats = score_normalization(path) or IDENTITY
        model = load_reward_backbone(cfg, device)
        for p in model.parameters():
            p.requires_grad_(False)
        limit = position_limit(cfg) or 512  # longer texts lose the start of their prompt, as in training
        return cls(model, load_tokenizer(path, cfg.trust_remote_code), stats["mean"], stats["std"], min(512, limit))

    @torch.no_grad()
    def score(self, prompts: list, responses: list[str], batch_size: int = 64) -> torch.Tensor:
        """One score per (prompt, response): (B,) float32 on the CPU."""
        device = next(self.model.parameters()).device
        out = []
        for i in range(0, len(prompts), batch_size):
            examples = [encode_reply(self.tokenizer, p, r, self.max_length)
                        for p, r in zip(prompts[i: i + batch_size], responses[i: i + batch_size])]
            batch = collate(examples, self.tokenizer.pad_token_id)
            # a prompt repeated over a group's samples (GRPO's G in a row) runs its columns once
            out.append(sequence_scores(self.model, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                       prompt_width(batch["completion_mask"])))
        return (torch.cat(out).cpu() - self.mean) / self.std
