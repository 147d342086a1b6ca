"""Curation inputs as datatrove readers that keep every record whole.

Each input record becomes a datatrove `Document` whose text is the record's text field and whose
id is the record's own id field (or `<file>/<line>` when it has none); the whole record rides
along in `metadata["record"]`, its text field left as a None placeholder so the field order
survives, and the output writer (jaxllm.curate.writers) puts it back with the cleaned text.

Specs: local files, folders and globs resolve as jaxllm.data does (jsonl plain or compressed,
parquet, and .txt/.py/.md/stdlib: files read one document per file) into one paths file per kind,
so datatrove deals whole files to tasks (file i goes to task i mod tasks). A URL with a glob
(`s3://bucket/crawl/*.jsonl.gz`, anything fsspec opens) is handed to the reader as a folder and a
pattern. Bad lines and records without text are counted per reason in the reader's stats
(`skipped_<reason>`), or raise with `strict`.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import os

from datatrove.io import get_datafolder
from datatrove.pipeline.readers import JsonlReader, ParquetReader
from datatrove.pipeline.readers.base import BaseDiskReader

from jaxllm.data.files import SourceError, file_kind, resolve_files

RECORD = "record"          # metadata key of the input record (text field set to None)
SOURCE = "file_path"       # metadata key of the input file (datatrove's own name for it)


def keep_record(self, data: dict, path: str, id_in_file) -> dict:
    """Reader adapter: the text and id from the record's fields, the whole record in metadata."""
    text = data.get(self.text_key)
    record = dict(data)
    record[self.text_key] = None
    own_id = data.get(self.id_key)
    return {"text": text if isinstance(text, str) else "",
            "id": str(own_id) if own_id is not None else f"{path}/{id_in_file}",
            "metadata": {RECORD: record}}


class _Counted:
    """Reader mixin: counts (or, strict, raises on) input it skips."""

    strict = False

    def skip_bad(self, reason: str, where: str) -> None:
        if self.strict:
            raise SourceError(f"{self.data_folder.resolve_paths(where)}: {reason.replace('_', ' ')} (strict mode)")
        self.stat_update(f"skipped_{reason}")

    def get_document_from_dict(self, data, source_file: str, id_in_file):
        if not isinstance(data, dict):
            self.skip_bad("not_an_object", f"{source_file}:{id_in_file + 1}")
            return None
        doc = super().get_document_from_dict(data, source_file, id_in_file)
        if doc is None:
            self.skip_bad("no_text", f"{source_file}:{id_in_file + 1} ({self.text_key!r} missing, empty or not a string)")
        return doc


class RecordJsonlReader(_Counted, JsonlReader):
    name = "jsonl records"

    def __init__(self, *args, strict: bool = False, **kwargs):
        super().__init__(*args, adapter=keep_record, **kwargs)
        self.strict = strict

    def read_file(self, filepath: str):
        import orjson

        with self.data_folder.open(filepath, "r", compression=self.compression) as f:
            for li, line in enumerate(f):
                if not line.strip():
                    continue
                with self.track_time():
                    try:
                        data = orjson.loads(line)
                    except orjson.JSONDecodeError:
                        self.skip_bad("malformed_json", f"{filepath}:{li + 1}")
                        continue
                    document = self.get_document_from_dict(data, filepath, li)
                if document is not None:
                    yield document


class RecordParquetReader(_Counted, ParquetReader):
    name = "parquet records"

    def __init__(self, *args, strict: bool = False, **kwargs):
        super().__init__(*args, adapter=keep_record, **kwargs)
        self.strict = strict


class TextFileReader(_Counted, BaseDiskReader):
    """Each .txt / .py / .md file is one document, its id the file's path."""

    name = "text files"

    def __init__(self, *args, strict: bool = False, **kwargs):
        super().__init__(*args, adapter=keep_record, **kwargs)
        self.strict = strict

    def read_file(self, filepath: str):
        with self.data_folder.open(filepath, "rb") as f:
            raw = f.read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            self.skip_bad("invalid_utf8", filepath)
            return
        document = self.get_document_from_dict({self.text_key: text, self.id_key: filepath}, filepath, 0)
        if document is not None:
            yield document


class WorkReader(JsonlReader):
    """Reads back what task `rank` of the previous pass wrote (`<folder>/<rank>.jsonl`), so a
    pass and the dedup signatures computed on its output see the same documents in the same
    order, whatever files other tasks left empty."""

    name = "work files"

    def __init__(self, folder: str):
        super().__init__(folder, compression=None, add_file_path=False)

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        name = f"{rank:05d}.jsonl"
        for doc in self.read_files_shard([name] if self.data_folder.isfile(name) else []):
            self.update_doc_stats(doc)
            yield doc


@dataclasses.dataclass
class InputSet:
    """One reader's share of the inputs: a folder and either a list of files or a glob."""

    kind: str                 # "jsonl", "parquet" or "text"
    folder: str
    files: list = dataclasses.field(default_factory=list)
    glob: str | None = None

    def count(self) -> int:
        if self.glob is None:
            return len(self.files)
        return len(get_datafolder(self.folder).list_files(glob_pattern=self.glob))


def _url_input(spec: str) -> InputSet:
    if not glob.has_magic(spec):
        raise SourceError(f"{spec}: give a URL with a file pattern, e.g. s3://bucket/data/*.jsonl.gz")
    cut = min(spec.find(c) for c in "*?[" if c in spec)
    folder, _, _ = spec[:cut].rpartition("/")
    pattern = spec[len(folder) + 1:]
    kind = file_kind(pattern.replace("*", "x"))
    if kind not in ("jsonl", "parquet", "text"):
        raise SourceError(f"{spec}: the pattern must end in .jsonl, .jsonl.gz, .jsonl.zst, .parquet or .txt/.py/.md")
    return InputSet(kind, folder, glob=pattern)


def resolve_inputs(specs) -> list[InputSet]:
    """The input specs as reader shares: local files grouped by kind under their common folder."""
    local: dict[str, list[str]] = collections.defaultdict(list)
    out = []
    for spec in specs:
        if "://" in spec:
            out.append(_url_input(spec))
            continue
        for path in resolve_files(spec):
            kind = file_kind(path)
            if kind == "array_record":
                raise SourceError(f"{path}: curation reads jsonl, parquet and text files, not ArrayRecord")
            if path not in local[kind]:
                local[kind].append(os.path.abspath(path))
    for kind in ("jsonl", "parquet", "text"):
        if local[kind]:
            root = os.path.commonpath([os.path.dirname(p) for p in local[kind]])
            out.append(InputSet(kind, root, [os.path.relpath(p, root) for p in local[kind]]))
    return out


def make_reader(share: InputSet, paths_file: str | None, text_field: str, id_field: str, strict: bool):
    cls = {"jsonl": RecordJsonlReader, "parquet": RecordParquetReader, "text": TextFileReader}[share.kind]
    return cls(share.folder, paths_file=paths_file, glob_pattern=share.glob, text_key=text_field,
               id_key=id_field, strict=strict)
