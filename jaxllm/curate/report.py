"""Per-stage, per-rule accounting for a curation run, and the removed-documents log."""

from __future__ import annotations

import collections
import json

from jaxllm.curate.text import truncate


class StageStats:
    """seen / removed / modified documents and seconds for one stage, with per-rule counts.

    A rule's `removed` counts documents it dropped; `modified` counts documents it edited (lines
    removed, citations stripped) that the stage then passed on; `lines_removed` counts lines.
    """

    def __init__(self, name: str, rules=()):
        self.name = name
        self.seen = self.removed = self.modified = 0
        self.seconds = 0.0
        self.rules: dict[str, collections.Counter] = {r: collections.Counter() for r in rules}
        self.examples: dict[str, dict] = {}
        self.extra: dict = {}

    def rule(self, name: str) -> collections.Counter:
        return self.rules.setdefault(name, collections.Counter())

    def to_dict(self) -> dict:
        out = {"seen": self.seen, "removed": self.removed, "modified": self.modified,
               "seconds": round(self.seconds, 3),
               "rules": {r: {"removed": c["removed"], "modified": c["modified"],
                             **({"lines_removed": c["lines_removed"]} if c["lines_removed"] else {})}
                         for r, c in self.rules.items()}}
        out.update(self.extra)
        out["examples"] = self.examples
        return out


class Report:
    def __init__(self, removed_path: str | None = None):
        self.stages: dict[str, StageStats] = {}
        self._log = open(removed_path, "w", encoding="utf-8") if removed_path else None

    def stage(self, name: str, rules=()) -> StageStats:
        return self.stages.setdefault(name, StageStats(name, rules))

    def drop(self, stage: StageStats, rule: str, doc_id: int, source: str, text: str, detail=None) -> None:
        stage.removed += 1
        stage.rule(rule)["removed"] += 1
        record = {"id": doc_id, "source": source, "stage": stage.name, "rule": rule}
        if detail not in (None, ""):
            record["detail"] = detail
        if rule not in stage.examples:
            stage.examples[rule] = {**record, "text": truncate(text)}
        if self._log:
            self._log.write(json.dumps({**record, "text": truncate(text)}, ensure_ascii=False) + "\n")

    def close(self) -> None:
        if self._log:
            self._log.close()
            self._log = None
