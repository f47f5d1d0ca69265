"""Arms: response strategies an operator defines in a TOML file.

    [[arm]]
    name = "brief"
    system_prompt = "You are a concise assistant."
    temperature = 0.8      # optional decoding overrides
    top_p = 0.95

An arm's system prompt is put in front of chat requests that bring no system message of
their own; its decoding settings apply where the request leaves them unset.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Arm:
    name: str
    system_prompt: str | None = None
    temperature: float | None = None
    top_p: float | None = None


DEFAULT_ARMS = (Arm("default"),)


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
