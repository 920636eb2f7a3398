"""Containers (backend nspawn) without booting one: the agent's folder transport (the REAL agent
in a process of its own, the real BackdoorClient), the plan nixlib makes, the backend's setup errors."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ntng import backends, nixeval, paths
from ntng import protocol as P
from ntng.client import BackdoorClient, connect_unix
from ntng.errors import NixEvalError, SetupError

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "backdoor"))
import ntng_agent as agent  # noqa: E402

pytestmark = [pytest.mark.timeout(60)]

NODE = {"name": "c", "kernel": "/k", "image": "/img/root.ext4", "stateDir": "/s/c"}


def plan(**over: Any) -> dict[str, Any]:
    result: dict[str, Any] = nixeval.call("nspawn.launch", {**NODE, **over})
    return result


# --- the agent -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("cmdline", "expected"), [
    ("quiet ntng.backdoor=unix:/run/ntng-host systemd.hostname=c", ("unix", "/run/ntng-host")),
    ("ntng.backdoor=unix:relative", ("virtio-serial", agent.DEFAULT_PORT_NAME)),  # not a folder
    ("ntng.backdoor=vsock:1234", ("vsock", "1234")),  # the VMs' parameters read as before
])
def test_the_agent_takes_the_folder_transport_from_the_command_line(
        cmdline: str, expected: tuple[str, str]) -> None:
    assert agent.from_cmdline(cmdline) == expected


def test_in_a_container_the_command_line_is_inits_arguments(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(agent, "CONTAINER_MARKER", str(tmp_path / "absent"))
    assert agent.read_cmdline() == Path("/proc/cmdline").read_text()  # a VM: the kernel's
    (tmp_path / "container").write_text("systemd-nspawn\n")
    monkeypatch.setattr(agent, "CONTAINER_MARKER", str(tmp_path / "container"))
    init = Path("/proc/1/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    assert agent.read_cmdline() == init


BACKDOOR = Path(agent.__file__).resolve().parent


@contextlib.contextmanager
def serve_folder(folder: Path) -> Iterator[None]:
    """The agent serving `folder` in a process of its own, as in a container: in this one it
    would share the fd table with the test's client (one's late use of a closed fd number could
    reach the other's socket)."""
    code = f"import sys; sys.path.insert(0, {str(BACKDOOR)!r}); import ntng_agent; ntng_agent.run_on_folder(sys.argv[1])"
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], stderr=subprocess.PIPE)
    try:
        yield
        assert proc.poll() is None, f"the agent exited: {proc.communicate(timeout=5)[1].decode()[-800:]}"
    finally:
        proc.kill()
        proc.wait(10)
        assert proc.stderr is not None
        proc.stderr.close()


def wait_socket(path: Path) -> None:
    deadline = time.monotonic() + 10
    while not path.is_socket():
        assert time.monotonic() < deadline, f"the agent made no socket at {path}"
        time.sleep(0.01)


def test_the_agent_serves_the_folder_with_the_key_it_finds_there(tmp_path: Path) -> None:
    folder = paths.private_dir(tmp_path / "backdoor")
    key = os.urandom(32)
    (folder / agent.FOLDER_KEY).write_bytes(key)
    (folder / agent.FOLDER_KEY).chmod(0o600)
    # A socket an earlier agent left (a restart): replaced, not an error.
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(folder / agent.FOLDER_SOCKET))
    stale.close()
    os.utime(folder / agent.FOLDER_SOCKET, (0, 0))
    with serve_folder(folder):
        talk_through_the_folder(folder, key)


def talk_through_the_folder(folder: Path, key: bytes) -> None:
    sock_path = folder / agent.FOLDER_SOCKET
    deadline = time.monotonic() + 10

    def replaced() -> bool:
        try:
            return os.stat(sock_path).st_mtime != 0
        except FileNotFoundError:  # between the agent's unlink and its bind
            return False

    while not replaced():
        assert time.monotonic() < deadline, "the stale socket was not replaced"
        time.sleep(0.01)
    assert sock_path.stat().st_mode & 0o077 == 0
    client = BackdoorClient(connect_unix(sock_path, timeout=10), "c", key=key)
    ack = client.wait_ready(10)
    assert "auth" in ack.capabilities
    r = client.execute(P.Exec(argv=["echo", "through the folder"]), wait=20)
    assert (r.status, r.stdout) == (0, b"through the folder\n")
    client.close()
    # One host at a time: the next connection is a new session.
    again = BackdoorClient(connect_unix(sock_path, timeout=10), "c", key=key)
    assert again.wait_ready(10).boot_id == ack.boot_id
    again.close()


def test_without_a_key_file_the_agent_serves_unauthenticated(tmp_path: Path) -> None:
    folder = paths.private_dir(tmp_path / "backdoor")
    with serve_folder(folder):
        wait_socket(folder / agent.FOLDER_SOCKET)
        client = BackdoorClient(connect_unix(folder / agent.FOLDER_SOCKET, timeout=10), "c")
        assert "auth" not in client.wait_ready(10).capabilities
        client.close()


def test_a_connections_fds_let_go_take_no_late_write() -> None:
    """accept_forever lets go of a connection's fds before it closes them: a late write of the
    ended session fails as a disconnect, and does not reach the socket the next host's
    connection gets under the same fd number."""
    ended, its_host = socket.socketpair()
    conn = agent.Connection(ended.fileno(), ended.fileno())
    conn.let_go()
    number = ended.fileno()
    ended.close()
    its_host.close()
    nxt, next_host = socket.socketpair()
    with nxt, next_host:
        assert nxt.fileno() == number or next_host.fileno() == number, "the fd number was not reused"
        with pytest.raises(agent.Disconnected):
            conn.write(b"a frame of the ended session")
        with pytest.raises(agent.Disconnected):
            conn.writev([b"x" * 100])
        assert conn.read(4096) == b""
        next_host.setblocking(False)
        nxt.setblocking(False)
        for s in (nxt, next_host):
            with pytest.raises(BlockingIOError):
                s.recv(100)


# --- the plan ------------------------------------------------------------------------------------

def test_the_plan_boots_the_images_tree_on_the_nodes_own_layer() -> None:
    p = plan(kernelParams=["systemd.hostname=c", "ntng.if=52:54:00:00:00:01,eth0,1.2.3.4/24,::1/64"])
    argv = p["argv"]
    assert p["backend"] == "nspawn" and p["tree"] == "/img/tree"
    assert argv[:5] == ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc"]
    assert argv[5] == "systemd-nspawn" and "--boot" in argv and "--register=no" in argv
    assert "--overlay=/img/tree:/s/c/layer/upper:/" in argv
    assert p["files"]["disk"] == "/s/c/layer/upper"
    assert "--bind=/s/c/backdoor:/run/ntng-host" in argv
    assert p["backdoor"] == {"transport": "unix", "folder": "/s/c/backdoor", "guestFolder": "/run/ntng-host",
                             "socket": "/s/c/backdoor/backdoor.sock", "keyFile": "/s/c/backdoor/backdoor-key"}
    # init's arguments: the agent's transport and the words systemd and our units read
    tail = argv[argv.index("--private-network") + 1:]
    assert "ntng.backdoor=unix:/run/ntng-host" in tail and "systemd.hostname=c" in tail
    assert any(w.startswith("ntng.if=") for w in tail)
    assert not [w for w in tail if w.startswith(("root=", "console=", "panic="))]
    assert p["restartOnReboot"] is True and p["rebootExitStatus"] == 133
    assert p["capabilities"]["features"] == ["sharedDirs", "networks", "block", "reboot", "console"]


def test_shared_dirs_are_bind_mounts_and_ntng_shares_has_nothing_to_mount() -> None:
    p = plan(sharedDirs={"ro": {"source": "/h/ro", "target": "/mnt/ro", "readOnly": True},
                         "rw": {"source": "/h/rw", "target": "/mnt/rw"}}, shareArtifacts=True)
    argv = p["argv"]
    assert "--bind-ro=/h/ro:/mnt/ro" in argv and "--bind=/h/rw:/mnt/rw" in argv
    assert "--bind=@artifacts@/c-shared:/tmp/shared" in argv  # the runner fills in its folder
    assert not [w for w in argv if w.startswith("ntng.share=")]
    assert [s["tag"] for s in p["shares"]] == ["ro", "rw", "shared"]


def test_a_tree_can_be_named_and_the_plan_keeps_the_runs_accelerator() -> None:
    p = plan(tree="/trees/debian", accel="tcg")
    assert "--directory=/trees/debian" in p["argv"] and p["accel"] == "tcg"


@pytest.mark.parametrize(("over", "message"), [
    ({"kernelParams": ["mitigations=off"]}, "backend nspawn lacks kernel parameters"),
    ({"requires": ["snapshot"]}, "requires snapshot, which backend nspawn lacks"),
    ({"display": True}, "display: backend nspawn lacks the screenshot capability"),
    ({"sharedDirs": {"a": {"source": "/a:b", "target": "/b"}}}, "cannot take a ':' in their paths"),
])
def test_what_a_container_cannot_do_is_refused_by_the_plan(over: dict[str, Any], message: str) -> None:
    with pytest.raises(NixEvalError, match=message):
        plan(**over)


# --- the backend ---------------------------------------------------------------------------------

def test_a_missing_systemd_nspawn_is_a_setup_error_naming_the_package(tmp_path: Path) -> None:
    p = plan(stateDir=str(tmp_path / "c"), nspawnBinary=str(tmp_path / "no-such-nspawn"))
    b = backends.make("c", p)
    with pytest.raises(SetupError, match="systemd-container"):
        b.start()
    assert not (tmp_path / "c").exists()  # failed before anything was prepared


def test_a_missing_tree_is_a_setup_error_naming_the_rebuild(tmp_path: Path) -> None:
    p = plan(stateDir=str(tmp_path / "c"), image=str(tmp_path / "img/root.ext4"))
    with pytest.raises(SetupError, match="ntng image build"):
        backends.make("c", p).start()


def test_a_runner_that_is_not_root_is_told_before_anything_is_made(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)  # this test host runs as root
    b = backends.make("c", plan(stateDir=str(tmp_path / "c")))
    with pytest.raises(SetupError, match="need root"):
        b.start()
    assert not (tmp_path / "c").exists()


# --- log lines name the container backend --------------------------------------------------------

def test_log_lines_name_a_container_as_one(tmp_path: Path) -> None:
    b = backends.make("c", plan(stateDir=str(tmp_path / "c")))
    assert b.title == "systemd-nspawn"  # "systemd-nspawn running (pid …)", "… exited"
    assert backends.noun(b.name) == "container" and backends.noun("qemu") == "vm"


def test_a_kept_container_layer_is_reported_as_reused(tmp_path: Path) -> None:
    from ntng.runner import kept_machines_found

    assert not kept_machines_found(tmp_path)
    (tmp_path / "c" / "layer" / "upper").mkdir(parents=True)
    assert not kept_machines_found(tmp_path)  # an empty layer keeps nothing
    (tmp_path / "c" / "layer" / "upper" / "etc").mkdir()
    assert kept_machines_found(tmp_path)
    vms = tmp_path / "vms"
    (vms / "vm").mkdir(parents=True)
    (vms / "vm" / "disk.qcow2").write_bytes(b"")
    assert kept_machines_found(vms)


# --- image pruning spares a running container's tree ---------------------------------------------

def test_pruning_images_keeps_one_whose_tree_a_running_container_boots(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess

    from ntng import image

    monkeypatch.setenv("NTNG_CACHE", str(tmp_path))
    dirs = [tmp_path / f"image-{i}" for i in range(image.KEEP_IMAGES + 3)]
    for age, d in enumerate(dirs):  # dirs[0] the oldest
        (d / "tree").mkdir(parents=True)
        os.utime(d, (1_000_000 + age, 1_000_000 + age))
    busy, idle = dirs[0], dirs[1]
    # A stand-in for systemd-nspawn: its argv names the busy image's tree as overlay lower layer.
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                             f"--overlay={busy / 'tree'}:{tmp_path / 'upper'}:/"])
    try:
        deadline = time.monotonic() + 10
        while busy / "tree" not in image.trees_in_use() and time.monotonic() < deadline:
            time.sleep(0.05)
        image.prune_images(keep=dirs[-1])
    finally:
        proc.kill()
        proc.wait()
    assert busy.exists(), "the tree of a running container was removed"
    assert not idle.exists()  # the other old ones go as before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [busy.name] + [d.name for d in dirs[-image.KEEP_IMAGES:]])


# --- a NixOS system as a container (mkTest; nothing NixOS boots here: the plan is checked) ------

def test_a_nixos_init_boots_from_a_root_folder_with_the_store_read_only(tmp_path: Path) -> None:
    init = "/nix/store/00000000000000000000000000000000-nixos-system-c/init"
    p = plan(stateDir=str(tmp_path / "c"), init=init, kernel=init, image=str(Path(init).parent),
             kernelParams=["ntng.backdoor=unix:/run/ntng-host"])
    argv = p["argv"]
    root = p["files"]["disk"]
    assert root == str(tmp_path / "c/layer/root") and p["tree"] is None and p["init"] == init
    assert f"--directory={root}" in argv and "--bind-ro=/nix/store" in argv
    assert "--boot" not in argv and not any(a.startswith("--overlay") for a in argv)
    # The init is nspawn's command, PID 1; its arguments follow it (systemd reads them).
    assert argv[argv.index(init) + 1:][-1] == "ntng.backdoor=unix:/run/ntng-host"
    assert argv.index(init) > argv.index("--private-network")  # options first, then the command
    # The runner makes the skeleton nspawn and stage 2 need in the fresh root.
    b = backends.make("c", p)
    b._make_root_skeleton()  # type: ignore[attr-defined]
    assert (tmp_path / "c/layer/root/usr/bin").is_dir() and (tmp_path / "c/layer/root/etc/os-release").exists()
    assert os.stat(tmp_path / "c/layer/root").st_mode & 0o777 == 0o755
    assert os.stat(tmp_path / "c/layer/root/root").st_mode & 0o777 == 0o700
    with pytest.raises(SetupError, match="no NixOS init at"):
        b._check_root()  # type: ignore[attr-defined]
