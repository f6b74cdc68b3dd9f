"""What one bad line costs: a usage object of 1M rows read and normalized as the close does it
(flows.ingest.normalized_object), clean and with one bad line in its middle, as CSV and JSON lines.

    .venv/bin/python bench/bad_lines.py --rows 1000000 --out .bench/bad-lines
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from flows.ingest import normalized_object  # noqa: E402
from transforms.layout import USAGE_PREFIX  # noqa: E402


def objects(rows: int, out: Path) -> list[Path]:
    """clean.csv, bad.csv (one extra field), clean.jsonl, bad.jsonl (one 1e400), in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    frame = pl.DataFrame({
        "event_id": [f"evt-{n:09d}" for n in range(rows)],
        "customer_id": [f"c{n % 1000:04d}" for n in range(rows)],
        "meter": ["api_calls" if n % 3 == 0 else "input_tokens" for n in range(rows)],
        "quantity": [(n * 7919) % 100000 for n in range(rows)],
        "timestamp": [f"2026-10-{1 + n % 28:02d}T{n % 24:02d}:{n % 60:02d}:00Z" for n in range(rows)],
        "model": ["gpt-4o" if n % 2 else "gpt-4o-mini" for n in range(rows)],
    })
    frame.write_csv(out / "clean.csv")
    frame.write_ndjson(out / "clean.jsonl")
    for name, spoil in (("csv", lambda line: line + b",extra"),
                        ("jsonl", lambda line: line.replace(b'"quantity":', b'"quantity":1e400,"q":'))):
        lines = (out / f"clean.{name}").read_bytes().split(b"\n")
        lines[len(lines) // 2] = spoil(lines[len(lines) // 2])
        (out / f"bad.{name}").write_bytes(b"\n".join(lines))
    return [out / n for n in ("clean.csv", "bad.csv", "clean.jsonl", "bad.jsonl")]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--out", type=Path, default=Path(".bench/bad-lines"))
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    for path in objects(args.rows, args.out):
        times = []
        for _ in range(args.runs):
            started = time.perf_counter()
            frame, why = normalized_object(path, USAGE_PREFIX + path.name)
            times.append(time.perf_counter() - started)
        bad = frame.filter(pl.col("reason") == "malformed_line").height if frame is not None else None
        print(f"{path.name}: rows {None if frame is None else frame.height}, malformed {bad}, unreadable {why!r}, "
              f"best {min(times):.2f} s of {[round(t, 2) for t in times]}")


if __name__ == "__main__":
    main()
