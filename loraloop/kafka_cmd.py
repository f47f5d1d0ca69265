"""`loraloop kafka`: run a local single-node Kafka broker (KRaft) in the foreground."""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from types import FrameType

from loraloop.core.kafka.admin import ensure_loraloop_topics
from loraloop.core.settings import Settings
from loraloop.devtools.kafka_broker import KAFKA_VERSION, KafkaBroker


def run_kafka(port: int = 9092, data_dir: str | None = None) -> int:
    """Start a broker on 127.0.0.1:`port`, create loraloop's topics, block until Ctrl-C/SIGTERM.

    `data_dir=None` keeps the data in a temporary directory that is deleted on exit; pass a
    directory to keep topics and messages across runs. Returns the process exit code.
    """
    settings = Settings()
    broker = KafkaBroker(
        Path(data_dir) if data_dir else None, port=port, partitions=settings.topic_partitions
    )
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        print(f"Starting Apache Kafka {KAFKA_VERSION} (KRaft, single node) ...", flush=True)
        bootstrap = broker.start(timeout=120)
        created = ensure_loraloop_topics(settings, bootstrap=bootstrap)
        topics = [settings.topic_interactions, settings.topic_feedback]
        topics.append(f"{settings.topic_adapter_updates} (compacted)")
        where = f"{broker.data_dir}" + ("" if data_dir else " (temporary, deleted on exit)")
        print(f"Kafka ready at {bootstrap}", flush=True)
        print(f"  data: {where}\n  log:  {broker.log_path}", flush=True)
        print(
            f"  topics ({settings.topic_partitions} partitions each): {', '.join(topics)}"
            + (f"; created now: {', '.join(created)}" if created else ""),
            flush=True,
        )
        print(f"  export LORALOOP_KAFKA_BOOTSTRAP={bootstrap}", flush=True)
        print("Press Ctrl-C to stop.", flush=True)
        while not stop.wait(1.0):
            if not broker.running:
                print(f"Kafka broker exited unexpectedly.\n{broker.log_tail()}", file=sys.stderr)
                return 1
        print("Stopping Kafka ...", flush=True)
        return 0
    except Exception as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        broker.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
