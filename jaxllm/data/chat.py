"""Chat templates, and conversations encoded through them: (ids, loss mask) with exact spans.

A conversation is a `messages` list of `{"role": "system"|"user"|"assistant", "content": str}`
(the tulu-3-sft-mixture / SmolTalk format).

Templates are `jaxllm.data.chat_template.ChatTemplate`s (Jinja2, as Hugging Face's
`chat_template`), re-exported here with `load_template` and `TemplateError`.

Loss spans. Each message's place in the render is found template-agnostically, as open-instruct
does, by rendering the conversation prefix by prefix: for an assistant message i the text
between render(messages[:i], add_generation_prompt=True) and render(messages[:i+1]) is the reply.
A template with `{% generation %}` blocks marks the trained text itself (TRL's
`assistant_only_loss`): the mask is exactly the blocks' text. Otherwise the mask is the reply's
content plus the turn's end marker / eos; the role header before it and whitespace after it are
not trained on. A template whose renders are not prefixes of each other (e.g. one that rewrites
earlier turns) raises `TemplateError`.

Tokens. The render is cut at those boundaries and each piece is tokenized on its own
(`encode_piece`: the tokenizer's start-of-text prefix, such as SentencePiece's "▁", only on the
first piece), so token boundaries coincide with span boundaries and the prompt is tokenized as
at inference, where the generation prompt ends the text. The ids equal the tokenizer's encoding
of the whole render except where the whole-text encoding would merge characters across a
boundary; they decode to the render, never adding a character (transformers' own encoding with
a Metaspace "always" or legacy `Prepend` tokenizer adds "▁" after every special token).

`sft_segments` turns one SFT record into the segments that `jaxllm.data.sft_packing` lays
into rows; `jaxllm.data.preference_data` builds preference rows from `encode_conversation`.
"""

from __future__ import annotations

import bisect
import re
from typing import Any, Sequence

import numpy as np

# Callers use these as chat.X: a conversation's encoding and its template go together.
from jaxllm.data.chat_template import (  # noqa: F401
    BUILTIN_TEMPLATES, GEN_CLOSE, GEN_OPEN, ChatTemplate, TemplateError, load_template)

ROLES = ("system", "user", "assistant")
TRUNCATION = ("truncate_end", "drop")


class ConversationError(ValueError):
    """A malformed conversation; `reason` is the skip-count key (no message index in it)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}{': ' + detail if detail else ''}")
        self.reason = reason


# ----------------------------------------------------------------------------- tokenization


def _special_strings(tokenizer) -> dict[str, int]:
    """bos/eos token text -> id. SentencePiece never matches control pieces in text, so the
    template's bos/eos strings are mapped to their ids by hand (harmless for HF tokenizers)."""
    out = {}
    for name in ("bos", "eos"):
        i = getattr(tokenizer, f"{name}_id")
        if i is None or i < 0:
            continue
        text = getattr(tokenizer, f"{name}_token", None)
        if text is None and hasattr(tokenizer, "id_to_piece"):
            text = tokenizer.id_to_piece(i)
        if text:
            out[text] = i
    return out


def validate_messages(messages: Any) -> list[dict]:
    """The conversation, or ConversationError saying what is wrong with it."""
    if not isinstance(messages, list) or not messages:
        raise ConversationError("empty conversation" if isinstance(messages, list) else "messages is not a list")
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ConversationError("message lacks role or content", f"message {k}")
        if m["role"] not in ROLES:
            raise ConversationError("unknown role", f"message {k} has role {m['role']!r}")
        if not isinstance(m["content"], str):
            raise ConversationError("content is not a string", f"message {k}")
    if not any(m["role"] == "assistant" for m in messages):
        raise ConversationError("no assistant turn")
    return messages


def _message_bounds(messages: Sequence[dict], template: ChatTemplate, render) -> tuple[list[tuple[int, int, int]], str]:
    """([(start, head, end)] of each message in the whole render, found prefix by prefix, the
    render); `head` is where an assistant reply starts (after its generation prompt), else `start`."""

    def check(prefix: str, text: str, what: str):
        if not text.startswith(prefix):
            raise TemplateError(
                f"{template.name}: rendering is not prefix-consistent ({what}); the loss mask needs "
                f"each conversation prefix to render as a prefix of the whole. Got {prefix[-60:]!r} "
                f"vs {text[len(prefix) - 60:len(prefix) + 20]!r}")

    bounds, prev = [], ""
    for i, message in enumerate(messages):
        cur = render(messages[:i + 1])
        check(prev, cur, f"messages[:{i}] vs messages[:{i + 1}]")
        head = prev
        if message["role"] == "assistant":
            try:
                head = render(messages[:i], True)
            except Exception:
                if i:
                    raise
                head = prev  # a template that cannot render no messages: locate the reply instead
            if head == prev and not template.has_generation:  # add_generation_prompt ignored: find the reply
                if not message["content"].strip():
                    raise ConversationError("empty reply the template cannot locate",
                                            f"message {i}; the template ignores add_generation_prompt")
                at = cur.find(message["content"].strip(), len(prev))
                if at < 0:
                    raise TemplateError(f"{template.name}: cannot locate assistant message {i} in the "
                                        "render (the template ignores add_generation_prompt)")
                head = cur[:at]
            check(prev, head, f"messages[:{i}] vs its generation prompt")
            check(head, cur, f"generation prompt vs messages[:{i + 1}]")
        bounds.append((len(prev), len(head), len(cur)))
        prev = cur
    return bounds, prev


def render_segments(messages: Sequence[dict], template: ChatTemplate, *, bos_token: str = "",
                    eos_token: str = "") -> list[tuple[str, int]]:
    """The rendered conversation as (text, turn) pieces: turn k > 0 on the trained text of the
    k-th assistant message (its generation blocks, or its reply up to trailing whitespace)."""
    def render(msgs, gen=False):
        return template.render(msgs, bos_token=bos_token, eos_token=eos_token, add_generation_prompt=gen)

    if template.has_generation and any(c in m["content"] for m in messages for c in (GEN_OPEN, GEN_CLOSE)):
        raise ConversationError("content has a reserved character", "U+FDD0 or U+FDD1")
    bounds, text = _message_bounds(messages, template, render)
    turn_of = list(np.cumsum([m["role"] == "assistant" for m in messages]))
    if template.has_generation:
        marked, spans = template.render_spans(messages, bos_token=bos_token, eos_token=eos_token)
        if marked != text:
            raise TemplateError(f"{template.name}: renders differently from one call to the next")
    else:
        spans = []
        for (_, head, end), m in zip(bounds, messages):
            if m["role"] == "assistant":  # trailing newline after the end marker: not the model's to predict
                spans.append((head, head + len(text[head:end].rstrip())))
    cuts = sorted({0, len(text)} | {x for b in bounds for x in b} | {x for sp in spans for x in sp})
    ends = [end for _, _, end in bounds]
    segments = []
    for a, b in zip(cuts, cuts[1:]):
        i = min(bisect.bisect_right(ends, a), len(messages) - 1)  # the message holding text[a:b]
        trained = any(s <= a and b <= e for s, e in spans)
        if trained and messages[i]["role"] != "assistant":
            raise TemplateError(f"{template.name}: a generation block outside an assistant message "
                                f"(message {i}, {messages[i]['role']})")
        segments.append((text[a:b], int(turn_of[i]) if trained else 0))
    return [(t, k) for t, k in segments if t]


class ChatEncoder:
    """Text -> ids with the template's bos/eos strings mapped to their ids, plus those strings.

    `encode(text, start)` encodes a piece of a longer text through the tokenizer's
    `encode_piece` (the start-of-text prefix only where `start`); a tokenizer without one
    (no such prefix) uses `encode`."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.specials = _special_strings(tokenizer)
        self._split = (re.compile("(" + "|".join(map(re.escape, sorted(self.specials, key=len, reverse=True))) + ")")
                       if self.specials else None)
        piece = getattr(tokenizer, "encode_piece", None)
        self._piece = piece if piece is not None else lambda text, start: tokenizer.encode(text)
        by_id = {i: s for s, i in self.specials.items()}
        self.bos_token = by_id.get(tokenizer.bos_id, "")
        self.eos_token = by_id.get(tokenizer.eos_id, "")

    def encode(self, text: str, start: bool = False) -> list[int]:
        if self._split is None:
            return self._piece(text, start)
        ids = []
        for k, part in enumerate(self._split.split(text)):
            if k % 2:
                ids.append(self.specials[part])
            elif part:
                ids += self._piece(part, start and k == 0)
        return ids


def encode_conversation(messages: Any, tokenizer, template: ChatTemplate | str | None, *,
                        add_bos: bool = False, encoder: ChatEncoder | None = None
                        ) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32, turns int32) of one whole conversation, untruncated.

    turns[t] is k on the trained tokens of the k-th assistant message (1, 2, ...; see
    `render_segments`) and 0 elsewhere. Malformed conversations raise ConversationError.
    `add_bos` prepends BOS unless the template already starts with it.
    """
    messages = validate_messages(messages)
    template = load_template(template, tokenizer)
    encoder = encoder or ChatEncoder(tokenizer)
    segments = render_segments(messages, template, bos_token=encoder.bos_token, eos_token=encoder.eos_token)
    ids, turns = [], []
    for n, (text, turn) in enumerate(segments):
        piece = encoder.encode(text, start=n == 0)
        ids += piece
        turns += [turn] * len(piece)
    if add_bos and tokenizer.bos_id >= 0 and ids[:1] != [tokenizer.bos_id]:
        ids, turns = [tokenizer.bos_id] + ids, [0] + turns
    return np.asarray(ids, np.int32), np.asarray(turns, np.int32)


def tokenize_conversation(messages: Any, tokenizer, template: ChatTemplate | str, *, max_len: int,
                          truncation: str = "truncate_end", add_bos: bool = False
                          ) -> tuple[np.ndarray, np.ndarray] | None:
    """(ids int32, loss_mask int32) of one conversation; mask 1 on assistant reply tokens.

    Longer than `max_len`: "truncate_end" cuts the end, "drop" returns None; None too when the
    cut leaves no assistant token. Malformed conversations raise ConversationError.
    `add_bos` prepends BOS unless the template already starts with it.
    """
    if truncation not in TRUNCATION:
        raise ValueError(f"truncation must be one of {TRUNCATION}, got {truncation!r}")
    ids, turns = encode_conversation(messages, tokenizer, template, add_bos=add_bos)
    mask = (turns > 0).astype(np.int32)
    if len(ids) > max_len:
        if truncation == "drop":
            return None
        ids, mask = ids[:max_len], mask[:max_len]
    if not mask.any():
        return None
    return ids, mask


def sft_segments(messages: Any, tokenizer, template: ChatTemplate | str, *, max_len: int,
                 truncation: str = "truncate_end", add_bos: bool = False, negative: str | None = None,
                 encoder: ChatEncoder | None = None) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The packing segments of one SFT record: [(ids, loss_mask, ul_mask)] (int32 each).

    The conversation itself (loss_mask on assistant tokens, ul_mask 0), then, when `negative`
    is given (an alternative reply to the last user turn), that turn's context followed by the
    negative reply (loss_mask 0, ul_mask 1 on the negative reply's tokens). Each segment holds
    at most `max_len` tokens under `truncation`; a record that cannot be kept raises
    ConversationError with the skip reason ("too long", "no assistant token after truncation",
    "no user turn before the negative reply", "empty negative reply", "negative reply does not fit").
    """
    if truncation not in TRUNCATION:
        raise ValueError(f"truncation must be one of {TRUNCATION}, got {truncation!r}")
    template = load_template(template, tokenizer)
    encoder = encoder or ChatEncoder(tokenizer)

    def fit(ids, mask, what_empty: str):
        if len(ids) > max_len:
            if truncation == "drop":
                raise ConversationError("too long")
            ids, mask = ids[:max_len], mask[:max_len]
        if not mask.any():
            raise ConversationError(what_empty)
        return ids, mask

    ids, turns = encode_conversation(messages, tokenizer, template, add_bos=add_bos, encoder=encoder)
    ids, mask = fit(ids, (turns > 0).astype(np.int32), "no assistant token after truncation")
    out = [(ids, mask, np.zeros_like(mask))]
    if negative is not None:
        if not isinstance(negative, str):
            raise ConversationError("negative reply is not a string")
        if not negative.strip():
            raise ConversationError("empty negative reply")
        users = [k for k, m in enumerate(messages) if m["role"] == "user"]
        if not users:
            raise ConversationError("no user turn before the negative reply")
        context = list(messages[:users[-1] + 1])
        neg_ids, neg_turns = encode_conversation(context + [{"role": "assistant", "content": negative}], tokenizer,
                                                 template, add_bos=add_bos, encoder=encoder)
        last = sum(m["role"] == "assistant" for m in context) + 1
        neg_ids, ul = fit(neg_ids, (neg_turns == last).astype(np.int32), "negative reply does not fit")
        out.append((neg_ids, np.zeros_like(ul), ul))
    return out
