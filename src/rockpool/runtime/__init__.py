"""Runtimes that run workspaces from stored images, by name: QEMU (Linux), Tart (macOS),
Incus (Linux servers and clusters).

This registry is the one place that knows which runtimes there are. A new one is a
module with a Runtime subclass (runtime/base.py) and one line in RUNTIMES; the CLI's
--runtime, `image install`, `image rm` and `image gc` find it here.

    import rockpool.runtime
    runtime = rockpool.runtime.get("qemu", Store.default())
    runtime = rockpool.runtime.get(None, store)  # $ROCKPOOL_RUNTIME, else this platform's
"""

from __future__ import annotations

import functools
import importlib
import os
import platform
from typing import TYPE_CHECKING

from rockpool.errors import InvalidInput
from rockpool.runtime.base import Runtime

if TYPE_CHECKING:
    from rockpool.store import Store

# name -> "module:class", each imported only when it is asked for.
RUNTIMES: dict[str, str] = {
    "qemu": "rockpool.runtime.qemu:QemuRuntime",
    "tart": "rockpool.runtime.tart:TartRuntime",
    "incus": "rockpool.runtime.incus:IncusRuntime",
}
VARIABLE = "ROCKPOOL_RUNTIME"
# The default runtime by platform.system(); QEMU on any other.
PLATFORM_DEFAULTS = {"Darwin": "tart"}
FALLBACK = "qemu"


def names() -> tuple[str, ...]:
    """Every registered runtime's name, in the order they are asked."""
    return tuple(RUNTIMES)


@functools.cache
def _load(target: str) -> type[Runtime]:
    module, _, attribute = target.partition(":")
    found = getattr(importlib.import_module(module), attribute)
    if not (isinstance(found, type) and issubclass(found, Runtime)):
        raise TypeError(f"the runtime {target} is no Runtime subclass")
    return found


def runtime_class(name: str) -> type[Runtime]:
    target = RUNTIMES.get(name)
    if target is None:
        raise InvalidInput(
            f"no runtime named '{name}'", hint=f"the runtimes are: {', '.join(RUNTIMES)}"
        )
    return _load(target)


def get(name: str | None, store: Store, **options: str | None) -> Runtime:
    """The runtime named name (None: the default one), for store's workspaces and images;
    options (None: not given) are the runtime's own, such as Incus's remote."""
    cls = runtime_class(name or default_name())
    given = {key: value for key, value in options.items() if value is not None}
    unknown = sorted(set(given) - set(cls.options))
    if unknown:
        flags = ", ".join("--" + key.replace("instance_type", "type") for key in unknown)
        owners = [n for n in RUNTIMES if set(unknown) <= set(runtime_class(n).options)]
        raise InvalidInput(
            f"{flags} does not apply to the {cls.name} runtime",
            hint=f"it is for --runtime {' or '.join(owners)}" if owners else None,
        )
    return cls(store, **given)


def default_name() -> str:
    """$ROCKPOOL_RUNTIME, else Tart on macOS and QEMU elsewhere."""
    chosen = os.environ.get(VARIABLE)
    if chosen is None:
        return PLATFORM_DEFAULTS.get(platform.system(), FALLBACK)
    if chosen not in RUNTIMES:
        raise InvalidInput(
            f"{VARIABLE} must be one of {', '.join(RUNTIMES)}, not '{chosen}'",
            hint="unset it to use this platform's default (Tart on macOS, else QEMU)",
        )
    return chosen


def installers() -> tuple[str, ...]:
    """The runtimes that install images (`rockpool image install --runtime`)."""
    return tuple(name for name in RUNTIMES if runtime_class(name).installs_images)


def available(store: Store) -> list[Runtime]:
    """Every registered runtime this host can run, for store, in registry order: what
    image rm and image gc ask."""
    runtimes = [get(name, store) for name in RUNTIMES]
    return [runtime for runtime in runtimes if runtime.available()]
