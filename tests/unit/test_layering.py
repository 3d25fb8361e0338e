"""The architecture, written down: which module may import which.

Read from the source with ast, so it holds whatever runs. Imports inside
`if TYPE_CHECKING:` are left out: they name types for the checker and are never run.
"""

from __future__ import annotations

import ast
import fnmatch
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"

# Lowest first. A module may import modules of its own group and of lower layers only;
# groups that share a layer are independent: neither imports the other.
LAYERS: list[dict[str, tuple[str, ...]]] = [
    {
        "base": (
            "rockpool",
            "rockpool.errors",
            "rockpool.units",
            "rockpool.progress",
            "rockpool.arch",
            "rockpool.names",
            "rockpool.keys",
            "rockpool.rundir",
        )
    },
    {"program list": ("rockpool.tools",)},
    {"command": ("rockpool.command", "rockpool.files", "rockpool.config_disk")},
    {"tools": ("rockpool.tools.*",)},
    {"formats": ("rockpool.formats", "rockpool.formats.*")},
    {"spec": ("rockpool.spec", "rockpool.lock", "rockpool.host")},
    {"store": ("rockpool.store",)},
    {"build": ("rockpool.build", "rockpool.build.*"), "runtime": ("rockpool.runtime*",)},
    {"operations": ("rockpool.gc", "rockpool.push", "rockpool.diff", "rockpool.reproduce")},
    {"cli": ("rockpool.cli", "rockpool.__main__")},
]

Arrow = tuple[str, str]


def _in(module: str, *patterns: str) -> bool:
    return any(fnmatch.fnmatchcase(module, pattern) for pattern in patterns)


# The rules, each named, so a failure says which one broke.
RULES: dict[str, Callable[[str, str], bool]] = {
    "nothing imports cli": lambda a, b: b == "rockpool.cli" and a != "rockpool.__main__",
    "runtimes never import build modules": lambda a, b: (
        _in(a, "rockpool.runtime*") and _in(b, "rockpool.build*")
    ),
    "the build, the formats and push never import a runtime": lambda a, b: (
        _in(a, "rockpool.build*", "rockpool.formats*", "rockpool.push")
        and _in(b, "rockpool.runtime*")
    ),
    "formats import neither runtimes nor the store": lambda a, b: (
        _in(a, "rockpool.formats*") and _in(b, "rockpool.runtime*", "rockpool.store")
    ),
    "the store imports neither build nor runtime modules": lambda a, b: (
        a == "rockpool.store" and _in(b, "rockpool.build*", "rockpool.runtime*")
    ),
}


def module_name(path: Path, src: Path = SRC) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _run_time_imports(tree: ast.AST) -> Iterable[ast.Import | ast.ImportFrom]:
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        yield from _run_time_imports(node)


def import_graph(src: Path = SRC) -> dict[str, set[str]]:
    """Each rockpool module and the rockpool modules it imports when it runs."""
    paths = {module_name(path, src): path for path in sorted(src.rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for module, path in paths.items():
        targets: set[str] = set()
        for node in _run_time_imports(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names if a.name.split(".")[0] == "rockpool")
            elif node.module and node.module.split(".")[0] == "rockpool":
                for alias in node.names:  # `from rockpool.x import y`: y may be a module
                    full = f"{node.module}.{alias.name}"
                    targets.add(full if full in paths else node.module)
        graph[module] = targets - {module}
    return graph


def group_of(module: str) -> tuple[int, str] | None:
    for layer, groups in enumerate(LAYERS):
        for name, patterns in groups.items():
            if _in(module, *patterns):
                return layer, name
    return None


def wrong_arrows(graph: dict[str, set[str]]) -> list[str]:
    problems = []
    for source, targets in sorted(graph.items()):
        for target in sorted(targets):
            for rule, broken in RULES.items():
                if broken(source, target):
                    problems.append(f"{source} -> {target}: {rule}")
            placed, placed_target = group_of(source), group_of(target)
            if placed is None or placed_target is None:
                continue  # reported by test_every_module_has_its_place
            if placed_target[0] > placed[0] or (
                placed_target[0] == placed[0] and placed_target[1] != placed[1]
            ):
                problems.append(
                    f"{source} ({placed[1]}) -> {target} ({placed_target[1]}): "
                    "an import against the layering"
                )
    return problems


def test_every_module_has_its_place() -> None:
    unplaced = [module for module in import_graph() if group_of(module) is None]
    assert not unplaced, f"add these modules to LAYERS in {__file__}: {unplaced}"


def test_no_import_goes_against_the_layering() -> None:
    problems = wrong_arrows(import_graph())
    assert not problems, "\n".join(problems)


def test_there_are_no_import_cycles() -> None:
    graph = import_graph()
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        if module in path:
            cycle = (*path[path.index(module) :], module)
            pytest.fail("an import cycle: " + " -> ".join(cycle))
        if module in done:
            return
        for target in sorted(graph.get(module, ())):
            visit(target, (*path, module))
        done.add(module)

    for module in sorted(graph):
        visit(module, ())


@pytest.mark.parametrize(
    ("source", "target", "expected"),
    [
        ("rockpool.runtime.qemu", "rockpool.build.runner", "runtimes never import build"),
        ("rockpool.formats.qcow2", "rockpool.store", "formats import neither"),
        ("rockpool.store", "rockpool.runtime.base", "the store imports neither"),
        ("rockpool.gc", "rockpool.cli", "nothing imports cli"),
        ("rockpool.build.packer", "rockpool.runtime.tart", "never import a runtime"),
        ("rockpool.tools.qemu", "rockpool.spec", "against the layering"),
        ("rockpool.build.runner", "rockpool.runtime.network", "never import a runtime"),
    ],
)
def test_the_check_catches_a_wrong_arrow(source: str, target: str, expected: str) -> None:
    graph = {source: {target}, target: set()}
    assert any(expected in problem for problem in wrong_arrows(graph))


def test_the_graph_is_read_from_the_source(tmp_path: Path) -> None:
    package = tmp_path / "rockpool"
    (package / "build").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "build" / "__init__.py").write_text("")
    (package / "build" / "runner.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "from rockpool import build\n"
        "if TYPE_CHECKING:\n    from rockpool.cli import main\n"
        "def later() -> None:\n    import rockpool.store\n"
    )
    graph = import_graph(tmp_path)
    assert graph["rockpool.build.runner"] == {"rockpool.build", "rockpool.store"}
