"""Spec validation: every bad input names the file and the key; good input resolves fully."""

from __future__ import annotations

from pathlib import Path

import pytest

from rockpool.errors import SpecError
from rockpool.spec import load_spec

REPO = Path(__file__).resolve().parents[2]
DEFAULT = REPO / "images" / "workspace.toml"

MINIMAL = """
[image]
name = "mini"
[debian]
packages = ["git"]
[node]
major = 24
[code_server]
version = "4.139.1"
[workspace]
user = "dev"
[provision]
script = "setup.sh"
"""


@pytest.fixture
def spec_dir(tmp_path: Path) -> Path:
    (tmp_path / "setup.sh").write_text("#!/bin/bash\n")
    return tmp_path


def write(directory: Path, text: str, name: str = "spec.toml") -> Path:
    path = directory / name
    path.write_text(text)
    return path


def test_default_spec_is_valid_and_has_the_kitchen_sink() -> None:
    spec = load_spec(DEFAULT)
    assert spec.name == "workspace"
    assert spec.suite == "trixie"
    assert spec.architecture in ("amd64", "arm64")
    assert spec.disk_size == 20 << 30
    assert spec.formats == ("raw", "qcow2", "incus", "incus-container")
    for package in (
        "git",
        "openssh-server",
        "bash",
        "curl",
        "wget",
        "jq",
        "make",
        "build-essential",
        "python3",
    ):
        assert package in spec.packages
    assert spec.node_major == 24
    assert spec.setup_script == (REPO / "images" / "scripts" / "setup.sh").resolve()


def test_minimal_spec_gets_defaults(spec_dir: Path) -> None:
    spec = load_spec(write(spec_dir, MINIMAL))
    assert spec.suite == "trixie"
    assert spec.disk_size == 20 << 30
    assert spec.formats == ("raw", "qcow2")
    assert spec.mirror == "http://deb.debian.org/debian"
    assert spec.memory == 4 << 30


@pytest.mark.parametrize(
    ("edit", "key", "fragment"),
    [
        (("[image]", '[image]\ncolour = "red"'), "image.colour", "unknown key"),
        (("[image]", "[imaje]\nx = 1\n[image]"), "imaje", "unknown section"),
        (('name = "mini"', "name = 42"), "image.name", "1 to 63 characters"),
        (('name = "mini"', 'name = "Mini_Image"'), "image.name", "1 to 63"),
        (("[image]", '[image]\ndisk_size = "lots"'), "image.disk_size", "not a size"),
        (("[image]", '[image]\ndisk_size = "1G"'), "image.disk_size", "between 4G"),
        (("[image]", '[image]\ndisk_size = "4194305K"'), "image.disk_size", "whole number of MiB"),
        (("[image]", '[image]\narchitecture = "riscv64"'), "image.architecture", "riscv64"),
        (("[image]", '[image]\nsuite = "jessie"'), "image.suite", "one of"),
        (("[image]", '[image]\nformats = ["vmdk"]'), "image.formats", "vmdk"),
        (("[image]", "[image]\nformats = []"), "image.formats", "must not be empty"),
        (("major = 24", 'major = "24"'), "node.major", "whole number"),
        (("major = 24", "major = 8"), "node.major", "between"),
        (('version = "4.139.1"', 'version = "latest"'), "code_server.version", "exact"),
        (('user = "dev"', 'user = "root"'), "workspace.user", "system account"),
        (('user = "dev"', 'user = "Dev User"'), "workspace.user", "Unix user name"),
        (('packages = ["git"]', 'packages = ["Git Tools"]'), "debian.packages", "item 1"),
        (('packages = ["git"]', 'packages = "git"'), "debian.packages", "must be a list"),
        (('script = "setup.sh"', 'script = "missing.sh"'), "provision.script", "not found"),
        (("[workspace]", '[workspace]\nmemory = "512M"'), "workspace.memory", "between"),
    ],
)
def test_bad_values_name_the_file_and_key(
    spec_dir: Path, edit: tuple[str, str], key: str, fragment: str
) -> None:
    old, new = edit
    assert old in MINIMAL
    path = write(spec_dir, MINIMAL.replace(old, new, 1))
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    error = caught.value
    assert error.key == key
    assert str(path) in str(error)
    assert fragment in str(error)
    assert error.exit_code == 2


def test_missing_required_key(spec_dir: Path) -> None:
    path = write(spec_dir, MINIMAL.replace('[code_server]\nversion = "4.139.1"\n', ""))
    with pytest.raises(SpecError, match=r"code_server.version: is required"):
        load_spec(path)


def test_broken_toml_and_missing_file(spec_dir: Path) -> None:
    with pytest.raises(SpecError, match="not valid TOML"):
        load_spec(write(spec_dir, "[image\nname="))
    with pytest.raises(SpecError, match="file not found"):
        load_spec(spec_dir / "nope.toml")


def test_variant_extends_adds_and_removes_packages(spec_dir: Path) -> None:
    write(spec_dir, MINIMAL.replace('["git"]', '["git", "make", "curl"]'), "base.toml")
    variant = write(
        spec_dir,
        """
extends = "base.toml"
[image]
name = "mini-variant"
disk_size = "8G"
[debian]
add_packages = ["htop"]
remove_packages = ["make"]
""",
        "variant.toml",
    )
    spec = load_spec(variant)
    assert spec.name == "mini-variant"
    assert spec.packages == ("git", "curl", "htop")
    assert spec.disk_size == 8 << 30
    assert spec.user == "dev"  # inherited
    assert spec.extends == ((spec_dir / "base.toml").resolve(),)
    assert spec.setup_script == (spec_dir / "setup.sh").resolve()


def test_variant_errors_name_the_variant(spec_dir: Path) -> None:
    write(spec_dir, MINIMAL, "base.toml")
    variant = write(
        spec_dir, 'extends = "base.toml"\n[debian]\nremove_packages = ["vim"]\n', "variant.toml"
    )
    with pytest.raises(SpecError) as caught:
        load_spec(variant)
    assert caught.value.path == variant.resolve()
    assert caught.value.key == "debian.remove_packages"


def test_extends_loop_and_missing_parent(spec_dir: Path) -> None:
    a = write(spec_dir, 'extends = "b.toml"\n', "a.toml")
    write(spec_dir, 'extends = "a.toml"\n', "b.toml")
    with pytest.raises(SpecError, match="loop"):
        load_spec(a)
    orphan = write(spec_dir, 'extends = "gone.toml"\n', "orphan.toml")
    with pytest.raises(SpecError, match="does not exist"):
        load_spec(orphan)


def test_input_digest_follows_inputs(spec_dir: Path) -> None:
    from rockpool.build.keys import input_digest
    from rockpool.build.plan import BuildPlan

    path = write(spec_dir, MINIMAL)

    def digest() -> str:
        return input_digest(BuildPlan.resolve(load_spec(path), use_lock=False))

    first = digest()
    assert digest() == first
    (spec_dir / "setup.sh").write_text("#!/bin/bash\necho changed\n")
    assert digest() != first
    path.write_text(path.read_text().replace('"4.139.1"', '"4.139.0"'))
    assert digest() != first


def test_code_server_can_be_left_out_only_by_name(spec_dir: Path) -> None:
    without = load_spec(write(spec_dir, MINIMAL.replace('"4.139.1"', '"none"')))
    assert without.code_server_version is None
    assert load_spec(write(spec_dir, MINIMAL)).code_server_version == "4.139.1"
    with pytest.raises(SpecError, match='or "none"') as caught:
        load_spec(write(spec_dir, MINIMAL.replace('"4.139.1"', '"latest"')))
    assert caught.value.key == "code_server.version"


def test_the_arm64_specs_share_the_default_spec_and_script() -> None:
    default = load_spec(DEFAULT)
    arm64 = load_spec(REPO / "images" / "workspace-arm64.toml")
    assert arm64.architecture == "arm64" and arm64.setup_script == default.setup_script
    assert arm64.packages == default.packages and arm64.formats == ("tart", "tart-oci", "qcow2")
    assert arm64.code_server_version == default.code_server_version
    test_spec = load_spec(REPO / "tests" / "specs" / "arm64.toml")
    assert test_spec.setup_script == default.setup_script and test_spec.architecture == "arm64"


def test_a_format_without_the_one_it_needs_names_both(spec_dir: Path) -> None:
    text = MINIMAL.replace('name = "mini"', 'name = "mini"\nformats = ["raw", "incus"]')
    with pytest.raises(SpecError) as caught:
        load_spec(write(spec_dir, text))
    message = str(caught.value)
    assert "image.formats" in message and "spec.toml" in message
    assert "incus format needs qcow2" in message
    assert "'qcow2'" in (caught.value.hint or "")
