"""What a caption says, without the template it was written in.

Contrastive image-caption training treats every other caption of a batch as a negative. When
two captions say the same thing ("a photo of a red star", "a close-up photo of a red star") that
negative is false: the loss pushes apart an image and a caption that describe it. Web data has such
duplicates (product photos, stock captions); a small closed world has many (48 seen names, 96
object photos in a batch of 128: each has about 1.5 false negatives). :class:`CaptionContent`
maps a caption to a key that two captions share when they say the same thing:

- a caption that matches one of the dataset's ``caption_templates`` (format strings such as
  ``"a photo of {L} on the {s}"``) keys on its fields' values (``L = "a red star"``,
  ``s = "grass"``), so that "a photo of a red star" and "a red star on a plain background"
  share a key;
- any other caption keys on its text, lower-cased with runs of white space collapsed (exact
  duplicates).

A field's value is compared as written: a list in another order ("a cat and a dog", "a dog and a
cat") is other content here.

Templates are tried with the most literal text first, so that ``"a photo of {L} on the {s}"`` wins
over ``"a photo of {L}"`` and a bare ``"{L}"`` is the last resort.
"""

import re
import string
from typing import List, Sequence, Tuple

__all__ = ["CaptionContent", "normalize_caption"]

_SPACES = re.compile(r"\s+")


def normalize_caption(caption: str) -> str:
    """Lower-cased, stripped, white space runs collapsed to one space, a final period dropped."""
    text = _SPACES.sub(" ", str(caption).strip().lower())
    return text[:-1].rstrip() if text.endswith(".") else text


def _compile(template: str) -> Tuple[int, "re.Pattern"]:
    """(number of literal characters, anchored regex with one named group per field); the literal
    text is normalised as :func:`normalize_caption` normalises captions."""
    parts: List[str] = []
    fields = set()
    literal = 0
    parsed = list(string.Formatter().parse(template.strip()))
    for i, (text, field, spec, conversion) in enumerate(parsed):
        text = _SPACES.sub(" ", text.lower())
        if i == len(parsed) - 1 and field is None:
            text = text[:-1].rstrip() if text.endswith(".") else text
        parts.append(re.escape(text))
        literal += len(text)
        if field is None:
            continue
        if not field.isidentifier() or spec or conversion:
            raise ValueError(
                f"caption template {template!r}: fields must be plain names such as {{L}}, got "
                f"{{{field}{'!' + conversion if conversion else ''}{':' + spec if spec else ''}}}"
            )
        if field in fields:
            parts.append(f"(?P={field})")
        else:
            parts.append(f"(?P<{field}>.+?)")
            fields.add(field)
    return literal, re.compile("^" + "".join(parts) + "$")


class CaptionContent:
    """Caption -> key of what it says (see the module docstring).

    Args:
        templates: format strings with named fields (``"{L} on the {s}"``); empty = exact
            duplicates only.

    Raises:
        ValueError: a template with a positional, indexed or formatted field.
    """

    def __init__(self, templates: Sequence[str] = ()):
        compiled = [_compile(t) for t in dict.fromkeys(templates)]
        # most literal text first; ties keep the given order (sorted is stable)
        self._patterns = [p for _, p in sorted(compiled, key=lambda lp: -lp[0])]

    @property
    def num_templates(self) -> int:
        return len(self._patterns)

    def __call__(self, caption: str) -> str:
        text = normalize_caption(caption)
        for pattern in self._patterns:
            match = pattern.match(text)
            if match:
                fields = sorted(match.groupdict().items())
                return "\x1f".join(f"{k}={v}" for k, v in fields) if fields else text
        return text

    def keys(self, captions: Sequence[str]) -> List[str]:
        return [self(c) for c in captions]
