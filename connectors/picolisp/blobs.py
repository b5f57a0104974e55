"""PicoLisp blob directories: pending-transfer markers and the one walker of blob files (FORMAT.md §4.4)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from connectors.picolisp.format import md5_file
from pipeline.errors import PipelineError
from pipeline.model import safe_blob_path


def blob_markers(
    blob_dir: Path, refused: Callable[[str, str, PipelineError], None] | None = None
) -> list[tuple[str, str]]:
    """Pending blob transfers: ('=A1234.doc', 'A/1/234.doc') for each '=' symlink in blob_dir (§4.4), sorted.

    A marker whose target safe_blob_path refuses raises, or with `refused` is passed to it and left out.
    """
    markers: list[tuple[str, str]] = []
    try:
        names = os.listdir(blob_dir)
    except FileNotFoundError:
        return markers
    for name in sorted(names):
        if not name.startswith("="):
            continue
        try:
            target = os.readlink(os.path.join(blob_dir, name))
        except FileNotFoundError:
            continue  # removed meanwhile (another consumer, or PicoLisp's zap)
        except OSError:
            continue  # not a symlink, so not a marker blob+ made
        try:
            safe_blob_path(target)
        except PipelineError as exc:
            if refused is None:
                shown = os.fsencode(name).decode("utf-8", "backslashreplace")  # printable even if not UTF-8
                raise PipelineError(f"blob marker {shown} in {blob_dir}: {exc.message}") from None
            refused(name, target, exc)
            continue
        markers.append((name, target))
    return markers


def blob_files(blob_dir: str | Path, refused: Callable[[str, PipelineError], None] | None = None) -> list[str]:
    """Relative paths of the regular blob files, sorted: the one walker of blob directories (§4.4).

    Skipped: names starting with '.' (temp and in-flight dirs) or '=' (markers), symlinks, anything
    not a regular file. With `refused`, a path safe_blob_path refuses (a name that is not UTF-8 comes
    back from scandir as surrogate escapes, which no Avro string holds) goes to it instead of the list.
    scandir's file types spare a stat per file: the capture side walks every delete scan interval.
    """
    out: list[str] = []

    def walk(path: str, prefix: str) -> None:
        try:
            entries = list(os.scandir(path))
        except (FileNotFoundError, NotADirectoryError):
            return
        for entry in entries:
            if entry.name.startswith((".", "=")):
                continue
            rel = prefix + entry.name
            if entry.is_dir(follow_symlinks=False):
                walk(entry.path, rel + "/")
            elif entry.is_file(follow_symlinks=False):
                if refused is not None:
                    try:
                        safe_blob_path(rel)
                    except PipelineError as exc:
                        refused(rel, exc)
                        continue
                out.append(rel)

    walk(os.fspath(blob_dir), "")
    out.sort()
    return out


def blob_tree(blob_dir: str | Path) -> dict[str, Path]:
    """Relative path -> file for every blob file blob_files() lists."""
    return {rel: Path(blob_dir, rel) for rel in blob_files(blob_dir)}


def compare_blob_trees(a_dir: str | Path, b_dir: str | Path) -> list[str]:
    """Blobs missing from b, extra in b, or with different content; [] if the trees hold the same files."""
    a, b = blob_tree(Path(a_dir)), blob_tree(Path(b_dir))
    diffs = [f"blob {p}: missing from {b_dir}" for p in sorted(a.keys() - b.keys())]
    diffs += [f"blob {p}: only in {b_dir}, not in {a_dir}" for p in sorted(b.keys() - a.keys())]
    for p in sorted(a.keys() & b.keys()):
        ma, mb = md5_file(a[p]), md5_file(b[p])
        if ma != mb:
            diffs.append(f"blob {p}: md5 {ma} != {mb}, sizes {a[p].stat().st_size} and {b[p].stat().st_size}")
    return diffs
