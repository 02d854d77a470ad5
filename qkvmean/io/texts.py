"""Input texts: one per line, or JSON Lines with a ``text`` field; and the built-in demo."""

from __future__ import annotations

import json
from pathlib import Path

from . import InputError

#: The embedded demo's inputs: about 15 tokens each with all-MiniLM-L6-v2 and the
#: synthetic model.
BUILTIN_SENTENCES = (
    "The cat sat on the mat while the old dog slept nearby.",
    "Mean keys make every query look at all words the same way.",
    "She read the letter twice, then put it in the drawer.",
)


def read_texts(path) -> list:
    """Texts from ``path``: JSON Lines (``.jsonl``, a ``text`` field) or one per line.

    Blank lines are skipped. Errors name the file and line.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, not a text file")
    try:
        # lines end at "\n" only: str.splitlines would also split at U+2028, form feeds
        # and other separators that may sit inside a text (or a JSON string)
        lines = [line.removesuffix("\r") for line in path.read_text(encoding="utf-8").split("\n")]
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    texts = []
    jsonl = path.suffix.lower() == ".jsonl"
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if not jsonl:
            texts.append(line)
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise InputError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise InputError(f"{path}:{number}: expected an object with a string 'text' field")
        texts.append(record["text"])
    if not texts:
        raise InputError(f"{path}: holds no texts")
    return texts
