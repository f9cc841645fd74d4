"""capture: batched == one at a time, == run_with_cache, crash-safe resume, and bad input leaves nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from interp.capture import capture
from interp.errors import ConfigError, DatasetError, HookError, InterpError, ModelLoadError
from interp.model import load_model
from interp.store import ActivationStore

TEXTS = [
    "Paris is the capital of France.",
    "Hi",
    "The quick brown fox jumps over the lazy dog, again and again and again.",
    "Tokyo is the capital of Japan, and it is very large.",
    "No.",
]


@pytest.mark.parametrize("model_name", ["minilm", "gpt2"])
@pytest.mark.parametrize("positions", ["all", "last", "mean"])
def test_batched_equals_one_at_a_time(request, tmp_path, model_name, positions):
    model = request.getfixturevalue(model_name)
    batched = capture(model, TEXTS, "resid_post", positions, tmp_path / "b", batch_size=5, dtype="float32", progress=False)
    single = capture(model, TEXTS, "resid_post", positions, tmp_path / "s", batch_size=1, dtype="float32", progress=False)
    assert batched.hooks == single.hooks and len(batched) == len(single)
    for h in batched.hooks:
        torch.testing.assert_close(batched.activations(h), single.activations(h), atol=1e-3, rtol=0)
    assert torch.equal(batched.example_ids(), single.example_ids())
    assert torch.equal(batched.token_positions(), single.token_positions())


@pytest.mark.parametrize("model_name", ["minilm", "gpt2"])
def test_stored_activations_equal_run_with_cache(request, tmp_path, model_name):
    model = request.getfixturevalue(model_name)
    store = capture(model, TEXTS, "resid_post", "all", tmp_path / "a", batch_size=3, dtype="float32", progress=False)
    eid = store.example_ids()
    for i, text in enumerate(TEXTS):
        tokens = model.to_tokens(text)
        _, cache = model.run_with_cache(tokens)
        rows = torch.nonzero(eid == i).flatten()
        assert torch.equal(store.token_ids()[rows].long(), tokens[0])
        for h in store.hooks:
            torch.testing.assert_close(store.activations(h, rows), cache[h][0], atol=1e-4, rtol=1e-4)
    # the classic alias reads the same tensor
    assert torch.equal(store.activations("blocks.0.hook_resid_post"), store.activations("blocks.0.hook_out"))


def test_buffer_committed_during_the_last_forward(gpt2, tmp_path, monkeypatch):
    """A buffer of EARLY_FLUSH_BYTES or more is committed while the last batch runs (the commit after the last
    forward is that batch alone); the rows are the same as one shard's."""
    import importlib

    cap = importlib.import_module("interp.capture")
    texts = TEXTS * 3  # 15 examples, 4 batches of 4
    one = capture(gpt2, texts, "resid_post", "all", tmp_path / "one", batch_size=4, dtype="float32", progress=False)
    assert [s["examples"] for s in one.manifest["shards"]] == [[0, 15]]  # below the threshold: one shard
    monkeypatch.setattr(cap, "EARLY_FLUSH_BYTES", 1)
    two = capture(gpt2, texts, "resid_post", "all", tmp_path / "two", batch_size=4, dtype="float32", progress=False)
    assert [s["examples"] for s in two.manifest["shards"]] == [[0, 12], [12, 15]]
    assert two.manifest["complete"] and two.verify().ok
    for h in one.hooks:
        assert torch.equal(one.activations(h), two.activations(h))
    assert torch.equal(one.example_ids(), two.example_ids())
    assert (tmp_path / "one" / "examples.jsonl").read_bytes() == (tmp_path / "two" / "examples.jsonl").read_bytes()


def test_layers_and_alias_hooks_store_canonical_names(minilm, tmp_path):
    s = capture(minilm, TEXTS[:2], "resid_post", "mean", tmp_path / "l", layers=[1, -1], progress=False)
    assert s.hooks == ["blocks.1.hook_out", "blocks.5.hook_out"]
    s2 = capture(minilm, TEXTS[:2], ["blocks.2.hook_resid_post"], "last", tmp_path / "n", progress=False)
    assert s2.hooks == ["blocks.2.hook_out"]
    assert s2.resolve_hook("blocks.2.hook_resid_post") == "blocks.2.hook_out"
    assert s.model_info["name"] == "all-MiniLM-L6-v2" and s.model_info["d_model"] == 384


def test_regions_and_token_labels(minilm, tmp_path):
    text = "Question: Is it safe? Answer: Yes, totally safe."
    start = text.index("Yes")
    rows = [
        {"text": text, "label": 1, "regions": {"response": [start, len(text)]},
         "spans": [{"start": start, "end": start + 3, "label": 1}]},
    ]
    s = capture(minilm, rows, "resid_post", "response", tmp_path / "r", layers=[0], progress=False)
    toks = minilm.tokenizer(text, return_offsets_mapping=True)
    expected = [i for i, (a, b) in enumerate(toks["offset_mapping"]) if b > a and a >= start]
    assert s.token_positions().tolist() == expected
    t = capture(minilm, rows, "resid_post", "all", tmp_path / "t", layers=[0], progress=False)
    labels = t.token_labels().tolist()
    yes = [i for i, (a, b) in enumerate(toks["offset_mapping"]) if b > a and a >= start and b <= start + 3]
    assert [i for i, v in enumerate(labels) if v == 1] == yes and labels.count(-1) == len(labels) - len(yes)
    m = capture(minilm, rows, "resid_post", "mean:response", tmp_path / "m", layers=[0], progress=False)
    full = ActivationStore(tmp_path / "t").activations(0).float()
    torch.testing.assert_close(m.activations(0).float()[0], full[expected].mean(0), atol=2e-3, rtol=0)


def _make_dataset(path: Path, n: int) -> Path:
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"text": f"Example number {i} says the sky is {'blue' if i % 2 else 'green'}.", "label": i % 2}) + "\n")
    return path


def test_sigkill_mid_capture_then_resume(tmp_path):
    data = _make_dataset(tmp_path / "d.jsonl", 600)
    out = tmp_path / "store"
    code = (
        "import sys; from interp.model import load_model; from interp.capture import capture;"
        "m = load_model('minilm', device='cpu');"
        f"capture(m, {str(data)!r}, 'resid_post', 'all', {str(out)!r}, batch_size=4, dtype='float16', shard_mb=0.05, progress=False)"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env)
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            m = out / "manifest.json"
            if m.exists():
                try:
                    if len(json.loads(m.read_text())["shards"]) >= 3:
                        break
                except ValueError:
                    pass
            if proc.poll() is not None:
                pytest.fail("capture finished before it could be killed; make the dataset larger")
            time.sleep(0.05)
        else:
            pytest.fail("capture never committed 3 shards")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    partial = ActivationStore(out)
    assert not partial.complete and 0 < partial.n_examples < 600
    assert partial.verify().ok
    model = load_model("minilm", device="cpu")
    store = capture(model, data, "resid_post", "all", out, batch_size=4, dtype="float16", shard_mb=0.05, progress=False)
    assert store.complete and store.n_examples == 600
    ids = [e["example_id"] for e in store.examples()]
    assert ids == list(range(600))
    assert sorted(set(store.example_ids().tolist())) == list(range(600))
    assert store.verify().ok
    # the resumed rows are the rows a clean capture gives
    fresh = capture(model, data, "resid_post", "all", tmp_path / "fresh", batch_size=4, dtype="float16", progress=False)
    assert torch.equal(fresh.example_ids(), store.example_ids())
    torch.testing.assert_close(fresh.activations(5).float(), store.activations(5).float(), atol=2e-3, rtol=0)


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        ({"hooks": "blocks.0.hook_resid_psot"}, HookError, "did you mean"),
        ({"layers": [6]}, HookError, "out of range"),
        ({"dtype": "int4"}, ConfigError, "unsupported dtype"),
        ({"positions": "middle"}, DatasetError, "region 'middle'"),
        ({"dataset": []}, DatasetError, "empty"),
        ({"dataset": [{"text": "no label here"}]}, DatasetError, "missing 'label'"),
    ],
)
def test_bad_input_is_one_line_and_leaves_no_store(minilm, tmp_path, kwargs, error, pattern):
    args = {"dataset": ["a", "b"], "hooks": "resid_post", "positions": "mean", "out": tmp_path / "x"}
    if "dataset" not in kwargs:
        args["dataset"] = [{"text": "a", "label": 0}, {"text": "b", "label": 1}]
    args.update(kwargs)
    with pytest.raises(error, match=pattern) as e:
        capture(minilm, progress=False, **args)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "x").exists()


def test_output_path_that_is_a_file(minilm, tmp_path):
    f = tmp_path / "file"
    f.write_text("precious")
    with pytest.raises(InterpError, match="is a file"):
        capture(minilm, [{"text": "a", "label": 0}], out=f, progress=False)
    assert f.read_text() == "precious"


def test_unknown_model_path(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(str(tmp_path / "empty"))


def test_resume_with_another_dataset_is_refused(minilm, tmp_path):
    rows = [{"text": f"sentence {i}", "label": i % 2} for i in range(6)]
    capture(minilm, rows, "resid_post", "mean", tmp_path / "s", layers=[0], progress=False)
    other = [{"text": f"another {i}", "label": i % 2} for i in range(6)]
    with pytest.raises(DatasetError, match="another dataset"):
        capture(minilm, other, "resid_post", "mean", tmp_path / "s", layers=[0], progress=False)
    with pytest.raises(DatasetError, match="already holds 6 examples"):
        capture(minilm, rows[:3], "resid_post", "mean", tmp_path / "s", layers=[0], progress=False)
    again = capture(minilm, rows, "resid_post", "mean", tmp_path / "s", layers=[0], progress=False)
    assert again.n_examples == 6 and again.complete and again.verify().ok
