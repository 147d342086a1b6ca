"""A Hugging Face `tokenizer.json` behind the same interface as the SentencePiece `Tokenizer`.

`tokenizer_config.json` beside the file (when present) gives the bos/eos/pad token strings; the
chat template is `chat_template.jinja` beside it (what current transformers saves) or else the
config's `chat_template`. Without a config bos/eos/pad ids are -1 / -1 / 0 like a SentencePiece
model without those pieces (or pass the token strings explicitly).

Pieces of a longer text (`encode_piece`, what chat encoding uses): SentencePiece-style
tokenizers add a prefix to the start of every text they are given (`Metaspace` with
prepend_scheme "first"/"always" or a legacy `Prepend("▁")` normalizer: "▁"; `ByteLevel` with
add_prefix_space: " "), and "always" / `Prepend` / `ByteLevel` add it again after every added
token. Encoded piece by piece, a conversation would gain a "▁" at every piece. `encode_piece`
uses a copy of the tokenizer with those prefixes off and adds the prefix once, at the start of
the whole text unless it begins with an added token or a space: transformers' behaviour for
prepend_scheme "first" (its `legacy=False`), for every kind.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

from tokenizers import Tokenizer as _HFTok

from jaxllm.data.chat_template import CONFIG_FILE, read_chat_template
from jaxllm.errors import UserError


def _token_str(value) -> str | None:
    # transformers serialises special tokens either as plain strings or as AddedToken dicts.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


# ----------------------------------------------------------------------------- start-of-text prefixes


class PrefixError(UserError, ValueError):
    """A tokenizer.json whose start-of-text prefix chat encoding cannot reproduce."""


def _scheme(metaspace: dict) -> str:
    # Older tokenizer.json files spell prepend_scheme as add_prefix_space (true: "always").
    return metaspace.get("prepend_scheme", "always" if metaspace.get("add_prefix_space", True) else "never")


def _without_prefix(spec: dict | None, found: list) -> dict | None:
    """`spec` (a normalizer or pre-tokenizer JSON) with its start-of-text prefix turned off;
    appends each prefix removed to `found`. Returns None for a removed Prepend normalizer."""
    if spec is None:
        return None
    kind = spec.get("type")
    if kind == "Sequence":
        key = "normalizers" if "normalizers" in spec else "pretokenizers"
        parts = [_without_prefix(s, found) for s in spec[key]]
        return {**spec, key: [p for p in parts if p is not None]}
    if kind == "Prepend":
        if spec["prepend"] != "▁":
            raise PrefixError(f"normalizer Prepend({spec['prepend']!r}) is not supported (only '▁')")
        found.append("▁")
        return None
    if kind == "Metaspace":
        if _scheme(spec) != "never":
            found.append(spec.get("replacement", "▁"))
        return {k: v for k, v in spec.items() if k != "add_prefix_space"} | {"prepend_scheme": "never"}
    if kind == "ByteLevel":
        if spec.get("add_prefix_space"):
            found.append(" ")
        return {**spec, "add_prefix_space": False}
    return spec


def prefix_free(tokenizer_json: str) -> tuple[str, str | None]:
    """(the tokenizer JSON with every start-of-text prefix off, the prefix it added or None)."""
    spec = json.loads(tokenizer_json)
    found: list[str] = []
    spec["normalizer"] = _without_prefix(spec.get("normalizer"), found)
    spec["pre_tokenizer"] = _without_prefix(spec.get("pre_tokenizer"), found)
    if len(found) > 1:
        raise PrefixError(f"the tokenizer adds several start-of-text prefixes ({found})")
    return json.dumps(spec, ensure_ascii=False), (found[0] if found else None)


def prefix_at_start_only(tokenizer_json: str) -> str:
    """The tokenizer JSON rewritten so a whole text encodes as `encode_piece(text, start=True)`:
    Metaspace "always" -> "first"; a legacy Prepend("▁") normalizer -> a Metaspace "first"
    pre-tokenizer. A byte-level add_prefix_space tokenizer cannot say "first" and raises."""
    spec = json.loads(tokenizer_json)
    found: list[str] = []
    normalizer = _without_prefix(spec.get("normalizer"), found)
    if found:  # a Prepend("▁") normalizer: Metaspace(first) adds the ▁ at the start only
        spec["normalizer"] = normalizer
        meta = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": False}
        pre = spec.get("pre_tokenizer")
        spec["pre_tokenizer"] = meta if pre is None else {"type": "Sequence", "pretokenizers": [meta, pre]}
    pre_found: list[str] = []
    _without_prefix(spec.get("pre_tokenizer"), pre_found)
    if " " in pre_found:
        raise PrefixError("a ByteLevel pre-tokenizer with add_prefix_space has no start-only form")

    def first(node):
        if isinstance(node, dict):
            if node.get("type") == "Metaspace" and _scheme(node) == "always":
                node["prepend_scheme"] = "first"
                node.pop("add_prefix_space", None)
            for v in node.values():
                first(v)
        elif isinstance(node, list):
            for v in node:
                first(v)
    first(spec.get("pre_tokenizer"))
    return json.dumps(spec, ensure_ascii=False)


# ----------------------------------------------------------------------------- the tokenizer


class HFTokenizer:
    """`encode` adds no special tokens (templates and the pipeline place them); `decode` keeps them."""

    def __init__(self, path: str, *, bos_token: str | None = None, eos_token: str | None = None,
                 pad_token: str | None = None):
        path = os.path.expanduser(path)
        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise FileNotFoundError(f"no such tokenizer.json: {file}")
        self.path = file
        self._tok = _HFTok.from_file(file)
        folder = os.path.dirname(file)
        config_file = os.path.join(folder, CONFIG_FILE)
        config = {}
        if os.path.isfile(config_file):
            with open(config_file, encoding="utf-8") as f:
                config = json.load(f)
        self.config = config
        self.bos_token = bos_token or _token_str(config.get("bos_token"))
        self.eos_token = eos_token or _token_str(config.get("eos_token"))
        self.pad_token = pad_token or _token_str(config.get("pad_token"))
        self.unk_token = _token_str(config.get("unk_token"))
        self.chat_template = read_chat_template(folder, config)
        for name in ("bos_token", "eos_token", "pad_token"):
            tok = getattr(self, name)
            if tok is not None and self._tok.token_to_id(tok) is None:
                raise ValueError(f"{file}: {name} {tok!r} is not in the vocabulary")
        self._pieces = None  # (prefix-free tokenizer, prefix, added ids), built on first use

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def _piece_tokenizer(self):
        if self._pieces is None:
            try:
                free, prefix = prefix_free(self._tok.to_str())
            except PrefixError as e:
                raise PrefixError(f"{self.path}: {e}") from None
            tok = _HFTok.from_str(free) if prefix else self._tok
            self._pieces = (tok, prefix, frozenset(self._tok.get_added_tokens_decoder()))
        return self._pieces

    def encode_piece(self, text: str, start: bool = False) -> list[int]:
        """Ids of `text` as a piece of a longer text (see the module docstring): the start-of-text
        prefix only when `start` and `text` does not begin with an added token or a space."""
        tok, prefix, added = self._piece_tokenizer()
        enc = tok.encode(text, add_special_tokens=False)
        if not (start and prefix and text) or text.startswith((" ", prefix)):
            return enc.ids
        if enc.ids and enc.ids[0] in added and enc.offsets[0][0] == 0:
            return enc.ids
        return tok.encode(prefix + text, add_special_tokens=False).ids

    def to_json(self) -> str:
        return self._tok.to_str()

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_piece(self, i: int) -> str:
        return self._tok.id_to_token(int(i))

    def _id(self, token: str | None) -> int:
        return -1 if token is None else self._tok.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int:
        return self._id(self.bos_token)

    @property
    def eos_id(self) -> int:
        return self._id(self.eos_token)

    @property
    def pad_id(self) -> int:
        # Same fallback as the SentencePiece Tokenizer: pad with EOS (or 0); pads are masked anyway.
        for i in (self._id(self.pad_token), self.eos_id):
            if i >= 0:
                return i
        return 0

    def __getstate__(self):  # serialise as JSON text: portable across tokenizers versions
        state = dict(self.__dict__)
        state["_tok"] = self._tok.to_str()
        state["_pieces"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._tok = _HFTok.from_str(state["_tok"])

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path}, vocab_size={self.vocab_size})"
