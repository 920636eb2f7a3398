"""Which guests put_file asks to write with direct I/O (FLAG_DIRECT), from nixlib's own plans."""

from __future__ import annotations

from ntng import nixeval
from ntng.session import emulated_kernel


def test_put_file_asks_for_direct_writes_only_where_the_guest_kernel_is_emulated() -> None:
    """A TCG guest's page cache is slower than its disk (buffered writes into ext4 58-72 MB/s,
    O_DIRECT 510-1210, measured); a container's kernel is the host's, a KVM guest's native."""
    nodes = {"tcg": {}, "kvm": {"accel": "kvm"}, "box": {"backend": "nspawn"}, "fc": {"backend": "firecracker"}}
    defaults = {"kernel": "/k", "image": "/img.raw", "imageFormat": "raw", "stateRoot": "/tmp/ntng-test-state"}
    plans = nixeval.call("testSpec", {"header": {"nodes": nodes}, "defaults": defaults})["nodes"]
    assert {name: emulated_kernel(plans[name]) for name in nodes} == {
        "tcg": True, "kvm": False, "box": False, "fc": False}
    assert plans["box"]["accel"] == "tcg"  # a container's plan says tcg: not what decides
