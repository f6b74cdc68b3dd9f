"""Time a monthly close against the bare-DuckDB floor, on the same files, in one run.

    python bench/run.py --store .bench/store-10m --period 2026-10 [--profile]

(a) bench/baseline.py (bare DuckDB: read, dedup by event_id, aggregate per customer x meter, one
    graduated price in exact DECIMAL) in its own process;
(b) `.venv/bin/billrun close` end to end in its own process, after deleting the store's billing/
    folder, with PREFECT_LOGGING_LEVEL=INFO so that every step's log line can be timed.
Each child runs alone under /usr/bin/time -v (peak RSS of its largest process) while a sampler
reads /proc every 0.2 s (peak RSS of the whole process tree, and per close step). The figures go
to the terminal and to bench/results/<label>-events.json.

--profile then runs the close once more, in this process, under cProfile: time per step (the task
function's cumulative time), Prefect's own time between steps, and each step's hottest calls.
cProfile slows Python-heavy code more than native code (DuckDB, Polars), so use its percentages
to find hot spots and the un-profiled run (b) for the figures.
"""
from __future__ import annotations

import argparse
import cProfile
import hashlib
import json
import logging
import os
import platform
import pstats
import re
import shutil
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
sys.path.insert(0, str(REPO))
from transforms.layout import BILLING, USAGE_PREFIX, manifest_key  # noqa: E402  (the store layout; nothing heavy)

VENV_PYTHON = REPO / ".venv" / "bin" / "python"
BILLRUN = REPO / ".venv" / "bin" / "billrun"
TIME = Path("/usr/bin/time")
STEPS = ("fetch-inputs", "check-reference", "normalize-usage", "check-usage", "replay-credits",
         "rate-invoices", "write-outputs", "publish")
TASK_FUNCTIONS = {"fetch_inputs": "fetch-inputs", "check_reference": "check-reference",
                  "normalize_usage": "normalize-usage", "check_shard": "check-usage",
                  "replay_credits": "replay-credits", "rate_invoices": "rate-invoices",
                  "write_outputs": "write-outputs", "publish": "publish"}
STEP_FILES = ("flows/steps.py", "flows/outputs.py", "flows/publish.py")
"""Where the close's task functions are: the step a sampled stack is in is found by its frames."""
# Prefect names a task run "<task name>-<3 hex digits>"; tasks added to the close later are
# picked up too (they appear in the order they finish).
TASK_LINE = re.compile(r"Task run '(?P<task>[a-z][a-z0-9-]*?)-[0-9a-f]{3}' - (?P<msg>.*)$")
BODY_LINE = re.compile(r"^(?P<step>[a-z-]+): .* in (?P<seconds>\d+(\.\d+)?)s$")
MB = 1024 * 1024


# --- measuring a child process -------------------------------------------------------------------

def _ppid_map() -> dict[int, int]:
    out = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as fh:
                    stat = fh.read()
                out[int(entry.name)] = int(stat[stat.rindex(b")") + 2:].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    return out


def _descendants(root: int) -> set[int]:
    """Every process below `root` (not `root` itself): /proc/<pid>/task/<tid>/children where the
    kernel has it (cheap), else a scan of every process's parent."""
    if Path(f"/proc/{root}/task/{root}/children").exists():
        found, frontier = set(), [root]
        while frontier:
            pid = frontier.pop()
            try:
                tids = os.listdir(f"/proc/{pid}/task")
            except OSError:
                continue
            for tid in tids:
                try:
                    with open(f"/proc/{pid}/task/{tid}/children") as fh:
                        kids = [int(k) for k in fh.read().split()]
                except OSError:
                    continue
                for kid in kids:
                    if kid not in found:
                        found.add(kid)
                        frontier.append(kid)
        return found
    parents = _ppid_map()
    tree, frontier = set(), {root}
    while frontier:
        tree |= frontier
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier} - tree
    return tree - {root}


TICKS = os.sysconf("SC_CLK_TCK")


def _start_time(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[19]
    except (OSError, IndexError):
        return b""


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process (its own, not its children's)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICKS
    except (OSError, ValueError, IndexError):
        return 0.0


def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class TreeSampler(threading.Thread):
    """Samples (seconds since start, RSS summed over the tree, RSS of the largest process, CPU
    seconds used so far by the tree). CPU time is what a step costs whatever else the machine is
    running; wall time is not, on a shared machine."""

    def __init__(self, root_pid: int, started: float, every: float = 0.2):
        super().__init__(daemon=True)
        self.root, self.started, self.every = root_pid, started, every
        self.samples: list[tuple[float, int, int, float]] = []
        self._cpu: dict[int, float] = {}  # last CPU seen per process (exited ones keep theirs)
        self._birth: dict[int, bytes] = {}  # pid -> start time, to never signal a reused pid
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            tree = _descendants(self.root)
            rss = [_rss_bytes(pid) for pid in tree]
            for pid in tree:
                self._cpu[pid] = max(self._cpu.get(pid, 0.0), _cpu_seconds(pid))
                if pid not in self._birth:
                    self._birth[pid] = _start_time(pid)
            if rss:
                self.samples.append((time.perf_counter() - self.started, sum(rss), max(rss),
                                     sum(self._cpu.values())))
            self._halt.wait(self.every)

    def stop(self) -> None:
        self._halt.set()
        self.join()

    def pids(self) -> list[int]:
        """Every process seen in the tree."""
        return list(self._birth)

    def end_leftovers(self) -> None:
        """SIGTERM (then SIGKILL) the processes of this tree that outlived its root."""
        alive = [pid for pid, start in self._birth.items() if start and _start_time(pid) == start]
        for sig in (15, 9):
            for pid in alive:
                try:
                    os.kill(pid, sig)
                except OSError:
                    pass
            time.sleep(3)
            alive = [pid for pid in alive if _start_time(pid) == self._birth[pid]]
            if not alive:
                return

    def cpu_at(self, t: float) -> float:
        """CPU seconds used by the tree up to the last sample at or before `t`."""
        return max((s[3] for s in self.samples if s[0] <= t), default=0.0)

    def peak(self, lo: float = 0.0, hi: float = float("inf")) -> int:
        return max((s[1] for s in self.samples if lo <= s[0] <= hi), default=0)


def run_child(cmd: list[str], env: dict, log_path: Path, timeout: float | None) -> dict:
    """Run `cmd` alone, timed; every output line is kept with the second it arrived."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    time_file = log_path.with_suffix(".time")
    wrapped = [str(TIME), "-v", "-o", str(time_file)] + cmd if TIME.exists() else cmd
    before = _children_maxrss()
    started = time.perf_counter()
    proc = subprocess.Popen(wrapped, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1)
    sampler = TreeSampler(proc.pid, started)
    sampler.start()
    lines: list[tuple[float, str]] = []
    with log_path.open("w", encoding="utf-8") as log:
        def pump() -> None:
            for line in proc.stdout:
                t = time.perf_counter() - started
                lines.append((t, line.rstrip("\n")))
                log.write(f"{t:9.3f} {line}")
                log.flush()

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        wall = time.perf_counter() - started
        reader.join(timeout=10)
        if reader.is_alive():
            # The child died and left children of its own (Prefect's temporary server) holding
            # the output pipe: end exactly those processes, which this run started.
            sampler.end_leftovers()
            reader.join(timeout=10)
    sampler.stop()
    peak_kb, killed, cpu = None, None, {}
    if time_file.exists():
        # GNU time's report: peak RSS of the child's largest process, CPU, how it ended
        text = time_file.read_text()
        found = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
        peak_kb = int(found.group(1)) if found else None
        signal_found = re.search(r"Command terminated by signal (\d+)", text)
        exit_found = re.search(r"Exit status: (\d+)", text)
        if signal_found:
            rc = 128 + int(signal_found.group(1))
            killed = f"signal {signal_found.group(1)}" + _oom_note(set(sampler.pids()))
        elif exit_found and rc == 0:
            rc = int(exit_found.group(1))
        for key, pattern in (("user_s", r"User time \(seconds\): ([\d.]+)"),
                             ("sys_s", r"System time \(seconds\): ([\d.]+)")):
            found = re.search(pattern, text)
            cpu[key] = float(found.group(1)) if found else None
    if peak_kb is None:  # no /usr/bin/time: RUSAGE_CHILDREN keeps the maximum over all children
        peak_kb = max(_children_maxrss(), before)
    return {"cmd": cmd, "rc": rc, "wall_s": wall, "peak_rss_mb": round(peak_kb * 1024 / MB, 1),
            "tree_peak_rss_mb": round(sampler.peak() / MB, 1), **cpu, "killed": killed, "lines": lines,
            "sampler": sampler, "log": _rel(log_path)}


def _oom_note(pids: set[int]) -> str:
    """The kernel's OOM-kill line about one of `pids`, if the kernel log can be read here."""
    try:
        out = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    kills = [line for line in out.splitlines()
             if (m := re.search(r"Out of memory: Killed process (\d+)", line)) and int(m.group(1)) in pids]
    return f" ({kills[-1].split('] ', 1)[-1]})" if kills else ""


def _children_maxrss() -> int:
    import resource
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss


# --- reading the close's log -----------------------------------------------------------------------

def close_steps(lines: list[tuple[float, str]], sampler: TreeSampler | None, wall: float) -> dict:
    """Per step: its window (from the previous step's end to its own `Finished` line), the time
    the step measured itself (its `<step>: ... in N s` line), the rest (Prefect's orchestration of
    the task: parameter traversal, state changes) and the peak RSS in the window."""
    flow_begin = flow_end = server_start = None
    ends: dict[str, float] = {}
    bodies: dict[str, float] = {}
    failed: dict[str, str] = {}
    for t, text in lines:
        if "Starting temporary server" in text and server_start is None:
            server_start = t
        if "Beginning flow run" in text and flow_begin is None:
            flow_begin = t
        if re.search(r"Flow run '[^']+' - Finished in state", text):
            flow_end = t
        m = TASK_LINE.search(text)
        if not m:
            continue
        task, msg = m.group("task"), m.group("msg")
        body = BODY_LINE.match(msg)
        if body and body.group("step") == task:
            bodies[task] = float(body.group("seconds"))
        if msg.startswith("Finished in state"):
            ends[task] = t
            if "Completed" not in msg:
                failed[task] = msg
    steps, previous = [], flow_begin
    for step in sorted(ends, key=ends.get):
        window = ends[step] - previous if previous is not None else None
        body = bodies.get(step)
        steps.append({
            "step": step, "window_s": _r(window), "body_s": body,
            "orchestration_s": _r(window - body) if window is not None and body is not None else None,
            "pct_of_wall": _r(100 * window / wall, 1) if window is not None else None,
            "cpu_s": _r(sampler.cpu_at(ends[step]) - sampler.cpu_at(previous or 0)) if sampler else None,
            "peak_rss_mb": round(sampler.peak(previous or 0, ends[step]) / MB, 1) if sampler else None,
            "failed": failed.get(step),
        })
        previous = ends[step]
    done = [s["step"] for s in steps if not s["failed"]]
    running = next((s for s in STEPS if s not in done), None)
    if any(s["failed"] for s in steps):
        running = next(s["step"] for s in steps if s["failed"])
    last_end = max(ends.values(), default=flow_begin or 0.0)
    phases = {
        "startup_s": _r(flow_begin),  # interpreter, imports, Prefect's temporary server
        "startup_cpu_s": _r(sampler.cpu_at(flow_begin)) if sampler and flow_begin else None,
        "server_start_at_s": _r(server_start),
        "steps_s": _r(sum(s["window_s"] or 0 for s in steps)),
        "after_last_step_s": _r((flow_end - last_end) if flow_end is not None else None),  # artifacts, flow end
        "shutdown_s": _r(wall - flow_end) if flow_end is not None else None,
    }
    stopped = running if not set(STEPS) <= set(done) else None
    return {"steps": steps, "phases": phases, "completed": done, "stopped_in": stopped,
            "peak_rss_in_stopped_step_mb": round(sampler.peak(last_end) / MB, 1) if sampler and stopped else None}


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def _r(x: float | None, digits: int = 2) -> float | None:
    return None if x is None else round(x, digits)


# --- the runs ----------------------------------------------------------------------------------------

def child_env(prefect_home: Path) -> dict:
    env = dict(os.environ)
    env.update({"PREFECT_LOGGING_LEVEL": "INFO", "PREFECT_HOME": str(prefect_home), "PYTHONUNBUFFERED": "1",
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
                "PREFECT_TASK_INTROSPECTION_WARN_THRESHOLD": "0",
                # wide lines: rich would otherwise wrap the log lines at 80 columns
                "COLUMNS": "400"})
    env.pop("PREFECT_API_URL", None)
    return env


def run_baseline(args, label: str) -> dict:
    cmd = [str(VENV_PYTHON), str(BENCH / "baseline.py"), "--store", str(args.store), "--period", args.period]
    res = run_child(cmd, dict(os.environ), args.results / f"{label}-baseline.log", args.timeout)
    result = None
    for _, text in res["lines"]:
        if text.startswith("{"):
            result = json.loads(text)
    res["result"] = result
    return res


def reset_store(store: Path) -> None:
    """A close needs an open period: remove everything billrun wrote into the store."""
    shutil.rmtree(store / BILLING, ignore_errors=True)


def run_close(args, label: str) -> dict:
    reset_store(args.store)
    cmd = [str(BILLRUN), "close", "--period", args.period, "--store", str(args.store), "--plans", str(args.plans)]
    if args.duckdb_memory_limit:  # the experiment of bench/close_capped.py
        cmd = [str(VENV_PYTHON), str(BENCH / "close_capped.py"), "--duckdb-memory-limit", args.duckdb_memory_limit,
               *cmd[1:]]
    res = run_child(cmd, child_env(args.prefect_home), args.results / f"{label}-close.log", args.timeout)
    res.update(close_steps(res["lines"], res["sampler"], res["wall_s"]))
    manifest = args.store / manifest_key(args.period)
    if manifest.exists():
        m = json.loads(manifest.read_text())
        res["manifest"] = {"rows": m["rows"], "totals": m["totals"], "run_id": m["run_id"],
                           "outputs": len(m["outputs"])}
    if res["rc"] != 0:
        res["tail"] = [text for _, text in res["lines"][-25:]]
    return res


class StackSampler(threading.Thread):
    """A small sampling profiler (pyinstrument-like, standard library only): every `interval`
    seconds it reads every thread's stack and adds the elapsed time to each distinct function on
    it, under the close step the main thread is in. Unlike cProfile it does not slow each Python
    call, so native work (DuckDB, Polars, fsync) and Python work keep their real proportions.

    Kept per step: seconds on the stack of each billrun function (flows/, transforms/), and of
    each library function that billrun calls directly (the boundary: duckdb, polars, jinja2,
    babel, os.fsync ...), so the report names both the billrun code and what it waits on."""

    def __init__(self, main_ident: int, interval: float = 0.01):
        super().__init__(daemon=True)
        self.main, self.interval = main_ident, interval
        self.seconds: dict[tuple[str, tuple], float] = {}   # (step, func) -> seconds on the stack
        self.step_seconds: dict[str, float] = {}
        self._halt = threading.Event()
        self._roots = (str(REPO / "flows"), str(REPO / "transforms"))

    def run(self) -> None:
        last = time.perf_counter()
        while not self._halt.wait(self.interval):
            now = time.perf_counter()
            dt, last = now - last, now
            frames = sys._current_frames()
            step, f = "(outside steps)", frames.get(self.main)
            while f is not None:
                if f.f_code.co_name in TASK_FUNCTIONS and f.f_code.co_filename.endswith(STEP_FILES):
                    step = TASK_FUNCTIONS[f.f_code.co_name]
                    break
                f = f.f_back
            self.step_seconds[step] = self.step_seconds.get(step, 0.0) + dt
            for ident, frame in frames.items():
                if ident == self.ident:
                    continue
                where = step if ident == self.main else f"{step} [threads]"
                seen, callee = set(), None
                while frame is not None:
                    code = frame.f_code
                    key = (code.co_filename, code.co_firstlineno, code.co_name)
                    mine = code.co_filename.startswith(self._roots)
                    # the step's own function: what it calls counts, it and its callers do not
                    is_step = ident == self.main and step != "(outside steps)" and code.co_name in TASK_FUNCTIONS
                    if mine and key not in seen and not is_step:
                        seen.add(key)
                        self.seconds[(where, key)] = self.seconds.get((where, key), 0.0) + dt
                    if mine and callee is not None and not callee[1] and callee[0] not in seen:
                        seen.add(callee[0])  # a library function billrun called directly
                        self.seconds[(where, callee[0])] = self.seconds.get((where, callee[0]), 0.0) + dt
                    if is_step:
                        break
                    callee = (key, mine)
                    frame = frame.f_back

    def stop(self) -> None:
        self._halt.set()
        self.join()

    def report(self, top: int = 14) -> list[dict]:
        out = []
        order = list(STEPS) + sorted(set(self.step_seconds) - set(STEPS) - {"(outside steps)"}) + ["(outside steps)"]
        for step in order:
            total = self.step_seconds.get(step)
            if not total:
                continue
            rows = [{"func": _name(key) + (" [threads]" if where.endswith("[threads]") else ""),
                     "s": round(sec, 2), "pct_of_step": round(100 * sec / total, 1)}
                    for (where, key), sec in self.seconds.items()
                    if where in (step, f"{step} [threads]")
                    and not (key[2] in TASK_FUNCTIONS and key[0].endswith(STEP_FILES))]
            rows.sort(key=lambda r: -r["s"])
            out.append({"step": step, "s": round(total, 2), "top": [r for r in rows if r["pct_of_step"] >= 2][:top]})
        return out


def profile_close(args, label: str, mode: str) -> dict:
    """The close in this process under cProfile (per-step breakdown from the task functions'
    cumulative times) or under StackSampler (per step, the billrun functions and library calls
    that the sampled stacks spent their time in)."""
    os.environ.update({k: v for k, v in child_env(args.prefect_home).items() if k.startswith(("PREFECT", "DO_NOT"))})
    sys.path.insert(0, str(REPO))
    os.chdir(REPO)
    from flows.settings import prefect_defaults
    prefect_defaults()
    from prefect import Task

    import flows.outputs
    import flows.publish
    import flows.steps
    from flows.close import close_period

    # every task of the close, whatever was added since this file was written
    TASK_FUNCTIONS.update({v.fn.__name__: v.name for module in (flows.steps, flows.outputs, flows.publish)
                           for v in vars(module).values() if isinstance(v, Task)})

    captured: list[tuple[float, str]] = []
    started = time.perf_counter()

    class Capture(logging.Handler):
        def emit(self, record):
            name = getattr(record, "task_run_name", None) or ""
            prefix = f"Task run '{name}' - " if name else ""
            if record.name.startswith("prefect.flow_runs"):
                prefix = f"Flow run '{getattr(record, 'flow_run_name', '')}' - "
            captured.append((time.perf_counter() - started, prefix + record.getMessage()))

    handler = Capture(level=logging.INFO)
    for name in ("prefect.task_runs", "prefect.flow_runs"):
        logging.getLogger(name).addHandler(handler)
    reset_store(args.store)
    profiler = cProfile.Profile() if mode == "cprofile" else StackSampler(threading.get_ident())
    profiler.enable() if mode == "cprofile" else profiler.start()
    try:
        close_period(store=str(args.store), plans=str(args.plans), period=args.period)
        error = None
    except BaseException as exc:  # record where it stopped, like a failed subprocess run
        error = f"{type(exc).__name__}: {str(exc)[:300]}"
    finally:
        profiler.disable() if mode == "cprofile" else profiler.stop()
    wall = time.perf_counter() - started
    by_log = close_steps(captured, None, wall)
    if mode == "sample":
        return {"mode": mode, "wall_s": round(wall, 2), "error": error, "phases": by_log["phases"],
                "windows": {s["step"]: s["window_s"] for s in by_log["steps"]}, "steps": profiler.report()}
    pstats_path = args.results / f"{label}-close.pstats"
    profiler.dump_stats(pstats_path)
    stats = pstats.Stats(profiler)
    return {"mode": mode, "wall_s": round(wall, 2), "error": error, "pstats": _rel(pstats_path),
            **analyse(stats, wall, by_log)}


def analyse(stats: pstats.Stats, wall: float, by_log: dict) -> dict:
    """Per step: cumulative time of its task function; the rest of each step's window is Prefect."""
    raw = stats.stats  # func -> (cc, nc, tt, ct, callers{caller: (cc, nc, tt, ct)})
    callees: dict[tuple, dict[tuple, tuple]] = {}
    for func, (_, _, _, _, callers) in raw.items():
        for caller, edge in callers.items():
            callees.setdefault(caller, {})[func] = edge
    task_funcs = {f: TASK_FUNCTIONS[f[2]] for f in raw if f[0].endswith(STEP_FILES) and f[2] in TASK_FUNCTIONS}
    windows = {s["step"]: s["window_s"] for s in by_log["steps"]}
    steps = []
    def order(step: str) -> tuple[int, str]:  # the close's steps in order, tasks added since after them
        return (STEPS.index(step), "") if step in STEPS else (len(STEPS), step)

    for func, step in sorted(task_funcs.items(), key=lambda kv: order(kv[1])):
        body = raw[func][3]
        steps.append({"step": step, "body_s": round(body, 2), "pct_of_wall": round(100 * body / wall, 1),
                      "window_s": windows.get(step),
                      "prefect_s": round(windows[step] - body, 2) if windows.get(step) is not None else None,
                      "hot": _tree(func, callees, body, depth=4)})
    prefect = {name: round(sum(v[3] for f, v in raw.items() if f[0].endswith(path) and f[2] == name), 2)
               for path, name in (("prefect/utilities/collections.py", "visit_collection"),)}
    top_self = sorted(((v[2], f) for f, v in raw.items()), reverse=True)[:20]
    return {"steps": steps, "phases": by_log["phases"],
            "bodies_s": round(sum(s["body_s"] for s in steps), 2),
            "prefect_visit_collection_s": prefect["visit_collection"],
            "top_self_time": [{"func": _name(f), "self_s": round(tt, 2), "pct_of_wall": round(100 * tt / wall, 1)}
                              for tt, f in top_self]}


def _tree(func: tuple, callees: dict, total: float, depth: int, budget: float | None = None,
          seen: frozenset = frozenset()) -> list[dict]:
    """The callees of `func` that take at least 3% of `total` (cumulative time on the caller ->
    callee edge), `depth` levels deep. cProfile keeps edges, not paths: below the first level an
    edge's time is summed over every path to its caller, so the walk stops at builtins and at any
    edge that would take more than the node above it had (a sign of other paths)."""
    budget = total if budget is None else budget
    if depth == 0:
        return []
    out = []
    for callee, (_, _, _, ct) in sorted(callees.get(func, {}).items(), key=lambda kv: -kv[1][3]):
        if ct < 0.03 * total or callee in seen or ct > budget * 1.001:
            continue
        deeper = [] if callee[0] == "~" else _tree(callee, callees, total, depth - 1, ct, seen | {func})
        out.append({"func": _name(callee), "cum_s": round(ct, 2), "pct_of_step": round(100 * ct / total, 1),
                    "calls": deeper})
    return out


def _name(func: tuple) -> str:
    path, line, name = func
    if path == "~":
        return name
    for marker in ("site-packages/", str(REPO) + "/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{path}:{line}({name})"


# --- reporting -----------------------------------------------------------------------------------

def environment() -> dict:
    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True).stdout.strip()
        except OSError:
            return ""

    # The code a close runs: the modules `billrun close` imports, its SQL and templates. Another
    # engineer may be editing billrun while this runs; the digest says which version was measured.
    loaded = subprocess.run([str(VENV_PYTHON), "-c", "import sys, flows.cli, flows.close; print('\\n'.join("
                             "m.__file__ for m in list(sys.modules.values()) if getattr(m, '__file__', None)))"],
                            cwd=REPO, capture_output=True, text=True).stdout.split()
    files = {Path(f) for f in loaded
             if Path(f).is_relative_to(REPO / "flows") or Path(f).is_relative_to(REPO / "transforms")}
    files |= set((REPO / "transforms" / "sql").glob("*.sql")) | set((REPO / "transforms" / "templates").glob("*"))
    digest = hashlib.sha256()
    for path in sorted(files):
        if path.is_file():
            digest.update(path.relative_to(REPO).as_posix().encode() + b"\0" + path.read_bytes())
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = next((int(line.split()[1]) // 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), None)
    versions = subprocess.run([str(VENV_PYTHON), "-c", "import duckdb, polars, prefect, sys; "
                               "print(sys.version.split()[0], duckdb.__version__, polars.__version__, "
                               "prefect.__version__)"],
                              capture_output=True, text=True).stdout.split()
    return {"when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cpu": cpu, "cores": os.cpu_count(),
            "mem_mb": mem, "python": versions[0] if versions else None,
            "duckdb": versions[1] if len(versions) > 1 else None,
            "polars": versions[2] if len(versions) > 2 else None,
            "prefect": versions[3] if len(versions) > 3 else None,
            "git_head": git("rev-parse", "--short", "HEAD"),
            "uncommitted_in_flows_transforms": git("status", "--porcelain", "--", "flows", "transforms").splitlines(),
            "close_code_sha256": digest.hexdigest()[:16], "close_code_files": len(files),
            "loadavg_at_start": os.getloadavg()}


def count_rows(store: Path) -> int:
    meta = store / "bench-store.json"
    if meta.exists():
        return json.loads(meta.read_text())["rows"]
    out = subprocess.run([str(VENV_PYTHON), "-c", "import duckdb, sys; print(duckdb.sql(\"SELECT count(*) FROM "
                          "read_parquet($f, hive_partitioning=false)\", params={'f': sys.argv[1]}).fetchone()[0])",
                          str(store / USAGE_PREFIX / "**" / "*.parquet")], capture_output=True, text=True)
    return int(out.stdout.strip())


def label_of(n: int) -> str:
    for size, suffix in ((10**9, "b"), (10**6, "m"), (10**3, "k")):
        if n >= size and n % (size // 10) == 0:
            value = n / size
            return f"{value:g}{suffix}"
    return str(n)


def summary(res: dict, rows: int) -> dict:
    return {"rc": res["rc"], "wall_s": round(res["wall_s"], 2),
            "events_per_s": round(rows / res["wall_s"]) if res["rc"] == 0 else None,
            "peak_rss_mb": res["peak_rss_mb"], "tree_peak_rss_mb": res["tree_peak_rss_mb"],
            "cpu_s": round(res["user_s"] + res["sys_s"], 1) if res.get("user_s") is not None else None,
            "killed": res.get("killed"),
            "log": res["log"]}


def print_report(report: dict) -> None:
    rows = report["rows"]
    print(f"\n{rows:,} usage rows ({report['store']['duplicates']:,} duplicates), "
          f"{report['store']['customers']:,} customers, {report['environment']['cores']} cores")
    head = f"{'':28s} {'wall s':>9s} {'CPU s':>8s} {'events/s':>11s} {'peak RSS MB':>12s} {'tree RSS MB':>12s}  exit"
    print(head)
    print("-" * len(head))
    for key, name in (("baseline", "(a) bare DuckDB"), ("close", "(b) billrun close")):
        r = report.get(key)
        if r:
            eps = f"{r['events_per_s']:,}" if r["events_per_s"] else "-"
            cpu = f"{r['cpu_s']:8.1f}" if r.get("cpu_s") is not None else f"{'-':>8s}"
            print(f"{name:28s} {r['wall_s']:9.1f} {cpu} {eps:>11s} {r['peak_rss_mb']:12,.0f} "
                  f"{r['tree_peak_rss_mb']:12,.0f}  {r['rc']}")
    if report.get("ratio"):
        q = report["ratio"]
        cpu = f"{q['cpu']:7.1f}x" if q.get("cpu") else f"{'-':>8s}"
        print(f"{'ratio b/a':28s} {q['wall']:8.1f}x {cpu} {'':>11s} {q['peak_rss']:11.1f}x {q['tree_peak_rss']:11.1f}x")
    close = report.get("close")
    if close and close.get("steps"):
        print("\nbillrun close by step (window = previous step's end to this step's end; "
              "body = the step's own timing; rest = Prefect)")
        print(f"{'step':18s} {'window s':>9s} {'%wall':>6s} {'body s':>8s} {'prefect s':>10s} {'CPU s':>8s} "
              f"{'%CPU':>6s} {'peak MB':>8s}")
        ph = close["phases"]
        total_cpu = sum(s.get("cpu_s") or 0 for s in close["steps"]) + (ph.get("startup_cpu_s") or 0)
        startup_cpu = ph.get("startup_cpu_s") or 0
        print(f"{'(startup)':18s} {ph['startup_s'] or 0:9.1f} {100 * (ph['startup_s'] or 0) / close['wall_s']:6.1f} "
              f"{'':8s} {'':10s} {startup_cpu:8.1f} {100 * startup_cpu / (total_cpu or 1):6.1f}")
        for s in close["steps"]:
            body = f"{s['body_s']:8.1f}" if s["body_s"] is not None else f"{'-':>8s}"
            orch = f"{s['orchestration_s']:10.1f}" if s["orchestration_s"] is not None else f"{'-':>10s}"
            cpu = s.get("cpu_s") or 0
            print(f"{s['step']:18s} {s['window_s']:9.1f} {s['pct_of_wall']:6.1f} {body} {orch} {cpu:8.1f} "
                  f"{100 * cpu / (total_cpu or 1):6.1f} {s['peak_rss_mb']:8,.0f}")
        for name in ("after_last_step_s", "shutdown_s"):
            if ph.get(name) is not None:
                print(f"{'(' + name[:-2].replace('_', ' ') + ')':18s} {ph[name]:9.1f} "
                      f"{100 * ph[name] / close['wall_s']:6.1f}")
        if close.get("stopped_in"):
            print(f"close stopped in {close['stopped_in']} (peak tree RSS there "
                  f"{close['peak_rss_in_stopped_step_mb']} MB), exit {close['rc']}"
                  + (f", killed: {close['killed']}" if close.get("killed") else ""))
    sampled = report.get("profile_sample")
    if sampled:
        print(f"\nSampled profile of the close in-process ({sampled['wall_s']:.1f}s wall): per step, seconds "
              f"on the stack of billrun functions and of the library calls they make")
        for s in sampled["steps"]:
            print(f"  {s['step']:16s} {s['s']:8.1f}s {100 * s['s'] / sampled['wall_s']:5.1f}%")
            for row in s["top"]:
                print(f"      {row['pct_of_step']:5.1f}% {row['s']:8.1f}s  {row['func']}")
    prof = report.get("profile")
    if prof:
        print(f"\ncProfile of the close in-process: {prof['wall_s']:.1f}s wall "
              f"(Prefect visit_collection {prof['prefect_visit_collection_s']:.1f}s)")
        for s in prof["steps"]:
            print(f"  {s['step']:16s} {s['body_s']:8.1f}s {s['pct_of_wall']:5.1f}%  "
                  f"(+ Prefect around it {s['prefect_s'] if s['prefect_s'] is not None else '-'}s)")
            if s["body_s"] >= 0.5:
                _print_tree(s["hot"], 4)


def _print_tree(nodes: list[dict], indent: int) -> None:
    for n in nodes:
        print(f"{' ' * indent}{n['pct_of_step']:5.1f}% {n['cum_s']:7.1f}s  {n['func']}")
        _print_tree(n["calls"], indent + 2)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", type=Path, required=True)
    ap.add_argument("--period", required=True)
    ap.add_argument("--plans", type=Path, default=Path("plans"))
    ap.add_argument("--results", type=Path, default=BENCH / "results")
    ap.add_argument("--label", help="results name (default: the row count, e.g. 10m)")
    ap.add_argument("--profile", nargs="?", const="cprofile", choices=("cprofile", "sample"),
                    help="also run the close in-process under cProfile (default) or a low-overhead "
                         "stack sampler (--profile sample)")
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--skip-close", action="store_true")
    ap.add_argument("--timeout", type=float, default=None, help="seconds before a child is killed")
    ap.add_argument("--duckdb-memory-limit", help="experiment: run the close with DuckDB's memory_limit capped "
                                                  "(bench/close_capped.py), e.g. 12GB; results get their own label")
    ap.add_argument("--prefect-home", type=Path, default=REPO / ".bench" / "prefect-home",
                    help="Prefect state for the benchmark's closes (kept apart from ./.prefect)")
    args = ap.parse_args(argv)
    args.store, args.plans, args.results = (p.resolve() for p in (args.store, args.plans, args.results))
    args.results.mkdir(parents=True, exist_ok=True)
    args.prefect_home.mkdir(parents=True, exist_ok=True)

    rows = count_rows(args.store)
    label = args.label or label_of(rows) + (f"-duckdb-{args.duckdb_memory_limit.lower()}"
                                            if args.duckdb_memory_limit else "")
    meta_path = args.store / "bench-store.json"
    store_meta = json.loads(meta_path.read_text()) if meta_path.exists() else {"rows": rows}
    report = {"rows": rows, "period": args.period, "duckdb_memory_limit": args.duckdb_memory_limit,
              "store": {k: v for k, v in store_meta.items() if k != "args"}
              | {"path": str(args.store), "generator_args": store_meta.get("args")},
              "environment": environment()}
    out_path = args.results / f"{label}-events.json"
    if out_path.exists():  # keep figures a partial rerun does not remeasure
        previous = json.loads(out_path.read_text())
        for key in ("baseline", "close", "profile", "profile_sample"):
            if key in previous:
                report[key] = previous[key]

    def save() -> None:
        b, c = report.get("baseline"), report.get("close")
        if b and c and b["rc"] == 0 and c["rc"] == 0:
            report["ratio"] = {"wall": round(c["wall_s"] / b["wall_s"], 1),
                               "peak_rss": round(c["peak_rss_mb"] / b["peak_rss_mb"], 1),
                               "tree_peak_rss": round(c["tree_peak_rss_mb"] / b["tree_peak_rss_mb"], 1),
                               "cpu": round(c["cpu_s"] / b["cpu_s"], 1) if c.get("cpu_s") and b.get("cpu_s") else None}
        out_path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")

    # Sections kept from an earlier run keep the code version and load they were measured with.
    measured_with = {k: report["environment"][k] for k in ("when", "git_head", "uncommitted_in_flows_transforms",
                                                           "close_code_sha256", "loadavg_at_start")}
    if not args.skip_baseline:
        print(f"(a) bare DuckDB on {rows:,} rows ...", flush=True)
        b = run_baseline(args, label)
        report["baseline"] = summary(b, rows) | {"result": b["result"], "measured_with": measured_with}
        save()
    if not args.skip_close:
        print(f"(b) billrun close on {rows:,} rows ...", flush=True)
        c = run_close(args, label)
        report["close"] = summary(c, rows) | {k: c.get(k) for k in ("steps", "phases", "completed", "stopped_in",
                                                                    "peak_rss_in_stopped_step_mb", "manifest", "tail")}
        report["close"]["measured_with"] = measured_with | {"loadavg_at_end": os.getloadavg()}
        every = max(1, len(c["sampler"].samples) // 400)
        report["close"]["timeline"] = [(round(t, 1), round(tree / MB), round(top / MB), round(cpu, 1))
                                       for t, tree, top, cpu in c["sampler"].samples[::every]]
        if c.get("manifest"):
            expected = {"read": rows, "billed": store_meta.get("unique_events"),
                        "duplicates": store_meta.get("duplicates"), "quarantined": store_meta.get("quarantined")}
            report["close"]["counts_as_expected"] = all(v is None or c["manifest"]["rows"][k] == v
                                                        for k, v in expected.items())
        save()
    report["environment"]["loadavg_at_end"] = os.getloadavg()
    if args.profile:
        print(f"(profile) billrun close in-process under {args.profile} ...", flush=True)
        key = "profile" if args.profile == "cprofile" else "profile_sample"
        report[key] = profile_close(args, label, args.profile) | {"measured_with": measured_with}
    save()
    print_report(report)
    print(f"\nfigures: {_rel(out_path)}")


if __name__ == "__main__":
    main()
