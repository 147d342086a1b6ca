"""Decontamination index from local evaluation files, for datatrove's NGramsDecontFilter.

datatrove's own indexer (NGramsDecontIndexer) fetches its evaluation sets through lighteval from
the Hugging Face hub; `EvalNGramIndexer` reads them from files instead (anything
`jaxllm.data.documents.open_source` reads) and writes the same index: per evaluation file, the
64-bit hashes of every word n-gram of its documents, as NGramsDecontIndexer computes them for a
label (datatrove's text normalisation and word tokenizer, then its hash of the space-joined
n-gram), in `<name>.index.hashes`. The filter then drops a training document at its first shared
n-gram and names the n-gram and the file. `index.json` maps each index name back to its file
and counts the evaluation documents shorter than n words (they contribute nothing).
"""

from __future__ import annotations

import json
import os
import re

import numpy as np
from datatrove.io import get_datafolder
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.decont import NGramsDecontConfig
from datatrove.utils.hashing import create_hash_func
from datatrove.utils.text import ngrams, simplify_text
from datatrove.utils.word_tokenizers import load_word_tokenizer

from jaxllm.data.documents import open_source

INDEX_INFO = "index.json"


def ngram_hashes(text: str, config: NGramsDecontConfig, tokenizer, hash_func) -> list[int]:
    """NGramsDecontIndexer.compute_hashes of a label without a query."""
    tokens = tokenizer.word_tokenize(simplify_text(text, config.norm_config))
    return [hash_func(" ".join(g)) for g in ngrams(tokens, config.n_grams)]


class EvalNGramIndexer(PipelineStep):
    """One task: the n-gram hash index of the evaluation sources `specs`."""

    type = "🦠 - DECONT"
    name = "evaluation n-gram index"

    def __init__(self, specs, output_folder: str, *, n_grams: int, text_field: str = "text",
                 language: str = "en", strict: bool = False):
        super().__init__()
        self.specs, self.text_field, self.strict = list(specs), text_field, strict
        self.output_folder = get_datafolder(output_folder)
        self.config = NGramsDecontConfig(n_grams=n_grams)
        self.language = language

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        if world_size != 1:
            raise ValueError(f"EvalNGramIndexer runs as one task, got {world_size}")
        tokenizer = load_word_tokenizer(self.language)
        hash_func = create_hash_func(self.config.hash_config)
        source = open_source(self.specs, text_field=self.text_field, strict=self.strict)
        file_ids = np.asarray(source.file_ids)
        hashes: list[set] = [set() for _ in source.files]
        too_short = 0
        with self.track_time():
            for i in range(len(source)):
                h = ngram_hashes(source[i], self.config, tokenizer, hash_func)
                too_short += not h
                hashes[file_ids[i]].update(h)
        names = {}
        for f, (path, file_hashes) in enumerate(zip(source.files, hashes)):
            name = f"{f:03d}-" + re.sub(r"[^A-Za-z0-9._-]+", "_", os.path.basename(path))
            names[name] = path
            with self.output_folder.open(f"{name}.index.hashes", "wb") as out:
                out.write(np.array(sorted(file_hashes), dtype=self.config.hash_config.np_descr).tobytes())
        info = {"files": names, "eval_docs": len(source), "eval_docs_too_short": too_short,
                "eval_ngrams": sum(len(h) for h in hashes), "n_grams": self.config.n_grams}
        with self.output_folder.open(INDEX_INFO, "w") as f:
            json.dump(info, f)
        self.stat_update("eval_docs", value=len(source))
