"""One database's archive in S3 through boto3: keys, conditional writes, listing, and the retry of S3 calls."""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import io
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

from connectors.faults import Backoff, classify, retry
from pipeline.archive import (
    Catalog,
    Segment,
    Snapshot,
    database_root,
)
from pipeline.errors import PipelineError

PROGRESS = Callable[[dict], None]


_CHUNK = 8 << 20


def parse_bucket_url(url: str) -> tuple[str, str]:
    """`s3://bucket/prefix` -> (bucket, prefix)."""
    if not url.startswith("s3://") or len(url) <= 5:
        raise PipelineError(f"--bucket must look like s3://bucket[/prefix], got {url!r}")
    bucket, _, prefix = url[5:].partition("/")
    return bucket, prefix.strip("/")


SSE_MODES = ("AES256", "aws:kms")


def sse_args(mode: str | None, kms_key_id: str | None = None) -> dict[str, str]:
    """The request parameters of server-side encryption: SSE-S3 (AES256) or SSE-KMS (aws:kms, with an
    optional key id; without one S3 uses the account's default key). {} for none."""
    if mode is None:
        if kms_key_id:
            raise PipelineError("--sse-kms-key-id needs --sse aws:kms")
        return {}
    if mode not in SSE_MODES:
        raise PipelineError(f"--sse must be one of {', '.join(SSE_MODES)}, got {mode!r}")
    if kms_key_id and mode != "aws:kms":
        raise PipelineError("--sse-kms-key-id needs --sse aws:kms")
    return {"ServerSideEncryption": mode, **({"SSEKMSKeyId": kms_key_id} if kms_key_id else {})}


def s3_client(endpoint_url: str | None = None) -> Any:
    """A boto3 client from the standard configuration (AWS_ENDPOINT_URL_S3, AWS_ACCESS_KEY_ID, profiles...).

    Path-style addressing works with every S3-compatible server; our own retry loop handles outages,
    so boto3 only retries briefly. An https endpoint signed by a private CA is trusted through boto3's
    AWS_CA_BUNDLE (a PEM file), which must exist.
    """
    import os

    import boto3
    from botocore.config import Config

    bundle = os.environ.get("AWS_CA_BUNDLE", "").strip()
    if bundle and not Path(bundle).expanduser().is_file():
        raise PipelineError(
            f"AWS_CA_BUNDLE={bundle}: no such file (give the PEM file of the CA that signed S3's certificate)"
        )

    return boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        config=Config(
            s3={"addressing_style": "path"},
            retries={"max_attempts": 3, "mode": "standard"},
            connect_timeout=5,
            read_timeout=60,
        ),
    )


def _s3_error(what: str, exc: Exception, database: str | None) -> PipelineError:
    """A boto3 failure as one line; whether it is worth retrying is decided by connectors.faults."""
    retriable, fix = classify(exc)
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        code = response.get("Error", {}).get("Code", "") or response.get("ResponseMetadata", {}).get(
            "HTTPStatusCode", ""
        )
        text = f"S3 said {code}: {response.get('Error', {}).get('Message', exc)}"
    elif retriable:
        text = f"S3 unreachable: {exc}"  # connection refused, timeouts, a server that went away mid-response
    else:
        text = str(exc)
    return PipelineError(f"{what}: {text}" + (f" ({fix})" if fix else ""), database=database, retriable=retriable)


def _status_of(exc: Exception) -> int:
    response = getattr(exc, "response", None) or {}
    return int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


class Store(Protocol):
    """What the archiver, restore and retention use of one database's archive (ArchiveStore is the S3 one;
    tests/dir_store.py a local directory)."""

    database: str

    @property
    def root(self) -> str: ...
    @property
    def url(self) -> str: ...
    def list(self, under: str) -> Iterator[tuple[str, int]]: ...  # shadows `list` below: builtins.list
    def catalog(self) -> Catalog: ...
    def put_new(self, key: str, body: IO[bytes] | bytes) -> None: ...
    def start_upload(self, key: str) -> str: ...
    def upload_part(self, key: str, upload_id: str, number: int, data: bytes) -> str: ...
    def complete_new(self, key: str, upload_id: str, etags: builtins.list[str], ours: IO[bytes]) -> None: ...
    def abort_upload(self, key: str, upload_id: str) -> None: ...
    def unfinished_uploads(self) -> builtins.list[tuple[str, str]]: ...
    def upload_file(self, key: str, path: Path) -> None: ...
    def get(self, key: str) -> bytes: ...
    def download(self, key: str, path: Path, on_bytes: Callable[[int], None] | None = None) -> None: ...
    def delete(self, keys: builtins.list[str]) -> None: ...


@dataclass
class ArchiveStore:
    """One database's archive under s3://bucket/prefix/<database>/."""

    client: Any
    bucket: str
    prefix: str
    database: str
    # Server-side encryption of every object written (sse_args): put_object, multipart uploads, snapshot files.
    sse: dict[str, str] = field(default_factory=dict)

    @property
    def root(self) -> str:
        return database_root(self.prefix, self.database)

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.root}/"

    def call(self, what: str, fn: Callable[..., Any], **kwargs: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(**kwargs)
        except (BotoCoreError, ClientError) as exc:
            raise _s3_error(what, exc, self.database) from exc

    def ensure_bucket(self) -> None:
        """Create the bucket if it is missing (and we may)."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
            return
        except ClientError as exc:
            if _status_of(exc) != 404:
                raise _s3_error(f"cannot use bucket {self.bucket}", exc, self.database) from exc
        except BotoCoreError as exc:
            raise _s3_error(f"cannot use bucket {self.bucket}", exc, self.database) from exc
        self.call(f"cannot create bucket {self.bucket}", self.client.create_bucket, Bucket=self.bucket)

    def list(self, under: str) -> Iterator[tuple[str, int]]:
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=under):
                for obj in page.get("Contents", []):
                    yield obj["Key"], obj["Size"]
        except Exception as exc:
            from botocore.exceptions import BotoCoreError, ClientError

            if isinstance(exc, (BotoCoreError, ClientError)):
                raise _s3_error(f"cannot list {self.url}", exc, self.database) from exc
            raise

    def catalog(self) -> Catalog:
        segments = [
            s
            for key, size in self.list(f"{self.root}/segments/")
            if (s := Segment.parse(self.root, key, size)) is not None
        ]
        snapshots = [
            snap
            for key, _ in self.list(f"{self.root}/snapshots/")
            if (snap := Snapshot.parse(self.root, key)) is not None
        ]
        return Catalog(self.database, segments, snapshots)

    def put_new(self, key: str, body: IO[bytes] | bytes) -> None:
        """Create `key` unless it exists (If-None-Match: *). An existing identical object is fine: a
        restarted archiver rewrote the same bytes; a different one means two writers, and stops us."""
        if not isinstance(body, bytes):
            body.seek(0)
        if self._created(
            key, lambda: self.client.put_object(Bucket=self.bucket, Key=key, Body=body, IfNoneMatch="*", **self.sse)
        ):
            return
        self._check_same(key, io.BytesIO(body) if isinstance(body, bytes) else body)

    def _created(self, key: str, create: Callable[[], Any]) -> bool:
        """Run a conditional create; False if the key already existed."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            create()
            return True
        except (BotoCoreError, ClientError) as exc:
            if _status_of(exc) not in (409, 412):
                raise _s3_error(f"cannot write {key}", exc, self.database) from exc
            return False

    def _check_same(self, key: str, ours: IO[bytes]) -> None:
        """An object found where we were creating one must hold our bytes (compared streaming)."""
        mine, theirs = hashlib.md5(), hashlib.md5()
        ours.seek(0)
        while chunk := ours.read(_CHUNK):
            mine.update(chunk)
        body = self.call(f"cannot read {key}", self.client.get_object, Bucket=self.bucket, Key=key)["Body"]
        for chunk in body.iter_chunks(_CHUNK):
            theirs.update(chunk)
        if mine.digest() != theirs.digest():
            raise PipelineError(
                f"{key} already exists with different content: is another archiver writing to {self.url}?",
                database=self.database,
            )

    # Multipart: a big segment is uploaded part by part while it is still being written.

    def start_upload(self, key: str) -> str:
        return self.call(
            f"cannot start uploading {key}",
            self.client.create_multipart_upload,
            Bucket=self.bucket,
            Key=key,
            **self.sse,
        )["UploadId"]

    def upload_part(self, key: str, upload_id: str, number: int, data: bytes) -> str:
        return self.call(
            f"cannot upload part {number} of {key}",
            self.client.upload_part,
            Bucket=self.bucket,
            Key=key,
            UploadId=upload_id,
            PartNumber=number,
            Body=data,
        )["ETag"]

    def complete_new(self, key: str, upload_id: str, etags: builtins.list[str], ours: IO[bytes]) -> None:
        """Complete a multipart upload unless `key` exists: the same rule as put_new."""
        parts = {"Parts": [{"ETag": etag, "PartNumber": i} for i, etag in enumerate(etags, 1)]}
        if self._created(
            key,
            lambda: self.client.complete_multipart_upload(
                Bucket=self.bucket, Key=key, UploadId=upload_id, MultipartUpload=parts, IfNoneMatch="*"
            ),
        ):
            return
        self.abort_upload(key, upload_id)
        self._check_same(key, ours)

    def abort_upload(self, key: str, upload_id: str) -> None:
        with contextlib.suppress(Exception):  # best effort: `archive` aborts leftovers when it starts
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)

    def unfinished_uploads(self) -> builtins.list[tuple[str, str]]:
        """(key, upload id) of the multipart uploads under this archive that were never completed."""
        response = self.call(
            f"cannot list the unfinished uploads of {self.url}",
            self.client.list_multipart_uploads,
            Bucket=self.bucket,
            Prefix=f"{self.root}/",
        )
        return [(u["Key"], u["UploadId"]) for u in response.get("Uploads", [])]

    def upload_file(self, key: str, path: Path) -> None:
        # Snapshot files are deterministic at their txn, so rewriting one is harmless; multipart
        # uploads in parallel parts are what make big pool files fast.
        self.call(
            f"cannot upload {key}",
            self.client.upload_file,
            Filename=str(path),
            Bucket=self.bucket,
            Key=key,
            ExtraArgs=dict(self.sse) or None,
        )

    def get(self, key: str) -> bytes:
        response = self.call(f"cannot read {key}", self.client.get_object, Bucket=self.bucket, Key=key)
        return response["Body"].read()

    def download(self, key: str, path: Path, on_bytes: Callable[[int], None] | None = None) -> None:
        self.call(
            f"cannot download {key}",
            self.client.download_file,
            Bucket=self.bucket,
            Key=key,
            Filename=str(path),
            Callback=on_bytes,
        )

    def delete(self, keys: builtins.list[str]) -> None:
        for i in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[i : i + 1000]]
            self.call(
                "cannot delete old archive objects",
                self.client.delete_objects,
                Bucket=self.bucket,
                Delete={"Objects": batch, "Quiet": True},
            )


def retrying(
    what: str,
    fn: Callable[[], Any],
    log: Callable[[str], None],
    *,
    max_backoff: float = 10.0,
    stop: threading.Event | None = None,
) -> Any:
    """Run `fn` until it succeeds, waiting with the one retry policy after retriable errors
    (an S3 outage only delays the archive: nothing is acknowledged before it is stored).
    Setting `stop` ends the waiting with the last error."""
    return retry(what, fn, log, backoff=Backoff(cap=max_backoff), stop=stop)


def open_store(
    bucket_url: str, database: str, endpoint_url: str | None = None, sse: dict[str, str] | None = None
) -> ArchiveStore:
    bucket, prefix = parse_bucket_url(bucket_url)
    return ArchiveStore(s3_client(endpoint_url), bucket, prefix, database, dict(sse or {}))
