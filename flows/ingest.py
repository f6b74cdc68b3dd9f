"""Reading input objects from local files (fetched from the store) into frames.

Only this module knows file formats; everything downstream sees frames. A usage object is never
a reason to stop a close: a CSV or JSON line that does not parse is quarantined alone (reason
`malformed_line`, with its line number and what is wrong where), and an object that cannot be
read at all (corrupt Parquet, an unsupported column type, a reader that fails or panics) is set
aside whole as `unreadable_object`, while every other object bills.
"""
from __future__ import annotations

import csv
import decimal
import io
import json
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from transforms.errors import InputError
from transforms.inputs.usage import malformed_usage, normalized_usage
from transforms.layout import ADJUSTMENTS_PREFIX, PURCHASES_PREFIX, USAGE_PREFIX

USAGE_SUFFIXES = (".parquet", ".csv", ".jsonl", ".ndjson")


def is_usage_key(key: str) -> bool:
    return key.startswith(USAGE_PREFIX) and key.lower().endswith(USAGE_SUFFIXES)


def is_purchases_key(key: str) -> bool:
    return key.startswith(PURCHASES_PREFIX) and key.lower().endswith((".csv", ".parquet"))


def is_adjustments_key(key: str) -> bool:
    return key.startswith(ADJUSTMENTS_PREFIX) and key.lower().endswith((".csv", ".parquet"))


LINE_SEARCH_MAX_BYTES = 512 * 1024 * 1024
"""Above this size an object that fails to parse whole is set aside whole, unsearched: finding
its bad lines would hold several copies of it in memory (a 1 GB object of junk, say)."""

PARSE_BUDGET = 20_000
"""Parses of parts allowed to find the bad lines of one object (a few seconds). An object that
needs more (junk, or lines that each parse but conflict in type) is set aside whole."""

MALFORMED = pl.DataFrame(schema={"source_row": pl.Int64, "line": pl.Int64, "detail": pl.String})


@dataclass(frozen=True)
class UsageRead:
    """One usage object as read: the records that parsed and the lines that did not."""

    rows: pl.DataFrame               # records in input order, typed as the format gives them
    source_rows: pl.Series | None    # their row numbers, when some rows were set aside (else 1..n)
    malformed: pl.DataFrame          # MALFORMED: one row per record that does not parse


def read_usage_object(path: Path, key: str) -> UsageRead:
    """The rows of one usage object. CSV is read as text (parsing is the boundary's job);
    Parquet and JSON lines keep their types. A CSV or JSON lines object is parsed whole (the
    fast path); only if that fails is it parsed again in parts to find the lines at fault.
    Raises on a Parquet object that cannot be read."""
    fmt = key.lower().rsplit(".", 1)[-1]
    if fmt == "parquet":
        return UsageRead(pl.read_parquet(path), None, MALFORMED)
    try:
        return UsageRead(_parse(fmt, path), None, MALFORMED)
    except pl.exceptions.PolarsError as whole:
        if path.stat().st_size > LINE_SEARCH_MAX_BYTES:
            raise
        return _read_around_bad_lines(fmt, path.read_bytes(), whole)


def _parse(fmt: str, source) -> pl.DataFrame:
    if fmt == "csv":
        return pl.read_csv(source, infer_schema=False)
    return pl.read_ndjson(source, infer_schema_length=None)


FANOUT = 16
"""Parts a failing part is split into: one bad line among n costs about 1.07 parses of the object
(n, then n/16, n/256, ...), against 2 when halving."""


def _read_around_bad_lines(fmt: str, data: bytes, whole: Exception) -> UsageRead:
    """The object's records without the lines that do not parse, found by splitting: a part that
    parses is kept (its frame), a part that fails is split in FANOUT parts, down to single lines.
    No Python object per row until a line is known to be bad.

    Row numbers stay what the fast path gives a clean object: the record's position among the
    data lines (after the CSV header; blank JSON lines are not records). A CSV record quoted over
    several lines in an object that also has a bad line may be split apart and is then
    quarantined line by line, never billed in part."""
    lines = data.split(b"\n")
    if lines and lines[-1].strip() == b"":
        lines.pop()  # the newline that ends the last line starts no record
    header, first_line = b"", 1
    if fmt == "csv":
        if not lines:
            raise whole
        header, lines, first_line = lines[0] + b"\n", lines[1:], 2
    line_no = None  # file line of each record, when it is not first_line + its index
    if fmt != "csv" and any(not line.strip() for line in lines):  # blank JSON lines are no records
        kept_no = [(first_line + i, line) for i, line in enumerate(lines) if line.strip()]
        line_no, lines = [n for n, _ in kept_no], [line for _, line in kept_no]

    def file_line(index: int) -> int:
        return first_line + index if line_no is None else line_no[index]

    budget = [PARSE_BUDGET]
    good: list[tuple[int, int, pl.DataFrame]] = []  # (first record, end, its rows)
    bad: list[tuple[int, int, str]] = []  # (record, file line, what is wrong)

    def sort_out(lo: int, hi: int) -> None:
        step = max(1, -(-(hi - lo) // FANOUT))
        for start in range(lo, hi, step):
            end = min(hi, start + step)
            budget[0] -= 1
            if budget[0] < 0:
                raise whole
            try:
                frame = _parse(fmt, io.BytesIO(header + b"\n".join(lines[start:end]) + b"\n"))
                error = None if frame.height == end - start else ValueError(
                    f"{frame.height} records in {end - start} lines")
            except (pl.exceptions.PolarsError, pl.exceptions.PanicException) as exc:
                error = exc
            if error is None:
                good.append((start, end, frame))
            elif end - start == 1:
                bad.append((start, file_line(start), _what_is_wrong(fmt, header, lines[start], error)))
            else:
                sort_out(start, end)

    if len(lines) > 1:
        sort_out(0, len(lines))  # the whole object is known to fail: start with its parts
    elif lines:
        bad.append((0, file_line(0), _what_is_wrong(fmt, header, lines[0], whole)))
    rows = _joined(fmt, header, lines, good, whole)
    source_rows = (pl.concat([pl.int_range(lo + 1, hi + 1, dtype=pl.Int64, eager=True) for lo, hi, _ in good])
                   if good else pl.Series(dtype=pl.Int64))
    return UsageRead(rows, source_rows.alias("source_row"),
                     pl.DataFrame({"source_row": [i + 1 for i, _, _ in bad], "line": [n for _, n, _ in bad],
                                   "detail": [d for _, _, d in bad]}, schema=MALFORMED.schema))


def _joined(fmt: str, header: bytes, lines: list[bytes], good: list, whole: Exception) -> pl.DataFrame:
    """The good parts' rows as one frame, typed as one parse of them all would type them: JSON
    parts inferred apart are brought to common types (an int column and a float one make a
    float), else the good lines are parsed again together."""
    if not good:
        return _parse(fmt, io.BytesIO(header))
    try:
        return pl.concat([frame for _, _, frame in good], how="diagonal_relaxed")
    except pl.exceptions.PolarsError:
        pass
    rows = _parse(fmt, io.BytesIO(header + b"\n".join(b"\n".join(lines[lo:hi]) for lo, hi, _ in good) + b"\n"))
    if rows.height != sum(hi - lo for lo, hi, _ in good):  # each part parsed alone but not together
        raise whole
    return rows


def _what_is_wrong(fmt: str, header: bytes, line: bytes, error: Exception) -> str:
    """What is wrong with one line, and where in it when the parser says so."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"not UTF-8 text at character {exc.start}"
    if fmt == "csv":
        names = next(csv.reader([header.decode("utf-8", "replace").rstrip("\r\n")]), [])
        fields = next(csv.reader([text.rstrip("\r")]), [])
        if len(fields) > len(names):
            where = len(",".join(fields[:len(names)])) + 1 if '"' not in text else None
            at = f", the first extra one at character {where}" if where is not None else ""
            return f"{len(fields)} fields where the header has {len(names)}{at}"
    else:
        try:
            value = json.loads(text, parse_float=_finite, parse_constant=_finite)
        except json.JSONDecodeError as exc:
            return f"{exc.msg}: character {exc.pos}"
        except NotFinite as exc:
            return f"number {exc} at character {text.find(str(exc))} is not finite (send it as a string)"
        if not isinstance(value, dict):
            return f"a JSON {type(value).__name__.replace('NoneType', 'null')} where an object was expected"
    # characters count from 0, as the parsers count them
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


class NotFinite(ValueError):
    """A JSON number that is no finite decimal (1e400, NaN, Infinity): no quantity can be read from it."""


_FLOAT_OVERFLOW = decimal.Decimal(2**1024 - 2**970)
"""The smallest magnitude a JSON reader's binary float rounds to infinity (half an ulp past the
largest double), as an exact decimal: numbers are compared, never converted."""


def _finite(text: str) -> str:
    number = decimal.Decimal(text)
    if not number.is_finite() or abs(number) >= _FLOAT_OVERFLOW:
        raise NotFinite(text)
    return text


def normalized_object(path: Path, key: str) -> tuple[pl.DataFrame | None, str | None]:
    """One usage object read and normalized (transforms.inputs.usage), its malformed lines included as
    quarantined rows; or (None, why) for an object that cannot be read at all. Whatever the
    reader or the normalization meets in the object's bytes (a Polars or DuckDB error, an
    unsupported column type, a panic in a Rust reader) is the object's fault, not the close's."""
    try:
        read = read_usage_object(path, key)
        frame = normalized_usage(read.rows, key, read.source_rows)
        if read.malformed.height:
            frame = pl.concat([frame, malformed_usage(read.malformed, key)]).sort("source_row")
        return frame, None
    except (MemoryError, RecursionError):
        raise  # the machine's limits, not the object's content
    except (Exception, pl.exceptions.PanicException) as exc:  # a panic is a BaseException (pyo3)
        return None, (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


def read_table(path: Path, key: str) -> pl.DataFrame:
    """A customers, subscriptions, credit purchases or adjustments file; a user error names the object."""
    try:
        if key.endswith(".parquet"):
            return pl.read_parquet(path)
        return pl.read_csv(path, infer_schema=False)
    except Exception as exc:  # any parser failure is the file's fault, said in one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{key}: cannot be read ({first})") from None
