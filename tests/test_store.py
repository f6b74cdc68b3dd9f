"""The store contract, run on both implementations: a local folder and a bucket on a real moto server.

Whatever billrun does to a store must mean the same thing on a laptop and on S3, so every
behaviour test below is parametrized over both; only the S3-specific wire details (pagination,
multipart ETags, 409 retries, reachability errors) have tests of their own.
"""
from __future__ import annotations

import hashlib
import random
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
import pytest
from boto3.s3.transfer import TransferConfig
from botocore.stub import Stubber

from flows.store import (
    TEMP_SUFFIX,
    InvalidKeyError,
    LocalStore,
    ObjectInfo,
    S3Store,
    Store,
    StoreError,
    check_key,
    open_store,
)

MIB = 1024 * 1024
S3_MIN_PART_BYTES = 5 * MIB  # S3 (and moto) refuse smaller parts except the last
LISTING_OBJECTS = 1005  # more than one page of list_objects_v2 (1000 keys)
HOSTILE_KEYS = ["../../etc/x", "/abs", "a/../b", "a\\b", "./a", "a//b", "a/", "", "a\x00b", "a\nb"]


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    """An empty store: a tmp folder, or the prefix `root/` of a fresh bucket on the moto server."""
    if request.param == "local":
        root = tmp_path / "store"
        root.mkdir()
        return open_store(str(root))
    bucket = request.getfixturevalue("s3_bucket")
    return open_store(f"s3://{bucket}/root")


def put_many(store: Store, objects: dict[str, bytes]) -> None:
    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(lambda item: store.put_bytes(*item), objects.items()))


def test_open_store_picks_the_implementation_from_the_uri(store: Store) -> None:
    assert isinstance(store, Store)
    assert isinstance(store, S3Store if store.uri.startswith("s3://") else LocalStore)


def test_list_is_recursive_sorted_and_complete_beyond_one_s3_page(store: Store) -> None:
    usage = {f"usage/date=2026-10-{i % 30 + 1:02d}/part-{i:04d}.csv": f"row {i}\n".encode()
             for i in range(LISTING_OBJECTS)}
    others = {"usage.csv": b"not under usage/", "customers/customers.csv": b"customer_id\n"}
    shuffled = list({**usage, **others}.items())
    random.Random(7).shuffle(shuffled)
    put_many(store, dict(shuffled))

    listed = store.list("usage/")

    assert [obj.key for obj in listed] == sorted(usage)
    assert all(obj.size == len(usage[obj.key]) for obj in listed)
    if isinstance(store, S3Store):
        assert all(obj.etag == hashlib.md5(usage[obj.key]).hexdigest() for obj in listed)
    else:
        assert all(obj.etag is None for obj in listed)
    # Prefixes are plain key prefixes, as on S3: "usage" also matches "usage.csv".
    assert len(store.list("usage")) == LISTING_OBJECTS + 1
    assert len(store.list()) == LISTING_OBJECTS + 2
    assert store.list("usage/date=2026-10-3") == [obj for obj in listed if "/date=2026-10-3" in obj.key]
    assert store.list("nothing/") == []

    store.delete_prefix("usage/")  # more than one DeleteObjects batch on S3

    assert store.list("usage/") == []
    assert [obj.key for obj in store.list()] == ["customers/customers.csv", "usage.csv"]


def test_s3_keys_live_under_the_store_prefix(s3_bucket: str) -> None:
    store = open_store(f"s3://{s3_bucket}/tenant/a/")
    store.put_bytes("usage/x.csv", b"1")

    raw = boto3.client("s3").list_objects_v2(Bucket=s3_bucket)["Contents"]

    assert store.uri == f"s3://{s3_bucket}/tenant/a"
    assert [obj["Key"] for obj in raw] == ["tenant/a/usage/x.csv"]
    assert store.list() == [ObjectInfo("usage/x.csv", 1, hashlib.md5(b"1").hexdigest())]


def test_fetch_returns_files_with_identical_bytes(store: Store, tmp_path: Path) -> None:
    objects = {
        "usage/date=2026-10-01/part-0.parquet": b"PAR1 pretend parquet",
        "usage/date=2026-10-02/events.jsonl": b'{"event_id": "e1"}\n',
        "customers/customers.csv": b"customer_id,name,email\n",
        "usage/archive.csv.gz": b"\x1f\x8b pretend gzip",
    }
    put_many(store, objects)
    cache_dir = tmp_path / "cache"

    paths = store.fetch(list(objects), cache_dir)

    assert list(paths) == list(objects)
    assert {key: path.read_bytes() for key, path in paths.items()} == objects
    assert paths["usage/date=2026-10-01/part-0.parquet"].name.endswith(".parquet")
    assert paths["usage/archive.csv.gz"].name.endswith(".csv.gz")
    # a copy on both sides (a folder store too): what a run reads is what it fetched and hashed
    assert all(path.parent == cache_dir for path in paths.values())
    assert len(set(paths.values())) == len(objects)
    store.put_bytes("customers/customers.csv", b"customer_id,name,email\nc9,rewritten,x@y\n")
    assert paths["customers/customers.csv"].read_bytes() == objects["customers/customers.csv"]


def test_fetch_of_a_missing_key_names_it(store: Store, tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="usage/missing.csv: not found"):
        store.fetch(["usage/missing.csv"], tmp_path / "cache")


def test_read_bytes_exists_and_sha256(store: Store) -> None:
    data = b"event_id,customer_id\n" * 1000
    store.put_bytes("usage/part-0.csv", data)

    assert store.exists("usage/part-0.csv")
    assert not store.exists("usage/part-1.csv")
    assert not store.exists("usage")  # a folder is not an object
    assert store.read_bytes("usage/part-0.csv") == data
    assert store.sha256("usage/part-0.csv") == hashlib.sha256(data).hexdigest()
    with pytest.raises(StoreError, match="usage/part-1.csv: not found"):
        store.read_bytes("usage/part-1.csv")
    with pytest.raises(StoreError, match="usage/part-1.csv: not found"):
        store.sha256("usage/part-1.csv")


def test_put_bytes_replaces(store: Store) -> None:
    store.put_bytes("billing/_state/run.json", b"first")
    store.put_bytes("billing/_state/run.json", b"second")

    assert store.read_bytes("billing/_state/run.json") == b"second"


def test_put_if_absent_commits_once_and_keeps_the_first(store: Store) -> None:
    key = "billing/period=2026-10/manifest.json"

    assert store.put_if_absent(key, b'{"run": "first"}') is True
    assert store.put_if_absent(key, b'{"run": "second"}') is False
    assert store.read_bytes(key) == b'{"run": "first"}'
    assert [obj.key for obj in store.list()] == [key]  # no temporary left behind


def test_local_put_if_absent_has_exactly_one_winner_under_contention(tmp_path: Path) -> None:
    # Local only: moto checks and stores in two steps, so it cannot referee a real race; S3 does.
    store = LocalStore(tmp_path)
    with ThreadPoolExecutor(max_workers=16) as pool:
        won = list(pool.map(lambda i: store.put_if_absent("manifest.json", f"run {i}".encode()), range(64)))

    assert won.count(True) == 1
    assert store.read_bytes("manifest.json") == f"run {won.index(True)}".encode()


def test_s3_put_if_absent_retries_a_409_conflict(s3_endpoint: str) -> None:
    # A 409 means another write or delete of the key was in flight: nobody is known to have won.
    store = S3Store("bucket-of-stubs")
    with Stubber(store._client) as stub:
        stub.add_client_error("put_object", service_error_code="ConditionalRequestConflict",
                              http_status_code=409)
        stub.add_client_error("put_object", service_error_code="PreconditionFailed", http_status_code=412)
        assert store.put_if_absent("manifest.json", b"{}") is False
        stub.add_client_error("put_object", service_error_code="ConditionalRequestConflict",
                              http_status_code=409)
        stub.add_response("put_object", {})
        assert store.put_if_absent("manifest.json", b"{}") is True
        stub.assert_no_pending_responses()


def test_copy_duplicates_and_replaces(store: Store) -> None:
    store.put_bytes("billing/_state/staging/invoices.parquet", b"new invoices")
    store.put_bytes("billing/period=2026-10/invoices.parquet", b"old invoices")

    store.copy("billing/_state/staging/invoices.parquet", "billing/period=2026-10/invoices.parquet")

    assert store.read_bytes("billing/period=2026-10/invoices.parquet") == b"new invoices"
    assert store.read_bytes("billing/_state/staging/invoices.parquet") == b"new invoices"
    with pytest.raises(StoreError, match="not found"):
        store.copy("billing/_state/staging/missing.parquet", "billing/x.parquet")


def test_put_files_and_copy_many_publish_every_file_and_replace(store: Store, tmp_path: Path) -> None:
    files = []
    for i in range(25):
        path = tmp_path / f"inv-{i}.html"
        path.write_bytes(f"invoice {i}".encode())
        files.append((f"billing/_state/staging/invoices/INV-{i:03d}.html", path))
    store.put_bytes("billing/period=2026-10/invoices/INV-003.html", b"older")

    store.put_files(files)
    store.copy_many([(key, key.replace("_state/staging", "period=2026-10")) for key, _ in files])
    tmp_path.joinpath("inv-0.html").write_bytes(b"changed after publishing")

    published = [o.key for o in store.list("billing/period=2026-10/")]
    assert published == [f"billing/period=2026-10/invoices/INV-{i:03d}.html" for i in range(25)]
    assert store.read_bytes("billing/period=2026-10/invoices/INV-003.html") == b"invoice 3"
    assert store.read_bytes("billing/period=2026-10/invoices/INV-000.html") == b"invoice 0"
    store.delete_prefix("billing/_state/staging/")  # the published copies outlive their staging
    assert store.read_bytes("billing/period=2026-10/invoices/INV-024.html") == b"invoice 24"
    assert [o.key for o in store.list("billing/_state/")] == []
    with pytest.raises(StoreError, match="missing"):
        store.copy_many([("billing/_state/staging/missing.html", "billing/x.html")])
    assert not store.exists("billing/x.html")


def test_delete_and_delete_prefix_stay_inside_the_folder(store: Store) -> None:
    put_many(store, {
        "billing/period=2026-1/invoices.parquet": b"1",
        "billing/period=2026-1/invoices/INV-1.html": b"1",
        "billing/period=2026-10/invoices.parquet": b"10",
        "billing/period=2026-11/invoices.parquet": b"11",
    })

    store.delete("billing/period=2026-11/invoices.parquet")
    store.delete("billing/period=2026-11/invoices.parquet")  # deleting nothing is not an error
    store.delete_prefix("billing/period=2026-1/")

    assert [obj.key for obj in store.list()] == ["billing/period=2026-10/invoices.parquet"]
    with pytest.raises(InvalidKeyError, match="must name a folder"):
        store.delete_prefix("billing/period=2026-1")
    with pytest.raises(InvalidKeyError):
        store.delete_prefix("")


def test_put_file_of_a_large_output_goes_multipart_on_s3(store: Store, tmp_path: Path) -> None:
    source = tmp_path / "invoice_lines.parquet"
    data = random.Random(12).randbytes(12 * MIB)
    source.write_bytes(data)
    if isinstance(store, S3Store):
        small_parts = TransferConfig(multipart_threshold=S3_MIN_PART_BYTES,
                                     multipart_chunksize=S3_MIN_PART_BYTES)
        store = S3Store(store.bucket, store.prefix, transfer_config=small_parts)

    store.put_file("billing/period=2026-10/invoice_lines.parquet", source)

    [info] = store.list("billing/")
    assert info.size == len(data)
    assert store.sha256(info.key) == hashlib.sha256(data).hexdigest()
    if isinstance(store, S3Store):
        assert info.etag is not None and info.etag.endswith("-3")  # 5 + 5 + 2 MiB: three parts
    else:
        assert sorted(p.name for p in (store.root / "billing/period=2026-10").iterdir()) == [
            "invoice_lines.parquet"]


@pytest.mark.parametrize("key", HOSTILE_KEYS, ids=repr)
def test_hostile_keys_are_rejected_by_every_method(store: Store, key: str, tmp_path: Path) -> None:
    source = tmp_path / "payload.txt"
    source.write_bytes(b"payload")
    store.put_bytes("ok.txt", b"ok")
    calls = {
        "exists": lambda: store.exists(key),
        "read_bytes": lambda: store.read_bytes(key),
        "fetch": lambda: store.fetch(["ok.txt", key], tmp_path / "cache"),
        "sha256": lambda: store.sha256(key),
        "put_bytes": lambda: store.put_bytes(key, b"x"),
        "put_file": lambda: store.put_file(key, source),
        "put_if_absent": lambda: store.put_if_absent(key, b"x"),
        "copy from": lambda: store.copy(key, "copied.txt"),
        "copy to": lambda: store.copy("ok.txt", key),
        "put_files": lambda: store.put_files([("fine.txt", source), (key, source)]),
        "copy_many from": lambda: store.copy_many([(key, "copied.txt")]),
        "copy_many to": lambda: store.copy_many([("ok.txt", key)]),
        "delete": lambda: store.delete(key),
        "delete_prefix": lambda: store.delete_prefix(key + "/"),
    }
    if key not in ("", "a/"):  # '' and 'a/' are fine prefixes: everything, and the folder a
        calls["list"] = lambda: store.list(key)

    for name, call in calls.items():
        with pytest.raises(InvalidKeyError):
            call()
            pytest.fail(f"{name} accepted {key!r}")

    assert [obj.key for obj in store.list()] == ["ok.txt"]
    local_files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert local_files == (["payload.txt", "store/ok.txt"] if isinstance(store, LocalStore) else ["payload.txt"])
    assert not (tmp_path.parent / "etc").exists()


@pytest.mark.parametrize("key", ["usage/date=2026-10-01/part-0.parquet", "a b/c,d.csv", "kunden/müller.csv",
                                 "billing/corrections/run=2026-10-05T00:00Z/invoices.parquet"])
def test_check_key_accepts_ordinary_keys(key: str) -> None:
    assert check_key(key) == key


def test_invalid_key_errors_are_both_store_and_value_errors() -> None:
    with pytest.raises(ValueError, match=r"invalid store key '\.\./\.\./etc/x': contains a '\.\.' segment"):
        check_key("../../etc/x")
    with pytest.raises(StoreError, match=r"'a\\nb': contains a control character"):
        check_key("a\nb")


def test_unreachable_endpoint_fails_fast_in_one_line_without_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "sEcReT-billrun-must-never-print-this"
    with socket.socket() as sock:  # bound, then released: nothing listens there
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed_port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDBILLRUNTEST")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)

    started_at = time.monotonic()
    with pytest.raises(StoreError) as raised:
        open_store("s3://billing-bucket/prod")
    elapsed_seconds = time.monotonic() - started_at

    message = str(raised.value)
    assert message == (f"s3://billing-bucket/prod: cannot reach the S3 endpoint "
                       f"http://127.0.0.1:{closed_port}: connection refused")
    assert elapsed_seconds < 10
    chain: list[BaseException] = []
    error: BaseException | None = raised.value
    while error is not None:
        chain.append(error)
        error = error.__cause__ or error.__context__
    assert not any(secret in str(e) or secret in repr(e) for e in chain)


def test_missing_bucket(s3_endpoint: str) -> None:
    with pytest.raises(StoreError) as raised:
        open_store("s3://billrun-no-such-bucket/prefix")

    assert str(raised.value) == "s3://billrun-no-such-bucket: bucket not found"


def test_access_denied_is_one_line(s3_endpoint: str) -> None:
    # moto grants everything by default; a stubbed AccessDenied is what S3 answers without rights.
    store = S3Store("someone-elses-bucket", "prefix")
    with Stubber(store._probe_client) as stub, pytest.raises(StoreError) as raised:
        stub.add_client_error("list_objects_v2", service_error_code="AccessDenied", http_status_code=403)
        store.check_reachable()

    assert str(raised.value) == ("s3://someone-elses-bucket/prefix: access denied "
                                 "(check the AWS credentials and the bucket policy)")


def test_missing_local_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)

    with pytest.raises(StoreError, match=r"^store \./x not found: no such folder") as raised:
        open_store("./x")
    assert "\n" not in str(raised.value)

    created = open_store("./x", create=True)
    assert isinstance(created, LocalStore) and created.root == tmp_path / "x"
    assert open_store(f"file://{tmp_path / 'x'}").uri == created.uri


def test_unsupported_scheme() -> None:
    with pytest.raises(StoreError, match="unsupported scheme"):
        open_store("gs://bucket/prefix")


def test_local_listing_ignores_writes_in_progress(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.put_bytes("billing/invoices.parquet", b"done")
    (tmp_path / "billing" / f".0123{TEMP_SUFFIX}").write_bytes(b"half")

    assert [obj.key for obj in store.list()] == ["billing/invoices.parquet"]
