"""Which input file each document of a `jaxllm.data.sources` source came from."""

from __future__ import annotations

import numpy as np

from jaxllm.data.documents import ConcatSource, TextFileSource


def doc_files(source) -> tuple[list[str], np.ndarray]:
    """(files, index into files for every document), 4 bytes per document."""
    parts = source.sources if isinstance(source, ConcatSource) else [source]
    files: list[str] = []
    ids = [np.zeros(0, np.int32)]
    for part in parts:
        if isinstance(part, TextFileSource):  # one document per (kept) file
            local = np.arange(len(part), dtype=np.int32)
        else:  # JsonlSource / ParquetSource index every document by file
            local = np.asarray(part._file_ids, np.int32)
        ids.append(local + len(files))
        files += part.files
    return files, np.concatenate(ids)
