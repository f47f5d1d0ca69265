"""Arms: response strategies an operator defines in a TOML file.

    [[arm]]
    name = "brief"
    system_prompt = "You are a concise assistant."
    temperature = 0.8      # optional decoding overrides
    top_p = 0.95

An arm's system prompt is put in front of the request's messages (a plain prompt is one
user message); its decoding settings replace the server's defaults. An arm is applied
whole or not at all: the *levers* of an arm set are the system prompt, temperature and
top_p as far as some arm sets them, and a request that sets one of them itself (brings a
system message, sets sampling.temperature or sampling.top_p) gets no arm. Its interaction
is logged with an empty arm and credited to none, so every reward an arm is credited with
was earned by that arm exactly as defined (the no-op arm "default" included: with a
system-prompt arm in the set, "default" means "no system prompt").
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from loraloop.core.bandits.linear import RESERVED_ARM_NAMES


@dataclass(frozen=True)
class Arm:
    name: str
    system_prompt: str | None = None
    temperature: float | None = None
    top_p: float | None = None

    def levers(self) -> frozenset[str]:
        """The levers this arm sets (see LEVERS)."""
        return frozenset(name for name in LEVERS if getattr(self, name) is not None)


LEVERS = ("system_prompt", "temperature", "top_p")  # what an arm can set
DEFAULT_ARMS = (Arm("default"),)
NO_ARM = Arm("")  # what a request that leaves the arms no lever gets: nothing, credited to none


def arm_levers(arms: tuple[Arm, ...] | list[Arm]) -> frozenset[str]:
    """The levers some arm of `arms` sets: the ones a request must leave to the arm."""
    return frozenset().union(*(arm.levers() for arm in arms))


def load_arms(path: Path | str | None) -> tuple[Arm, ...]:
    """Arms from a TOML file; the single no-op arm 'default' when `path` is None."""
    if path is None or str(path) == "":
        return DEFAULT_ARMS
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"arms file {path}: {exc}") from exc
    arms = []
    for i, entry in enumerate(data.get("arm", [])):
        unknown = set(entry) - {"name", "system_prompt", "temperature", "top_p"}
        if unknown:
            raise ValueError(f"arms file {path}: arm {i} has unknown keys {sorted(unknown)}")
        if not entry.get("name"):
            raise ValueError(f"arms file {path}: arm {i} needs a name")
        if entry["name"] in RESERVED_ARM_NAMES:
            reserved = ", ".join(sorted(RESERVED_ARM_NAMES))
            raise ValueError(f"arms file {path}: arm names {reserved} are reserved")
        temperature, top_p = entry.get("temperature"), entry.get("top_p")
        if temperature is not None and not 0 <= temperature <= 10:
            raise ValueError(f"arms file {path}: arm {entry['name']} temperature out of [0, 10]")
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"arms file {path}: arm {entry['name']} top_p out of (0, 1]")
        arms.append(Arm(entry["name"], entry.get("system_prompt"), temperature, top_p))
    if not arms:
        raise ValueError(f"arms file {path}: define at least one [[arm]]")
    if len({a.name for a in arms}) != len(arms):
        raise ValueError(f"arms file {path}: arm names must be unique")
    return tuple(arms)
