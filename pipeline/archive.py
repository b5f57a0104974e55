"""The S3 archive's rules without I/O: object keys, segment files, rotation, restore plans, retention."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO

import fastavro
import fastavro.write

from pipeline.codec import Codec, Record, StreamRecord, _unsigned
from pipeline.errors import PipelineError
from pipeline.framing import BEGIN, COMMIT, SNAPSHOT, TXN_KEY, TxnFrame, TxnFramer
from pipeline.model import FileLayout, Position, Transaction
from pipeline.replicate import check_continues

# A segment is an Avro Object Container File of the topic's records exactly as Kafka held them:
# the values stay single-object encoded (their schema fingerprints inside), so a restore goes
# through the same framing checks as a replica, and old segments stay readable as schemas evolve.
# The record schemas themselves ride along in the file's metadata.
SEGMENT_SCHEMA = {
    "type": "record",
    "name": "ArchivedRecord",
    "namespace": "pool.pipeline.archive",
    "doc": "One record of a database topic as Kafka stored it.",
    "fields": [
        {"name": "offset", "type": "long", "doc": "Kafka offset in partition 0 of pool.<database>."},
        {"name": "timestamp_ms", "type": "long", "doc": "Kafka record timestamp."},
        {"name": "key", "type": ["null", "bytes"]},
        {"name": "value", "type": "bytes", "doc": "Avro single-object encoded change record."},
    ],
}
_PARSED_SEGMENT_SCHEMA = fastavro.parse_schema(SEGMENT_SCHEMA)
SEGMENT_CODEC = "zstandard"  # several times faster than deflate at a similar ratio; deterministic at a fixed level
SEGMENT_LEVEL = 1

_SEGMENT = re.compile(
    r"^p(?P<partition>\d+)/(?P<first_offset>\d{20})(?:-(?P<last_offset>\d{20}))?"
    r"_txn(?P<first_txn>\d{12})-(?P<last_txn>\d{12})_ms(?P<first_ms>\d{13})-(?P<last_ms>\d{13})"
    r"(?:_L(?P<level>\d+))?(?P<snap>_snap)?\.avro$"
)
_SNAPSHOT = re.compile(r"^(?P<txn>\d{12})_ms(?P<ms>\d{13})/(?P<rest>.+)$")


def database_root(prefix: str, database: str) -> str:
    """Where a database's archive lives under the bucket prefix (no leading or trailing slash)."""
    return "/".join(p for p in (prefix.strip("/"), database) if p)


@dataclass(frozen=True, order=True)
class Segment:
    """One archived object of whole transactions; everything a listing needs is in its key."""

    first_txn: int
    last_txn: int
    first_offset: int
    first_ms: int
    last_ms: int
    partition: int = 0
    starts_with_snapshot: bool = False  # its first txn is a full image: a restore may start there
    size: int = 0
    # 0: written by the archiver; n > 0: compacted from lower levels over a window of CompactionPolicy.
    level: int = field(default=0, compare=False)
    # Keys written by earlier builds also carried the last offset. It was dropped so that a big segment's
    # key is known when it opens and its upload can run while it is written; old keys still parse.
    legacy_last_offset: int | None = field(default=None, compare=False)

    def key(self, root: str) -> str:
        legacy = "" if self.legacy_last_offset is None else f"-{self.legacy_last_offset:020d}"
        return (
            f"{root}/segments/p{self.partition}/{self.first_offset:020d}{legacy}"
            f"_txn{self.first_txn:012d}-{self.last_txn:012d}_ms{self.first_ms:013d}-{self.last_ms:013d}"
            f"{f'_L{self.level}' if self.level else ''}{'_snap' if self.starts_with_snapshot else ''}.avro"
        )

    @classmethod
    def parse(cls, root: str, key: str, size: int = 0) -> Segment | None:
        base = f"{root}/segments/"
        m = _SEGMENT.match(key[len(base) :]) if key.startswith(base) else None
        if m is None:
            return None
        return cls(
            int(m["first_txn"]),
            int(m["last_txn"]),
            int(m["first_offset"]),
            int(m["first_ms"]),
            int(m["last_ms"]),
            int(m["partition"]),
            bool(m["snap"]),
            size,
            int(m["level"] or 0),
            int(m["last_offset"]) if m["last_offset"] else None,
        )

    @property
    def txns(self) -> int:
        return self.last_txn - self.first_txn + 1


@dataclass(frozen=True, order=True)
class Snapshot:
    """A base snapshot: the whole pool (files and blobs) at `txn`, complete once its manifest exists."""

    txn: int
    time_ms: int

    def prefix(self, root: str) -> str:
        return f"{root}/snapshots/{self.txn:012d}_ms{self.time_ms:013d}/"

    def manifest_key(self, root: str) -> str:
        return self.prefix(root) + "manifest.json"

    @classmethod
    def parse(cls, root: str, key: str, *, manifest: bool = True) -> Snapshot | None:
        """The snapshot a manifest key names (or, with manifest=False, any of its files' keys)."""
        base = f"{root}/snapshots/"
        m = _SNAPSHOT.match(key[len(base) :]) if key.startswith(base) else None
        if m is None or (manifest and m["rest"] != "manifest.json"):
            return None
        return cls(int(m["txn"]), int(m["ms"]))


@dataclass(frozen=True)
class Manifest:
    """What a base snapshot holds, and the replica position it restores to."""

    database: str
    txn_id: int
    checksum: int
    next_offset: int
    source_time_ms: int
    files: list[FileLayout]
    blobs: dict[str, int]  # path -> size

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "format": 1,
                "database": self.database,
                "txn_id": self.txn_id,
                "checksum": self.checksum,
                "next_offset": self.next_offset,
                "source_time_ms": self.source_time_ms,
                "files": [f.__dict__ for f in self.files],
                "blobs": self.blobs,
            },
            indent=1,
            sort_keys=True,
        ).encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> Manifest:
        try:
            m = json.loads(data)
            return cls(
                m["database"],
                m["txn_id"],
                m["checksum"],
                m["next_offset"],
                m["source_time_ms"],
                [FileLayout(**f) for f in m["files"]],
                dict(m["blobs"]),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise PipelineError(f"snapshot manifest {where} is unreadable: {exc}") from exc

    @property
    def position(self) -> Position:
        return Position(self.txn_id, self.checksum)


# --- rotation -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rotation:
    """When a segment closes. Only record contents decide (never the wall clock), so a restarted
    archiver cuts the same segments with the same keys and bytes."""

    max_txns: int = 10_000
    max_bytes: int = 64 * 1024 * 1024
    max_span_ms: int = 3_600_000  # record (source) time between a segment's first and last txn

    def close_before(self, open_txns: int, first_ms: int, begin_ms: int, snapshot: bool) -> bool:
        """Close the open segment before a txn starting at `begin_ms`? A snapshot txn always starts
        a segment, so a restore can begin at it without a base snapshot."""
        return open_txns > 0 and (snapshot or begin_ms - first_ms >= self.max_span_ms)

    def close_after(self, open_txns: int, open_bytes: int) -> bool:
        return open_txns >= self.max_txns or open_bytes >= self.max_bytes


@dataclass(frozen=True)
class SnapshotPolicy:
    """A base snapshot every `every_txns` txns or `every_bytes` archived bytes (0 turns a rule off)."""

    every_txns: int = 100_000
    every_bytes: int = 1024 * 1024 * 1024

    def due(self, txns_since: int, bytes_since: int) -> bool:
        return bool(
            (self.every_txns and txns_since >= self.every_txns)
            or (self.every_bytes and bytes_since >= self.every_bytes)
        )


# --- framing --------------------------------------------------------------------------------


class Framer:
    """Checks a committed record stream transaction by transaction, decoding only begins, markers and commits.

    Ensures a segment holds whole, contiguous transactions of one database (pipeline.framing); the
    body checks of every change happen at restore, where the records are fully decoded anyway.
    """

    def __init__(self, codec: Codec, database: str, position: Position | None) -> None:
        self.codec = codec
        self.database = database
        self.position = position  # None: no archive yet, the first txn may be anything
        self.framer = TxnFramer(database)

    @property
    def open(self) -> TxnFrame | None:
        return self.framer.open

    def begin(self, rec: Record) -> TxnFrame | None:
        """The frame `rec` opens if it is a TxnBegin, else None (the caller then calls `record`)."""
        if rec.key != TXN_KEY:
            return None
        name, value = self.codec.decode(rec.value, topic=rec.topic, offset=rec.offset, database=self.database)
        if name != BEGIN:
            return None
        frame = self.framer.begin(value, rec)
        if self.position is not None:
            check_continues(
                self.position,
                Transaction(
                    self.database,
                    frame.txn_id,
                    _unsigned(frame.checksum_before),
                    frame.time_ms,
                    snapshot=frame.snapshot,
                    offset=rec.offset,
                ),
            )
        return frame

    def record(self, rec: Record) -> Transaction | None:
        """Check a record after its begin; returns the finished transaction's header at its commit."""
        name, database, txn_id = self.codec.peek(rec.value, topic=rec.topic, offset=rec.offset, database=self.database)
        self.framer.record(name, database, txn_id, rec)
        if name != COMMIT and name != SNAPSHOT:
            return None
        _, value = self.codec.decode(rec.value, topic=rec.topic, offset=rec.offset, database=self.database)
        if name == SNAPSHOT:
            self.framer.marker(value["phase"], rec)
            return None
        txn = self.framer.commit(value, rec)
        done = Transaction(
            self.database,
            txn.txn_id,
            _unsigned(value["checksum_before"]),
            txn.time_ms,
            snapshot=txn.snapshot,
            checksum_after=_unsigned(value["checksum_after"]),
            files=[FileLayout(**f) for f in value["files"]],
            offset=txn.offset,
            end_offset=rec.offset,
        )
        self.position = done.after
        return done


# --- segment files --------------------------------------------------------------------------


def _sync_marker(database: str, partition: int, first_offset: int) -> bytes:
    # fastavro picks a random sync marker; derive it instead so a rewrite is byte-identical.
    return hashlib.blake2b(f"{database}/{partition}/{first_offset}".encode(), digest_size=16).digest()


class SegmentWriter:
    """Streams records into an Avro container file, so a multi-GiB snapshot txn never sits in memory."""

    def __init__(self, fo: IO[bytes], codec: Codec, database: str, partition: int, first_offset: int) -> None:
        metadata = {
            "pool.pipeline.database": database,
            "pool.pipeline.partition": str(partition),
            "pool.pipeline.first_offset": str(first_offset),
            "pool.pipeline.record_schemas": json.dumps(codec.schemas, sort_keys=True),
        }
        self._writer = fastavro.write.Writer(
            fo,
            _PARSED_SEGMENT_SCHEMA,
            codec=SEGMENT_CODEC,
            compression_level=SEGMENT_LEVEL,
            sync_marker=_sync_marker(database, partition, first_offset),
            metadata=metadata,
        )
        self.bytes = 0  # key + value bytes written: the rotation measure, independent of compression

    def write(self, rec: Record) -> None:
        self._writer.write({"offset": rec.offset, "timestamp_ms": rec.timestamp, "key": rec.key, "value": rec.value})
        self.bytes += len(rec.value or b"") + len(rec.key or b"")

    def close(self) -> None:
        self._writer.flush()


def read_segment(fo: IO[bytes], database: str, topic: str, where: str) -> Iterator[Record]:
    """The records of one segment file; errors name the object (`where`)."""
    try:
        reader = fastavro.reader(fo)
        owner = reader.metadata.get("pool.pipeline.database")
        if owner != database:
            raise PipelineError(
                f"archive object {where} belongs to database {owner!r}, not {database!r}", database=database
            )
        partition = int(reader.metadata.get("pool.pipeline.partition", "0"))
        for r in reader:
            assert isinstance(r, dict), "a segment's records are Avro records"
            yield StreamRecord(topic, partition, r["offset"], r["key"], r["value"], r["timestamp_ms"])
    except PipelineError:
        raise
    except Exception as exc:  # fastavro raises many types on a damaged file
        raise PipelineError(f"archive object {where} is not a readable Avro segment: {exc}", database=database) from exc


# --- catalog, restore plans, retention -----------------------------------------------------


@dataclass(frozen=True)
class RestorePlan:
    """How to rebuild the pool at a point: a base (snapshot or a segment starting with a full
    image), then the segments to apply, stopping at `target_txn` or before the first txn after `time_ms`."""

    base: Snapshot | None
    segments: list[Segment]
    target_txn: int | None
    time_ms: int | None

    @property
    def start_txn(self) -> int:
        return self.base.txn if self.base else self.segments[0].first_txn


def _fmt_txns(a: int, b: int) -> str:
    return f"txn {a}" if a == b else f"txns {a}-{b}"


@dataclass
class Catalog:
    """A database's archive as listed: segments by txn, base snapshots by txn."""

    database: str
    segments: list[Segment] = field(default_factory=list)
    snapshots: list[Snapshot] = field(default_factory=list)
    # Segments whose txns another segment holds too: the sources of a compaction that stopped before
    # deleting them. Nothing reads them; compaction and retention delete them.
    superseded: list[Segment] = field(default_factory=list)

    def __post_init__(self) -> None:
        kept: list[Segment] = []
        for seg in sorted(self.segments, key=lambda s: (s.partition, s.first_txn, -s.last_txn, -s.level)):
            if kept and kept[-1].partition == seg.partition and seg.last_txn <= kept[-1].last_txn:
                self.superseded.append(seg)  # sorted by first txn: kept[-1] starts at or before it
            else:
                kept.append(seg)
        self.segments = sorted(kept)
        self.snapshots.sort()

    @property
    def last(self) -> Segment | None:
        return self.segments[-1] if self.segments else None

    def runs(self) -> list[list[Segment]]:
        """The segments in runs of contiguous txn ids (more than one run means a gap)."""
        runs: list[list[Segment]] = []
        for seg in self.segments:
            if runs and seg.first_txn == runs[-1][-1].last_txn + 1:
                runs[-1].append(seg)
            elif runs and seg.first_txn <= runs[-1][-1].last_txn:
                raise PipelineError(
                    f"archive of {self.database!r} holds overlapping segments "
                    f"({_fmt_txns(runs[-1][-1].first_txn, runs[-1][-1].last_txn)} and "
                    f"{_fmt_txns(seg.first_txn, seg.last_txn)}): two archivers wrote to the same prefix?",
                    database=self.database,
                )
            else:
                runs.append([seg])
        return runs

    def restore_points(self) -> list[tuple[int, int]]:
        """The txn ranges a restore can reach: from each usable base to the end of its contiguous run."""
        out: list[tuple[int, int]] = []
        in_runs: set[int] = set()  # snapshot txns some run of segments continues from
        for run in self.runs():
            bases = [s.txn for s in self.snapshots if run[0].first_txn - 1 <= s.txn <= run[-1].last_txn]
            in_runs.update(bases)
            starts = bases + [seg.first_txn for seg in run if seg.starts_with_snapshot]
            if starts:
                out.append((min(starts), run[-1].last_txn))
        # A snapshot no segment continues from (retention removed everything before the newest, which
        # was taken at the last txn) still restores its own txn.
        out += [(s.txn, s.txn) for s in self.snapshots if s.txn not in in_runs]
        return sorted(out)

    def describe_points(self) -> str:
        points = self.restore_points()
        if not points:
            return "nothing restorable is archived yet"
        return "restorable: " + ", ".join(_fmt_txns(a, b) for a, b in points)

    def plan(self, txn: int | None = None, time_ms: int | None = None) -> RestorePlan:
        """The plan for `txn`, or for the last txn at or before `time_ms`, or for the newest txn.

        The base is the newest full image at or before the target that the segments continue
        from: a base snapshot, or a segment whose first txn is a snapshot (the stream's first).
        """
        if not self.segments and not self.snapshots:
            raise PipelineError(f"nothing is archived for database {self.database!r}", database=self.database)
        runs = self.runs()
        if txn is None and time_ms is None:
            txn = max(runs[-1][-1].last_txn if runs else 0, self.snapshots[-1].txn if self.snapshots else 0)

        def reached(first_txn: int, first_ms: int) -> bool:
            return first_txn <= txn if txn is not None else first_ms <= time_ms  # type: ignore[operator]

        plans: list[RestorePlan] = []
        for i, run in enumerate(runs):
            if not reached(run[0].first_txn, run[0].first_ms):
                continue
            if txn is not None and txn > run[-1].last_txn:
                continue
            if time_ms is not None and i + 1 < len(runs) and run[-1].last_ms <= time_ms:
                raise PipelineError(
                    f"time {time_ms} ms of database {self.database!r} falls in a gap of the archive after "
                    f"txn {run[-1].last_txn}; {self.describe_points()}",
                    database=self.database,
                )
            segs = [s for s in run if reached(s.first_txn, s.first_ms)]
            snaps = [
                s
                for s in self.snapshots
                if reached(s.txn, s.time_ms) and run[0].first_txn - 1 <= s.txn <= run[-1].last_txn
            ]
            seg_start = max((s.first_txn for s in segs if s.starts_with_snapshot), default=None)
            if snaps and (seg_start is None or snaps[-1].txn >= seg_start):
                plans.append(RestorePlan(snaps[-1], [s for s in segs if s.last_txn > snaps[-1].txn], txn, time_ms))
            elif seg_start is not None:
                plans.append(RestorePlan(None, [s for s in segs if s.first_txn >= seg_start], txn, time_ms))
        if not plans and txn is not None:
            plans = [RestorePlan(s, [], txn, None) for s in self.snapshots if s.txn == txn]
        if not plans:
            what = f"txn {txn}" if txn is not None else f"time {time_ms} ms"
            raise PipelineError(
                f"{what} of database {self.database!r} is not archived; {self.describe_points()}",
                database=self.database,
                txn_id=txn,
            )
        return plans[-1]

    def newest(self) -> tuple[int, int] | None:
        """(txn id, source time in ms) of the newest archived txn, None if nothing is archived."""
        found = [(s.last_txn, s.last_ms) for s in self.segments] + [(s.txn, s.time_ms) for s in self.snapshots]
        return max(found) if found else None

    def behind(self, captured_txn: int, captured_ms: int | None) -> dict:
        """How far the archive is behind the source: its newest txn and time, and the txns and seconds between
        (`pipeline status`). None for what is unknown."""
        newest = self.newest()
        if newest is None:
            return {"archived_txn": None, "archived_time_ms": None, "behind_txns": captured_txn, "behind_seconds": None}
        txn, ms = newest
        return {
            "archived_txn": txn,
            "archived_time_ms": ms,
            "behind_txns": max(0, captured_txn - txn),
            "behind_seconds": max(0.0, (captured_ms - ms) / 1000) if captured_ms else None,
        }

    def continuing(self, txn: int) -> RestorePlan | None:
        """The plan that brings a replica at `txn` to the end of the archive's run holding txn+1, applying
        segments only (no base, so the replica stays at a txn boundary throughout); None if no segment
        holds txn+1 (retention removed it, or the archive has not reached it)."""
        for run in self.runs():
            if run[0].first_txn <= txn + 1 <= run[-1].last_txn:
                return RestorePlan(None, [s for s in run if s.last_txn > txn], None, None)
        return None

    @property
    def restorable(self) -> bool:
        return bool(self.restore_points())


# --- compaction -----------------------------------------------------------------------------


@dataclass(frozen=True)
class CompactionPolicy:
    """Which segments merge into one: level n merges the lower-level segments whose first txn falls
    in one window of `windows_ms[n - 1]` of source time (Litestream's levels), up to `max_bytes`.

    With the defaults a day of one-second segments becomes 24 hourly objects, plus at most an hour
    of minutes and a minute of seconds at the head.
    """

    windows_ms: tuple[int, ...] = (60_000, 3_600_000)
    max_bytes: int = 256 << 20

    def __post_init__(self) -> None:
        if (
            not self.windows_ms
            or any(w <= 0 for w in self.windows_ms)
            or list(self.windows_ms) != sorted(self.windows_ms)
        ):
            raise PipelineError(f"compaction windows must be positive and growing, got {self.windows_ms}")


@dataclass(frozen=True)
class Compaction:
    """Contiguous segments to merge into one of `level`."""

    level: int
    sources: list[Segment]

    @property
    def target(self) -> Segment:
        first, last = self.sources[0], self.sources[-1]
        return Segment(
            first.first_txn,
            last.last_txn,
            first.first_offset,
            first.first_ms,
            last.last_ms,
            first.partition,
            first.starts_with_snapshot,
            sum(s.size for s in self.sources),
            self.level,
        )


def compaction_plan(catalog: Catalog, policy: CompactionPolicy) -> list[Compaction]:
    """The merges due now; deterministic, so archivers that race write the same objects.

    A group is merged only when the segment right after it is already stored and continues it:
    then no segment of the window is still being uploaded. A segment that starts with a snapshot
    starts a group (a restore may begin there), and a group stops before `max_bytes`.
    """
    plans: list[Compaction] = []
    claimed: set[Segment] = set()
    segs = catalog.segments
    for level in range(len(policy.windows_ms), 0, -1):
        width = policy.windows_ms[level - 1]
        group: list[Segment] = []
        for seg in [*segs, None]:
            prev = group[-1] if group else None
            joins = (
                seg is not None
                and prev is not None
                and seg not in claimed
                and seg.level < level
                and seg.partition == prev.partition
                and seg.first_txn == prev.last_txn + 1
                and seg.first_ms // width == group[0].first_ms // width
                and not seg.starts_with_snapshot
                and sum(s.size for s in group) + seg.size <= policy.max_bytes
            )
            if joins:
                assert seg is not None
                group.append(seg)
                continue
            closed = seg is not None and prev is not None and seg.first_txn == prev.last_txn + 1
            if len(group) > 1 and closed:
                plans.append(Compaction(level, group))
                claimed.update(group)
            group = [seg] if seg is not None and seg not in claimed and seg.level < level else []
    return sorted(plans, key=lambda c: c.sources[0])


@dataclass(frozen=True)
class RetentionPlan:
    keep_from: Snapshot | None  # the oldest retained restore point
    delete_snapshots: list[Snapshot]
    delete_segments: list[Segment]


def retention_plan(
    catalog: Catalog, *, keep_snapshots: int | None = None, keep_ms: int | None = None, now_ms: int = 0
) -> RetentionPlan:
    """What a retention policy deletes: everything strictly before the oldest snapshot that must stay.

    `keep_snapshots` keeps the newest K snapshots; `keep_ms` keeps every point in the last window
    (so the newest snapshot at or before the window's start stays). With both, the older bound wins.
    Nothing is deleted unless some snapshot is old enough to be that bound: a segment a retained
    restore point needs is never removed.
    """
    bounds: list[Snapshot] = []
    if keep_snapshots is not None:
        if keep_snapshots < 1:
            raise PipelineError("keep at least one snapshot", database=catalog.database)
        if len(catalog.snapshots) >= keep_snapshots:
            bounds.append(catalog.snapshots[-keep_snapshots])
        else:
            return RetentionPlan(None, [], [])
    if keep_ms is not None:
        old = [s for s in catalog.snapshots if s.time_ms <= now_ms - keep_ms]
        if not old:
            return RetentionPlan(None, [], [])
        bounds.append(old[-1])
    if not bounds:
        raise PipelineError(
            "give a retention policy: --keep-snapshots K and/or --keep-days D", database=catalog.database
        )
    keep = min(bounds)
    return RetentionPlan(
        keep,
        [s for s in catalog.snapshots if s.txn < keep.txn],
        [s for s in catalog.segments if s.last_txn <= keep.txn] + catalog.superseded,
    )
