"""Every program the code runs is in tools.py with the Debian package that provides it,
and the host set-up installs that package: a missing install step fails here, not on a
fresh machine."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from rockpool import host, tools
from rockpool.arch import host_architecture
from rockpool.build.bootstrap import lock_hooks
from rockpool.build.provision import CHROOT_RUNNER
from rockpool.formats import FORMAT_NAMES

SRC = Path(__file__).resolve().parents[2] / "src" / "rockpool"
TESTS = Path(__file__).resolve().parents[1]
WRAPPERS = {"run", "spawn", "background", "contained"}
SUBPROCESS = {"run", "Popen", "check_output", "check_call"}
# Shell words in the runner scripts that are builtins or keywords, not programs.
SHELL_BUILTINS = {"set", "[", "test", "cd", "exec", "echo", "printf", "export", "true"}
SHELL_BUILTINS |= {"local", "return", "exit", "trap", "if", "then", "fi", "for", "do", "done"}
SHELL_BUILTINS |= {"{", "}"}


def _first_program(node: ast.expr, lists: dict[str, ast.expr]) -> str | None:
    """The program of an argv list literal: its first element when that is a string,
    or the first of the list it starts by unpacking ([*argv, ...])."""
    if isinstance(node, ast.Name) and node.id in lists:
        node = lists[node.id]
    if isinstance(node, ast.List) and node.elts:
        first = node.elts[0]
        if isinstance(first, ast.Constant) and isinstance(first.value, str):
            return first.value
        if isinstance(first, ast.Starred) and isinstance(first.value, ast.Name):
            return _first_program(lists.get(first.value.id, first.value), {})
    return None


def programs_run_by(path: Path, callables: set[str]) -> set[str]:
    """Programs given as argv[0] to the named callables: in the call itself, or in a
    list assigned in the same function to the variable the call passes."""
    found: set[str] = set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for function in [tree, *(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef))]:
        lists: dict[str, ast.expr] = {}
        for node in ast.walk(function):
            if isinstance(node, ast.Assign | ast.AnnAssign) and node.value is not None:
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    if isinstance(target, ast.Name):
                        lists[target.id] = node.value
        for node in ast.walk(function):
            if not isinstance(node, ast.Call) or not node.args:
                continue
            func = node.func
            name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
            if name not in callables:
                continue
            argv = node.args[0]
            if isinstance(argv, ast.Call) and argv.args:  # run(contained([...]))
                argv = argv.args[0]
            program = _first_program(argv, lists)
            if program is not None:
                found.add(program)
    return found


def shell_programs(script: str) -> set[str]:
    """Command words of a small shell script: first words of each command."""
    words = set()
    for line in script.splitlines():
        for command in re.split(r"&&|\|\||;|\|", line.split("#", 1)[0]):
            tokens = command.split()
            if tokens and re.match(r"[A-Za-z_]+\+?=\(", tokens[0]):
                continue  # an array assignment: no command
            while tokens and re.fullmatch(r"[A-Za-z_]+\+?=\S*", tokens[0]):
                tokens.pop(0)  # variable assignments before the command
            if tokens and not re.fullmatch(r"[A-Za-z_]+\(\)", tokens[0]):  # a function's name
                words.add(tokens[0])
    functions = set(re.findall(r"^\s*([A-Za-z_]+)\(\)", script, re.MULTILINE))
    return {word for word in words - SHELL_BUILTINS - functions if not word.startswith(("$", '"'))}


def test_every_program_the_code_runs_is_listed_with_its_package() -> None:
    programs = set()
    for module in SRC.rglob("*.py"):
        programs |= programs_run_by(module, WRAPPERS)
    assert {"mmdebstrap", "qemu-img", "skopeo", "mke2fs", "sfdisk"} <= programs  # scan works
    programs |= shell_programs(CHROOT_RUNNER)
    assert {"chroot", "mount", "install"} <= programs
    programs |= set(tools.QEMU_SYSTEM.values()) | set(tools.QEMU_USER.values())
    known = set(tools.PACKAGES) | set(tools.MACOS_PROGRAMS)
    unlisted = sorted(programs - known)
    assert unlisted == [], f"add these to tools.PACKAGES with their Debian package: {unlisted}"


def test_the_bootstrap_hooks_run_only_listed_programs(tmp_path: Path) -> None:
    class Context:
        work = tmp_path
        lock = type("Lock", (), {"apt_preferences": lambda self: ""})()

    hooks = lock_hooks(Context())  # type: ignore[arg-type]
    programs = shell_programs(" ; ".join(hook.split("=", 1)[1] for hook in hooks))
    assert programs == {"mkdir", "cp", "rm"}
    assert programs <= set(tools.BUILD)


def test_every_program_the_tests_run_is_listed() -> None:
    programs = set()
    for module in TESTS.rglob("*.py"):
        programs |= programs_run_by(module, SUBPROCESS | WRAPPERS)
    assert {"caddy", "docker-registry", "ssh-keygen"} <= programs  # the scan works
    programs.discard("no-such-tool-here")  # the command wrapper's test of a missing one
    unlisted = sorted(p for p in programs if p not in tools.PACKAGES and not p.startswith("/"))
    assert unlisted == [], f"add these to tools.PACKAGES (and tools.TESTS): {unlisted}"


def test_the_set_up_installs_every_listed_package() -> None:
    runtime = set(tools.all_packages())
    with_tests = set(tools.all_packages(with_tests=True))
    for program, package in tools.PACKAGES.items():
        assert package in with_tests, program
        if program not in tools.TESTS:
            assert package in runtime, f"{program}'s package {package} is only installed for tests"
    assert set(tools.DATA_PACKAGES) <= runtime
    # mmdebstrap only recommends arch-test, and the set-up installs no Recommends.
    assert "arch-test" in runtime and "mount" in runtime


def test_every_job_names_listed_programs_only() -> None:
    jobs = [
        tools.BUILD,
        tools.FOREIGN_BUILD,
        tools.WORKSPACES,
        tools.CONFIG_DISK,
        tools.PUSH,
        tools.HOST_SETUP,
        tools.TESTS,
        *tools.FORMAT_PROGRAMS.values(),
    ]
    for job in jobs:
        assert set(job) <= set(tools.PACKAGES), job
    assert set(tools.FORMAT_PROGRAMS) == set(FORMAT_NAMES)


def test_a_foreign_build_checks_qemu_user_and_arch_test() -> None:
    class Spec:
        architecture = "arm64" if host_architecture() == "amd64" else "amd64"
        formats = ("qcow2",)

    programs = host.build_programs(Spec())  # type: ignore[arg-type]
    assert {"arch-test", "update-binfmts", tools.QEMU_USER[Spec.architecture]} <= set(programs)
    assert {"mmdebstrap", "mke2fs", "qemu-img"} <= set(programs)


def _dpkg_owner(path: str) -> str | None:
    result = subprocess.run(["dpkg", "-S", path], capture_output=True, text=True)
    if result.returncode != 0:
        return None
    return result.stdout.split(":", 1)[0].split(",")[0].strip()


@pytest.mark.skipif(shutil.which("dpkg") is None, reason="dpkg tells which package owns a file")
def test_the_listed_package_is_the_one_that_provides_the_program() -> None:
    checked = 0
    for program, package in tools.PACKAGES.items():
        found = shutil.which(program)
        if found is None:
            continue  # the set-up of this host did not install it (for example, no tests)
        real = str(Path(found).resolve())
        # /usr-merged hosts: dpkg may know the file by its /bin or /sbin name.
        candidates = [real, *(f"{d}/{Path(real).name}" for d in ("/bin", "/sbin", "/usr/bin"))]
        owner = next(filter(None, map(_dpkg_owner, candidates)), None)
        if owner is None:
            continue  # not from a package (a binary installed by hand)
        assert owner.split(":")[0] == package, f"{program} comes from {owner}, not {package}"
        checked += 1
    assert checked >= 10
