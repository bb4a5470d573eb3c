"""The PPO roles — actor, reference, critic — held two ways (DESIGN.md §2).

* ``SharedBaseRoles`` (seed 000's memory trick): ONE base model in memory. The actor is a
  LoRA adapter (named ``default``, so the saved directory loads as an ordinary adapter),
  the critic a second LoRA adapter (``critic``) plus a value head, and the reference is
  the same base with adapters disabled.
* ``SeparateRoles`` (OpenRLHF style): a full actor, a frozen full reference copy and a
  full critic (backbone + value head), actor and critic fully trained; for the critic-free
  methods training the full model, the actor alone, with the reference only for a KL term.

Trainers see one interface: ``actor_logprobs``, ``critic_values``, ``with roles.reference():``,
``actor_parameters``/``critic_parameters``, ``generation_model``, ``shard``/``release`` and ``save``. Batches are
``rlhfkit.models.forward.join_prompt_response`` layouts. Shapes: B, A (response), H hidden.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from rlhfkit import distributed, fsdp, zero
from rlhfkit.config import ConfigError, LoraConfig, ModelConfig
from rlhfkit.data.collate import collate, encode_example, join_ids
from rlhfkit.models.forward import Entropy, response_logprobs
from rlhfkit.models.load import (VALUE_HEAD_FILE, adapter_base, add_lora, checkpoint_activations, is_adapter_dir,
                                 learn_mode, load_causal_lm, mixed_precision, peft_lora_config, position_limit,
                                 save_model, write_atomically)
from rlhfkit.models.reward import (IDENTITY, NORMALIZATION_FILE, _hf_model, check_reward_dir, last_token_index,
                                   load_reward_backbone, score_normalization)
from rlhfkit.ops import position_ids_from_mask, scalar_head
from rlhfkit.rollout.engine import stop_ids


def hidden_states(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Last-layer hidden states of the backbone (no LM head): (B, T, H). A forward of ``model``
    (``fsdp.run_as_forward``), so a sharded model gathers the weights the backbone reads."""
    return fsdp.run_as_forward(model, _backbone_states, model, batch)


def critic_values_of(model, head: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """V_t of ``model``'s backbone through the value ``head``: (B, A), as one forward of ``model``,
    so a head that is part of a sharded model (the critic's ``score``) is gathered for it too."""
    width = batch["action_mask"].shape[1]  # a copy, not a view, leaves the forward: FSDP warns of views
    return fsdp.run_as_forward(model, lambda: values_at_actions(_backbone_states(model, batch), head, width).clone())


def _backbone_states(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    hf = _hf_model(model)
    backbone = getattr(hf, hf.base_model_prefix)
    return backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    position_ids=position_ids_from_mask(batch["attention_mask"]), use_cache=False).last_hidden_state


def values_at_actions(hidden: torch.Tensor, head: nn.Module, width: int) -> torch.Tensor:
    """V_t read where the logits of response token t are read (DESIGN.md §3): (B, T, H) → (B, A).

    Response token j sits at column T - A + j and is predicted from column T - A - 1 + j.
    """
    return scalar_head(head, hidden[:, -(width + 1):-1]).squeeze(-1).float()  # a float32 head on bf16


def _frozen(model):
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def adapter_layers(model) -> list[nn.Module]:
    from rlhfkit.models.lora import adapter_layers as layers  # imports peft

    return layers(model)


class SharedBaseRoles:
    """Actor and critic as two LoRA adapters on one base; reference = adapters off."""

    def __init__(self, model_cfg: ModelConfig, lora: LoraConfig, device: torch.device, critic: bool = True,
                 logits_chunk: int = 0):
        """``critic=False`` (critic-free methods: GRPO, RLOO, REINFORCE++): no critic adapter or value
        head; ``critic_values`` returns zeros and ``critic_parameters`` is empty. ``logits_chunk`` > 0: the
        actor's and the reference's output head runs on response tokens that many at a time
        (``forward.response_logprobs``)."""
        self.logits_chunk = logits_chunk
        if is_adapter_dir(model_cfg.path):  # peft would re-initialise its adapter as the actor: the SFT lost
            raise ConfigError(f"{model_cfg.path} is a LoRA adapter directory: the policy (and PPO's critic) are new "
                              "adapters on a full model, the reference that model with them off; merge it first "
                              "(rlhfkit export --model ADAPTER_DIR --out DIR) and pass DIR")
        self.amp = mixed_precision(model_cfg.dtype, device)  # the trainers' forwards run under it
        base = _frozen(load_causal_lm(model_cfg, device))
        critic_cfg = peft_lora_config(lora, base)  # resolved before LoRA layers wrap the base's modules
        self.model = add_lora(base, lora, float32=model_cfg.dtype == "auto")  # adapter "default" = the actor
        self.value_head = None
        if critic:
            from rlhfkit.models.lora import peft_quietly

            with peft_quietly():  # its tied head too: rlhfkit export unties it
                self.model.add_adapter("critic", critic_cfg)  # the actor's targets: the same (lean) LoRA layers
            hidden = base.config.get_text_config().hidden_size
            self.value_head = nn.Linear(hidden, 1).to(device)
            nn.init.zeros_(self.value_head.weight), nn.init.zeros_(self.value_head.bias)
        self._layers, self._active = adapter_layers(self.model), None
        self._find_parameters()
        self._use("default")  # also marks the critic adapter trainable, which peft leaves frozen on add

    def _find_parameters(self) -> None:
        """Each adapter's parameters, by name (found again once sharding has replaced them)."""
        named = list(self.model.named_parameters())
        self._actor, self._critic, self._reward = ([p for n, p in named if f".{a}." in n]
                                                   for a in ("default", "critic", "reward"))

    def shard(self, how: str) -> None:
        """Shard the base with its adapters over the processes (``rlhfkit.fsdp``, ``how``: full_shard or
        shard_grad_op); the value and reward heads, a few thousand weights, stay whole in each. After
        ``add_reward_adapter``, before the optimisers are built. Nothing with one process or 'off'."""
        roles = "actor, critic and reference" if self.value_head is not None else "policy and reference"
        fsdp.shard(self.model, how, what=f"the shared base: {roles}", amp=self.amp)
        self._find_parameters()
        if fsdp.is_sharded(self.model) and distributed.is_main():
            print("note: the policy samples with the whole base gathered, so a process holds its shard and the whole "
                  "base at the peak, more than a replica holds: with LoRA on a shared base, replicas (train.fsdp off) "
                  "use less memory (docs/distributed.md)")

    def release(self) -> None:
        """Sharded: reshard what forwards with no backward after them left gathered (``fsdp.release``)."""
        fsdp.release(self.model)

    def checkpoint_activations(self) -> None:
        """Gradient checkpointing in the base the adapters share (``load.checkpoint_activations``)."""
        checkpoint_activations(self.model)

    def learn_mode(self) -> None:
        """Eval mode (no dropout), checkpointed layers recomputing their activations (``load.learn_mode``)."""
        learn_mode(self.model, False)

    def add_reward_adapter(self, path: str, base_path: str) -> None:
        """The reward model as a third adapter on the shared base (DESIGN.md §2, seed 000).

        It must be a LoRA reward model trained on this very base (`rlhfkit rm --lora.enabled true
        --model BASE`); its score head is loaded beside it and its score normalisation applied.
        """
        check_reward_dir(path)
        trained_on = adapter_base(path)
        if Path(trained_on).resolve() != Path(base_path).resolve():
            raise ValueError(f"the reward adapter {path} was trained on {trained_on}, not on PPO's base {base_path}: "
                             f"train it with `rlhfkit rm --lora.enabled true --model {base_path}`, or pass a full "
                             "reward-model directory")
        from rlhfkit.models.lora import lean_lora

        self.model.load_adapter(path, adapter_name="reward", is_trainable=False)  # its score head is not a LoRA layer
        lean_lora(self.model)  # any layer the reward adapter targets and the actor's does not
        head = {k.rsplit(".", 1)[-1]: v for k, v in load_file(str(Path(path) / "adapter_model.safetensors")).items()
                if ".score." in k}
        weight = head["weight"].to(self.value_head.weight.device)
        self.reward_head = nn.Linear(weight.shape[1], 1, bias="bias" in head).to(weight.device)  # float32
        self.reward_head.load_state_dict(head)  # copied into float32 whatever dtype it was saved in
        self.reward_stats = score_normalization(path) or IDENTITY
        self.reward_max_length = min(512, position_limit(ModelConfig(path=base_path)) or 512)  # as RewardModel's
        self._layers, self._active = adapter_layers(self.model), None
        self._find_parameters()
        self._use("default")

    def reward_scores(self, tokenizer, prompts: list, responses: list[str]) -> torch.Tensor:
        """Scores from the reward adapter, encoded exactly as ``RewardModel.score`` does: (B,) on the CPU."""
        return self._reward_scores([encode_example(tokenizer, p, r, self.reward_max_length)
                                    for p, r in zip(prompts, responses)], tokenizer.pad_token_id)

    def reward_scores_of_ids(self, tokenizer, prompt_ids: list[list[int]], completion_ids: list[list[int]],
                             stops: list[int] | None = None) -> torch.Tensor:
        """Scores of sampled token ids themselves (the adapter shares the actor's tokenizer): prompt ids +
        completion ids ending in the tokenizer's EOS, cut as ``encode_example`` cuts: (B,) on the CPU. A
        completion that stopped at another of ``stops`` (an end-of-turn token) has it replaced by that EOS,
        one that was cut off gets it added. What ``reward_scores`` gives for the decoded texts after plain-string
        prompts wherever decoding and encoding again give back the same ids, without that round trip (sampled
        ids often re-encode into other, more, tokens); after chat prompts ``make_experience`` scores the texts."""
        eos = tokenizer.eos_token_id
        ends = set(stops or []) | {eos}
        rows = [join_ids(p, [*c[:-1], eos] if c and c[-1] in ends else [*c, eos], self.reward_max_length,
                         bos=tokenizer.bos_token_id) for p, c in zip(prompt_ids, completion_ids)]
        return self._reward_scores(rows, tokenizer.pad_token_id)

    @torch.no_grad()
    def _reward_scores(self, rows: list, pad_token_id: int) -> torch.Tensor:
        batch = {k: v.to(self.value_head.weight.device) for k, v in collate(rows, pad_token_id).items()}
        self._use("reward")
        hidden = hidden_states(self.model, batch)
        last = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_token_index(batch["attention_mask"])]
        scores = scalar_head(self.reward_head, last).squeeze(-1).float().cpu()
        return (scores - self.reward_stats["mean"]) / self.reward_stats["std"]

    def _use(self, adapter: str) -> None:
        """Make ``adapter`` the active one. Each step switches several times, so the adapter layers are
        switched directly (a list found once): peft's ``set_adapter`` walks every module of the model."""
        if adapter == self._active:
            return
        for layer in self._layers:
            layer.set_adapter(adapter)
        self.model.active_adapter = self.model.base_model.active_adapter = adapter  # as ``set_adapter`` records it
        self._active = adapter
        self._trainable()

    def _trainable(self) -> None:
        """peft makes the active adapter alone trainable: actor and critic both keep training, the reward never.
        Sharded, the layers may hold FSDP's gathered copies of the adapters (between a forward and its reshard):
        those are set too (the shards' flags reach a copy only when it is gathered again)."""
        current = list(self.model.named_parameters()) if fsdp.is_sharded(self.model) else []
        for p in self._actor + self._critic + [p for n, p in current if ".default." in n or ".critic." in n]:
            p.requires_grad_(True)
        for p in self._reward + [p for n, p in current if ".reward." in n]:
            p.requires_grad_(False)

    def actor_logprobs(self, batch, temperature: float = 1.0, entropy: Entropy = "none"):
        """(B, A) log-probs of the response tokens, 0 where masked; with an ``entropy``, their entropies too
        (``forward.response_logprobs``)."""
        self._use("default")
        return response_logprobs(self.model, batch, temperature, entropy, self.logits_chunk)

    def critic_values(self, batch) -> torch.Tensor:
        if self.value_head is None:  # critic-free: a zero baseline
            return torch.zeros(batch["action_mask"].shape, device=batch["action_mask"].device)
        self._use("critic")
        return critic_values_of(self.model, self.value_head, batch)

    @contextlib.contextmanager
    def reference(self):
        """The base model: every adapter layer off (``models.lora.adapters_off``)."""
        from rlhfkit.models.lora import adapters_off

        with adapters_off(self.model, self._layers):
            yield self.model

    def reference_logprobs(self, batch, temperature: float = 1.0) -> torch.Tensor:
        with self.reference() as ref:
            return response_logprobs(ref, batch, temperature, chunk=self.logits_chunk)

    def generation_model(self):
        self._use("default")
        return self.model

    def actor_parameters(self) -> list[nn.Parameter]:
        return self._actor

    def critic_parameters(self) -> list[nn.Parameter]:
        return self._critic + (list(self.value_head.parameters()) if self.value_head is not None else [])

    def named_parameters(self):
        """Every parameter by a unique name (checkpoints save the trainable ones)."""
        yield from self.model.named_parameters()
        if self.value_head is not None:
            yield from self.value_head.named_parameters(prefix="value_head")

    def train(self, mode: bool = True) -> None:
        self.model.train(mode)
        if self.value_head is not None:
            self.value_head.train(mode)

    def save(self, out: str | Path, tokenizer) -> None:
        """``out``: the actor adapter (loads as base + adapter); ``out/critic``: critic adapter + value head."""
        if distributed.is_main():  # a full critic's statistics (mode separate), saved earlier
            _remove_stale(out, "critic/" + NORMALIZATION_FILE)
        save_model(self.model, tokenizer, out)
        if self.value_head is not None and distributed.is_main():
            head = self.value_head.state_dict()
            write_atomically(Path(out) / "critic" / VALUE_HEAD_FILE, lambda path: save_file(head, str(path)))


class RewardAdapterScores:
    """The reward adapter of ``SharedBaseRoles`` as PPO's score function: called with (prompts, texts)
    it re-encodes the texts (``reward_scores``); ``make_experience`` calls ``score_ids`` with the sampled
    ids instead (``reward_scores_of_ids``), as TRL and OpenRLHF score the policy's own tokens."""

    def __init__(self, roles: SharedBaseRoles, tokenizer):
        self.roles, self.tokenizer = roles, tokenizer
        self.stops = stop_ids(roles.model, tokenizer)  # where the sampler stops rows

    def __call__(self, prompts: list, responses: list[str]) -> torch.Tensor:
        return self.roles.reward_scores(self.tokenizer, prompts, responses)

    def score_ids(self, prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> torch.Tensor:
        return self.roles.reward_scores_of_ids(self.tokenizer, prompt_ids, completion_ids, stops=self.stops)


class SeparateRoles:
    """Four full models' worth: actor, frozen reference, critic (backbone + value head), actor and critic
    trained in full. For the critic-free methods (``critic_path`` None) no critic, and the reference only
    when a KL term needs it (``reference``)."""

    def __init__(self, model_cfg: ModelConfig, critic_path: str | None, device: torch.device,
                 reference: bool = True, logits_chunk: int = 0):
        if is_adapter_dir(model_cfg.path):  # loaded, it would be a frozen base under a frozen adapter
            raise ConfigError(f"{model_cfg.path} is a LoRA adapter directory: merge it into a full model to train "
                              "every weight (rlhfkit export --model ADAPTER_DIR --out DIR), or train LoRA adapters "
                              "(PPO's mode shared; lora.enabled true for GRPO, RLOO and REINFORCE++)")
        self.logits_chunk = logits_chunk  # as SharedBaseRoles' (``forward.response_logprobs``)
        self.amp = mixed_precision(model_cfg.dtype, device)  # the trainers' forwards run under it
        self.actor = load_causal_lm(model_cfg, device, trainable=True)
        # the reference in the actor's dtype (float32 under dtype auto, computing in bf16 under the same autocast):
        # a bf16 copy beside it computes its norms and residuals otherwise, so KL and ratios were off at step 0
        self.ref = _frozen(load_causal_lm(model_cfg, device, trainable=True)) if reference else None
        # critic = backbone + one-output head; from the reward model (seed 002) or the SFT model
        self.critic = (load_reward_backbone(ModelConfig(**{**vars(model_cfg), "path": critic_path}), device,
                                            trainable=True) if critic_path else None)
        # a reward model's score normalisation, if it has one, applies to the critic started from it: its first
        # values are on the scale of the normalised rewards they predict (OpenRLHF's critic does the same)
        self.critic_stats = score_normalization(critic_path) if critic_path else None

    def _models(self) -> list[nn.Module]:
        return [m for m in (self.actor, self.ref, self.critic) if m is not None]

    def actor_logprobs(self, batch, temperature: float = 1.0, entropy: Entropy = "none"):
        # with gradients under DeepSpeed: one forward of the actor's engine (``rlhfkit.zero``)
        return zero.run_as_forward(self.actor, response_logprobs, self.actor, batch, temperature, entropy,
                                   self.logits_chunk)

    def critic_values(self, batch) -> torch.Tensor:
        values = zero.run_as_forward(self.critic, critic_values_of, self.critic, _hf_model(self.critic).score, batch)
        if self.critic_stats is None:
            return values
        return (values - self.critic_stats["mean"]) / self.critic_stats["std"]

    @contextlib.contextmanager
    def reference(self):
        if self.ref is None:
            raise RuntimeError("these roles were built without a reference model (reference=False)")
        yield self.ref

    def reference_logprobs(self, batch, temperature: float = 1.0) -> torch.Tensor:
        with self.reference() as ref:
            return response_logprobs(ref, batch, temperature, chunk=self.logits_chunk)

    def generation_model(self):
        return self.actor

    def shard(self, how: str) -> None:
        """Shard actor and critic over the processes (``rlhfkit.fsdp``, ``how``: full_shard or shard_grad_op),
        the frozen reference always fully (nothing of it is kept for a backward). Before the optimisers are
        built. Nothing with one process or 'off'."""
        fsdp.shard(self.actor, how, what="the actor", amp=self.amp)
        if self.ref is not None:
            fsdp.shard(self.ref, "full_shard", what="the frozen reference", amp=self.amp)
        if self.critic is not None:
            fsdp.shard(self.critic, how, what="the critic", amp=self.amp)

    def release(self) -> None:
        """Sharded: reshard what forwards with no backward after them left gathered (``fsdp.release``)."""
        for model in self._models():
            fsdp.release(model)

    def checkpoint_activations(self) -> None:
        """Gradient checkpointing in the actor and the critic (``load.checkpoint_activations``)."""
        for model in (self.actor, self.critic):
            if model is not None:
                checkpoint_activations(model)

    def learn_mode(self) -> None:
        """Eval mode (no dropout), checkpointed layers recomputing their activations (``load.learn_mode``)."""
        for model in (self.actor, self.critic):
            if model is not None:
                learn_mode(model, False)

    def partition(self, stage: int, actor_opt, critic_opt, mini_batch_size: int, max_grad_norm: float) -> None:
        """DeepSpeed ZeRO-``stage`` for the actor and the critic (``critic_opt`` None: none): an engine each, over
        its optimiser (``rlhfkit.zero``, which the model and the optimiser point at), which then back-propagates,
        reduces, clips and steps through it; one backward of each process's share of a mini-batch a step. The
        frozen reference stays whole. At stage 3 each rollout samples with a whole copy of the actor
        (``zero.gathered``). After a checkpoint was loaded into the plain models and optimisers."""
        micro = max(1, mini_batch_size // distributed.world_size())  # DeepSpeed's bookkeeping only
        for model, opt, what in ((self.actor, actor_opt, "the actor"), (self.critic, critic_opt, "the critic")):
            if opt is not None:
                zero.Engine(model, opt, stage, 1, micro, max_grad_norm, amp=self.amp, what=what)
        if stage == 3 and distributed.is_main():
            print("note: each rollout samples with a whole copy of the actor, so a process holds its partition and "
                  "the whole actor while sampling (and a frozen reference, if any, whole throughout): ZeRO-3 saves "
                  "memory in the learn passes (docs/distributed.md)")

    def actor_parameters(self) -> list[nn.Parameter]:
        return list(self.actor.parameters())

    def critic_parameters(self) -> list[nn.Parameter]:
        return [] if self.critic is None else list(self.critic.parameters())

    def named_parameters(self):
        """Every parameter by a unique name (checkpoints save the trainable ones)."""
        yield from self.actor.named_parameters(prefix="actor")
        if self.critic is not None:
            yield from self.critic.named_parameters(prefix="critic")

    def train(self, mode: bool = True) -> None:
        self.actor.train(mode)
        if self.critic is not None:
            self.critic.train(mode)

    def save(self, out: str | Path, tokenizer) -> None:
        save_model(self.actor, tokenizer, out)
        if distributed.is_main():  # a shared-mode run's, earlier in this directory
            _remove_stale(out, "critic/" + VALUE_HEAD_FILE)
        if self.critic is not None:
            save_model(self.critic, tokenizer, Path(out) / "critic")
            if self.critic_stats is not None and distributed.is_main():  # its values are normalised scores
                write_atomically(Path(out) / "critic" / NORMALIZATION_FILE,
                                 lambda path: path.write_text(json.dumps(self.critic_stats, indent=2)))
            elif distributed.is_main():  # not an earlier run's beside this critic
                (Path(out) / "critic" / NORMALIZATION_FILE).unlink(missing_ok=True)


def _remove_stale(out: str | Path, *names: str) -> None:
    """Remove the files ``names`` an earlier run of the other mode left in ``out``, which would be read with this
    run's: a value head beside a full critic, a full critic's score statistics beside an adapter. (Not OUT/reward:
    it may be the reward model this run reads.)"""
    for name in names:
        (Path(out) / name).unlink(missing_ok=True)


def load_value_head(path: str | Path, head: nn.Linear) -> nn.Linear:
    head.load_state_dict(load_file(str(Path(path) / VALUE_HEAD_FILE)))
    return head
