"""An installed rockpool works on its own: the default specs, their lock and setup.sh ship
in the package, `extends = "rockpool:NAME"` names them from anywhere, and a wheel
installed into a fresh venv checks and starts specs from any directory."""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from rockpool import cli, spec
from rockpool.errors import SpecError
from rockpool.spec import PACKAGED_SPECS, default_spec_path, load_spec

REPO = Path(__file__).resolve().parents[2]


def test_the_checkout_images_are_the_packaged_ones() -> None:
    # images/ is a link into the package, so every path under images/ keeps working.
    assert (REPO / "images").is_symlink()
    assert (REPO / "images" / "workspace.toml").resolve() == PACKAGED_SPECS / "workspace.toml"
    assert spec.packaged_spec_names() == ["workspace-arm64.toml", "workspace.toml"]
    for name in ("workspace.lock.json", "workspace-arm64.lock.json", "scripts/setup.sh"):
        assert (PACKAGED_SPECS / name).is_file(), name


def test_without_a_spec_here_the_default_is_the_packaged_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert default_spec_path() == PACKAGED_SPECS / "workspace.toml"
    own = tmp_path / "images" / "workspace.toml"
    own.parent.mkdir()
    own.write_text("")
    assert default_spec_path() == tmp_path / "images" / "workspace.toml"  # ./images/ wins


def test_no_default_spec_anywhere_is_exit_2_with_a_hint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(spec, "PACKAGED_SPECS", tmp_path / "broken-install")
    assert cli.main(["spec", "check"]) == 2
    stderr = capsys.readouterr().err
    assert "no spec given, and the default spec is not here" in stderr
    assert "hint: pass a spec's path" in stderr and "reinstall rockpool" in stderr
    assert "Traceback" not in stderr


def test_extends_names_a_packaged_spec(tmp_path: Path) -> None:
    variant = tmp_path / "mine.toml"
    variant.write_text('extends = "rockpool:workspace-arm64.toml"\n[image]\nname = "mine"\n')
    loaded = load_spec(variant)
    assert loaded.name == "mine" and loaded.architecture == "arm64"
    assert loaded.extends == (
        PACKAGED_SPECS / "workspace.toml",
        PACKAGED_SPECS / "workspace-arm64.toml",
    )
    assert loaded.setup_script == PACKAGED_SPECS / "scripts" / "setup.sh"
    # The variant's own script resolves relative to the variant, as any path in it does.
    (tmp_path / "my-setup.sh").write_text("#!/bin/bash\n")
    variant.write_text(
        'extends = "rockpool:workspace.toml"\n[image]\nname = "mine"\n'
        '[provision]\nscript = "my-setup.sh"\n'
    )
    assert load_spec(variant).setup_script == tmp_path / "my-setup.sh"


@pytest.mark.parametrize("name", ["nope.toml", "", "../workspace.toml", "scripts/setup.sh"])
def test_extends_of_a_spec_rockpool_does_not_ship_is_a_spec_error(
    tmp_path: Path, name: str
) -> None:
    variant = tmp_path / "mine.toml"
    variant.write_text(f'extends = "rockpool:{name}"\n[image]\nname = "mine"\n')
    with pytest.raises(SpecError) as caught:
        load_spec(variant)
    assert caught.value.path == variant.resolve() and caught.value.key == "extends"
    assert f"rockpool has no packaged spec '{name}'" in caught.value.message
    assert caught.value.hint is not None and "rockpool:workspace.toml" in caught.value.hint


def test_spec_init_writes_a_variant_of_the_packaged_spec(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert cli.main(["spec", "init", "mine.toml", "--json"]) == 0
    written = json.loads(capsys.readouterr().out)
    target = tmp_path / "mine.toml"
    assert written == {"path": str(target), "name": "mine", "extends": "rockpool:workspace.toml"}
    text = target.read_text()
    assert 'extends = "rockpool:workspace.toml"' in text and str(PACKAGED_SPECS) not in text
    variant, default = load_spec(target), load_spec(PACKAGED_SPECS / "workspace.toml")
    assert variant.name == "mine" and variant.extends == (default.path,)
    assert (variant.packages, variant.setup_script) == (default.packages, default.setup_script)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.toml"]  # no temporary left

    assert cli.main(["spec", "init", "arm.toml", "--arm64"]) == 0
    assert capsys.readouterr().out == "arm.toml\n"
    arm = load_spec(tmp_path / "arm.toml")
    assert arm.architecture == "arm64" and arm.formats == ("tart", "tart-oci", "qcow2")
    # A file named like a packaged image still gets a name of its own.
    assert cli.main(["spec", "init", "workspace.toml"]) == 0
    assert load_spec(tmp_path / "workspace.toml").name == "workspace-variant"


def test_spec_init_never_overwrites_without_force(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    target = tmp_path / "mine.toml"
    target.write_text("# my own work\n")
    assert cli.main(["spec", "init", "mine.toml"]) == 2
    stderr = capsys.readouterr().err
    assert "mine.toml: exists already; nothing was written" in stderr and "--force" in stderr
    assert "Traceback" not in stderr
    assert target.read_text() == "# my own work\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.toml"]
    assert cli.main(["spec", "init", "mine.toml", "--force"]) == 0
    assert load_spec(target).name == "mine"
    # A directory that is not there: one clear error, nothing written.
    assert cli.main(["spec", "init", "gone/mine.toml"]) == 2
    assert "gone/mine.toml: cannot write: No such file or directory" in capsys.readouterr().err


@pytest.fixture
def no_build(monkeypatch: pytest.MonkeyPatch) -> None:
    """A lock that is refused must be refused before its slow resolving build."""
    from rockpool.build import locking

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("the resolving build started")

    monkeypatch.setattr(locking, "build_plan", fail)


@pytest.mark.usefixtures("no_build")
def test_lock_of_an_installed_spec_is_refused_with_a_hint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert not spec.is_installed_spec(REPO / "images" / "workspace.toml")  # a checkout locks
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ROCKPOOL_HOME", str(tmp_path / "store"))
    monkeypatch.setattr(site, "getsitepackages", lambda: [str(REPO / "src")])  # "installed"
    assert spec.is_installed_spec(PACKAGED_SPECS / "workspace-arm64.toml")
    assert cli.main(["image", "lock", "--json"]) == 2
    error = json.loads(capsys.readouterr().out)["error"]
    assert error["kind"] == "InvalidInput" and "spec of the installed rockpool" in error["message"]
    assert str(PACKAGED_SPECS / "workspace.toml") in error["message"]
    assert "rockpool spec init my.toml" in error["hint"]
    assert "rockpool image lock my.toml" in error["hint"]
    assert not (tmp_path / "store").exists()


@pytest.mark.usefixtures("no_build")
def test_lock_beside_a_spec_in_a_read_only_directory_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert cli.main(["spec", "init", "mine.toml"]) == 0
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path)
    assert cli.main(["image", "lock", "mine.toml"]) == 2
    stderr = capsys.readouterr().err
    assert f"cannot write the lock {tmp_path / 'mine.lock.json'}" in stderr
    assert f"{tmp_path} is not writable" in stderr and "rockpool spec init" in stderr


# ---- the installed wheel ----------------------------------------------------------------

# What building the wheel reads; built from a copy, so that the build's build/ and
# *.egg-info never land in the checkout.
WHEEL_SOURCES = ("pyproject.toml", "README.md", "src")
PACKAGED = ("workspace.toml", "workspace.lock.json", "workspace-arm64.toml", "scripts/setup.sh")


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment without what would import the checkout instead of the wheel."""
    leaks = {"PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONUSERBASE", "VIRTUAL_ENV"}
    env = {k: v for k, v in os.environ.items() if k not in leaks}
    return {**env, "PYTHONNOUSERSITE": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1", **extra}


def _run(argv: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _checked(argv: list[str], cwd: Path, env: dict[str, str]) -> str:
    result = _run(argv, cwd, env)
    assert result.returncode == 0, f"{argv}: {result.stdout}\n{result.stderr}"
    return result.stdout


def _tree(root: Path) -> set[str]:
    return {p.name for p in root.iterdir()} | {f"src/{p.name}" for p in (root / "src").iterdir()}


def test_an_installed_wheel_works_outside_the_checkout(tmp_path: Path) -> None:
    """pip wheel, then pip install into a fresh venv (setuptools and the dependencies come
    from PyPI, as for scripts/setup-host.sh; its Python has venv and ensurepip)."""
    before = _tree(REPO)
    source, wheels, venv = tmp_path / "source", tmp_path / "wheels", tmp_path / "venv"
    source.mkdir()
    for name in WHEEL_SOURCES:
        if (REPO / name).is_dir():
            ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")
            shutil.copytree(REPO / name, source / name, ignore=ignore)
        else:
            shutil.copy2(REPO / name, source / name)
    env = _clean_env()
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels)]
    _checked([*pip_wheel, str(source)], tmp_path, env)
    (wheel,) = wheels.glob("rockpool_images-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        for name in PACKAGED:
            packaged = archive.read(f"rockpool/images/{name}")
            assert packaged == (REPO / "images" / name).read_bytes(), name
        assert "rockpool/cli.py" in archive.namelist()

    # A fresh venv that sees neither the checkout nor this venv: the wheel and its
    # dependencies from PyPI only.
    _checked([sys.executable, "-m", "venv", str(venv)], tmp_path, env)
    python, rockpool = venv / "bin" / "python", venv / "bin" / "rockpool"
    _checked([str(python), "-m", "pip", "install", "-q", str(wheel)], tmp_path, env)
    purelib = "import sysconfig; print(sysconfig.get_path('purelib'))"
    site_packages = Path(_checked([str(python), "-c", purelib], tmp_path, env).strip()).resolve()
    assert site_packages.is_relative_to(venv.resolve())

    outside = tmp_path / "elsewhere"  # no images/ here, nor above
    outside.mkdir()
    env = _clean_env(ROCKPOOL_HOME=str(tmp_path / "store"))
    checked = json.loads(_checked([str(rockpool), "spec", "check", "--json"], outside, env))
    packaged_spec = site_packages / "rockpool" / "images" / "workspace.toml"
    assert checked["name"] == "workspace" and checked["path"] == str(packaged_spec)
    assert checked["setup_script"] == str(site_packages / "rockpool/images/scripts/setup.sh")

    _checked([str(rockpool), "spec", "init", "variant.toml"], outside, env)
    assert str(site_packages) not in (outside / "variant.toml").read_text()  # upgrades keep it
    variant = json.loads(
        _checked([str(rockpool), "spec", "check", "variant.toml", "--json"], outside, env)
    )
    assert variant["name"] == "variant" and variant["path"] == str(outside / "variant.toml")
    assert variant["extends"] == [str(packaged_spec)]
    assert variant["packages"] == checked["packages"]

    usage = _checked([str(rockpool), "image", "build", "--help"], outside, env)
    assert "default: ./images/workspace.toml if there is one here" in " ".join(usage.split())

    # Locking the packaged spec is refused before any build (the bad CA bundle stops a
    # build at once, should the refusal ever be missing).
    lock = [str(rockpool), "image", "lock", "--ca-bundle", str(tmp_path / "no-bundle.pem")]
    refused = _run(lock, outside, env)
    assert refused.returncode == 2, refused.stderr
    assert f"{packaged_spec} is a spec of the installed rockpool" in refused.stderr
    assert "hint: lock a variant of your own: rockpool spec init my.toml" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert sorted(p.name for p in outside.iterdir()) == ["variant.toml"]
    assert _tree(REPO) == before  # the build left nothing in the checkout
