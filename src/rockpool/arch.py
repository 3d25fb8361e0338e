"""The architectures rockpool builds and runs, and every name each one goes by: the one
table that spec validation, the host checks, the disk layout and QEMU all read."""

from __future__ import annotations

import platform
from dataclasses import dataclass

from rockpool.errors import InvalidInput


@dataclass(frozen=True)
class Architecture:
    debian: str  # the spec's name, Debian's: amd64, arm64
    host_machines: tuple[str, ...]  # what platform.machine() says on such a host
    qemu: str  # QEMU's name: qemu-system-QEMU, qemu-QEMU-static, binfmt_misc's qemu-QEMU
    node: str  # Node.js's release name: node-linux-NODE
    machine_type: str  # QEMU's -machine
    tcg_cpu: str  # QEMU's -cpu under TCG
    # Under TCG, arm64's architected pointer authentication costs a lot of emulation;
    # the implementation-defined algorithm is much cheaper and guests cannot tell.
    loader: tuple[str, str]  # systemd-boot's file in the root, its name on the ESP
    consoles: str  # the kernel command line's consoles: every runtime's first serial port
    root_partition_type: str  # the Discoverable Partitions Specification's root type


ARCHITECTURES: dict[str, Architecture] = {
    "amd64": Architecture(
        debian="amd64",
        host_machines=("x86_64", "amd64"),
        qemu="x86_64",
        node="x64",
        machine_type="q35",
        tcg_cpu="max",
        loader=("systemd-bootx64.efi", "BOOTX64.EFI"),
        consoles="console=tty0 console=ttyS0,115200n8",
        root_partition_type="4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709",
    ),
    "arm64": Architecture(
        debian="arm64",
        host_machines=("aarch64", "arm64"),
        qemu="aarch64",
        node="arm64",
        machine_type="virt",
        tcg_cpu="max,pauth-impdef=on",
        loader=("systemd-bootaa64.efi", "BOOTAA64.EFI"),
        consoles="console=tty0 console=hvc0 console=ttyAMA0,115200n8",
        root_partition_type="B921B045-1DF0-41C3-AF44-4C6F280D3FAE",
    ),
}
NAMES = tuple(ARCHITECTURES)


def host_architecture() -> str:
    """This host's architecture, by its Debian name."""
    machine = platform.machine()
    for arch in ARCHITECTURES.values():
        if machine in arch.host_machines:
            return arch.debian
    raise InvalidInput(f"this host's architecture '{machine}' is not supported")
