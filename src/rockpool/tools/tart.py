"""The `tart` CLI (macOS on Apple silicon) and Tart's files.

    $TART_HOME/vms/NAME/{config.json,disk.img,nvram.bin}   a local Tart VM
    $TART_HOME/vms/rockpool-IMAGE-VERSION/                  an image version, installed once
    $TART_HOME/vms/rockpool-tmp-*/                          installs in progress

Every tart command goes through command.run, and `tart run` through command.spawn, with
$TART_HOME and Tart's other TART_* settings passed on. Tart's failures become NotFound
or Conflict where they mean that (tart_error).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from rockpool.command import clean_environment, run, spawn
from rockpool.errors import CommandFailed, Conflict, MissingTool, NotFound, RockpoolError
from rockpool.files import write_json_atomic
from rockpool.tools import CLEAN_PATH

log = logging.getLogger("rockpool.tart")

# The files of a Tart VM (and of the tart output, which lacks NVRAM: only macOS makes one).
CONFIG = "config.json"
DISK = "disk.img"
NVRAM = "nvram.bin"
INSTALL_HINT = "install Tart on macOS: brew install cirruslabs/cli/tart"
# Installed images are Tart VMs named rockpool-IMAGE-VERSION, and installs in progress
# rockpool-tmp-*; workspace names may not start with the prefix.
RESERVED_PREFIX = "rockpool-"
TMP_PREFIX = "rockpool-tmp-"

# Tart's own messages (Sources/tart/VMStorageHelper.swift, RuntimeError.description).
_DOES_NOT_EXIST = re.compile(r'the specified VM "([^"]*)" does not exist')  # exit 2
_NOT_RUNNING = re.compile(r'VM "([^"]*)" is not running')  # stop; exit 2
_RUNNING = re.compile(r'VM "([^"]*)" is (?:already )?running')  # run: 2, delete: 1
_NO_IP = "no IP address found"  # tart ip; exit 1


class NotRunning(Conflict):
    """`tart stop` of a VM that is not running (it stopped by itself meanwhile)."""


def tart_home() -> Path:
    custom = os.environ.get("TART_HOME")
    return Path(custom) if custom else Path.home() / ".tart"


def vm_dir(vm: str) -> Path:
    return tart_home() / "vms" / vm


def image_vm_name(image: str, version_id: str) -> str:
    # Image names are slugs and version ids 12 hex digits: always a valid local Tart name.
    return f"{RESERVED_PREFIX}{image}-{version_id}"


def is_running(entry: Mapping[str, Any] | None) -> bool:
    """Whether an entry of local_vms() is a running VM."""
    return entry is not None and entry.get("State") == "running"


def copy_disk(source: Path, target: Path) -> None:
    """Copy-on-write where the filesystem can (APFS clonefile, btrfs/XFS reflinks): an
    image's disk then costs no space or time until a VM writes to it."""
    if sys.platform == "darwin":
        try:
            run(["cp", "-c", source, target])
            return
        except CommandFailed:  # no clonefile(2) here (another volume, not APFS)
            target.unlink(missing_ok=True)
        run(["cp", source, target])
    else:
        run(["cp", "--reflink=auto", "--sparse=always", source, target])


# ---- running tart ---------------------------------------------------------------------------


def available() -> bool:
    """Whether the caller's PATH has a `tart` (only macOS on Apple silicon can)."""
    return shutil.which("tart") is not None


def tart_executable() -> str:
    """The absolute path of the caller's `tart`; MissingTool where there is none."""
    found = shutil.which("tart")
    if found is None:
        where = "" if sys.platform == "darwin" else " (Tart runs on macOS only)"
        raise MissingTool(
            f"the Tart runtime needs the 'tart' command, which is not on PATH{where}",
            hint=INSTALL_HINT,
        )
    return os.path.abspath(found)


def tart_env(executable: str) -> dict[str, str]:
    # clean_environment() resets PATH: keep tart's own directory first (Homebrew's bin is
    # not in the clean PATH, and tart finds helpers such as softnet on PATH) and Tart's
    # settings: TART_HOME, TART_NO_AUTO_PRUNE and the like.
    extra = {key: value for key, value in os.environ.items() if key.startswith("TART_")}
    extra["PATH"] = f"{os.path.dirname(executable)}:{CLEAN_PATH}"
    return clean_environment(extra)


def run_tart(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """`tart ARGS` through command.run; Tart's failures become NotFound or Conflict where
    they mean that, else CommandFailed with Tart's stderr."""
    executable = tart_executable()
    result = run([executable, *args], env=tart_env(executable), capture=True, check=False)
    if check and result.returncode != 0:
        raise tart_error(CommandFailed(list(result.args), result.returncode, result.stderr))
    return result


def tart_error(failure: CommandFailed) -> RockpoolError:
    text = failure.stderr_tail
    if found := _DOES_NOT_EXIST.search(text):
        return NotFound(
            f"Tart has no VM named '{found[1]}'", hint="list Tart's VMs with: tart list"
        )
    if found := _NOT_RUNNING.search(text):
        return NotRunning(f"Tart VM '{found[1]}' is not running")
    if found := _RUNNING.search(text):
        return Conflict(f"Tart VM '{found[1]}' is running")
    return failure


def local_vms() -> dict[str, dict[str, Any]]:
    """Tart's local VMs by name, from `tart list --format json --source local`."""
    output = run_tart("list", "--format", "json", "--source", "local").stdout
    try:
        entries = json.loads(output or "[]")
    except ValueError as exc:
        raise RockpoolError(
            f"`tart list --format json` printed something that is not JSON ({exc})",
            hint="check the tart on PATH: tart --version",
        ) from None
    return {str(entry["Name"]): entry for entry in entries}


def vm_ip(name: str, wait: int = 0) -> str | None:
    """`tart ip NAME --wait N`: the address DHCP gave the VM's MAC, or None."""
    result = run_tart("ip", name, "--wait", str(wait), check=False)
    address = result.stdout.strip()
    if result.returncode == 0 and address:
        return address.splitlines()[-1]
    if _NO_IP in result.stderr:
        return None
    raise tart_error(CommandFailed(list(result.args), result.returncode, result.stderr))


def spawn_run(vm: str, *, disk: Path, softnet: bool, log_path: Path) -> int:
    """`tart run VM --no-graphics [--net-softnet] --disk DISK:ro` in the background, its
    output to log_path; returns its pid."""
    tart = tart_executable()
    argv = [tart, "run", vm, "--no-graphics"]
    argv += ["--net-softnet"] if softnet else []
    argv += ["--disk", f"{disk}:ro"]
    return spawn(argv, log_path=log_path, env=tart_env(tart))


def delete_in(vm: str, env: Mapping[str, str], on_line: Callable[[str], None]) -> None:
    """`tart delete VM` in another tool's environment (Packer's), its output to on_line;
    a failure is not raised: the caller sees whether the VM's directory is gone."""
    run(["tart", "delete", vm], env=env, on_line=on_line, check=False)


# Tart marks a running VM with an fcntl write lock on its config.json, held by `tart run`
# (PIDLock.swift); F_GETLK names the holder. struct flock differs between the platforms.
if sys.platform == "darwin":
    _FLOCK = "qqihh"  # l_start, l_len, l_pid, l_type, l_whence
    _FLOCK_QUERY = struct.pack(_FLOCK, 0, 0, 0, fcntl.F_RDLCK, os.SEEK_SET)
    _FLOCK_PID = 2
else:
    _FLOCK = "hhqqi4x"  # l_type, l_whence, l_start, l_len, l_pid
    _FLOCK_QUERY = struct.pack(_FLOCK, fcntl.F_RDLCK, os.SEEK_SET, 0, 0, 0)
    _FLOCK_PID = 4


def run_lock_holder(directory: Path) -> int:
    """The pid of the `tart run` that holds the VM in directory, or 0."""
    try:
        fd = os.open(directory / CONFIG, os.O_RDWR)
    except OSError:
        return 0
    try:
        answer = fcntl.fcntl(fd, fcntl.F_GETLK, _FLOCK_QUERY)
    finally:
        os.close(fd)
    return int(struct.unpack(_FLOCK, answer)[_FLOCK_PID])


def request_stop(vm: str) -> bool:
    """Press the guest's power button, as Tart does on SIGUSR2 to the `tart run` that
    holds the VM (the framework's requestStop()); False when no `tart run` holds it."""
    pid = run_lock_holder(vm_dir(vm))
    if pid == 0:
        return False
    try:
        os.kill(pid, signal.SIGUSR2)
    except ProcessLookupError:
        return False
    return True


# ---- installing images ----------------------------------------------------------------------


@contextlib.contextmanager
def install_lock() -> Iterator[None]:
    """Held while rockpool has temporary VMs (rockpool-tmp-*) in Tart. In TART_HOME, not
    the store: every rockpool using this Tart takes turns."""
    home = tart_home()
    home.mkdir(parents=True, exist_ok=True)
    with open(home / ".rockpool-install.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@contextlib.contextmanager
def scratch_vm(*, keep: bool) -> Iterator[tuple[str, Path]]:
    """`tart create --linux rockpool-tmp-RANDOM`: (its name, its directory). It is deleted
    when the body fails, and also after it unless keep (the body renames it). Hold
    install_lock() around it."""
    name = f"{TMP_PREFIX}{uuid.uuid4().hex[:12]}"
    run_tart("create", "--linux", name)
    kept = False
    try:
        yield name, vm_dir(name)
        kept = keep
    finally:
        if not kept:
            with contextlib.suppress(RockpoolError):
                run_tart("delete", name)


def fresh_nvram() -> bytes:
    """A new EFI variable store (nvram.bin) from `tart create --linux`: an Apple
    VZEFIVariableStore, which only macOS can make. For the nvram layer `tart pull` needs."""
    with install_lock(), scratch_vm(keep=False) as (_, directory):
        return (directory / NVRAM).read_bytes()


def install_bundle(bundle: Path, vm: str) -> bool:
    """Make a tart bundle (config.json + disk.img) the local Tart VM named vm; False if
    that VM exists already.

    `tart create --linux` makes a VM with a genuine nvram.bin (an EFI variable store only
    macOS can create); its disk.img and config.json are then replaced by the bundle's,
    keeping the MAC address Tart generated so installs never share one. It is filled
    under a temporary name and renamed only when whole, so an interruption never leaves
    a half-installed VM under the final name.
    """
    with install_lock():
        vms = local_vms()
        if vm in vms:
            return False
        _remove_abandoned_installs(vms)
        with scratch_vm(keep=True) as (tmp, directory):
            mac = json.loads((directory / CONFIG).read_text()).get("macAddress")
            if not isinstance(mac, str):
                raise RockpoolError(f"`tart create` wrote no macAddress to {directory}")
            config = json.loads((bundle / CONFIG).read_text())
            config["macAddress"] = mac
            staged = directory / f".{DISK}.rockpool"
            copy_disk(bundle / DISK, staged)
            os.replace(staged, directory / DISK)
            write_json_atomic(directory / CONFIG, config)
            run_tart("rename", tmp, vm)
    return True


def uninstall(vm: str) -> bool:
    """Delete an installed image's Tart VM, if there is one."""
    with install_lock():
        if vm not in local_vms():
            return False
        run_tart("delete", vm)
    return True


def _remove_abandoned_installs(vms: Mapping[str, Mapping[str, Any]]) -> None:
    """Temporary VMs of installs that were killed (the install lock is held here)."""
    for vm, entry in vms.items():
        if vm.startswith(TMP_PREFIX) and not is_running(entry):
            log.info("removing %s, left by an interrupted image install", vm)
            with contextlib.suppress(RockpoolError):
                run_tart("delete", vm)
