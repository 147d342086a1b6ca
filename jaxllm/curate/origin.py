"""Which input file each document of a `jaxllm.data.documents` source came from."""

from __future__ import annotations

import numpy as np


def doc_files(source) -> tuple[list[str], np.ndarray]:
    """(files, index into files for every document), 4 bytes per document."""
    return list(source.files), np.asarray(source.file_ids, np.int32)
