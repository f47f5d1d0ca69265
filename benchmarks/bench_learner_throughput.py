"""One learner's throughput end to end: Kafka in, joined samples, batched steps, versions
written to the store, announced, offsets committed. User updates (versions) per second and
samples per second, with the local store and with the S3 store (SeaweedFS on loopback),
interleaved repeats, medians.

Every round produces, for each of `--users` users, `--per-user` interactions with thumbs
feedback (prompt 32 tokens, reply 32 tokens of the tiny model) to a real broker; the
learner (in this process, `Learner.process` as `loraloop learn` runs it) consumes until it
has learnt every sample. Clock: first poll -> last sample learnt and committed.

    python benchmarks/bench_learner_throughput.py [--users 64 --per-user 4 --repeats 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

from kafka import KafkaProducer
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loraloop.core.gen.loraloop.v1 import common_pb2, events_pb2
from loraloop.core.kafka.admin import ensure_loraloop_topics
from loraloop.core.settings import Settings
from loraloop.devtools.kafka_broker import KafkaBroker
from loraloop.devtools.s3_server import SeaweedS3
from loraloop.devtools.tiny_model import ensure_tiny_model
from loraloop.learner.loop import Learner


def produce(settings: Settings, users: int, per_user: int) -> int:
    """Interactions with feedback for every user; returns the number of samples."""
    producer = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap, linger_ms=5)
    now = int(time.time() * 1000)
    n = 0
    for k in range(per_user):
        for u in range(users):
            user, rid = f"user{u:05d}", f"{uuid.uuid4().hex}"
            interaction = events_pb2.Interaction(
                request_id=rid,
                user_id=user,
                timestamp_ms=now,
                prompt_token_ids=[1, *(40 + (u + i) % 200 for i in range(31))],
                response_token_ids=[50 + (k + i) % 200 for i in range(31)] + [2],
                behaviour_logprobs=[-2.0] * 32,
            )
            feedback = events_pb2.FeedbackEvent(
                request_id=rid,
                user_id=user,
                timestamp_ms=now,
                signals=common_pb2.FeedbackSignals(thumbs=1 if (u + k) % 2 else -1),
            )
            key = user.encode()
            producer.send(
                settings.topic_interactions, key=key, value=interaction.SerializeToString()
            )
            producer.send(settings.topic_feedback, key=key, value=feedback.SerializeToString())
            n += 1
    producer.flush()
    producer.close()
    return n


def run_once(
    base: Settings, store: str, tmp: Path, users: int, per_user: int
) -> tuple[float, int, int]:
    """(seconds, samples, versions) of one learner run over fresh topics."""
    tag = uuid.uuid4().hex[:8]
    settings = base.model_copy(
        update={
            "topic_interactions": f"interactions-{tag}",
            "topic_feedback": f"feedback-{tag}",
            "topic_adapter_updates": f"adapter-updates-{tag}",
            "topic_bandit_state": f"bandit-state-{tag}",
            "topic_dead_letter": f"dead-letter-{tag}",
            "group_id": f"learner-{tag}",
            "adapter_store": tmp / f"store-{tag}",
            "adapter_store_uri": f"s3://adapters/{tag}" if store == "s3" else "",
            "adapter_cache_dir": tmp / f"copies-{tag}",
        }
    )
    ensure_loraloop_topics(settings)
    samples = produce(settings, users, per_user)
    learner = Learner(settings)
    learner.connect()
    assert learner.consumer is not None
    try:
        started = None
        while learner.stats["samples"] < samples:
            polled = learner.consumer.poll(timeout_ms=200, max_records=2000)
            records = [r for batch in polled.values() for r in batch]
            if records and started is None:
                started = time.perf_counter()
            learner.process(records)
        seconds = time.perf_counter() - (started or time.perf_counter())
        return seconds, int(learner.stats["samples"]), int(learner.stats["versions"])
    finally:
        learner.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=64)
    parser.add_argument("--per-user", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    model = str(ensure_tiny_model(progress=False))
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        with (
            KafkaBroker(tmp / "kafka") as broker,
            SeaweedS3(tmp / "s3", buckets=("adapters",)) as s3,
        ):
            os.environ.update(s3.env())
            base = Settings(model=model, kafka_bootstrap=broker.bootstrap, topic_partitions=4)
            results: dict[str, list[tuple[float, int, int]]] = {"file": [], "s3": []}
            runs = [store for _ in range(args.repeats) for store in ("file", "s3")]
            for store in tqdm(runs, desc="learner runs", unit="run"):
                results[store].append(run_once(base, store, tmp, args.users, args.per_user))
    print(
        f"\none learner (tiny model, this machine's CPU), {args.users} users x {args.per_user} "
        f"samples a round, medians of {args.repeats}:"
    )
    for store, rows in results.items():
        seconds = statistics.median(r[0] for r in rows)
        samples, versions = rows[0][1], statistics.median(r[2] for r in rows)
        print(
            f"  {store:>4} store: {samples / seconds:7.1f} samples/s, {versions / seconds:7.1f} "
            f"user updates/s ({versions:.0f} versions in {seconds:.1f} s)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
