"""The production topology on loopback, everything real: 2 server replicas behind one
round-robin gRPC channel, 2 `loraloop learn` processes in one consumer group over 4
partitions, adapters in S3 (SeaweedFS), topics on a 3-broker Kafka cluster (replication
factor 3, min.insync.replicas 2). One learner is SIGKILLed mid-stream.

Counted from the topics and the store's records, not from logs: every feedback event is
applied exactly once (each version's `learnt_from` audit, the samples adapter-updates
announces); both replicas end on every user's newest version; and no user, whose calls
alternate between replicas, is ever served an older version than before (the client's
min_adapter_version floor). Figures are printed (`pytest -s`).
"""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path

import grpc
import pytest

from loraloop.client import LoraLoopClient
from loraloop.core.adapters.s3_store import S3AdapterStore
from loraloop.core.gen.loraloop.v1 import events_pb2
from loraloop.core.kafka.admin import ensure_loraloop_topics
from loraloop.devtools.kafka_broker import KafkaCluster
from tests.faults.crash_support import announced_versions, audit, committed_to_end
from tests.support import (
    CallerThreads,
    InProcessServer,
    Process,
    isolated_settings,
    read_topic,
    wait_until,
)

pytestmark = pytest.mark.kafka
USERS = tuple(f"user{i}" for i in range(8))


class Load(CallerThreads):
    """Closed-loop callers over one round-robin channel to both replicas: Generate, then
    thumbs feedback; every reply's adapter version is kept in call order per user."""

    def __init__(self, target: str, callers: int = 3) -> None:
        super().__init__(callers)
        self.callers = callers
        self.client = LoraLoopClient(target, timeout=30, load_balancing="round_robin")
        # feedback on a channel of its own: on one channel, Generate/Feedback pairs would
        # take turns with the round robin and every Generate land on the same replica
        self.rater = LoraLoopClient(target, timeout=30, load_balancing="round_robin")
        self.phase = "before"
        self.failed = 0
        self.feedback: dict[str, list[str]] = defaultdict(list)  # user -> accepted ids
        self.served: dict[str, list[int]] = defaultdict(list)  # user -> versions in order
        self.calls: Counter[str] = Counter()
        self._lock = threading.Lock()

    def close(self) -> None:
        self.client.close()
        self.rater.close()

    def _loop(self, caller: int) -> None:
        mine = USERS[caller :: self.callers]  # a user's calls come one at a time, in order
        n = 0
        while not self._stop.is_set():
            user = mine[n % len(mine)]
            n += 1
            try:
                reply = self.client.generate(user, f"Tell me about {n}", max_tokens=4, seed=n)
                accepted = self.rater.feedback(reply.request_id, user, thumbs=1 - 2 * (n % 2))
            except grpc.RpcError:
                with self._lock:
                    self.failed += 1
                continue
            with self._lock:
                self.calls[self.phase] += 1
                self.served[user].append(reply.adapter_version)
                if accepted:
                    self.feedback[user].append(reply.request_id)


def generate_calls(server: InProcessServer) -> float:
    metrics = server.running.metrics
    assert metrics is not None
    total = 0.0
    for family in metrics.registry.collect():
        for sample in family.samples:
            if sample.name == "loraloop_server_requests_total" and (
                sample.labels.get("method") == "Generate"
            ):
                total += sample.value
    return total


def swap_seconds(server: InProcessServer) -> tuple[float, float]:
    """(count, mean) of the replica's hot-swap latency histogram."""
    metrics = server.running.metrics
    assert metrics is not None
    count = metrics.registry.get_sample_value("loraloop_server_adapter_swap_seconds_count") or 0.0
    total = metrics.registry.get_sample_value("loraloop_server_adapter_swap_seconds_sum") or 0.0
    return count, total / count if count else 0.0


def test_two_servers_two_learners_s3_and_a_learner_killed(
    kafka_cluster: KafkaCluster, s3_env: dict[str, str], tmp_path: Path
) -> None:
    tag = uuid.uuid4().hex[:8]
    settings = isolated_settings(
        kafka_cluster.bootstrap,
        tmp_path,
        kafka_replication_factor=3,
        kafka_min_insync_replicas=2,
        topic_partitions=4,
        adapter_store_uri=f"s3://adapters/replicas-{tag}",
        adapter_keep_versions=0,  # the audit reads every version
        learner_session_timeout_seconds=6,
        max_new_tokens=4,
    )
    ensure_loraloop_topics(settings)

    def on_host(name: str) -> object:
        return settings.model_copy(update={"adapter_cache_dir": tmp_path / f"copies-{name}"})

    started = time.monotonic()
    servers = [InProcessServer(on_host(f"server{i}")) for i in (1, 2)]  # type: ignore[arg-type]
    learners = [
        Process(["learn"], on_host(f"learner{i}"), ready=r"learner consuming", timeout=180)  # type: ignore[arg-type]
        for i in (1, 2)
    ]
    store = S3AdapterStore(settings.adapter_store_uri, tmp_path / "copies-test")
    target = "ipv4:" + ",".join(s.target for s in servers)
    try:
        with Load(target) as load:
            wait_until(
                lambda: (
                    sum(len(store.versions(u)) > 0 for u in USERS) >= 6
                    and load.calls["before"] >= 60
                ),
                180,
                f"versions from both learners\n{learners[0].output[-2000:]}\n"
                f"{learners[1].output[-2000:]}",
            )
            load.phase = "after"
            before_kill = {u: len(store.versions(u)) for u in USERS}
            killed_at = time.monotonic()
            learners[0].kill()  # SIGKILL: no commit, no flush, no leave-group
            wait_until(lambda: load.calls["after"] >= 120, 240, "traffic after the kill")
        for server in servers:
            events = server.running.service.events
            assert events.flush(timeout=60), f"events not delivered: backlog {events.backlog}"
        produced = dict(load.feedback)
        accepted = sum(len(ids) for ids in produced.values())
        wait_until(
            lambda: audit(store, produced).applied >= accepted and committed_to_end(settings),
            240,
            f"the surviving learner to learn every sample\n{learners[1].output[-3000:]}",
        )
        learnt_s = time.monotonic() - killed_at
        newest = {u: store.versions(u)[-1] for u in USERS if store.versions(u)}
        converged_at = time.monotonic()
        for server in servers:
            registry = server.running.service.registry
            wait_until(
                lambda r=registry: all(
                    (r.resolve(u) or store.ref(u, 1)).version == v for u, v in newest.items()
                ),
                30,
                "both replicas on every user's newest version",
            )
        converged_s = time.monotonic() - converged_at
        share = [generate_calls(s) for s in servers]
        swaps = [swap_seconds(s) for s in servers]
        catch_ups = [s.running.service.registry.floor_catch_ups for s in servers]
    finally:
        rc = learners[1].stop()
        learners[0].kill()
        for server in servers:
            server.stop()
    assert rc == 0, learners[1].output

    interactions = Counter(
        events_pb2.Interaction.FromString(r.value).request_id
        for r in read_topic(settings.kafka_bootstrap, settings.topic_interactions)
    )
    feedback = Counter(
        events_pb2.FeedbackEvent.FromString(r.value).request_id
        for r in read_topic(settings.kafka_bootstrap, settings.topic_feedback)
    )
    samples = set(interactions) & set(feedback)
    found = audit(store, {u: [r for r in ids if r in samples] for u, ids in produced.items()})
    announced: dict[tuple[str, int], int] = {}
    for record in read_topic(settings.kafka_bootstrap, settings.topic_adapter_updates):
        if record.value:
            update = events_pb2.AdapterUpdated.FromString(record.value)
            key = (update.user_id, update.version)
            # a version announced again (the survivor replaying what the killed learner
            # wrote) carries no sample count: keep the first announcement's
            announced[key] = max(announced.get(key, 0), update.metrics.samples)
    older = {
        u: vs for u, vs in load.served.items() if any(b < a for a, b in itertools.pairwise(vs))
    }
    after_kill = {u: len(store.versions(u)) - before_kill[u] for u in USERS}
    print(
        f"\n2 servers, 2 learners (1 SIGKILLed), S3 store, 3 brokers, 4 partitions; "
        f"{time.monotonic() - started:.0f} s in all\n"
        f"  calls {sum(load.calls.values())} ({load.calls['after']} after the kill), failed "
        f"{load.failed}; Generate per replica {share[0]:.0f} / {share[1]:.0f}; floor "
        f"look-ups (a replica behind the client) {catch_ups[0]} / {catch_ups[1]}\n"
        f"  feedback accepted {accepted}; on the topics: {len(samples)} samples, "
        f"interaction duplicates {sum(n - 1 for n in interactions.values())}; applied "
        f"{found.applied} in {found.versions} versions, duplicates {found.duplicates}, lost "
        f"{found.lost}; announced {len(announced)} versions with {sum(announced.values())} "
        f"samples; every sample learnt {learnt_s:.1f} s after the kill\n"
        f"  versions written after the kill per user: {after_kill}\n"
        f"  hot swaps per replica {swaps[0][0]:.0f} / {swaps[1][0]:.0f}, mean "
        f"{1000 * swaps[0][1]:.0f} / {1000 * swaps[1][1]:.0f} ms; both replicas on every "
        f"newest version {converged_s:.2f} s after the last sample was learnt; users served "
        f"an older version than before: {len(older)}"
    )
    assert load.failed == 0
    assert min(share) >= 0.3 * sum(share), share  # the calls went to both replicas
    assert samples == {r for ids in produced.values() for r in ids}
    assert found.lost == 0 and found.duplicates == 0 and found.unknown == 0
    assert found.applied == len(samples)
    # each sample in exactly one version: the store's records say so (above); the counts
    # on the topic miss only versions whose first announcement the kill cut off
    assert sum(announced.values()) <= len(samples)
    assert announced_versions(settings) == newest
    assert all(n > 0 for n in after_kill.values()), after_kill  # the killed one's users too
    assert not older, older
    assert all(count > 0 for count, _ in swaps)
