"""Pretraining data: sources -> tokenizer -> packing -> batched grain pipeline."""

from jaxllm.data.packing import PackIterDataset
from jaxllm.data.pipeline import DataIterator, make_eval_batches, make_train_iterator, train_dataset
from jaxllm.data.sources import SourceError, open_source, resolve_files, stdlib_files
from jaxllm.data.tokenizer import Tokenizer, load_tokenizer, train_sentencepiece

__all__ = [
    "DataIterator", "PackIterDataset", "SourceError", "Tokenizer", "load_tokenizer",
    "make_eval_batches", "make_train_iterator", "open_source", "resolve_files", "stdlib_files",
    "train_dataset", "train_sentencepiece",
]
