"""End to end: build the default image once, check it offline, boot it under QEMU
(KVM when it really works, else TCG) and exercise the init contract."""

from __future__ import annotations

import hashlib
import json
import re
import ssl
import subprocess
from pathlib import Path

import pytest

from rockpool.store import Version
from rockpool.tools import guest_agent
from tests.e2e.caddy import check_behind_caddy
from tests.e2e.conftest import DEFAULT_SPEC, run_rockpool
from tests.e2e.guest import Guest

pytestmark = pytest.mark.vm
MIB = 1 << 20
SETUP_SCRIPT = DEFAULT_SPEC.parent / "scripts" / "setup.sh"


def debugfs(version: Version, request: str) -> str:
    offset = version.manifest["disk"]["root_offset"]
    raw = version.output_path("raw")
    result = subprocess.run(
        ["debugfs", "-R", request, f"{raw}?offset={offset}"],
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout


def test_manifest_records_inputs_versions_and_outputs(
    built_image: Version, store_home: Path
) -> None:
    manifest = built_image.manifest
    assert re.fullmatch(r"[0-9a-f]{64}", manifest["input_digest"])
    # latest moved to it only after it booted and code-server answered /healthz.
    verification = manifest["verification"]
    assert verification["verified"] is True and "/healthz answered" in verification["how"]
    assert verification["accelerator"] in ("kvm", "tcg") and verification["seconds"] > 0
    assert manifest["build_seconds"] > 0
    assert set(manifest["stage_seconds"]) >= {"bootstrap", "provision", "disk", "formats"}
    packages = manifest["packages"]
    assert packages["npm"]["code-server"] == "4.139.1"
    assert packages["npm"]["node"].startswith("24.")
    assert "systemd" in packages["debian"] and "openssh-server" in packages["debian"]
    outputs = manifest["outputs"]
    assert set(outputs) == {"raw", "qcow2", "incus", "incus-container"}
    container = built_image.output_path("incus-container")
    assert sorted(p.name for p in container.iterdir()) == ["metadata.tar", "rootfs.squashfs"]
    assert set(outputs["incus-container"]["files"]) == {"metadata.tar", "rootfs.squashfs"}
    qcow2 = built_image.output_path("qcow2")
    assert hashlib.sha256(qcow2.read_bytes()).hexdigest() == outputs["qcow2"]["sha256"]
    assert built_image.output_path("raw").stat().st_size == 20 << 30
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "--output=json", str(qcow2)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert info["format"] == "qcow2" and info["virtual-size"] == 20 << 30

    listed = run_rockpool(store_home, "image", "ls", "--json")
    assert built_image.ref in [row["image"] for row in json.loads(listed.stdout)]
    inspected = run_rockpool(store_home, "image", "inspect", "workspace:latest", "--json")
    assert json.loads(inspected.stdout)["version"] == built_image.id


def test_the_build_made_one_initramfs(built_image: Version) -> None:
    """The kernel's postinst and the initramfs-tools trigger leave it to setup.sh, which
    makes it once, with its hook in: minutes each under emulation (the arm64 build)."""
    log = (built_image.path / "build.log").read_text(errors="replace")
    assert "stage bootstrap: done" in log and "stage provision: done" in log  # both ran
    made = re.findall(r"update-initramfs: Generating (\S+)", log)
    assert len(made) == 1, made


def test_unchanged_inputs_rebuild_nothing(built_image: Version, store_home: Path) -> None:
    result = run_rockpool(store_home, "image", "build", str(DEFAULT_SPEC), "--no-lock", "--json")
    assert result.returncode == 0, result.stderr
    again = json.loads(result.stdout)
    assert again["reused"] is True and again["version"] == built_image.id


def test_disk_layout_boots_from_the_removable_path(built_image: Version) -> None:
    raw = built_image.output_path("raw")
    table = json.loads(
        subprocess.run(
            ["sfdisk", "--json", str(raw)], capture_output=True, text=True, check=True
        ).stdout
    )["partitiontable"]
    assert table["label"] == "gpt"
    esp, root = table["partitions"]
    assert esp["type"] == "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
    assert root["start"] * 512 == built_image.manifest["disk"]["root_offset"]
    listing = subprocess.run(
        ["mdir", "-b", "-i", f"{raw}@@{esp['start'] * 512}", "::/EFI/BOOT"],
        capture_output=True,
        text=True,
        check=True,
        env={"MTOOLS_SKIP_CHECK": "1", "PATH": "/usr/bin:/bin"},
    ).stdout
    assert "BOOTX64.EFI" in listing.upper()


def test_image_carries_no_identity_and_no_build_material(built_image: Version) -> None:
    machine_id = debugfs(built_image, "stat /etc/machine-id")
    size = re.search(r"^User:.*\bSize: (\d+)$", machine_id, re.MULTILINE)
    assert size is not None and size.group(1) == "0", machine_id
    ssh_dir = debugfs(built_image, "ls -l /etc/ssh")
    assert "ssh_host_" not in ssh_dir, "SSH host keys were baked into the image"
    assert "stub-resolv.conf" in debugfs(built_image, "stat /etc/resolv.conf")
    assert "Packages" not in debugfs(built_image, "ls -l /var/lib/apt/lists")
    assert ".deb" not in debugfs(built_image, "ls -l /var/cache/apt/archives")
    root_home = debugfs(built_image, "ls -l /root")
    for leftover in (".npm", ".config", ".cache", ".bash_history"):
        assert leftover not in root_home
    assert "password" not in debugfs(built_image, "cat /etc/shadow").lower()
    shadow = debugfs(built_image, "cat /etc/shadow")
    for line in shadow.splitlines():
        assert line.split(":")[1] in ("*", "!", "!*", "!!"), f"a password is set: {line[:20]}"


PEM = r"-----BEGIN CERTIFICATE-----\n(.*?)-----END CERTIFICATE-----"


def host_added_certificates() -> list[str]:
    """CAs this host trusts beyond its distribution's own (e.g. a TLS-intercepting proxy's)."""
    bundle = Path(ssl.get_default_verify_paths().cafile or "/etc/ssl/certs/ca-certificates.crt")
    packaged = {
        cert
        for path in Path("/usr/share/ca-certificates").rglob("*.crt")
        for cert in re.findall(PEM, path.read_text(errors="replace"), re.S)
    }
    return [c for c in re.findall(PEM, bundle.read_text(), re.S) if c not in packaged]


def assert_no_build_material(guest: Guest) -> None:
    # A line from the middle of each host-only certificate (key material, unique to it),
    # passed on stdin so that it never appears in a logged command line.
    needles = [c.splitlines()[len(c.splitlines()) // 2] for c in host_added_certificates()]
    if needles:
        found = guest.ssh(
            "sudo grep -rlF -f /dev/stdin /etc /root /home /usr/local /var /opt 2>/dev/null"
            " || true",
            stdin="\n".join(needles) + "\n",
        )
        assert not found.strip(), f"host CA material left in the image: {found}"
    assert not guest.ssh("env | grep -i _proxy= || true").strip()
    assert not guest.ssh(
        "sudo grep -rli proxy /etc/environment /etc/apt/apt.conf.d "
        "/etc/profile.d /usr/local/etc 2>/dev/null || true"
    ).strip()
    assert guest.ssh("readlink /etc/resolv.conf").strip().endswith("stub-resolv.conf")
    assert not guest.ssh(
        "ls /var/lib/apt/lists | grep -v -e '^lock$' -e '^partial$' || true"
    ).strip()
    assert not guest.ssh("ls /var/cache/apt/archives/*.deb 2>/dev/null || true").strip()
    assert guest.ssh("sudo ls -A /root").split() in (
        [".bashrc", ".profile"],
        [".bashrc", ".profile", ".ssh"],
    )
    assert not guest.ssh(
        "ls -A ~/.npm /tmp/rockpool* /run/rockpool-build 2>/dev/null || true"
    ).strip()
    assert not guest.ssh("sudo find /var/log -name '*rockpool*' -o -name '*setup*' | head").strip()


TOOLS = ("git", "ssh", "bash", "curl", "wget", "jq", "node", "npm", "python3", "make", "gcc")


def test_boot_serves_code_server_at_the_workspace_path(
    built_image: Version, ssh_key: Path, tmp_path: Path
) -> None:
    # The disk file is larger than the image, as when Tart or Incus resize it. The devices
    # sit as Incus places a VM's (Incus cannot boot one here: no KVM), so the VM form is
    # proven to boot there; the QEMU runtime's own layout boots in every verifying boot
    # and in test_invalid_workspace_name_fails_the_init_unit.
    guest = Guest(built_image, tmp_path / "alice", ssh_key, disk_size=24 << 30, layout="incus")
    # A value over the guest's cap (a disk another tool wrote) is left out, with a
    # message, and the rest boots as usual.
    big = {"ROCKPOOL_BIG": "x" * 5000}
    guest.configure(
        {"ROCKPOOL_WORKSPACE_NAME": "alice", "ROCKPOOL_TEAM": "blue", **big}, validate=False
    )
    try:
        guest.start()
        guest.wait_healthz()
        status, body = guest.http_get("/healthz")
        assert status == 200 and json.loads(body)["status"] in ("alive", "expired")

        guest.wait_ssh()
        guest.start_guest_app(5173)
        status, body = guest.http_get("/absproxy/5173/hello/world?x=1")
        assert status == 200
        assert body.decode() == "/workspace/alice/absproxy/5173/hello/world?x=1"

        check_behind_caddy(guest.running.config.forwards[8080], "alice", tmp_path / "caddy")

        found = guest.ssh(
            "bash -lc 'for t in " + " ".join(TOOLS) + "; do command -v $t || echo MISSING:$t; done'"
        )
        assert "MISSING" not in found, found
        assert "v24." in guest.ssh("node --version")
        # What the build did already (ld.so cache, hwdb, sysusers...) no first boot redoes.
        needs_update = guest.ssh(
            "systemctl show -p ConditionResult --value ldconfig systemd-update-done "
            "systemd-sysusers systemd-hwdb-update systemd-journal-catalog-update"
        )
        assert needs_update.split() == ["no"] * 5, needs_update
        assert "libc.so.6" in guest.ssh("/sbin/ldconfig -p")
        assert guest.ssh("hostname").strip() == "alice"
        # DHCP identifies the guest by its MAC (how Tart finds a guest's address).
        leases = guest.ssh("sudo cat /run/systemd/netif/leases/*")
        mac = guest.running.config.mac.replace(":", "")
        assert f"CLIENTID=01{mac}" in leases, leases
        assert re.fullmatch(r"[0-9a-f]{32}\n", guest.ssh("cat /etc/machine-id"))
        assert "ssh_host_ed25519_key" in guest.ssh("ls /etc/ssh")
        env = guest.ssh(
            "sudo cat /proc/$(systemctl show -p MainPID --value code-server)/environ "
            "| tr '\\0' '\\n'"
        )
        assert "ROCKPOOL_TEAM=blue" in env and "ROCKPOOL_WORKSPACE_NAME=alice" in env
        assert "User=coder" in guest.ssh("systemctl show -p User code-server")
        # The root filled the larger disk on first boot.
        root_bytes = int(guest.ssh("df --output=size -B1 / | tail -1"))
        assert root_bytes > 22 << 30
        assert_no_build_material(guest)
        # SSH is key-only.
        assert "passwordauthentication no" in guest.ssh("sudo sshd -T").lower()
        # The guest agent sets the clock (a resume's), and serves nothing else a host
        # could ask of it.
        assert guest.ssh("systemctl is-active qemu-guest-agent").strip() == "active"
        assert abs(guest_agent.set_clock(guest.running.agent_socket)) < 60
        with pytest.raises(guest_agent.AgentUnavailable, match="disabled"):
            guest_agent.execute(guest.running.agent_socket, "guest-exec", {"path": "/bin/true"})

        # A kernel update in the workspace reaches the ESP that systemd-boot loads from.
        guest.ssh("sudo /etc/kernel/postinst.d/zz-rockpool-esp")
        newest = guest.ssh("linux-version list | linux-version sort | tail -n 1").strip()
        guest.ssh(
            f"sudo cmp /boot/vmlinuz-{newest} /boot/efi/vmlinuz && "
            f"sudo cmp /boot/initrd.img-{newest} /boot/efi/initrd.img"
        )

        # The same setup.sh runs unchanged on a live VM over SSH (as Packer's shell
        # provisioner runs it), and changes nothing where everything is in place.
        guest.ssh("cat > /tmp/setup.sh", stdin=SETUP_SCRIPT.read_text())
        rerun = guest.ssh("sudo SETUP_USER=coder bash /tmp/setup.sh 2>&1", timeout=600)
        assert "Debian packages: all present" in rerun and "code-server: 4.139.1 present" in rerun
        assert guest.ssh("systemctl is-active code-server").strip() == "active"

        assert_incus_layout(guest)
        journal = guest.ssh("sudo journalctl -b -u rockpool-init --no-pager")
        assert "ROCKPOOL_BIG is 5000 bytes, over the limit of 4096" in journal
        env = guest.ssh("sudo cat /run/rockpool/env")
        assert 'ROCKPOOL_TEAM="blue"' in env and "ROCKPOOL_BIG" not in env
        assert guest.stop(), "the guest did not power off on ACPI shutdown"
    finally:
        guest.kill()


def assert_incus_layout(guest: Guest) -> None:
    """The root and the config disk are SCSI disks of a virtio-scsi controller behind a
    PCIe root port, and the NIC sits behind a root port too (Incus's q35 layout)."""
    for disk in ("sda", "sdb"):
        path = guest.ssh(f"readlink -f /sys/block/{disk}").strip()
        assert "/virtio" in path and "/host" in path and path.count("/0000:") == 2, path
    nic = guest.ssh("readlink -f /sys/class/net/$(ls /sys/class/net | grep -v '^lo$')/device")
    assert "/virtio" in nic and nic.count("/0000:") == 2, nic


def test_invalid_workspace_name_fails_the_init_unit(
    built_image: Version, ssh_key: Path, tmp_path: Path
) -> None:
    guest = Guest(built_image, tmp_path / "invalid", ssh_key)
    guest.configure({"ROCKPOOL_WORKSPACE_NAME": "Not_A-Slug-"}, validate=False)
    try:
        guest.start()
        guest.wait_ssh()  # keys still arrive, so an operator can look
        assert guest.ssh("systemctl is-failed rockpool-init", check=False).strip() == "failed"
        journal = guest.ssh("sudo journalctl -b -u rockpool-init --no-pager")
        assert "invalid ROCKPOOL_WORKSPACE_NAME 'Not_A-Slug-'" in journal
        # code-server was never started with a broken path, and nothing answers.
        active = guest.ssh("systemctl is-active code-server", check=False).strip()
        assert active in ("inactive", "failed")
        assert "code-server" not in guest.ssh(
            "ps -eo comm,args | grep -v grep | grep entry.js || true"
        )
        with pytest.raises(OSError):
            guest.http_get("/healthz")

        # A config disk without the name fails the same way.
        assert guest.stop()
        guest.configure({"ROCKPOOL_OTHER": "x"}, validate=False)
        guest.start()
        guest.wait_ssh()
        assert guest.ssh("systemctl is-failed rockpool-init", check=False).strip() == "failed"
        journal = guest.ssh("sudo journalctl -b -u rockpool-init --no-pager")
        assert "ROCKPOOL_WORKSPACE_NAME is missing" in journal
        assert guest.ssh("systemctl is-active code-server", check=False).strip() != "active"
    finally:
        guest.kill()
