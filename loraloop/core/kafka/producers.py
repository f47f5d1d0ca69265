"""Closing kafka-python producers that still hold records."""

from __future__ import annotations

from kafka import KafkaProducer


def force_close(producer: KafkaProducer) -> None:
    """Close at once, abandoning what the producer still holds.

    kafka-python 3.0's `close(timeout=...)` first flushes, and that flush raises
    KafkaTimeoutError while records are in flight, before close gets to force-closing its
    I/O thread; that thread would then keep running (and could deliver the abandoned records
    later, after their resends). So force the sender closed ourselves when close raises.
    """
    try:
        producer.close(timeout=0)
    except Exception:
        sender = getattr(producer, "_sender", None)
        if sender is not None:
            sender.force_close()
