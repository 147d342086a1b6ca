"""A Hugging Face `tokenizer.json` behind the same interface as the SentencePiece `Tokenizer`.

`tokenizer_config.json` beside the file (when present) gives the bos/eos/pad token strings and
the `chat_template`; without it bos/eos/pad ids are -1 / -1 / 0 like a SentencePiece model
without those pieces (or pass the token strings explicitly).
"""

from __future__ import annotations

import json
import os
from typing import Sequence

from tokenizers import Tokenizer as _HFTok


def _token_str(value) -> str | None:
    # transformers serialises special tokens either as plain strings or as AddedToken dicts.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


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
        config_file = os.path.join(os.path.dirname(file), "tokenizer_config.json")
        config = {}
        if os.path.isfile(config_file):
            with open(config_file, encoding="utf-8") as f:
                config = json.load(f)
        self.config = config
        self.bos_token = bos_token or _token_str(config.get("bos_token"))
        self.eos_token = eos_token or _token_str(config.get("eos_token"))
        self.pad_token = pad_token or _token_str(config.get("pad_token"))
        self.chat_template = config.get("chat_template")
        for name in ("bos_token", "eos_token", "pad_token"):
            tok = getattr(self, name)
            if tok is not None and self._tok.token_to_id(tok) is None:
                raise ValueError(f"{file}: {name} {tok!r} is not in the vocabulary")

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

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
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._tok = _HFTok.from_str(state["_tok"])

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path}, vocab_size={self.vocab_size})"
