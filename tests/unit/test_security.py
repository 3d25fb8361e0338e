"""What keeps secrets on the host private (docs/security.md): a private store, URL
credentials masked in logs and errors and never in an argv, and the nftables rules
around workspaces."""

from __future__ import annotations

import ipaddress
import logging
import os
import stat
import subprocess
from pathlib import Path

import pytest

from rockpool.build import provision
from rockpool.cli import main
from rockpool.command import run
from rockpool.errors import CommandFailed, ExitCode, InvalidInput, MissingTool, redact
from rockpool.files import open_private, write_json_atomic, write_private
from rockpool.runtime import network
from rockpool.runtime.base import write_config_disk
from rockpool.spec import load_spec
from rockpool.store import Store
from tests.contexts import quiet_context
from tests.keys import PUBLIC_KEY

REPO = Path(__file__).resolve().parents[2]


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_new_store_is_private_from_the_start(tmp_path: Path) -> None:
    store = Store(tmp_path / "deep" / "store")
    with store.locked(exclusive=False):
        pass
    assert mode_of(store.root) == 0o700
    write_json_atomic(store.root / "record.json", {"secret": 1})
    write_private(store.root / "keys", "ssh-ed25519 AAAA\n")
    with open_private(store.root / "log", "a") as handle:
        handle.write("line\n")
    for name in ("record.json", "keys", "log"):
        assert mode_of(store.root / name) == 0o600, name


def test_a_store_left_readable_by_an_older_rockpool_is_tightened(tmp_path: Path) -> None:
    root = tmp_path / "store"
    root.mkdir(mode=0o755)
    root.chmod(0o755)
    Store(root).ensure_root()
    assert mode_of(root) == 0o700


def test_commands_create_private_files_only_when_asked(tmp_path: Path) -> None:
    run(["bash", "-c", f"echo x > {tmp_path}/public"])
    run(["bash", "-c", f"echo x > {tmp_path}/private"], umask=0o077)
    assert mode_of(tmp_path / "public") == 0o644
    assert mode_of(tmp_path / "private") == 0o600


@pytest.mark.parametrize(
    "text",
    [
        "https_proxy=http://user:s3cret@proxy.example:3128",
        "curl https://user:s3cret@registry.example/v2/",
        "E: Failed to fetch http://user:s3cret@deb.example/dists",
        "socks5h://user:s3cret@proxy:1080 and ftp://s3cret@host/",
    ],
)
def test_url_credentials_are_masked(text: str) -> None:
    masked = redact(text)
    assert "s3cret" not in masked and "***@" in masked


def test_a_url_without_credentials_is_left_alone() -> None:
    text = "GET http://deb.debian.org/debian/ from user@host and a@b"
    assert redact(text) == text


def test_a_failed_command_logs_and_reports_no_credentials(
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = "http://user:s3cret@127.0.0.1:9/"
    with caplog.at_level(logging.DEBUG, logger="rockpool"), pytest.raises(CommandFailed) as exc:
        run(["bash", "-c", 'echo "cannot reach $0" >&2; exit 3', url])
    assert "s3cret" not in str(exc.value) and "***@" in str(exc.value)
    assert "s3cret" not in caplog.text and "***@127.0.0.1" in caplog.text


def test_setup_runs_with_proxy_credentials_in_its_environment_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("https_proxy", "http://user:s3cret@proxy.example:3128")
    ctx = quiet_context(load_spec(REPO / "images" / "workspace.toml"), tmp_path)
    assert all("s3cret" not in str(arg) for arg in provision.provision_argv(ctx))
    assert provision.setup_environment(ctx)["https_proxy"].endswith("@proxy.example:3128")


def test_the_ruleset_rejects_the_vm_user_towards_the_host_and_strangers_at_forwards() -> None:
    rules = network.ruleset(
        vm_uid=990,
        clients=[0, 999, 0],
        resolver_addresses=[ipaddress.ip_address("127.0.0.53")],
        allowed=[(ipaddress.ip_address("::1"), 3128)],
    )
    assert "delete table inet rockpool" in rules  # replaced whole, in one transaction
    assert "elements = { 0, 999 }" in rules
    assert "meta skuid 990 jump guest" in rules
    assert "tcp dport 41000-41999 fib daddr type local meta skuid != @clients reject" in rules
    guest = rules.split("chain guest", 1)[1]
    # The exceptions come before the rejection, or they would never match.
    assert guest.index("ip daddr 127.0.0.53") < guest.index("fib daddr type local")
    assert "ip6 daddr ::1 meta l4proto { tcp, udp } th dport 3128 accept" in guest


@pytest.mark.skipif(os.geteuid() != 0, reason="loading nftables rules needs root")
def test_the_ruleset_loads_into_the_kernel() -> None:
    rules = network.ruleset(65534, [0], [ipaddress.ip_address("127.0.0.53")])
    check = subprocess.run(
        ["nft", "--check", "-f", "-"], input=rules, capture_output=True, text=True
    )
    assert check.returncode == 0, check.stderr


def test_network_settings_are_checked() -> None:
    assert network.mode({}) is network.Network.ISOLATED
    assert network.mode({"ROCKPOOL_NETWORK": "open"}) is network.Network.OPEN
    with pytest.raises(InvalidInput, match="ROCKPOOL_NETWORK"):
        network.mode({"ROCKPOOL_NETWORK": "bridged"})
    with pytest.raises(InvalidInput, match="ROCKPOOL_CLIENTS"):
        network.client_uids({"ROCKPOOL_CLIENTS": "no-such-user-here"})
    assert 65534 in network.client_uids({"ROCKPOOL_CLIENTS": "nobody"})
    with pytest.raises(InvalidInput, match="ROCKPOOL_GUEST_ALLOW"):
        network.guest_allowances({"ROCKPOOL_GUEST_ALLOW": "127.0.0.1"})
    assert network.guest_allowances({"ROCKPOOL_GUEST_ALLOW": "[::1]:3128, 127.0.0.1:80"}) == [
        (ipaddress.ip_address("::1"), 3128),
        (ipaddress.ip_address("127.0.0.1"), 80),
    ]


def test_an_unprivileged_isolated_start_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(MissingTool, match="ROCKPOOL_NETWORK=open"):
        network.isolate({})
    assert network.isolate({"ROCKPOOL_NETWORK": "open"}) is None


def test_a_restarted_workspace_keeps_its_port_when_it_is_free() -> None:
    first = network.pick_port()
    assert first in network.FORWARD_PORTS
    assert network.pick_port(preferred=first) == first
    assert network.pick_port(taken=[first], preferred=first) != first


@pytest.fixture(scope="module")
def private_key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    key = tmp_path_factory.mktemp("key") / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    return key


def test_write_config_disk_refuses_bad_keys_and_values_before_writing(
    tmp_path: Path, private_key: Path
) -> None:
    directory = tmp_path / "alice"
    directory.mkdir()
    with pytest.raises(InvalidInput, match="PRIVATE key"):
        write_config_disk(directory, "alice", "id1", {}, private_key.read_text())
    with pytest.raises(InvalidInput, match="ROCKPOOL_BIG"):
        write_config_disk(directory, "alice", "id1", {"ROCKPOOL_BIG": "x" * 5000}, PUBLIC_KEY)
    assert list(directory.iterdir()) == []
    write_config_disk(directory, "alice", "id1", {}, PUBLIC_KEY)
    assert (directory / "authorized_keys").read_text() == PUBLIC_KEY + "\n"
    for name in ("authorized_keys", "config.img"):
        assert mode_of(directory / name) == 0o600, name


@pytest.mark.parametrize(
    "content",
    ["private", b"\x7fELF\x02\x01\x01\x00" * 64, "ssh-ed25519 AAAA\n", "x" * (65 << 10)],
    ids=["private key", "binary", "no real key", "oversized"],
)
def test_the_cli_refuses_bad_keys_with_one_message_and_writes_nothing(
    content: str | bytes,
    private_key: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    keys = tmp_path / "keys"
    if content == "private":
        keys.write_bytes(private_key.read_bytes())
    elif isinstance(content, bytes):
        keys.write_bytes(content)
    else:
        keys.write_text(content)
    home = tmp_path / "store"
    monkeypatch.setenv("ROCKPOOL_HOME", str(home))
    code = main(["workspace", "start", "alice", "--authorized-keys", str(keys)])
    err = capsys.readouterr().err
    assert code == ExitCode.INVALID_INPUT
    assert err.startswith("rockpool: error: --authorized-keys") and err.count("error") == 1
    assert "Traceback" not in err
    assert "PRIVATE KEY-----\n" not in err and not home.exists()
