"""The REPL of `ntng run -i`: the test script's globals (machines, start_all, ...) with line
editing, Tab completion over them and a history kept between sessions.

ptpython is used when it is importable (it is no dependency); otherwise Python's own console
with readline and rlcompleter.  NTNG_REPL=plain picks the latter even with ptpython there.
"""

from __future__ import annotations

import code
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

HISTORY_LENGTH = 2000  # lines kept in the history file; older ones are dropped when it is written


def history_path(name: str = "history") -> Path:
    """$XDG_STATE_HOME/ntng/<name> (~/.local/state by default): history is state, not cache."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(base) / "ntng" / name


def interact(namespace: dict[str, Any], banner: str) -> None:
    """Run the REPL until end of input (Ctrl-D)."""
    if _use_ptpython():
        _ptpython(namespace, banner)
    else:
        _readline_console(namespace, banner)


def _use_ptpython() -> bool:
    return (os.environ.get("NTNG_REPL") != "plain" and sys.stdin.isatty()
            and importlib.util.find_spec("ptpython") is not None)


def _ptpython(namespace: dict[str, Any], banner: str) -> None:
    from ptpython.repl import embed  # optional; found by _use_ptpython

    path = _private_file(history_path("ptpython-history"))
    if path is not None:
        trim_ptpython_history(path)
    print(banner, flush=True)
    embed(globals=namespace, locals=namespace, history_filename=str(path) if path else None)


def trim_ptpython_history(path: Path, keep: int = HISTORY_LENGTH) -> None:
    """prompt_toolkit's FileHistory only appends: keep its last `keep` entries.  Each entry is
    "\n# <time>\n" and its lines, each with a leading "+"."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return
    except OSError as e:
        print(f"ntng: could not read the REPL history {path}: {e}", file=sys.stderr)
        return
    entries = text.split("\n# ")
    if len(entries) - 1 > keep:  # entries[0] is what precedes the first entry ("")
        path.write_text("".join("\n# " + e for e in entries[-keep:]))


def _readline_console(namespace: dict[str, Any], banner: str) -> None:
    path = setup_readline(namespace)
    where = f"; history in {path}" if path else ""
    try:
        code.interact(banner=f"{banner} Tab completes{where}.", local=namespace, exitmsg="")
    finally:
        if path is not None:
            save_history(path)


def setup_readline(namespace: dict[str, Any]) -> Path | None:
    """Tab completion over `namespace` and the history file loaded; the history file's path,
    None when there is no readline (then input() reads plain lines)."""
    try:
        import readline
        import rlcompleter
    except ImportError:
        return None
    readline.set_completer(rlcompleter.Completer(namespace).complete)
    if "libedit" in (readline.__doc__ or ""):  # macOS' readline module wraps libedit
        readline.parse_and_bind("bind ^I rl_complete")
    else:
        readline.parse_and_bind("tab: complete")
    readline.set_history_length(HISTORY_LENGTH)
    path = _private_file(history_path())
    if path is None:
        return None
    try:
        readline.read_history_file(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        print(f"ntng: could not read the REPL history {path}: {e}", file=sys.stderr)
    return path


def save_history(path: Path) -> None:
    """Write the session's history (readline keeps the last HISTORY_LENGTH lines)."""
    import readline

    try:
        readline.write_history_file(path)
        path.chmod(0o600)
    except OSError as e:
        print(f"ntng: could not write the REPL history {path}: {e}", file=sys.stderr)


def _private_file(path: Path) -> Path | None:
    """`path` with its folder made (private: the history holds what was typed, commands with
    secrets included); None when the folder cannot be made."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as e:
        print(f"ntng: no REPL history ({path.parent}: {e})", file=sys.stderr)
        return None
    return path
