"""Labelled text datasets: JSON Lines in and out, the bundled datasets under ``interp/data/`` (linked as ``data/``), token-level span labels.

A row is a JSON object with ``text`` (str) and ``label`` (int, str or bool), optionally ``split``
(``"train"``/``"test"``), ``id``, ``spans`` (``[{"start", "end", "label", "name"?}]``, character offsets, end
exclusive: tokens overlapping a span get its label) and ``regions`` (``{"response": [start, end]}``: named
character ranges that position policies such as ``positions="response"`` select). Any other field is kept
as metadata and stored with the example.

A chat row holds ``messages`` (``[{"role": "user", "content": ...}, {"role": "assistant", "content": ...}]``)
instead of ``text``. Its text is the model's chat template applied to the messages, made by
``interp.chat.render_dataset(model, dataset)`` (capture does it), which also sets the ``response`` region: the
characters of the final assistant message's content. Until then a chat example's ``text`` is empty (a ``text``
given beside ``messages``, as a store's examples.jsonl records it, is replaced by the rendering).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from interp.errors import DatasetError, close_matches

DATA_DIR = Path(__file__).resolve().parent / "data"  # package data (the top-level data/ links here)
BUILTIN = {
    "capitals": "capitals.jsonl", "deception": "deception.jsonl", "entities": "entities.jsonl",
    "questions": "questions.jsonl", "truth": "truth.jsonl", "contrast": "contrast.jsonl", "steer_prompts": "steer_prompts.jsonl",
}
UNLABELLED = {"questions", "steer_prompts"}


@dataclass
class Example:
    """One labelled text. ``meta`` holds every other field of the row."""

    text: str
    label: Any = None
    split: str | None = None
    id: Any = None
    spans: list[dict[str, Any]] = field(default_factory=list)
    regions: dict[str, list[int]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    messages: list[dict[str, str]] | None = None

    def to_record(self) -> dict[str, Any]:
        """The JSON object written to jsonl files and to a store's examples.jsonl."""
        rec: dict[str, Any] = {"id": self.id, "text": self.text}
        if self.messages is not None:
            rec["messages"] = self.messages
        if self.label is not None:
            rec["label"] = self.label
        if self.split is not None:
            rec["split"] = self.split
        if self.spans:
            rec["spans"] = self.spans
        if self.regions:
            rec["regions"] = self.regions
        rec.update(self.meta)
        return rec


class Dataset(Sequence[Example]):
    """An ordered list of :class:`Example` with a name (used as provenance in stores and results)."""

    def __init__(self, examples: Iterable[Example], name: str = "dataset", source: str | None = None):
        self.examples = list(examples)
        self.name = name
        self.source = source

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return Dataset(self.examples[i], self.name, self.source)
        return self.examples[i]

    def __iter__(self) -> Iterator[Example]:
        return iter(self.examples)

    def __repr__(self) -> str:
        return f"Dataset({self.name!r}, {len(self)} examples)"

    @property
    def has_spans(self) -> bool:
        return any(e.spans for e in self.examples)

    @property
    def has_messages(self) -> bool:
        """True when some example is a chat (``messages``) whose text the model's chat template makes."""
        return any(e.messages is not None for e in self.examples)

    def texts(self) -> list[str]:
        return [e.text for e in self.examples]

    def labels(self) -> list[Any]:
        return [e.label for e in self.examples]

    def provenance(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source, "examples": len(self)}

    def save(self, path: str | os.PathLike) -> None:
        """Write as JSON Lines (one object per example)."""
        with open(path, "w", encoding="utf-8") as f:
            for e in self.examples:
                f.write(json.dumps(e.to_record(), ensure_ascii=False) + "\n")

    @classmethod
    def from_texts(
        cls,
        texts: Sequence[str],
        labels: Sequence[Any] | None = None,
        splits: Sequence[str] | None = None,
        name: str = "texts",
    ) -> Dataset:
        """A dataset from parallel lists (labels optional: unlabelled text, e.g. a control set)."""
        if labels is not None and len(labels) != len(texts):
            raise DatasetError(f"{len(texts)} texts but {len(labels)} labels: give one label per text")
        examples = []
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise DatasetError(f"text {i} is {type(t).__name__}, not a string")
            examples.append(
                Example(
                    text=t,
                    label=None if labels is None else _plain(labels[i]),
                    split=None if splits is None else splits[i],
                    id=i,
                )
            )
        return cls(examples, name=name)


def _plain(v: Any) -> Any:
    """Numpy / torch scalars to plain Python values (so they serialise to JSON)."""
    return v.item() if hasattr(v, "item") else v


def _check_offsets(where: str, text: str, start: Any, end: Any, what: str) -> None:
    if not (isinstance(start, int) and isinstance(end, int)) or isinstance(start, bool) or isinstance(end, bool):
        raise DatasetError(f"{where}: {what} offsets must be integers, got {start!r}, {end!r}")
    if not 0 <= start < end <= len(text):
        raise DatasetError(
            f"{where}: {what} [{start}, {end}) lies outside the text (length {len(text)}); offsets are character"
            " indices with end exclusive"
        )


def parse_record(rec: Any, where: str, require_label: bool = True) -> Example:
    """Check one row and turn it into an :class:`Example`; ``where`` (``file:line``) prefixes every error."""
    if not isinstance(rec, Mapping):
        raise DatasetError(f"{where}: a row must be a JSON object, got {type(rec).__name__}")
    rec = dict(rec)
    messages = rec.pop("messages", None)
    text = rec.pop("text", None)
    if messages is not None:  # a chat: its text is made later by the model's chat template
        messages, text = check_messages(messages, where), ""
        for key in ("spans", "regions"):
            if rec.get(key):
                raise DatasetError(f"{where}: '{key}' index a text, and a chat row's text is made by the model's chat"
                                   " template; drop them (positions='response' selects the final assistant message)")
    elif text is None:
        raise DatasetError(f"{where}: missing 'text'; every row needs a text field (or a chat in 'messages')")
    elif not isinstance(text, str) or not text:
        raise DatasetError(f"{where}: 'text' must be a non-empty string")
    if "label" not in rec and require_label:
        raise DatasetError(f"{where}: missing 'label'; every row needs text and label (or load with require_label=False)")
    label = rec.pop("label", None)
    if isinstance(label, (list, dict)):
        raise DatasetError(f"{where}: 'label' must be an int, string or bool, got {type(label).__name__}")
    split = rec.pop("split", None)
    if split is not None and split not in ("train", "test", "val", "validation"):
        raise DatasetError(f"{where}: split {split!r} is not one of train, test, val")
    spans = rec.pop("spans", None) or []
    if not isinstance(spans, list):
        raise DatasetError(f"{where}: 'spans' must be a list of {{start, end, label}} objects")
    for s in spans:
        if not isinstance(s, Mapping) or "start" not in s or "end" not in s:
            raise DatasetError(f"{where}: each span needs 'start' and 'end' (character offsets) and a 'label'")
        _check_offsets(where, text, s["start"], s["end"], "span")
        if "label" not in s:
            raise DatasetError(f"{where}: span [{s['start']}, {s['end']}) has no 'label'")
    regions = rec.pop("regions", None) or {}
    if not isinstance(regions, Mapping):
        raise DatasetError(f"{where}: 'regions' must be an object like {{\"response\": [start, end]}}")
    for name, r in regions.items():
        if not isinstance(r, (list, tuple)) or len(r) != 2:
            raise DatasetError(f"{where}: region {name!r} must be [start, end]")
        _check_offsets(where, text, r[0], r[1], f"region {name!r}")
    ex_id = rec.pop("id", None)
    return Example(text, label, split, ex_id, [dict(s) for s in spans], {k: list(v) for k, v in regions.items()}, rec,
                   messages)


CHAT_ROLES = ("system", "user", "assistant", "tool")


def check_messages(messages: Any, where: str) -> list[dict[str, str]]:
    """A chat as a list of ``{"role", "content"}`` objects with string fields; anything else is a one-line error."""
    if not isinstance(messages, list) or not messages:
        raise DatasetError(f"{where}: 'messages' must be a non-empty list of {{\"role\", \"content\"}} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DatasetError(f"{where}: message {i} must be an object with string 'role' and 'content'")
        if m["role"] not in CHAT_ROLES:
            raise DatasetError(f"{where}: message {i} has role {m['role']!r}; roles are {', '.join(CHAT_ROLES)}")
        out.append({k: v for k, v in m.items()})
    return out


def load_jsonl(path: str | os.PathLike, require_label: bool = True, name: str | None = None) -> Dataset:
    """Read a JSON Lines dataset; a bad row raises :class:`DatasetError` naming the file and line."""
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"dataset file {path} does not exist; bundled datasets: {', '.join(BUILTIN)}")
    if path.is_dir():
        raise DatasetError(f"{path} is a directory; give a .jsonl file")
    examples = []
    try:
        f = open(path, "rb")
    except OSError as e:
        raise DatasetError(f"cannot read dataset file {path} ({e.strerror})") from None
    with f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DatasetError(
                    f"{where}: not UTF-8 text (byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line); save the"
                    " file as UTF-8"
                ) from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            ex = parse_record(rec, where, require_label)
            if ex.id is None:
                ex.id = len(examples)
            examples.append(ex)
    if not examples:
        raise DatasetError(f"{path} holds no examples; a dataset needs at least one row with text and label")
    ids = [e.id for e in examples]
    if len(set(map(json.dumps, ids))) != len(ids):
        raise DatasetError(f"{path}: example ids are not unique; give each row a distinct 'id' or none at all")
    return Dataset(examples, name=name or path.stem, source=str(path))


def load_dataset(
    source: str | os.PathLike | Dataset | Sequence[str] | Sequence[Mapping[str, Any]], require_label: bool = True
) -> Dataset:
    """A dataset from a bundled name (``capitals``, ``deception``, ``entities``), a jsonl path, a Dataset,
    a list of row dicts, or a list of strings (unlabelled)."""
    if isinstance(source, Dataset):
        if not len(source):
            raise DatasetError("the dataset is empty; give at least one example")
        return source
    if isinstance(source, (str, os.PathLike)):
        s = str(source)
        if s in BUILTIN:
            # questions and steering prompts carry no label: the model's graded answers or the user supply it
            return load_jsonl(DATA_DIR / BUILTIN[s], require_label and s not in UNLABELLED, name=s)
        if not Path(s).exists() and not s.endswith(".jsonl") and os.sep not in s:
            raise DatasetError(f"no dataset file or bundled dataset {s!r}; {close_matches(s, BUILTIN)}")
        return load_jsonl(s, require_label)
    if isinstance(source, Mapping):
        keys = [str(k) for k in list(source)[:5]]
        hint = f'e.g. ds["{keys[0]}"]' if keys else 'e.g. ds["train"]'
        raise DatasetError(
            f"got a mapping ({type(source).__name__} with keys {keys}), not a list of examples; for a Hugging Face"
            f" DatasetDict pick a split, {hint}"
        )
    rows = list(source)
    if not rows:
        raise DatasetError("the dataset is empty; give at least one example")
    if all(isinstance(r, str) for r in rows):
        return Dataset.from_texts(rows)
    examples = []
    for i, r in enumerate(rows):
        # Example objects (a filtered built-in dataset, say) are checked like the JSON rows they stand for
        ex = parse_record(r.to_record() if isinstance(r, Example) else r, f"row {i}", require_label)
        ex.id = i if ex.id is None else ex.id
        examples.append(ex)
    return Dataset(examples, name="rows")


# ----------------------------------------------------------------------------------------------- token alignment


def token_labels_from_spans(
    offsets: Sequence[tuple[int, int]], spans: Sequence[Mapping[str, Any]], default: int = -1
) -> list[int]:
    """Label each token with the label of the span its characters overlap (``default`` outside any span).

    ``offsets`` are the tokenizer's ``(start, end)`` character offsets; special tokens have ``(0, 0)`` and
    never get a span label. Where spans overlap, the later span wins.
    """
    out = []
    for a, b in offsets:
        lab = default
        if b > a:
            for s in spans:
                if a < s["end"] and b > s["start"]:
                    lab = int(s["label"])
        out.append(lab)
    return out


def token_mask_for_region(offsets: Sequence[tuple[int, int]], region: Sequence[int]) -> list[bool]:
    """Which tokens overlap the character range ``region = [start, end)`` (special tokens never do)."""
    start, end = region
    return [b > a and a < end and b > start for a, b in offsets]
