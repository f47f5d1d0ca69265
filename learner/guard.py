"""The rollback guard: undo a user's learning when it starts to hurt.

Two rules, checked before each update of a user:

- KL: the batch's mean per-token KL of the user's current adapter from the base model is
  above `kl_limit`: the adapter has drifted too far from fluent text (on the tiny model,
  even the best-tuned update let strict template validity fall from 0.95 to 0.76 within
  300 interactions while the reward stayed near 0.9, so reward alone does not show it).
- Reward: the mean of the user's last `window` rewards fell more than `drop` below the
  best such mean seen so far.

Either way the user goes back to the version that held the best window (the base model if
none did yet), published as a *new* version so versions only ever go up, with a fresh
optimiser state.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

from loraloop.core.settings import Settings, default_of


@dataclass
class GuardConfig:
    """The guard's thresholds; defaults from `Settings` (kl_limit, guard_window, guard_drop)."""

    kl_limit: float = default_of("kl_limit")
    window: int = default_of("guard_window")
    drop: float = default_of("guard_drop")

    @classmethod
    def from_settings(cls, settings: Settings) -> GuardConfig:
        return cls(settings.kl_limit, settings.guard_window, settings.guard_drop)


@dataclass
class GuardState:
    recent: list[float] = field(default_factory=list)
    best_mean: float | None = None
    best_version: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "recent": self.recent,
            "best_mean": self.best_mean,
            "best_version": self.best_version,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> GuardState:
        data = data or {}
        return cls(
            list(data.get("recent", [])), data.get("best_mean"), int(data.get("best_version", 0))
        )


def check(state: GuardState, kl: float, cfg: GuardConfig) -> str | None:
    """Why the user must be rolled back now ('kl' or 'reward'), or None."""
    if kl > cfg.kl_limit:
        return "kl"
    best = state.best_mean
    full = best is not None and len(state.recent) >= cfg.window
    if full and best is not None and statistics.mean(state.recent[-cfg.window :]) < best - cfg.drop:
        return "reward"
    return None


def record(state: GuardState, rewards: list[float], version: int, cfg: GuardConfig) -> None:
    """Add the rewards earned by `version`; remember it when its window is the best."""
    state.recent = (state.recent + rewards)[-cfg.window :]
    if len(state.recent) >= cfg.window:
        mean = statistics.mean(state.recent)
        if state.best_mean is None or mean > state.best_mean:
            state.best_mean, state.best_version = mean, version
