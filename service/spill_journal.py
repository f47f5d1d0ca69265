"""A local, append-only journal of events that could not go to Kafka yet.

The event log's sender thread appends an event here when Kafka is unreachable (or too slow
to keep up) and, once Kafka answers again, reads the journal back oldest first, produces
each event, and commits what Kafka acknowledged; fully committed segments are deleted.
What a crashed process left behind is found by the next one that claims the directory.

Layout. `root/slot-<k>/` is one journal; a process claims the lowest slot whose `lock`
file it can `flock`, so two servers on one host never share a journal and a restarted
server usually takes over its predecessor's slot. A slot holds segment files
`<seq>.spill` (16 digits); each starts with the 8-byte magic `LLSPILL1` and then holds
records

    u32 length | u32 crc32(payload) | payload
    payload = u16 topic length | i32 key length | i32 value length
              [| i64 timestamp ms] | topic | key | value

(little-endian; a length of -1 is None). The timestamp (the event's creation time, sent as
the Kafka record's timestamp) is there only when bit 15 of the topic length is set
(`_HAS_TIMESTAMP`; topic names are at most 249 bytes): records written before it existed
still read, as events without a timestamp (Kafka then stamps them when they are sent).
A record is written whole or not at all: `write`
is repeated until every byte is on the file (a short write is not an error), and when a
write fails part-way (ENOSPC, EFBIG, EIO) the segment is truncated back to its last whole
record and the next append starts a new segment, so records after a failure are never
written behind garbage; the failed append raises `OSError` (the event log counts it as
`spill_error`). `sync` fsyncs. A tail torn by a crash mid-write (or any bad length/CRC)
ends its segment: what follows is skipped and counted in `torn`, never raised. `cursor`
(written after each commit inside a segment) says how far the oldest segment was
delivered, so a restart redelivers at most the events of one unacknowledged read.

Failures of the bookkeeping files never stop the journal: a segment that cannot be
deleted after it was delivered, or a `cursor` that cannot be written, is logged and
counted in `errors`, and at worst the next start delivers those events again (Kafka sees
duplicates, never a gap). Opening a journal only claims its slot; the check of every
record a previous process left (`load`, a CRC scan of up to `max_bytes`) runs on the
first use, on the event log's sender thread, not on the caller's (the server's asyncio
loop).
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import fcntl
import logging
import os
import struct
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, NamedTuple

from loraloop.core.durable_files import fsync_dir

__all__ = ["JournalBusy", "Position", "Record", "SpillJournal", "SpilledEvent"]

log = logging.getLogger(__name__)

MAGIC = b"LLSPILL1"
_RECORD = struct.Struct("<II")  # payload length, crc32 of the payload
_FIELDS = struct.Struct("<Hii")  # topic length, key length, value length (-1: None)
_TIMESTAMP = struct.Struct("<q")  # creation time in ms, present when _HAS_TIMESTAMP is set
_HAS_TIMESTAMP = 0x8000  # a flag in the topic length field
MAX_RECORD = 64 * 1024 * 1024  # a longer length field can only be corruption
MAX_SLOTS = 64
_SUFFIX = ".spill"


@dataclass(frozen=True)
class SpilledEvent:
    """One event as the producer sends it: already serialized."""

    topic: str
    key: bytes | None
    value: bytes | None
    timestamp_ms: int | None = None  # the Kafka record's timestamp; None: stamped when sent


class Position(NamedTuple):
    """Where a record ends: its segment, the offset just past it, and how many records of
    the segment it completes (positions order as the records do)."""

    seq: int
    offset: int
    records: int


Record = tuple[Position, SpilledEvent]


class JournalBusy(RuntimeError):
    """Every slot of the spill directory is claimed by a running process."""


def encode(event: SpilledEvent) -> bytes:
    """The record (header and payload) of `event`."""
    topic = event.topic.encode()
    key, value = event.key, event.value
    if len(topic) >= _HAS_TIMESTAMP:
        raise ValueError(f"topic name of {len(topic)} bytes is too long for the journal")
    stamped = event.timestamp_ms is not None
    payload = b"".join(
        (
            _FIELDS.pack(
                len(topic) | (_HAS_TIMESTAMP if stamped else 0),
                -1 if key is None else len(key),
                -1 if value is None else len(value),
            ),
            _TIMESTAMP.pack(event.timestamp_ms) if stamped else b"",
            topic,
            key or b"",
            value or b"",
        )
    )
    return _RECORD.pack(len(payload), zlib.crc32(payload)) + payload


def _decode(payload: bytes) -> SpilledEvent | None:
    """The event in a CRC-checked payload; None when its lengths do not add up."""
    if len(payload) < _FIELDS.size:
        return None
    topic_len, key_len, value_len = _FIELDS.unpack_from(payload)
    if key_len < -1 or value_len < -1:
        return None
    at = _FIELDS.size
    timestamp_ms: int | None = None
    if topic_len & _HAS_TIMESTAMP:
        topic_len &= ~_HAS_TIMESTAMP
        if len(payload) < at + _TIMESTAMP.size:
            return None
        (timestamp_ms,) = _TIMESTAMP.unpack_from(payload, at)
        at += _TIMESTAMP.size
    if at + topic_len + max(key_len, 0) + max(value_len, 0) != len(payload):
        return None
    topic = payload[at : at + topic_len]
    at += topic_len
    key = None if key_len < 0 else payload[at : at + key_len]
    at += max(key_len, 0)
    value = None if value_len < 0 else payload[at : at + value_len]
    try:
        return SpilledEvent(topic.decode(), key, value, timestamp_ms)
    except UnicodeDecodeError:
        return None


def _next_record(fh: IO[bytes], offset: int, end: int) -> tuple[SpilledEvent, int] | None:
    """The record at `offset` of an open segment and the offset after it; None at the end
    (`end`) or at anything that is not a whole, intact record."""
    if offset + _RECORD.size > end:
        return None
    fh.seek(offset)
    header = fh.read(_RECORD.size)
    if len(header) < _RECORD.size:
        return None
    length, crc = _RECORD.unpack(header)
    stop = offset + _RECORD.size + length
    if length > MAX_RECORD or stop > end:
        return None
    payload = fh.read(length)
    if len(payload) != length or zlib.crc32(payload) != crc:
        return None
    event = _decode(payload)
    return None if event is None else (event, stop)


@dataclass
class _Segment:
    seq: int
    path: Path
    size: int  # bytes on disk
    end: int  # offset just past the last intact record
    count: int  # intact records


class SpillJournal:
    """The journal in one claimed slot of `root`; used by one thread.

    `append` refuses (returns None) what would take the journal's files past `max_bytes`.
    `read` hands out records oldest first from a read cursor; `commit` marks everything up
    to a position delivered (deleting finished segments); `rewind` moves the read cursor
    back to the commit point, to read again what was not delivered.

    `load=False` defers the scan of what a previous process left to `load()` (or to the
    first append/read/commit), so that it runs on the thread that uses the journal.
    """

    def __init__(
        self, root: Path | str, max_bytes: int, segment_bytes: int = 0, *, load: bool = True
    ) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes or min(max(max_bytes // 8, 1024), 16 << 20)
        self.torn = 0  # torn or corrupt segment tails skipped since this journal opened
        self.torn_bytes = 0
        self.recovered = 0  # records a previous process left, found when opening
        self.errors = 0  # failed file operations that cost no event (see the docstring)
        self.loaded = threading.Event()  # set once `load` has indexed the directory
        self.dir, self._lock_fd = _claim(self.root)
        self._segments: dict[int, _Segment] = {}
        self._writer: IO[bytes] | None = None  # the active (newest) segment, append-only
        self._active: _Segment | None = None
        self._reader: tuple[int, IO[bytes]] | None = None
        self._dirty = False
        self._bytes = 0  # sum of the segments' sizes
        self._records = 0  # sum of the segments' intact records
        self._commit = Position(0, 0, 0)
        self._read = self._commit
        self._last_seq = 0  # the highest segment number seen or used: new ones go above
        if load:
            self.load()

    # --- state --------------------------------------------------------------------------
    # Plain counters, so that other threads (metrics, flush) can read them at any time.
    @property
    def bytes(self) -> int:
        """Bytes of segment files on disk (what `max_bytes` caps)."""
        return self._bytes

    @property
    def pending(self) -> int:
        """Records appended (or found at start-up) and not committed yet."""
        commit = self._commit
        return self._records - (commit.records if commit.seq in self._segments else 0)

    # --- writing ------------------------------------------------------------------------
    def append(self, event: SpilledEvent) -> Position | None:
        """Append `event`; its position, or None when the cap leaves no room for it. Raises
        OSError when the write fails (the journal stays intact and usable)."""
        self.load()
        record = encode(event)
        if len(record) > MAX_RECORD:
            return None
        roll = self._active is None or self._active.size >= self.segment_bytes
        if self.bytes + len(record) + (len(MAGIC) if roll else 0) > self.max_bytes:
            return None
        if roll:
            self._roll()
        assert self._writer is not None and self._active is not None
        seg = self._active
        try:
            _write_all(self._writer, record)
        except OSError:
            self._undo_write(seg)
            raise
        seg.size += len(record)
        seg.end = seg.size
        seg.count += 1
        self._bytes += len(record)
        self._records += 1
        self._dirty = True
        return Position(seg.seq, seg.end, seg.count)

    def sync(self) -> None:
        """fsync what was appended since the last sync."""
        if self._dirty and self._writer is not None:
            os.fsync(self._writer.fileno())
        self._dirty = False

    # --- reading and committing ---------------------------------------------------------
    def read(
        self, max_records: int, max_bytes: int = 1 << 20
    ) -> list[tuple[Position, SpilledEvent]]:
        """Up to `max_records` records (about `max_bytes`) after the read cursor, oldest first.

        An I/O error ends the batch early; it is raised only when nothing could be read."""
        self.load()
        out: list[Record] = []
        size = 0
        while len(out) < max_records and size < max_bytes:
            seg = self._segments.get(self._read.seq)
            if seg is None or self._read.offset >= seg.end:
                later = [s for s in self._segments if s > self._read.seq]
                if not later:
                    break
                self._read = Position(min(later), len(MAGIC), 0)
                continue
            try:
                found = _next_record(self._reader_for(seg), self._read.offset, seg.end)
            except OSError as exc:
                self._close_reader()  # reopened by the next read
                self.errors += 1
                if out:
                    log.warning("spill journal %s: read failed (%s)", seg.path, exc)
                    break
                raise
            if found is None:  # corrupted since it was checked: end the segment here
                self._torn(seg, self._read.offset, self._read.records, "while reading")
                continue
            event, stop = found
            size += stop - self._read.offset
            self._read = Position(seg.seq, stop, self._read.records + 1)
            out.append((self._read, event))
        return out

    def rewind(self) -> None:
        """Read again from the commit point."""
        self._read = self._commit

    def commit(self, position: Position) -> None:
        """Everything up to and including the record ending at `position` is delivered.

        Never raises for the files it removes or writes (see the module's docstring)."""
        self.load()
        if position <= self._commit:
            return
        self._commit = position
        self._read = max(self._read, position)
        for seq in sorted(self._segments):
            seg = self._segments[seq]
            done = seq < position.seq or (seq == position.seq and position.offset >= seg.end)
            if not done:
                break
            if seg is self._active:
                self._close_writer()
            self._delete(seg)
        if self._commit.seq in self._segments:
            self._write_cursor()
        else:
            self._remove(self.dir / "cursor")

    def close(self) -> None:
        """fsync, close the files and release the slot."""
        if self._writer is not None:
            try:
                self.sync()
            except OSError as exc:
                self.errors += 1
                log.warning("spill journal %s: fsync at close failed (%s)", self.dir, exc)
            self._close_writer()
        self._close_reader()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = -1

    # --- internals ----------------------------------------------------------------------
    def load(self) -> None:
        """Index the segments a previous process left and check every record (once; later
        calls return at once). Raises OSError when the directory cannot be listed; a
        segment that cannot be read is left on disk, logged and counted in `errors`."""
        if self.loaded.is_set():
            return
        cursor = self._read_cursor()
        trusted = False
        for path in sorted(self.dir.glob(f"*{_SUFFIX}")):
            try:
                seq = int(path.name.removesuffix(_SUFFIX))
            except ValueError:
                continue
            self._last_seq = max(self._last_seq, seq)
            try:
                seg, at_boundary = self._scan(seq, path, cursor)
            except OSError as exc:
                self.errors += 1
                log.error("spill journal: %s cannot be read (%s); left on disk", path, exc)
                continue
            if seg.count == 0:  # nothing intact in it
                self._delete(seg)
                continue
            self._add(seg)
            trusted = trusted or at_boundary
        first = min(self._segments, default=0)
        if cursor is not None and trusted and cursor.seq == first:
            self._commit = cursor  # delivered up to here before the previous process ended
        else:
            self._commit = Position(first, len(MAGIC), 0)
        self._read = self._commit
        self.recovered = self.pending
        self.loaded.set()
        if self.recovered or self.torn:
            log.warning(
                "spill journal %s: %d events left by a previous process to deliver; %d torn "
                "tail(s) (%d bytes) skipped",
                self.dir,
                self.recovered,
                self.torn,
                self.torn_bytes,
            )

    def _scan(self, seq: int, path: Path, cursor: Position | None) -> tuple[_Segment, bool]:
        """The segment's intact extent, and whether `cursor` falls on one of its records."""
        size = path.stat().st_size
        seg = _Segment(seq, path, size, len(MAGIC), 0)
        at_boundary = False
        with open(path, "rb") as fh:
            if fh.read(len(MAGIC)) != MAGIC:
                self._torn(seg, 0, 0, "bad segment header")
                return seg, False
            while (found := _next_record(fh, seg.end, size)) is not None:
                seg.end = found[1]
                seg.count += 1
                if cursor is not None and cursor == (seq, seg.end, seg.count):
                    at_boundary = True
        if seg.end < size:
            self._torn(seg, seg.end, seg.count, "torn tail")
        return seg, at_boundary

    def _torn(self, seg: _Segment, offset: int, count: int, why: str) -> None:
        self.torn += 1
        self.torn_bytes += seg.size - offset
        log.warning(
            "spill journal %s: %s at byte %d (%d bytes skipped)",
            seg.path,
            why,
            offset,
            seg.size - offset,
        )
        if seg.seq in self._segments:
            self._records -= seg.count - count
        seg.end, seg.count = max(offset, len(MAGIC)), count
        if seg is self._active:  # never append behind damage: the next append rolls
            self._close_writer()

    def _undo_write(self, seg: _Segment) -> None:
        """A record's write failed part-way: cut the segment back to its last whole record
        and make the next append start a new segment."""
        assert self._writer is not None
        fd = self._writer.fileno()
        try:
            os.ftruncate(fd, seg.size)
        except OSError as exc:  # the partial bytes stay: never read (past seg.end), and
            self.errors += 1  # a restart counts them as a torn tail
            log.error("spill journal %s: cannot cut a failed write off (%s)", seg.path, exc)
            with contextlib.suppress(OSError):
                on_disk = os.fstat(fd).st_size
                self._bytes += on_disk - seg.size
                seg.size = on_disk
        self._close_writer()

    def _roll(self) -> None:
        """Start a new segment (after syncing the current one)."""
        if self._writer is not None:
            try:
                self.sync()
            except OSError as exc:  # the records stay in the page cache, still readable
                self.errors += 1
                log.warning("spill journal %s: fsync failed (%s)", self.dir, exc)
            self._close_writer()
        self._last_seq = seq = max(self._last_seq, *self._segments, self._commit.seq) + 1
        path = self.dir / f"{seq:016d}{_SUFFIX}"
        writer = open(path, "xb", buffering=0)  # noqa: SIM115 - lives until the next roll
        try:
            _write_all(writer, MAGIC)
            fsync_dir(self.dir)
        except OSError:
            writer.close()
            self._remove(path)
            raise
        self._writer = writer
        self._active = _Segment(seq, path, len(MAGIC), len(MAGIC), 0)
        self._add(self._active)
        if not self._segments.keys() - {seq}:  # an empty journal starts here
            self._commit = self._read = Position(seq, len(MAGIC), 0)

    def _close_writer(self) -> None:
        writer, self._writer, self._active = self._writer, None, None
        if writer is not None:
            with contextlib.suppress(OSError):
                writer.close()

    def _close_reader(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            with contextlib.suppress(OSError):
                reader[1].close()

    def _reader_for(self, seg: _Segment) -> IO[builtins.bytes]:  # `bytes` is a property here
        if self._reader is None or self._reader[0] != seg.seq:
            self._close_reader()
            self._reader = (seg.seq, open(seg.path, "rb"))  # noqa: SIM115 - closed on change
        return self._reader[1]

    def _remove(self, path: Path) -> None:
        """Unlink `path`; a failure is logged and counted, not raised."""
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            self.errors += 1
            log.error("spill journal: cannot remove %s (%s)", path, exc)

    def _delete(self, seg: _Segment) -> None:
        """Forget a segment and remove its file (a file that stays is delivered again by
        the next start: duplicates, not losses)."""
        if self._reader is not None and self._reader[0] == seg.seq:
            self._close_reader()
        self._remove(seg.path)
        if self._segments.pop(seg.seq, None) is not None:
            self._bytes -= seg.size
            self._records -= seg.count

    def _add(self, seg: _Segment) -> None:
        self._segments[seg.seq] = seg
        self._bytes += seg.size
        self._records += seg.count

    def _read_cursor(self) -> Position | None:
        try:
            seq, offset, count = (int(x) for x in (self.dir / "cursor").read_text().split())
        except (OSError, ValueError):
            return None
        return Position(seq, offset, count)

    def _write_cursor(self) -> None:
        """Record the commit point; on failure the next start redelivers from the last
        cursor written (logged and counted, not raised)."""
        tmp = self.dir / "cursor.tmp"
        try:
            tmp.write_text("{} {} {}\n".format(*self._commit))
            os.replace(tmp, self.dir / "cursor")
        except OSError as exc:
            self.errors += 1
            log.error("spill journal %s: cannot write its cursor (%s)", self.dir, exc)


def _claim(root: Path) -> tuple[Path, int]:
    """The first slot directory of `root` this process can lock, and the lock's fd."""
    for k in range(MAX_SLOTS):
        slot = root / f"slot-{k}"
        slot.mkdir(parents=True, exist_ok=True)
        fd = os.open(slot / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return slot, fd
    raise JournalBusy(
        f"all {MAX_SLOTS} spill journal slots under {root} are held by running processes; "
        "give this server its own LORALOOP_SPILL_DIR"
    )


def _write_all(fh: IO[bytes], data: bytes) -> None:
    """Write every byte of `data` to an unbuffered file, however many calls it takes."""
    view = memoryview(data)
    while view:
        written = fh.write(view)
        if not written:  # None (would block) or 0: no progress, so no room
            raise OSError(errno.ENOSPC, "no byte written")
        view = view[written:]
