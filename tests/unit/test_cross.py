"""The native cross compiler of a foreign-architecture build (the build itself, and the
arm64 image it compiles: tests/e2e/test_tart_arm64.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from rockpool.build import cross, provision
from rockpool.build.cross import CrossToolchain, cross_recipe, unpacked_versions
from rockpool.spec import load_spec
from tests.contexts import quiet_context

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("host", "target", "compiles_with"),
    [
        ("amd64", "arm64", "gcc-14-aarch64-linux-gnu"),
        ("amd64", "amd64", None),  # native: the root's own gcc
        ("arm64", "arm64", None),
    ],
)
def test_only_a_foreign_target_gets_a_cross_compiler(
    monkeypatch: pytest.MonkeyPatch, host: str, target: str, compiles_with: str | None
) -> None:
    monkeypatch.setattr(cross, "host_architecture", lambda: host)
    recipe = cross_recipe(target)
    if compiles_with is None:
        assert recipe is None
    else:
        assert recipe is not None and compiles_with in recipe


def test_the_unpacked_versions_are_read_from_the_deb_names(tmp_path: Path) -> None:
    for name in (
        "gcc-14-aarch64-linux-gnu_14.2.0-19cross1_amd64.deb",
        "libgmp10_2%3a6.3.0+dfsg-3_amd64.deb",
        "partial",
    ):
        (tmp_path / name).touch()
    assert unpacked_versions(tmp_path) == {
        "gcc-14-aarch64-linux-gnu": "14.2.0-19cross1",
        "libgmp10": "2:6.3.0+dfsg-3",
    }


def test_setup_compiles_with_the_mounted_cross_compiler(tmp_path: Path) -> None:
    ctx = quiet_context(load_spec(REPO / "images" / "workspace-arm64.toml"), tmp_path)
    toolchain = CrossToolchain(tmp_path / "xtc", "aarch64-linux-gnu", {})
    argv = provision.provision_argv(ctx, toolchain)
    assert argv[-2:] == [str(tmp_path / "xtc"), "aarch64-linux-gnu"]
    assert f"CROSS_MOUNT={cross.MOUNT_POINT}\n" in str(argv[2])
    assert provision.provision_argv(ctx)[-2:] == ["", ""]  # a native build mounts nothing
    env = toolchain.environment()
    assert env["CXX"] == f"{cross.MOUNT_POINT}/usr/bin/aarch64-linux-gnu-g++-14"
    assert all(path.startswith(cross.MOUNT_POINT + "/") for path in env.values())
