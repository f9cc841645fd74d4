"""Grading a model's short answers against known ones (the bundled ``questions`` and ``truth`` datasets).

The rule (interp/data/README.md): both sides normalised (accents removed, lowercased, thousands commas dropped,
articles dropped, words of letters and digits); an answer is correct when the answer or one of its aliases occurs
in the response as a whole word or run of words.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

ARTICLES = {"a", "an", "the"}


def normalize(text: str) -> str:
    """The bundled questions' grading normalisation (see interp/data/README.md): accents removed, lowercased,
    thousands commas dropped, words of letters and digits (decimal numbers kept whole), articles dropped."""
    t = "".join(ch for ch in unicodedata.normalize("NFKD", text) if not unicodedata.combining(ch)).lower()
    t = re.sub(r"(?<=\d),(?=\d{3}\b)", "", t)
    return " ".join(w for w in re.findall(r"\d+\.\d+|[^\W_]+", t) if w not in ARTICLES)


def is_correct(response: str, answer: str, aliases: Sequence[str] = ()) -> bool:
    """True when the answer or an alias occurs in the response as a whole word or run of words."""
    r = f" {normalize(response)} "
    return any(f" {normalize(a)} " in r for a in [answer, *aliases] if normalize(a))
