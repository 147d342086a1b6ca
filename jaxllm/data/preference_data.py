"""Preference data: pairs (DPO, reward models) and unpaired KTO examples -> token rows.

Pairs follow UltraFeedback-binarized: `prompt` (a string, a messages list, or absent: then the
chosen list's messages before its last turn), `chosen` and `rejected` (messages lists ending
with the assistant reply, or plain strings holding the reply text); field names come from the
`preference:` config section. KTO examples (TRL's unpaired format) hold `prompt`, `completion`
(a string, or a messages list ending with the assistant reply) and `label` (true: desirable).

Tokens: the prompt is rendered with the chat template and the generation prompt, the completion
is the reply plus the template's turn end, both found by chat.py's prefix rendering
(`chat.encode_conversation`), so the token boundaries are exactly those of SFT and inference.
Nothing after the turn end (e.g. chatml's newline) is kept. With `add_bos`, BOS starts the
prompt unless the template puts it there itself.

Truncation: a prompt longer than `preference.max_prompt_len` (> 0) keeps its end (and its BOS);
then prompt + completion must fit `data.seq_len + 1` tokens, else the completion is cut at the
end. A completion left without a token skips the record (reason "prompt leaves no room for a
completion"). Rows are not packed: one sequence per row, padded to seq_len (`rows.sequence_row`):
  tokens, targets, positions (0..n-1), segment_ids (1 on real tokens, 0 on padding): int32;
  loss_mask float32, 1 where the target is a completion token.
Bad records raise `chat.ConversationError` whose `reason` is the skip-count key; callers count
or (data.strict) raise with the record's file and line.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxllm.data import chat
from jaxllm.data.records import RecordSource
from jaxllm.data.rows import padding_row, prefixed, sequence_row

KTO_COMPLETION_FIELD = "completion"
KTO_LABEL_FIELD = "label"

_TEXT_OR_MESSAGES = (str, list)


def open_pairs(path_specs, pref_cfg, *, strict: bool = False) -> RecordSource:
    """Preference pairs of jsonl / parquet files, folders or globs, as a random-access source."""
    p = pref_cfg
    fields = {p.chosen_field: _TEXT_OR_MESSAGES, p.rejected_field: _TEXT_OR_MESSAGES}
    if p.margin_field:
        fields[p.margin_field] = (int, float)
    return RecordSource(path_specs, fields, {p.prompt_field: _TEXT_OR_MESSAGES}, strict=strict)


def open_kto(path_specs, pref_cfg, *, strict: bool = False) -> RecordSource:
    """Unpaired KTO examples (prompt, completion, label) as a random-access source."""
    return RecordSource(path_specs, {pref_cfg.prompt_field: _TEXT_OR_MESSAGES,
                                     KTO_COMPLETION_FIELD: _TEXT_OR_MESSAGES,
                                     KTO_LABEL_FIELD: (bool,)}, strict=strict)


# ----------------------------------------------------------------------------- records -> messages


def _prompt_messages(value: Any, field: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, list):
        return list(value)
    raise chat.ConversationError(f"field {field!r} is not a string or a list")


def _reply(value: Any, field: str) -> tuple[list[dict] | None, str]:
    """(the messages before the reply or None for a plain string, the reply text)."""
    if isinstance(value, str):
        return None, value
    if not isinstance(value, list) or not value:
        raise chat.ConversationError(f"field {field!r} is not a string or a non-empty list")
    last = value[-1]
    if not isinstance(last, dict) or last.get("role") != "assistant":
        raise chat.ConversationError(f"{field} does not end with an assistant turn")
    if not isinstance(last.get("content"), str):
        raise chat.ConversationError("content is not a string", f"last message of {field}")
    return list(value[:-1]), last["content"]


def pair_messages(record: dict, pref_cfg) -> tuple[list[dict], str, str]:
    """(prompt messages, chosen reply, rejected reply) of one preference record."""
    p = pref_cfg
    chosen_ctx, chosen = _reply(record.get(p.chosen_field), p.chosen_field)
    rejected_ctx, rejected = _reply(record.get(p.rejected_field), p.rejected_field)
    if p.prompt_field in record:
        prompt = _prompt_messages(record[p.prompt_field], p.prompt_field)
    elif chosen_ctx is None:
        raise chat.ConversationError(f"missing field {p.prompt_field!r}", "chosen is a plain string")
    else:
        prompt = chosen_ctx
        if rejected_ctx is not None and rejected_ctx != chosen_ctx:
            raise chat.ConversationError("chosen and rejected have different prompts")
    return prompt, chosen, rejected


def kto_messages(record: dict, pref_cfg) -> tuple[list[dict], str, bool]:
    """(prompt messages, completion reply, label) of one KTO record."""
    prompt = _prompt_messages(record.get(pref_cfg.prompt_field), pref_cfg.prompt_field)
    _, reply = _reply(record.get(KTO_COMPLETION_FIELD), KTO_COMPLETION_FIELD)
    label = record.get(KTO_LABEL_FIELD)
    if not isinstance(label, bool):
        raise chat.ConversationError(f"field {KTO_LABEL_FIELD!r} is not a boolean")
    return prompt, reply, label


# ----------------------------------------------------------------------------- tokens


class PromptCompletionEncoder:
    """(prompt messages, reply) -> (prompt ids, completion ids), truncated to fit a row."""

    def __init__(self, tokenizer, template, *, seq_len: int, max_prompt_len: int = 0, add_bos: bool = False):
        if seq_len <= 0:
            raise ValueError(f"seq_len must be > 0, got {seq_len}")
        self.tokenizer = tokenizer
        self.template = chat.load_template(template, tokenizer)
        self.encoder = chat.ChatEncoder(tokenizer)
        self.seq_len, self.max_prompt_len, self.add_bos = seq_len, max_prompt_len, add_bos

    def encode(self, prompt: list[dict], reply: str) -> tuple[np.ndarray, np.ndarray]:
        """The untruncated (prompt ids, completion ids)."""
        messages = chat.validate_messages(list(prompt) + [{"role": "assistant", "content": reply}])
        ids, turns = chat.encode_conversation(messages, self.tokenizer, self.template, add_bos=self.add_bos,
                                              encoder=self.encoder)
        last = sum(m["role"] == "assistant" for m in messages)
        at = np.flatnonzero(turns == last)
        if len(at) == 0:
            raise chat.ConversationError("empty completion")
        return ids[:at[0]], ids[at[0]:at[-1] + 1]

    def truncate_prompt(self, prompt: np.ndarray) -> np.ndarray:
        """The prompt's last max_prompt_len tokens (a leading BOS kept)."""
        m = self.max_prompt_len
        if m <= 0 or len(prompt) <= m:
            return prompt
        bos = self.tokenizer.bos_id
        if len(prompt) and bos >= 0 and prompt[0] == bos:
            return np.concatenate([prompt[:1], prompt[len(prompt) - m + 1:]]) if m > 1 else prompt[:1]
        return prompt[len(prompt) - m:]

    def fit(self, prompt: np.ndarray, completion: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(prompt, completion) cut so that together they hold at most seq_len + 1 tokens."""
        room = self.seq_len + 1 - len(prompt)
        if room < 1:
            raise chat.ConversationError("prompt leaves no room for a completion")
        if len(prompt) + min(room, len(completion)) < 2:
            raise chat.ConversationError("sequence shorter than 2 tokens")
        return prompt, completion[:room]

    def __call__(self, prompt: list[dict], reply: str) -> tuple[np.ndarray, np.ndarray]:
        p, c = self.encode(prompt, reply)
        return self.fit(self.truncate_prompt(p), c)


class PairBuilder:
    """A preference record -> the pair's row fields (chosen_*, rejected_*, and margin when
    preference.margin_field is set); ConversationError for a record to skip."""

    def __init__(self, tokenizer, template, pref_cfg, *, seq_len: int, add_bos: bool = False):
        self.pref = pref_cfg
        self.encode = PromptCompletionEncoder(tokenizer, template, seq_len=seq_len,
                                              max_prompt_len=pref_cfg.max_prompt_len, add_bos=add_bos)
        self.seq_len, self.pad_id = seq_len, tokenizer.pad_id

    def __call__(self, record: dict) -> dict[str, np.ndarray]:
        prompt, chosen, rejected = pair_messages(record, self.pref)
        out = {}
        for name, reply in (("chosen_", chosen), ("rejected_", rejected)):
            out.update(prefixed(name, sequence_row(*self.encode(prompt, reply), self.seq_len, self.pad_id)))
        if self.pref.margin_field:
            margin = record.get(self.pref.margin_field)
            if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not np.isfinite(margin):
                raise chat.ConversationError(f"field {self.pref.margin_field!r} is not a finite number")
            out["margin"] = np.float32(margin)
        return out

    def padding(self) -> dict[str, np.ndarray]:
        out = {**prefixed("chosen_", padding_row(self.seq_len, self.pad_id)),
               **prefixed("rejected_", padding_row(self.seq_len, self.pad_id))}
        if self.pref.margin_field:
            out["margin"] = np.float32(0.0)
        return out


class KTOBuilder:
    """A KTO record and its KL partner record -> the example's row fields: tokens ... loss_mask
    of prompt + completion, `label`, and kl_* of the same prompt + the partner's completion."""

    def __init__(self, tokenizer, template, pref_cfg, *, seq_len: int, add_bos: bool = False):
        self.pref = pref_cfg
        self.encode = PromptCompletionEncoder(tokenizer, template, seq_len=seq_len,
                                              max_prompt_len=pref_cfg.max_prompt_len, add_bos=add_bos)
        self.seq_len, self.pad_id = seq_len, tokenizer.pad_id

    def __call__(self, record: dict, partner: dict) -> dict[str, np.ndarray]:
        prompt, reply, label = kto_messages(record, self.pref)
        try:
            _, partner_reply = _reply(partner.get(KTO_COMPLETION_FIELD), KTO_COMPLETION_FIELD)
        except chat.ConversationError as e:
            raise chat.ConversationError(f"KL partner: {e.reason}") from e
        out = sequence_row(*self.encode(prompt, reply), self.seq_len, self.pad_id)
        out["label"] = np.float32(label)
        out.update(prefixed("kl_", sequence_row(*self.encode(prompt, partner_reply), self.seq_len, self.pad_id)))
        return out

    def padding(self) -> dict[str, np.ndarray]:
        row = padding_row(self.seq_len, self.pad_id)
        return {**row, "label": np.float32(0.0), **prefixed("kl_", padding_row(self.seq_len, self.pad_id))}
