"""The Packer path: build the image on macOS with Packer's tart-cli builder.

The design's build tool (EDD 005): Packer clones a Debian Tart VM, boots it, runs the
shared setup.sh in it over SSH, then rockpool-seal; the VM Tart is left with becomes
the image. The Linux default path (mmdebstrap) runs the same setup.sh in a chroot.

Field names and behaviour follow cirruslabs/packer-plugin-tart (builder/tart/*.go):
cpu_count is a uint8, memory_gb and disk_size_gb uint16; memory_gb is GiB (`tart set
--memory N*1024` MiB), disk_size_gb is Tart's decimal GB (10^9 bytes).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import platform
import shlex
import shutil
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from rockpool import tools
from rockpool.build.context import BuildContext
from rockpool.build.keys import code_digests, input_digest
from rockpool.build.outputs import write_formats
from rockpool.build.plan import BuildPlan
from rockpool.build.provision import installed_versions, setup_variables
from rockpool.build.runner import BuildResult, run_build
from rockpool.errors import InvalidInput, MissingTool, NotFound, SpecError
from rockpool.files import link_or_copy
from rockpool.formats import FormatJob, Output, OutputFormat
from rockpool.formats.tart_oci import TartOciFormat, with_nvram
from rockpool.progress import Reporter
from rockpool.spec import ImageSpec, spec_digest
from rockpool.store import Store
from rockpool.tools import CLEAN_PATH
from rockpool.tools import packer as packer_cli
from rockpool.tools import tart as tart_cli
from rockpool.tools.tart import CONFIG, DISK, NVRAM

PLUGIN_SOURCE = "github.com/cirruslabs/tart"
# 1.19.0: a guest that powers itself off during provisioning is taken as intended
# (builder/tart/step_run.go); the build ends that way (see _finish_lines).
PLUGIN_VERSION = ">= 1.19.0"
# cirruslabs' Debian (trixie) Tart image, from github.com/cirruslabs/linux-image-templates:
# Debian's generic cloud image with cloud-init, whose user-data makes the login
# admin/admin with passwordless sudo and turns SSH password logins on. Those are the
# BASE's public build credentials; the build removes them (see _finish_lines).
DEFAULT_BASE_VM = "ghcr.io/cirruslabs/debian:latest"
BASE_USER = "admin"
BASE_PASSWORD = "admin"
SSH_TIMEOUT = "10m"
TEMPLATE = "rockpool.pkr.hcl"
GIB = 1 << 30
TART_GB = 1000**3  # `tart set --disk-size` counts decimal gigabytes
SEAL = "/usr/local/sbin/rockpool-seal"  # written by setup.sh
# Formats written on the host after the VM is built, and the tools they run (through
# CLEAN_PATH, as every command runs).
FORMAT_TOOLS = {"qcow2": {"qemu-img": "qemu"}}
# The guest files provision.installed_versions reads, fetched before the seal so the
# manifest lists exact versions as the mmdebstrap path's does.
VERSION_FILES = (
    "var/lib/dpkg/status",
    "usr/local/include/node/node_version.h",
    "usr/local/lib/node_modules/npm/package.json",
    "usr/local/lib/node_modules/code-server/package.json",
)
GUEST_DIR = "guest"  # beside the template; the downloads land below it
VM_FILES_DIR = "tart-vm"  # in the build's work directory: the VM's config.json and nvram.bin


# ---- the template -------------------------------------------------------------------


def hcl_string(value: str) -> str:
    """A quoted HCL string literal holding exactly value, never a template.

    JSON's escapes are HCL's (\\", \\\\, \\n, \\uNNNN); HCL also reads ${ and %{ as the
    start of an interpolation or directive, whose literal forms are $${ and %%{.
    """
    return json.dumps(value, ensure_ascii=False).replace("${", "$${").replace("%{", "%%{")


Value = str | int | bool | Sequence[str]


class Expression(str):
    """HCL written as is (an interpolation Packer is meant to evaluate), not as a string."""


def _hcl_value(value: Value, indent: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, Expression):
        return str(value)
    if isinstance(value, str):
        return hcl_string(value)
    items = "".join(f"{indent}  {hcl_string(item)},\n" for item in value)
    return f"[\n{items}{indent}]"


def _block(header: str, attributes: dict[str, Value], indent: str = "") -> str:
    """A block of attributes, one a line, aligned as `packer fmt` aligns them."""
    width = max(len(name) for name in attributes)
    inner = indent + "  "
    lines = "".join(
        f"{inner}{name.ljust(width)} = {_hcl_value(value, inner)}\n"
        for name, value in attributes.items()
    )
    return f"{indent}{header} {{\n{lines}{indent}}}\n"


def memory_gb(spec: ImageSpec) -> int:
    """The spec's memory in the plugin's memory_gb, which is whole GiB."""
    if spec.memory % GIB:
        raise SpecError(
            spec.path,
            "workspace.memory",
            f"the Packer tart-cli builder sets memory in whole GiB, not {spec.memory} bytes",
            hint='use a whole number of G, such as memory = "4G"',
        )
    return spec.memory // GIB


def disk_size_gb(spec: ImageSpec) -> int:
    """The spec's disk size in Tart's decimal GB, rounded up so the disk is never smaller."""
    return -(-spec.disk_size // TART_GB)


def new_vm_name() -> str:
    """A Tart VM name of its own for each build, so concurrent builds never share one."""
    return f"rockpool-build-{uuid.uuid4().hex[:8]}"


def _suite_check(suite: str) -> list[str]:
    # setup.sh installs from the base's own apt sources: they must be the spec's suite.
    return [
        ". /etc/os-release",
        f'if [ "${{VERSION_CODENAME:-}}" != {shlex.quote(suite)} ]; then',
        f"  echo \"rockpool: the base VM runs Debian '${{VERSION_CODENAME:-?}}', "
        f'the spec asks for {suite}" >&2',
        "  exit 1",
        "fi",
    ]


def _finish_lines(build_user: str) -> list[str]:
    """Remove the base's build login, seal, and power the guest off: run as root, last.

    The build logs in with the base image's public password, so its account, password
    hash, sudo grant and the cloud-init that would make them again must all go. This
    script is the build's last use of that login: it deletes the account in use
    (userdel --force) while its root shell goes on, checks that no account is left with
    a password, runs rockpool-seal, and powers the guest off itself a moment later
    through PID 1 (systemd-run), so no later step needs the login and Packer's own
    shutdown over SSH is not needed: if Packer still tries it, it fails harmlessly while
    the guest goes down. `poweroff --force` skips stopping units, so nothing they save
    on the way down (systemd-random-seed's seed) lands after the seal; processes are
    still ended and file systems remounted read-only and synced.
    """
    user = shlex.quote(build_user)
    return [
        f"user={user}",
        'userdel --force --remove "$user"',
        "for grant in /etc/sudoers.d/*; do",
        '  if grep -qsE "^[[:space:]]*$user[[:space:]]" "$grant"; then rm -f -- "$grant"; fi',
        "done",
        # userdel keeps the old files as backups, with the password hash in shadow-.
        "rm -f /etc/passwd- /etc/shadow- /etc/group- /etc/gshadow- /etc/subuid- /etc/subgid-",
        'rm -f "/var/lib/sudo/lectured/$user" /root/.ssh/authorized_keys',
        # cloud-init would make a login again for a "new instance", and its sshd snippet
        # (read before setup.sh's 50-rockpool.conf) turns password logins back on.
        "if [ -d /etc/cloud ]; then touch /etc/cloud/cloud-init.disabled; fi",
        "rm -rf /var/lib/cloud /etc/ssh/sshd_config.d/50-cloud-init.conf",
        # No password hash of any kind may stay, locked or not: '*' for root, and every
        # account's field must be only '!' and '*' (an empty one would let a login in).
        "usermod --password '*' root",
        "left=$(awk -F: '$2 !~ /^[!*]+$/ { print $1 }' /etc/shadow)",
        'if [ -n "$left" ]; then echo "rockpool: accounts with a password: $left" >&2; exit 1; fi',
        SEAL,
        "systemd-run --quiet --on-active=2 /usr/bin/systemctl poweroff --force",
    ]


def render_template(
    spec: ImageSpec,
    *,
    vm_name: str,
    base_vm: str,
    build_user: str = BASE_USER,
    build_password: str = BASE_PASSWORD,
) -> str:
    """A Packer HCL2 template that builds spec's image as the Tart VM vm_name."""
    if not base_vm.strip():
        raise InvalidInput("the Packer base VM must name a Tart VM or an OCI image")
    if build_user in ("root", spec.user):
        raise InvalidInput(
            f"the base VM's build login '{build_user}' is removed at the end of the build, "
            "so it cannot be root or the workspace user"
        )
    env = [f"{name}={value}" for name, value in setup_variables(spec).items()]
    source = _block(
        f'source "tart-cli" {hcl_string(spec.name)}',
        {
            "vm_base_name": base_vm,
            "vm_name": vm_name,
            # A registry image (a name with a '/') is pulled anew, so that "latest" is.
            "always_pull": "/" in base_vm,
            "cpu_count": spec.cpus,
            "memory_gb": memory_gb(spec),
            "disk_size_gb": disk_size_gb(spec),
            "headless": True,
            "disable_vnc": True,  # no boot_command to type: nothing needs the screen
            # A Linux disk has no macOS recovery partition to delete: leave its GPT alone.
            "recovery_partition": "keep",
            "ssh_username": build_user,
            "ssh_password": build_password,
            "ssh_timeout": SSH_TIMEOUT,
        },
    )
    # sudo -n: fail at once, not hang, if the base's login has no passwordless sudo.
    # LANG as the chroot path sets it; the SETUP_* variables are the ones it passes.
    provisioners = [
        _block('provisioner "shell"', {"inline": _suite_check(spec.suite)}, "  "),
        _block(
            'provisioner "shell"',
            {
                "script": str(spec.setup_script),
                "environment_vars": env,
                "execute_command": "sudo -n env LANG=C.UTF-8 {{ .Vars }} bash {{ .Path }}",
            },
            "  ",
        ),
        *(
            _block(
                'provisioner "file"',
                {
                    "direction": "download",
                    "source": f"/{path}",
                    # path.root: the template's directory, in the build's staging dir.
                    "destination": Expression(
                        '"${path.root}/' + hcl_string(f"{GUEST_DIR}/{path}")[1:]
                    ),
                },
                indent="  ",
            )
            for path in VERSION_FILES
        ),
        _block(
            'provisioner "shell"',
            {
                "inline": _finish_lines(build_user),
                "execute_command": "sudo -n sh -eu {{ .Path }}",
                # The guest powers off right after: tolerate the dropped connection,
                # and leave the script's removal to the seal (it empties /tmp).
                "expect_disconnect": True,
                "skip_clean": True,
            },
            "  ",
        ),
    ]
    sources = f"  sources = [{hcl_string(f'source.tart-cli.{spec.name}')}]\n"
    build = "build {\n" + sources + "".join("\n" + block for block in provisioners) + "}\n"
    plugins = (
        "packer {\n  required_plugins {\n"
        + _block("tart =", {"source": PLUGIN_SOURCE, "version": PLUGIN_VERSION}, "    ")
        + "  }\n}\n"
    )
    header = f"# Written by rockpool for one build of {spec.name}; not meant to be edited.\n"
    return "\n".join([header + plugins, source, build])


# ---- the host -----------------------------------------------------------------------


def require_packer_host(spec: ImageSpec | None = None) -> None:
    """Refuse, with what to do instead, unless this host can run the Packer path."""
    system = platform.system()
    if system != "Darwin":
        raise MissingTool(
            "the Packer tart-cli builder needs macOS on Apple Silicon (Tart uses Apple's "
            f"Virtualization framework); this host runs {system}",
            hint="on Linux build with the default builder: rockpool image build SPEC",
        )
    if platform.machine() != "arm64":
        raise MissingTool(
            "the Packer tart-cli builder needs a Mac with Apple Silicon: Tart runs only "
            f"there, and this Mac is {platform.machine()}",
            hint="build on an Apple Silicon Mac, or on Linux with: rockpool image build SPEC",
        )
    if spec is not None and spec.architecture != "arm64":
        raise SpecError(
            spec.path,
            "image.architecture",
            f"the Packer tart-cli builder makes arm64 images only (Tart runs arm64 guests), "
            f"but this image is {spec.architecture}",
            hint="build images/workspace-arm64.toml, or a spec that extends it",
        )
    missing = [tool for tool, path in packer_cli.tool_paths().items() if path is None]
    if missing:
        raise MissingTool(
            f"the Packer tart-cli builder needs {' and '.join(missing)}, which are not on PATH",
            hint=f"run: {packer_cli.BREW_HINT}",
        )
    for fmt in spec.formats if spec is not None else ():
        needed = FORMAT_TOOLS.get(fmt, {})
        absent = tools.missing(needed)
        if absent:
            raise MissingTool(
                f"writing the {fmt} output needs {', '.join(absent)}, which is not in {CLEAN_PATH}",
                hint=f"run: brew install {' '.join(sorted({needed[a] for a in absent}))}, or drop "
                f'"{fmt}" from image.formats',
            )


# ---- the build ----------------------------------------------------------------------


def packer_input_digest(plan: BuildPlan, base_vm: str) -> str:
    """The Linux path's inputs plus the builder, its base VM and the Packer path's code.

    It differs from the Linux path's digest, so neither build is ever reused for the other.
    """
    return spec_digest(
        plan.spec,
        input_digest(plan),
        "builder=packer",
        base_vm,
        *code_digests(["build/packer.py", "tools/packer.py", "tools/tart.py"]),
    )


def _collect(ctx: BuildContext, vm_dir: Path) -> None:
    """Take the VM's disk as ctx.disk, its config and NVRAM for the tart output."""
    missing = [name for name in (CONFIG, DISK, NVRAM) if not (vm_dir / name).is_file()]
    if missing:
        raise NotFound(
            f"packer build finished, but the Tart VM {vm_dir} lacks {', '.join(missing)}",
            hint="check packer's output in the build log",
        )
    disk_format = json.loads((vm_dir / CONFIG).read_text(encoding="utf-8")).get("diskFormat", "raw")
    if disk_format != "raw":
        raise InvalidInput(
            f"the base VM's disk is {disk_format}, but the image's outputs are made from a "
            "raw disk",
            hint="use a base VM with a raw disk (tart's default), such as " + DEFAULT_BASE_VM,
        )
    kept = ctx.work / VM_FILES_DIR
    kept.mkdir()
    for name in (CONFIG, NVRAM):
        shutil.copyfile(vm_dir / name, kept / name)
    link_or_copy(vm_dir / DISK, ctx.disk)


def _run_packer(ctx: BuildContext, *, vm_name: str, base_vm: str) -> None:
    """packer init + build, then take what Tart made; the VM is deleted whatever happens."""
    template_dir = ctx.work / "packer"
    template_dir.mkdir()
    template = render_template(ctx.spec, vm_name=vm_name, base_vm=base_vm)
    (template_dir / TEMPLATE).write_text(template, encoding="utf-8")
    env = packer_cli.environment()
    vm_directory = tart_cli.vm_dir(vm_name)
    try:
        packer_cli.init(template_dir, env=env, on_line=ctx.reporter.status)
        packer_cli.build(template_dir, env=env, on_line=ctx.reporter.status)
        _collect(ctx, vm_directory)
    finally:
        if vm_directory.exists():
            tart_cli.delete_in(vm_name, env, on_line=ctx.reporter.status)
        if vm_directory.exists():
            ctx.reporter.info(
                f"could not delete the build VM {vm_name}; run: tart delete {vm_name}"
            )
    ctx.facts["builder"] = {
        "name": "packer",
        "plugin": f"{PLUGIN_SOURCE} {PLUGIN_VERSION}",
        "base_vm": base_vm,
    }
    ctx.facts["packages"] = installed_versions(template_dir / GUEST_DIR)
    ctx.facts["disk"] = {"virtual_size": ctx.disk.stat().st_size}


class TartVmFormat(OutputFormat):
    """tart: the VM Tart itself made: config.json, disk.img and a genuine nvram.bin."""

    name = "tart"
    filename = "tart"

    def write(self, job: FormatJob) -> Output:
        bundle = job.out_dir / self.filename
        bundle.mkdir()
        for name in (CONFIG, NVRAM):
            shutil.copyfile(job.work / VM_FILES_DIR / name, bundle / name)
        link_or_copy(job.raw_disk, bundle / DISK)  # beside it in the staging dir: a hard link
        return Output(self.name, bundle)


class TartVmOciFormat(TartOciFormat):
    """tart-oci with the VM's own nvram.bin as its last layer, as `tart pull` needs it
    (a Linux build leaves the layer for `rockpool image push` to add)."""

    def write(self, job: FormatJob) -> Output:
        plain = super().write(dataclasses.replace(job, out_dir=job.work))
        nvram = (job.work / VM_FILES_DIR / NVRAM).read_bytes()
        return Output(self.name, with_nvram(plain.path, nvram, job.out_dir / self.filename))


# Formats for which the VM Tart made holds more than its raw disk: its own config and NVRAM.
VM_BACKENDS: dict[str, OutputFormat] = {"tart": TartVmFormat(), "tart-oci": TartVmOciFormat()}


def build_with_packer(
    spec: ImageSpec,
    store: Store,
    reporter: Reporter,
    *,
    force: bool,
    base_vm: str = DEFAULT_BASE_VM,
) -> BuildResult:
    """Build spec's image with Packer and Tart, and land it in the store like any build."""
    require_packer_host(spec)
    vm_name = new_vm_name()
    render_template(spec, vm_name=vm_name, base_vm=base_vm)  # spec problems before slow work
    stages = [
        ("packer", functools.partial(_run_packer, vm_name=vm_name, base_vm=base_vm)),
        ("formats", functools.partial(write_formats, backends=VM_BACKENDS)),
    ]
    plan = BuildPlan.resolve(spec, use_lock=False)
    # Not boot-verified yet: that would be one more Tart run of the built VM.
    return run_build(
        plan,
        store,
        reporter,
        stages,
        digest=packer_input_digest(plan, base_vm),
        force=force,
        epoch=lambda: int(time.time()),
        verify=False,
    )
