"""Data files → rows, each named by its place (``train.jsonl, line 3``) for messages.

Local .jsonl, .json (one array of objects), .csv and .parquet files are read strictly:
a field given twice, undecodable text, a short CSV row or a damaged file is refused by
file and line, never guessed at. A name that is not a local path is loaded as a hub
dataset, for users with a network.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from lorakit.errors import DataError
from lorakit.inputs import DuplicateKey, check_unicode, looks_local, strict_json, strict_json_array

_LOADERS = {".json", ".jsonl", ".csv", ".parquet"}


@dataclass
class Rows:
    """A data file's rows, each with where it came from (``file, line 3``) for messages."""

    rows: list[dict]
    where: list[str]

    def __len__(self) -> int:
        return len(self.rows)

    def head(self, limit: int | None) -> Rows:
        """The first ``limit`` rows (all of them for ``None``)."""
        return Rows(self.rows[:limit], self.where[:limit])


def _decode(data: bytes, source: str) -> str:
    try:
        return data.decode("utf-8-sig")  # a byte-order mark, as some editors write, is not data
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"{source}, line {line}: not UTF-8 text (byte {e.start + 1} is invalid)") from None


def _json_rows(text: str, source: str, lines_only: bool) -> Rows:
    stripped = text.lstrip()
    try:
        if not lines_only and stripped.startswith("["):  # one JSON array of objects
            items = strict_json_array(text)
            rows = [row for row, _ in items]
            where = [f"{source}, row {i + 1} (line {line})" for i, (_, line) in enumerate(items)]
        else:  # JSON Lines
            rows, where = [], []
            # Lines end at \n, \r\n or \r only: U+2028 and U+0085 may stand unescaped inside JSON strings.
            for number, line in enumerate(re.split(r"\r\n|\r|\n", text), 1):
                if not line.strip():
                    continue
                try:
                    rows.append(strict_json(line, numbers_as_text=True))
                except DuplicateKey as e:
                    raise DuplicateKey(e.args[0], number) from None
                except json.JSONDecodeError as e:
                    raise DataError(f"{source}, line {number}: not valid JSON ({e.msg}, column {e.colno})") from None
                where.append(f"{source}, line {number}")
    except json.JSONDecodeError as e:
        raise DataError(f"{source}, line {e.lineno}: not valid JSON ({e.msg})") from None
    except DuplicateKey as e:
        raise DataError(f"{source}, line {e.args[1]}: the field {e.args[0]!r} is given twice in one object; "
                        "JSON readers disagree on which value counts") from None
    for row, at in zip(rows, where):
        if not isinstance(row, dict):
            raise DataError(f"{at}: expected a JSON object with named fields, got {type(row).__name__}")
        check_unicode(row, at)
    return Rows(rows, where)


def _csv_rows(text: str, source: str) -> Rows:
    import csv
    import io

    try:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        rows = list(reader)
    except csv.Error as e:
        raise DataError(f"{source}: not valid CSV ({e})") from None
    header = reader.fieldnames or []
    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated:
        raise DataError(f"{source}: the header names the column {repeated[0]!r} twice; only one would be read")
    # Counted in rows, not lines: a quoted field may span several lines.
    where = [f"{source}, row {i + 1}" for i in range(len(rows))]
    for row, at in zip(rows, where):
        if None in row or None in row.values():  # csv's marks for extra values and missing ones
            count = len(header) + len(row.get(None, ())) - sum(v is None for v in row.values())
            raise DataError(f"{at}: {count} fields where the header has {len(header)} "
                            "(a comma inside a field needs the field in double quotes)")
    return Rows(rows, where)


def _parquet_rows(path: Path, source: str) -> Rows:
    try:
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()  # pyarrow itself refuses a column named twice
    except Exception as e:  # noqa: BLE001 — pyarrow raises many kinds for a damaged file
        raise DataError(f"{source}: not a readable parquet file ({type(e).__name__}: {e})") from None
    return Rows(rows, [f"{source}, row {i + 1}" for i in range(len(rows))])


def load_rows(source: str, split: str = "train") -> Rows:
    """The rows of a local .jsonl/.json/.csv/.parquet file, or a hub dataset's ``split``
    for users with a network.

    Raises:
        DataError: a missing, empty, undecodable or malformed file, naming the file and
            the 1-based line or row.
    """
    path = Path(source).expanduser()
    kind = path.suffix.lower()
    if kind in _LOADERS or looks_local(source):
        if not path.is_file():
            what = "is a directory" if path.is_dir() else "is not a regular file" if path.exists() else "no such file"
            raise DataError(f"{source}: {what}")
        if kind not in _LOADERS:
            raise DataError(f"{source}: unknown data file type {kind or '(none)'}; use .jsonl, .json, .csv or .parquet")
        if kind == ".parquet":
            rows = _parquet_rows(path, source)
        else:
            try:
                text = _decode(path.read_bytes(), source)
            except OSError as e:
                raise DataError(f"{source}: cannot read it ({e.strerror})") from None
            rows = _csv_rows(text, source) if kind == ".csv" else _json_rows(text, source, kind == ".jsonl")
    else:
        try:
            import datasets

            rows = list(datasets.load_dataset(source, split=split))
        except Exception as e:  # noqa: BLE001 — offline, unknown name, missing split: all the user's to fix
            raise DataError(f"{source}: cannot load it as a local file or a hub dataset ({type(e).__name__}: {e})") from None
        rows = Rows(rows, [f"{source}, row {i + 1}" for i in range(len(rows))])
    if not rows.rows:
        raise DataError(f"{source}: the file holds no rows")
    return rows


def field_names(row: dict) -> str:
    """The row's fields, for messages (``question, answer``); datasets fills a column
    missing from some rows with None, which is no field."""
    return ", ".join(str(k) for k, v in row.items() if v is not None)


def row_field(row: dict, name: str, where: str) -> str:
    """The text of field ``name`` of ``row``, or a DataError naming the row and the fields it has."""
    value = row.get(name)
    if value is None:
        if name in row:
            raise DataError(f"{where}: field {name!r} is null, not text")
        raise DataError(f"{where}: no field {name!r} (the row has {field_names(row) or 'no fields'})")
    if isinstance(value, (dict, list, bytes, bytearray)):  # bytes: a binary parquet column, repr'd as b'...'
        raise DataError(f"{where}: field {name!r} holds a {type(value).__name__}, not text")
    if isinstance(value, bool):  # as JSON writes it, not Python's True
        return "true" if value else "false"
    return str(value)
