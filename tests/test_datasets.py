"""Datasets: jsonl parsing with file:line errors, the bundled data, and span/region alignment helpers."""

from __future__ import annotations

import json

import pytest

from interp.datasets import (
    BUILTIN,
    Dataset,
    load_dataset,
    load_jsonl,
    token_labels_from_spans,
    token_mask_for_region,
)
from interp.errors import DatasetError


def _write(tmp_path, rows):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return p


def test_roundtrip(tmp_path):
    rows = [
        {"id": "a", "text": "Hello there", "label": 1, "split": "train", "spans": [{"start": 0, "end": 5, "label": 1}], "topic": "x"},
        {"id": "b", "text": "General Kenobi", "label": 0, "split": "test", "regions": {"response": [8, 14]}},
    ]
    ds = load_jsonl(_write(tmp_path, rows))
    assert len(ds) == 2 and ds[0].meta == {"topic": "x"} and ds[1].regions == {"response": [8, 14]}
    ds.save(tmp_path / "out.jsonl")
    again = load_jsonl(tmp_path / "out.jsonl")
    assert [e.to_record() for e in again] == [e.to_record() for e in ds]


@pytest.mark.parametrize(
    "bad, pattern",
    [
        ('{"text": "x"', "not valid JSON"),
        ({"label": 1}, "missing 'text'"),
        ({"text": "x"}, "missing 'label'"),
        ({"text": "x", "label": 1, "split": "dev"}, "split 'dev'"),
        ({"text": "abc", "label": 1, "spans": [{"start": 1, "end": 9, "label": 1}]}, "outside the text"),
        ({"text": "abc", "label": 1, "spans": [{"start": 0, "end": 2}]}, "no 'label'"),
        ({"text": "abc", "label": 1, "regions": {"response": [2, 1]}}, "outside the text"),
        ({"text": "abc", "label": [1]}, "'label' must be"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, bad, pattern):
    p = _write(tmp_path, [{"text": "fine", "label": 0}, bad])
    with pytest.raises(DatasetError, match=pattern) as e:
        load_jsonl(p)
    assert f"{p}:2" in str(e.value) and "\n" not in str(e.value)


def test_empty_and_missing(tmp_path):
    with pytest.raises(DatasetError, match="no examples"):
        load_jsonl(_write(tmp_path, [""]))
    with pytest.raises(DatasetError, match="does not exist"):
        load_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(DatasetError, match="did you mean: capitals"):
        load_dataset("capitels")


@pytest.mark.parametrize("name", sorted(set(BUILTIN) - {"questions", "steer_prompts"}))  # labelled ones
def test_bundled_datasets_load_and_are_consistent(name):
    ds = load_dataset(name)
    assert len(ds) >= 150
    assert {e.label for e in ds} == {0, 1}
    assert {e.split for e in ds} == {"train", "test"}
    for e in ds:
        for s in e.spans:
            assert e.text[s["start"] : s["end"]].strip() == e.text[s["start"] : s["end"]] != ""


def test_capitals_has_150_countries_both_polarities():
    ds = load_dataset("capitals")
    by_country: dict[str, set] = {}
    for e in ds:
        by_country.setdefault(e.meta["country"], set()).add(e.label)
    assert len(by_country) >= 150 and all(v == {0, 1} for v in by_country.values())


def test_from_texts_and_rows():
    assert load_dataset(["a", "b"]).labels() == [None, None]
    ds = Dataset.from_texts(["a", "b"], [0, 1])
    assert ds.labels() == [0, 1]
    with pytest.raises(DatasetError, match="2 texts but 1 labels"):
        Dataset.from_texts(["a", "b"], [0])


def test_token_alignment_helpers():
    #          0123456789012345
    offsets = [(0, 0), (0, 5), (6, 11), (11, 12), (0, 0)]  # [CLS] Hello world . [SEP]
    spans = [{"start": 6, "end": 11, "label": 1}]
    assert token_labels_from_spans(offsets, spans) == [-1, -1, 1, -1, -1]
    assert token_labels_from_spans(offsets, [{"start": 3, "end": 8, "label": 0}]) == [-1, 0, 0, -1, -1]
    assert token_mask_for_region(offsets, [6, 12]) == [False, False, True, True, False]


def test_every_bundled_dataset_loads_by_name():
    from interp.datasets import BUILTIN, UNLABELLED, load_dataset

    for name in BUILTIN:
        data = load_dataset(name)
        assert len(data) >= (40 if name == "steer_prompts" else 150), name
        if name not in UNLABELLED:
            assert all(e.label is not None for e in data), name
    q = load_dataset("questions")
    assert q.has_messages and q.examples[0].messages[0]["role"] == "user"


def test_mappings_are_refused_naming_a_split():
    from collections import UserDict

    from interp.datasets import load_dataset

    rows = [{"text": "a", "label": 0}]
    for mapping in ({"train": rows, "test": rows}, UserDict({"validation": rows})):
        with pytest.raises(DatasetError, match=r"not a list of examples; for a Hugging Face DatasetDict pick a split"):
            load_dataset(mapping)


def test_non_utf8_line_is_named(tmp_path):
    from interp.datasets import load_jsonl

    f = tmp_path / "d.jsonl"
    f.write_bytes(b'{"text": "ok", "label": 0}\n\n{"text": "\xff", "label": 1}\n')
    with pytest.raises(DatasetError, match=r"d.jsonl:3: not UTF-8 text \(byte 0xff at byte 11"):
        load_jsonl(f)
