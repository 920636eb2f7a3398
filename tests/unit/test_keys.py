"""Characters to QEMU key names: every printable ASCII character has exactly one key."""

from __future__ import annotations

import string

import pytest

from ntng.keys import CHAR_TO_KEY, key_for

QCODES = set(string.ascii_lowercase + string.digits) | {
    "minus", "equal", "bracket_left", "bracket_right", "semicolon", "apostrophe", "backslash",
    "comma", "dot", "slash", "grave_accent", "spc", "ret", "tab", "backspace"}


def test_every_printable_character_maps_to_a_real_qcode() -> None:
    for ch in string.printable.replace("\r", "").replace("\x0b", "").replace("\x0c", ""):
        key = key_for(ch)
        base = key.removeprefix("shift-")
        assert base in QCODES, (ch, key)
        assert key.startswith("shift-") == (ch.isupper() or ch in '!@#$%^&*()_+{}:"|<>?~'), ch


def test_distinct_characters_distinct_keys() -> None:
    assert len(set(CHAR_TO_KEY.values())) == len(CHAR_TO_KEY)


def test_key_names_pass_through_and_unknown_characters_are_named() -> None:
    assert key_for("ctrl-alt-delete") == "ctrl-alt-delete"
    with pytest.raises(ValueError, match=r"no key for character '\\x01'"):
        key_for("\x01")
