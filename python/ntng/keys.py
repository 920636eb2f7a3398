"""Characters → QEMU key names, as the NixOS driver's send_chars/send_key map them."""

from __future__ import annotations

import string

_SHIFTED = {
    "!": "1", "@": "2", "#": "3", "$": "4", "%": "5", "^": "6", "&": "7", "*": "8", "(": "9", ")": "0",
    "_": "minus", "+": "equal", "{": "bracket_left", "}": "bracket_right", ":": "semicolon",
    '"': "apostrophe", "|": "backslash", "<": "comma", ">": "dot", "?": "slash", "~": "grave_accent",
}
_PLAIN = {
    "-": "minus", "=": "equal", "[": "bracket_left", "]": "bracket_right", ";": "semicolon",
    "'": "apostrophe", "\\": "backslash", ",": "comma", ".": "dot", "/": "slash", "`": "grave_accent",
    " ": "spc", "\n": "ret", "\t": "tab", "\b": "backspace",
}

CHAR_TO_KEY: dict[str, str] = {
    **{c: c for c in string.ascii_lowercase + string.digits},
    **{c: f"shift-{c.lower()}" for c in string.ascii_uppercase},
    **_PLAIN,
    **{c: f"shift-{k}" for c, k in _SHIFTED.items()},
}


def key_for(char_or_key: str) -> str:
    """A single character is mapped; anything longer is already a key name ("ctrl-alt-delete")."""
    if len(char_or_key) == 1:
        if char_or_key not in CHAR_TO_KEY:
            raise ValueError(f"no key for character {char_or_key!r}")
        return CHAR_TO_KEY[char_or_key]
    return char_or_key
