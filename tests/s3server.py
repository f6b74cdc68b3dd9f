"""A real S3 endpoint for tests: moto's standalone server, run as its own process on 127.0.0.1.

A separate process (not moto's in-process mock) so boto3 goes through real HTTP, retries,
multipart uploads and conditional headers exactly as it does against S3.
"""
from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

HOST = "127.0.0.1"
STARTUP_TIMEOUT_SECONDS = 20.0
POLL_INTERVAL_SECONDS = 0.1
STOP_TIMEOUT_SECONDS = 5.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _server_command(port: int) -> list[str]:
    # The moto_server of the interpreter running the tests (the venv's), never one on PATH.
    script = Path(sys.executable).parent / "moto_server"
    launcher = [str(script)] if script.exists() else [sys.executable, "-m", "moto.server"]
    return [*launcher, "-H", HOST, "-p", str(port)]


def _answers(endpoint_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{endpoint_url}/moto-api/", timeout=1):
            return True
    except urllib.error.HTTPError:
        return True  # any HTTP answer means the server is up
    except OSError:
        return False


@contextmanager
def moto_server_process() -> Iterator[str]:
    """Runs `moto_server` on a free port of 127.0.0.1 and yields its endpoint URL until exit."""
    port = free_port()
    endpoint_url = f"http://{HOST}:{port}"
    # The server logs every request; a pipe nobody reads would fill up and stall it, so the log
    # goes to a file, which also explains a failed start.
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(_server_command(port), stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
            while not _answers(endpoint_url):
                if process.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    tail = log.read()[-2000:].decode(errors="replace")
                    state = f"exited with {process.returncode}" if process.poll() is not None else (
                        f"not answering after {STARTUP_TIMEOUT_SECONDS:.0f} s")
                    raise RuntimeError(f"moto_server on {endpoint_url} {state}:\n{tail}")
                time.sleep(POLL_INTERVAL_SECONDS)
            yield endpoint_url
        finally:
            process.terminate()
            try:
                process.wait(timeout=STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
