"""Decontamination: drop training documents that share word n-grams with evaluation data.

N-grams are over lowercased words with punctuation stripped (`text.words`), n = 13 by default
(GPT-3's choice; n = 2 and up are allowed). All evaluation n-grams are hashed to 64 bits and
kept as one sorted array (8 bytes per n-gram plus 4 for its file), so a document is checked with
one vectorised binary search. Evaluation documents shorter than n words contribute nothing and
are counted in `stats["eval_docs_too_short"]`.
"""

from __future__ import annotations

import numpy as np

from jaxllm.curate.origin import doc_files
from jaxllm.curate.text import ngram_hashes, word_hashes, words
from jaxllm.data.documents import open_source


class Decontaminator:
    name = "decontaminate"

    def __init__(self, specs, *, text_field: str = "text", ngram: int = 13, min_matches: int = 1,
                 strict: bool = False):
        self.ngram, self.min_matches = ngram, min_matches
        source = open_source(list(specs), text_field=text_field, strict=strict)
        self.files, file_of = doc_files(source)
        hashes, owners, short = [np.zeros(0, np.uint64)], [np.zeros(0, np.int32)], 0
        for i in range(len(source)):
            w = words(source[i])
            if len(w) < ngram:
                short += 1
                continue
            h = ngram_hashes(word_hashes(w), ngram)
            hashes.append(h)
            owners.append(np.full(len(h), file_of[i], np.int32))
        all_hashes, all_owners = np.concatenate(hashes), np.concatenate(owners)
        # np.unique keeps each n-gram's first occurrence: it is credited to the first file holding it.
        self.hashes, first = np.unique(all_hashes, return_index=True)
        self.owners = all_owners[first]
        self.stats = {"eval_docs": len(source), "eval_docs_too_short": short, "eval_ngrams": len(self.hashes)}

    def __call__(self, text: str) -> dict | None:
        """None if clean, else {"ngram", "eval_file", "matches"} for the first shared n-gram."""
        if len(self.hashes) == 0:
            return None
        w = words(text)
        h = ngram_hashes(word_hashes(w), self.ngram)
        if len(h) == 0:
            return None
        pos = np.minimum(np.searchsorted(self.hashes, h), len(self.hashes) - 1)
        hit = self.hashes[pos] == h
        if not hit.any():
            return None
        matches = len(np.unique(h[hit]))
        if matches < self.min_matches:
            return None
        i = int(np.argmax(hit))
        return {"ngram": " ".join(w[i:i + self.ngram]), "eval_file": self.files[self.owners[pos[i]]],
                "matches": matches}
