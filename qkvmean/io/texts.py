"""Input texts: one per line, or JSON Lines with a ``text`` field; and the built-in demo."""

from __future__ import annotations

import os

from ..files import InputError, existing, load_json

#: The embedded demo's inputs: about 15 tokens each with all-MiniLM-L6-v2 and the
#: synthetic model.
BUILTIN_SENTENCES = (
    "The cat sat on the mat while the old dog slept nearby.",
    "Mean keys make every query look at all words the same way.",
    "She read the letter twice, then put it in the drawer.",
)


def read_texts(path) -> list:
    """Texts from ``path``: JSON Lines (``.jsonl``, a ``text`` field) or one per line.

    Blank lines are skipped; a UTF-8 byte-order mark at the start of the file is not part
    of the first text. Errors name the file and line.
    """
    path = existing(path)
    try:
        # lines end at "\n" only: str.splitlines would also split at U+2028, form feeds
        # and other separators that may sit inside a text (or a JSON string)
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {os.strerror(exc.errno).lower()}") from None
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    texts = []
    jsonl = path.suffix.lower() == ".jsonl"
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if not jsonl:
            texts.append(_checked(line, path, number))
            continue
        try:
            record = load_json(line)
        except ValueError as exc:
            raise InputError(f"{path}:{number}: not valid JSON ({exc})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise InputError(f"{path}:{number}: expected an object with a string 'text' field")
        texts.append(_checked(record["text"], path, number))
    if not texts:
        raise InputError(f"{path}: holds no texts")
    return texts


def check_text(text: str, where: str) -> str:
    """``text``, if the store can hold it as a UTF-8 HDF5 string: no NUL character (HDF5
    strings end there) and no unpaired surrogate (JSON's ``"\\ud800"``; not Unicode)."""
    if "\x00" in text:
        raise InputError(
            f"{where}: contains a NUL character (U+0000, column {text.index(chr(0)) + 1}), "
            "which an HDF5 string cannot hold; remove it"
        )
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InputError(
            f"{where}: contains an unpaired surrogate {text[exc.start]!r} (column "
            f"{exc.start + 1}), which is not Unicode text; remove it"
        ) from None
    return text


def _checked(text: str, path, number: int) -> str:
    return check_text(text, f"{path}:{number}")
