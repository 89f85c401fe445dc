"""Run records on disk: one JSON object per line (``runs/<sweep>.jsonl``), written atomically."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Any

from adaclip.research.reporting import write_text_atomic


def write_records(path: str | os.PathLike[str], records: Iterable[dict[str, Any]]) -> None:
    """Write records as JSON lines, atomically."""
    write_text_atomic(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))


def read_records(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read a JSON-lines file of run records."""
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]
