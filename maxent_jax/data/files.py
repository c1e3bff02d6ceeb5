"""Check a local .json / .jsonl / .csv data file before `datasets` reads it.

`datasets` reports a bad file with an exception from deep inside its builder (`StopIteration` for
an empty file, `UnicodeDecodeError`, `DatasetGenerationError` for a malformed line) and no line
number. One streaming pass here (a line in memory at a time) finds the first problem and names
the file, the line / row and byte offset, and what is wrong, as a UserError (one line, exit 2).
"""

from __future__ import annotations

import csv
import json
import pathlib
from typing import Iterator

from maxent_jax.errors import UserError

TEXT_SUFFIXES = (".json", ".jsonl", ".csv")


def check_data_file(path: pathlib.Path) -> None:
    """Raise a UserError naming the first problem of the text data file `path`; other suffixes pass."""
    if path.suffix not in TEXT_SUFFIXES:
        return
    if not any(line.strip() for _, _, line in _utf8_lines(path)):
        raise UserError(f"data file {path} is empty: it has no rows")
    if path.suffix == ".csv":
        _check_csv(path)
    elif path.suffix == ".jsonl" or not _is_json_document(path):
        _check_json_lines(path)


def _utf8_lines(path: pathlib.Path) -> Iterator[tuple[int, int, str]]:
    """(line number, byte offset of the line, text) of each line, decoded strictly as UTF-8."""
    offset = 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise UserError(
                    f"data file {path} is not UTF-8 text: byte 0x{raw[err.start]:02x} at byte offset "
                    f"{offset + err.start} (line {number}) cannot be decoded; save the file as UTF-8"
                ) from None
            if "\x00" in text:
                raise UserError(f"data file {path} holds a NUL byte at byte offset {offset + text.index(chr(0))} "
                                f"(line {number}): it is binary, not {path.suffix[1:].upper()} text")
            yield number, offset, text
            offset += len(raw)


def _is_json_document(path: pathlib.Path) -> bool:
    """Whether a .json file is one JSON document (a list of records, or an object of columns) rather
    than JSON lines; a document that does not parse is reported here when it starts with '['."""
    first = ""
    for _, _, line in _utf8_lines(path):  # the whole file: UTF-8 without NUL bytes, or a named offset
        first = first or line.strip()[:1]
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        if first != "[":
            return False  # JSON lines, checked line by line
        raise UserError(f"data file {path} is not valid JSON at line {err.lineno}, column {err.colno} "
                        f"(character {err.pos}): {err.msg}") from None
    if isinstance(document, dict):
        return True
    if not isinstance(document, list) or not document or not all(isinstance(row, dict) for row in document):
        raise UserError(f"data file {path} must hold a non-empty JSON list of objects (one per row)")
    return True


def _check_json_lines(path: pathlib.Path) -> None:
    for number, offset, line in _utf8_lines(path):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"data file {path}: line {number} (byte offset {offset}) is not valid JSON: "
                            f"{err.msg} at column {err.colno}") from None
        if not isinstance(row, dict):
            raise UserError(f"data file {path}: line {number} (byte offset {offset}) is a JSON "
                            f"{type(row).__name__}, not an object with one field per column")


def _check_csv(path: pathlib.Path) -> None:
    for _ in _utf8_lines(path):  # UTF-8 and no NUL bytes, with the byte offset of a bad one
        pass
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        try:
            header = next(reader)
            for row in reader:
                if row and len(row) != len(header):
                    raise UserError(f"data file {path}: the row ending on line {reader.line_num} has {len(row)} "
                                    f"fields but the header has {len(header)} ({', '.join(header)})")
        except csv.Error as err:
            raise UserError(f"data file {path}: line {reader.line_num} is not valid CSV: {err}") from None
    if not header or not any(cell.strip() for cell in header):
        raise UserError(f"data file {path} has no header row naming its columns")
