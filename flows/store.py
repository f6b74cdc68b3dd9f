"""The store: where billrun reads its inputs and writes its outputs (CONTRACT section 2).

One small interface, `Store`, with two implementations chosen at run time from the URI by
`open_store`: `LocalStore` for a folder (the demo, tests) and `S3Store` for `s3://bucket/prefix`.
Keys are always relative to the store root and '/'-separated (`usage/date=2026-10-01/part-0.parquet`);
`check_key` guards every one of them, so an id taken from a data file can never name a path outside
the store. Every failure reaches the user as a `StoreError`: one line saying what and where, never
a credential.

Writes are atomic on both sides: a reader sees the old object or the new one, never half of one.
`put_if_absent` is the commit point of a run (the manifest): exactly one writer wins it.
"""
from __future__ import annotations

import builtins
import hashlib
import os
import re
import shutil
import stat
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Protocol, runtime_checkable
from urllib.parse import urlsplit, urlunsplit
from urllib.request import url2pathname

import boto3
from boto3.exceptions import Boto3Error
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    HTTPClientError,
    NoCredentialsError,
    PartialCredentialsError,
    ProfileNotFound,
    ReadTimeoutError,
    SSLError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

MIB = 1024 * 1024
# Outputs above this size are uploaded in parts: a retry resends one part, not the whole table.
MULTIPART_THRESHOLD_BYTES = 8 * MIB
MULTIPART_CHUNK_BYTES = 8 * MIB
FETCH_WORKERS = 8
# Each parallel download may itself use ranged GETs on a large object; the connection pool is
# sized for both so boto3 never discards connections under load.
FETCH_RANGED_GETS_PER_OBJECT = 4
HASH_CHUNK_BYTES = MIB
# Conditional puts answered 409 (another write or delete of the same key in flight) are retried:
# AWS documents 409 as "retry", not as "someone else won".
CONDITIONAL_PUT_ATTEMPTS = 4
CONDITIONAL_PUT_BACKOFF_SECONDS = 0.2

# Throttling (503 SlowDown) and 5xx are retried with backoff by botocore itself; adaptive mode also
# slows the client down when S3 pushes back, which matters with 8 parallel downloads.
S3_CLIENT_CONFIG = Config(
    retries={"mode": "adaptive", "max_attempts": 8},
    connect_timeout=5,
    read_timeout=60,
    max_pool_connections=FETCH_WORKERS * FETCH_RANGED_GETS_PER_OBJECT,
)
# The reachability check at open must fail fast: a wrong endpoint should cost seconds, not the
# minutes that eight adaptive retries of a dead address would take.
S3_PROBE_CONFIG = Config(
    retries={"mode": "standard", "total_max_attempts": 2},
    connect_timeout=3,
    read_timeout=10,
)

# Local writes go to a hidden temporary file next to the target, then are renamed over it. The
# suffix keeps it out of `list` and out of any `*.parquet` glob while it is being written.
TEMP_SUFFIX = ".billrun-tmp"
_URI_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_SAFE_SUFFIX = re.compile(r"\.[A-Za-z0-9]{1,16}")


class StoreError(Exception):
    """A store operation that failed; str() is one line for the user: what and where."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))


class InvalidKeyError(StoreError, ValueError):
    """A key that could escape the store root or that S3 and a folder would read differently."""


@dataclass(frozen=True)
class ObjectInfo:
    """One object of the store: its key (relative to the root), size in bytes, S3 ETag (None locally)."""

    key: str
    size: int
    etag: str | None


def check_key(key: str) -> str:
    """`key` unchanged if it is a safe relative store key; raises InvalidKeyError otherwise."""
    if not isinstance(key, str) or not key:
        raise InvalidKeyError(f"invalid store key {key!r}: empty")
    if any(ord(char) < 32 or ord(char) == 127 for char in key):
        raise InvalidKeyError(f"invalid store key {key!r}: contains a control character")
    if "\\" in key:
        raise InvalidKeyError(f"invalid store key {key!r}: contains a backslash (use '/')")
    if key.startswith("/"):
        raise InvalidKeyError(f"invalid store key {key!r}: absolute (keys are relative to the store root)")
    for segment in key.split("/"):
        if segment == "":
            raise InvalidKeyError(f"invalid store key {key!r}: empty path segment")
        if segment in (".", ".."):
            raise InvalidKeyError(f"invalid store key {key!r}: contains a '{segment}' segment")
    return key


def check_prefix(prefix: str) -> str:
    """`prefix` unchanged if it is '' (everything), a safe key, or a safe key followed by '/'."""
    if prefix == "":
        return prefix
    check_key(prefix[:-1] if prefix.endswith("/") else prefix)
    return prefix


def _check_move(src_prefix: str, dst_prefix: str, keys: Sequence[str]) -> None:
    """Both prefixes are folder prefixes, and every key to move is under the source."""
    _check_folder_prefix(src_prefix)
    _check_folder_prefix(dst_prefix)
    for key in keys:
        if not key.startswith(src_prefix):
            raise InvalidKeyError(f"{key}: not under {src_prefix}")


def _check_folder_prefix(prefix: str) -> str:
    # delete_prefix("billing/period=2026-1") would also take 2026-10, -11 and -12 on S3, whose
    # prefixes are plain strings; requiring a folder ('/' at the end) rules that out.
    if not prefix.endswith("/"):
        raise InvalidKeyError(f"invalid prefix {prefix!r} for delete: must name a folder and end with '/'")
    return check_prefix(prefix)


@runtime_checkable
class Store(Protocol):
    """What billrun needs from a store; `LocalStore` and `S3Store` behave the same behind it.

    Prefixes are key prefixes in the S3 sense (`usage/` lists everything under usage/, recursively).
    """

    @property
    def uri(self) -> str: ...

    def list(self, prefix: str = "") -> builtins.list[ObjectInfo]: ...

    def exists(self, key: str) -> bool: ...

    def read_bytes(self, key: str) -> bytes: ...

    def fetch(self, keys: Sequence[str], cache_dir: Path) -> dict[str, Path]: ...

    def sha256(self, key: str) -> str: ...

    def put_bytes(self, key: str, data: bytes) -> None: ...

    def put_file(self, key: str, path: Path) -> None: ...

    def put_if_absent(self, key: str, data: bytes) -> bool: ...

    def copy(self, src_key: str, dst_key: str) -> None: ...

    def put_files(self, items: Sequence[tuple[str, Path]]) -> None:
        """Many `put_file`s at once, each key whole or absent, all durable on return."""
        ...

    def copy_many(self, pairs: Sequence[tuple[str, str]], before: Callable[[], None] | None = None) -> None:
        """Many `copy`s at once, each destination whole or absent, all durable on return;
        `before` (a fence check) is called before each copy starts."""
        ...

    def local_folder(self, prefix: str) -> Path | None:
        """The folder on this machine that holds the keys under `prefix`, if the store is one:
        outputs can then be written straight into place instead of uploaded."""
        ...

    def sync(self) -> None:
        """Makes what was written into `local_folder`s durable."""
        ...

    def move_prefix(self, src_prefix: str, dst_prefix: str, keys: Sequence[str],
                    before: Callable[[], None] | None = None) -> None:
        """`keys` (under `src_prefix`) moved to the same names under `dst_prefix`: copied, then
        deleted from the source. A folder store renames the folder in one step when the
        destination does not exist yet. `before` is called before each write."""
        ...

    def delete(self, key: str) -> None: ...

    def delete_prefix(self, prefix: str) -> None: ...


def open_store(uri: str, *, create: bool = False) -> Store:
    """The store named by `uri`: `s3://bucket/prefix`, or a local folder (optionally `file://...`).

    A local folder must exist unless `create` is set (the demo makes its own). An S3 store is
    checked once here, so a wrong endpoint, bucket or credential fails before any work starts.
    """
    if uri.startswith("s3://"):
        bucket, _, prefix = uri[len("s3://"):].partition("/")
        store = S3Store(bucket, prefix)
        store.check_reachable()
        return store
    root = _local_root(uri)
    if create:
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"store {uri}: cannot create the folder: {exc.strerror or exc}") from exc
    if not root.is_dir():
        reason = "not a folder" if root.exists() else "no such folder"
        raise StoreError(f"store {uri} not found: {reason} (create it, or pass --store with an "
                         f"existing folder or s3://bucket/prefix)")
    return LocalStore(root)


def _local_root(uri: str) -> Path:
    if uri.startswith("file://"):
        parts = urlsplit(uri)
        if parts.netloc not in ("", "localhost"):
            raise StoreError(f"store {uri}: file:// URIs must name a local path (file:///path)")
        return Path(url2pathname(parts.path))
    if _URI_SCHEME.match(uri):
        raise StoreError(f"store {uri}: unsupported scheme (use a local folder or s3://bucket/prefix)")
    return Path(uri)


def store_identity(uri: str) -> str:
    """The store `uri` names, whatever folder the command runs from: `./billing-data` from two
    folders is two stores, a link to a store is that store. Asks nothing of the store."""
    if uri.startswith("s3://"):
        bucket, _, prefix = uri[len("s3://"):].partition("/")
        return f"s3://{bucket}/{prefix.strip('/')}"
    return os.path.realpath(_local_root(uri))


# --------------------------------------------------------------------------------------------
# Local folder


class LocalStore:
    """A store in a local folder: one file per key, under `root`."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).absolute()
        self._real_root = os.path.realpath(self.root)

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    @property
    def uri(self) -> str:
        return str(self.root)

    def _path(self, key: str) -> Path:
        """The file of `key`; a symbolic link anywhere on its way (a file or a folder inside
        the store) is refused: a link could read a secret from outside the store into a table,
        or send outputs outside it."""
        path = self.root.joinpath(*check_key(key).split("/"))
        if os.path.realpath(path) != os.path.join(self._real_root, *key.split("/")):
            parts = key.split("/")
            for depth in range(1, len(parts) + 1):
                if os.path.islink(self.root.joinpath(*parts[:depth])):
                    raise _link_error(self._where("/".join(parts[:depth])))
        return path

    def _where(self, key: str) -> str:
        return f"{self.uri}/{key}"

    def list(self, prefix: str = "") -> builtins.list[ObjectInfo]:
        check_prefix(prefix)
        folder, _, name_start = prefix.rpartition("/")
        start = self._path(folder) if folder else self.root
        found: builtins.list[ObjectInfo] = []
        with _local_errors(self._where(prefix), "list"):
            for dirpath, dirnames, filenames in os.walk(start):
                if dirpath == str(start):
                    # Only the first level can fall outside a partial name such as "usage/date=2026-1".
                    dirnames[:] = [d for d in dirnames if d.startswith(name_start)]
                relative = Path(dirpath).relative_to(self.root).as_posix()
                for name in dirnames:  # os.walk lists a linked folder here (and never enters it)
                    if os.path.islink(os.path.join(dirpath, name)):
                        raise _link_error(self._where(name if relative == "." else f"{relative}/{name}"))
                for name in filenames:
                    key = name if relative == "." else f"{relative}/{name}"
                    if name.endswith(TEMP_SUFFIX) or not key.startswith(prefix):
                        continue
                    try:
                        info = os.lstat(os.path.join(dirpath, name))
                    except FileNotFoundError:  # deleted while we walked: not part of the listing
                        continue
                    if stat.S_ISLNK(info.st_mode):
                        raise _link_error(self._where(key))
                    if stat.S_ISREG(info.st_mode):
                        found.append(ObjectInfo(key=key, size=info.st_size, etag=None))
        return sorted(found, key=lambda obj: obj.key)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def read_bytes(self, key: str) -> bytes:
        path = self._path(key)
        with _local_errors(self._where(key), "read"):
            return path.read_bytes()

    def fetch(self, keys: Sequence[str], cache_dir: Path) -> dict[str, Path]:
        """A copy of each file in `cache_dir`, each read once: what is hashed and billed is that
        copy, even if someone rewrites a file of the store while the run reads it."""
        sources = {key: self._path(key) for key in keys}  # every key checked before the first copy
        cache_dir = Path(cache_dir)
        cache_dir.mkdir(parents=True, exist_ok=True)
        paths = {}
        for key, source in sources.items():
            paths[key] = cache_dir / _cache_name(self.uri, key)
            with _local_errors(self._where(key), "read"):
                descriptor = os.open(source, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0))
                with os.fdopen(descriptor, "rb") as handle, paths[key].open("wb") as copy:
                    shutil.copyfileobj(handle, copy, HASH_CHUNK_BYTES)
        return paths

    def sha256(self, key: str) -> str:
        path = self._path(key)
        with _local_errors(self._where(key), "read"), path.open("rb") as handle:
            return hashlib.file_digest(handle, "sha256").hexdigest()

    def put_bytes(self, key: str, data: bytes) -> None:
        self._replace(key, lambda handle: handle.write(data))

    def put_file(self, key: str, path: Path) -> None:
        check_key(key)
        with Path(path).open("rb") as source:
            self._replace(key, lambda handle: shutil.copyfileobj(source, handle, HASH_CHUNK_BYTES))

    def put_if_absent(self, key: str, data: bytes) -> bool:
        """Writes `key` only if no object has that key; False if one does. Atomic: link(2) refuses
        an existing name, and the linked file is already complete."""
        target = self._path(key)
        with _local_errors(self._where(key), "write"):
            temp = _write_temp(target.parent, lambda handle: handle.write(data))
            try:
                os.link(temp, target)
            except FileExistsError:
                return False
            finally:
                temp.unlink(missing_ok=True)
            _fsync_folder(target.parent)
        return True

    def copy(self, src_key: str, dst_key: str) -> None:
        source_path = self._path(src_key)
        self._path(dst_key)
        with _local_errors(self._where(src_key), "read"):
            source = source_path.open("rb")
        with source:
            self._replace(dst_key, lambda handle: shutil.copyfileobj(source, handle, HASH_CHUNK_BYTES))

    def put_files(self, items: Sequence[tuple[str, Path]]) -> None:
        """Every file written under a temporary name, the file system flushed once, then each
        renamed into place: per-file fsyncs cost a disk round trip each (minutes for 100k
        invoices), one sync costs one. Every key is checked before the first write."""
        for key, _ in items:
            check_key(key)
        temps = []
        try:
            for key, path in items:
                target = self._path(key)
                with _local_errors(self._where(key), "write"), Path(path).open("rb") as source:
                    temps.append((_write_temp(target.parent, lambda h: shutil.copyfileobj(source, h, HASH_CHUNK_BYTES),
                                              durable=False), target))
            os.sync()
            for temp, target in temps:
                with _local_errors(str(target), "write"):
                    os.replace(temp, target)
            temps = []
            _fsync_folders({self._path(key).parent for key, _ in items})
        finally:
            for temp, _ in temps:
                temp.unlink(missing_ok=True)

    def copy_many(self, pairs: Sequence[tuple[str, str]], before: Callable[[], None] | None = None) -> None:
        """Each destination a hard link to its source (no bytes copied: a stored file is never
        changed in place, only replaced), made under a temporary name and renamed into place;
        a copy where links are refused. Every key is checked before the first."""
        for pair in pairs:
            for key in pair:
                check_key(key)
        for src_key, dst_key in pairs:
            source, target = self._path(src_key), self._path(dst_key)
            if before:
                before()
            with _local_errors(self._where(src_key), "read"):
                os.stat(source)
            with _local_errors(self._where(dst_key), "write"):
                target.parent.mkdir(parents=True, exist_ok=True)
                temp = target.parent / f".{uuid.uuid4().hex}{TEMP_SUFFIX}"
                try:
                    os.link(source, temp)
                except OSError:  # no hard links here (a file system without them)
                    self.copy(src_key, dst_key)
                    continue
                try:
                    os.replace(temp, target)
                except BaseException:
                    temp.unlink(missing_ok=True)
                    raise
        _fsync_folders({self._path(dst).parent for _, dst in pairs})

    def local_folder(self, prefix: str) -> Path | None:
        folder = self._path(_check_folder_prefix(prefix).rstrip("/"))
        with _local_errors(self._where(prefix), "write"):
            folder.mkdir(parents=True, exist_ok=True)
        return folder

    def sync(self) -> None:
        os.sync()

    def move_prefix(self, src_prefix: str, dst_prefix: str, keys: Sequence[str],
                    before: Callable[[], None] | None = None) -> None:
        _check_move(src_prefix, dst_prefix, keys)
        source, target = self._path(src_prefix.rstrip("/")), self._path(dst_prefix.rstrip("/"))
        if not target.exists() and source.is_dir():
            with _local_errors(self._where(dst_prefix), "write"):
                target.parent.mkdir(parents=True, exist_ok=True)
                if before:
                    before()
                os.rename(source, target)  # one step: the whole folder, or nothing
                _fsync_folder(target.parent)
            return
        self.copy_many([(key, dst_prefix + key[len(src_prefix):]) for key in keys], before)
        for key in keys:
            self.delete(key)

    def delete(self, key: str) -> None:
        path = self._path(key)
        with _local_errors(self._where(key), "delete"):
            path.unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> None:
        _check_folder_prefix(prefix)
        for obj in self.list(prefix):
            self.delete(obj.key)
        # Empty folders are invisible to `list` but would linger for a human browsing the store.
        folder = self._path(prefix.rstrip("/"))
        for dirpath, _, _ in os.walk(folder, topdown=False):
            try:
                os.rmdir(dirpath)
            except OSError:  # not empty: something outside the prefix's objects, e.g. a temp file
                pass

    def _replace(self, key: str, write: Callable[[BinaryIO], object]) -> None:
        target = self._path(key)
        with _local_errors(self._where(key), "write"):
            temp = _write_temp(target.parent, write)
            try:
                os.replace(temp, target)
            except BaseException:
                temp.unlink(missing_ok=True)
                raise


def _write_temp(folder: Path, write: Callable[[BinaryIO], object], durable: bool = True) -> Path:
    # Same folder as the target, so the final rename or link never crosses a filesystem. Created
    # with 0o666 (minus umask) rather than mkstemp's 0o600: outputs are read by other users.
    folder.mkdir(parents=True, exist_ok=True)
    temp = folder / f".{uuid.uuid4().hex}{TEMP_SUFFIX}"
    descriptor = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            write(handle)
            handle.flush()
            # On disk before it gets its final name: after a crash the name holds all of it or
            # nothing (a batch that is not `durable` here syncs once for all its files).
            if durable:
                os.fsync(handle.fileno())
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return temp


def _fsync_folders(folders: set[Path]) -> None:
    for folder in sorted(folders):
        _fsync_folder(folder)


def _fsync_folder(folder: Path) -> None:
    # Makes a commit's new name survive a power cut; not every platform can open a folder.
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


@contextmanager
def _local_errors(where: str, action: str) -> Iterator[None]:
    """Turns the OS errors of one local operation into a one-line StoreError."""
    try:
        yield
    except (FileNotFoundError, IsADirectoryError) as exc:
        if action in ("read", "list"):
            raise StoreError(f"{where}: not found") from exc
        raise StoreError(f"{where}: cannot {action}: {exc.strerror or exc}") from exc
    except OSError as exc:
        raise StoreError(f"{where}: cannot {action}: {exc.strerror or exc}") from exc


# --------------------------------------------------------------------------------------------
# S3


class S3Store:
    """A store in an S3 bucket (or any S3-compatible service) under an optional key prefix.

    Endpoint, region and credentials come from the standard AWS environment and config files,
    read by boto3 itself (`AWS_ENDPOINT_URL`, `AWS_PROFILE`, ...).
    """

    def __init__(self, bucket: str, prefix: str = "", *,
                 transfer_config: TransferConfig | None = None) -> None:
        if not bucket:
            raise StoreError("s3:// store URI without a bucket (use s3://bucket/prefix)")
        prefix = prefix.strip("/")
        if prefix:
            try:
                check_key(prefix)
            except InvalidKeyError as exc:
                raise StoreError(f"s3://{bucket}/{prefix}: invalid prefix: {exc}") from None
        self.bucket = bucket
        self.prefix = prefix
        self._root = f"{prefix}/" if prefix else ""
        self._transfer_config = transfer_config or TransferConfig(
            multipart_threshold=MULTIPART_THRESHOLD_BYTES,
            multipart_chunksize=MULTIPART_CHUNK_BYTES,
        )
        self._download_config = TransferConfig(
            multipart_threshold=MULTIPART_THRESHOLD_BYTES,
            multipart_chunksize=MULTIPART_CHUNK_BYTES,
            max_concurrency=FETCH_RANGED_GETS_PER_OBJECT,
        )
        # One session per store: boto3's default session is not safe to create clients from
        # concurrently, and clients (unlike sessions) are safe to share between threads.
        with self._s3_errors(None, "configure the S3 client"):
            session = boto3.session.Session()  # reads AWS_PROFILE: a missing profile fails here
            self._client = session.client("s3", config=S3_CLIENT_CONFIG)
            self._probe_client = session.client("s3", config=S3_PROBE_CONFIG)

    def __repr__(self) -> str:
        return f"S3Store({self.uri!r})"

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    @property
    def endpoint(self) -> str:
        """The endpoint boto3 resolved, with any user:password part of the URL removed."""
        parts = urlsplit(self._client.meta.endpoint_url)
        host = parts.netloc.rpartition("@")[2]
        return urlunsplit((parts.scheme, host, parts.path.rstrip("/"), "", ""))

    def check_reachable(self) -> None:
        """Raises StoreError unless the bucket answers: endpoint up, bucket there, access granted.

        Asks for one key under the store's prefix rather than HeadBucket: IAM policies often grant
        listing only under a prefix (`s3:prefix` conditions), which HeadBucket would call denied,
        and a GET names the failure in its body (NoSuchBucket) where a HEAD answers a bare 404.
        """
        with self._s3_errors(None, "open the store"):
            self._probe_client.list_objects_v2(Bucket=self.bucket, Prefix=self._root, MaxKeys=1)

    def _key(self, key: str) -> str:
        return self._root + check_key(key)

    def list(self, prefix: str = "") -> builtins.list[ObjectInfo]:
        check_prefix(prefix)
        found: builtins.list[ObjectInfo] = []
        paginator = self._client.get_paginator("list_objects_v2")
        with self._s3_errors(prefix or None, "list"):
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self._root + prefix):
                for obj in page.get("Contents", []):
                    key = obj["Key"][len(self._root):]
                    # "Folder" markers made by consoles are not objects a local store could have.
                    if key.endswith("/"):
                        continue
                    found.append(ObjectInfo(key=key, size=obj["Size"], etag=_unquote(obj.get("ETag"))))
        return sorted(found, key=lambda obj: obj.key)

    def exists(self, key: str) -> bool:
        full_key = self._key(key)
        try:
            self._client.head_object(Bucket=self.bucket, Key=full_key)
        except ClientError as exc:
            if _error_code(exc) in ("404", "NoSuchKey", "NotFound"):
                return False
            raise self._error(exc, key, "check") from exc
        except (BotoCoreError, Boto3Error) as exc:
            raise self._error(exc, key, "check") from exc
        return True

    def read_bytes(self, key: str) -> bytes:
        full_key = self._key(key)
        with self._s3_errors(key, "read"):
            response = self._client.get_object(Bucket=self.bucket, Key=full_key)
            return response["Body"].read()

    def fetch(self, keys: Sequence[str], cache_dir: Path) -> dict[str, Path]:
        """Downloads `keys` in parallel into `cache_dir`, each streamed to disk, always fresh.

        Local names are a hash of the store and key (no key can name a path outside cache_dir)
        plus the key's extensions, which DuckDB and Polars use to pick the reader.
        """
        full_keys = {key: self._key(key) for key in keys}
        cache_dir = Path(cache_dir)
        cache_dir.mkdir(parents=True, exist_ok=True)
        paths = {key: cache_dir / self._cache_name(key) for key in full_keys}

        def download(key: str) -> None:
            with self._s3_errors(key, "download"):
                # download_file writes to a temporary name and renames it when complete.
                self._client.download_file(self.bucket, full_keys[key], str(paths[key]),
                                           Config=self._download_config)

        with ThreadPoolExecutor(max_workers=FETCH_WORKERS) as pool:
            futures = [pool.submit(download, key) for key in paths]
            try:
                for future in futures:
                    future.result()
            except BaseException:
                pool.shutdown(cancel_futures=True)
                raise
        return paths

    def _cache_name(self, key: str) -> str:
        return _cache_name(self.uri, key)

    def sha256(self, key: str) -> str:
        full_key = self._key(key)
        digest = hashlib.sha256()
        with self._s3_errors(key, "read"):
            body = self._client.get_object(Bucket=self.bucket, Key=full_key)["Body"]
            for chunk in body.iter_chunks(HASH_CHUNK_BYTES):
                digest.update(chunk)
        return digest.hexdigest()

    def put_bytes(self, key: str, data: bytes) -> None:
        full_key = self._key(key)
        with self._s3_errors(key, "write"):
            self._client.put_object(Bucket=self.bucket, Key=full_key, Body=data)

    def put_file(self, key: str, path: Path) -> None:
        """Uploads a local file; above the multipart threshold in parts, published whole at the end."""
        full_key = self._key(key)
        with self._s3_errors(key, "upload"):
            self._client.upload_file(str(path), self.bucket, full_key, Config=self._transfer_config)

    def put_if_absent(self, key: str, data: bytes) -> bool:
        """Writes `key` only if no object has that key; False if one does (S3 answers 412).

        S3 decides atomically: of concurrent writers exactly one succeeds. A 409 means another
        write or delete of the key was in flight, so the outcome is unknown and we ask again.
        """
        full_key = self._key(key)
        for attempt in range(CONDITIONAL_PUT_ATTEMPTS):
            try:
                self._client.put_object(Bucket=self.bucket, Key=full_key, Body=data, IfNoneMatch="*")
                return True
            except ClientError as exc:
                code = _error_code(exc)
                if code == "PreconditionFailed":
                    return False
                if code != "ConditionalRequestConflict" or attempt == CONDITIONAL_PUT_ATTEMPTS - 1:
                    raise self._error(exc, key, "write") from exc
                time.sleep(CONDITIONAL_PUT_BACKOFF_SECONDS * 2 ** attempt)
            except (BotoCoreError, Boto3Error) as exc:
                raise self._error(exc, key, "write") from exc
        raise AssertionError("unreachable")  # the loop returns or raises

    def copy(self, src_key: str, dst_key: str) -> None:
        """Server-side copy; boto3's managed copy switches to a multipart copy for large objects."""
        source = {"Bucket": self.bucket, "Key": self._key(src_key)}
        full_dst_key = self._key(dst_key)
        with self._s3_errors(src_key, "copy"):
            self._client.copy(source, self.bucket, full_dst_key, Config=self._transfer_config)

    def put_files(self, items: Sequence[tuple[str, Path]]) -> None:
        """Uploads in parallel; each object appears whole when its upload completes. Every key
        is checked before the first upload."""
        for key, _ in items:
            check_key(key)
        _in_threads(lambda item: self.put_file(*item), items)

    def local_folder(self, prefix: str) -> Path | None:
        return None

    def sync(self) -> None:
        pass

    def move_prefix(self, src_prefix: str, dst_prefix: str, keys: Sequence[str],
                    before: Callable[[], None] | None = None) -> None:
        _check_move(src_prefix, dst_prefix, keys)
        self.copy_many([(key, dst_prefix + key[len(src_prefix):]) for key in keys], before)
        self._delete_keys(keys, src_prefix)

    def copy_many(self, pairs: Sequence[tuple[str, str]], before: Callable[[], None] | None = None) -> None:
        """Server-side copies in parallel, every key checked before the first."""
        for pair in pairs:
            for key in pair:
                check_key(key)

        def copy(pair: tuple[str, str]) -> None:
            if before:
                before()
            self.copy(*pair)
        _in_threads(copy, pairs)

    def delete(self, key: str) -> None:
        full_key = self._key(key)
        with self._s3_errors(key, "delete"):
            self._client.delete_object(Bucket=self.bucket, Key=full_key)

    def delete_prefix(self, prefix: str) -> None:
        _check_folder_prefix(prefix)
        self._delete_keys([obj.key for obj in self.list(prefix)], prefix)

    def _delete_keys(self, keys: Sequence[str], prefix: str) -> None:
        keys = [self._key(key) for key in keys]
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = [{"Key": key} for key in keys[start:start + 1000]]
            with self._s3_errors(prefix, "delete"):
                response = self._client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
            if errors := response.get("Errors"):
                first = errors[0]
                raise StoreError(f"s3://{self.bucket}/{first.get('Key')}: cannot delete: "
                                 f"{first.get('Code')} {first.get('Message', '')} "
                                 f"({len(errors)} objects under {prefix} not deleted)")

    @contextmanager
    def _s3_errors(self, key: str | None, action: str) -> Iterator[None]:
        try:
            yield
        except (ClientError, BotoCoreError, Boto3Error) as exc:
            raise self._error(exc, key, action) from exc

    def _error(self, exc: Exception, key: str | None, action: str) -> StoreError:
        """The one place botocore's errors become one-line StoreErrors."""
        where = f"s3://{self.bucket}/{self._root}{key}" if key else self.uri
        # upload_file wraps the ClientError it met in an S3UploadFailedError.
        if isinstance(exc, Boto3Error) and isinstance(exc.__context__, (ClientError, BotoCoreError)):
            exc = exc.__context__
        if isinstance(exc, (BotoConnectionError, HTTPClientError)):
            return StoreError(f"{where}: cannot reach the S3 endpoint {self.endpoint}: {_short_reason(exc)}")
        if isinstance(exc, ProfileNotFound):
            return StoreError(f"{where}: AWS profile {exc.kwargs.get('profile')!r} not found in the AWS config "
                              f"files (check AWS_PROFILE)")
        if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
            return StoreError(f"{where}: no usable AWS credentials (set AWS_PROFILE, or "
                              f"AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)")
        if isinstance(exc, ClientError):
            code = _error_code(exc)
            if code == "NoSuchBucket":
                return StoreError(f"s3://{self.bucket}: bucket not found")
            if code in ("404", "NoSuchKey", "NotFound"):
                return StoreError(f"{where}: not found")
            if code in ("403", "AccessDenied", "AllAccessDisabled"):
                return StoreError(f"{where}: access denied (check the AWS credentials and the bucket policy)")
            if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
                        "InvalidToken", "TokenRefreshRequired"):
                return StoreError(f"{where}: the S3 endpoint {self.endpoint} rejected the AWS credentials ({code})")
            message = exc.response.get("Error", {}).get("Message", "")
            return StoreError(f"{where}: cannot {action}: {code} {message}".rstrip())
        return StoreError(f"{where}: cannot {action}: {exc}")


def _cache_name(uri: str, key: str) -> str:
    """A fetched object's local name: a hash of the store and key (no key can name a path outside
    the cache) plus the key's extensions, which DuckDB and Polars use to pick the reader."""
    digest = hashlib.sha256(f"{uri}\0{key}".encode()).hexdigest()
    suffixes = PurePosixPath(key).suffixes[-2:]
    kept = "".join(s for s in suffixes if _SAFE_SUFFIX.fullmatch(s))
    return f"{digest}{kept}"


def _link_error(where: str) -> StoreError:
    return StoreError(f"{where}: is a symbolic link; billrun neither reads nor writes through links inside a "
                      f"store (put the file or folder itself there)")


def _in_threads(action: Callable, items: Sequence, workers: int = 16) -> None:
    """An IO action on every item with a few threads; the first error is raised once all ended."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for future in [pool.submit(action, item) for item in items]:
            future.result()


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _unquote(etag: str | None) -> str | None:
    return etag.strip('"') if etag else None


def _short_reason(exc: Exception) -> str:
    """'connection refused', 'timed out', ...: the OS-level cause buried in botocore's wrapping."""
    if isinstance(exc, ConnectTimeoutError):
        return "connection timed out"
    if isinstance(exc, ReadTimeoutError):
        return "no answer in time (read timed out)"
    if isinstance(exc, SSLError):
        return "TLS handshake failed"
    seen: set[int] = set()
    pending: builtins.list[BaseException | None] = [exc]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.strerror:
            return current.strerror.lower()
        wrapped = getattr(current, "kwargs", {}).get("error")
        pending.extend([current.__cause__, current.__context__,
                        wrapped if isinstance(wrapped, BaseException) else None])
    return "connection failed"
