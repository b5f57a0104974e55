"""Key files on disk: create one (`pipeline keygen`), add a key to it, and load it as a Keyring."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

from connectors.files import fsync_dir, write_synced
from pipeline.crypto import Key, Keyring, new_key
from pipeline.errors import PipelineError

HEADER = (
    "# pool-pipeline key file: AES-256 keys for --encryption-key / $POOL_PIPELINE_KEY_FILE, oldest first.\n"
    "# The last key encrypts, every key decrypts. Keep it secret: mode 0600, never in a repository.\n"
)


def _check_private(path: Path) -> os.stat_result:
    """Refuse a key file others could read or change (as ssh does for private keys)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise PipelineError(f"key file {path} does not exist: create it with `pipeline keygen {path}`") from None
    except OSError as exc:
        raise PipelineError(f"cannot read key file {path}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise PipelineError(f"key file {path} is not a regular file")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise PipelineError(
            f"key file {path} is accessible by group or others (mode {mode:04o}): refused; run `chmod 600 {path}`"
        )
    return st


def load_keyring(path: str | Path, *, allow_plaintext: bool = False) -> Keyring:
    """The keys of a key file (which must be mode 0600 or stricter)."""
    path = Path(path)
    _check_private(path)
    try:
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise PipelineError(f"cannot read key file {path}: {exc}") from None
    return Keyring.parse(text, str(path), allow_plaintext=allow_plaintext)


def keygen(path: str | Path, *, add: bool = False) -> Key:
    """Write a new key file with one key (refusing to overwrite), or with `add` append a new key to an
    existing one (the new key encrypts from then on; the old ones still decrypt). Mode 0600."""
    path = Path(path)
    key = new_key(time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    if not add:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise PipelineError(
                f"key file {path} exists: refusing to overwrite it (its keys may still be needed to read "
                "the stream and the archive); to rotate, add a key with `pipeline keygen --add`"
            ) from None
        except OSError as exc:
            raise PipelineError(f"cannot create key file {path}: {exc.strerror}") from None
        try:
            os.fchmod(fd, 0o600)  # whatever the umask
            os.write(fd, (HEADER + key.line() + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(path.absolute().parent)
        return key
    ring = load_keyring(path)
    text = path.read_text(encoding="ascii")
    if not text.endswith("\n"):
        text += "\n"
    assert key.key_id not in {k.key_id for k in ring.keys}
    # A new file renamed over the old one: a crash leaves the old keys or the old keys plus the new one.
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.fchmod(fd, 0o600)
    os.close(fd)
    try:
        write_synced(tmp, (text + key.line() + "\n").encode())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.absolute().parent)
    return key
