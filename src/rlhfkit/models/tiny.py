"""Tiny randomly initialised models of real architectures, with a locally trained tokenizer.

No weights can be downloaded here, so the demo and the tests make their own models:
an ordinary Hugging Face config of a real architecture, shrunk, with random weights,
saved with ``save_pretrained`` (safetensors) next to a byte-level BPE tokenizer trained
on the built-in task's text. Everything downstream loads them with ``from_pretrained``,
exactly as it would load a 7B model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from rlhfkit.data.tasks import describe

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"

# A minimal chat template so `messages` data works with the tiny tokenizer as with any chat model.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)

# Field names differ between architectures; each entry maps our sizes onto one config.
# kv: key/value heads (grouped-query attention where fewer than the query heads k; None where the
# architecture has no such field).
ARCHS = {
    "llama": lambda h, n, k, kv, ff: dict(hidden_size=h, num_hidden_layers=n, num_attention_heads=k,
                                          num_key_value_heads=kv, intermediate_size=ff),
    "qwen2": lambda h, n, k, kv, ff: dict(hidden_size=h, num_hidden_layers=n, num_attention_heads=k,
                                          num_key_value_heads=kv, intermediate_size=ff, max_window_layers=n,
                                          layer_types=["full_attention"] * n),
    # Qwen3: Qwen2 with a norm on each head's queries and keys before the rotary, and head_dim its own setting
    "qwen3": lambda h, n, k, kv, ff: dict(hidden_size=h, num_hidden_layers=n, num_attention_heads=k,
                                          num_key_value_heads=kv, intermediate_size=ff, head_dim=h // k,
                                          max_window_layers=n, layer_types=["full_attention"] * n),
    # Phi-3: q/k/v in one projection, gate and up in another
    "phi3": lambda h, n, k, kv, ff: dict(hidden_size=h, num_hidden_layers=n, num_attention_heads=k,
                                         num_key_value_heads=kv, intermediate_size=ff, resid_pdrop=0.0,
                                         embd_pdrop=0.0, attention_dropout=0.0),
    # Gemma: the embeddings scaled by sqrt(hidden), (1 + w) norms, GELU, a tied head
    "gemma": lambda h, n, k, kv, ff: dict(hidden_size=h, num_hidden_layers=n, num_attention_heads=k,
                                          num_key_value_heads=kv, intermediate_size=ff, head_dim=h // k),
    "mistral": lambda h, n, k, kv, ff: dict(hidden_size=h, num_hidden_layers=n, num_attention_heads=k,
                                            num_key_value_heads=kv, intermediate_size=ff, head_dim=h // k,
                                            sliding_window=None),
    "gpt2": lambda h, n, k, kv, ff: dict(n_embd=h, n_layer=n, n_head=k, n_inner=ff, resid_pdrop=0.0,
                                         embd_pdrop=0.0, attn_pdrop=0.0),
    "gpt_neox": lambda h, n, k, kv, ff: dict(hidden_size=h, num_hidden_layers=n, num_attention_heads=k,
                                             intermediate_size=ff, hidden_dropout=0.0, attention_dropout=0.0),
}
GQA_ARCHS = ("llama", "qwen2", "qwen3", "mistral")


def train_tokenizer(texts: list[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``texts`` (any string stays encodable)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS, UNK],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS,
                                   pad_token=PAD, unk_token=UNK)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny_model(arch: str, out: str | Path, hidden_size: int = 128, num_layers: int = 2,
                    num_heads: int = 4, vocab_size: int = 1024, max_positions: int = 256,
                    seed: int = 0, num_kv_heads: int | None = None) -> Path:
    """Write a random ``arch`` model and its tokenizer to ``out``; returns the directory.

    ``num_kv_heads`` (llama, qwen2, mistral): key/value heads, fewer than ``num_heads`` for
    grouped-query attention as most current models use; by default one per query head."""
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {sorted(ARCHS)}")
    sized = dict(hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads, vocab_size=vocab_size,
                 max_positions=max_positions)
    small = next((name for name, size in sized.items() if size < 1), None)
    if small:  # 0 layers saved a model that ignores its input
        raise ValueError(f"{small} must be 1 or more, got {sized[small]}")
    if Path(out).exists() and not Path(out).is_dir():  # save_pretrained only logs this, and writes nothing
        raise ValueError(f"{out} is a file: the model and its tokenizer are written to a directory")
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} must be divisible by num_heads {num_heads}")
    kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    if kv_heads != num_heads and arch not in GQA_ARCHS:
        raise ValueError(f"{arch} has no grouped-query attention; num_kv_heads applies to {', '.join(GQA_ARCHS)}")
    if kv_heads < 1 or num_heads % kv_heads:
        raise ValueError(f"num_heads {num_heads} must be a multiple of num_kv_heads {kv_heads}")
    tokenizer = train_tokenizer(describe.corpus(), vocab_size)
    sizes = ARCHS[arch](hidden_size, num_layers, num_heads, kv_heads, 4 * hidden_size)
    positions = {"n_positions": max_positions} if arch == "gpt2" else {"max_position_embeddings": max_positions}
    config = AutoConfig.for_model(
        arch, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True, **sizes, **positions)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    out = Path(out)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
