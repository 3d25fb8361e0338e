"""Property-based fuzzing of what users and the disk hand rockpool: spec files, names,
environment values, key files and store records. Whatever the input, the CLI answers
with a documented exit code and one clear message, never a traceback, and leaves no
partial state."""

from __future__ import annotations

import contextlib
import io
import json
import os
import string
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from rockpool import cli
from rockpool.errors import ExitCode
from rockpool.names import is_instance_id, is_slug
from rockpool.store import Store
from tests.small_image import land_small_image

REPO = Path(__file__).resolve().parents[2]
DOCUMENTED = {int(code) for code in ExitCode}
FUZZ = settings(
    max_examples=int(os.environ.get("ROCKPOOL_FUZZ_EXAMPLES", "40")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
# Eight CLI runs an example: half the examples keep it within a minute.
FUZZ_CLI_HEAVY = settings(FUZZ, max_examples=max(1, FUZZ.max_examples // 2))


@contextlib.contextmanager
def home(path: Path) -> Iterator[None]:
    saved = os.environ.get("ROCKPOOL_HOME")
    os.environ["ROCKPOOL_HOME"] = str(path)
    try:
        yield
    finally:
        if saved is None:
            del os.environ["ROCKPOOL_HOME"]
        else:
            os.environ["ROCKPOOL_HOME"] = saved


def rockpool(store: Path, *args: str) -> tuple[int, str, str]:
    """The CLI in this process, as the worker runs it: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with home(store), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(["-q", *args])
    return code, out.getvalue(), err.getvalue()


def answered_clearly(code: int, stderr: str, allowed: set[int]) -> None:
    assert code in allowed and code in DOCUMENTED, (code, stderr)
    assert "Traceback" not in stderr and "internal error" not in stderr, stderr
    if code != 0:
        assert stderr.count("rockpool: error:") == 1, stderr


# ---- spec files ------------------------------------------------------------------------

_key = st.text(alphabet=string.ascii_lowercase + "_-", min_size=1, max_size=12)
_scalar = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True),
    st.booleans(),
    st.text(max_size=40),
)
_value = st.recursive(_scalar, lambda inner: st.lists(inner, max_size=4), max_leaves=12)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return {"nan": "nan", "inf": "inf", "-inf": "-inf"}.get(str(value), repr(value))
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string is JSON's, near enough
    return "[" + ", ".join(toml_value(v) for v in value) + "]"


@st.composite
def spec_documents(draw: st.DrawFn) -> bytes:
    """A spec: the default one with keys changed, removed or added, or noise."""
    kind = draw(st.sampled_from(["mutated", "random", "bytes", "deep"]))
    if kind == "bytes":
        return draw(st.binary(max_size=400))
    if kind == "deep":
        depth = draw(st.integers(min_value=50, max_value=5000))
        return f"a = {'[' * depth}{']' * depth}\n".encode()
    sections: dict[str, dict[str, Any]] = {
        "image": {"name": "fuzz", "suite": "trixie", "disk_size": "20G"},
        "debian": {"packages": ["git"]},
        "node": {"major": 24},
        "code_server": {"version": "4.139.1"},
        "provision": {"script": str(REPO / "images/scripts/setup.sh")},
    }
    if kind == "random":
        sections = draw(
            st.dictionaries(_key, st.dictionaries(_key, _value, max_size=4), max_size=4)
        )
    else:
        for _ in range(draw(st.integers(min_value=1, max_value=4))):
            section = draw(st.sampled_from([*sections, "workspace", "extra"]))
            key = draw(
                st.sampled_from(
                    [
                        "name",
                        "suite",
                        "architecture",
                        "disk_size",
                        "formats",
                        "packages",
                        "major",
                        "version",
                        "script",
                        "cpus",
                        "memory",
                        "user",
                        "mirror",
                    ]
                )
            )
            sections.setdefault(section, {})[key] = draw(_value)
    text = "".join(
        f"[{section}]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in table.items())
        for section, table in sections.items()
    )
    if draw(st.booleans()):
        text = draw(st.sampled_from(['extends = "/dev/zero"\n', 'extends = "."\n', ""])) + text
    return text.encode("utf-8", "surrogatepass")


@FUZZ
@given(document=spec_documents())
def test_any_spec_file_gets_a_clear_answer(tmp_path: Path, document: bytes) -> None:
    spec = tmp_path / "spec.toml"
    spec.write_bytes(document)
    code, _, stderr = rockpool(tmp_path / "store", "spec", "check", str(spec))
    answered_clearly(code, stderr, {0, 2})
    assert not (tmp_path / "store").exists()  # checking a spec stores nothing


@pytest.mark.parametrize("kind", ["fifo", "directory", "device", "symlink-to-device", "huge"])
def test_spec_paths_that_are_no_regular_file(tmp_path: Path, kind: str) -> None:
    spec = tmp_path / "spec.toml"
    if kind == "fifo":
        os.mkfifo(spec)
    elif kind == "directory":
        spec.mkdir()
    elif kind == "device":
        spec = Path("/dev/zero")
    elif kind == "symlink-to-device":
        spec.symlink_to("/dev/urandom")
    else:
        spec.write_bytes(b"# " + b"x" * (2 << 20))
    code, _, stderr = rockpool(tmp_path / "store", "spec", "check", str(spec))
    answered_clearly(code, stderr, {2})
    assert "regular file" in stderr or "larger than" in stderr


# ---- names, environment values, key files ---------------------------------------------


@pytest.fixture(scope="module")
def small_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    store = Store(tmp_path_factory.mktemp("fuzz-store"))
    land_small_image(store)
    return store.root


def entries(directory: Path) -> set[str]:
    return set(os.listdir(directory)) if directory.is_dir() else set()


_names = st.one_of(
    st.text(max_size=70),
    st.from_regex(r"[a-z0-9-]{1,70}", fullmatch=True),
    st.sampled_from(["../x", "a/b", ".", "..", "a\n", "a,b", "-a", "a" * 64, "a" * 63]),
)


@FUZZ
@given(name=_names)
def test_any_workspace_name(small_store: Path, name: str) -> None:
    assume("\x00" not in name)  # argv cannot carry a NUL
    before = entries(small_store / "workspaces")
    code, _, stderr = rockpool(small_store, "workspace", "create", name, "--image", "small")
    answered_clearly(code, stderr, {0, 2, 6})
    after = entries(small_store / "workspaces")
    if code == 0:
        assert is_slug(name) and after - before == {name}
        assert (small_store / "workspaces" / name / "workspace.json").is_file()
    else:
        assert after == before, "a refused create left something behind"
    code, _, stderr = rockpool(small_store, "image", "ls", name)
    answered_clearly(code, stderr, {0, 2})


@FUZZ
@given(
    key=st.one_of(st.text(max_size=30), st.from_regex(r"ROCKPOOL_[A-Z0-9_]{1,10}", fullmatch=True)),
    value=st.text(max_size=200),
)
def test_any_environment_value(tmp_path: Path, key: str, value: str) -> None:
    assume("\x00" not in key + value)
    disk = tmp_path / "config.img"
    disk.unlink(missing_ok=True)
    code, _, stderr = rockpool(
        tmp_path, "config-disk", str(disk), "--name", "alice", "--env", f"{key}={value}"
    )
    answered_clearly(code, stderr, {0, 2})
    assert disk.exists() == (code == 0)
    if key == "ROCKPOOL_INSTANCE_ID" and code == 0:
        assert is_instance_id(value)


@FUZZ
@given(content=st.one_of(st.binary(max_size=3000), st.text(max_size=3000).map(str.encode)))
def test_any_key_file(tmp_path: Path, content: bytes) -> None:
    keys = tmp_path / "keys"
    keys.write_bytes(content)
    disk = tmp_path / "config.img"
    disk.unlink(missing_ok=True)
    code, _, stderr = rockpool(
        tmp_path, "config-disk", str(disk), "--name", "alice", "--authorized-keys", str(keys)
    )
    answered_clearly(code, stderr, {0, 2})
    assert disk.exists() == (code == 0)


# ---- store records --------------------------------------------------------------------

_json_like = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=6)
    ),
    max_leaves=20,
)


@st.composite
def damaged_records(draw: st.DrawFn, original: dict[str, Any]) -> bytes:
    kind = draw(st.sampled_from(["bytes", "json", "field"]))
    if kind == "bytes":
        return draw(st.binary(max_size=300))
    if kind == "json":
        return json.dumps(draw(_json_like)).encode()
    field = draw(st.sampled_from(sorted(original)))
    return json.dumps({**original, field: draw(_json_like)}).encode()


@FUZZ_CLI_HEAVY
@given(data=st.data())
def test_any_workspace_record(small_store: Path, data: st.DataObject) -> None:
    name = f"victim-{uuid.uuid4().hex[:8]}"  # each example its own workspace
    copy = f"{name}-copy"
    code, _, stderr = rockpool(small_store, "workspace", "create", name, "--image", "small")
    answered_clearly(code, stderr, {0})
    record_path = small_store / "workspaces" / name / "workspace.json"
    original = json.loads(record_path.read_text())
    record_path.write_bytes(data.draw(damaged_records(original)))
    for args, allowed in (
        (("workspace", "ls"), {0}),
        (("workspace", "status", name), {0, 7}),
        (("workspace", "stop", name), {0, 7}),
        (("workspace", "clone", name, copy), {0, 7}),
        (("image", "gc"), {0}),
    ):
        code, _, stderr = rockpool(small_store, *args)
        answered_clearly(code, stderr, allowed)
    for workspace in (name, copy):
        if (small_store / "workspaces" / workspace).exists():
            code, _, stderr = rockpool(small_store, "workspace", "rm", "--force", workspace)
            answered_clearly(code, stderr, {0})
            assert not (small_store / "workspaces" / workspace).exists()


@FUZZ
@given(data=st.data())
def test_any_manifest(tmp_path_factory: pytest.TempPathFactory, data: st.DataObject) -> None:
    store = Store(tmp_path_factory.mktemp("manifest"))
    good = land_small_image(store)
    bad = land_small_image(store)
    original = json.loads((bad.path / "manifest.json").read_text())
    (bad.path / "manifest.json").write_bytes(data.draw(damaged_records(original)))
    for args, allowed in (
        (("image", "ls"), {0}),
        (("image", "inspect", bad.ref), {0, 7}),
        (("workspace", "create", "w", "--image", bad.ref), {0, 3, 7}),
        (("image", "gc"), {0}),
    ):
        code, _, stderr = rockpool(store.root, *args)
        answered_clearly(code, stderr, allowed)
    code, _, stderr = rockpool(store.root, "workspace", "rm", "--force", "w")
    answered_clearly(code, stderr, {0, 3})
    code, _, stderr = rockpool(store.root, "image", "rm", bad.ref)
    answered_clearly(code, stderr, {0})
    assert not bad.path.exists()
    # What is left is whole: gc kept the usable latest (good, unless bad was usable and
    # newer, when gc rightly removed good), and latest resolves.
    remaining = store.versions("small")
    assert all((v.path / "manifest.json").is_file() for v in remaining)
    assert good.path.is_dir() or not remaining
    assert not remaining or store.resolve("small").id == remaining[-1].id
