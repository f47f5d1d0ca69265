"""The package's shape: one import namespace, a kernel that imports no demo or dev code, and
a server and a learner that never import each other. Read from the source (every import,
function-local ones too), so a violation fails here before it ships."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Top-level folders that appear in the namespace through a symbolic link under loraloop/.
LINKED = {"service": "loraloop.service", "learner": "loraloop.learner"}
GENERATED = ROOT / "loraloop" / "core" / "gen"
# Source trees whose imports are checked: the shipped package and everything around it.
CHECKED = ["loraloop", "service", "learner", "tests", "benchmarks", "loadtests", "scripts"]
# Demo and development code, and what only it needs.
NOT_IN_KERNEL = (
    "loraloop.devtools",
    "loraloop.demo",
    "loraloop.demo_world",
    "loraloop.eval",
    "loraloop.processes",
    "loraloop.cli",
    "tests",
    "benchmarks",
    "loadtests",
    "matplotlib",
)


def _module_name(path: Path) -> str:
    """Dotted name a file is imported under (service/ and learner/ through their links)."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    if parts and parts[0] in LINKED:
        parts[0] = LINKED[parts[0]]
    return ".".join(parts)


def _sources(*trees: str) -> Iterator[Path]:
    for tree in trees:
        for path in sorted((ROOT / tree).rglob("*.py")):  # rglob does not follow the links
            if not path.is_relative_to(GENERATED):
                yield path


def _imports(path: Path, module: str | None = None) -> Iterator[tuple[int, str]]:
    """(line, absolute module name) of every import in `path` (imported as `module`)."""
    module = module or _module_name(path)
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            parts = [node.module] if node.module else []
            if node.level:  # relative: resolve against the importing module's package
                base = module.split(".")
                parts = base[: len(base) - node.level + (path.name == "__init__.py")] + parts
            if node.module:
                yield node.lineno, ".".join(parts)
            for alias in node.names:  # `from loraloop import devtools` imports a module too
                yield node.lineno, ".".join([*parts, alias.name])


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def test_service_and_learner_are_linked_into_the_namespace() -> None:
    for folder, module in LINKED.items():
        link = ROOT / module.replace(".", "/")
        assert link.is_symlink() and link.resolve() == (ROOT / folder).resolve(), link


def test_every_import_is_in_the_loraloop_namespace() -> None:
    """No code imports `core`, `service` or `learner` as top-level packages: installed, they
    exist only as `loraloop.core`, `loraloop.service` and `loraloop.learner`."""
    bad = [
        f"{path.relative_to(ROOT)}:{line}: {name}"
        for path in _sources(*CHECKED)
        for line, name in _imports(path)
        if any(_under(name, top) for top in ("core", "service", "learner"))
    ]
    assert not bad, "import loraloop.<...> instead:\n" + "\n".join(bad)


@pytest.mark.parametrize("tree", ["loraloop/core", "service", "learner"])
def test_kernel_imports_no_demo_or_dev_code(tree: str) -> None:
    bad = [
        f"{path.relative_to(ROOT)}:{line}: {name}"
        for path in _sources(tree)
        for line, name in _imports(path)
        if any(_under(name, banned) for banned in NOT_IN_KERNEL)
    ]
    assert not bad, "serving and learning code imports demo/dev code:\n" + "\n".join(bad)


@pytest.mark.parametrize(
    ("tree", "other"), [("service", "loraloop.learner"), ("learner", "loraloop.service")]
)
def test_server_and_learner_never_import_each_other(tree: str, other: str) -> None:
    bad = [
        f"{path.relative_to(ROOT)}:{line}: {name}"
        for path in _sources(tree)
        for line, name in _imports(path)
        if _under(name, other)
    ]
    assert not bad, "shared code belongs in loraloop.core:\n" + "\n".join(bad)


def test_the_checker_sees_a_violation(tmp_path: Path) -> None:
    """The scan above reads function-local and relative imports too (else it could pass on
    code it never looked at)."""
    sample = tmp_path / "probe.py"
    sample.write_text(
        "def f():\n    from core.settings import Settings\n    from .. import learner\n"
    )
    names = [name for _, name in _imports(sample, "loraloop.service.probe")]
    assert names == ["core.settings", "core.settings.Settings", "loraloop.learner"]
