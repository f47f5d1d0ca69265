"""The event spill journal on real files: round trip, torn tails, a crashed writer's
leftovers, the size cap and one slot per process."""

from __future__ import annotations

import errno
import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import pytest

from loraloop.service.spill_journal import MAGIC, SpilledEvent, SpillJournal

ROOT = Path(__file__).resolve().parents[2]


def events(n: int, start: int = 0) -> list[SpilledEvent]:
    return [
        SpilledEvent("interactions", f"user-{i % 7}".encode(), f"event-{i}".encode() * 3)
        for i in range(start, start + n)
    ]


def segments(journal: SpillJournal) -> list[Path]:
    return sorted(journal.dir.glob("*.spill"))


def read_all(journal: SpillJournal) -> list[SpilledEvent]:
    out = []
    while batch := journal.read(max_records=3):
        out += [event for _, event in batch]
    return out


def test_round_trip_in_order_and_commit_deletes_segments(tmp_path: Path) -> None:
    journal = SpillJournal(tmp_path, max_bytes=1 << 20, segment_bytes=200)
    odd = [
        SpilledEvent("adapter-updates", b"gone", None),  # a tombstone
        SpilledEvent("feedback", None, b""),
        SpilledEvent("t\u00e9", b"", b"\x00" * 1000),
    ]
    written = events(20) + odd
    positions = [journal.append(e) for e in written]
    assert all(positions) and positions == sorted(positions)
    journal.sync()
    assert journal.pending == len(written)
    assert len(segments(journal)) > 1  # 200-byte segments: it rolled
    assert journal.bytes == sum(p.stat().st_size for p in segments(journal))
    records = journal.read(max_records=1000, max_bytes=1 << 30)
    assert [e for _, e in records] == written
    assert [p for p, _ in records] == positions
    assert journal.read(max_records=10) == []  # the read cursor is at the end
    journal.commit(records[9][0])
    assert journal.pending == len(written) - 10
    journal.rewind()
    assert read_all(journal) == written[10:]  # from the commit point, not the start
    journal.commit(records[-1][0])
    assert journal.pending == 0 and journal.bytes == 0 and segments(journal) == []
    assert journal.append(odd[0]) is not None  # and it goes on after being emptied
    assert read_all(journal) == [odd[0]]
    journal.close()


def test_torn_tail_is_skipped_and_counted(tmp_path: Path) -> None:
    journal = SpillJournal(tmp_path, max_bytes=1 << 20)
    written = events(5)
    for e in written:
        journal.append(e)
    journal.close()
    (segment,) = segments(journal)
    data = segment.read_bytes()
    segment.write_bytes(data[:-7])  # a crash in the middle of the last record's write

    reopened = SpillJournal(tmp_path, max_bytes=1 << 20)
    assert reopened.dir == journal.dir  # the slot is free again: same journal
    assert reopened.torn == 1 and reopened.torn_bytes > 0
    assert reopened.recovered == reopened.pending == 4
    reopened.append(SpilledEvent("interactions", b"k", b"after the crash"))
    got = read_all(reopened)
    assert got == [*written[:4], SpilledEvent("interactions", b"k", b"after the crash")]
    reopened.close()


def test_corrupt_record_ends_its_segment(tmp_path: Path) -> None:
    journal = SpillJournal(tmp_path, max_bytes=1 << 20)
    written = events(6)
    positions = [journal.append(e) for e in written]
    journal.close()
    (segment,) = segments(journal)
    data = bytearray(segment.read_bytes())
    data[positions[2].offset + 12] ^= 0xFF  # a flipped bit in the 4th record's payload
    segment.write_bytes(bytes(data))
    garbage = journal.dir / f"{positions[0].seq + 1:016d}.spill"
    garbage.write_bytes(b"not a segment at all")  # a bad header: nothing in it is read

    reopened = SpillJournal(tmp_path, max_bytes=1 << 20)
    assert reopened.torn == 2
    assert read_all(reopened) == written[:3]
    assert not garbage.exists()  # nothing intact in it: removed
    reopened.close()


def test_leftovers_of_a_killed_writer_are_found_after_the_last_commit(tmp_path: Path) -> None:
    """A real crash: a child process appends, commits part, and is SIGKILLed."""
    code = textwrap.dedent(
        f"""
        import os, signal
        from loraloop.service.spill_journal import SpillJournal, SpilledEvent
        j = SpillJournal({str(tmp_path)!r}, max_bytes=1 << 20, segment_bytes=300)
        pos = [j.append(SpilledEvent("interactions", b"u", b"event-%d" % i)) for i in range(50)]
        j.sync()
        j.commit(pos[16])  # 17 delivered
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    child = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=os.environ.copy(), timeout=120
    )
    assert child.returncode == -signal.SIGKILL
    journal = SpillJournal(tmp_path, max_bytes=1 << 20)
    assert journal.dir.name == "slot-0" and journal.torn == 0
    assert journal.recovered == 33
    assert [e.value for e in read_all(journal)] == [b"event-%d" % i for i in range(17, 50)]
    journal.close()


def test_cap_refuses_what_does_not_fit_and_frees_on_commit(tmp_path: Path) -> None:
    cap = 2048
    journal = SpillJournal(tmp_path, max_bytes=cap, segment_bytes=512)
    accepted = []
    refused = 0
    for e in events(100):
        position = journal.append(e)
        if position is None:
            refused += 1
        else:
            accepted.append((position, e))
    assert accepted and refused and len(accepted) + refused == 100
    assert journal.bytes <= cap
    assert journal.bytes == sum(p.stat().st_size for p in segments(journal))
    assert [e for _, e in accepted] == read_all(journal)  # a prefix, in order: no gaps
    journal.commit(accepted[-1][0])
    assert journal.bytes == 0
    assert journal.append(events(1)[0]) is not None
    journal.close()
    assert SpillJournal(tmp_path, max_bytes=0).append(events(1)[0]) is None  # 0: no spilling


def test_each_process_gets_its_own_slot(tmp_path: Path) -> None:
    first = SpillJournal(tmp_path, max_bytes=1 << 20)
    second = SpillJournal(tmp_path, max_bytes=1 << 20)
    assert (first.dir.name, second.dir.name) == ("slot-0", "slot-1")
    first.append(events(1)[0])
    first.close()
    third = SpillJournal(tmp_path, max_bytes=1 << 20)
    assert third.dir.name == "slot-0" and third.recovered == 1
    third.close()
    second.close()
    assert (first.dir / "lock").read_text().strip() == str(os.getpid())


@pytest.mark.parametrize("size", [0, 3, len(MAGIC) + 5])
def test_short_or_empty_segments_never_crash(tmp_path: Path, size: int) -> None:
    slot = tmp_path / "slot-0"
    slot.mkdir()
    (slot / f"{1:016d}.spill").write_bytes((MAGIC + b"\x05\x00\x00")[:size])
    journal = SpillJournal(tmp_path, max_bytes=1 << 20)
    assert journal.pending == 0 and journal.read(10) == []
    assert journal.append(events(1)[0]) is not None
    assert read_all(journal) == events(1)
    journal.close()


def test_a_write_that_fails_part_way_is_cut_off_and_the_journal_goes_on(tmp_path: Path) -> None:
    """A real short write: a child process whose files may not grow past 1000 bytes
    (RLIMIT_FSIZE) appends until writes fail part-way. Each failed append raises and leaves
    no partial record behind; later appends go to a new segment; nothing is torn."""
    code = textwrap.dedent(
        f"""
        import json, resource, signal
        from loraloop.service.spill_journal import SpillJournal, SpilledEvent
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a signal
        j = SpillJournal({str(tmp_path)!r}, max_bytes=1 << 20, segment_bytes=1 << 20)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1000, resource.RLIM_INFINITY))
        accepted, failed = [], []
        for i in range(60):
            event = SpilledEvent("interactions", b"u", b"event-%03d" % i + b"x" * 20)
            try:
                assert j.append(event) is not None
                accepted.append(i)
            except OSError as exc:
                failed.append(exc.errno)
        j.close()
        print(json.dumps({{"accepted": accepted, "failed": failed}}))
        """
    )
    child = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=os.environ.copy(),
        timeout=120,
        capture_output=True,
        text=True,
    )
    assert child.returncode == 0, child.stderr
    result = json.loads(child.stdout.splitlines()[-1])
    accepted, failed = result["accepted"], result["failed"]
    files = sorted((tmp_path / "slot-0").glob("*.spill"))
    print(
        f"\nfile size limit 1000 B: {len(accepted)} of 60 appends written, {len(failed)} "
        f"failed part-way ({set(failed)}), {len(files)} segments of "
        f"{[f.stat().st_size for f in files]} bytes"
    )
    assert failed and set(failed) == {errno.EFBIG} and len(accepted) + len(failed) == 60
    assert len(files) > 1 and all(f.stat().st_size <= 1000 for f in files)
    journal = SpillJournal(tmp_path, max_bytes=1 << 20)
    assert journal.torn == 0  # every failed write was cut off: no garbage in any segment
    assert journal.recovered == len(accepted)
    got = [e.value[:9] for e in read_all(journal)]
    assert got == [b"event-%03d" % i for i in accepted]  # in order, no gap among them
    journal.close()


def test_file_errors_while_committing_lose_nothing_and_are_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cursor cannot be written (a directory is in the way of its temporary file) and
    delivered segments cannot be removed (unlink fails, as on a read-only or broken disk):
    commit never raises, the journal goes on, and the next start delivers the segments that
    stayed (duplicates, no loss)."""
    journal = SpillJournal(tmp_path, max_bytes=1 << 20, segment_bytes=200)
    (journal.dir / "cursor.tmp").mkdir()
    written = events(10)
    positions = [journal.append(e) for e in written]
    journal.commit(positions[0])  # inside the first segment: a cursor write, which fails
    assert journal.errors == 1 and journal.pending == 9

    real_unlink = os.unlink

    def unlink(path: os.PathLike[str] | str, *args: object, **kwargs: object) -> None:
        if str(path).endswith(".spill"):
            raise PermissionError(errno.EACCES, "injected", str(path))
        real_unlink(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "unlink", unlink)
    journal.commit(positions[-1])  # every segment delivered: none can be removed
    assert journal.pending == 0 and journal.bytes == 0
    assert journal.errors > 1
    after = SpilledEvent("interactions", b"k", b"after the errors")
    assert journal.append(after) is not None  # a new segment, past the ones that stayed
    assert read_all(journal) == [after]
    journal.close()
    monkeypatch.undo()

    reopened = SpillJournal(tmp_path, max_bytes=1 << 20)
    again = read_all(reopened)
    print(
        f"\ncommit with failing cursor writes and unlinks: {journal.errors} errors counted, "
        f"{len(again) - 1} delivered events found again by the next start"
    )
    assert again == [*written, after]  # the leftovers first, in order: duplicates only
    reopened.close()


def test_a_read_error_ends_the_batch_and_the_next_read_retries(tmp_path: Path) -> None:
    """A segment that cannot be opened (a directory in its place) ends a read early, with
    the records before it; a read that gets nothing raises; once it is back, reading goes
    on where it stopped."""
    journal = SpillJournal(tmp_path, max_bytes=1 << 20, segment_bytes=200)
    written = events(10)
    for e in written:
        journal.append(e)
    second = segments(journal)[1]
    moved = second.with_suffix(".away")
    second.rename(moved)
    second.mkdir()
    first = journal.read(max_records=100)
    assert [e for _, e in first] == written[: len(first)] and first
    with pytest.raises(IsADirectoryError):
        journal.read(max_records=100)
    assert journal.errors == 2
    second.rmdir()
    moved.rename(second)
    assert read_all(journal) == written[len(first) :]
    journal.close()


def test_opening_claims_the_slot_and_the_scan_waits_for_first_use(tmp_path: Path) -> None:
    journal = SpillJournal(tmp_path, max_bytes=1 << 20)
    for e in events(5):
        journal.append(e)
    journal.close()
    lazy = SpillJournal(tmp_path, max_bytes=1 << 20, load=False)
    assert lazy.dir == journal.dir and not lazy.loaded.is_set()
    assert lazy.pending == 0 and lazy.recovered == 0  # nothing read yet
    assert read_all(lazy) == events(5)  # the first use loads it
    assert lazy.loaded.is_set() and lazy.recovered == 5
    lazy.close()


def test_records_of_the_old_format_still_read_beside_timestamped_ones(tmp_path: Path) -> None:
    """A segment written before records carried a timestamp (no flag in the topic length)
    reads as events without one; records appended now keep theirs."""

    def old_record(topic: bytes, key: bytes, value: bytes | None) -> bytes:
        fields = struct.pack("<Hii", len(topic), len(key), -1 if value is None else len(value))
        payload = fields + topic + key + (value or b"")
        return struct.pack("<II", len(payload), zlib.crc32(payload)) + payload

    slot = tmp_path / "slot-0"
    slot.mkdir(parents=True)
    old = [old_record(b"t", b"user-%d" % i, None if i == 2 else b"v%d" % i) for i in range(3)]
    (slot / f"{1:016d}.spill").write_bytes(MAGIC + b"".join(old))
    journal = SpillJournal(tmp_path, max_bytes=1 << 20)
    assert journal.recovered == 3 and journal.torn == 0
    stamped = SpilledEvent("t", b"user-9", None, timestamp_ms=1_700_000_000_123)
    journal.append(stamped)
    got = read_all(journal)
    journal.close()
    print(f"\nold-format records read: {len(got) - 1}, then 1 timestamped: {got[-1]}")
    assert got[:3] == [
        SpilledEvent("t", b"user-0", b"v0"),
        SpilledEvent("t", b"user-1", b"v1"),
        SpilledEvent("t", b"user-2", None),
    ]
    assert all(e.timestamp_ms is None for e in got[:3])
    assert got[3] == stamped
    reopened = SpillJournal(tmp_path, max_bytes=1 << 20)
    assert read_all(reopened)[-1].timestamp_ms == 1_700_000_000_123
    reopened.close()
