"""An operator's environment problem is one line and exit 1, never a traceback: an AWS profile
that does not exist, a disk that fills up while the close writes its outputs.

A full disk is simulated: the Parquet writer raises what it raises on a full disk (an OSError
with ENOSPC, or Polars' own "Invalid thrift: transport error" while the disk has no space left).
"""
from __future__ import annotations

import errno
from collections import namedtuple
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from closeutil import copy_tree_to_store
from flows.cli import app

GOLDEN = Path(__file__).parent / "golden"
runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 1, result.output
    text = result.stderr.strip()
    assert text.startswith("billrun: error: ") and "\n" not in text, text
    assert "Traceback" not in result.output + result.stderr
    for fragment in fragments:
        assert fragment in text, text


@pytest.fixture
def golden_store(tmp_path) -> str:
    store = str(tmp_path / "store")
    copy_tree_to_store(GOLDEN / "store", store)
    return store


def close(store: str):
    return run("close", "--period", "2026-10", "--store", store, "--plans", str(GOLDEN / "plans"))


@pytest.mark.parametrize("command", [["status"], ["close", "--period", "2026-10"]])
def test_an_aws_profile_that_does_not_exist_is_one_line(prefect_server, monkeypatch, command):
    monkeypatch.setenv("AWS_PROFILE", "nope")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/billrun-tests/config")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/billrun-tests/credentials")
    result = run(*command, "--store", "s3://acme/billing", "--plans", str(GOLDEN / "plans"))
    assert_one_line_error(result, "s3://acme/billing", "AWS profile 'nope' not found", "AWS_PROFILE")


def test_enospc_while_writing_the_outputs_is_one_line(prefect_server, golden_store, monkeypatch):
    write = pl.DataFrame.write_parquet

    def full(self, file, *args, **kwargs):
        if str(file).endswith("invoices.parquet"):  # the outputs, once the work is done
            raise OSError(errno.ENOSPC, "No space left on device", str(file))
        return write(self, file, *args, **kwargs)

    monkeypatch.setattr(pl.DataFrame, "write_parquet", full)
    result = close(golden_store)
    assert_one_line_error(result, "no space left on the device writing", "invoices.parquet", "run the command again")
    assert not list(Path(golden_store).glob("billing/period=2026-10/manifest.json"))


Usage = namedtuple("Usage", "total used free")


WRITE_PARQUET = pl.DataFrame.write_parquet


def thrift_error(self, file, *args, **kwargs):
    # what Polars' Parquet writer raises when the disk fills under it (here: writing the outputs)
    if str(file).endswith("invoices.parquet"):
        raise pl.exceptions.ComputeError("parquet: File out of specification: Invalid thrift: transport error")
    return WRITE_PARQUET(self, file, *args, **kwargs)


def test_a_writer_error_on_a_disk_with_no_space_left_is_one_line(prefect_server, golden_store, monkeypatch):
    import flows.diskfull

    monkeypatch.setattr(pl.DataFrame, "write_parquet", thrift_error)
    monkeypatch.setattr(flows.diskfull.shutil, "disk_usage", lambda path: Usage(1 << 30, (1 << 30) - 4096, 4096))
    result = close(golden_store)
    assert_one_line_error(result, "no space left on the device holding", golden_store, "4096 bytes free",
                          "ComputeError")


def test_the_same_error_with_space_left_is_a_bug_and_keeps_its_traceback(prefect_server, golden_store, monkeypatch):
    monkeypatch.setattr(pl.DataFrame, "write_parquet", thrift_error)
    with pytest.raises(pl.exceptions.ComputeError):
        close(golden_store)
