"""Kafka goes away under the real server: Generate keeps answering, interaction events
spill to the local journal, and once the broker is back every one of them reaches the
topic. A dedicated broker (not the session one), so stopping it disturbs no other test.

Figures are printed (`pytest -s`); the assertions are about availability and events.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import statistics
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from loraloop.core.gen.loraloop.v1 import api_pb2, api_pb2_grpc, common_pb2, events_pb2
from loraloop.core.kafka.admin import create_topics, ensure_loraloop_topics
from loraloop.devtools.kafka_broker import KafkaBroker
from loraloop.service.event_log import EventLog, SpillDirUnusable
from loraloop.service.metrics import ServerMetrics
from loraloop.service.spill_journal import SpilledEvent, SpillJournal
from tests.support import (
    CallerThreads,
    InProcessServer,
    isolated_settings,
    own_broker,
    read_topic,
    wait_until,
)

pytestmark = pytest.mark.kafka
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaBroker]:
    """A broker of this module's own, which its tests stop and start (same port and data)."""
    with own_broker(tmp_path_factory.mktemp("outage-kafka")) as kafka:
        yield kafka


@dataclass
class Call:
    phase: str  # before / down / restarting (the broker is starting) / after (it is back)
    seconds: float
    code: grpc.StatusCode
    request_id: str


class Traffic(CallerThreads):
    """Closed-loop Generate callers on their own threads, tagging calls with a phase."""

    def __init__(self, target: str, callers: int = 3) -> None:
        super().__init__(callers)
        self.phase = "before"
        self.calls: list[Call] = []
        self._channel = grpc.insecure_channel(target)
        self._stub = api_pb2_grpc.LoraLoopStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def _loop(self, caller: int) -> None:
        n = 0
        while not self._stop.is_set():
            phase = self.phase
            request = api_pb2.GenerateRequest(
                user_id=f"outage-{caller}-{n % 5}",
                prompt=f"Tell me something about city number {n}",
                sampling=common_pb2.SamplingParams(max_tokens=4, seed=n),
            )
            start = time.perf_counter()
            try:
                reply = self._stub.Generate(request, timeout=30)
                code, request_id = grpc.StatusCode.OK, reply.request_id
            except grpc.RpcError as err:
                code, request_id = err.code(), ""
            self.calls.append(Call(phase, time.perf_counter() - start, code, request_id))
            n += 1

    def of(self, phase: str) -> list[Call]:
        return [c for c in self.calls if c.phase == phase]


def p99_ms(calls: list[Call]) -> float:
    seconds = sorted(c.seconds for c in calls)
    return 1000 * seconds[min(len(seconds) - 1, int(0.99 * len(seconds)))]


def interaction_ids(bootstrap: str, topic: str) -> Counter[str]:
    return Counter(
        events_pb2.Interaction.FromString(r.value).request_id for r in read_topic(bootstrap, topic)
    )


@pytest.mark.parametrize("how", ["stop", "kill"])
def test_generate_stays_available_and_no_event_is_lost_while_kafka_is_down(
    broker: KafkaBroker, tmp_path: Path, how: str
) -> None:
    """`stop`: SIGTERM, the broker shuts down cleanly; `kill`: SIGKILL, it crashes."""
    settings = isolated_settings(
        broker.bootstrap, tmp_path, max_new_tokens=8, spill_dir=tmp_path / "spill"
    )
    ensure_loraloop_topics(settings)
    server = InProcessServer(settings)
    events = server.running.service.events
    try:
        with Traffic(server.target) as traffic:
            wait_until(lambda: len(traffic.of("before")) >= 30, 60, "traffic before the outage")
            traffic.phase = "down"
            down_at = time.monotonic()
            broker.stop() if how == "stop" else broker.kill()
            stopped_s = time.monotonic() - down_at
            wait_until(lambda: events.spilled > 0, 30, "events spilling to the journal")
            spill_s = time.monotonic() - down_at
            time.sleep(3.0)  # the outage goes on while requests keep coming
            traffic.phase = "restarting"
            broker.start(timeout=120)  # same port, same data directory
            back_at = time.monotonic()
            traffic.phase = "after"
            outage_s = back_at - down_at
            spilled_in_outage = events.spilled
            wait_until(lambda: len(traffic.of("after")) >= 10, 60, "traffic after the outage")
        assert events.flush(timeout=60), f"events not delivered: backlog {events.backlog}"
        drain_s = time.monotonic() - back_at
    finally:
        server.stop()

    calls = traffic.calls
    ok = [c for c in calls if c.code == grpc.StatusCode.OK]
    outage = traffic.of("down") + traffic.of("restarting")
    seen = interaction_ids(settings.kafka_bootstrap, settings.topic_interactions)
    served = [c.request_id for c in ok]
    lost = [rid for rid in served if rid not in seen]
    duplicates = sum(n - 1 for n in seen.values())
    journal = events.journal
    print(
        f"\nKafka outage ({how}): broker down {outage_s:.1f} s ({how} {stopped_s:.1f} s, spilling "
        f"{spill_s:.1f} s after the stop began, 3 s more, restart); "
        f"{len(outage)} Generate calls during the outage, {len(calls)} in all\n"
        f"  availability {100 * len(ok) / len(calls):.1f} % ({len(ok)}/{len(calls)} OK)\n"
        f"  events spilled {events.spilled} ({spilled_in_outage} by the broker's return), "
        f"drained {events.drained}, dropped {events.dropped_by}\n"
        f"  all delivered {drain_s:.1f} s after the broker was back; "
        f"lost {len(lost)}, duplicates {duplicates}\n"
        f"  Generate p99 {p99_ms(traffic.of('before')):.0f} ms before, "
        f"{p99_ms(outage):.0f} ms during the outage ({p99_ms(traffic.of('down')):.0f} ms while "
        f"down, {p99_ms(traffic.of('restarting')):.0f} ms while the broker's JVM started), "
        f"{p99_ms(traffic.of('after')):.0f} ms after; median "
        f"{1000 * statistics.median(c.seconds for c in traffic.of('before')):.0f} / "
        f"{1000 * statistics.median(c.seconds for c in outage):.0f} ms before / during"
    )
    assert len(ok) == len(calls), Counter(c.code.name for c in calls)  # 100 % available
    assert len(outage) >= 5
    assert spilled_in_outage > 0 and events.drained > 0  # the journal really was used
    assert not lost, f"{len(lost)} of {len(served)} interactions never reached Kafka"
    assert set(seen) == set(served)  # and nothing that was not served
    assert events.dropped == 0
    assert journal.pending == 0 and journal.bytes == 0  # drained segments are deleted


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _samples(events: EventLog) -> dict[str, list[Sample]]:
    """The event log's metrics as the server exports them, by family name."""
    metrics = ServerMetrics()
    metrics.watch(engine=None, registry=None, events=events, adapter_slots=0, queue_size=100)
    text = generate_latest(metrics.registry).decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def _dropped_metric(events: EventLog) -> dict[str, float]:
    samples = _samples(events)["loraloop_server_events_dropped"]
    return {s.labels["reason"]: s.value for s in samples if s.name.endswith("_total")}


def _metric(events: EventLog, family: str) -> float:
    (sample,) = [s for s in _samples(events)[family] if not s.name.endswith("_created")]
    return sample.value


def _prefill(spill: Path, topic: str, n: int) -> None:
    """A journal as a previous process leaves it: `n` events for `topic`, 4 keys."""
    previous = SpillJournal(spill, max_bytes=64 << 20)
    for i in range(n):
        previous.append(SpilledEvent(topic, b"user-%d" % (i % 4), b"event-%05d" % i))
    previous.close()


def _check_delivered(bootstrap: str, topic: str, n: int) -> None:
    """Exactly events 0..n-1 on `topic`, each key's in order."""
    records = read_topic(bootstrap, topic)
    assert sorted(r.value for r in records) == [b"event-%05d" % i for i in range(n)]
    for key in {r.key for r in records}:
        ours = [r.value for r in records if r.key == key]  # one partition per key: in order
        assert ours == sorted(ours)


def test_overflow_beyond_the_spill_cap_is_counted_exactly(
    broker: KafkaBroker, tmp_path: Path
) -> None:
    topic = f"spill-cap-{os.getpid()}-{time.monotonic_ns()}"
    create_topics(broker.bootstrap, [topic], partitions=2)
    events = EventLog(
        broker.bootstrap,
        max_queue=10_000,
        spill_dir=tmp_path / "spill",
        spill_max_bytes=4096,  # room for about 60 of these events
    )
    events.start()
    produced = 0

    def publish(n: int) -> None:
        nonlocal produced
        for _ in range(n):
            assert events.publish(topic, f"user-{produced % 3}", b"event-%05d" % produced)
            produced += 1

    try:
        wait_until(events.connected.is_set, 30, "the producer to connect")
        publish(20)
        assert events.flush(30)
        broker.stop()
        publish(20)  # handed to the producer, then stalled: copied into the journal
        wait_until(lambda: events.spilling, 30, "Kafka to count as stalled")
        publish(400)  # far more than 4 KiB of journal
        wait_until(lambda: events.backlog + events.dropped == 420, 30, "every event placed")
        broker.start(timeout=120)
        assert events.flush(60), f"not delivered: backlog {events.backlog}"
    finally:
        events.stop()
    values = [r.value for r in read_topic(broker.bootstrap, topic)]
    delivered = set(values)
    dropped = _dropped_metric(events)
    print(
        f"\nspill cap 4096 B: {produced} events produced, {len(delivered)} delivered "
        f"({events.spilled} spilled, {events.drained} drained), dropped {dropped}, "
        f"{len(values) - len(delivered)} duplicates"
    )
    assert dropped["spill_full"] > 0 and events.drained > 0
    assert dropped["spill_full"] == produced - len(delivered)
    assert sum(dropped.values()) == dropped["spill_full"]  # no other losses
    assert delivered <= {b"event-%05d" % i for i in range(produced)}


def test_a_killed_servers_journal_is_delivered_by_the_next_start(
    broker: KafkaBroker, tmp_path: Path
) -> None:
    """A real crash: a child process spills events (its Kafka is unreachable) and is
    SIGKILLed; a new event log on the same directory delivers them, in order per key,
    and counts the tail we tear off on top as lost."""
    topic = f"spill-restart-{os.getpid()}-{time.monotonic_ns()}"
    create_topics(broker.bootstrap, [topic], partitions=2)
    spill = tmp_path / "spill"
    code = textwrap.dedent(
        f"""
        import os, signal, time
        from loraloop.service.event_log import EventLog
        events = EventLog("127.0.0.1:{_closed_port()}", 1000, spill_dir={str(spill)!r},
                          spill_max_bytes=1 << 20, stall_seconds=0.2)
        events.start()
        for i in range(300):
            events.publish({topic!r}, "user-%d" % (i % 4), b"event-%05d" % i)
        deadline = time.monotonic() + 30
        while events.journal.pending < 300 and time.monotonic() < deadline:
            time.sleep(0.01)
        # SIGKILL keeps the page cache (the records are in the files, fsynced or not): this
        # is a process crash, not a power loss, so no wait for an fsync is needed here.
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    child = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=os.environ.copy(), timeout=120
    )
    assert child.returncode == -signal.SIGKILL
    (segment,) = sorted((spill / "slot-0").glob("*.spill"))
    with open(segment, "ab") as fh:
        fh.write(b"\x40\x00\x00\x00torn")  # the start of a record a crash cut short

    started = time.monotonic()
    events = EventLog(broker.bootstrap, 1000, spill_dir=spill, spill_max_bytes=1 << 20)
    assert not events.journal.loaded.is_set()  # the CRC scan is not the constructor's
    events.start()
    try:
        assert events.journal.loaded.wait(30)  # it is the sender thread's
        assert events.journal.recovered == 300
        assert events.flush(60), f"not delivered: backlog {events.backlog}"
        took = time.monotonic() - started
    finally:
        events.stop()
    records = read_topic(broker.bootstrap, topic)
    print(
        f"\nrestart: 300 events left by a SIGKILLed process delivered {took:.2f} s after "
        f"start; torn tails {events.journal.torn}"
    )
    assert sorted(r.value for r in records) == [b"event-%05d" % i for i in range(300)]
    for key in {r.key for r in records}:
        ours = [r.value for r in records if r.key == key]  # one partition per key: in order
        assert ours == sorted(ours)
    assert events.dropped_by["journal_torn"] == 1 and events.dropped == 1
    assert list((spill / "slot-0").glob("*.spill")) == []


def test_the_sender_thread_survives_journal_file_errors_and_unexpected_ones(
    broker: KafkaBroker, tmp_path: Path
) -> None:
    """A previous process left 300 events; every cursor write of this one fails (a
    directory is in the way: EISDIR, as a broken disk would fail it), and the sender's loop
    meets an unexpected exception. The thread lives on, counts both, and every event is
    delivered once."""
    topic = f"sender-errors-{os.getpid()}-{time.monotonic_ns()}"
    create_topics(broker.bootstrap, [topic], partitions=2)
    spill = tmp_path / "spill"
    _prefill(spill, topic, 300)
    (spill / "slot-0" / "cursor.tmp").mkdir()
    events = EventLog(
        broker.bootstrap, 1000, spill_dir=spill, spill_max_bytes=1 << 20, chunk_records=20
    )
    events.start()
    try:
        assert events.flush(60), f"not delivered: backlog {events.backlog}"
        io_errors = events.journal.errors
        real_sync, broken = events.journal.sync, threading.Event()

        def sync() -> None:
            if not broken.is_set():
                broken.set()
                raise RuntimeError("injected into the sender's loop")
            real_sync()

        events.journal.sync = sync  # type: ignore[method-assign]
        wait_until(broken.is_set, 10, "the sender to meet the error")
        for i in range(300, 350):
            assert events.publish(topic, f"user-{i % 4}", b"event-%05d" % i)
        assert events.flush(30), f"not delivered: backlog {events.backlog}"
        alive = _metric(events, "loraloop_server_event_sender_alive")
        sender_errors = _metric(events, "loraloop_server_events_sender_errors")
        exported_io = _metric(events, "loraloop_server_event_spill_io_errors")
    finally:
        events.stop()
    print(
        f"\nsender under errors: {io_errors} failed cursor writes, {sender_errors:.0f} "
        f"unexpected error(s) survived; {events.delivered} events delivered "
        f"({events.drained} from the journal), dropped {events.dropped}"
    )
    assert io_errors >= 300 // 20 - 1 and exported_io == io_errors  # one per commit
    assert sender_errors == 1 and alive == 1
    assert events.dropped == 0 and events.drained == 300
    _check_delivered(broker.bootstrap, topic, 350)


def test_a_topic_kafka_does_not_have_is_given_up_on_without_holding_up_the_journal(
    broker: KafkaBroker, tmp_path: Path
) -> None:
    """Events for a topic the broker neither has nor creates (its name collides with an
    existing one's: `.` and `_` are the same to Kafka) among events for a good topic. The
    first one sends everything behind it to the journal; after missing_topic_seconds and
    three tries its events are dropped and counted as no_topic, the others are delivered
    in order, and later events for it are dropped at once."""
    tag = f"{os.getpid()}-{time.monotonic_ns()}"
    good, missing = f"good-{tag}", f"clash.{tag}"
    create_topics(broker.bootstrap, [good, f"clash_{tag}"], partitions=2)
    events = EventLog(
        broker.bootstrap,
        1000,
        spill_dir=tmp_path / "spill",
        spill_max_bytes=1 << 20,
        missing_topic_seconds=2.0,
    )
    events.start()
    try:
        wait_until(events.connected.is_set, 30, "the producer to connect")
        started = time.monotonic()
        for i in range(100):
            if i % 20 == 5:
                assert events.publish(missing, f"user-{i % 4}", b"lost-%05d" % i)
            assert events.publish(good, f"user-{i % 4}", b"event-%05d" % i)
        assert events.flush(60), f"not delivered: backlog {events.backlog}"
        took = time.monotonic() - started
        first = dict(events.dropped_by)
        for i in range(100, 110):
            assert events.publish(missing, f"user-{i % 4}", b"lost-%05d" % i)
            assert events.publish(good, f"user-{i % 4}", b"event-%05d" % i)
        assert events.flush(30), f"not delivered: backlog {events.backlog}"
        exported = _dropped_metric(events)
    finally:
        events.stop()
    print(
        f"\nmissing topic: 5 of its events given up on among 100 good ones, all settled "
        f"{took:.1f} s after the first (missing_topic_seconds 2), {events.spilled} spilled; "
        f"then 10 more dropped at once; dropped {exported}"
    )
    assert first["no_topic"] == 5 and sum(first.values()) == 5
    assert exported["no_topic"] == 15 and sum(exported.values()) == 15
    assert events.spilled > 0  # the journal was in the way, and it was drained
    _check_delivered(broker.bootstrap, good, 110)


def test_stop_delivers_the_journal_while_kafka_answers_and_counts_what_it_leaves(
    broker: KafkaBroker, tmp_path: Path
) -> None:
    """SIGTERM's path: stop() right after the producer connects to a reachable Kafka goes
    on until the journal a previous process left is delivered; stop() while Kafka is
    unreachable returns, leaving the events in the journal, counted, for the next start."""
    topic = f"stop-drain-{os.getpid()}-{time.monotonic_ns()}"
    create_topics(broker.bootstrap, [topic], partitions=2)
    spill = tmp_path / "spill"
    _prefill(spill, topic, 10_000)
    events = EventLog(broker.bootstrap, 1000, spill_dir=spill, spill_max_bytes=64 << 20)
    events.start()
    wait_until(events.connected.is_set, 30, "the producer to connect")
    pending = events.journal.pending
    started = time.monotonic()
    events.stop(timeout=60)
    drained_s = time.monotonic() - started
    assert events.left_at_stop == 0 and events.drained == 10_000
    assert list((spill / "slot-0").glob("*.spill")) == []
    _check_delivered(broker.bootstrap, topic, 10_000)

    later = f"stop-left-{os.getpid()}-{time.monotonic_ns()}"
    create_topics(broker.bootstrap, [later], partitions=2)
    offline = EventLog(
        f"127.0.0.1:{_closed_port()}",
        1000,
        spill_dir=spill,
        spill_max_bytes=1 << 20,
        stall_seconds=0.2,
    )
    offline.start()
    for i in range(50):
        assert offline.publish(later, f"user-{i % 4}", b"event-%05d" % i)
    wait_until(lambda: offline.journal.pending == 50, 30, "the events to be journaled")
    started = time.monotonic()
    offline.stop(timeout=30)
    offline_s = time.monotonic() - started
    assert offline.left_at_stop == 50 and offline.dropped == 0
    successor = EventLog(broker.bootstrap, 1000, spill_dir=spill, spill_max_bytes=1 << 20)
    successor.start()
    try:
        assert successor.flush(60), f"not delivered: backlog {successor.backlog}"
    finally:
        successor.stop()
    print(
        f"\nstop: {pending} of 10000 journaled events still to go when stop() began, all "
        f"delivered by it in {drained_s:.2f} s; with Kafka unreachable stop() took "
        f"{offline_s:.2f} s and left {offline.left_at_stop} events, which the next start "
        f"delivered ({successor.journal.recovered} recovered)"
    )
    assert successor.journal.recovered == 50
    _check_delivered(broker.bootstrap, later, 50)


def test_a_tombstone_keeps_its_timestamp_through_the_journal(
    broker: KafkaBroker, tmp_path: Path
) -> None:
    """DeleteUser's tombstones carry the deletion time: one published while Kafka is
    unreachable, journaled and delivered later by the next start, has that time as its
    Kafka timestamp, not the drain time (the learner drops events older than it)."""
    topic = f"tombstone-time-{os.getpid()}-{time.monotonic_ns()}"
    create_topics(broker.bootstrap, [topic], partitions=2)
    spill = tmp_path / "spill"
    offline = EventLog(f"127.0.0.1:{_closed_port()}", 100, spill_dir=spill, spill_max_bytes=1 << 20)
    offline.start()
    deleted_ms = int(time.time() * 1000) - 3_600_000  # deleted an hour "ago"
    assert offline.publish(topic, "gone-user", None, timestamp_ms=deleted_ms)
    assert offline.publish(topic, "other-user", b"unstamped")
    wait_until(lambda: offline.journal.pending == 2, 30, "the events to be journaled")
    offline.stop(timeout=1)
    assert offline.left_at_stop == 2
    successor = EventLog(broker.bootstrap, 100, spill_dir=spill, spill_max_bytes=1 << 20)
    successor.start()
    try:
        assert successor.flush(60), f"not delivered: backlog {successor.backlog}"
    finally:
        successor.stop()
    drained_ms = int(time.time() * 1000)
    records = {r.key: r for r in read_topic(broker.bootstrap, topic)}
    tombstone, other = records[b"gone-user"], records[b"other-user"]
    print(
        f"\ntombstone drained {(drained_ms - tombstone.timestamp) / 1000:.0f} s after its "
        f"deletion time, stamped {tombstone.timestamp} (published as {deleted_ms}); an "
        f"unstamped event got the send time {other.timestamp}"
    )
    assert tombstone.value is None and tombstone.timestamp == deleted_ms
    assert other.timestamp > deleted_ms + 3_000_000  # Kafka's stamp: the drain time


def test_an_unusable_spill_dir_fails_at_construction(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(SpillDirUnusable, match="LORALOOP_SPILL_DIR"):
        EventLog("127.0.0.1:1", 10, spill_dir=blocker / "spill", spill_max_bytes=1 << 20)


def test_events_go_straight_to_kafka_while_the_journal_load_is_retried(
    broker: KafkaBroker, tmp_path: Path
) -> None:
    """The journal's first scans fail (a flaky disk): the sender does not wait for it
    before its loop; events go straight to the producer and are all delivered."""
    topic = f"load-retry-{os.getpid()}-{time.monotonic_ns()}"
    create_topics(broker.bootstrap, [topic], partitions=2)
    events = EventLog(broker.bootstrap, 1000, spill_dir=tmp_path / "spill", spill_max_bytes=1 << 20)
    real_load, failures = events.journal.load, [0]

    def load() -> None:
        if failures[0] < 3:
            failures[0] += 1
            raise OSError(errno.EIO, "injected: cannot list the spill directory")
        real_load()

    events.journal.load = load  # type: ignore[method-assign]
    events.start()
    try:
        wait_until(events.connected.is_set, 30, "the producer to connect")
        for i in range(50):
            assert events.publish(topic, f"user-{i % 4}", b"event-%05d" % i)
        assert events.flush(30), f"not delivered: backlog {events.backlog}"
        loaded_during = events.journal.loaded.is_set()
    finally:
        events.stop()
    print(
        f"\njournal load failed {failures[0]} times: {events.delivered} events delivered, "
        f"dropped {events.dropped}, journal loaded by then: {loaded_during}"
    )
    assert failures[0] >= 1 and events.sender_errors >= 1
    assert events.dropped == 0 and events.spilled == 0
    _check_delivered(broker.bootstrap, topic, 50)


@pytest.mark.parametrize("timeout", [0.0, 2.0])
def test_stop_ends_the_sender_within_one_deadline_even_with_a_full_queue(
    tmp_path: Path, timeout: float
) -> None:
    """Kafka unreachable, the queue full when stop() begins (its marker may not fit, and
    with a zero timeout it is not waited for): the sender still ends, the events journaled."""
    events = EventLog(
        f"127.0.0.1:{_closed_port()}",
        20,
        spill_dir=tmp_path / "spill",
        spill_max_bytes=1 << 20,
        stall_seconds=0.2,
    )
    events.start()
    accepted = sum(events.publish("t", f"user-{i % 4}", b"e%d" % i) for i in range(200))
    started = time.monotonic()
    events.stop(timeout=timeout)
    took = time.monotonic() - started
    print(
        f"\nstop(timeout={timeout}) with a full queue: returned in {took:.2f} s, sender "
        f"alive {events.sender_alive}, {events.left_at_stop} of {accepted} accepted events "
        f"left in the journal, dropped {events.dropped_by['queue_full']} as queue_full"
    )
    assert not events.sender_alive
    assert events.left_at_stop == accepted and events.dropped == 200 - accepted
