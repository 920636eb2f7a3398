"""modules/backdoor.nix and modules/test-node.nix, evaluated with nixpkgs' lib.evalModules.

nixpkgs itself is not available, only its lib ($NIXPKGS_LIB): tests/nix/nixos-stand-ins.nix
declares the NixOS options the modules set, tests/nix/eval-module.nix evaluates a module with a
fake pkgs and returns the interesting part of the configuration as JSON.
"""

from __future__ import annotations

import functools
import json
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest
from nixpkgs_lib import NIXPKGS_LIB, requires_nixpkgs_lib

HERE = Path(__file__).resolve().parent
pytestmark = requires_nixpkgs_lib


class EvalError(Exception):
    """nix-instantiate failed; the message is its stderr."""


@functools.cache
def _evaluate(entry: str, config_json: str, journald: str = "journald") -> Any:
    # --readonly-mode: source paths in the agent package are hashed, not copied to the store.
    cmd = ["nix-instantiate", "--eval", "--strict", "--json", "--readonly-mode",
           "--option", "build-users-group", "", str(HERE / "eval-module.nix"),
           "--argstr", "libPath", NIXPKGS_LIB, "--argstr", "entry", entry,
           "--argstr", "config", config_json, "--argstr", "journald", journald]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise EvalError(r.stderr)
    return json.loads(r.stdout)


def evaluate(config: dict[str, Any] | None = None, entry: str = "test-node", journald: str = "journald") -> Any:
    """Evaluate modules/<entry>.nix plus the user module `config`; `journald` picks the stand-in
    for services.journald (journald: extraConfig; journald-settings: the newest nixpkgs')."""
    return _evaluate(entry, json.dumps(config or {}, sort_keys=True), journald)


def backdoor(**options: Any) -> dict[str, Any]:
    return {"ntng": {"backdoor": options}}


def unit(result: Any) -> dict[str, Any]:
    services: dict[str, Any] = result["config"]["systemd"]["services"]
    assert "ntng-backdoor" in services, sorted(services)
    return services["ntng-backdoor"]


def exec_start(result: Any) -> list[str]:
    return shlex.split(unit(result)["serviceConfig"]["ExecStart"])


def test_default_unit_starts_the_agent_early_on_the_virtconsole_port() -> None:
    r = evaluate()
    assert r["failedAssertions"] == []
    u = unit(r)
    argv = exec_start(r)
    assert argv[0] == r["config"]["ntng"]["backdoor"]["package"] + "/bin/ntng-backdoor"
    assert argv[1:] == ["--port-name", "org.ntng.backdoor"]
    assert u["enable"] is True
    assert u["wantedBy"] == ["sysinit.target"]
    assert {"sysinit.target", "shutdown.target"} <= set(u["before"])
    assert u["conflicts"] == ["shutdown.target"]
    assert u["unitConfig"]["DefaultDependencies"] is False
    sc = u["serviceConfig"]
    assert (sc["Restart"], sc["RestartSec"], sc["KillMode"]) == ("always", 0, "process")
    assert (sc["OOMScoreAdjust"], sc["Nice"]) == (-1000, -20)
    assert u["restartIfChanged"] is False


def test_commands_find_the_system_tools() -> None:
    path = unit(evaluate())["path"]
    assert path[:2] == ["/run/wrappers", "/run/current-system/sw"]
    for pkg in ("coreutils", "util-linux", "systemd", "kmod"):
        assert any(p.endswith("-" + pkg) for p in path), (pkg, path)


def test_virtconsole_loads_virtio_console() -> None:
    r = evaluate()
    boot = r["config"]["boot"]
    assert "virtio_console" in boot["kernelModules"]
    assert "virtio_console" in boot["initrd"]["availableKernelModules"]
    assert unit(r)["serviceConfig"]["ExecStartPre"].endswith("modprobe -a virtio_console qemu_fw_cfg")


def test_vsock_transport() -> None:
    r = evaluate(backdoor(transport="vsock"))
    assert r["failedAssertions"] == []
    assert r["config"]["ntng"]["backdoor"]["port"] == 1234
    assert exec_start(r)[1:] == ["--vsock-port", "1234"]
    boot = r["config"]["boot"]
    for mods in (boot["kernelModules"], boot["initrd"]["availableKernelModules"]):
        assert {"vsock", "vmw_vsock_virtio_transport"} <= set(mods)
        assert "virtio_console" not in mods
    assert "vmw_vsock_virtio_transport" in unit(r)["serviceConfig"]["ExecStartPre"]


@pytest.mark.parametrize(("options", "args"), [
    ({"port": "org.example.agent"}, ["--port-name", "org.example.agent"]),
    ({"transport": "vsock", "port": 5000}, ["--vsock-port", "5000"]),
    ({"port": "/dev/hvc0"}, ["--device", "/dev/hvc0"]),
    ({"transport": "virtconsole", "port": "/dev/hvc1"}, ["--device", "/dev/hvc1"]),
])
def test_custom_port(options: dict[str, Any], args: list[str]) -> None:
    r = evaluate(backdoor(**options))
    assert r["failedAssertions"] == []
    assert exec_start(r)[1:] == args


def test_console_device_port() -> None:
    # Cloud Hypervisor's virtio-console: the agent opens /dev/hvc0 itself, and no getty may
    # (systemd-getty-generator starts one on hvc0 when it exists).
    r = evaluate(backdoor(port="/dev/hvc0"))
    services = r["config"]["systemd"]["services"]
    assert services["serial-getty@hvc0"]["enable"] is False
    assert not any(n.startswith("serial-getty@") for n in evaluate()["config"]["systemd"]["services"])
    boot = r["config"]["boot"]
    assert "virtio_console" in boot["kernelModules"] and "virtio_console" in boot["initrd"]["availableKernelModules"]
    # The kernel and journal console stay on ttyS0: hvc0 is the agent's.
    assert not any(p.startswith("console=hvc") for p in boot["kernelParams"])


def test_disabled_backdoor_sets_nothing() -> None:
    for r in (evaluate(backdoor(enable=False)), evaluate(entry="backdoor")):
        assert r["config"]["ntng"]["backdoor"]["enable"] is False
        assert "ntng-backdoor" not in r["config"]["systemd"]["services"]
        assert r["config"]["boot"]["kernelParams"] == []
        assert r["config"]["services"]["journald"]["extraConfig"] == ""
        assert r["failedAssertions"] == []


def test_backdoor_module_alone_when_enabled() -> None:
    r = evaluate(backdoor(enable=True), entry="backdoor")
    assert exec_start(r)[1:] == ["--port-name", "org.ntng.backdoor"]
    # None of the test-node defaults come with it.
    assert r["config"]["services"]["getty"]["autologinUser"] is None


@pytest.mark.parametrize(("options", "message"), [
    ({"transport": "vsock", "port": "org.ntng.backdoor"},
     'ntng.backdoor.port must be a port number like 1234 when transport is "vsock", got "org.ntng.backdoor"'),
    ({"port": 1234},
     'ntng.backdoor.port must be a virtio-serial port name like "org.ntng.backdoor" or a console device like "/dev/hvc0" when transport is "virtconsole", got 1234'),
    ({"port": "bad name; rm -rf /"}, 'when transport is "virtconsole", got "bad name; rm -rf /"'),
    # Console devices are hvcN only: no other device path (nor an option) reaches the agent.
    ({"port": "/dev/sda"}, 'when transport is "virtconsole", got "/dev/sda"'),
    ({"port": "/dev/hvc0 --unix /tmp/x"}, 'got "/dev/hvc0 --unix /tmp/x"'),
    ({"transport": "vsock", "port": "/dev/hvc0"}, 'when transport is "vsock", got "/dev/hvc0"'),
])
def test_port_must_match_transport(options: dict[str, Any], message: str) -> None:
    failed = evaluate(backdoor(**options))["failedAssertions"]
    assert len(failed) == 1 and message in failed[0], failed


@pytest.mark.parametrize(("options", "option"), [
    ({"transport": "carrier-pigeon"}, "ntng.backdoor.transport"),
    ({"transport": "vsock", "port": 70000}, "ntng.backdoor.port"),
    ({"enable": "yes"}, "ntng.backdoor.enable"),
])
def test_bad_values_fail_evaluation_naming_the_option(options: dict[str, Any], option: str) -> None:
    with pytest.raises(EvalError) as e:
        evaluate(backdoor(**options))
    assert f"`{option}'" in str(e.value)


def test_unknown_backdoor_option_fails_evaluation() -> None:
    with pytest.raises(EvalError, match="ntng.backdoor.portName"):
        evaluate(backdoor(portName="x"))


def test_stand_ins_reject_misspelt_options() -> None:
    # The unit assertions above mean something only if a typo in a module cannot slip through.
    typos: list[dict[str, Any]] = [{"systemd": {"service": {"x": {}}}},
                                   {"systemd": {"services": {"x": {"wantedby": ["a"]}}}},
                                   {"services": {"journald": {"extraconfig": ""}}}]
    for typo in typos:
        with pytest.raises(EvalError, match="does not exist"):
            evaluate(typo)


def test_console_and_journal_on_ttyS0() -> None:
    config = evaluate()["config"]
    assert "console=ttyS0,115200" in config["boot"]["kernelParams"]
    assert not any(p.startswith("console=hvc") for p in config["boot"]["kernelParams"])
    journald = config["services"]["journald"]["extraConfig"].splitlines()
    assert {"ForwardToConsole=yes", "TTYPath=/dev/ttyS0", "MaxLevelConsole=info"} <= set(journald)
    assert unit(evaluate())["serviceConfig"]["StandardOutput"] == "journal+console"


def test_journal_console_with_the_newest_nixpkgs_journald_settings() -> None:
    # The newest nixpkgs removed services.journald.extraConfig (defining it fails evaluation) for
    # settings.Journal: the module must use whichever the NixOS it is imported into declares.
    config = evaluate(journald="journald-settings")["config"]
    assert config["services"]["journald"]["settings"]["Journal"] == {
        "ForwardToConsole": "yes", "TTYPath": "/dev/ttyS0", "MaxLevelConsole": "info"}
    assert evaluate(journald="journald-settings")["failedAssertions"] == []
    # What NixOS says of a definition of the removed option (the stand-in is lib.mkRemovedOptionModule).
    failed = evaluate({"services": {"journald": {"extraConfig": "Storage=volatile"}}},
                      journald="journald-settings")["failedAssertions"]
    assert len(failed) == 1 and "Use services.journald.settings.Journal instead" in failed[0], failed


@pytest.mark.parametrize(("config", "option"), [
    # Each value has the right shape for a loose type but not for the real one.
    ({"systemd": {"services": {"x": {"wantedBy": ["multi-user"]}}}}, "systemd.services.x.wantedBy"),
    ({"systemd": {"services": {"x": {"description": "two\nlines"}}}}, "systemd.services.x.description"),
    ({"systemd": {"services": {"x": {"serviceConfig": {"Restart": "sometimes"}}}}}, "systemd.services.x.serviceConfig"),
    ({"boot": {"kernelParams": ["has space"]}}, "boot.kernelParams"),
    ({"services": {"getty": {"autologinUser": 0}}}, "services.getty.autologinUser"),
    ({"system": {"stateVersion": 25}}, "system.stateVersion"),
])
def test_stand_ins_have_the_real_types(config: dict[str, Any], option: str) -> None:
    with pytest.raises(EvalError) as e:
        evaluate(config)
    assert option in str(e.value)


def test_unit_options_merge_as_in_nixos() -> None:
    # Lists concatenate, equal values merge, different ones conflict (mergeEqualOption).
    ok = evaluate({"systemd": {"services": {"ntng-backdoor": {
        "serviceConfig": {"Restart": "always"}, "unitConfig": {"IgnoreOnIsolate": True}}}}})
    assert unit(ok)["serviceConfig"]["Restart"] == "always"
    with pytest.raises(EvalError, match="serviceConfig.Restart"):
        evaluate({"systemd": {"services": {"ntng-backdoor": {"serviceConfig": {"Restart": "no"}}}}})


def firewall_openings(result: Any) -> list[str]:
    fw = result["config"]["networking"]["firewall"]
    opened = [f"{k}={v}" for k, v in fw.items() if v]
    opened += [o for o in result["setByModules"]
               if o.startswith("networking.firewall") or o.endswith("openFirewall")]
    return opened


@pytest.mark.parametrize("options", [{}, {"transport": "vsock"}])
def test_no_network_listener(options: dict[str, Any]) -> None:
    r = evaluate(backdoor(**options))
    assert firewall_openings(r) == []
    assert not any(a in exec_start(r) for a in ("--unix", "--fd", "--listen", "--tcp"))


def test_firewall_check_sees_an_opened_port() -> None:
    # The check above can fail: a port opened by any module shows up.
    r = evaluate({"networking": {"firewall": {"allowedTCPPorts": [22]}}})
    assert firewall_openings(r) == ["allowedTCPPorts=[22]"]


def test_test_node_defaults() -> None:
    r = evaluate()
    c = r["config"]
    assert c["ntng"]["backdoor"]["enable"] is True
    assert c["documentation"]["enable"] is False and c["documentation"]["nixos"]["enable"] is False
    assert c["boot"]["loader"]["grub"]["enable"] is False
    assert c["networking"]["useDHCP"] is False
    assert c["services"]["getty"]["autologinUser"] == "root"
    assert c["systemd"]["enableEmergencyMode"] is False
    services = c["systemd"]["services"]
    assert services["systemd-networkd-wait-online"]["enable"] is False
    assert "serial-getty@ttyS0" not in services  # the serial console keeps its (autologin) getty
    # The VT gettys stay, as on NixOS test nodes (nixos/tests/login.nix needs tty1 and tty2).
    assert not any(n.startswith(("getty@", "autovt@")) for n in services), sorted(services)
    assert r["failedAssertions"] == []


def test_test_node_defaults_yield_to_the_node() -> None:
    c = evaluate({"networking": {"useDHCP": True}, "services": {"getty": {"autologinUser": None}},
                  "documentation": {"enable": True}})["config"]
    assert c["networking"]["useDHCP"] is True
    assert c["services"]["getty"]["autologinUser"] is None
    assert c["documentation"]["enable"] is True


def test_agent_package() -> None:
    agent = evaluate()["agent"]
    assert agent["name"] == "ntng-backdoor"
    assert agent["env"]["meta"]["mainProgram"] == "ntng-backdoor"
    script = agent["script"]
    # Both files in one directory: the agent falls back to `import protocol` from there.
    assert "-ntng_agent.py $out/lib/ntng-backdoor/ntng_agent.py" in script
    assert "-protocol.py $out/lib/ntng-backdoor/protocol.py" in script
    assert "python3-with-construct/bin/python3 -u $out/lib/ntng-backdoor/ntng_agent.py" in script
    assert 'ntng_agent.py "\\$@"' in script  # arguments reach the agent (escaped in the heredoc)
    assert "$out/bin/ntng-backdoor" in script and "chmod +x $out/bin/ntng-backdoor" in script


def test_agent_falls_back_to_a_sibling_protocol_module() -> None:
    # The package layout relies on this import fallback in the agent.
    source = (HERE.parents[1] / "backdoor" / "ntng_agent.py").read_text()
    assert "from ntng import protocol as P\nexcept ImportError:" in source
    assert "import protocol as P" in source


@pytest.mark.parametrize("transport", ["virtconsole", "vsock"])
def test_the_agent_can_read_the_run_key_from_fw_cfg(transport: str) -> None:
    """QEMU hands the run's backdoor key to the guest as a fw_cfg file; the agent reads it from
    /sys/firmware/qemu_fw_cfg, which needs qemu_fw_cfg loaded before the agent starts."""
    r = evaluate(backdoor(transport=transport))
    assert "qemu_fw_cfg" in r["config"]["boot"]["kernelModules"]
    assert unit(r)["serviceConfig"]["ExecStartPre"].split()[-1] == "qemu_fw_cfg"
