"""The network boundary around each QEMU workspace (docs/security.md has the why).

A workspace uses QEMU's user-mode network: every connection its guest makes becomes a
socket of the QEMU process on the host. QEMU drops root for the unprivileged user
rockpool-vm once it is set up (-runas), and one nftables table, `inet rockpool`,
filters by who owns a socket:

- rockpool-vm may not open a connection to any address of this host: not its loopback
  (which the guest's gateway 10.0.2.2 leads to), not its other addresses, so no other
  workspace's forward either. Two exceptions: the resolvers of /etc/resolv.conf on port
  53 (the guest's DNS goes through them), and ROCKPOOL_GUEST_ALLOW's ADDR:PORT entries
  (say, an operator's proxy on this host). The internet stays reachable.
- The forwards (127.0.0.1, ports 41000-41999) take connections only from the clients:
  root, the store's owner, Caddy's user and ROCKPOOL_CLIENTS.

No daemon: the table is loaded, whole and atomically, at every workspace start.
"""

from __future__ import annotations

import ipaddress
import os
import pwd
import random
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from rockpool import tools
from rockpool.command import run
from rockpool.errors import CommandFailed, Conflict, InvalidInput, MissingTool

VM_USER = "rockpool-vm"
CADDY_USER = "caddy"
TABLE = "rockpool"
FORWARD_PORTS = range(41000, 42000)
DNS_PORT = 53
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class Network(StrEnum):
    ISOLATED = "isolated"  # the default: the rules above
    OPEN = "open"  # a single-user laptop: plain 127.0.0.1 forwards, no filter


def mode(env: Mapping[str, str] = os.environ) -> Network:
    value = env.get("ROCKPOOL_NETWORK", Network.ISOLATED.value)
    try:
        return Network(value)
    except ValueError:
        raise InvalidInput(
            f"ROCKPOOL_NETWORK must be 'isolated' or 'open', not '{value}'",
            hint="unset it for isolated workspaces; 'open' is for a single-user machine",
        ) from None


def _uid(name: str, variable: str) -> int:
    if name.isdigit():
        return int(name)
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        raise InvalidInput(
            f"{variable} names the user '{name}', who does not exist here",
            hint=f"give user names or uids, separated by commas: {variable}=caddy,worker",
        ) from None


def client_uids(env: Mapping[str, str] = os.environ) -> list[int]:
    """Who may connect to a workspace's forwards: root, this store's owner, Caddy's
    user if there is one, and the users ROCKPOOL_CLIENTS names."""
    uids = {0, os.geteuid()}
    with_caddy = [CADDY_USER] if _exists(CADDY_USER) else []
    given = [n for n in env.get("ROCKPOOL_CLIENTS", "").replace(",", " ").split() if n]
    uids.update(_uid(name, "ROCKPOOL_CLIENTS") for name in [*with_caddy, *given])
    return sorted(uids)


def _exists(user: str) -> bool:
    try:
        pwd.getpwnam(user)
    except KeyError:
        return False
    return True


def guest_allowances(env: Mapping[str, str] = os.environ) -> list[tuple[Address, int]]:
    """ROCKPOOL_GUEST_ALLOW: ADDR:PORT entries of this host that guests may reach."""
    allowed = []
    for entry in env.get("ROCKPOOL_GUEST_ALLOW", "").replace(",", " ").split():
        address, _, port = entry.rpartition(":")
        try:
            parsed = ipaddress.ip_address(address.strip("[]"))
            number = int(port)
            if not 1 <= number <= 65535:
                raise ValueError(port)
        except ValueError:
            raise InvalidInput(
                f"ROCKPOOL_GUEST_ALLOW entry '{entry}' is no ADDRESS:PORT",
                hint="e.g. ROCKPOOL_GUEST_ALLOW=127.0.0.1:3128,[::1]:3128",
            ) from None
        allowed.append((parsed, number))
    return allowed


def resolvers(resolv_conf: Path = Path("/etc/resolv.conf")) -> list[Address]:
    found = []
    try:
        lines = resolv_conf.read_text(errors="replace").splitlines()
    except OSError:
        return []
    for line in lines:
        fields = line.split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            try:
                found.append(ipaddress.ip_address(fields[1].split("%")[0]))
            except ValueError:
                continue
    return found


def _family(address: Address) -> str:
    return "ip" if address.version == 4 else "ip6"


def ruleset(
    vm_uid: int,
    clients: Iterable[int],
    resolver_addresses: Iterable[Address] = (),
    allowed: Iterable[tuple[Address, int]] = (),
) -> str:
    """The whole `inet rockpool` table, replacing any earlier one in one transaction."""
    exceptions = [
        f"{_family(a)} daddr {a} meta l4proto {{ tcp, udp }} th dport {DNS_PORT} accept"
        for a in resolver_addresses
    ] + [
        f"{_family(a)} daddr {a} meta l4proto {{ tcp, udp }} th dport {port} accept"
        for a, port in allowed
    ]
    guest_rules = "\n".join(f"    {rule}" for rule in exceptions)
    ports = f"{FORWARD_PORTS.start}-{FORWARD_PORTS.stop - 1}"
    return f"""\
table inet {TABLE}
delete table inet {TABLE}
table inet {TABLE} {{
  set clients {{
    type uid
    elements = {{ {", ".join(str(uid) for uid in sorted(set(clients)))} }}
  }}
  chain output {{
    type filter hook output priority filter; policy accept;
    ct state established,related accept
    meta skuid {vm_uid} jump guest
    tcp dport {ports} fib daddr type local meta skuid != @clients reject with tcp reset
  }}
  chain guest {{
{guest_rules}
    fib daddr type local meta l4proto tcp reject with tcp reset
    fib daddr type local reject
  }}
}}
"""


def vm_uid() -> int:
    """The uid of rockpool-vm, made (a system user with no home and no shell) if
    there is none yet."""
    try:
        return pwd.getpwnam(VM_USER).pw_uid
    except KeyError:
        pass
    tools.require(["useradd"], "isolating workspaces")
    try:
        run(
            [
                "useradd",
                "--system",
                "--user-group",
                "--no-create-home",
                "--home-dir",
                "/nonexistent",
                "--shell",
                "/usr/sbin/nologin",
                VM_USER,
            ]
        )
    except CommandFailed:
        if not _exists(VM_USER):  # else a concurrent start made it first
            raise
    return pwd.getpwnam(VM_USER).pw_uid


@dataclass(frozen=True)
class Isolation:
    """What a QEMU start needs to run isolated: the user QEMU runs as."""

    user: str
    uid: int


def isolate(env: Mapping[str, str] = os.environ) -> Isolation | None:
    """Set this host's workspace filter up (again); None when ROCKPOOL_NETWORK=open."""
    if mode(env) is Network.OPEN:
        return None
    if os.geteuid() != 0:
        raise MissingTool(
            "isolated workspaces need root: QEMU runs as the user rockpool-vm and "
            "nftables keeps its guest away from this host",
            hint="run the worker as root, or on a single-user machine set "
            "ROCKPOOL_NETWORK=open (any local user can then reach the forwards)",
        )
    tools.require(["nft"], "isolating workspaces")
    uid = vm_uid()
    rules = ruleset(uid, client_uids(env), resolvers(), guest_allowances(env))
    run(["nft", "-f", "-"], input_bytes=rules.encode())
    return Isolation(VM_USER, uid)


def pick_port(taken: Iterable[int] = (), preferred: int | None = None) -> int:
    """A free port of FORWARD_PORTS on 127.0.0.1: preferred if it is free (a restarted
    workspace keeps its ports, so routes to it stay right)."""
    skip = set(taken)
    candidates = list(FORWARD_PORTS)
    random.shuffle(candidates)
    if preferred is not None and preferred in FORWARD_PORTS:
        candidates.insert(0, preferred)
    for port in candidates:
        if port not in skip and _free(port):
            return port
    raise Conflict(
        f"no free port in {FORWARD_PORTS.start}-{FORWARD_PORTS.stop - 1} for a forward",
        hint="stop workspaces that are not in use, or remove their dynamic ports",
    )


def _free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
