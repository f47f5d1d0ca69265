"""The context schema: parsing and its errors, the vectors, the fingerprint; what the
server refuses of a request's context; statistics of another schema kept, not used."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from loraloop.core.bandits.context_schema import (
    BUILTIN,
    ContextSchemaError,
    load_context_schema,
    recorded_schema,
)
from loraloop.core.bandits.features import DIM, context_features
from loraloop.core.bandits.linear import POPULATION, BanditState, population_key
from loraloop.core.gen.loraloop.v1 import common_pb2
from loraloop.core.settings import Settings, StartupError
from loraloop.service.strategy import StrategyChooser
from loraloop.service.validation import RequestError, check_context

SCHEMA = """
version = 3
server_features = true

[[feature]]
name = "hour"
type = "numeric"
min = 0
max = 20
default = 10

[[feature]]
name = "device"
type = "categorical"
values = ["mobile", "desktop"]
"""


def _write(tmp_path: Path, text: str, name: str = "schema.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_no_file_is_the_builtin_schema_with_todays_vectors() -> None:
    schema = load_context_schema(None)
    assert schema is BUILTIN and not schema.declared and schema.dim == DIM == 3
    for tokens, chat in ((1, False), (40, True), (300, True)):
        x, unknown = schema.vector(tokens, chat)
        np.testing.assert_array_equal(x, context_features(tokens, chat))
        assert unknown == []
    assert schema.names() == ["bias", "prompt_length", "conversation"]
    assert recorded_schema("") == BUILTIN.fingerprint  # records from before schemas


def test_a_schema_file_lays_out_the_vector(tmp_path: Path) -> None:
    schema = load_context_schema(_write(tmp_path, SCHEMA))
    assert schema.declared and schema.version == 3 and schema.dim == 1 + 2 + 1 + 2
    assert schema.names() == [
        "bias",
        "prompt_length",
        "conversation",
        "hour",
        "device=mobile",
        "device=desktop",
    ]
    x, unknown = schema.vector(64, True, {"hour": 5}, {"device": "desktop"})
    np.testing.assert_allclose(x, [1, 0.25, 1, 0.25, 0, 1])
    assert unknown == []
    # clipped into [0, 1]; a value not listed: all zeros, reported; missing: the default
    x, unknown = schema.vector(1, False, {"hour": 99}, {"device": "watch"})
    np.testing.assert_allclose(x[3:], [1, 0, 0])
    assert unknown == ["device"]
    x, _ = schema.vector(1, False, {"hour": -3})
    np.testing.assert_allclose(x[3:], [0, 0, 0])
    x, _ = schema.vector(1, False)
    np.testing.assert_allclose(x[3:], [0.5, 0, 0])  # default 10 of [0, 20]


def test_without_server_features_the_bias_comes_first_alone(tmp_path: Path) -> None:
    text = SCHEMA.replace("server_features = true", "server_features = false")
    schema = load_context_schema(_write(tmp_path, text))
    assert schema.dim == 4
    x, _ = schema.vector(300, True, {"hour": 20}, {"device": "mobile"})
    np.testing.assert_allclose(x, [1, 1, 1, 0])


def test_the_fingerprint_is_stable_and_changes_with_the_schema(tmp_path: Path) -> None:
    one = load_context_schema(_write(tmp_path, SCHEMA, "a.toml"))
    # the same schema, written differently (key order, comments, number spelling)
    same = SCHEMA.replace("min = 0\nmax = 20", "max = 20.0\nmin = 0.0  # hours") + "\n# end\n"
    two = load_context_schema(_write(tmp_path, same, "b.toml"))
    assert one.fingerprint == two.fingerprint
    assert one.fingerprint.startswith("v3-") and len(one.fingerprint) == len("v3-") + 12
    assert one == two  # where it was read from is no part of the schema
    changes = [
        SCHEMA.replace("version = 3", "version = 4"),
        SCHEMA.replace("max = 20", "max = 24"),
        SCHEMA.replace("default = 10", "default = 11"),
        SCHEMA.replace('["mobile", "desktop"]', '["desktop", "mobile"]'),
        SCHEMA.replace('["mobile", "desktop"]', '["mobile", "desktop", "tablet"]'),
        SCHEMA.replace("server_features = true", "server_features = false"),
        SCHEMA.replace('name = "hour"', 'name = "hour_of_day"'),
    ]
    paths = [_write(tmp_path, text, f"c{i}.toml") for i, text in enumerate(changes)]
    prints = {load_context_schema(path).fingerprint for path in paths}
    assert len(prints) == len(changes) and one.fingerprint not in prints
    assert BUILTIN.fingerprint not in prints | {one.fingerprint}
    assert BUILTIN.fingerprint == load_context_schema("").fingerprint  # the same every time


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("version = 0", "version must be an integer >= 1"),
        ('version = "2"', "version must be an integer >= 1"),
        ("server_features = true", "version must be an integer >= 1"),
        ("version = 1\nserver_features = 1", "server_features must be true or false"),
        ("version = 1\nfeatures = []", "unknown keys ['features']"),
        ('version = 1\n[[feature]]\nname = "a b"\ntype = "numeric"', "feature[0].name"),
        ('version = 1\n[[feature]]\nname = "x"\ntype = "text"', "feature[0] ('x'): type must"),
        ('version = 1\n[[feature]]\nname = "x"\ntype = "numeric"\nmin = 0', "min and max"),
        (
            'version = 1\n[[feature]]\nname = "x"\ntype = "numeric"\nmin = 2\nmax = 1',
            "min (2) must be below max (1)",
        ),
        (
            'version = 1\n[[feature]]\nname = "x"\ntype = "numeric"\nmin = 0\nmax = nan',
            "min and max must be finite numbers",
        ),
        (
            'version = 1\n[[feature]]\nname = "x"\ntype = "numeric"\nmin = 0\nmax = 1\ndefault = 2',
            "default must be a number in [min, max]",
        ),
        (
            'version = 1\n[[feature]]\nname = "x"\ntype = "numeric"\nmin = 0\nmax = 1\n'
            'values = ["a"]',
            "unknown keys ['values']",
        ),
        ('version = 1\n[[feature]]\nname = "x"\ntype = "categorical"', "values must be"),
        (
            'version = 1\n[[feature]]\nname = "x"\ntype = "categorical"\nvalues = ["a", "a"]',
            "values must be unique",
        ),
        (
            'version = 1\n[[feature]]\nname = "x"\ntype = "categorical"\nvalues = ["a"]\n'
            '[[feature]]\nname = "x"\ntype = "categorical"\nvalues = ["b"]',
            "feature names must be unique: x repeated",
        ),
        ("version = 1\nfeature = 3", "feature must be an array of tables"),
        ("version = ", "context schema file"),  # not TOML
    ],
)
def test_a_bad_file_is_a_startup_error_naming_file_and_key(
    tmp_path: Path, text: str, says: str
) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ContextSchemaError) as err:
        load_context_schema(path)
    assert isinstance(err.value, StartupError)
    assert says in str(err.value) and str(path) in str(err.value)


def test_a_missing_file_and_too_many_values_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ContextSchemaError, match="context_schema_file"):
        load_context_schema(tmp_path / "nowhere.toml")
    many = "version = 1\n" + "".join(
        f'[[feature]]\nname = "f{i}"\ntype = "categorical"\nvalues = '
        f"{[f'v{j}' for j in range(40)]}\n"
        for i in range(7)
    )
    with pytest.raises(ContextSchemaError, match="at most 256"):
        load_context_schema(_write(tmp_path, many))


def _ctx(**features: Any) -> common_pb2.ContextFeatures:
    ctx = common_pb2.ContextFeatures()
    for name, value in features.items():
        if isinstance(value, str):
            ctx.categorical[name] = value
        else:
            ctx.numeric[name] = value
    return ctx


def test_the_server_refuses_context_the_schema_does_not_declare(tmp_path: Path) -> None:
    schema = load_context_schema(_write(tmp_path, SCHEMA))
    assert check_context(_ctx(hour=3, device="tv"), schema) == ({"hour": 3.0}, {"device": "tv"})
    assert check_context(_ctx(), BUILTIN) == ({}, {})  # nothing sent: fine without a schema
    cases = [
        (_ctx(weekday=2), schema, ["'weekday'", "not in context schema version 3", "hour"]),
        (_ctx(hour="noon"), schema, ["'hour' is numeric", "context.numeric"]),
        (_ctx(device=1.0), schema, ["'device' is categorical", "context.categorical"]),
        (_ctx(hour=math.nan), schema, ["'hour'", "not a finite number", "version 3"]),
        (_ctx(hour=math.inf), schema, ["not a finite number"]),
        (_ctx(**{"x" * 65: 1.0}), schema, ["at most 64"]),
        (_ctx(**{f"f{i}": 1.0 for i in range(65)}), schema, ["65 features: at most 64"]),
        (_ctx(device="m" * 257), schema, ["at most 256"]),
        (_ctx(hour=1), BUILTIN, ["LORALOOP_CONTEXT_SCHEMA_FILE"]),
    ]
    for ctx, against, says in cases:
        with pytest.raises(RequestError) as err:
            check_context(ctx, against)
        assert err.value.code.name == "INVALID_ARGUMENT"
        assert all(s in err.value.message for s in says), err.value.message


def test_state_of_another_schema_is_tagged_and_not_read_as_ours(tmp_path: Path) -> None:
    schema = load_context_schema(_write(tmp_path, SCHEMA))
    fp = schema.fingerprint
    assert population_key(BUILTIN.fingerprint) == population_key("") == POPULATION
    assert population_key(fp) == f"{POPULATION}@{fp}"
    ours = BanditState(["a", "b"], schema.dim, fp)
    ours.update("a", schema.vector(3, False, {"hour": 4}, {"device": "mobile"})[0], 1.0)
    data = ours.to_json()
    assert data["_schema"] == fp and BanditState.json_schema(data) == fp
    assert BanditState.from_json(data, ["a", "b"], schema.dim, fp).stats["a"].n == 1
    # read as another schema's: empty, never a mix
    assert BanditState.from_json(data, ["a", "b"], DIM).stats["a"].n == 0
    msg = ours.to_proto("u", 1)
    assert msg.context_schema == fp
    assert BanditState.from_proto(msg, ["a", "b"]).schema == fp
    legacy = BanditState(["a"], DIM)  # built before schemas: the built-in schema
    assert legacy.schema == BUILTIN.fingerprint
    old = legacy.to_json()
    del old["_schema"]
    assert BanditState.json_schema(old) == BUILTIN.fingerprint


def test_the_chooser_ignores_and_counts_states_of_another_schema(tmp_path: Path) -> None:
    arms = _write(tmp_path, '[[arm]]\nname = "a"\n[[arm]]\nname = "b"\n', "arms.toml")
    path = _write(tmp_path, SCHEMA)
    chooser = StrategyChooser(Settings(arms_file=arms, context_schema_file=path))
    schema = chooser.schema
    builtin_state = BanditState(["a", "b"], DIM)
    builtin_state.update("a", context_features(3, False), 1.0)
    topic = "bandit-state"
    chooser._apply(topic, b"u", builtin_state.to_proto("u", 1).SerializeToString())
    assert not chooser.has_state("u") and chooser.ignored_states == 1
    ours = BanditState(["a", "b"], schema.dim, schema.fingerprint)
    ours.update("b", schema.vector(3, False)[0], 1.0)
    chooser._apply(topic, b"u", ours.to_proto("u", 1).SerializeToString())
    assert chooser.has_state("u") and chooser.arm_stats("u") == [("a", 0, 0.0), ("b", 1, 1.0)]
    x = chooser.features(3, False, {"hour": 2}, {"device": "fridge"})
    assert len(x) == schema.dim and chooser.unknown_values == {"device": 1}
    choice = chooser.choose("u", x)
    assert choice.arm.name in {"a", "b"} and 0 < choice.propensity <= 1


@pytest.mark.parametrize("command", ["serve", "learn"])
def test_a_bad_schema_file_stops_serve_and_learn_in_one_line(tmp_path: Path, command: str) -> None:
    path = _write(tmp_path, 'version = 1\n[[feature]]\nname = "x"\ntype = "numeric"\n')
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "LORALOOP_MODEL": os.environ["LORALOOP_MODEL"],
        "LORALOOP_CONTEXT_SCHEMA_FILE": str(path),
        "LORALOOP_PORT": "0",
        "LORALOOP_KAFKA_BOOTSTRAP": "127.0.0.1:1",
    }
    done = subprocess.run(
        [sys.executable, "-m", "loraloop.cli", command],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert f"context schema file {path}: feature[0] ('x'): min and max" in done.stderr
    assert "Traceback" not in done.stderr
