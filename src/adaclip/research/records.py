"""Run records and configuration files on disk.

* Records: one JSON object per line (``runs/<sweep>.jsonl``) or one per file (``train --out``), always
  strict JSON (:func:`to_json`: a NaN or an infinity is an error that names its key, never a bare
  ``NaN`` token), written atomically; :func:`check_destination` tells before a run whether its output
  can be written at all.
* YAML (``--config``, ``--param``, ``params.yaml``): :func:`load_yaml` and :func:`parse_yaml_value` read
  it with one loader that also takes ``1e-3`` for a number (YAML 1.1, which PyYAML follows, wants
  ``1.0e-3``; YAML 1.2 and every other reader take both) and turn a syntax error into one line with
  the file, line and column.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from adaclip.research.io import write_text_atomic


class _NumberLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also resolves ``1e-3``, ``2E5``, ``-1e+2`` (no decimal point) as floats."""


_NumberLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _yaml_error(source: str, error: yaml.YAMLError) -> ValueError:
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return ValueError(f"{source}: malformed YAML{where}: {' '.join(str(problem).split())}")


def parse_yaml_value(text: str, source: str) -> Any:
    """``text`` parsed as YAML (numbers such as ``1e-3`` included); ``source`` names it in a syntax error."""
    try:
        return yaml.load(text, Loader=_NumberLoader)  # a SafeLoader subclass: no arbitrary objects
    except yaml.YAMLError as error:
        raise _yaml_error(source, error) from None


def load_yaml(path: str | os.PathLike[str]) -> Any:
    """The YAML document in ``path`` (see :func:`parse_yaml_value`); a missing or unreadable file is named."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: cannot be read as a text file ({error})") from None
    return parse_yaml_value(text, str(path))


def _nonfinite_path(value: Any, path: str = "") -> str | None:
    """The key path of the first NaN or infinity in a JSON-like value, or ``None``."""
    if isinstance(value, float) and not math.isfinite(value):
        return path or "(the value itself)"
    if isinstance(value, dict):
        items: Iterable[tuple[str, Any]] = ((f"{path}.{k}" if path else str(k), v) for k, v in value.items())
    elif isinstance(value, (list, tuple)):
        items = ((f"{path}[{i}]", v) for i, v in enumerate(value))
    else:
        return None
    for key, item in items:
        found = _nonfinite_path(item, key)
        if found is not None:
            return found
    return None


def to_json(record: Any, **options: Any) -> str:
    """Strict JSON (``allow_nan=False``); a NaN or an infinity is a ``ValueError`` that names its key."""
    found = _nonfinite_path(record)
    if found is not None:
        raise ValueError(f"the record holds a non-finite number at {found}: strict JSON has no NaN or Infinity")
    return json.dumps(record, allow_nan=False, **options)


def write_records(path: str | os.PathLike[str], records: Iterable[dict[str, Any]]) -> None:
    """Write records as JSON lines, atomically."""
    write_text_atomic(path, "".join(to_json(r, sort_keys=True) + "\n" for r in records))


def read_records(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read a JSON-lines file of run records; a malformed line is named with the file and line number."""
    records = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"{path}, line {number}: not a JSON record ({error.msg}, column {error.colno})"
                ) from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}, line {number}: a record must be a JSON object, got {type(record).__name__}")
            records.append(record)
    return records


def check_destination(path: str | os.PathLike[str], name: str) -> Path:
    """Check, before any work, that a file can be written at ``path``; ``name`` (e.g. ``--out``) names it.

    Refuses a directory, a path under a file, and a folder where nothing can be created (tried with a
    temporary file in the nearest existing folder, which works for read-only file systems and for
    root alike); creates nothing that stays.
    """
    target = Path(path)
    if target.is_dir():
        raise ValueError(f"{name} {target} is a directory: give a file path")
    folder = target.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"{name} {target}: {folder} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise ValueError(f"{name} {target}: cannot write in {folder} ({error.strerror or error})") from None
    return target
