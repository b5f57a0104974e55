"""A local-directory archive store with S3's semantics (If-None-Match creates, multipart uploads), for unit tests."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from pipeline.archive import Catalog, Segment, Snapshot, database_root
from pipeline.errors import PipelineError

_CHUNK = 1 << 20


class DirStore:
    """One database's archive under `base/<prefix>/<database>/`: an object is a file named by its key.

    Creating an object links a finished temp file into place (`os.link` fails if the name exists), so
    put_new and complete_new have S3's If-None-Match: * semantics, atomically. Unfinished multipart
    uploads live under `base/.uploads/<id>/` (parts plus the key) until completed or aborted.
    `calls` counts every method call by name, for tests that want to know what went where.
    """

    def __init__(self, base: Path, database: str, prefix: str = "archive") -> None:
        self.base = Path(base)
        self.database = database
        self.prefix = prefix
        self.base.mkdir(parents=True, exist_ok=True)
        self.calls: dict[str, int] = {}

    def _count(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1

    @property
    def root(self) -> str:
        return database_root(self.prefix, self.database)

    @property
    def url(self) -> str:
        return f"dir://{self.base}/{self.root}/"

    def path(self, key: str) -> Path:
        if key.startswith("/") or ".." in key.split("/") or key.startswith(".uploads"):
            raise ValueError(f"bad key {key!r}")
        return self.base / key

    # --- reading ----------------------------------------------------------------------------

    def list(self, under: str) -> Iterator[tuple[str, int]]:
        """(key, size) of every object whose key starts with `under`, in key order (as S3 lists)."""
        self._count("list")
        found = []
        for root, dirs, names in os.walk(self.base):
            dirs[:] = [d for d in dirs if d != ".uploads"]
            for name in names:
                if name.startswith(".tmp-"):
                    continue
                key = os.path.relpath(os.path.join(root, name), self.base)
                if key.startswith(under):
                    found.append((key, os.path.getsize(os.path.join(root, name))))
        yield from sorted(found)

    def catalog(self) -> Catalog:
        self._count("catalog")
        segments = [
            s
            for key, size in self.list(f"{self.root}/segments/")
            if (s := Segment.parse(self.root, key, size)) is not None
        ]
        snapshots = [
            s for key, _ in self.list(f"{self.root}/snapshots/") if (s := Snapshot.parse(self.root, key)) is not None
        ]
        return Catalog(self.database, segments, snapshots)

    def get(self, key: str) -> bytes:
        self._count("get")
        try:
            return self.path(key).read_bytes()
        except FileNotFoundError:
            raise PipelineError(f"cannot read {key}: no such object", database=self.database) from None

    def download(self, key: str, path: Path, on_bytes: Callable[[int], None] | None = None) -> None:
        self._count("download")
        try:
            shutil.copyfile(self.path(key), path)
        except FileNotFoundError:
            raise PipelineError(f"cannot download {key}: no such object", database=self.database) from None
        if on_bytes is not None:
            on_bytes(os.path.getsize(path))

    # --- writing ----------------------------------------------------------------------------

    def _create(self, key: str, write: Callable[[IO[bytes]], None]) -> bool:
        """Write a temp file and link it in unless `key` exists; False if it existed."""
        dest = self.path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".tmp-{uuid.uuid4().hex}")
        try:
            with open(tmp, "wb") as f:
                write(f)
            try:
                os.link(tmp, dest)
            except FileExistsError:
                return False
            return True
        finally:
            tmp.unlink(missing_ok=True)

    def _check_same(self, key: str, ours: IO[bytes] | bytes) -> None:
        mine = hashlib.md5()
        if isinstance(ours, bytes):
            mine.update(ours)
        else:
            ours.seek(0)
            while chunk := ours.read(_CHUNK):
                mine.update(chunk)
        if mine.digest() != hashlib.md5(self.path(key).read_bytes()).digest():
            raise PipelineError(
                f"{key} already exists with different content: is another archiver writing to {self.url}?",
                database=self.database,
            )

    def put_new(self, key: str, body: IO[bytes] | bytes) -> None:
        """Create `key` unless it exists; an existing object must hold the same bytes."""
        self._count("put_new")

        def write(f: IO[bytes]) -> None:
            if isinstance(body, bytes):
                f.write(body)
            else:
                body.seek(0)
                shutil.copyfileobj(body, f, _CHUNK)

        if not self._create(key, write):
            self._check_same(key, body)

    def upload_file(self, key: str, path: Path) -> None:
        """Unconditional, as boto3's upload_file (snapshot files are deterministic at their txn)."""
        self._count("upload_file")
        dest = self.path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".tmp-{uuid.uuid4().hex}")
        shutil.copyfile(path, tmp)
        os.replace(tmp, dest)

    def delete(self, keys: list[str]) -> None:
        self._count("delete")
        for key in keys:
            self.path(key).unlink(missing_ok=True)

    # --- multipart --------------------------------------------------------------------------

    def _upload_dir(self, upload_id: str) -> Path:
        return self.base / ".uploads" / upload_id

    def start_upload(self, key: str) -> str:
        self._count("start_upload")
        self.path(key)  # refuse a bad key now
        upload_id = uuid.uuid4().hex
        d = self._upload_dir(upload_id)
        d.mkdir(parents=True)
        (d / "key").write_text(key)
        return upload_id

    def _upload_of(self, key: str, upload_id: str) -> Path:
        d = self._upload_dir(upload_id)
        if not (d / "key").exists() or (d / "key").read_text() != key:
            raise PipelineError(f"no upload {upload_id} of {key} (NoSuchUpload)", database=self.database)
        return d

    def upload_part(self, key: str, upload_id: str, number: int, data: bytes) -> str:
        self._count("upload_part")
        d = self._upload_of(key, upload_id)
        (d / f"part-{number:05d}").write_bytes(data)
        return json.dumps(hashlib.md5(data).hexdigest())  # an ETag, quoted as S3 quotes it

    def complete_new(self, key: str, upload_id: str, etags: list[str], ours: IO[bytes]) -> None:
        """Assemble the parts unless `key` exists (If-None-Match: *), then the put_new rule."""
        self._count("complete_new")
        d = self._upload_of(key, upload_id)
        parts = [d / f"part-{n:05d}" for n in range(1, len(etags) + 1)]
        for part, etag in zip(parts, etags):
            if not part.exists() or json.dumps(hashlib.md5(part.read_bytes()).hexdigest()) != etag:
                raise PipelineError(
                    f"part {part.name} of {key} does not match its ETag (InvalidPart)", database=self.database
                )

        def write(f: IO[bytes]) -> None:
            for part in parts:
                f.write(part.read_bytes())

        created = self._create(key, write)
        shutil.rmtree(d)
        if not created:
            self._check_same(key, ours)

    def abort_upload(self, key: str, upload_id: str) -> None:
        self._count("abort_upload")
        shutil.rmtree(self._upload_dir(upload_id), ignore_errors=True)

    def unfinished_uploads(self) -> list[tuple[str, str]]:
        self._count("unfinished_uploads")
        uploads = self.base / ".uploads"
        if not uploads.exists():
            return []
        out = []
        for d in sorted(uploads.iterdir()):
            key = (d / "key").read_text()
            if key.startswith(f"{self.root}/"):
                out.append((key, d.name))
        return out

    # --- for assertions ---------------------------------------------------------------------

    def objects(self, under: str = "") -> dict[str, bytes]:
        return {key: self.path(key).read_bytes() for key, _ in self.list(under or f"{self.root}/")}
