"""Tokenising and padding: which tokens carry loss."""

import pytest
import torch

from rlhfkit.data.collate import (Encoded, as_prompt_completion, collate, encode_conversation, encode_example,
                                  encode_pair, join_ids, label_mask, pack, pad_batch)


class CharTokenizer:
    """One token per character; id = ord. eos 1, pad 0, chat template-free."""

    eos_token_id, eos_token, pad_token_id, chat_template = 1, "\x01", 0, None

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


class BosTokenizer(CharTokenizer):
    """CharTokenizer that begins every text with BOS (id 2) when it adds special tokens, as Llama's does."""

    bos_token_id = 2

    def __call__(self, text, add_special_tokens=True):
        out = super().__call__(text)
        out.input_ids = [2] * add_special_tokens + out.input_ids
        return out


def test_a_cut_prompt_keeps_its_bos():
    e = encode_example(BosTokenizer(), "abcdef", "xyz", max_length=6)
    # BOS + "abcdef", 7 ids, keeps 3 (as without BOS): the BOS and the last two
    assert e.input_ids == [2, 101, 102, 120, 121, 122] and e.completion_mask == [0, 0, 0, 1, 1, 1]
    assert e.truncated
    whole = encode_example(BosTokenizer(), "ab", "cd", max_length=10)
    assert whole.input_ids == [2, 97, 98, 99, 100, 1] and not whole.truncated
    # a prompt cut to one id keeps the BOS alone; a prompt that does not begin with BOS is cut as before
    assert join_ids([2, 97, 98], [99, 99, 1], 2, bos=2).input_ids == [2, 99]
    assert join_ids([2, 97, 98], [99, 99, 1], 2).input_ids == [98, 99]  # no bos given: the id is cut as any
    assert join_ids([97, 98, 99], [100] * 4, 4, bos=2).input_ids == [98, 99, 100, 100]
    chosen, rejected = encode_pair(BosTokenizer(), "abcdefgh", "uvwxy", "z", max_length=10)
    assert chosen.input_ids[:5] == rejected.input_ids[:5] == [2, 101, 102, 103, 104]


def test_a_pair_s_prompt_is_cut_once_for_the_longer_reply():
    # max_length 10, prompt "abcdefgh": the chosen reply + EOS needs 6, the rejected 2. The prompt keeps
    # max(10 - 6, 10 // 2) = 5 tokens for both; cut on its own, the rejected reply would keep all 8
    chosen, rejected = encode_pair(CharTokenizer(), "abcdefgh", "uvwxy", "z", max_length=10)
    assert chosen.input_ids == [100, 101, 102, 103, 104, 117, 118, 119, 120, 121]  # "defgh" + "uvwxy", EOS cut
    assert rejected.input_ids == [100, 101, 102, 103, 104, 122, 1]  # the same "defgh", then "z" + EOS
    assert rejected.completion_mask == [0] * 5 + [1, 1] and chosen.truncated and rejected.truncated
    alone = encode_example(CharTokenizer(), "abcdefgh", "z", max_length=10)
    assert alone.input_ids == [97, 98, 99, 100, 101, 102, 103, 104, 122, 1] and not alone.truncated
    # a pair that fits is left whole
    short = encode_pair(CharTokenizer(), "ab", "cd", "e", max_length=10)
    assert [e.input_ids for e in short] == [[97, 98, 99, 100, 1], [97, 98, 101, 1]]
    assert not any(e.truncated for e in short)
    # chat replies whose earlier turns differ have prompts of their own: each is cut for its reply
    user = [{"role": "user", "content": "x"}]
    turns = [[{"role": "assistant", "content": "p"}, {"role": "user", "content": "q"},
              {"role": "assistant", "content": "r"}], [{"role": "assistant", "content": "s"}]]
    tok = CharTokenizer()
    tok.chat_template, tok.apply_chat_template = "t", lambda m, **k: "".join(t["content"] for t in m)
    own = encode_pair(tok, user, *turns, max_length=10)
    assert [e.input_ids for e in own] == [[120, 112, 113, 114, 1], [120, 115, 1]]


def test_pairs_cut_to_the_same_tokens_are_left_out_and_counted(capsys):
    # "abcd" + "xyz1" / "xyz2" + EOS at max_length 5: the prompt keeps "cd" (half of it), each reply "xyz"
    from rlhfkit.data.collate import drop_tied_pairs
    from rlhfkit.data.formats import DataError

    tok = CharTokenizer()
    pairs = [encode_pair(tok, "abcd", "xyz1", "xyz2", max_length=5), encode_pair(tok, "ab", "x", "y", max_length=5)]
    assert pairs[0][0].input_ids == pairs[0][1].input_ids  # differed past the cut
    assert drop_tied_pairs(pairs, lambda e: e, "max_length 5", "p.jsonl") == pairs[1:]
    assert "p.jsonl: 1 of 2 pairs have the same chosen and rejected tokens once cut to max_length 5: left out" in (
        capsys.readouterr().err)
    with pytest.raises(DataError, match="p.jsonl: every pair has the same chosen and rejected tokens once cut to "
                                        "max_length 5: raise it"):
        drop_tied_pairs(pairs[:1], lambda e: e, "max_length 5", "p.jsonl")
    assert drop_tied_pairs([], lambda e: e, "max_length 5", "p.jsonl") == []  # no held-out pairs: none to keep


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


def llama2_style_tokenizer():
    """A SentencePiece tokenizer built as Llama-2's tokenizer.json is (TinyLlama, Mistral v0.1): a '▁' prepended to
    every text and spaces read as '▁', a decoder that strips the leading space. BPE trained here on a few lines."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    lines = ["User: Describe the cat.\nAssistant: The cat is calm and lovely.", "The lake is dull. Hello there."] * 20
    tok.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"],
                                                       initial_alphabet=["▁"], show_progress=False))
    tok.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<unk>")


def test_a_completion_is_tokenised_as_it_reads_after_its_prompt():
    from rlhfkit.rollout.engine import completion_text

    tok = llama2_style_tokenizer()
    prompt, completion = "User: Describe the cat.\nAssistant:", " The cat is calm."
    assert tok(completion, add_special_tokens=False).input_ids[0] == tok.convert_tokens_to_ids("▁")  # alone: '▁' more
    e = encode_example(tok, prompt, completion, 64)
    assert e.input_ids == tok(prompt + completion).input_ids + [tok.eos_token_id]
    assert tok.decode(e.input_ids, skip_special_tokens=True) == prompt + completion  # one space, not two
    start = e.completion_mask.index(1)
    assert e.input_ids[:start] == tok(prompt).input_ids
    # sampled ids read back as the text after the prompt (its leading space kept), which encodes to them again
    text = completion_text(tok, e.input_ids[:start], e.input_ids[start:])
    assert text == completion and tok.decode(e.input_ids[start:], skip_special_tokens=True) == completion.lstrip()
    # a token across the seam (a prompt ending mid-word, or in a space): the completion is tokenised on its own,
    # after the prompt's own ids, without the '▁' a text alone starts with ('at' was '▁a', 't': "c at")
    for prompt, completion in [("User: Describe the c", "at is calm."), ("Describe the cat. ", "The cat is calm.")]:
        seam = encode_example(tok, prompt, completion, 64)
        start = seam.completion_mask.index(1)
        assert seam.input_ids[:start] == tok(prompt).input_ids
        assert tok.decode(seam.input_ids, skip_special_tokens=True) == prompt + completion
        assert completion_text(tok, seam.input_ids[:start], seam.input_ids[start:]) == completion


def test_a_tokenizer_that_appends_eos_puts_one_at_the_answer_s_end_alone():
    # Llama tokenizers saved with add_eos_token: every text ends in </s>; the prompt once did too ("Assistant:</s>")
    from tokenizers.processors import TemplateProcessing

    from rlhfkit.data.collate import encode_prompt

    tok = llama2_style_tokenizer()
    tok._tokenizer.post_processor = TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)])
    prompt, completion = "User: Describe the cat.\nAssistant:", " The cat is calm."
    assert tok(prompt).input_ids[-1] == tok.eos_token_id
    e = encode_example(tok, prompt, completion, 64)
    assert e.input_ids.count(tok.eos_token_id) == 1 and e.input_ids[-1] == tok.eos_token_id
    assert e.input_ids == tok(prompt + completion).input_ids  # <s> ... </s>: its own ids, the EOS learned
    start = e.completion_mask.index(1)
    assert e.input_ids[:start] == encode_prompt(tok, prompt) == tok(prompt).input_ids[:-1]


def test_a_bos_that_is_the_eos_stays_before_an_empty_prompt():
    # OPT's tokenizer puts </s> first, as its BOS: not an EOS appended, which the prompt's end drops
    from tokenizers.processors import TemplateProcessing

    from rlhfkit.data.collate import encode_prompt

    tok = llama2_style_tokenizer()
    tok._tokenizer.post_processor = TemplateProcessing(single="</s> $A", special_tokens=[("</s>", 2)])
    assert encode_prompt(tok, "") == [tok.eos_token_id]
    e = encode_example(tok, "", "The cat is calm.", 64)
    assert e.input_ids[0] == tok.eos_token_id and e.completion_mask[0] == 0


def test_a_prompt_templated_by_hand_keeps_its_one_bos_and_a_sample_reads_up_to_its_end_of_turn():
    from rlhfkit.data.collate import encode_prompt
    from rlhfkit.rollout.engine import completion_text, end_of_turn

    tok = llama2_style_tokenizer()
    assert encode_prompt(tok, "<s>[INST] Hi [/INST]").count(tok.bos_token_id) == 1  # not <s> <s>
    assert encode_prompt(tok, "Hi").count(tok.bos_token_id) == 1
    tok.add_special_tokens({"additional_special_tokens": ["<|im_end|>", "<|python_tag|>"]})
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn(tok) == end  # what the template writes after a reply
    e = encode_example(tok, "User: Describe the cat.\nAssistant:", " The cat is calm.", 64)
    start = e.completion_mask.index(1)
    prompt, reply = e.input_ids[:start], e.input_ids[start:-1]  # the reply's ids, its EOS left off
    # a base model's chat sample runs on past the template's end of turn to the EOS: the text is the reply alone
    newline = tok("\n", add_special_tokens=False).input_ids
    assert completion_text(tok, prompt, [*reply, end, *newline, tok.eos_token_id], end) == " The cat is calm."
    # another special token is content (a tool call's tag): the text runs on past it
    tag = tok.convert_tokens_to_ids("<|python_tag|>")
    assert completion_text(tok, prompt, [tag, *reply, end], end) == " The cat is calm."
    assert completion_text(tok, prompt, [*reply, tag, *reply]) == " The cat is calm. The cat is calm."


CONVERSATION = [{"role": "user", "content": "Describe the cat."}, {"role": "assistant", "content": "The cat is calm."},
                {"role": "user", "content": "And the lake?"}, {"role": "assistant", "content": "The lake is dull."}]


def chatml_tokenizer(eos: str):
    tok = llama2_style_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tok.eos_token = eos  # a base model's </s>, or an instruct model's end of turn
    return tok


@pytest.mark.parametrize("eos", ["</s>", "<|im_end|>"])
def test_every_assistant_turn_of_a_conversation_is_learned(eos):
    tok = chatml_tokenizer(eos)
    e = encode_conversation(tok, CONVERSATION, 256)
    # the ids are the conversation as the template writes it, to the last reply's end of turn, then the EOS (a
    # base tokenizer's, which the template does not write; an instruct one's is the end of turn)
    whole = tok(tok.apply_chat_template(CONVERSATION, tokenize=False), add_special_tokens=False).input_ids
    if eos == "</s>":
        assert e.input_ids == [*whole, tok.eos_token_id]
    else:
        assert e.input_ids == whole[: len(e.input_ids)] and tok.decode(whole[len(e.input_ids):]) == "\n"
    # the last reply alone (assistant_turns last) has the same ids, its mask the last turn's span alone
    last = encode_example(tok, CONVERSATION[:3], CONVERSATION[3]["content"], 256)
    assert last.input_ids == e.input_ids
    first = [i for i, (a, b) in enumerate(zip(e.completion_mask, last.completion_mask)) if a != b]
    assert tok.decode([e.input_ids[i] for i in first]).startswith("The cat is calm.<|im_end|>")
    later = [m for i, m in enumerate(e.completion_mask) if i > first[-1]]
    assert sum(last.completion_mask) == sum(later)
    # a single turn: the single-turn path's encoding
    single = encode_conversation(tok, CONVERSATION[:2], 256)
    assert single == encode_example(tok, CONVERSATION[:1], CONVERSATION[1]["content"], 256)
    # too long: the conversation loses its start, its mask cut with it; the last reply stays whole
    # too long: the conversation loses its start, its mask cut with it, and the first reply kept (its question or
    # its own start gone: cut in the question, in the reply's header, at its first token, inside it) is not
    # learned; the last reply stays whole
    for drop in (5, first[0] - 1, first[0], first[0] + 2):
        cut = encode_conversation(tok, CONVERSATION, len(e.input_ids) - drop)
        assert cut.truncated and cut.input_ids == e.input_ids[drop:]
        assert cut.completion_mask == [0] * (first[-1] + 1 - drop) + e.completion_mask[first[-1] + 1:], drop


def test_a_template_that_rewrites_earlier_turns_is_refused_naming_the_fallback():
    # as a reasoning model's template drops an earlier reply's thinking: earlier replies rendered otherwise
    tok = chatml_tokenizer("</s>")
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {% if m['role'] == 'assistant' and not loop.last %}"
                         "(earlier){% else %}{{ m['content'] }}{% endif %}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(ValueError, match="the conversation up to assistant message 3 does not begin with the tokens "
                                         "of the turns before it .* set assistant_turns last"):
        encode_conversation(tok, CONVERSATION, 256)


def test_pack_lays_examples_end_to_end_longest_first_and_labels_stay_within_each():
    # lengths 5, 3, 4, 2 in rows of 8: 5 opens row A (3 left), 4 opens row B (4 left), 3 fills A, 2 goes to B;
    # each row holds its examples in their given order, B padded by 2 (numbered as an example of its own)
    examples = [Encoded(list(range(10 * k + 1, 10 * k + 1 + n)), [0] * (n - 2) + [1, 1]) for k, n in
                enumerate([5, 3, 4, 2])]
    examples[3] = Encoded([41, 42], [1, 1])  # a completion that opens its example: its first token has no label
    batch = pack(examples, capacity=8, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 11, 12, 13], [21, 22, 23, 24, 41, 42, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 3, 0, 1, 0, 1]]
    assert batch["completion_mask"].tolist() == [[0, 0, 0, 1, 1, 0, 1, 1], [0, 0, 1, 1, 1, 1, 0, 0]]
    assert batch["sequence_ids"].tolist() == [[0, 0, 0, 0, 0, 1, 1, 1], [2, 2, 2, 2, 3, 3, -1, -1]]
    # the label of position t is token t+1, never the next example's first token, never padding
    assert label_mask(batch).tolist() == [[0, 0, 1, 1, 0, 1, 1], [0, 1, 1, 0, 1, 0, 0]]
    # the same labels as the padded batch, counted
    assert label_mask(batch).sum() == label_mask(collate(examples, 0)).sum()
    # an example longer than the capacity takes a row alone
    assert pack([Encoded([1] * 9, [1] * 9), Encoded([2], [1])], 8, 0)["input_ids"].shape == (2, 9)


def test_a_conversation_s_tool_calls_are_learned_and_an_opening_assistant_turn_is_context():
    tok = chatml_tokenizer("<|im_end|>")
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}{% if m.tool_calls %}"
                         "call {{ m.tool_calls[0]['function']['name'] }}{% endif %}<|im_end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    call = {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
        "name": "lake", "arguments": {}}}]}
    messages = [CONVERSATION[0], call, {"role": "tool", "content": "calm"}, CONVERSATION[1]]
    e = encode_conversation(tok, messages, 256)  # the call written as the template writes the whole message
    learned = tok.decode([t for t, m in zip(e.input_ids, e.completion_mask) if m])
    assert learned == "call lake<|im_end|>The cat is calm.<|im_end|>"
    # the last reply alone (assistant_turns last, preference replies) keeps its tool call too
    alone = encode_example(tok, *as_prompt_completion({"messages": messages[:2]}), 256)
    assert tok.decode([t for t, m in zip(alone.input_ids, alone.completion_mask) if m]) == "call lake<|im_end|>"
    # a template that does not write tool calls would learn an empty reply: refused, saying so
    plain = chatml_tokenizer("<|im_end|>")
    with pytest.raises(ValueError, match="does not write tool calls, so this reply's would not be learned"):
        encode_example(plain, *as_prompt_completion({"messages": messages[:2]}), 256)
    # an assistant turn with nothing before it answers nothing: context, as with assistant_turns last
    opening = [{"role": "assistant", "content": "Hello."}, *CONVERSATION[:2]]
    assert encode_conversation(tok, opening, 256) == encode_example(tok, opening[:-1], opening[-1]["content"], 256)


def test_a_text_row_gets_one_bos_learned_by_nothing():
    # a text row (SFT's language modelling): an empty prompt, so the text gets the tokenizer's BOS, which nothing
    # predicts; a text that already begins with the BOS (one templated by hand) gets no second one
    tok = llama2_style_tokenizer()
    bos = tok.bos_token_id
    e = encode_example(tok, "", "The cat is calm.", 64)
    assert e.input_ids == tok("The cat is calm.").input_ids + [tok.eos_token_id] and e.input_ids[0] == bos
    assert e.completion_mask == [0] + [1] * (len(e.input_ids) - 1)
    templated = encode_example(tok, "", "<s>The cat is calm.", 64)
    assert templated.input_ids == e.input_ids  # one BOS, not two
    assert label_mask(collate([templated], 0))[0, 0] == 1 and templated.input_ids.count(bos) == 1
