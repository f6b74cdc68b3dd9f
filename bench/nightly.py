"""Does a nightly run cost what the new data costs, or what the month so far costs?

    python bench/nightly.py [--per-day 300000] [--customers 2000] [--nights 28] [--fast] [--next-period]

A month of synthetic usage with the same volume every weekday is generated once by
bench/generate.py (seeded; one Parquet object per day; 1% of rows are resent copies of events of
the same day or the two before). A fresh store then receives each day's object just before its
night, and `billrun nightly --date D` runs as its own process, as a scheduler would start it,
against one Prefect server started for the benchmark (so no run pays for a temporary server).
Every run is timed: process wall time, CPU time and peak RSS (from /usr/bin/time -v), the flow's
own time (its `Beginning flow run` to `Finished in state` log lines), and each step's window (from
the previous step's end to its own `Finished in state` line; PREFECT_LOGGING_LEVEL=INFO).

October 1 and 28, 2026 are both weekdays, so they bring the same volume: the first night has
nothing before it, the 28th has 27 days before it. If a night's cost grows with the new data and
not with the month so far, their ratio is about 1.

--fast       night 1, then days 2..27 taken in by one night (the 27th), then night 28: three runs.
--next-period  also run 2026-11-01 with all of October in the store and no November usage yet.

Results: <work>/nightly-results.json and a Markdown summary on stdout (see bench/NIGHTLY.md).
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from datetime import date, datetime, timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from transforms.layout import CUSTOMERS_PREFIX, SELLER_KEY, SUBSCRIPTIONS_PREFIX, usage_day_prefix  # noqa: E402

BILLRUN = REPO / ".venv" / "bin" / "billrun"
PREFECT = REPO / ".venv" / "bin" / "prefect"
PYTHON = REPO / ".venv" / "bin" / "python"
TIME = Path("/usr/bin/time")
PERIOD = "2026-10"
FIRST = date(2026, 10, 1)
STEPS = ("take-in", "check-reference", "normalize-usage", "check-night", "estimate", "publish-night")
LOG_LINE = re.compile(r"^(?P<clock>\d\d:\d\d:\d\d\.\d{3}) \| \w+\s*\| (?P<what>Flow run|Task run) "
                      r"'(?P<name>[^']+)' - (?P<msg>.*)$")
BODY = re.compile(r"^(?P<step>[a-z-]+): .* in (?P<seconds>\d+(\.\d+)?)s$")


# --- the data ------------------------------------------------------------------------------------

def _generator():
    spec = importlib.util.spec_from_file_location("bench_generate", REPO / "bench" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def month_events(per_day: int, days: int) -> int:
    """Rows for the month so that a weekday gets `per_day` (generate.py weighs weekdays 10,
    weekend days 7)."""
    weights = sum(7 if (FIRST + timedelta(days=d)).weekday() >= 5 else 10 for d in range(days))
    return per_day * weights // 10


def ensure_source(args) -> Path:
    """The generated month, reused when it was made with the same arguments."""
    source = args.work / "source"
    wanted = {"events": month_events(args.per_day, 31), "customers": args.customers, "seed": args.seed}
    meta = source / "bench-store.json"
    if meta.exists():
        made = json.loads(meta.read_text())["args"]
        if all(made.get(k) == v for k, v in wanted.items()):
            print(f"source: reusing {source} ({wanted['events']:,} rows)", flush=True)
            return source
    shutil.rmtree(source, ignore_errors=True)
    cmd = [str(PYTHON), str(REPO / "bench" / "generate.py"), "--events", str(wanted["events"]),
           "--customers", str(args.customers), "--out", str(source), "--period", PERIOD,
           "--seed", str(args.seed), "--plans", str(args.plans)]
    print("source:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)
    return source


def day_objects(source: Path, day: date) -> list[Path]:
    return sorted((source / usage_day_prefix(day)).glob("*.parquet"))


def fresh_store(source: Path, store: Path) -> None:
    shutil.rmtree(store, ignore_errors=True)
    store.mkdir(parents=True)
    for folder in (CUSTOMERS_PREFIX, SUBSCRIPTIONS_PREFIX):
        shutil.copytree(source / folder, store / folder)
    shutil.copy2(source / SELLER_KEY, store / SELLER_KEY)


def deliver_day(source: Path, store: Path, day: date) -> int:
    """Hard-link the day's objects into the store (same bytes, no copy); returns their rows."""
    import polars as pl

    rows = 0
    for path in day_objects(source, day):
        target = store / path.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.link(path, target)
        rows += pl.scan_parquet(path).select(pl.len()).collect().item()
    return rows


# --- one Prefect server for every run ------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrefectServer:
    def __init__(self, home: Path):
        self.home = home
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/api"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "PrefectServer":
        self.home.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, PREFECT_HOME=str(self.home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
                   DO_NOT_TRACK="1")
        env.pop("PREFECT_API_URL", None)
        log = (self.home / "server.log").open("w")
        self.proc = subprocess.Popen([str(PREFECT), "server", "start", "--host", "127.0.0.1", "--port",
                                      str(self.port), "--no-ui", "--no-services"],
                                     env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        self.__exit__()
        raise SystemExit(f"nightly bench: the Prefect server did not start (see {self.home / 'server.log'})")

    def __exit__(self, *exc) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the server's own session: it and its workers
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)


# --- one night -----------------------------------------------------------------------------------------

def code_fingerprint() -> str:
    """sha256 over the code and plans a night runs: a benchmark whose code changes between nights
    compares two versions, so it stops instead."""
    digest = hashlib.sha256()
    for path in sorted(p for folder in ("flows", "transforms", "plans") for p in (REPO / folder).rglob("*")
                       if p.is_file() and p.suffix in (".py", ".sql", ".yaml", ".j2")):
        digest.update(path.relative_to(REPO).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def run_night(args, server: PrefectServer, store: Path, day: date) -> dict:
    if code_fingerprint() != args.code:
        raise SystemExit(f"nightly bench: the code under {REPO} changed before night {day}; "
                         f"run again on a quiet tree (or a copy of it)")
    # PYTHONPATH first: the children run the code of this checkout (or copy), whatever the venv's
    # editable install points at.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
               PREFECT_API_URL=server.url, PREFECT_LOGGING_LEVEL="INFO", PYTHONUNBUFFERED="1",
               PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1", COLUMNS="400",
               PREFECT_TASK_INTROSPECTION_WARN_THRESHOLD="0")
    log_path = args.work / "logs" / f"nightly-{day}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    time_path = log_path.with_suffix(".time")
    cmd = [str(BILLRUN), "nightly", "--date", day.isoformat(), "--store", str(store), "--plans", str(args.plans),
           "--json"]
    wrapped = ([str(TIME), "-v", "-o", str(time_path)] if TIME.exists() else []) + cmd
    started_at = datetime.now()
    started = time.perf_counter()
    proc = subprocess.run(wrapped, env=env, cwd=REPO, capture_output=True, text=True, timeout=args.timeout)
    wall = time.perf_counter() - started
    log_path.write_text(proc.stderr + "\n--- stdout ---\n" + proc.stdout, encoding="utf-8")
    if proc.returncode != 0:
        raise SystemExit(f"nightly bench: night {day} exited {proc.returncode}; see {log_path}")
    result = json.loads(proc.stdout)
    night = {"day": day.isoformat(), "wall_s": wall, **_usage(time_path), **_steps(proc.stderr, started_at),
             "intake": result["intake"], "alerts_fired": result["alerts_fired"]}
    return night


def _usage(time_path: Path) -> dict:
    if not time_path.exists():
        return {}
    text = time_path.read_text()

    def grab(pattern: str) -> float | None:
        found = re.search(pattern, text)
        return float(found.group(1)) if found else None

    user, sys_ = grab(r"User time \(seconds\): ([\d.]+)"), grab(r"System time \(seconds\): ([\d.]+)")
    rss = grab(r"Maximum resident set size \(kbytes\): (\d+)")
    return {"cpu_s": (user or 0) + (sys_ or 0), "peak_rss_mb": rss / 1024 if rss else None}


def _clock(text: str, started_at: datetime) -> float:
    """A log line's HH:MM:SS.mmm as seconds after the process started (runs never span a day)."""
    t = datetime.combine(started_at.date(), datetime.strptime(text, "%H:%M:%S.%f").time())
    if t < started_at - timedelta(hours=12):
        t += timedelta(days=1)
    return (t - started_at).total_seconds()


def _steps(log: str, started_at: datetime) -> dict:
    begin = end = None
    ends: dict[str, float] = {}
    bodies: dict[str, float] = {}
    for line in log.splitlines():
        m = LOG_LINE.match(line.strip())
        if not m:
            continue
        t, msg = _clock(m.group("clock"), started_at), m.group("msg")
        if m.group("what") == "Flow run":
            if msg.startswith("Beginning flow run") and begin is None:
                begin = t
            elif msg.startswith("Finished in state"):
                end = t
            continue
        step = m.group("name").rsplit("-", 1)[0]
        body = BODY.match(msg)
        if body and body.group("step") == step:
            bodies[step] = float(body.group("seconds"))
        if msg.startswith("Finished in state"):
            ends[step] = t
    windows, previous = {}, begin
    for step in STEPS:
        if step in ends and previous is not None:
            windows[step] = ends[step] - previous
            previous = ends[step]
    return {"startup_s": begin, "flow_s": (end - begin) if begin is not None and end is not None else None,
            "after_steps_s": (end - previous) if end is not None and previous is not None else None,
            "steps": windows, "step_bodies": bodies}


# --- the benchmark ---------------------------------------------------------------------------------------

def environment(code: str) -> dict:
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True).stdout.strip()

    return {"cpus": os.cpu_count(), "python": platform.python_version(), "machine": platform.machine(),
            "load_avg_1_5_15": [round(x, 2) for x in os.getloadavg()],
            "commit": git("rev-parse", "--short", "HEAD"),
            "uncommitted": git("status", "--porcelain", "--", "flows", "transforms", "plans").splitlines(),
            "code_sha256": code, "code_dir": str(REPO), "started": datetime.now().isoformat(timespec="seconds")}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--per-day", type=int, default=300_000, help="usage rows on a weekday (duplicates included)")
    ap.add_argument("--customers", type=int, default=2_000)
    ap.add_argument("--nights", type=int, default=28, help="run October 1 .. this day")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--plans", type=Path, default=REPO / "plans")
    ap.add_argument("--work", type=Path, default=REPO / ".bench" / "nightly")
    ap.add_argument("--fast", action="store_true", help="nights 1, 27 (taking in days 2..27) and 28 only")
    ap.add_argument("--next-period", action="store_true", help="also run 2026-11-01 over a full October")
    ap.add_argument("--timeout", type=float, default=3600)
    args = ap.parse_args(argv)
    args.work = args.work.resolve()

    counts = _generator().day_counts(month_events(args.per_day, 31), FIRST, 31)
    if counts[0] != counts[args.nights - 1]:
        print(f"note: day 1 has {counts[0]:,} rows planned and day {args.nights} {counts[args.nights - 1]:,}")
    source = ensure_source(args)
    store = args.work / "store"
    fresh_store(source, store)
    args.code = code_fingerprint()
    env_info = environment(args.code)
    nights: list[dict] = []
    taken, waiting = 0, 0  # rows taken in by the nights run so far; rows in the store not yet
    with PrefectServer(args.work / "prefect-home") as server:
        for n in range(1, args.nights + 1):
            day = FIRST + timedelta(days=n - 1)
            waiting += deliver_day(source, store, day)
            if args.fast and 1 < n < args.nights - 1:
                continue  # taken in, all at once, by the night before the last
            night = run_night(args, server, store, day)
            night["new_rows"], night["rows_before"] = waiting, taken
            taken, waiting = taken + waiting, 0
            nights.append(night)
            print(f"night {day}: wall {night['wall_s']:6.2f}s  flow {night['flow_s']:6.2f}s  "
                  f"cpu {night.get('cpu_s', 0):6.2f}s  read {night['intake']['read']:>9,}  "
                  f"rows before {night['rows_before']:>10,}  "
                  + "  ".join(f"{s} {night['steps'].get(s, 0):.2f}" for s in STEPS), flush=True)
        if args.next_period:
            for d in range(args.nights + 1, 32):
                deliver_day(source, store, FIRST + timedelta(days=d - 1))
            night = run_night(args, server, store, date(2026, 11, 1))
            night["new_rows"], night["rows_before"] = 0, None
            night["label"] = "2026-11-01, October complete in the store, no November usage"
            nights.append(night)
            print(f"night 2026-11-01: wall {night['wall_s']:.2f}s flow {night['flow_s']:.2f}s "
                  f"read {night['intake']['read']:,} objects {night['intake']['objects']}", flush=True)
    env_info["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
    report = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "code"},
              "environment": env_info, "nights": nights}
    out = args.work / "nightly-results.json"
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print_markdown(report)
    print(f"\nresults: {out}")


def _f(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def print_markdown(report: dict) -> None:
    nights = [n for n in report["nights"] if "label" not in n]
    print("\n| night | new rows | rows before | process wall s | flow s | CPU s | peak RSS MB | "
          + " | ".join(STEPS) + " |")
    print("|---" * (7 + len(STEPS)) + "|")
    for n in report["nights"]:
        print(f"| {n['day']} | {_rows(n['new_rows'])} | {_rows(n['rows_before'])} | {_f(n['wall_s'])} | "
              f"{_f(n['flow_s'])} | {_f(n.get('cpu_s'))} | {_f(n.get('peak_rss_mb'), 0)} | "
              + " | ".join(_f(n["steps"].get(s)) for s in STEPS) + " |")
    first, last = nights[0], nights[-1]
    print(f"\n{last['day']} ({_rows(last['new_rows'])} new rows, {_rows(last['rows_before'])} before) / "
          f"{first['day']} ({_rows(first['new_rows'])} new rows, {_rows(first['rows_before'])} before):")
    for label, key in (("process wall", "wall_s"), ("flow", "flow_s"), ("CPU", "cpu_s")):
        if first.get(key) and last.get(key):
            print(f"- {label}: {last[key]:.2f}s / {first[key]:.2f}s = {last[key] / first[key]:.2f}x")
    for step in STEPS:
        a, b = first["steps"].get(step), last["steps"].get(step)
        if a and b:
            print(f"- {step}: {b:.2f}s / {a:.2f}s = {b / a:.2f}x")


def _rows(x: int | None) -> str:
    return "-" if x is None else f"{x:,}"


if __name__ == "__main__":
    sys.exit(main())
