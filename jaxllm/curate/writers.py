"""Curation outputs as datatrove writers: kept records as they came in, removal records, work files.

* `OutputJsonlWriter` / `OutputParquetWriter`: each kept document is written as its input record
  (every field, in order) with the text field replaced by the document's possibly cleaned text;
  a record that had no id gets the `<file>/<line>` id it was named by.
* `RemovalLog`: one small jsonl record per removed document: id, source file, stage, rule, the
  measurement behind the decision (`detail`) and the first 300 characters; the report's examples
  and `--removed` are read from these.
* `work_writer`: datatrove's own jsonl (text, id, metadata), one file per task, between passes.
"""

from __future__ import annotations

from datatrove.pipeline.writers import JsonlWriter, ParquetWriter

from jaxllm.curate.readers import RECORD, SOURCE

# metadata set by the steps before a removal -> the name it has in a removal record's detail
DETAIL_KEYS = {"contaminated_ngram": "ngram", "contaminated_task": "eval_file", "minhash_cluster_id": "cluster",
               "quality_logit": "logit", "language": "language", "language_score": "language_score"}


def truncate(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


class _RecordOutput:
    text_field = "text"
    id_field = "id"

    def _default_adapter(self, document) -> dict:
        record = dict(document.metadata.get(RECORD) or {})
        record[self.text_field] = document.text
        if record.get(self.id_field) is None:
            record[self.id_field] = document.id
        return record


class OutputJsonlWriter(_RecordOutput, JsonlWriter):
    name = "kept records (jsonl)"

    def __init__(self, folder: str, *, text_field: str, id_field: str, compression: str | None = None):
        suffix = ".jsonl.gz" if compression == "gzip" else ".jsonl"
        super().__init__(folder, output_filename="${rank}" + suffix, compression=compression)
        self.text_field, self.id_field = text_field, id_field


class OutputParquetWriter(_RecordOutput, ParquetWriter):
    name = "kept records (parquet)"

    def __init__(self, folder: str, *, text_field: str, id_field: str):
        super().__init__(folder, output_filename="${rank}.parquet", max_file_size=-1)
        self.text_field, self.id_field = text_field, id_field


def output_writer(folder: str, fmt: str, text_field: str, id_field: str):
    if fmt == "parquet":
        return OutputParquetWriter(folder, text_field=text_field, id_field=id_field)
    return OutputJsonlWriter(folder, text_field=text_field, id_field=id_field,
                             compression="gzip" if fmt == "jsonl.gz" else None)


class RemovalLog(JsonlWriter):
    """The exclusion writer of one stage; `rule` names removals whose step gives no reason."""

    name = "removal log"

    def __init__(self, folder: str, stage: str, rule: str, detail_keys=()):
        super().__init__(folder, output_filename="${rank}.jsonl", compression=None)
        self.stage, self.rule, self.detail_keys = stage, rule, tuple(detail_keys)

    def _default_adapter(self, document) -> dict:
        meta = document.metadata
        out = {"id": document.id, "source": meta.get(SOURCE), "stage": self.stage,
               "rule": meta.get("filter_reason") or self.rule}
        detail = {DETAIL_KEYS.get(k, k): meta[k] for k in self.detail_keys if meta.get(k) is not None}
        if detail:
            out["detail"] = detail
        out["text"] = truncate(document.text)
        return out


def work_writer(folder: str) -> JsonlWriter:
    return JsonlWriter(folder, output_filename="${rank}.jsonl", compression=None)
