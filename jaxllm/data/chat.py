"""Chat SFT data: conversations -> chat template -> (ids, loss mask) -> packed rows.

A conversation is a `messages` list of `{"role": "system"|"user"|"assistant", "content": str}`
(the tulu-3-sft-mixture / SmolTalk format).

Templates are Jinja2 strings like Hugging Face's `chat_template`, rendered in a sandbox with
transformers' settings (trim_blocks, lstrip_blocks, loop controls, `raise_exception`) and the
variables `messages`, `bos_token`, `eos_token`, `add_generation_prompt`. The built-ins
(`chatml`, `tulu`, `llama3`) are Jinja strings too, so every template goes through one path.

Loss spans are found template-agnostically, as open-instruct does, by rendering the
conversation prefix by prefix: for an assistant message i the text between
render(messages[:i], add_generation_prompt=True) and render(messages[:i+1]) is the reply
(content plus the turn's end marker / eos); the role header before it and whitespace after it
are not trained on. Each such piece is tokenized on its own and the ids concatenated, so the
token boundaries always coincide with the span boundaries (tokenizing the whole string could
merge tokens across a boundary) and the prompt is tokenized exactly as at inference, where the
generation prompt is tokenized alone. A template whose renders are not prefixes of each other
(e.g. one that rewrites earlier turns) raises `TemplateError`.

Packing (`pack_examples`, `SFTRows`, and `SFTPackIterDataset` for the checkpointable grain
pipeline of jaxllm.data.tasks) keeps conversations whole: the packer in packing.py splits
documents across rows and carries no per-token mask, so a small greedy packer lives here.
Row contract as in packing.py (tokens, targets, positions, segment_ids int32; loss_mask
float32; all [seq_len]) except that loss_mask is 1 only where the *target* is an assistant
token, plus ul_mask (float32): 1 where the target is a token of a negative reply (a segment of
its own, see `sft_segments`), for the unlikelihood loss. Whether the loss is averaged over
those tokens per batch (`reduce_loss: mean`) or summed (`sum`, so long replies weigh more) is
the trainer's choice; rows just carry the masks.
"""

from __future__ import annotations

import array
import collections
import copy
import json
import logging
import os
import re
from typing import Any, Iterable, Iterator, Sequence

import grain
import numpy as np

from jaxllm.data import sources

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
TRUNCATION = ("truncate_end", "drop")

BUILTIN_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"),
    # open-instruct's tulu template (the last assistant turn gets no trailing newline).
    "tulu": (
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ '<|system|>\n' + message['content'] + '\n' }}"
        "{% elif message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '\n' }}"
        "{% elif message['role'] == 'assistant' %}"
        "{% if not loop.last %}{{ '<|assistant|>\n' + message['content'] + eos_token + '\n' }}"
        "{% else %}{{ '<|assistant|>\n' + message['content'] + eos_token }}{% endif %}"
        "{% endif %}"
        "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
        "{% endfor %}"),
    "llama3": (
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
        " + message['content'] | trim + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"),
}


class TemplateError(ValueError):
    """A template that does not compile, or does not render conversation prefixes consistently."""


class ConversationError(ValueError):
    """A malformed conversation; `reason` is the skip-count key (no message index in it)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}{': ' + detail if detail else ''}")
        self.reason = reason


# ----------------------------------------------------------------------------- templates


class ChatTemplate:
    """A compiled Jinja2 chat template."""

    def __init__(self, source: str, name: str = "<template>"):
        from jinja2 import TemplateSyntaxError
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(f"{name}: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = lambda x, indent=None: json.dumps(x, indent=indent, ensure_ascii=False)
        env.globals["raise_exception"] = raise_exception
        try:
            self._template = env.from_string(source)
        except TemplateSyntaxError as e:
            raise TemplateError(f"{name}: bad Jinja template: {e}") from e
        self.source, self.name = source, name

    def render(self, messages: Sequence[dict], *, bos_token: str = "", eos_token: str = "",
               add_generation_prompt: bool = False) -> str:
        return self._template.render(messages=list(messages), bos_token=bos_token, eos_token=eos_token,
                                     add_generation_prompt=add_generation_prompt)

    def __repr__(self) -> str:
        return f"ChatTemplate({self.name})"


def load_template(spec: str | ChatTemplate | None = None, tokenizer=None) -> ChatTemplate:
    """A template from a built-in name, a `tokenizer_config.json` path (or its folder), a Jinja
    string, or (spec None) the tokenizer's own `chat_template`."""
    if isinstance(spec, ChatTemplate):
        return spec
    if spec is None:
        source = getattr(tokenizer, "chat_template", None)
        if source is None:
            raise TemplateError("no chat template given and the tokenizer has none")
        return ChatTemplate(_pick_template(source, "tokenizer"), "tokenizer chat_template")
    if spec in BUILTIN_TEMPLATES:
        return ChatTemplate(BUILTIN_TEMPLATES[spec], spec)
    if "{{" in spec or "{%" in spec:
        return ChatTemplate(spec)
    path = os.path.expanduser(spec)
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer_config.json")
    if not os.path.isfile(path):
        raise TemplateError(f"{spec}: not a built-in template ({', '.join(BUILTIN_TEMPLATES)}), "
                            "a Jinja string, or a tokenizer_config.json")
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    if "chat_template" not in config:
        raise TemplateError(f"{path}: no chat_template")
    return ChatTemplate(_pick_template(config["chat_template"], path), path)


def _pick_template(value, where: str) -> str:
    # Newer configs may hold a list of named templates; SFT wants the default one.
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if "default" not in named:
            raise TemplateError(f"{where}: chat_template list has no 'default' ({', '.join(map(str, named))})")
        value = named["default"]
    if not isinstance(value, str):
        raise TemplateError(f"{where}: chat_template is not a string")
    return value


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


def _encoder(tokenizer):
    specials = _special_strings(tokenizer)
    if not specials:
        return tokenizer.encode
    pattern = re.compile("(" + "|".join(map(re.escape, sorted(specials, key=len, reverse=True))) + ")")

    def encode(text: str) -> list[int]:
        ids = []
        for k, part in enumerate(pattern.split(text)):
            if k % 2:
                ids.append(specials[part])
            elif part:
                ids += tokenizer.encode(part)
        return ids
    return encode


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


def render_segments(messages: Sequence[dict], template: ChatTemplate, *, bos_token: str = "",
                    eos_token: str = "") -> list[tuple[str, bool]]:
    """The rendered conversation as (text, is_assistant) pieces, found prefix by prefix."""
    render = lambda msgs, gen=False: template.render(msgs, bos_token=bos_token, eos_token=eos_token,
                                                     add_generation_prompt=gen)

    def check(prefix: str, text: str, what: str):
        if not text.startswith(prefix):
            raise TemplateError(
                f"{template.name}: rendering is not prefix-consistent ({what}); the loss mask needs "
                f"each conversation prefix to render as a prefix of the whole. Got {prefix[-60:]!r} "
                f"vs {text[len(prefix) - 60:len(prefix) + 20]!r}")

    segments: list[tuple[str, bool]] = []
    prev = ""
    for i, message in enumerate(messages):
        cur = render(messages[:i + 1])
        check(prev, cur, f"messages[:{i}] vs messages[:{i + 1}]")
        if message["role"] != "assistant":
            segments.append((cur[len(prev):], False))
        else:
            try:
                head = render(messages[:i], True)
            except Exception:
                if i:
                    raise
                head = prev  # a template that cannot render no messages: locate the reply instead
            if head == prev:  # the template ignores add_generation_prompt: find the reply itself
                at = cur.find(message["content"].strip(), len(prev)) if message["content"].strip() else -1
                if at < 0:
                    raise TemplateError(f"{template.name}: cannot locate assistant message {i} in the "
                                        "render (the template ignores add_generation_prompt)")
                head = cur[:at]
            check(prev, head, f"messages[:{i}] vs its generation prompt")
            check(head, cur, f"generation prompt vs messages[:{i + 1}]")
            reply = cur[len(head):]
            body = reply.rstrip()  # trailing newline after the end marker: not the model's to predict
            segments += [(head[len(prev):], False), (body, True), (reply[len(body):], False)]
        prev = cur
    return [(text, a) for text, a in segments if text]


class _Encoder:
    """Text -> ids with the template's bos/eos strings mapped to their ids, plus those strings."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.encode = _encoder(tokenizer)
        specials = {i: s for s, i in _special_strings(tokenizer).items()}
        self.bos_token = specials.get(tokenizer.bos_id, "")
        self.eos_token = specials.get(tokenizer.eos_id, "")


def encode_conversation(messages: Any, tokenizer, template: ChatTemplate | str | None, *,
                        add_bos: bool = False, encoder: _Encoder | None = None
                        ) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32, turns int32) of one whole conversation, untruncated.

    turns[t] is k on the tokens of the k-th assistant reply (1, 2, ...; content plus its end
    marker) and 0 elsewhere. Malformed conversations raise ConversationError. `add_bos`
    prepends BOS unless the template already starts with it.
    """
    messages = validate_messages(messages)
    template = load_template(template, tokenizer)
    encoder = encoder or _Encoder(tokenizer)
    segments = render_segments(messages, template, bos_token=encoder.bos_token, eos_token=encoder.eos_token)
    ids, turns, k = [], [], 0
    for text, is_assistant in segments:
        piece = encoder.encode(text)
        k += is_assistant
        ids += piece
        turns += [k if is_assistant else 0] * len(piece)
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
                 encoder: _Encoder | None = None) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
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
    encoder = encoder or _Encoder(tokenizer)

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


# ----------------------------------------------------------------------------- packing


def pack_examples(examples: Iterable[tuple[np.ndarray, np.ndarray]], seq_len: int,
                  pad_id: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Greedily packs (ids, mask) examples of at most seq_len + 1 tokens into rows, whole.

    An example of n tokens takes n - 1 positions (its (token, next token) pairs); one that does
    not fit in the current row's remainder starts the next row (the rest is padding).
    """
    rows = _RowBuilder(seq_len, pad_id)
    for ids, mask in examples:
        n = len(ids) - 1
        if n > seq_len:
            raise ValueError(f"example of {len(ids)} tokens does not fit seq_len {seq_len} (max {seq_len + 1})")
        if n < 1:
            continue
        if rows.filled + n > seq_len:
            yield rows.flush()
        rows.add(np.asarray(ids, np.int32), np.asarray(mask, np.float32))
    if rows.filled:
        yield rows.flush()


class _RowBuilder:
    def __init__(self, seq_len: int, pad_id: int):
        if seq_len <= 0:
            raise ValueError(f"seq_len must be > 0, got {seq_len}")
        self.seq_len, self.pad_id = seq_len, pad_id
        self._reset()

    def _reset(self):
        n = self.seq_len
        self.row = {"tokens": np.full(n, self.pad_id, np.int32), "targets": np.full(n, self.pad_id, np.int32),
                    "positions": np.zeros(n, np.int32), "segment_ids": np.zeros(n, np.int32),
                    "loss_mask": np.zeros(n, np.float32), "ul_mask": np.zeros(n, np.float32)}
        self.filled = self.segments = 0

    def add(self, ids: np.ndarray, mask: np.ndarray, ul_mask: np.ndarray | None = None):
        a, n = self.filled, len(ids) - 1
        self.segments += 1
        self.row["tokens"][a:a + n] = ids[:-1]
        self.row["targets"][a:a + n] = ids[1:]
        self.row["positions"][a:a + n] = np.arange(n, dtype=np.int32)
        self.row["segment_ids"][a:a + n] = self.segments
        self.row["loss_mask"][a:a + n] = mask[1:]  # the loss is on predicting the target
        if ul_mask is not None:
            self.row["ul_mask"][a:a + n] = ul_mask[1:]
        self.filled += n

    def flush(self) -> dict[str, np.ndarray]:
        row = self.row
        self._reset()
        return row


class SFTRows:
    """Iterable of packed SFT rows from conversations (a ConversationSource or any iterable of
    messages lists). Bad conversations are counted in `skipped` by reason (after an iteration),
    or raise ConversationError naming the record when `strict`."""

    def __init__(self, conversations: Iterable, tokenizer, template: ChatTemplate | str | None, seq_len: int, *,
                 truncation: str = "truncate_end", strict: bool = False, add_bos: bool = False):
        if truncation not in TRUNCATION:
            raise ValueError(f"truncation must be one of {TRUNCATION}, got {truncation!r}")
        self.conversations, self.tokenizer = conversations, tokenizer
        self.template = load_template(template, tokenizer)
        self.seq_len, self.truncation, self.strict, self.add_bos = seq_len, truncation, strict, add_bos
        self.skipped: collections.Counter = collections.Counter()
        self.kept = 0

    def examples(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        self.skipped, self.kept = collections.Counter(), 0
        where = getattr(self.conversations, "where", lambda i: f"record {i}")
        for i, messages in enumerate(self.conversations):
            try:
                ex = tokenize_conversation(messages, self.tokenizer, self.template, max_len=self.seq_len + 1,
                                           truncation=self.truncation, add_bos=self.add_bos)
            except ConversationError as e:
                if self.strict:
                    raise ConversationError(f"{where(i)}: {e}") from e
                self.skipped[e.reason] += 1
                continue
            if ex is None:
                self.skipped["too long" if self.truncation == "drop" else "no assistant token after truncation"] += 1
                continue
            self.kept += 1
            yield ex
        if self.skipped:
            log.warning("SFT: skipped %d of %d conversations (%s)", sum(self.skipped.values()),
                        sum(self.skipped.values()) + self.kept,
                        ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items())))

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return pack_examples(self.examples(), self.seq_len, self.tokenizer.pad_id)


class SFTPackIterDataset(grain.IterDataset):
    """Packs a stream of SFT examples whole into rows, as a checkpointable grain stage.

    Each element of the parent is a list of segments (ids, loss_mask, ul_mask) of at most
    seq_len + 1 tokens (one record: its conversation and maybe a negative reply); each segment
    is laid whole into a row, greedily as `pack_examples` does; a segment that does not fit the
    current row's remainder starts the next row. `pack=False` gives every segment a row of its
    own (one conversation per row, padded). The state is the parent's state before the
    record being laid out plus how many of its segments were emitted, so it is JSON-able and a
    restore resumes with exactly the rows that would have come next.
    """

    def __init__(self, parent: grain.IterDataset, seq_len: int, pad_id: int = 0, *, pack: bool = True):
        super().__init__(parent)
        if seq_len <= 0:
            raise ValueError(f"seq_len must be > 0, got {seq_len}")
        self._seq_len, self._pad_id, self._pack = seq_len, pad_id, pack

    def __iter__(self) -> grain.DatasetIterator:
        return _SFTPackIterator(self._parent.__iter__(), self._seq_len, self._pad_id, self._pack)

    def __str__(self) -> str:
        return f"SFTPackIterDataset(seq_len={self._seq_len}, pack={self._pack})"


class _SFTPackIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, seq_len: int, pad_id: int, pack: bool):
        super().__init__(parent)
        self._rows = _RowBuilder(seq_len, pad_id)
        self._pack = pack
        self._segments: list | None = None  # the record being laid out, if any
        self._record_state: dict | None = None  # parent state just before that record
        self._done = 0  # its segments already placed

    def _next_record(self) -> bool:
        state = copy.deepcopy(self._parent.get_state())
        try:
            segments = next(self._parent)
        except StopIteration:
            return False
        self._segments, self._record_state, self._done = list(segments), state, 0
        return True

    def __next__(self) -> dict[str, np.ndarray]:
        rows, seq_len = self._rows, self._rows.seq_len
        while True:
            if self._segments is None and not self._next_record():
                break
            if self._done == len(self._segments):
                self._segments = None
                continue
            ids, mask, ul = self._segments[self._done]
            n = len(ids) - 1
            if n > seq_len:
                raise ValueError(f"segment of {len(ids)} tokens does not fit seq_len {seq_len} (max {seq_len + 1})")
            if n >= 1:
                if rows.filled + n > seq_len or (rows.filled and not self._pack):
                    return rows.flush()  # the segment stays pending for the next row
                rows.add(np.asarray(ids, np.int32), np.asarray(mask, np.float32), np.asarray(ul, np.float32))
            self._done += 1
            if rows.filled == seq_len:
                return rows.flush()
        if rows.filled:
            return rows.flush()
        raise StopIteration

    def get_state(self) -> dict[str, Any]:
        if self._segments is None:
            return {"parent": copy.deepcopy(self._parent.get_state()), "done": 0, "pending": False}
        return {"parent": copy.deepcopy(self._record_state), "done": self._done, "pending": True}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._segments = None
        self._rows.flush()  # rows are emitted whole, so none is half built at a state
        if state["pending"]:
            # Re-read the record being laid out and skip the segments already placed.
            if not self._next_record():
                raise ValueError("cannot restore SFT packing state: the stream ended before the pending record")
            self._done = int(state["done"])

    def __str__(self) -> str:
        return f"SFTPackIterator(seq_len={self._rows.seq_len})"


# ----------------------------------------------------------------------------- reading


_TYPE_NAMES = {list: "a list", str: "a string", int: "a number", float: "a number", bool: "a boolean",
               dict: "a mapping"}


def _type_phrase(types: tuple[type, ...]) -> str:
    names = list(dict.fromkeys(_TYPE_NAMES.get(t, t.__name__) for t in types))
    return " or ".join(names)


def _has_type(value, types: tuple[type, ...]) -> bool:
    if isinstance(value, bool) and bool not in types:
        return False  # JSON true is not a number here
    return isinstance(value, types)


def _is_jsonl(path: str) -> bool:
    return path.endswith(sources.JSONL_SUFFIXES + sources.COMPRESSED_JSONL_SUFFIXES)


class RecordSource:
    """Random-access records (dicts of chosen fields) from jsonl (also `.jsonl.gz` / `.jsonl.zst`,
    read through their decompressed copy as `JsonlSource` does) / parquet files.

    Files are resolved like pretraining sources (`sources.resolve_files`: files, folders, globs).
    The index holds positions, not records: jsonl by (file, byte offset, length) like
    `JsonlSource`, parquet by (file, row group, row) read one row group at a time like
    `ParquetSource`. `fields` maps each required field to the Python types a jsonl value may
    have; `optional` likewise for fields a record may lack (null counts as absent). Records
    that are not JSON, lack a required field or hold a value of another type are counted in
    `skipped` (strict: SourceError naming file and line/row). Parquet rows are checked for
    nulls only (a column has one type); content checks happen where the record is used.
    A record is a dict of the required fields and the optional ones it has.
    """

    def __init__(self, path_specs: str | Sequence[str], fields: dict[str, tuple[type, ...]],
                 optional: dict[str, tuple[type, ...]] | None = None, *, strict: bool = False,
                 cache_row_groups: int = 4):
        specs = [path_specs] if isinstance(path_specs, str) else list(path_specs)
        self.files = [f for spec in specs for f in sources.resolve_files(spec)
                      if _is_jsonl(f) or f.endswith(sources.PARQUET_SUFFIXES)]
        if not self.files:
            raise sources.SourceError(f"{', '.join(specs)}: no .jsonl, .jsonl.gz, .jsonl.zst or .parquet files")
        self.fields, self.optional = dict(fields), dict(optional or {})
        overlap = set(self.fields) & set(self.optional)
        if overlap:
            raise ValueError(f"fields both required and optional: {sorted(overlap)}")
        skips = sources._Skips(strict)
        # (file id, offset | row group, length | row, line) per record, as compact arrays.
        self._index = [array.array("i"), array.array("q"), array.array("q"), array.array("q")]
        self._columns: dict[int, list[str]] = {}  # parquet file id -> the fields it has
        self._read_paths: dict[int, str] = {}  # jsonl file id -> the plain file its lines are read from
        for file_id, path in enumerate(self.files):
            if _is_jsonl(path):
                self._index_jsonl(file_id, path, skips)
            else:
                self._index_parquet(file_id, path, skips)
        self.skipped = skips.counts
        skips.report(sources._describe(self.files), len(self))
        self._caches = {f: sources.RowGroupCache(self.files, f, cache_row_groups)
                        for f in (*self.fields, *self.optional)}

    def _add(self, file_id: int, a: int, b: int, line: int = 0):
        for arr, v in zip(self._index, (file_id, a, b, line)):
            arr.append(v)

    def _index_jsonl(self, file_id: int, path: str, skips):
        read_path, truncated = sources.uncompressed_jsonl(path)
        self._read_paths[file_id] = read_path
        offset = 0
        with open(read_path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                start, offset = offset, offset + len(line)
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line.decode("utf-8"))
                except ValueError as e:  # UnicodeDecodeError is a ValueError too
                    skips("malformed JSON", f"{path}:{lineno}", str(e))
                    continue
                if self._check(obj if isinstance(obj, dict) else {}, f"{path}:{lineno}", skips):
                    self._add(file_id, start, len(line), lineno)
        if truncated:
            skips("truncated file", f"{path}:{truncated['line']}", truncated["error"])

    def _check(self, obj: dict, where: str, skips) -> bool:
        for name, types in (*self.fields.items(), *self.optional.items()):
            value = obj.get(name)
            if value is None:
                if name in self.fields:
                    skips(f"missing field {name!r}", where)
                    return False
            elif not _has_type(value, types):
                skips(f"field {name!r} is not {_type_phrase(types)}", where)
                return False
        return True

    def _index_parquet(self, file_id: int, path: str, skips):
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
        for name in self.fields:
            if name not in names:
                raise sources.SourceError(f"{path}: no column {name!r} (columns: {', '.join(names)})")
        self._columns[file_id] = [n for n in (*self.fields, *self.optional) if n in names]
        for rg in range(pf.num_row_groups):
            table = pf.read_row_group(rg, columns=list(self.fields))
            nulls = [table.column(n).is_null().to_numpy(zero_copy_only=False) for n in self.fields]
            for row in range(table.num_rows):
                missing = next((n for n, null in zip(self.fields, nulls) if null[row]), None)
                if missing is None:
                    self._add(file_id, rg, row)
                else:
                    skips(f"missing field {missing!r}", f"{path}: row group {rg}, row {row}")

    def __len__(self) -> int:
        return len(self._index[0])

    def where(self, index: int) -> str:
        file_id, a, b, line = (arr[index] for arr in self._index)
        path = self.files[file_id]
        if file_id in self._read_paths:
            return f"{path}:{line}"
        return f"{path}: row group {a}, row {b}"

    def record(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        file_id, a, b, _ = (arr[index] for arr in self._index)
        if file_id in self._read_paths:
            with open(self._read_paths[file_id], "rb") as f:
                f.seek(a)
                obj = json.loads(f.read(b))
            names = (*self.fields, *self.optional)
        else:
            names = self._columns[file_id]
            obj = {n: self._caches[n].get(file_id, a)[b].as_py() for n in names}
        return {n: obj[n] for n in names if obj.get(n) is not None}

    __getitem__ = record

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return (self[i] for i in range(len(self)))


class ConversationSource(RecordSource):
    """Random-access conversations (messages lists) from jsonl / parquet files: a RecordSource of
    the one list field `messages_field`, returning its value. Message-level checks happen at
    tokenization."""

    def __init__(self, path_specs: str | Sequence[str], messages_field: str = "messages", *,
                 strict: bool = False, cache_row_groups: int = 4):
        super().__init__(path_specs, {messages_field: (list,)}, strict=strict, cache_row_groups=cache_row_groups)
        self.field = messages_field

    def __getitem__(self, index: int) -> list[dict]:
        return self.record(index)[self.field]

    def __iter__(self) -> Iterator[list[dict]]:
        return (self[i] for i in range(len(self)))


def read_conversations(path_specs: str | Sequence[str], messages_field: str = "messages", *,
                       strict: bool = False) -> ConversationSource:
    """The conversations of jsonl / parquet files, folders or globs, as a random-access source."""
    return ConversationSource(path_specs, messages_field, strict=strict)
