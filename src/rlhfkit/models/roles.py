"""The PPO roles — actor, reference, critic — held two ways (DESIGN.md §2).

* ``SharedBaseRoles`` (seed 000's memory trick): ONE base model in memory. The actor is a
  LoRA adapter (named ``default``, so the saved directory loads as an ordinary adapter),
  the critic a second LoRA adapter (``critic``) plus a value head, and the reference is
  the same base with adapters disabled.
* ``SeparateRoles`` (OpenRLHF style): a full actor, a frozen full reference copy and a
  full critic (backbone + value head), actor and critic fully trained.

Trainers see one interface: ``actor_logprobs``, ``critic_values``, ``with roles.reference():``,
``actor_parameters``/``critic_parameters``, ``generation_model`` and ``save``. Batches are
``rlhfkit.models.forward.join_prompt_response`` layouts. Shapes: B, A (response), H hidden.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from rlhfkit.config import LoraConfig, ModelConfig
from rlhfkit.models.forward import logprobs_of
from rlhfkit.models.load import add_lora, load_causal_lm, peft_lora_config, save_model
from rlhfkit.models.reward import _hf_model, load_reward_backbone
from rlhfkit.ops import position_ids_from_mask

VALUE_HEAD_FILE = "value_head.safetensors"


def hidden_states(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Last-layer hidden states of the backbone (no LM head): (B, T, H)."""
    hf = _hf_model(model)
    backbone = getattr(hf, hf.base_model_prefix)
    return backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    position_ids=position_ids_from_mask(batch["attention_mask"])).last_hidden_state


def values_at_actions(hidden: torch.Tensor, head: nn.Module, width: int) -> torch.Tensor:
    """V_t read where the logits of response token t are read (DESIGN.md §3): (B, T, H) → (B, A).

    Response token j sits at column T - A + j and is predicted from column T - A - 1 + j.
    """
    return head(hidden[:, -(width + 1):-1]).squeeze(-1).float()


def _frozen(model):
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


class SharedBaseRoles:
    """Actor and critic as two LoRA adapters on one base; reference = adapters off."""

    def __init__(self, model_cfg: ModelConfig, lora: LoraConfig, device: torch.device, critic: bool = True):
        """``critic=False`` (critic-free methods: GRPO, RLOO, REINFORCE++): no critic adapter or value
        head; ``critic_values`` returns zeros and ``critic_parameters`` is empty."""
        base = _frozen(load_causal_lm(model_cfg, device))
        critic_cfg = peft_lora_config(lora, base)  # resolved before LoRA layers wrap the base's modules
        self.model = add_lora(base, lora)  # adapter "default" = the actor
        self.value_head = None
        if critic:
            self.model.add_adapter("critic", critic_cfg)
            hidden = base.config.get_text_config().hidden_size
            self.value_head = nn.Linear(hidden, 1).to(device)
            nn.init.zeros_(self.value_head.weight), nn.init.zeros_(self.value_head.bias)
        self._actor = [p for n, p in self.model.named_parameters() if ".default." in n]
        self._critic = [p for n, p in self.model.named_parameters() if ".critic." in n]
        self._use("default")  # also marks the critic adapter trainable, which peft leaves frozen on add

    def _use(self, adapter: str) -> None:
        self.model.set_adapter(adapter)
        for p in self._actor + self._critic:  # peft freezes inactive adapters; both keep training
            p.requires_grad_(True)

    def actor_logprobs(self, batch, temperature: float = 1.0, with_logits: bool = False):
        self._use("default")
        return logprobs_of(self.model, batch["input_ids"], batch["attention_mask"],
                           keep=batch["action_mask"].shape[1], temperature=temperature, with_logits=with_logits)

    def critic_values(self, batch) -> torch.Tensor:
        if self.value_head is None:  # critic-free: a zero baseline
            return torch.zeros(batch["action_mask"].shape, device=batch["action_mask"].device)
        self._use("critic")
        return values_at_actions(hidden_states(self.model, batch), self.value_head, batch["action_mask"].shape[1])

    @contextlib.contextmanager
    def reference(self):
        with self.model.disable_adapter():
            yield self.model

    def reference_logprobs(self, batch, temperature: float = 1.0) -> torch.Tensor:
        with self.reference() as ref:
            return logprobs_of(ref, batch["input_ids"], batch["attention_mask"],
                               keep=batch["action_mask"].shape[1], temperature=temperature)

    def generation_model(self):
        self._use("default")
        return self.model

    def actor_parameters(self) -> list[nn.Parameter]:
        return self._actor

    def critic_parameters(self) -> list[nn.Parameter]:
        return self._critic + (list(self.value_head.parameters()) if self.value_head is not None else [])

    def train(self, mode: bool = True) -> None:
        self.model.train(mode)
        if self.value_head is not None:
            self.value_head.train(mode)

    def save(self, out: str | Path, tokenizer) -> None:
        """``out``: the actor adapter (loads as base + adapter); ``out/critic``: critic adapter + value head."""
        save_model(self.model, tokenizer, out)
        if self.value_head is not None:
            save_file(self.value_head.state_dict(), str(Path(out) / "critic" / VALUE_HEAD_FILE))


class SeparateRoles:
    """Four full models' worth: actor, frozen reference, critic (backbone + value head)."""

    def __init__(self, model_cfg: ModelConfig, critic_path: str, device: torch.device):
        self.actor = load_causal_lm(model_cfg, device)
        self.ref = _frozen(load_causal_lm(model_cfg, device))
        # critic = backbone + one-output head; from the reward model (seed 002) or the SFT model
        self.critic = load_reward_backbone(ModelConfig(**{**vars(model_cfg), "path": critic_path}), device)

    def actor_logprobs(self, batch, temperature: float = 1.0, with_logits: bool = False):
        return logprobs_of(self.actor, batch["input_ids"], batch["attention_mask"],
                           keep=batch["action_mask"].shape[1], temperature=temperature, with_logits=with_logits)

    def critic_values(self, batch) -> torch.Tensor:
        return values_at_actions(hidden_states(self.critic, batch), _hf_model(self.critic).score,
                                 batch["action_mask"].shape[1])

    @contextlib.contextmanager
    def reference(self):
        yield self.ref

    def reference_logprobs(self, batch, temperature: float = 1.0) -> torch.Tensor:
        return logprobs_of(self.ref, batch["input_ids"], batch["attention_mask"],
                           keep=batch["action_mask"].shape[1], temperature=temperature)

    def generation_model(self):
        return self.actor

    def actor_parameters(self) -> list[nn.Parameter]:
        return list(self.actor.parameters())

    def critic_parameters(self) -> list[nn.Parameter]:
        return list(self.critic.parameters())

    def train(self, mode: bool = True) -> None:
        self.actor.train(mode), self.critic.train(mode)

    def save(self, out: str | Path, tokenizer) -> None:
        save_model(self.actor, tokenizer, out)
        save_model(self.critic, tokenizer, Path(out) / "critic")


def load_value_head(path: str | Path, head: nn.Linear) -> nn.Linear:
    head.load_state_dict(load_file(str(Path(path) / VALUE_HEAD_FILE)))
    return head
