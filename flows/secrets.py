"""Secrets stay out of Prefect: its log table and its flow-run parameters outlive the run and are
read by everyone who can open the UI.

Two rules:
- Every log record is scrubbed before a handler sees it (Prefect's API handler included, and the
  text of tracebacks): the userinfo of URLs (`https://key:secret@host` becomes
  `https://***@host`), the values of credential-like query parameters (`?token=***`), and every
  known secret value (the AWS secret key and session token of the environment, the password in
  `AWS_ENDPOINT_URL`, a resolved webhook URL's credentials).
- The nightly webhook is passed by reference, never as a value: the name of an environment
  variable (`--webhook-env`) or of a Prefect Secret block (`--webhook-secret`) that holds the URL.
  The flow resolves it when it delivers, so the URL is never a flow-run parameter.
"""
from __future__ import annotations

import logging
import re
import threading
from urllib.parse import parse_qsl, unquote, urlsplit

from flows.settings import named_variable, secret_values
from transforms.errors import InputError

MASK = "***"

# scheme://user[:password]@ -> scheme://***@
_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<userinfo>[^/?#@\s'\"<>]+)@")
# a credential-like query parameter's value: ?token=..., &X-Amz-Signature=..., &api_key=...
_QUERY_SECRET = re.compile(
    r"(?P<name>[?&;](?:[\w.-]*(?:token|key|secret|password|passwd|pwd|signature|sig|auth|credential|session)"
    r"[\w.-]*))=(?P<value>[^&#\s'\"<>]+)", re.IGNORECASE)
_SHORTEST = 4  # shorter values are too likely to be ordinary words to be redacted everywhere

_known: set[str] = set()
_lock = threading.Lock()


def remember_secret(value: str | None) -> None:
    """Redact `value` (a whole webhook URL: Slack-style URLs carry their token in the path) and
    the credentials inside it from every later log record."""
    if value:
        with _lock:
            _known.update(v for v in {value, *_credentials_of(value)} if len(v) >= _SHORTEST)


def _credentials_of(url: str) -> set[str]:
    """The password of a URL's userinfo and its credential-like query values, as written and decoded."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return set()
    found = {password} if password else set()
    found.update(v for k, v in parse_qsl(parts.query) if _QUERY_SECRET.match(f"?{k}=v"))
    return found | {unquote(v) for v in found}


def _secrets_of_the_environment() -> set[str]:
    """The secret values of the environment (flows.settings: SECRET_ENV, and URL_ENV's credentials)."""
    values, urls = secret_values()
    found = set(values)
    for url in urls:
        found |= _credentials_of(url)
    return {v for v in found if len(v) >= _SHORTEST}


def redact(text: str) -> str:
    """`text` with URL credentials, credential-like query values and known secrets masked."""
    if not text:
        return text
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", text)
    text = _QUERY_SECRET.sub(lambda m: f"{m['name']}={MASK}", text)
    with _lock:
        known = _known | _secrets_of_the_environment()
    for value in sorted(known, key=len, reverse=True):  # longest first: a token inside a URL
        if value in text:
            text = text.replace(value, MASK)
    return text


class RedactSecrets(logging.Filter):
    """Masks secrets in a record's message and traceback text before any handler formats it. The
    traceback is formatted once here and kept as `exc_text`, which every formatter then uses."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: let the handler report it as it would
            return True
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, ()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


_LOGGERS = ("", "prefect", "prefect.flow_runs", "prefect.task_runs", "prefect.extra", "prefect.workers")


def keep_secrets_out_of_logs() -> None:
    """Install the redacting filter on every handler of the root and Prefect loggers (Prefect's
    API handler, which feeds its log table, among them). Idempotent; called when a flow or a
    command starts, after Prefect has configured its logging."""
    import prefect.logging.configuration as configuration

    configuration.ensure_logging_setup()
    for name in _LOGGERS:
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, RedactSecrets) for f in handler.filters):
                # first, so that later filters (and the console) see the clean record
                handler.filters.insert(0, RedactSecrets())


def webhook_url(env: str | None, secret: str | None) -> str | None:
    """The webhook URL a reference names: the environment variable `env`, else the Prefect Secret
    block `secret`; None when neither is given. A reference that names nothing is a user's error."""
    url = None
    if env:
        url = named_variable(env)
        if not url:
            raise InputError(f"--webhook-env {env}: the environment variable is not set")
    elif secret:
        from prefect.blocks.system import Secret

        try:
            url = Secret.load(secret).get()
        except (ValueError, KeyError) as exc:
            raise InputError(f"--webhook-secret {secret}: no Prefect Secret block of that name "
                             f"({type(exc).__name__})") from None
        if not isinstance(url, str) or not url:
            raise InputError(f"--webhook-secret {secret}: the block does not hold a URL")
    if url is None:
        return None
    if urlsplit(url).scheme not in ("http", "https"):
        raise InputError(f"the webhook named by {'--webhook-env ' + env if env else '--webhook-secret ' + secret} "
                         f"is not an http(s) URL")
    remember_secret(url)
    return url
