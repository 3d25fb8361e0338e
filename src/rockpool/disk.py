"""Stage: assemble a bootable GPT disk without mounting anything.

Layout: an EFI system partition with systemd-boot at the removable path (what UEFI
firmware with a fresh NVRAM boots: Tart, Incus, QEMU+OVMF), the kernel and initrd,
then an ext4 root that fills the rest and grows with the disk on first boot.
"""

from __future__ import annotations

import re
from pathlib import Path

from rockpool.command import clean_environment, run
from rockpool.context import BuildContext
from rockpool.errors import RockpoolError

MIB = 1 << 20
ESP_SIZE = 256 * MIB
ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
# Discoverable Partitions Specification root types, per architecture.
ROOT_TYPE = {
    "amd64": "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709",
    "arm64": "B921B045-1DF0-41C3-AF44-4C6F280D3FAE",
}
EFI_BOOT_NAME = {
    "amd64": ("systemd-bootx64.efi", "BOOTX64.EFI"),
    "arm64": ("systemd-bootaa64.efi", "BOOTAA64.EFI"),
}
CONSOLES = {
    "amd64": "console=tty0 console=ttyS0,115200n8",
    "arm64": "console=tty0 console=hvc0 console=ttyAMA0,115200n8",
}


def _newest(root: Path, pattern: str) -> Path:
    found = sorted(
        root.glob(pattern),
        key=lambda p: [int(n) if n.isdigit() else n for n in re.split(r"(\d+)", p.name)],
    )
    if not found:
        raise RockpoolError(f"the bootstrapped root has no {pattern}; the kernel did not install")
    return found[-1]


def kernel_command_line(ctx: BuildContext) -> str:
    return f"root=UUID={ctx.identity.root_fs_uuid} ro {CONSOLES[ctx.spec.architecture]}"


# Kernel updates inside a workspace (apt upgrade) must reach the ESP, or the VM would
# keep booting an old kernel whose modules apt has removed.
ESP_SYNC_HOOK = """#!/bin/sh
# Copies the newest installed kernel and initrd to the EFI system partition, where
# systemd-boot loads them. Installed by rockpool; run by kernel and initramfs updates.
set -e
esp=/boot/efi
ls "$esp" >/dev/null 2>&1 || exit 0  # triggers the automount; no ESP: nothing to do
newest=$(linux-version list | linux-version sort | tail -n 1)
[ -n "$newest" ] && [ -f "/boot/vmlinuz-$newest" ] && [ -f "/boot/initrd.img-$newest" ] || exit 0
for pair in "vmlinuz-$newest:vmlinuz" "initrd.img-$newest:initrd.img"; do
    cp "/boot/${pair%%:*}" "$esp/${pair#*:}.new"
    sync "$esp/${pair#*:}.new"
    mv "$esp/${pair#*:}.new" "$esp/${pair#*:}"
done
"""
ESP_SYNC_HOOK_PATHS = (
    "etc/kernel/postinst.d/zz-rockpool-esp",
    "etc/kernel/postrm.d/zz-rockpool-esp",
    "etc/initramfs/post-update.d/zz-rockpool-esp",
)


def write_boot_config(ctx: BuildContext) -> None:
    """fstab for the root and the ESP, and the hooks that keep the ESP current."""
    identity = ctx.identity
    (ctx.root / "etc/fstab").write_text(
        "# The root filesystem; rockpool-growroot.service grows it with the disk.\n"
        f"UUID={identity.root_fs_uuid} / ext4 defaults,errors=remount-ro 0 1\n"
        "# The EFI system partition, mounted on first use (kernel updates).\n"
        f"PARTUUID={identity.esp_guid} /boot/efi vfat "
        "umask=0077,noauto,nofail,x-systemd.automount,x-systemd.idle-timeout=60 0 0\n"
    )
    (ctx.root / "boot/efi").mkdir(parents=True, exist_ok=True)
    for relative in ESP_SYNC_HOOK_PATHS:
        hook = ctx.root / relative
        hook.parent.mkdir(parents=True, exist_ok=True)
        hook.write_text(ESP_SYNC_HOOK)
        hook.chmod(0o755)


def build_esp(ctx: BuildContext, esp: Path) -> None:
    arch = ctx.spec.architecture
    loader_source, loader_name = EFI_BOOT_NAME[arch]
    loader = ctx.root / "usr/lib/systemd/boot/efi" / loader_source
    if not loader.is_file():
        raise RockpoolError(f"systemd-boot is missing from the root ({loader})")
    kernel = _newest(ctx.root / "boot", "vmlinuz-*")
    initrd = _newest(ctx.root / "boot", "initrd.img-*")
    staging = ctx.work / "esp"
    staging.mkdir()
    (staging / "loader.conf").write_text("timeout 0\neditor no\n")
    (staging / "rockpool.conf").write_text(
        f"title Rockpool workspace (Debian {ctx.spec.suite})\n"
        "linux /vmlinuz\ninitrd /initrd.img\n"
        f"options {kernel_command_line(ctx)}\n"
    )
    env = clean_environment(
        {"SOURCE_DATE_EPOCH": str(ctx.source_date_epoch), "MTOOLS_SKIP_CHECK": "1"}
    )
    run(
        [
            "mkfs.vfat",
            "-F",
            "32",
            "-n",
            "ESP",
            "-i",
            ctx.identity.esp_volume_id,
            "--invariant",
            "-C",
            esp,
            str(ESP_SIZE // 1024),
        ],
        env=env,
    )
    run(["mmd", "-i", esp, "::/EFI", "::/EFI/BOOT", "::/loader", "::/loader/entries"], env=env)
    for source, target in (
        (loader, f"::/EFI/BOOT/{loader_name}"),
        (kernel, "::/vmlinuz"),
        (initrd, "::/initrd.img"),
        (staging / "loader.conf", "::/loader/loader.conf"),
        (staging / "rockpool.conf", "::/loader/entries/rockpool.conf"),
    ):
        run(["mcopy", "-i", esp, source, target], env=env)
    ctx.facts["kernel"] = kernel.name.removeprefix("vmlinuz-")


def assemble_disk(ctx: BuildContext) -> None:
    spec, identity = ctx.spec, ctx.identity
    esp = ctx.work / "esp.img"
    write_boot_config(ctx)
    build_esp(ctx, esp)

    root_start = MIB + ESP_SIZE
    root_size = spec.disk_size - root_start - MIB  # the backup GPT lives in the last MiB
    with open(ctx.disk, "wb") as handle:
        handle.truncate(spec.disk_size)
    table = (
        "label: gpt\n"
        f"label-id: {identity.disk_guid}\n"
        f"start={MIB // 512}, size={ESP_SIZE // 512}, type={ESP_TYPE}, "
        f'uuid={identity.esp_guid}, name="esp"\n'
        f"start={root_start // 512}, size={root_size // 512}, "
        f'type={ROOT_TYPE[spec.architecture]}, uuid={identity.root_guid}, name="root"\n'
    )
    run(
        ["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", ctx.disk],
        input_bytes=table.encode(),
    )
    run(
        [
            "dd",
            f"if={esp}",
            f"of={ctx.disk}",
            "bs=1M",
            f"seek={MIB // MIB}",
            "conv=notrunc,sparse",
            "status=none",
        ]
    )
    esp.unlink()

    epoch = str(ctx.source_date_epoch)
    env = clean_environment({"E2FSPROGS_FAKE_TIME": epoch, "SOURCE_DATE_EPOCH": epoch})
    run(
        [
            "mke2fs",
            "-q",
            "-F",
            "-t",
            "ext4",
            "-b",
            "4096",
            "-m",
            "1",
            "-L",
            "root",
            "-U",
            identity.root_fs_uuid,
            "-E",
            f"offset={root_start},hash_seed={identity.root_hash_seed},root_owner=0:0,nodiscard",
            "-d",
            ctx.root,
            ctx.disk,
            f"{root_size // 1024}k",
        ],
        env=env,
    )
    ctx.facts["disk"] = {
        "virtual_size": spec.disk_size,
        "esp_size": ESP_SIZE,
        "root_offset": root_start,
        "root_size": root_size,
        "root_used_bytes": root_used_bytes(ctx.disk, root_start),
        "kernel_command_line": kernel_command_line(ctx),
    }


def root_used_bytes(disk: Path, offset: int) -> int:
    result = run(["dumpe2fs", "-h", f"{disk}?offset={offset}"], capture=True)
    fields = dict(re.findall(r"^([A-Za-z ]+):\s+(\S+)", result.stdout, re.MULTILINE))
    block_size = int(fields["Block size"])
    return (int(fields["Block count"]) - int(fields["Free blocks"])) * block_size
