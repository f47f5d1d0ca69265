"""The event spill journal on real files: round trip, torn tails, a crashed writer's
leftovers, the size cap and one slot per process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from service.spill_journal import MAGIC, SpilledEvent, SpillJournal

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
        from service.spill_journal import SpillJournal, SpilledEvent
        j = SpillJournal({str(tmp_path)!r}, max_bytes=1 << 20, segment_bytes=300)
        pos = [j.append(SpilledEvent("interactions", b"u", b"event-%d" % i)) for i in range(50)]
        j.sync()
        j.commit(pos[16])  # 17 delivered
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    child = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=os.environ.copy())
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
