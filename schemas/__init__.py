"""The Avro schemas of the change stream: every version ever released, oldest first per record."""

from __future__ import annotations

import json
import re
from pathlib import Path

SCHEMA_DIR = Path(__file__).resolve().parent
_VERSIONED = re.compile(r"^(?P<name>[a-z_]+)\.v(?P<version>\d+)\.avsc$")


def load_schemas(directory: Path = SCHEMA_DIR) -> list[dict]:
    """All schema versions, sorted so that the last one of each record name is the current one.

    Files are `<name>.v<N>.avsc`; a change is a new file with the next N, never an edit.
    """
    found: list[tuple[str, int, dict]] = []
    for path in directory.glob("*.avsc"):
        m = _VERSIONED.match(path.name)
        if not m:
            raise ValueError(f"{path}: schema files must be named <name>.v<N>.avsc")
        found.append((m["name"], int(m["version"]), json.loads(path.read_text())))
    found.sort(key=lambda t: (t[0], t[1]))
    return [schema for _, _, schema in found]
