"""Secrets never reach Prefect's database: its log table (tracebacks included) and its flow-run
parameters are read by everyone with the UI open and outlive the run.

The test plants unique secrets where an operator has them (credentials inside AWS_ENDPOINT_URL,
the AWS secret key and session token, a webhook URL with a token), runs real flows against the
session's Prefect server (a close that fails on the unreachable endpoint, nights that POST to
the webhook given by environment variable, by Prefect Secret block and by plain `--webhook`),
then reads every byte of the server's SQLite database: no planted secret is there. The scrubber
itself is checked on the forms secrets take in log lines.
"""
from __future__ import annotations

import logging
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app
from flows.secrets import RedactSecrets, redact, remember_secret, webhook_url
from transforms.errors import InputError

runner = CliRunner()


def billrun(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def planted(label: str) -> str:
    return f"planted{label}{uuid.uuid4().hex}"


# --- the scrubber ---------------------------------------------------------------------------------

@pytest.mark.parametrize("text, secret", [
    pytest.param('Could not connect to the endpoint URL: "http://AKIA:pw-{s}@s3.local:9000/b"', "pw-{s}",
                 id="userinfo of an endpoint"),
    pytest.param("POST https://hooks.example.com/in?channel=ops&token={s} failed", "{s}", id="token in a query"),
    pytest.param("signed https://b.s3.amazonaws.com/k?X-Amz-Signature={s}&X-Amz-Date=1", "{s}",
                 id="presigned signature"),
])
def test_urls_lose_their_credentials(text, secret):
    s = uuid.uuid4().hex
    clean = redact(text.format(s=s))
    assert secret.format(s=s) not in clean and "***" in clean


def test_the_environments_secret_values_are_masked_anywhere(monkeypatch):
    key, token, password = planted("key"), planted("token"), planted("pw")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key)
    monkeypatch.setenv("AWS_SESSION_TOKEN", token)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"https://user:{password}@minio.internal:9000")
    clean = redact(f"botocore said {key!r} and {token} then password={password}; bare {password}")
    assert key not in clean and token not in clean and password not in clean


def test_a_remembered_webhook_url_is_masked_whole():
    url = f"https://hooks.example.com/services/T0/B0/{uuid.uuid4().hex}"
    remember_secret(url)
    assert redact(f"cannot POST to {url}: refused") == "cannot POST to ***: refused"


def test_a_records_traceback_text_is_scrubbed(monkeypatch):
    secret = planted("tb")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    try:
        raise RuntimeError(f"signature with {secret} did not match")
    except RuntimeError:
        record = logging.LogRecord("prefect.task_runs", logging.ERROR, __file__, 1, "failed: %s", (secret,),
                                   exc_info=__import__("sys").exc_info())
    assert RedactSecrets().filter(record)
    text = logging.Formatter().format(record)
    assert secret not in text and "RuntimeError" in text


def test_a_webhook_reference_that_names_nothing_is_one_line(monkeypatch):
    monkeypatch.delenv("BILLRUN_NO_SUCH_HOOK", raising=False)
    with pytest.raises(InputError, match="BILLRUN_NO_SUCH_HOOK"):
        webhook_url("BILLRUN_NO_SUCH_HOOK", None)
    monkeypatch.setenv("BILLRUN_HOOK", "file:///etc/passwd")
    with pytest.raises(InputError, match="http"):
        webhook_url("BILLRUN_HOOK", None)


# --- real flows against the session's Prefect server ----------------------------------------------

class Hook:
    """A local endpoint that takes every POST."""

    def __init__(self):
        self.posts: list[str] = []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                hook.posts.append(self.path)
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _database_bytes() -> bytes:
    """Every byte of the Prefect server's SQLite database, write-ahead log included, once the
    client has sent its queued logs."""
    import time

    import prefect.settings
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)
    time.sleep(1.0)  # the server writes the batch it was sent
    url = prefect.settings.PREFECT_SERVER_DATABASE_CONNECTION_URL.value()
    url = url.get_secret_value() if hasattr(url, "get_secret_value") else url
    path = Path(url.split(":///", 1)[1])
    return b"".join(p.read_bytes() for p in path.parent.glob(path.name + "*"))


@pytest.mark.slow
def test_no_planted_secret_reaches_prefects_database(prefect_server, tmp_path, monkeypatch):
    from prefect.blocks.system import Secret

    from creditutil import write_store

    endpoint_pw, aws_key, aws_token = planted("endpointpw"), planted("awskey"), planted("awstoken")
    hook = Hook()
    by_env, by_block, plain = (f"{hook.base}/hook?token={planted(k)}" for k in ("env", "block", "plain"))
    secrets = [endpoint_pw, aws_key, aws_token] + [u.split("token=")[1] for u in (by_env, by_block, plain)]
    try:
        # 1. a close that fails on an unreachable endpoint whose URL holds credentials (the command
        #    line's check before Prefect finds it, so the message is the only place it could leak)
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://AKIAEXAMPLE:{endpoint_pw}@127.0.0.1:9")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", aws_key)
        monkeypatch.setenv("AWS_SESSION_TOKEN", aws_token)
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL_S3"):
            monkeypatch.delenv(name, raising=False)
        failed = billrun("close", "--period", "2026-10", "--store", "s3://billrun-secrets/x", "--plans", "plans")
        assert failed.exit_code == 1
        assert all(s not in failed.output for s in secrets)

        # 2. three nights, each firing a new spend alert (50%, 80%, 100% of 1000.00) that is POSTed
        plan = """
            plan: s
            version: 1
            effective_from: 2026-01-01
            currency: USD
            charges: [{meter: images, price: {model: standard, unit_price: "1.00"}}]
            spend_controls: {budget: "1000.00"}
            """
        store, plans = write_store(tmp_path, {"s-v1": plan}, ["c1"], [("s1", "c1", "s", "2026-10-01", "")],
                                   {"d1": [("e1", "c1", "images", "600", "2026-10-01T10:00:00Z")],
                                    "d2": [("e2", "c1", "images", "250", "2026-10-02T10:00:00Z")],
                                    "d3": [("e3", "c1", "images", "200", "2026-10-03T10:00:00Z")]}, [])
        monkeypatch.setenv("BILLRUN_TEST_HOOK", by_env)
        night = billrun("nightly", "--date", "2026-10-01", "--webhook-env", "BILLRUN_TEST_HOOK",
                        "--store", store, "--plans", plans)
        assert night.exit_code == 0, night.output
        Secret(value=by_block).save(name="billrun-test-hook", overwrite=True)
        night = billrun("nightly", "--date", "2026-10-02", "--webhook-secret", "billrun-test-hook",
                        "--store", store, "--plans", plans)
        assert night.exit_code == 0, night.output
        night = billrun("nightly", "--date", "2026-10-03", "--webhook", plain, "--store", store, "--plans", plans)
        assert night.exit_code == 0, night.output
        assert len(hook.posts) == 3 and all("token=" in p for p in hook.posts)   # all three delivered
    finally:
        hook.close()
    database = _database_bytes()
    # the nights are recorded there (whether a close-period run is depends on which other tests
    # this session's server has seen: the close above refuses before Prefect starts)
    assert b"nightly" in database
    for secret in secrets:
        assert secret.encode() not in database, f"{secret[:20]}... is in Prefect's database"
