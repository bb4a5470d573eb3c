"""Tokenising and padding: which tokens carry loss."""

import pytest
import torch

from rlhfkit.data.collate import collate, encode_example, pad_batch


class CharTokenizer:
    """One token per character; id = ord. eos 1, pad 0, chat template-free."""

    eos_token_id, pad_token_id, chat_template = 1, 0, None

    def __call__(self, text, add_special_tokens=True):
        class Out:
            input_ids = [ord(c) for c in text]
        return Out()


def test_completion_mask_covers_completion_and_eos_only():
    e = encode_example(CharTokenizer(), "ab", "cd", max_length=10)
    assert e.input_ids == [97, 98, 99, 100, 1]
    assert e.completion_mask == [0, 0, 1, 1, 1]
    assert not e.truncated


def test_truncation_cuts_prompt_start_then_completion_end():
    e = encode_example(CharTokenizer(), "abcdef", "xyz", max_length=6)
    # completion + eos = 4 tokens; prompt keeps max(6 - 4, 6 // 2) = 3 of its last tokens; completion gets 3
    assert e.input_ids == [100, 101, 102, 120, 121, 122]
    assert e.completion_mask == [0, 0, 0, 1, 1, 1]
    assert e.truncated


@pytest.mark.parametrize("side", ["left", "right"])
def test_collate_pads_with_zero_masks(side):
    tok = CharTokenizer()
    batch = collate([encode_example(tok, "a", "b", 8), encode_example(tok, "abc", "de", 8)], 0, side)
    assert batch["input_ids"].shape == (2, 6)
    assert batch["attention_mask"].sum(1).tolist() == [3, 6]
    assert batch["completion_mask"].sum(1).tolist() == [2, 3]
    pad_positions = batch["attention_mask"] == 0
    assert (batch["completion_mask"][pad_positions] == 0).all()
    assert (batch["input_ids"][0, :3] == 0).all() if side == "left" else (batch["input_ids"][0, 3:] == 0).all()


def test_pad_batch_rejects_nothing_and_keeps_order():
    assert pad_batch([[1], [2, 3]], 9, "left").tolist() == [[9, 1], [2, 3]]
    assert pad_batch([[1], [2, 3]], 9, "right").tolist() == [[1, 9], [2, 3]]
    assert pad_batch([[1], [2, 3]], 9).dtype == torch.long
