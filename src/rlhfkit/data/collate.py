"""Tokenising prompt/completion records and padding them into batches with loss masks.

A prompt is a string or a chat ``messages`` list (rendered with the tokenizer's chat
template and the generation prompt); a completion is a string, after a chat prompt as the template
writes the reply (its end-of-turn token included), and ends in the EOS token so that stopping is
learned. Shapes: B batch, T sequence.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch

Item = TypeVar("Item")


def render_prompt(tokenizer, prompt) -> str:
    """The text a model sees before its answer: the string itself, or the chat template."""
    if isinstance(prompt, str):
        return prompt
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or "the model"  # the policy's, or a reward model's
        raise ValueError(f"the data has chat `messages` but the tokenizer of {name} has no chat template; give one "
                         "(--model.chat_template FILE.jinja, or a model whose template to take) or use "
                         "prompt/completion columns")
    return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)


def as_prompt_completion(record: dict) -> tuple:
    """(prompt, completion) from a ``prompt``/``completion`` record, or from a ``messages`` record (the earlier
    messages, the last one whole: its tool calls are the reply too)."""
    if "messages" in record:
        return record["messages"][:-1], record["messages"][-1]
    return record["prompt"], record["completion"]


def adds_specials(tokenizer, prompt) -> bool:
    """Whether ``prompt`` is tokenised with the tokenizer's own special tokens (a BOS where the model expects one):
    a plain string is, unless it already begins with the BOS (a prompt templated by hand); chat messages are not,
    their template writes its own."""
    bos = getattr(tokenizer, "bos_token", None)
    return isinstance(prompt, str) and not (isinstance(bos, str) and bos and prompt.startswith(bos))


def encode_prompt(tokenizer, prompt) -> list[int]:
    """Token ids of a prompt, with the special tokens ``adds_specials`` gives it."""
    return tokenized(tokenizer, render_prompt(tokenizer, prompt), adds_specials(tokenizer, prompt))


def tokenized(tokenizer, text: str, special: bool) -> list[int]:
    """``text``'s ids, with the tokenizer's own special tokens where ``special`` but never an EOS it appends (a
    Llama tokenizer saved with add_eos_token): a prompt ends where its answer begins, and an answer ends in one."""
    ids = tokenizer(text, add_special_tokens=special).input_ids
    if special and ids and ids[-1] == tokenizer.eos_token_id and appends_eos(tokenizer):
        return ids[:-1]
    return ids


def appends_eos(tokenizer) -> bool:
    """Whether ``tokenizer`` ends a text with the EOS among its special tokens: what it adds after "a" (not a BOS
    that is the EOS, as OPT's, which it puts first). Kept on the tokenizer after the first call."""
    known = getattr(tokenizer, "_rlhfkit_appends_eos", None)
    if known is None:
        whole, plain = (tokenizer("a", add_special_tokens=s).input_ids for s in (True, False))
        start = next((i for i in range(len(whole) - len(plain) + 1) if whole[i: i + len(plain)] == plain), None)
        known = start is not None and whole[start + len(plain):] == [tokenizer.eos_token_id]
        tokenizer._rlhfkit_appends_eos = known
    return known


@dataclass
class Encoded:
    """One tokenised example: ``input_ids`` and which of them are completion tokens."""

    input_ids: list[int]
    completion_mask: list[int]
    truncated: bool = False


def encode_example(tokenizer, prompt, completion: str | dict, max_length: int) -> Encoded:
    """Prompt ids + completion ids + EOS (after chat messages, the completion, its text or its whole assistant
    message, as the template writes it: ``templated_reply``), cut to ``max_length``.

    When too long, the prompt loses tokens from its start (after its BOS, which stays; keeping at least one
    completion slot) and then the completion loses its end (and with it the EOS).
    """
    return join_ids(*_ids(tokenizer, prompt, completion), max_length, bos=getattr(tokenizer, "bos_token_id", None))


def _ids(tokenizer, prompt, completion: str | dict) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids ending in EOS). After chat messages the completion is the reply as the chat
    template writes it (``templated_reply``)."""
    prompt_ids, ids = _turn_ids(tokenizer, prompt, completion)
    return prompt_ids, _ended(ids, tokenizer.eos_token_id)


def _turn_ids(tokenizer, prompt, completion: str | dict) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids as the tokenizer splits them after the prompt), no EOS added: ``_ids`` without
    its end, for a conversation's earlier replies too (``encode_conversation``)."""
    text = completion if isinstance(prompt, str) else templated_reply(tokenizer, prompt, completion)
    # an empty prompt (a text row) gives the text its special tokens, unless it already begins with the BOS
    before, special = render_prompt(tokenizer, prompt), adds_specials(tokenizer, prompt or text)
    prompt_ids = tokenized(tokenizer, before, special)  # encode_prompt's, ``before`` kept
    return prompt_ids, completion_ids(tokenizer, before, prompt_ids, text, special)


def _ended(ids: list[int], eos: int) -> list[int]:
    """``ids`` ending in ``eos``: as they are when they do, else with it appended."""
    return ids if ids and ids[-1] == eos else [*ids, eos]


def completion_ids(tokenizer, before: str, prompt_ids: list[int], text: str, special: bool) -> list[int]:
    """The ids of completion ``text`` as the tokenizer splits it after the prompt (``before``, whose ids are
    ``prompt_ids``; ``special``: they hold the tokenizer's own special tokens): the tail of the two texts tokenised
    as one, when that begins with the prompt's ids, as the model reads and writes it. Else (a token would span the
    seam: a prompt ending mid-word, or in a space) the text tokenised on its own, as it reads after a newline when
    that decodes after the prompt as the text itself, else alone. A SentencePiece tokenizer of the Llama-2 kind
    (TinyLlama, Mistral v0.1) reads a text alone as starting a document: ' The' alone is '▁', '▁The', and 'The'
    is '▁The', a space more than after the prompt, which a model trained on it would learn to write."""
    whole = tokenized(tokenizer, before + text, special)
    if len(whole) > len(prompt_ids) and whole[: len(prompt_ids)] == prompt_ids:
        return whole[len(prompt_ids):]
    alone = tokenizer(text, add_special_tokens=False).input_ids
    newline = tokenizer("\n", add_special_tokens=False).input_ids
    after_newline = tokenizer("\n" + text, add_special_tokens=False).input_ids
    head = tokenizer.decode(prompt_ids)
    for ids in ([after_newline[len(newline):]] if after_newline[: len(newline)] == newline else []) + [alone]:
        if ids and tokenizer.decode(prompt_ids + ids) == head + text:  # reads as the prompt, then the text
            return ids
    return alone


def encode_conversation(tokenizer, messages: list[dict], max_length: int) -> Encoded:
    """``encode_example`` of chat ``messages`` with every assistant turn a completion (TRL's assistant_only_loss),
    the other turns and the template's text between them prompt; an assistant turn that opens the conversation
    (nothing to answer) is context. Each turn is tokenised as the single-turn path tokenises the last
    (``templated_reply``, ``completion_ids``) after the conversation rendered up to it, whose tokens must begin
    with those of the turns before as learned (else ValueError: a template that renders earlier turns otherwise
    once later ones follow, as one dropping earlier reasoning does, or a token across a reply's end). The last
    reply ends in the EOS; too long, the conversation loses its start first (after its BOS; the first earlier
    reply kept is not learned: its start, or part of the turn it answers, is gone), then the last reply its end."""
    ids: list[int] = []
    mask: list[int] = []
    turns = [k for k, m in enumerate(messages) if m["role"] == "assistant" and k > 0]
    for k in turns:
        prompt_ids, reply = _turn_ids(tokenizer, messages[:k], messages[k])
        if prompt_ids[: len(ids)] != ids:
            raise ValueError(f"with the chat template of {getattr(tokenizer, 'name_or_path', '') or 'the model'}, "
                             f"the conversation up to assistant message {k} does not begin with the tokens of the "
                             "turns before it as they were learned (the template rewrites earlier turns once later "
                             "ones follow, or a token spans the end of a reply), so they cannot all be learned in one "
                             "sequence: set assistant_turns last (the earlier turns as context)")
        ids, mask = ids + prompt_ids[len(ids):], mask + [0] * (len(prompt_ids) - len(ids))
        if k == turns[-1]:
            return join_ids(ids, _ended(reply, tokenizer.eos_token_id), max_length,
                            bos=getattr(tokenizer, "bos_token_id", None), prompt_mask=mask)
        ids, mask = ids + reply, mask + [1] * len(reply)
    raise ValueError("a conversation to learn from ends in an assistant message")


def templated_reply(tokenizer, messages: list, reply: str | dict) -> str:
    """The assistant ``reply`` (its text, or its whole message: tool calls and all) to ``messages`` as the chat
    template writes it after the generation prompt: with the template's end of turn (``<|im_end|>``,
    ``<|eot_id|>``), which the model must learn to write, cut after the tokenizer's EOS when the template writes
    one (an instruct tokenizer's EOS is its end of turn). The bare reply when the template renders the
    conversation otherwise than prompt + reply."""
    message = reply if isinstance(reply, dict) else {"role": "assistant", "content": reply}
    reply = message.get("content") or ""
    before = render_prompt(tokenizer, messages)
    whole = tokenizer.apply_chat_template([*messages, message], tokenize=False)
    if message.get("tool_calls") and whole == tokenizer.apply_chat_template(
            [*messages, {k: v for k, v in message.items() if k != "tool_calls"}], tokenize=False):
        name = getattr(tokenizer, "name_or_path", "") or "the model"
        raise ValueError(f"the chat template of {name} does not write tool calls, so this reply's would not be "
                         "learned: give a template that does (--model.chat_template FILE.jinja)")
    if not isinstance(whole, str) or not whole.startswith(before) or reply.strip() not in whole[len(before):]:
        return reply
    text, eos = whole[len(before):], tokenizer.eos_token
    end = text.find(eos, text.find(reply.strip()) + len(reply.strip())) if eos else -1
    return text[: end + len(eos)] if end >= 0 else text


def _reply_ids(tokenizer, prompt, reply) -> tuple[list[int], list[int]]:
    """``_ids`` of a reply: a string after ``prompt``, or chat messages ending in the assistant turn that is
    scored or learned (earlier turns join the prompt's messages)."""
    pair = as_prompt_completion({"messages": prompt + reply}) if isinstance(reply, list) else (prompt, reply)
    return _ids(tokenizer, *pair)


def encode_reply(tokenizer, prompt, reply, max_length: int) -> Encoded:
    """``encode_example`` for a preference or KTO reply (a string, or chat messages: ``_reply_ids``)."""
    return join_ids(*_reply_ids(tokenizer, prompt, reply), max_length, bos=getattr(tokenizer, "bos_token_id", None))


def encode_pair(tokenizer, prompt, chosen, rejected, max_length: int) -> tuple[Encoded, Encoded]:
    """``encode_reply`` for both replies of a preference pair, their shared prompt cut once, as the longer reply
    needs: a pairwise loss compares the two after the same context. (Replies whose earlier chat turns differ
    have prompts of their own, each cut for its reply.)"""
    (p_chosen, chosen_ids), (p_rejected, rejected_ids) = (_reply_ids(tokenizer, prompt, r) for r in (chosen, rejected))
    longest = max(len(chosen_ids), len(rejected_ids)) if p_chosen == p_rejected else 0
    bos = getattr(tokenizer, "bos_token_id", None)
    return (join_ids(p_chosen, chosen_ids, max_length, longest, bos),
            join_ids(p_rejected, rejected_ids, max_length, longest, bos))


def join_ids(prompt_ids: list[int], completion_ids: list[int], max_length: int, longest: int = 0,
             bos: int | None = None, prompt_mask: list[int] | None = None) -> Encoded:
    """Prompt ids + completion ids (EOS included), cut to ``max_length`` as ``encode_example`` cuts. ``longest``:
    the length of the longest completion that shares this prompt (``encode_pair``), for which the prompt is cut.
    A prompt that begins with ``bos`` (the tokenizer's BOS) keeps it when its start is cut: a model reads every
    text after it (Llama's attention sinks on it), and a pair's prompts stay equal. ``prompt_mask`` marks the
    prompt's own completion tokens (a conversation's earlier replies: ``encode_conversation``; default none),
    cut with it."""
    prompt_mask = [0] * len(prompt_ids) if prompt_mask is None else prompt_mask
    longest = max(longest, len(completion_ids))
    keep_prompt = len(prompt_ids)
    if keep_prompt + longest > max_length:
        keep_prompt = min(keep_prompt, max(max_length - longest, max_length // 2, 1))
    cut = keep_prompt < len(prompt_ids)
    truncated = cut or keep_prompt + len(completion_ids) > max_length
    head = prompt_ids[:1] if cut and bos is not None and prompt_ids[:1] == [bos] else []
    start = len(prompt_ids) - keep_prompt + len(head)
    prompt_ids, prompt_mask = head + prompt_ids[start:], prompt_mask[:len(head)] + prompt_mask[start:]
    if cut:  # the first reply kept has lost its start, or part of the turn it answers: not learned
        first = next((i for i in range(len(head), len(prompt_mask)) if prompt_mask[i]), len(prompt_mask))
        for i in range(first, len(prompt_mask)):
            if not prompt_mask[i]:
                break
            prompt_mask[i] = 0
    completion_ids = completion_ids[: max_length - keep_prompt]
    return Encoded(prompt_ids + completion_ids, prompt_mask + [1] * len(completion_ids), truncated)


def pad_batch(rows: list[list[int]], pad_value: int, side: str = "right") -> torch.Tensor:
    """Pad lists of ints to one length: → (B, T) long."""
    width = max(len(r) for r in rows)
    padded = [([pad_value] * (width - len(r)) + r) if side == "left" else (r + [pad_value] * (width - len(r)))
              for r in rows]
    return torch.tensor(padded, dtype=torch.long)


def collate(examples: list[Encoded], pad_token_id: int, side: str = "right") -> dict[str, torch.Tensor]:
    """Batch encoded examples.

    Returns ``input_ids`` (B, T), ``attention_mask`` (B, T) and ``completion_mask`` (B, T),
    1 on completion tokens (EOS included) and 0 on prompt and padding.
    """
    if side not in ("left", "right"):
        raise ValueError(f"padding side must be 'left' or 'right', got {side!r}")
    return {
        "input_ids": pad_batch([e.input_ids for e in examples], pad_token_id, side),
        "attention_mask": pad_batch([[1] * len(e.input_ids) for e in examples], 0, side),
        "completion_mask": pad_batch([e.completion_mask for e in examples], 0, side),
    }


def pack(examples: list[Encoded], capacity: int, pad_token_id: int) -> dict[str, torch.Tensor]:
    """Examples laid end to end in rows of at most ``capacity`` tokens (first fit, longest first; one longer than
    ``capacity`` takes a row alone; a row's examples in their given order) instead of a padded row each.

    Returns ``input_ids``, ``position_ids`` (restarting at 0 with each example), ``completion_mask`` and
    ``sequence_ids`` (which of ``examples`` each token is, -1 on padding) (R, L), the rows padded at their end to
    the longest (the padding numbered as an example of its own, without loss).
    A model given ``position_ids`` and no attention mask keeps each example's attention within it (transformers'
    packed-sequence masks; ``forward.packing_works`` checks a model does).
    """
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids)):
        n = len(examples[i].input_ids)
        row = next((r for r, left in enumerate(room) if left >= n), None)
        if row is None:
            rows.append([i])
            room.append(capacity - n)
        else:
            rows[row].append(i)
            room[row] -= n
    rows = sorted(sorted(row) for row in rows)
    ids = [[t for i in row for t in examples[i].input_ids] for row in rows]
    width = max(len(r) for r in ids)
    positions = [[p for i in row for p in range(len(examples[i].input_ids))] + list(range(width - len(r)))
                 for row, r in zip(rows, ids)]
    return {"input_ids": pad_batch(ids, pad_token_id),
            "position_ids": torch.tensor(positions, dtype=torch.long),
            "completion_mask": pad_batch([[m for i in row for m in examples[i].completion_mask] for row in rows], 0),
            "sequence_ids": pad_batch([[i for i in row for _ in examples[i].input_ids] for row in rows], -1)}


def label_mask(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Which next-token predictions carry loss: ``completion_mask`` and ``attention_mask`` (B, T) → (B, T-1), 1
    where token t+1 is a completion token and position t a real one. A completion that opens its row (an empty
    prompt and no BOS) has nothing to predict its first token from: it is left out under either padding. In a
    packed batch (``pack``: ``position_ids``, no ``attention_mask``) no label crosses into the next example: the
    first token of each is left out as a row's first is."""
    if "attention_mask" not in batch:
        return batch["completion_mask"][:, 1:] * (batch["position_ids"][:, 1:] > 0)
    return batch["completion_mask"][:, 1:] * batch["attention_mask"][:, :-1]


def encoded_rows(source: str, rows: list[Item], encode: Callable[[list[Item]], list],
                 file_rows: Callable[[], list] | None = None) -> list:
    """``encode(rows)``, the rows of ``source`` tokenised: an error doing it (a chat template that refuses a system
    turn, a tokenizer that rejects a value) becomes a DataError naming ``source``, as the loader's own errors do,
    and the first row that fails alone, by its number among ``file_rows()`` (the file's rows, before a held-out
    split took some; else ``rows``)."""
    from rlhfkit.data.formats import DataError

    try:
        return encode(rows)
    except DataError:
        raise
    except Exception as e:  # jinja2's TemplateError, a tokenizer's ValueError or TypeError
        row = _failing_row(rows, encode, file_rows)
        raise DataError(source, f"{'this' if row is not None else 'a'} row cannot be encoded with this model's "
                        f"tokenizer: {type(e).__name__}: {e}", row=row) from e


def _failing_row(rows: list, encode: Callable[[list], object], file_rows: Callable[[], list] | None) -> int | None:
    """The number of the first of ``rows`` that ``encode`` refuses alone, among ``file_rows()`` (or ``rows``); None
    when every row fails (the model's doing, not a row's: a tokenizer without a chat template) or none does."""
    failing, passing = None, len(rows) == 1
    for row in rows:
        try:
            encode([row])
            passing = True
        except Exception:
            failing = row if failing is None else failing
        if failing is not None and passing:
            def key(r):  # NaN equals itself as text, not as a float
                return json.dumps(r, sort_keys=True, default=str)

            wanted = key(failing)
            return next((i for i, r in enumerate(file_rows() if file_rows else rows) if key(r) == wanted), None)
    return None


def fit_to_length(items: list[Item], too_long: str, is_long: Callable[[Item], bool], limit: str,
                  source: str, what: str = "examples", fix: str = "") -> list[Item]:
    """Apply the ``too_long`` policy ('truncate': keep them as encoded, cut; 'drop': leave them out)
    to the ``what`` (examples) of ``source`` that ``is_long``, and report how many there were on stderr.

    ``limit`` names the setting they exceed (e.g. 'max_length 256'). Dropping every example is an
    error that says what to change: ``fix``, else raising the limit (or truncating).
    """
    n_long = sum(1 for item in items if is_long(item))
    if not n_long:
        return items
    action = "dropped" if too_long == "drop" else "truncated"
    setting = f" (too_long: {too_long})" if what == "examples" else ""  # rollout prompts are only ever dropped
    print(f"{source}: {n_long} of {len(items)} {what} exceed {limit}: {action}{setting}", file=sys.stderr)
    if too_long != "drop":
        return items
    kept = [item for item in items if not is_long(item)]
    if not kept:
        from rlhfkit.data.formats import DataError

        fix = fix or ("raise it or set too_long truncate" if what == "examples" else f"raise it or shorten the {what}")
        raise DataError(source, f"every {what.removesuffix('s')} exceeds {limit}; {fix}")
    return kept


def drop_tied_pairs(items: list[Item], pair: Callable[[Item], tuple[Encoded, Encoded]], limit: str,
                    source: str) -> list[Item]:
    """The ``items`` whose ``pair`` (chosen, rejected) still differ after cutting to ``limit`` (e.g. 'max_length 256');
    those cut to the same tokens (answers that differed only past the cut) teach a pairwise loss nothing: left
    out, counted on stderr, an error when none is left."""
    kept = [item for item in items if pair(item)[0].input_ids != pair(item)[1].input_ids]
    if len(kept) < len(items):
        print(f"{source}: {len(items) - len(kept)} of {len(items)} pairs have the same chosen and rejected tokens "
              f"once cut to {limit}: left out (raise it to keep them)", file=sys.stderr)
    if items and not kept:
        from rlhfkit.data.formats import DataError

        raise DataError(source, f"every pair has the same chosen and rejected tokens once cut to {limit}: raise it")
    return kept


def drop_long_prompts(rows: list[dict], tokenizer, max_prompt_length: int, source: str,
                      room: int | None = None) -> list[dict]:
    """Rollout rows whose ``prompt`` has at most ``max_prompt_length`` tokens (0 = no limit) and fits in
    ``room`` (the model's positions less the completion's tokens; None = no limit); the rest are dropped and
    counted."""
    limits = [(max_prompt_length, f"max_prompt_length {max_prompt_length}", "raise it or shorten the prompts")
              ] if max_prompt_length > 0 else []
    if room is not None:  # the model's positions: only the completion's share of them can give
        limits.append((room, f"the {room} positions the model has left beside generation.max_new_tokens",
                       "lower generation.max_new_tokens or shorten the prompts"))
    if not limits:
        return rows
    limit, name, fix = min(limits)
    return fit_to_length(rows, "drop", lambda r: len(encode_prompt(tokenizer, r["prompt"])) > limit, name, source,
                         what="prompts", fix=fix)
