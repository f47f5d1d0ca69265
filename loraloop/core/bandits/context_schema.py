"""The declared, versioned schema of the bandit's context: which features a request's
context vector holds, in which order, scaled how.

A schema file (setting `context_schema_file`, TOML):

    version = 2                 # bump it with every change (it is part of the fingerprint)
    server_features = true      # the built-in features: prompt length, conversation

    [[feature]]
    name = "hour"
    type = "numeric"
    min = 0                     # scaled into [0, 1], values outside clipped
    max = 23
    default = 12                # optional: the value when a request does not send it (min)

    [[feature]]
    name = "device"
    type = "categorical"
    values = ["mobile", "desktop", "tablet"]   # one-hot; any other value: all zeros

The vector is [1 (bias), prompt length / 256 (capped at 1), conversation] (those two only
with server_features) followed by each feature in the file's order: a numeric feature is
one value, a categorical feature one 0/1 value per listed value. Without a file the schema
is BUILTIN: the bias and the two server features, the vector every interaction had before
schemas existed (loraloop/core/bandits/features.py).

Statistics and logged contexts are tagged with the schema's `fingerprint` (a hash of the
version and the canonical feature list: names, types, ranges, defaults, values in order),
so a vector or a statistic is only ever used under the schema it was computed with.
Records written before schemas existed carry no fingerprint and belong to BUILTIN
(`recorded_schema`).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np

from loraloop.core.bandits.features import context_features
from loraloop.core.settings import StartupError

MAX_FEATURES = 64  # declared in a schema, and sent with one request
MAX_NAME_CHARS = 64
MAX_VALUES = 64  # listed values of one categorical feature
MAX_VALUE_CHARS = 256  # of a categorical value (in the file or a request)
MAX_DIM = 256  # the posterior inverts a dim x dim matrix per arm and request
NAME_RE = re.compile(r"[A-Za-z0-9_.\-]+")
SERVER_FEATURES = ("prompt_length", "conversation")

FeatureType = Literal["numeric", "categorical"]


class ContextSchemaError(StartupError, ValueError):
    """A context schema file that cannot be used; the message names the file and key."""


@dataclass(frozen=True)
class Feature:
    name: str
    type: FeatureType
    min: float = 0.0
    max: float = 1.0
    default: float | None = None  # numeric: the value when not sent (None: min)
    values: tuple[str, ...] = ()  # categorical: the one-hot's values, in order

    @property
    def width(self) -> int:
        return 1 if self.type == "numeric" else len(self.values)

    def canonical(self) -> dict[str, Any]:
        if self.type == "numeric":
            default = self.min if self.default is None else self.default
            return {
                "name": self.name,
                "type": "numeric",
                "min": self.min,
                "max": self.max,
                "default": default,
            }
        return {"name": self.name, "type": "categorical", "values": list(self.values)}


@dataclass(frozen=True)
class ContextSchema:
    version: int
    server_features: bool = True
    features: tuple[Feature, ...] = ()
    source: str | None = field(default=None, compare=False)  # its file; None: BUILTIN

    @property
    def declared(self) -> bool:
        """Whether it comes from a schema file (requests may send context features)."""
        return self.source is not None

    @property
    def dim(self) -> int:
        return (
            1
            + (len(SERVER_FEATURES) if self.server_features else 0)
            + sum(f.width for f in self.features)
        )

    @cached_property
    def fingerprint(self) -> str:
        """ "v<version>-<12 hex digits>": a hash of the version and the canonical
        feature list. Equal fingerprints mean equal vectors for equal requests."""
        canonical = {
            "version": self.version,
            "server_features": self.server_features,
            "features": [f.canonical() for f in self.features],
        }
        text = json.dumps(canonical, sort_keys=True, separators=(",", ":"))
        return f"v{self.version}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"

    @cached_property
    def by_name(self) -> dict[str, Feature]:
        return {f.name: f for f in self.features}

    def describe(self) -> str:
        """How messages name the schema."""
        where = f" ({self.source})" if self.source else " (built-in)"
        return f"context schema version {self.version}{where}"

    def names(self) -> list[str]:
        """Every coordinate of the vector, in order (for reports and debugging)."""
        out = ["bias", *(SERVER_FEATURES if self.server_features else ())]
        for f in self.features:
            out += [f.name] if f.type == "numeric" else [f"{f.name}={v}" for v in f.values]
        return out

    def vector(
        self,
        prompt_tokens: int,
        conversation: bool,
        numeric: Mapping[str, float] | None = None,
        categorical: Mapping[str, str] | None = None,
    ) -> tuple[np.ndarray, list[str]]:
        """(the context vector, bias first; the categorical features whose value the
        schema does not list, encoded as all zeros). The features must have been checked
        against the schema (names and types: service/validation.py check_context)."""
        numeric, categorical = numeric or {}, categorical or {}
        server = context_features(prompt_tokens, conversation)
        parts: list[float] = [1.0, *(server[1:].tolist() if self.server_features else ())]
        unknown: list[str] = []
        for f in self.features:
            if f.type == "numeric":
                value = numeric.get(f.name, f.min if f.default is None else f.default)
                scaled = (float(value) - f.min) / (f.max - f.min)
                parts.append(min(1.0, max(0.0, scaled)))
            else:
                onehot = [0.0] * len(f.values)
                given = categorical.get(f.name)
                if given is not None:
                    if given in f.values:
                        onehot[f.values.index(given)] = 1.0
                    else:
                        unknown.append(f.name)
                parts += onehot
        return np.array(parts, dtype=float), unknown


BUILTIN = ContextSchema(version=0)  # no schema file: exactly the vectors of features.py


def recorded_schema(fingerprint: str) -> str:
    """The schema a record belongs to: records from before schemas existed carry none
    and are BUILTIN's."""
    return fingerprint or BUILTIN.fingerprint


def load_context_schema(path: Path | str | None) -> ContextSchema:
    """The schema of a TOML file; BUILTIN when `path` is None or empty."""
    if path is None or str(path) == "":
        return BUILTIN
    where = f"context schema file {path}"
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ContextSchemaError(f"{where}: {exc} (setting context_schema_file)") from exc
    return parse_context_schema(data, str(path))


def parse_context_schema(data: Mapping[str, Any], source: str) -> ContextSchema:
    where = f"context schema file {source}"

    def fail(message: str) -> ContextSchemaError:
        return ContextSchemaError(f"{where}: {message}")

    unknown = set(data) - {"version", "server_features", "feature"}
    if unknown:
        raise fail(f"unknown keys {sorted(unknown)}: use version, server_features and [[feature]]")
    version = data.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise fail("version must be an integer >= 1 (bump it whenever the features change)")
    server = data.get("server_features", True)
    if not isinstance(server, bool):
        raise fail("server_features must be true or false")
    entries = data.get("feature", [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise fail("feature must be an array of tables: [[feature]]")
    if len(entries) > MAX_FEATURES:
        raise fail(f"{len(entries)} features: at most {MAX_FEATURES}")
    features = [_feature(entry, i, fail) for i, entry in enumerate(entries)]
    names = [f.name for f in features]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise fail(f"feature names must be unique: {', '.join(duplicates)} repeated")
    schema = ContextSchema(version, server, tuple(features), source)
    if schema.dim > MAX_DIM:
        raise fail(f"the context vector would have {schema.dim} values: at most {MAX_DIM}")
    return schema


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _feature(entry: dict[str, Any], i: int, fail: Any) -> Feature:
    name = entry.get("name")
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or len(name) > MAX_NAME_CHARS:
        raise fail(f"feature[{i}].name must be 1-{MAX_NAME_CHARS} characters of [A-Za-z0-9_.-]")
    at = f"feature[{i}] ({name!r})"
    kind = entry.get("type")
    if kind == "numeric":
        unknown = set(entry) - {"name", "type", "min", "max", "default"}
        if unknown:
            raise fail(f"{at}: unknown keys {sorted(unknown)} (numeric: min, max, default)")
        low: Any = entry.get("min")
        high: Any = entry.get("max")
        if not (_number(low) and _number(high)):
            raise fail(f"{at}: min and max must be finite numbers")
        if not low < high:
            raise fail(f"{at}: min ({low}) must be below max ({high})")
        default = entry.get("default")
        if default is not None and not (_number(default) and low <= default <= high):
            raise fail(f"{at}: default must be a number in [min, max]")
        return Feature(
            name,
            "numeric",
            float(low),
            float(high),
            None if default is None else float(default),
        )
    if kind == "categorical":
        unknown = set(entry) - {"name", "type", "values"}
        if unknown:
            raise fail(f"{at}: unknown keys {sorted(unknown)} (categorical: values)")
        values = entry.get("values")
        if (
            not isinstance(values, list)
            or not values
            or not all(isinstance(v, str) and 0 < len(v) <= MAX_VALUE_CHARS for v in values)
        ):
            raise fail(
                f"{at}: values must be a non-empty list of strings of 1-{MAX_VALUE_CHARS} "
                "characters"
            )
        if len(values) > MAX_VALUES:
            raise fail(f"{at}: {len(values)} values: at most {MAX_VALUES}")
        if len(set(values)) != len(values):
            raise fail(f"{at}: values must be unique")
        return Feature(name, "categorical", values=tuple(values))
    raise fail(f'{at}: type must be "numeric" or "categorical", not {kind!r}')
