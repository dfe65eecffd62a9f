"""Class names given by users (the demo's ``--vocabulary``, any list of names an API caller passes):
one normalisation and one set of checks.

A name is lower-cased (CLIP's tokenizer lower-cases anyway) and its whitespace runs become one
space. A name holding a tab or another control character is an error (``vocabulary.txt`` is
tab-separated). Two names that are equal once case, whitespace and punctuation are ignored
("Red Star", "red  star", "red-star") are near-duplicates: an error naming both, since they
would split the votes of one class. Plural / singular pairs are not detected.
"""

import os
import re
import unicodedata
from pathlib import Path
from typing import List, Sequence

__all__ = [
    "VocabularyError",
    "normalize_class_name",
    "normalize_vocabulary",
    "parse_vocabulary",
    "looks_like_path",
]

# suffixes of vocabulary files: an argument ending so is a path even without a separator
VOCABULARY_FILE_SUFFIXES = (".txt", ".csv", ".tsv", ".json", ".names", ".lst", ".list")


class VocabularyError(ValueError):
    """A class name or a list of class names that cannot be used."""


def normalize_class_name(name: str, where: str = "") -> str:
    """Lower case, whitespace runs → one space, stripped.

    Raises:
        VocabularyError: a tab or another control character in the name (``where`` prefixes the
            message, e.g. ``names.txt:3``).
    """
    for ch in name:
        if ch == "\t" or (unicodedata.category(ch) == "Cc" and ch not in " \n\r"):
            prefix = f"{where}: " if where else ""
            kind = "a tab" if ch == "\t" else f"control character {ch!r}"
            raise VocabularyError(f"{prefix}class name {name!r} holds {kind}")
    return " ".join(name.split()).lower()


def _duplicate_key(name: str) -> str:
    return re.sub(r"[\W_]+", "", name)


def normalize_vocabulary(names: Sequence[str], source: str = "vocabulary") -> List[str]:
    """Normalised names (``normalize_class_name``), empty ones dropped, order kept.

    Raises:
        VocabularyError: no name; a bad character; near-duplicates (the message names each pair).
    """
    out: List[str] = []
    for name in names:
        n = normalize_class_name(name, source)
        if n:
            out.append(n)
    if not out:
        raise VocabularyError(f"{source} gives no class name")
    first = {}
    clashes = []
    for i, n in enumerate(out):
        key = _duplicate_key(n) or n
        if key in first:
            clashes.append(f"{out[first[key]]!r} (name {first[key] + 1}) ~ {n!r} (name {i + 1})")
        else:
            first[key] = i
    if clashes:
        raise VocabularyError(
            f"{source}: near-duplicate class names (equal up to case, spaces and punctuation): "
            + "; ".join(clashes)
            + ". Keep one of each."
        )
    return out


def looks_like_path(text: str) -> bool:
    """Whether a ``--vocabulary`` argument is meant as a file: no comma, and a path separator, a
    leading ``~`` / ``.``, or a vocabulary-file suffix."""
    t = text.strip()
    if "," in t or "\n" in t:
        return False
    return (
        os.sep in t
        or (os.altsep is not None and os.altsep in t)
        or t.startswith(("~", "."))
        or t.lower().endswith(VOCABULARY_FILE_SUFFIXES)
    )


def parse_vocabulary(text: str) -> List[str]:
    """Class names from "a,b,c" or from a text file (UTF-8, with or without BOM; one name per line
    or comma-separated), normalised by ``normalize_vocabulary``.

    Raises:
        FileNotFoundError: ``text`` looks like a path (``looks_like_path``) but is no file. (A
            single name with a "/" is passed with a trailing comma: "person/man,".)
        VocabularyError: see ``normalize_vocabulary``; file errors name the file and the line.
    """
    if os.path.isfile(os.path.expanduser(text)):
        path = Path(os.path.expanduser(text))
        names = []
        lines = path.read_text(encoding="utf-8-sig").splitlines()
        for lineno, line in enumerate(lines, 1):
            for name in line.split(","):
                names.append(normalize_class_name(name, f"{path}:{lineno}"))
        return normalize_vocabulary(names, str(path))
    if looks_like_path(text):
        raise FileNotFoundError(
            f"--vocabulary {text!r} looks like a file path but no such file exists (a single "
            "class name holding '/' or ending like a file name is passed with a trailing comma: "
            f"'{text},')"
        )
    return normalize_vocabulary(
        [n for line in text.splitlines() for n in line.split(",")], "--vocabulary"
    )
