"""Which Machine methods need which backend capability, and the errors when one is missing.

The capability names are nixlib/capabilities.nix's `features`.  What each backend offers is not
copied here: every node's launch plan carries its backend's entry of that file
(`plan["capabilities"]`), so `ntng check`, the running Machine and nixlib's `requires` check
all judge from the one Nix table.
"""

from __future__ import annotations

import difflib
import functools
import threading
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from .errors import MissingCapability
from .plan import NodePlan

__all__ = ["METHOD_CAPABILITY", "MissingCapability", "guard_methods", "lacking", "lacks_message", "require"]

# Machine method → the capability it needs.  sharedDirs has no Machine method yet: a method
# that needs one gets its line here.  Clones (driver.start_from_snapshot) need "clone": require().
METHOD_CAPABILITY: dict[str, str] = {
    "screenshot": "screenshot",
    "get_screen_text": "screenshot",
    "get_screen_text_variants": "screenshot",
    "wait_for_text": "screenshot",
    "send_key": "keys",
    "send_chars": "keys",
    "reboot": "reboot",
    "send_console": "consoleInput",
    "wait_for_console_text": "console",
    "get_console_log": "console",
    "console_interact": "consoleInput",
    "block": "block",
    "unblock": "block",
    "link_counters": "networks",
    "impair": "networks",
    "clear_impairment": "networks",
    "forward_port": "networks",
    "snapshot": "snapshot",
    "send_monitor_command": "monitor",
    "wait_for_qmp_event": "monitor",
}


def backend_of(plan: NodePlan) -> tuple[str, list[str]] | None:
    """(backend, features) of a node's launch plan; None for a plan without them (hand-made)."""
    caps = plan.get("capabilities")
    if not isinstance(caps, dict) or not isinstance(caps.get("features"), list):
        return None
    return str(plan.get("backend", "?")), [str(f) for f in caps["features"]]


def lacking(plan: NodePlan, method: str) -> str | None:
    """The capability `method` needs that the plan's backend lacks, if any."""
    need = METHOD_CAPABILITY.get(method)
    have = backend_of(plan)
    if need is None or have is None or need in have[1]:
        return None
    return need


def lacks_message(what: str, plan: NodePlan, capability: str) -> str:
    backend, features = backend_of(plan) or ("?", [])
    why = plan.get("capabilities", {}).get("why", {}).get(capability)  # nixlib says why, if not obvious
    return (f'{what}: backend {backend} lacks capability "{capability}" '
            f"(it has: {', '.join(features) or 'none'})" + (f": {why}" if why else ""))


def require(plan: NodePlan, capability: str, what: str) -> None:
    """MissingCapability unless the node's effective features (nixlib) include `capability`;
    for what is not a Machine method (guard_methods covers those)."""
    have = backend_of(plan)
    if have is not None and capability not in have[1]:
        raise MissingCapability(lacks_message(what, plan, capability))


def closest(name: str, candidates: Iterable[str]) -> str:
    """" (did you mean X?)" for the public candidate closest to `name`, or ""."""
    public = sorted({c for c in candidates if not c.startswith("_")})
    match = difflib.get_close_matches(name, public, n=1, cutoff=0.7)  # 0.6 offers len for client
    return f" (did you mean {match[0]}?)" if match else ""


# -- run time -------------------------------------------------------------------------------------

C = TypeVar("C", bound=type)
_inside = threading.local()  # .machines: ids of the machines in a guarded call on this thread


def guard_methods(cls: C) -> C:
    """Class decorator: wrap each method of METHOD_CAPABILITY so that a call on a machine whose
    backend lacks the capability raises MissingCapability before anything happens.  Only the
    outermost call on a machine is checked: reboot() may press keys itself on a backend that
    offers reboot but no keys."""
    for method in METHOD_CAPABILITY:
        fn = getattr(cls, method)  # AttributeError here: the table names a method that is gone
        setattr(cls, method, _guarded(method, fn))
    return cls


def _guarded(method: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        inside: set[int] = _inside.__dict__.setdefault("machines", set())
        if id(self) in inside:
            return fn(self, *args, **kwargs)
        need = lacking(self.plan, method)
        if need is not None:
            raise MissingCapability(lacks_message(f"machine {self.name}: {method}()", self.plan, need))
        inside.add(id(self))
        try:
            return fn(self, *args, **kwargs)
        finally:
            inside.discard(id(self))

    return wrapper


def unknown_attribute(obj: object, name: str) -> AttributeError:
    """For Machine.__getattr__ (reached only when normal lookup failed).  It reads nothing from
    `obj`: during unpickling or copying the instance has no attributes yet."""
    hint = "" if name.startswith("_") else closest(name, dir(type(obj)))
    return AttributeError(f"'{type(obj).__name__}' object has no attribute '{name}'{hint}",
                          name=name, obj=obj)

