"""What a load run does: arrival model, size, stop conditions, request shape."""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Mode = Literal["open", "closed"]


def check_loopback(target: str) -> str:
    """Return `target` if it names a loopback address; raise ValueError otherwise.

    A load generator aimed at the wrong host is a denial-of-service tool: this one only
    drives servers on this machine.
    """
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"target {target!r} must be HOST:PORT, e.g. 127.0.0.1:50051")
    host = host.strip("[]")
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, int(port))}
    except socket.gaierror as exc:
        raise ValueError(f"target host {host!r} does not resolve: {exc}") from None
    outside = sorted(a for a in addresses if not ipaddress.ip_address(a).is_loopback)
    if outside:
        raise ValueError(
            f"target {target!r} resolves to {', '.join(outside)}: load tests only drive a "
            "server on this machine; use 127.0.0.1:PORT or localhost:PORT"
        )
    return target


@dataclass
class Burst:
    """From `at` seconds for `seconds` seconds the open-loop arrival rate is multiplied."""

    at: float
    seconds: float
    factor: float


@dataclass
class LoadConfig:
    """One load run. Open loop: Poisson arrivals at `rate` sessions/s (each session is a
    Generate and, with `feedback`, the user's Feedback). Closed loop: `concurrency` workers,
    each starting its next session when the previous one ends (after `think` seconds)."""

    target: str
    mode: Mode = "closed"
    rate: float = 2.0
    concurrency: int = 4
    users: int = 16
    user_prefix: str = "load"
    seed: int = 0
    duration: float | None = 30.0
    requests: int | None = None
    ramp: float = 0.0
    hard_stop: float = 30.0
    max_in_flight: int = 512
    think: float = 0.0
    max_tokens: int = 32
    temperature: float = 1.0
    stream_share: float = 0.5
    feedback: bool = True
    timeout: float = 60.0
    bursts: list[Burst] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_loopback(self.target)
        if self.mode not in ("open", "closed"):
            raise ValueError(f"mode must be 'open' or 'closed', not {self.mode!r}")
        if self.duration is None and self.requests is None:
            raise ValueError("give a duration (seconds) or a request count, or both")
        if self.mode == "open" and self.rate <= 0:
            raise ValueError("open loop needs rate > 0 (sessions per second)")
        if self.mode == "closed" and self.concurrency < 1:
            raise ValueError("closed loop needs concurrency >= 1")
        if self.users < 1:
            raise ValueError("users must be >= 1")
        if not 0.0 <= self.stream_share <= 1.0:
            raise ValueError("stream_share is a fraction in [0, 1]")

    def rate_at(self, t: float) -> float:
        """Open-loop arrival rate at `t` seconds: linear ramp, then bursts on top."""
        rate = self.rate * (min(1.0, t / self.ramp) if self.ramp > 0 else 1.0)
        for burst in self.bursts:
            if burst.at <= t < burst.at + burst.seconds:
                rate *= burst.factor
        return rate

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
