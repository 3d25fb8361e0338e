"""The Packer path: its template, its host check, and a whole build run against stand-in
packer and tart commands (the real ones need macOS on Apple Silicon)."""

from __future__ import annotations

import json
import os
import platform
import sys
import textwrap
from pathlib import Path
from typing import Any

import hcl2
import pytest

from rockpool.build import packer
from rockpool.build.packer import hcl_string, render_template, require_packer_host
from rockpool.build.provision import installed_versions, setup_environment
from rockpool.errors import CommandFailed, InvalidInput, MissingTool, SpecError
from rockpool.formats.tart_oci import TART_NVRAM_TYPE, read_manifest
from rockpool.progress import Reporter
from rockpool.spec import ImageSpec, load_spec
from rockpool.store import Store
from rockpool.tools import packer as packer_cli
from tests.contexts import quiet_context

REPO = Path(__file__).resolve().parents[2]
ARM64_SPEC = REPO / "images" / "workspace-arm64.toml"
SETUP_SH = (REPO / "images" / "scripts" / "setup.sh").resolve()  # images/ is a link
BASE = "ghcr.io/cirruslabs/debian:latest"
# python-hcl2 resolves \" and the like but keeps $${ and %%{ as written.
OPTIONS = hcl2.SerializationOptions(
    strip_string_quotes=True, explicit_blocks=False, with_comments=False
)


def parse(spec: ImageSpec, vm_name: str = "rockpool-build-0123abcd") -> dict[str, Any]:
    parsed: dict[str, Any] = hcl2.loads(
        render_template(spec, vm_name=vm_name, base_vm=BASE), serialization_options=OPTIONS
    )
    return parsed


def tart_source(template: dict[str, Any]) -> dict[str, Any]:
    sources = [
        body for block in template["source"] for kind, named in block.items()
        for body in named.values() if kind == "tart-cli"
    ]  # fmt: skip
    assert len(template["source"]) == 1 and len(sources) == 1
    source: dict[str, Any] = sources[0]
    return source


def provisioners(template: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    (build,) = template["build"]
    return [(kind, body) for block in build["provisioner"] for kind, body in block.items()]


def variant(tmp_path: Path, body: str, extends: Path = ARM64_SPEC) -> ImageSpec:
    path = tmp_path / "variant.toml"
    path.write_text(f'extends = "{extends}"\n' + textwrap.dedent(body))
    return load_spec(path)


def template_env(template: dict[str, Any]) -> dict[str, str]:
    (env,) = [b["environment_vars"] for _, b in provisioners(template) if "environment_vars" in b]
    return dict(item.split("=", 1) for item in env)


def mmdebstrap_setup_env(spec: ImageSpec, tmp_path: Path) -> dict[str, str]:
    """setup.sh's settings in an mmdebstrap build resolved as the Packer path resolves
    (build/packer.py: no lock; a lock's SETUP_* pins are the mmdebstrap path's only)."""
    ctx = quiet_context(spec, tmp_path, use_lock=False)
    return {k: v for k, v in setup_environment(ctx).items() if k.startswith("SETUP_")}


# ---- the template -----------------------------------------------------------------------


def test_the_template_builds_the_arm64_spec_with_the_tart_cli_builder(tmp_path: Path) -> None:
    spec = load_spec(ARM64_SPEC)
    template = parse(spec, vm_name="rockpool-build-0123abcd")

    (packer_block,) = template["packer"]
    (plugins,) = packer_block["required_plugins"]
    assert plugins["tart"]["source"] == "github.com/cirruslabs/tart"
    assert plugins["tart"]["version"].startswith(">= 1.")

    source = tart_source(template)
    assert source["vm_base_name"] == BASE
    assert source["vm_name"] == "rockpool-build-0123abcd"
    assert source["cpu_count"] == spec.cpus == 2
    assert source["memory_gb"] == spec.memory >> 30 == 4
    # Tart's --disk-size counts decimal GB: 20 GiB rounds up to 22 GB, never down.
    assert source["disk_size_gb"] == 22
    assert source["disk_size_gb"] * 1000**3 >= spec.disk_size
    assert source["headless"] is True and source["disable_vnc"] is True
    assert source["recovery_partition"] == "keep"  # a Linux GPT is left alone
    assert source["always_pull"] is True  # a registry image: "latest" is pulled anew
    assert (source["ssh_username"], source["ssh_password"]) == ("admin", "admin")
    (build,) = template["build"]
    assert build["sources"] == [f"source.tart-cli.{spec.name}"]


def test_setup_sh_is_the_only_script_and_gets_the_mmdebstrap_paths_settings(
    tmp_path: Path,
) -> None:
    spec = load_spec(ARM64_SPEC)
    template = parse(spec)
    steps = provisioners(template)
    scripts = [body[key] for _, body in steps for key in ("script", "scripts") if key in body]
    assert scripts == [str(SETUP_SH)]
    assert spec.setup_script == SETUP_SH
    # Files only come back from the guest (package versions); nothing else goes in.
    assert all(body["direction"] == "download" for kind, body in steps if kind == "file")
    (setup,) = [body for _, body in steps if "script" in body]
    assert setup["execute_command"].startswith("sudo ")

    assert template_env(template) == mmdebstrap_setup_env(spec, tmp_path)
    assert set(template_env(template)) >= {"SETUP_USER", "SETUP_PACKAGES", "SETUP_NODE_MAJOR"}


def test_the_last_step_removes_the_build_login_then_seals_and_powers_off() -> None:
    steps = provisioners(parse(load_spec(ARM64_SPEC)))
    kind, last = steps[-1]
    assert kind == "shell"
    assert last["expect_disconnect"] is True and last["skip_clean"] is True
    assert last["execute_command"].startswith("sudo ")
    lines: list[str] = last["inline"]
    script = "\n".join(lines)
    assert 'userdel --force --remove "$user"' in script and lines[0] == "user=admin"
    assert "/etc/shadow-" in script  # userdel's backup still holds the password hash
    assert "cloud-init.disabled" in script
    seal = lines.index("/usr/local/sbin/rockpool-seal")
    assert seal > lines.index('userdel --force --remove "$user"')
    assert "poweroff" in lines[-1] and seal == len(lines) - 2
    # rockpool-seal is what setup.sh installs.
    assert "write_file /usr/local/sbin/rockpool-seal 0755" in SETUP_SH.read_text()


def test_a_variant_changes_exactly_its_cpus_memory_and_disk(tmp_path: Path) -> None:
    base = parse(load_spec(ARM64_SPEC))
    changed = parse(
        variant(tmp_path, '[image]\ndisk_size = "40G"\n[workspace]\ncpus = 6\nmemory = "12G"\n')
    )
    old, new = tart_source(base), tart_source(changed)
    assert {k for k in old if old[k] != new[k]} == {"cpu_count", "memory_gb", "disk_size_gb"}
    assert (new["cpu_count"], new["memory_gb"], new["disk_size_gb"]) == (6, 12, 43)
    assert base["build"] == changed["build"] and base["packer"] == changed["packer"]


def test_memory_must_be_whole_gib(tmp_path: Path) -> None:
    spec = variant(tmp_path, '[workspace]\nmemory = "1536M"\n')
    with pytest.raises(SpecError) as caught:
        render_template(spec, vm_name="v", base_vm=BASE)
    assert caught.value.key == "workspace.memory"


def test_the_build_login_cannot_be_the_workspace_user_or_root() -> None:
    spec = load_spec(ARM64_SPEC)
    for user in ("root", spec.user):
        with pytest.raises(InvalidInput):
            render_template(spec, vm_name="v", base_vm=BASE, build_user=user)


@pytest.mark.parametrize(
    "value",
    ['say "hi"', "${var.secret}", "%{ if x }", "$${x}", "back\\slash\\", "tab\tnl\né", "a}b{c"],
)
def test_hcl_string_escapes_round_trip(value: str) -> None:
    loaded = hcl2.loads(f"v = {hcl_string(value)}\n", serialization_options=OPTIONS)["v"]
    # HCL reads $${ and %%{ as a literal ${ and %{: never an interpolation.
    assert loaded == value.replace("${", "$${").replace("%{", "%%{")


def test_spec_strings_reach_the_template_escaped(tmp_path: Path) -> None:
    registry = 'https://npm.example/a"b${c}%{d}'
    spec = variant(tmp_path, f"[node]\nregistry = '{registry}'\n")
    env = template_env(parse(spec))
    assert env["SETUP_NPM_REGISTRY"] == registry.replace("${", "$${").replace("%{", "%%{")


# ---- the host ---------------------------------------------------------------------------


def test_linux_is_refused_with_the_default_builder_as_the_way() -> None:
    if sys.platform == "darwin":
        pytest.skip("this checks a non-macOS host")
    with pytest.raises(MissingTool) as caught:
        require_packer_host(load_spec(ARM64_SPEC))
    assert "macOS" in caught.value.message
    assert "rockpool image build SPEC" in str(caught.value.hint)


@pytest.fixture
def on_a_mac(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(platform, "system", lambda: "Darwin")
    monkeypatch.setattr(platform, "machine", lambda: "arm64")


@pytest.mark.usefixtures("on_a_mac")
def test_a_mac_without_packer_and_tart_is_told_to_install_them(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(MissingTool) as caught:
        require_packer_host(load_spec(ARM64_SPEC))
    assert "packer" in caught.value.message and "tart" in caught.value.message
    assert caught.value.hint == "run: brew install hashicorp/tap/packer cirruslabs/cli/tart"


@pytest.mark.usefixtures("on_a_mac")
def test_an_intel_mac_and_an_amd64_spec_are_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    amd64 = variant(tmp_path, '[image]\narchitecture = "amd64"\nformats = ["raw"]\n')
    with pytest.raises(SpecError) as caught:
        require_packer_host(amd64)
    assert caught.value.key == "image.architecture"
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    with pytest.raises(MissingTool, match="Apple Silicon"):
        require_packer_host(load_spec(ARM64_SPEC))


# ---- a whole build, against stand-ins ---------------------------------------------------

# Stand-ins for what Packer and Tart leave behind, not for how they work: `packer build`
# makes the VM directory Tart would ($TART_HOME/vms/NAME) and the files the template's
# download provisioners fetch; `tart delete` removes the directory.
FAKE_PACKER = """\
import json, os, sys
from pathlib import Path
import hcl2

log = Path(os.environ["FAKE_LOG"])
with log.open("a") as handle:
    handle.write(json.dumps(["packer", *sys.argv[1:]]) + "\\n")
if sys.argv[1] == "init":
    sys.exit(0)
template_dir = Path(sys.argv[-1])
options = hcl2.SerializationOptions(strip_string_quotes=True, explicit_blocks=False)
text = (template_dir / "rockpool.pkr.hcl").read_text()
template = hcl2.loads(text, serialization_options=options)
source = next(iter(next(iter(template["source"][0].values())).values()))
vm = Path(os.environ["TART_HOME"]) / "vms" / source["vm_name"]
vm.mkdir(parents=True)
(vm / "config.json").write_text(json.dumps({"version": 1, "os": "linux", "arch": "arm64",
    "cpuCount": source["cpu_count"], "memorySize": source["memory_gb"] << 30,
    "macAddress": "52:54:00:12:34:56", "diskFormat": "raw"}))
with open(vm / "disk.img", "wb") as disk:
    disk.truncate(8 << 20)
    disk.seek(1 << 20)
    disk.write(b"rockpool guest" * 1000)
(vm / "nvram.bin").write_bytes(b"VZEFIVariableStore stand-in")
if os.environ.get("FAKE_PACKER_FAIL"):
    sys.exit("Build 'tart-cli.workspace-arm64' errored: Script exited with non-zero exit status")
guest = {
    "var/lib/dpkg/status": "Package: bash\\nStatus: install ok installed\\nVersion: 5.2.37-2\\n",
    "usr/local/include/node/node_version.h": "#define NODE_MAJOR_VERSION 24\\n"
        "#define NODE_MINOR_VERSION 11\\n#define NODE_PATCH_VERSION 1\\n",
    "usr/local/lib/node_modules/npm/package.json": '{"version": "11.6.2"}',
    "usr/local/lib/node_modules/code-server/package.json": '{"version": "4.139.1"}',
}
for block in template["build"][0]["provisioner"]:
    body = block.get("file")
    if body:
        target = Path(body["destination"].replace("${path.root}", str(template_dir)))
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(guest[body["source"].lstrip("/")])
"""
FAKE_TART = """\
import json, os, shutil, sys
from pathlib import Path

with Path(os.environ["FAKE_LOG"]).open("a") as handle:
    handle.write(json.dumps(["tart", *sys.argv[1:]]) + "\\n")
if sys.argv[1] == "delete":
    shutil.rmtree(Path(os.environ["TART_HOME"]) / "vms" / sys.argv[2])
"""


@pytest.fixture
def stand_ins(on_a_mac: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, code in (("packer", FAKE_PACKER), ("tart", FAKE_TART)):
        tool = bin_dir / name
        tool.write_text(f"#!{sys.executable}\n{code}")
        tool.chmod(0o755)
    log = tmp_path / "calls.log"
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("TART_HOME", str(tmp_path / "tart"))
    monkeypatch.setenv("FAKE_LOG", str(log))
    # clean_environment passes on only what it knows; the stand-ins need their log too.
    monkeypatch.setattr(packer_cli, "PASSED_VARIABLES", (*packer_cli.PASSED_VARIABLES, "FAKE_LOG"))
    return log


@pytest.mark.usefixtures("stand_ins")
def test_a_format_whose_tool_is_missing_is_refused_before_the_build(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(packer, "FORMAT_TOOLS", {"qcow2": {"rockpool-no-such-tool": "qemu"}})
    with pytest.raises(MissingTool) as caught:
        require_packer_host(load_spec(ARM64_SPEC))  # its formats include qcow2
    assert "qcow2" in caught.value.message and "rockpool-no-such-tool" in caught.value.message
    assert str(caught.value.hint).startswith("run: brew install qemu")


def calls(log: Path) -> list[list[str]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def test_a_packer_build_lands_the_vm_tart_made(stand_ins: Path, tmp_path: Path) -> None:
    spec = variant(tmp_path, '[image]\nformats = ["tart", "tart-oci", "raw"]\n')
    store = Store(tmp_path / "store")
    reporter = Reporter(interactive=False, quiet=True)
    result = packer.build_with_packer(spec, store, reporter, force=False, base_vm=BASE)

    assert not result.reused
    version = result.landed
    bundle = version.output_path("tart")
    assert sorted(p.name for p in bundle.iterdir()) == ["config.json", "disk.img", "nvram.bin"]
    assert (bundle / "nvram.bin").read_bytes() == b"VZEFIVariableStore stand-in"
    assert (bundle / "disk.img").read_bytes() == version.output_path("raw").read_bytes()
    manifest_blob = read_manifest(version.output_path("tart-oci"))[0]
    nvram_layers = [x for x in manifest_blob["layers"] if x["mediaType"] == TART_NVRAM_TYPE]
    assert len(nvram_layers) == 1  # the VM's own: `tart pull` needs it
    blob = version.output_path("tart-oci") / "blobs/sha256" / nvram_layers[0]["digest"][7:]
    assert blob.read_bytes() == b"VZEFIVariableStore stand-in"
    manifest = version.manifest
    assert manifest["builder"]["name"] == "packer" and manifest["builder"]["base_vm"] == BASE
    assert manifest["packages"]["debian"] == {"bash": "5.2.37-2"}
    assert manifest["packages"]["npm"] == {
        "node": "24.11.1",
        "npm": "11.6.2",
        "code-server": "4.139.1",
    }
    assert set(manifest["outputs"]) == {"tart", "tart-oci", "raw"}

    made = calls(stand_ins)
    vm_name = made[-1][-1]
    assert [c[:2] for c in made] == [["packer", "init"], ["packer", "build"], ["tart", "delete"]]
    assert made[1][2:4] == ["-color=false", "-timestamp-ui"]
    assert vm_name.startswith("rockpool-build-")
    assert not (tmp_path / "tart" / "vms" / vm_name).exists()
    assert list((tmp_path / "store" / "staging").iterdir()) == []

    again = packer.build_with_packer(spec, store, reporter, force=False, base_vm=BASE)
    assert again.reused and again.landed.id == version.id
    assert len(calls(stand_ins)) == len(made)  # nothing ran


def test_a_failed_packer_build_still_deletes_its_vm(
    stand_ins: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("FAKE_PACKER_FAIL", "1")
    monkeypatch.setattr(
        packer_cli, "PASSED_VARIABLES", (*packer_cli.PASSED_VARIABLES, "FAKE_PACKER_FAIL")
    )
    store = Store(tmp_path / "store")
    spec = variant(tmp_path, '[image]\nformats = ["tart"]\n')
    with pytest.raises(CommandFailed) as caught:
        packer.build_with_packer(
            spec, store, Reporter(interactive=False, quiet=True), force=False, base_vm=BASE
        )
    assert "errored" in caught.value.stderr_tail
    made = calls(stand_ins)
    assert [c[:2] for c in made] == [["packer", "init"], ["packer", "build"], ["tart", "delete"]]
    assert list((tmp_path / "tart" / "vms").iterdir()) == []
    assert store.versions(spec.name) == []


def test_the_guest_files_fetched_are_what_installed_versions_reads(tmp_path: Path) -> None:
    # The template downloads packer.VERSION_FILES; a root holding only them must give
    # every version the manifest records.
    contents = {
        "var/lib/dpkg/status": "Package: git\nStatus: install ok installed\nVersion: 1:2.47\n",
        "usr/local/include/node/node_version.h": "#define NODE_MAJOR_VERSION 24\n"
        "#define NODE_MINOR_VERSION 1\n#define NODE_PATCH_VERSION 0\n",
        "usr/local/lib/node_modules/npm/package.json": '{"version": "11.0.0"}',
        "usr/local/lib/node_modules/code-server/package.json": '{"version": "4.139.1"}',
    }
    assert set(contents) == set(packer.VERSION_FILES)
    for path, text in contents.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(text)
    versions = installed_versions(tmp_path)
    assert versions["debian"] == {"git": "1:2.47"}
    assert set(versions["npm"]) == {"node", "npm", "code-server"}
