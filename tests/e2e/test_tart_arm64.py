"""End to end for Apple Silicon: an arm64 cross-build from the same spec and setup.sh,
booted in qemu-system-aarch64 with AAVMF and a fresh NVRAM (Tart's situation); the
Tart bundle; the Tart OCI layout decoded independently and pushed to a real registry."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from rockpool.arch import host_architecture
from rockpool.formats import tart_oci
from rockpool.store import Store, Version
from tests.e2e.caddy import check_behind_caddy
from tests.e2e.conftest import ARM64_SPEC, REPO, BackgroundBuild, run_rockpool
from tests.e2e.guest import Guest
from tests.e2e.registry import blob, local_registry, manifest
from tests.lz4_frames import check_disk_layers

pytestmark = pytest.mark.vm
ARM64_CODE_SERVER_DEADLINE = 1200.0


@pytest.fixture(scope="session")
def arm64_image(store_home: Path, arm64_build: BackgroundBuild) -> Version:
    """ROCKPOOL_TEST_ARM64_IMAGE=NAME:VERSION takes one already in ROCKPOOL_TEST_STORE."""
    existing = os.environ.get("ROCKPOOL_TEST_ARM64_IMAGE")
    if existing:
        return Store(store_home).resolve(existing)
    return arm64_build.result(timeout=7200)


def boot_disk(version: Version) -> Path:
    """What Tart boots: the bundle's disk.img (or the raw disk of a raw-only version)."""
    if "tart" in version.manifest["outputs"]:
        return version.output_path("tart") / "disk.img"
    return version.output_path("raw")


def has_code_server(version: Version) -> bool:
    return "code-server" in version.manifest["packages"]["npm"]


def test_arm64_manifest_and_tart_bundle(arm64_image: Version) -> None:
    manifest = arm64_image.manifest
    assert manifest["architecture"] == "arm64"
    # It landed only after it booted under qemu-system-aarch64 (TCG on this host).
    verification = manifest["verification"]
    assert verification["verified"] is True and verification["seconds"] > 0
    how = "/healthz" if has_code_server(arm64_image) else "SSH"
    assert how in verification["how"] and verification["accelerator"] == "tcg"
    setup_script = REPO / "images" / "scripts" / "setup.sh"
    assert manifest["spec"]["setup_script"] == str(setup_script.resolve())  # images/ is a link
    assert set(manifest["outputs"]) == {"tart", "tart-oci", "qcow2"}
    bundle = arm64_image.output_path("tart")
    assert sorted(p.name for p in bundle.iterdir()) == ["config.json", "disk.img"]
    config = json.loads((bundle / "config.json").read_text())
    spec = manifest["spec"]
    assert (config["os"], config["arch"], config["diskFormat"]) == ("linux", "arm64", "raw")
    assert config["cpuCount"] == spec["cpus"] and config["memorySize"] == spec["memory"]
    assert re.fullmatch(r"([0-9a-f]{2}:){5}[0-9a-f]{2}", config["macAddress"])
    assert (bundle / "disk.img").stat().st_size == spec["disk_size"]
    # The removable-media boot path for arm64 UEFI is on the ESP.
    disk = bundle / "disk.img"
    table = json.loads(
        subprocess.run(["sfdisk", "--json", str(disk)], capture_output=True, check=True).stdout
    )["partitiontable"]
    esp_offset = table["partitions"][0]["start"] * 512
    listing = subprocess.run(
        ["mdir", "-b", "-i", f"{disk}@@{esp_offset}", "::/EFI/BOOT"],
        capture_output=True,
        text=True,
        check=True,
        env={"MTOOLS_SKIP_CHECK": "1", "PATH": "/usr/bin:/bin"},
    ).stdout
    assert "BOOTAA64.EFI" in listing.upper()
    if has_code_server(arm64_image) and host_architecture() == "amd64":
        # Compiled by the cross gcc, which the build names. The image has the package of
        # that name too, as the arm64 root's own g++ (Debian's native g++-14 depends on
        # it), but never the cross build of it.
        cross = manifest["build_host"]["cross_compiler"]
        assert cross["g++-14-aarch64-linux-gnu"].endswith("cross1"), cross
        native = manifest["packages"]["debian"].get("g++-14-aarch64-linux-gnu", "")
        assert "cross" not in native, native


def test_tart_oci_layers_decode_to_the_disk(arm64_image: Version) -> None:
    layout = arm64_image.output_path("tart-oci")
    image_manifest, _ = tart_oci.read_manifest(layout)
    config_layer, *disk_layers = image_manifest["layers"]
    assert config_layer["mediaType"] == tart_oci.TART_CONFIG_TYPE
    disk = arm64_image.output_path("tart") / "disk.img"
    size = disk.stat().st_size
    assert len(disk_layers) == -(-size // tart_oci.CHUNK_SIZE)
    assert image_manifest["annotations"][tart_oci.UNCOMPRESSED_DISK_SIZE] == str(size)
    assert [layer["mediaType"] for layer in disk_layers] == [tart_oci.TART_DISK_TYPE] * len(
        disk_layers
    )

    def blob_path(digest: str) -> Path:
        return layout / "blobs" / "sha256" / digest.removeprefix("sha256:")

    whole = check_disk_layers(disk_layers, blob_path, disk)  # the lz4 tool, not python-lz4
    assert whole == arm64_image.manifest["outputs"]["tart"]["files"]["disk.img"]


def test_push_to_a_local_registry_keeps_tarts_format(
    arm64_image: Version, store_home: Path, tmp_path: Path
) -> None:
    layout = arm64_image.output_path("tart-oci")
    built_manifest, built_path = tart_oci.read_manifest(layout)
    # nvram.bin comes from macOS (tart create --linux); a placeholder carries it here.
    nvram = tmp_path / "nvram.bin"
    nvram.write_bytes(b"placeholder EFI variable store (test only)")

    with local_registry(tmp_path / "registry") as port:
        destination = f"127.0.0.1:{port}/rockpool/test-arm64"
        refused = run_rockpool(store_home, "image", "push", arm64_image.ref, destination)
        assert refused.returncode == 2 and "nvram" in refused.stderr
        assert "Traceback" not in refused.stderr

        pushed = run_rockpool(
            store_home,
            "image",
            "push",
            arm64_image.ref,
            destination,
            "--insecure",
            "--nvram",
            str(nvram),
            "--json",
            timeout=1800,
        )
        assert pushed.returncode == 0, pushed.stderr
        reference = json.loads(pushed.stdout)["pushed"]
        assert reference == f"{destination}:{arm64_image.id}"

        inspected = json.loads(
            subprocess.run(
                ["skopeo", "inspect", "--tls-verify=false", f"docker://{reference}"],
                capture_output=True,
                check=True,
            ).stdout
        )
        assert inspected["Architecture"] == "arm64" and inspected["Os"] == "linux"

        digest, served = manifest(
            port, "rockpool/test-arm64", arm64_image.id, tart_oci.MANIFEST_TYPE
        )
        assert served["mediaType"] == tart_oci.MANIFEST_TYPE
        assert served["config"]["mediaType"] == tart_oci.OCI_CONFIG_TYPE
        media_types = [layer["mediaType"] for layer in served["layers"]]
        disk_count = len(built_manifest["layers"]) - 1
        assert media_types == [
            tart_oci.TART_CONFIG_TYPE,
            *[tart_oci.TART_DISK_TYPE] * disk_count,
            tart_oci.TART_NVRAM_TYPE,
        ]
        # Everything but the added nvram layer is exactly what the build wrote.
        assert served["layers"][:-1] == built_manifest["layers"]
        assert served["annotations"] == built_manifest["annotations"]
        served_bytes = json.dumps(served, sort_keys=True, separators=(",", ":")).encode()
        assert digest == "sha256:" + hashlib.sha256(served_bytes).hexdigest()
        assert blob(port, "rockpool/test-arm64", served["layers"][-1]["digest"]) == (
            nvram.read_bytes()
        )
        image_config = json.loads(blob(port, "rockpool/test-arm64", served["config"]["digest"]))
        assert image_config["architecture"] == "arm64"
        assert image_config["config"]["Labels"][tart_oci.DISK_FORMAT_LABEL] == "raw"
        first_disk = served["layers"][1]["digest"]
        assert hashlib.sha256(blob(port, "rockpool/test-arm64", first_disk)).hexdigest() == (
            first_disk.removeprefix("sha256:")
        )
    assert built_path.is_file()  # the stored version is untouched


def test_arm64_boots_with_aavmf_and_applies_the_init_contract(
    arm64_image: Version, ssh_key: Path, tmp_path: Path
) -> None:
    # Tart boots disk.img itself, with a fresh EFI variable store and a larger disk.
    disk = boot_disk(arm64_image)
    grown = disk.stat().st_size + (2 << 30)
    guest = Guest(arm64_image, tmp_path / "carol", ssh_key, disk_size=grown, base=(disk, "raw"))
    guest.configure({"ROCKPOOL_WORKSPACE_NAME": "carol", "ROCKPOOL_TEAM": "arm"})
    try:
        guest.start()
        guest.wait_ssh()
        assert guest.ssh("uname -m").strip() == "aarch64"
        assert guest.ssh("hostname").strip() == "carol"
        assert guest.ssh("systemctl is-active rockpool-init").strip() == "active"
        assert 'ROCKPOOL_TEAM="arm"' in guest.ssh("cat /run/rockpool/env")
        assert re.fullmatch(r"[0-9a-f]{32}\n", guest.ssh("cat /etc/machine-id"))
        assert "ssh_host_ed25519_key" in guest.ssh("ls /etc/ssh")
        assert "passwordauthentication no" in guest.ssh("sudo sshd -T").lower()
        # How `tart ip` finds a guest: DHCP with a MAC-based client id.
        leases = guest.ssh("sudo cat /run/systemd/netif/leases/*")
        assert f"CLIENTID=01{guest.running.config.mac.replace(':', '')}" in leases, leases
        # Tart's devices: its root disk is virtio-blk, its console virtio-console (hvc0).
        assert "virtio_blk" in guest.ssh("sudo lsinitramfs /boot/initrd.img-$(uname -r)")
        kernel_modules = guest.ssh(
            "cat /lib/modules/$(uname -r)/modules.builtin /lib/modules/$(uname -r)/modules.dep"
        )
        for driver in ("virtio_console", "virtio_net", "virtio-rng", "virtiofs", "vsock_virtio"):
            assert driver in kernel_modules, f"the kernel lacks {driver}"
        assert "hvc0" in guest.ssh("cat /proc/cmdline")
        # The root grew into the larger disk, as after `tart set --disk-size`.
        assert int(guest.ssh("df --output=size -B1 / | tail -1")) > disk.stat().st_size
        if not has_code_server(arm64_image):
            assert guest.ssh("systemctl is-enabled code-server", check=False).strip() != "enabled"
        # The power button (Tart's requestStop, QEMU's system_powerdown) powers it off.
        assert guest.stop(), "the arm64 guest did not power off on the power button"
    finally:
        guest.kill()


def test_arm64_code_server_at_the_workspace_path(
    arm64_image: Version, ssh_key: Path, tmp_path: Path
) -> None:
    if not has_code_server(arm64_image):
        pytest.skip(
            f"{ARM64_SPEC.name} leaves code-server out (too slow to compile under emulation "
            "in CI); run with ROCKPOOL_TEST_ARM64_SPEC=images/workspace-arm64.toml"
        )
    disk = boot_disk(arm64_image)
    guest = Guest(arm64_image, tmp_path / "dave", ssh_key, base=(disk, "raw"))
    guest.configure({"ROCKPOOL_WORKSPACE_NAME": "dave"})
    try:
        guest.start()
        # Node.js under emulated arm64 is several times slower than under emulated amd64
        # (BENCHMARKS.md: 229 s to /healthz on a busy 2-core machine).
        guest.wait_healthz(ARM64_CODE_SERVER_DEADLINE)
        guest.wait_ssh()
        assert "v24." in guest.ssh("node --version")
        # The native modules, compiled on an x86_64 host by its cross gcc, load in the
        # arm64 guest; node-gyp's Makefiles and objects, which name that gcc, are gone.
        vscode = "/usr/local/lib/node_modules/code-server/lib/vscode"
        loaded = guest.ssh(
            f"cd {vscode} && node -e \"for (const m of ['@vscode/sqlite3', '@vscode/spdlog',"
            " '@vscode/native-watchdog', 'node-pty']) { require(m); console.log('ok', m) }\"",
            timeout=300,
        )
        assert loaded.count("ok ") == 4, loaded
        leftovers = guest.ssh(
            f"find {vscode}/node_modules -path '*/build/Release/obj.target' "
            f"-o -path '*/build/Makefile' | head -3; ls -d /usr/lib/x86_64-linux-gnu "
            "/usr/aarch64-linux-gnu /usr/lib64 /run/rockpool-xtc 2>/dev/null || true"
        )
        assert not leftovers.strip(), leftovers
        guest.start_guest_app(5173)
        status, body = guest.http_get("/absproxy/5173/hello")
        assert status == 200 and body.decode() == "/workspace/dave/absproxy/5173/hello"
        check_behind_caddy(guest.running.config.forwards[8080], "dave", tmp_path / "caddy")
    finally:
        guest.kill()
