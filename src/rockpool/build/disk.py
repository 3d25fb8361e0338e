"""Stage: assemble a bootable GPT disk without mounting anything.

Layout: an EFI system partition with systemd-boot at the removable path (what UEFI
firmware with a fresh NVRAM boots: Tart, Incus, QEMU+OVMF), the kernel and initrd,
then an ext4 root that fills the rest and grows with the disk on first boot.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from rockpool.arch import ARCHITECTURES
from rockpool.build.rootfs import write_listing
from rockpool.command import clean_environment, run
from rockpool.errors import RockpoolError
from rockpool.files import image_directory

if TYPE_CHECKING:
    from rockpool.build.context import BuildContext  # stages are called with one

MIB = 1 << 20
ESP_SIZE = 256 * MIB
ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"


def _newest(root: Path, pattern: str) -> Path:
    found = sorted(
        root.glob(pattern),
        key=lambda p: [int(n) if n.isdigit() else n for n in re.split(r"(\d+)", p.name)],
    )
    if not found:
        raise RockpoolError(f"the bootstrapped root has no {pattern}; the kernel did not install")
    return found[-1]


def kernel_command_line(ctx: BuildContext) -> str:
    return (
        f"root=UUID={ctx.identity.root_fs_uuid} ro {ARCHITECTURES[ctx.spec.architecture].consoles}"
    )


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
    (ctx.root / "etc/fstab").chmod(0o644)  # whatever the builder's umask
    image_directory(ctx.root / "boot/efi")
    for relative in ESP_SYNC_HOOK_PATHS:
        hook = ctx.root / relative
        image_directory(hook.parent)
        hook.write_text(ESP_SYNC_HOOK)
        hook.chmod(0o755)


def build_esp(ctx: BuildContext, esp: Path) -> None:
    arch = ctx.spec.architecture
    loader_source, loader_name = ARCHITECTURES[arch].loader
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
    clamp_mtimes(staging, ctx.source_date_epoch)
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
        # -m keeps the (clamped) mtime instead of stamping the time of the build.
        run(["mcopy", "-m", "-i", esp, source, target], env=env)
    ctx.facts["kernel"] = kernel.name.removeprefix("vmlinuz-")


def prepare_root(ctx: BuildContext) -> None:
    """The root as the disk holds it: its boot configuration, no time after the epoch."""
    write_boot_config(ctx)
    mark_updated(ctx.root, ctx.source_date_epoch)
    clamp_mtimes(ctx.root, ctx.source_date_epoch)


UPDATED_MARKERS = ("etc/.updated", "var/.updated")


def mark_updated(root: Path, epoch: int) -> None:
    """/etc and /var are up to date with /usr, as systemd-update-done records it: no
    ConditionNeedsUpdate= unit (ldconfig, hwdb, sysusers, the journal's catalog) then
    runs at first boot, rockpool-seal having done their work. Written here, not in the
    root, because the record holds /usr's mtime, which is the epoch only once clamped."""
    mtime_ns = min((root / "usr").stat().st_mtime_ns, epoch * 1_000_000_000)
    for relative in UPDATED_MARKERS:
        marker = root / relative
        marker.write_text(
            "# This file was created by rockpool, as systemd-update-done would. It holds\n"
            "# the time this directory was updated: see man:systemd-update-done.service(8).\n"
            f"TIMESTAMP_NSEC={mtime_ns}\n"
        )
        marker.chmod(0o644)
        os.utime(marker, ns=(mtime_ns, mtime_ns))


def assemble_disk(ctx: BuildContext) -> None:
    prepare_root(ctx)
    # The file listing (for `image diff`) reads the tree on the second core meanwhile.
    with ThreadPoolExecutor(max_workers=1) as pool:
        listed = pool.submit(write_listing, ctx.root, ctx.listing)
        write_disk(ctx)
        listed.result()


def write_disk(ctx: BuildContext) -> None:
    spec, identity = ctx.spec, ctx.identity
    esp = ctx.work / "esp.img"
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
        f"type={ARCHITECTURES[spec.architecture].root_partition_type}, "
        f'uuid={identity.root_guid}, name="root"\n'
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
    pin_inode_times(ctx.disk, root_start, ctx.source_date_epoch)
    ctx.facts["disk"] = {
        "virtual_size": spec.disk_size,
        "esp_size": ESP_SIZE,
        "root_offset": root_start,
        "root_size": root_size,
        "root_used_bytes": root_used_bytes(ctx.disk, root_start),
        "kernel_command_line": kernel_command_line(ctx),
    }


def clamp_mtimes(tree: Path, epoch: int) -> None:
    """No file in the image is newer than SOURCE_DATE_EPOCH: what the build itself wrote
    (setup.sh's files, the initramfs, npm's directories) would otherwise carry its time."""
    for directory, subdirs, files in os.walk(tree):
        for name in (*subdirs, *files):
            path = os.path.join(directory, name)
            stat = os.lstat(path)
            if stat.st_mtime > epoch:
                os.utime(path, (epoch, epoch), follow_symlinks=False)
    if os.lstat(tree).st_mtime > epoch:
        os.utime(tree, (epoch, epoch))


# Inodes mke2fs fills from the source tree: the root directory and everything from 11 on
# (1 and 3-10 are reserved and stay zero).
_FIRST_TREE_INODE = 11
_ROOT_INODE = 2


def used_inodes(disk: Path, offset: int) -> list[int]:
    """The inode numbers in use, from dumpe2fs's per-group free-inode ranges."""
    report = run(["dumpe2fs", f"{disk}?offset={offset}"], capture=True).stdout
    per_group = re.search(r"^Inodes per group:\s+(\d+)", report, re.MULTILINE)
    if per_group is None:
        raise RockpoolError(f"dumpe2fs of {disk} reported no 'Inodes per group'")
    size = int(per_group.group(1))
    used: list[int] = []
    for group, free_list in enumerate(re.findall(r"^\s+Free inodes: ?(.*)$", report, re.MULTILINE)):
        free: set[int] = set()
        for item in filter(None, (part.strip() for part in free_list.split(","))):
            low, _, high = item.partition("-")
            free.update(range(int(low), int(high or low) + 1))
        first = group * size + 1
        used.extend(n for n in range(first, first + size) if n not in free)
    return used


def pin_inode_times(disk: Path, offset: int, epoch: int) -> None:
    """Set every inode's ctime and atime to SOURCE_DATE_EPOCH.

    e2fsprogs 1.47.0 (Debian 12 hosts) copies them from the source tree, where ctime is
    always the time the file was written; 1.47.1 and later clamp them already.
    """
    inodes = [n for n in used_inodes(disk, offset) if n == _ROOT_INODE or n >= _FIRST_TREE_INODE]
    commands = "".join(
        f"sif <{inode}> {field} @{epoch}\n" for inode in inodes for field in ("ctime", "atime")
    )
    # debugfs stamps the superblock's last write time with the clock (it ignores
    # E2FSPROGS_FAKE_TIME), so it runs with the clock stopped at the epoch: -f takes
    # libfaketime's absolute format, a clock that does not advance.
    stopped_clock = dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
    # debugfs exits 0 even when a command fails; anything past its banner is an error.
    result = run(
        ["faketime", "-f", stopped_clock, "debugfs", "-w", "-f", "-", f"{disk}?offset={offset}"],
        env=clean_environment({"TZ": "UTC"}),
        input_bytes=commands.encode(),
        capture=True,
    )
    errors = [line for line in result.stderr.splitlines() if not line.startswith("debugfs ")]
    if errors:
        raise RockpoolError(f"debugfs could not pin inode times in {disk}: {errors[-1]}")


def root_used_bytes(disk: Path, offset: int) -> int:
    result = run(["dumpe2fs", "-h", f"{disk}?offset={offset}"], capture=True)
    fields = dict(re.findall(r"^([A-Za-z ]+):\s+(\S+)", result.stdout, re.MULTILINE))
    block_size = int(fields["Block size"])
    return (int(fields["Block count"]) - int(fields["Free blocks"])) * block_size
