"""The Incus runtime against real incusd daemons the tests start: image import, a system
container from the default image behind a real Caddy, clones on btrfs, the refusal of
VMs on a host without KVM, and a three-member cluster on 127.0.0.2-4.

Incus cannot boot a VM here (no KVM): the VM form's disk boots under QEMU in Incus's
device layout in test_image.py (the second boot of the code-server test)."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from rockpool.files import link_or_copy
from rockpool.store import Store, Version
from tests.e2e.caddy import check_behind_caddy, get
from tests.e2e.conftest import run_rockpool
from tests.e2e.guest import as_nobody, ssh_argv, start_echo_app, wait_until
from tests.e2e.incus import MEMBER_ADDRESSES, Daemon, cluster, standalone

pytestmark = pytest.mark.vm

# A system container boots in seconds; this only detects a boot that never ends.
READY_DEADLINE = 300.0
CURL_COULD_NOT_CONNECT = 7


@pytest.fixture(scope="module")
def incusd() -> Iterator[Daemon]:
    with standalone() as daemon:
        yield daemon


def rockpool(
    home: Path, daemon: Daemon, *args: str, timeout: float = 600, conf: Path | None = None
) -> Any:
    """The CLI against daemon (or, with conf, the client configuration whose remotes it
    names), its --json answer; asserts it succeeded."""
    env = {"INCUS_DIR": str(daemon.directory)} | ({"INCUS_CONF": str(conf)} if conf else {})
    result = run_rockpool(home, *args, "--json", timeout=timeout, env=env)
    assert result.returncode == 0, f"rockpool {' '.join(args)}:\n{result.stderr[-3000:]}"
    return json.loads(result.stdout)


def rockpool_fails(home: Path, daemon: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    result = run_rockpool(home, *args, timeout=600, env={"INCUS_DIR": str(daemon.directory)})
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr and result.stderr.count("error:") == 1, result.stderr
    return result


def healthz(port: int) -> bool:
    try:
        return get(port, "/healthz")[0] == 200
    except OSError:
        return False


def wait_healthy(workspace: dict[str, Any]) -> int:
    port = int(workspace["endpoint"]["port"])
    wait_until(lambda: healthz(port), READY_DEADLINE, f"/healthz of {workspace['name']}")
    return port


def container_ssh(key: Path, port: int) -> Callable[[str], str]:
    def ssh(command: str) -> str:
        result = subprocess.run(
            ssh_argv(key, port, "coder", command), capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, f"ssh {command!r}: {result.stderr}"
        return result.stdout

    return ssh


def in_container(daemon: Daemon, name: str, command: str) -> str:
    return daemon.incus("exec", name, "--", "sh", "-c", command).stdout


def test_both_forms_import_once_with_their_type_architecture_and_properties(
    built_image: Version, store_home: Path, incusd: Daemon
) -> None:
    ref = built_image.ref
    first = rockpool(store_home, incusd, "image", "install", ref, "--runtime", "incus")
    again = rockpool(store_home, incusd, "image", "install", ref, "--runtime", "incus")
    assert first["installed"] == again["installed"]
    images = incusd.json("image", "list")
    assert len(images) == 2, "the same fingerprint was imported twice"
    by_type = {image["type"]: image for image in images}
    assert set(by_type) == {"container", "virtual-machine"}
    for instance_type, image in by_type.items():
        assert image["architecture"] == "x86_64"
        properties = image["properties"]
        assert (
            properties["os"] == "debian" and properties["release"] == built_image.manifest["suite"]
        )
        assert properties["variant"] == "rockpool"
        assert properties["rockpool.version"] == built_image.id
        suffix = "/vm" if instance_type == "virtual-machine" else ""
        names = {alias["name"] for alias in image["aliases"]}
        assert names == {f"workspace/{built_image.id}{suffix}", f"workspace/latest{suffix}"}
    info = incusd.incus("image", "info", f"workspace/{built_image.id}").stdout
    assert "Type: container" in info and "Architecture: x86_64" in info
    vm_info = incusd.incus("image", "info", f"workspace/{built_image.id}/vm").stdout
    assert "Type: virtual-machine" in vm_info and "Architecture: x86_64" in vm_info
    assert by_type["virtual-machine"]["properties"]["requirements.secureboot"] == "false"
    assert "requirements.secureboot" not in by_type["container"]["properties"]


def test_a_vm_on_this_host_is_refused_naming_kvm_and_vhost_vsock_and_leaves_nothing(
    built_image: Version, store_home: Path, incusd: Daemon
) -> None:
    result = rockpool_fails(
        store_home,
        incusd,
        "workspace",
        "create",
        "vm1",
        "--runtime",
        "incus",
        "--type",
        "vm",
        "--image",
        built_image.ref,
    )
    assert result.returncode == 4, result.stderr
    assert "vhost_vsock" in result.stderr and "KVM" in result.stderr
    assert incusd.json("list") == []


def test_a_container_workspace_lives_behind_caddy_persists_clones_and_goes(
    built_image: Version, store_home: Path, incusd: Daemon, tmp_path: Path, ssh_key: Path
) -> None:
    home = store_home
    created = rockpool(
        home,
        incusd,
        "workspace",
        "create",
        "alice",
        "--runtime",
        "incus",
        "--image",
        built_image.ref,
    )
    assert created["state"] == "stopped" and created["details"]["type"] == "container"
    assert created["image"] == built_image.ref
    started = rockpool(
        home,
        incusd,
        "workspace",
        "start",
        "alice",
        "--runtime",
        "incus",
        "--env",
        "ROCKPOOL_TEAM=blue",
        "--authorized-keys",
        f"{ssh_key}.pub",
    )
    assert started["state"] == "running"
    port = wait_healthy(started)
    assert started["endpoint"]["host"] == "127.0.0.1"
    # SSH through its proxy device, with the keys given at start; then code-server's
    # absproxy path to an app in the container, all behind Caddy.
    ssh = container_ssh(ssh_key, int(started["endpoint"]["ssh_port"]))
    assert ssh("hostname").strip() == "alice"
    start_echo_app(ssh, 5173)
    check_behind_caddy(port, "alice", tmp_path / "caddy")
    # Only the clients reach the proxy devices: a local user who is none is refused.
    assert started["endpoint"]["network"] == "isolated"
    for endpoint_port in (port, started["endpoint"]["ssh_port"]):
        refused = as_nobody("curl", "-sS", "--max-time", "10", f"http://127.0.0.1:{endpoint_port}/")
        assert refused.returncode == CURL_COULD_NOT_CONNECT, refused.stdout + refused.stderr
    assert in_container(incusd, "alice", "hostname").strip() == "alice"
    assert 'ROCKPOOL_TEAM="blue"' in in_container(incusd, "alice", "cat /run/rockpool/env")

    # The name the contract gives at the next start moves the path.
    incusd.incus("stop", "alice")
    moved = tmp_path / "env"
    moved.write_text("ROCKPOOL_WORKSPACE_NAME=bob\n")
    incusd.incus("file", "push", "--mode", "0600", str(moved), "alice/etc/rockpool/carrier/env")
    incusd.incus("start", "alice")
    wait_until(lambda: healthz(port), READY_DEADLINE, "/healthz after the rename")
    assert in_container(incusd, "alice", "hostname").strip() == "bob"
    start_echo_app(ssh, 5173)  # the keys of the start before stay
    check_behind_caddy(port, "bob", tmp_path / "caddy-bob")
    incusd.incus("stop", "alice")

    # The disk persists across stop and start.
    again = rockpool(home, incusd, "workspace", "start", "alice", "--runtime", "incus")
    wait_healthy(again)
    assert in_container(incusd, "alice", "hostname").strip() == "alice"
    in_container(incusd, "alice", "echo kept > /home/coder/note && sync")
    rockpool(home, incusd, "workspace", "stop", "alice", "--runtime", "incus")
    again = rockpool(home, incusd, "workspace", "start", "alice", "--runtime", "incus")
    wait_healthy(again)
    assert in_container(incusd, "alice", "cat /home/coder/note").strip() == "kept"
    rockpool(home, incusd, "workspace", "stop", "alice", "--runtime", "incus")

    # A snapshot, and the disk back to it.
    snapshot = rockpool(
        home, incusd, "workspace", "snapshot", "create", "alice", "before", "--runtime", "incus"
    )
    assert snapshot["name"] == "before"
    resumed = rockpool(home, incusd, "workspace", "start", "alice", "--runtime", "incus")
    wait_healthy(resumed)
    in_container(incusd, "alice", "echo later > /home/coder/note && sync")
    restored = rockpool(
        home, incusd, "workspace", "snapshot", "restore", "alice", "before", "--runtime", "incus"
    )
    assert restored["state"] == "stopped"
    listed_snapshots = rockpool(
        home, incusd, "workspace", "snapshot", "ls", "alice", "--runtime", "incus"
    )
    assert [s["name"] for s in listed_snapshots] == ["before"]
    again = rockpool(home, incusd, "workspace", "start", "alice", "--runtime", "incus")
    wait_healthy(again)
    assert in_container(incusd, "alice", "cat /home/coder/note").strip() == "kept"
    rockpool(home, incusd, "workspace", "stop", "alice", "--runtime", "incus")
    rockpool(home, incusd, "workspace", "snapshot", "rm", "alice", "before", "--runtime", "incus")
    assert (
        rockpool(home, incusd, "workspace", "snapshot", "ls", "alice", "--runtime", "incus") == []
    )

    # A clone on btrfs: copy-on-write, its own ports and identity, beside its source.
    used_before = incusd.pool_used("default")
    clone = rockpool(home, incusd, "workspace", "clone", "alice", "carol", "--runtime", "incus")
    exclusive = incusd.pool_used("default") - used_before
    assert clone["cloned_from"] == "alice"
    root_bytes = built_image.manifest["disk"]["root_used_bytes"]
    assert exclusive < root_bytes // 10, f"the clone took {exclusive} bytes of {root_bytes}"
    source = rockpool(home, incusd, "workspace", "start", "alice", "--runtime", "incus")
    copy = rockpool(home, incusd, "workspace", "start", "carol", "--runtime", "incus")
    assert source["endpoint"]["port"] != copy["endpoint"]["port"]
    assert source["endpoint"]["ssh_port"] != copy["endpoint"]["ssh_port"]
    wait_healthy(source)
    wait_healthy(copy)
    assert in_container(incusd, "carol", "cat /home/coder/note").strip() == "kept"
    assert in_container(incusd, "carol", "hostname").strip() == "carol"
    identity = "cat /etc/machine-id; cat /etc/ssh/ssh_host_ed25519_key.pub"
    wait_until(
        lambda: "ssh-ed25519" in in_container(incusd, "carol", identity + " 2>/dev/null || true"),
        READY_DEADLINE,
        "the clone's host keys",
    )
    assert in_container(incusd, "alice", identity) != in_container(incusd, "carol", identity)

    listed = {w["name"]: w for w in rockpool(home, incusd, "workspace", "ls", "--runtime", "incus")}
    assert set(listed) == {"alice", "carol"}
    for name in ("alice", "carol"):
        rockpool(home, incusd, "workspace", "stop", name, "--runtime", "incus")
        rockpool(home, incusd, "workspace", "rm", name, "--runtime", "incus")
    assert incusd.json("list") == []


@pytest.fixture(scope="module")
def incus_cluster() -> Iterator[list[Daemon]]:
    with cluster() as members:
        yield members


def test_a_cluster_places_workspaces_honours_targets_and_tells_of_a_dead_member(
    built_image: Version, store_home: Path, incus_cluster: list[Daemon], tmp_path: Path
) -> None:
    first = incus_cluster[0]
    # The worker reaches the cluster as a remote: HTTPS and a trust token.
    conf = tmp_path / "incus-client"
    token = first.incus("config", "trust", "add", "worker", "--quiet").stdout.strip()
    remote = subprocess.run(
        [
            "incus",
            "remote",
            "add",
            "cluster",
            f"https://{MEMBER_ADDRESSES[0]}:8443",
            "--token",
            token,
            "--accept-certificate",
        ],
        env={**os.environ, "INCUS_CONF": str(conf)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert remote.returncode == 0, remote.stderr
    over_https = ("--remote", "cluster")
    names = ["spread-1", "spread-2", "spread-3"]
    for name in names:
        rockpool(
            store_home,
            first,
            "workspace",
            "create",
            name,
            "--runtime",
            "incus",
            "--image",
            built_image.ref,
            *over_https,
            conf=conf,
        )
    placed = rockpool(
        store_home,
        first,
        "workspace",
        "create",
        "pinned",
        "--runtime",
        "incus",
        "--target",
        "m2",
        "--image",
        built_image.ref,
    )
    assert placed["details"]["member"] == "m2"
    over_remote = rockpool(
        store_home, first, "workspace", "ls", "--runtime", "incus", *over_https, conf=conf
    )
    listed = {w["name"]: w for w in over_remote}
    assert {w["details"]["remote"] for w in over_remote} == {"cluster"}
    members = {listed[name]["details"]["member"] for name in names}
    # Incus's scheduler picks the least-loaded member: three workspaces, three members.
    assert members == {"m1", "m2", "m3"}, {n: listed[n]["details"]["member"] for n in names}
    # The image is on every member: each made a workspace from it.
    assert {w["image"] for w in listed.values()} == {built_image.ref}

    for name in names:
        started = rockpool(store_home, first, "workspace", "start", name, "--runtime", "incus")
        wait_healthy(started)
    victim_name = next(n for n in names if listed[n]["details"]["member"] != "m1")
    victim_member = listed[victim_name]["details"]["member"]
    victim = next(m for m in incus_cluster if m.name == victim_member)
    victim.kill()
    wait_until(
        lambda: (
            first.json("cluster", "list")
            and any(
                m["server_name"] == victim_member and m["status"] == "Offline"
                for m in first.json("cluster", "list")
            )
        ),
        READY_DEADLINE,
        f"Incus to see {victim_member} offline",
    )
    status = rockpool(store_home, first, "workspace", "status", victim_name, "--runtime", "incus")
    assert status["state"] == "failed", status
    assert status["details"]["member_status"] == "Offline"
    assert f"member {victim_member} is offline" in status["details"]["reason"]
    for name in names:
        if name == victim_name:
            continue
        alive = rockpool(store_home, first, "workspace", "status", name, "--runtime", "incus")
        assert alive["state"] == "running"
        assert healthz(int(alive["endpoint"]["port"]))
    listed = {
        w["name"]: w for w in rockpool(store_home, first, "workspace", "ls", "--runtime", "incus")
    }
    assert listed[victim_name]["state"] == "failed"
    # The member comes back; then everything is stopped and removed through rockpool.
    victim.start()
    wait_until(
        lambda: all(m["status"] == "Online" for m in first.json("cluster", "list")),
        READY_DEADLINE,
        f"{victim_member} back online",
    )
    for name in [*names, "pinned"]:
        rockpool(store_home, first, "workspace", "rm", name, "--runtime", "incus", "--force")
    assert first.json("list") == []


def copy_version(version: Version, store: Store, name: str) -> Version:
    """version's outputs, hard-linked, as the only version of image name in store."""
    prepared = store.root / f".prepared-{name}"
    prepared.mkdir(parents=True)
    for output in version.manifest["outputs"].values():
        source = version.path / output["file"]
        if source.is_dir():
            (prepared / source.name).mkdir()
            for member in source.iterdir():
                link_or_copy(member, prepared / source.name / member.name)
        else:
            link_or_copy(source, prepared / source.name)
    manifest = {
        key: value for key, value in version.manifest.items() if key not in ("name", "version")
    }
    return store.land(name, version.id, prepared, manifest)


def test_aliases_follow_the_latest_and_rm_and_gc_uninstall_only_what_nothing_uses(
    minimal_image: Version, built_image: Version, incusd: Daemon, tmp_path: Path
) -> None:
    """Two versions of one image, in a store of its own (gc removes what no workspace
    holds, and the suite's store has versions other tests still need)."""
    home = tmp_path / "store"
    old = copy_version(minimal_image, Store(home), "incus-gc")
    new = copy_version(built_image, Store(home), "incus-gc")

    def ours() -> list[dict[str, Any]]:
        images: list[dict[str, Any]] = incusd.json("image", "list")
        return [i for i in images if i["properties"].get("rockpool.image") == "incus-gc"]

    def target(alias: str) -> str:
        found = [a for a in incusd.json("image", "alias", "list") if a["name"] == alias]
        assert len(found) == 1, alias
        return str(found[0]["target"])

    rockpool(home, incusd, "image", "install", old.ref, "--runtime", "incus")
    assert {image["type"] for image in ours()} == {"container", "virtual-machine"}
    old_container = target(f"incus-gc/{old.id}")
    assert target("incus-gc/latest") == old_container
    rockpool(home, incusd, "image", "install", new.ref, "--runtime", "incus")
    assert len(ours()) == 4
    assert target("incus-gc/latest") == target(f"incus-gc/{new.id}") != old_container
    assert target("incus-gc/latest/vm") == target(f"incus-gc/{new.id}/vm")
    assert target(f"incus-gc/{old.id}") == old_container

    rockpool(
        home,
        incusd,
        "workspace",
        "create",
        "probe",
        "--runtime",
        "incus",
        "--image",
        old.ref,
        "--type",
        "container",
    )
    rockpool(home, incusd, "image", "rm", old.ref)
    # The old container image is what probe was made from: it stays; the old VM image goes.
    left = {(i["properties"]["rockpool.version"], i["type"]) for i in ours()}
    assert left == {(old.id, "container"), (new.id, "container"), (new.id, "virtual-machine")}
    rockpool(home, incusd, "workspace", "rm", "probe", "--runtime", "incus")
    rockpool(home, incusd, "image", "gc")
    assert {i["properties"]["rockpool.version"] for i in ours()} == {new.id}


def test_a_project_keeps_its_workspaces_apart(
    minimal_image: Version, store_home: Path, incusd: Daemon
) -> None:
    # The project shares the default project's images and profiles (its pool).
    incusd.incus(
        "project",
        "create",
        "team-a",
        "-c",
        "features.images=false",
        "-c",
        "features.profiles=false",
    )
    in_project = ("--runtime", "incus", "--project", "team-a")
    created = rockpool(
        store_home,
        incusd,
        "workspace",
        "create",
        "tenant",
        "--image",
        minimal_image.ref,
        "--type",
        "container",
        *in_project,
    )
    assert created["details"]["project"] == "team-a"
    names = [i["name"] for i in incusd.json("list", "--project", "team-a")]
    assert names == ["tenant"]
    assert "tenant" not in [i["name"] for i in incusd.json("list")]
    listed = rockpool(store_home, incusd, "workspace", "ls", *in_project)
    assert [w["name"] for w in listed] == ["tenant"]
    others = rockpool(store_home, incusd, "workspace", "ls", "--runtime", "incus")
    assert "tenant" not in [w["name"] for w in others]
    missing = rockpool_fails(
        store_home, incusd, "workspace", "status", "tenant", "--runtime", "incus"
    )
    assert missing.returncode == 3, missing.stderr
    rockpool(store_home, incusd, "workspace", "rm", "tenant", *in_project)
    assert incusd.json("list", "--project", "team-a") == []
    incusd.incus("project", "delete", "team-a")
