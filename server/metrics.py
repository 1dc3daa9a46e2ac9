"""Per-round metrics as JSON lines in the run's out-dir: one object per round, appended as it ends."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from fedmeta.common.jsonio import dumps_strict
from fedmeta.server.listeners import RoundReport, RunListener

METRICS_NAME = "metrics.jsonl"


class MetricsLog(RunListener):
    """Appends one JSON object per round to ``out_dir/metrics.jsonl`` and flushes it to disk."""

    def __init__(self, out_dir: Path):
        self.path = Path(out_dir) / METRICS_NAME

    def start(self, resume_round: int | None) -> None:
        """Fresh run: empty the file. Resumed run: keep only rounds the checkpoint covers.

        A crash between writing a round's line and its checkpoint would otherwise leave a line for
        a round that the resumed run repeats.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume_round is not None and self.path.exists():
            # A "stopped" line (the privacy budget) belongs to the run that stopped, not to its continuation.
            kept = [r for r in read_metrics(self.path) if r.get("round", 0) <= resume_round and "stopped" not in r]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(dumps_strict(r, sort_keys=True) + "\n" for r in kept))
        os.replace(tmp, self.path)

    def on_start(self, start_round: int) -> None:
        self.start(resume_round=start_round if start_round > 0 else None)

    def on_round(self, report: RoundReport) -> None:
        self.append(report.record)

    def append(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as handle:
            handle.write(dumps_strict(record, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All rounds of a metrics.jsonl, in order; names the line of a broken file."""
    records = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not a JSON line ({err}); the file was cut or edited.") from None
    return records


__all__ = ["METRICS_NAME", "MetricsLog", "read_metrics"]
