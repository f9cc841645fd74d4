"""Bad inputs to capture (and to the commands around it): one line each, and no partial output left behind."""

from __future__ import annotations

import errno
import json
import os
import warnings

import pytest

import interp.store.writer as writer_mod
from interp.capture import TruncationWarning, capture
from interp.cli import main
from interp.errors import ConfigError, DatasetError, ModelLoadError, StoreError
from interp.model import load_model
from interp.store import ActivationStore
from interp.store.files import temp_name
from store_cases import fingerprint

ROWS = [{"text": f"sentence number {i} is here", "label": i % 2} for i in range(12)]
SMALL = dict(hooks="resid_post", positions="all", batch_size=2, shard_mb=0.002, dtype="float32", progress=False)


def _one_line_cli(args, capsys) -> str:
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    return err


def test_pickle_only_model_dir_is_refused_without_loading_it(tmp_path, capsys):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (d / "pytorch_model.bin").write_bytes(b"\x80\x02not really a pickle")
    with pytest.raises(ModelLoadError, match="only pickle weights.*safetensors"):
        load_model(str(d))
    _one_line_cli(["capture", "--model", str(d), "--dataset", "capitals", "--out", str(tmp_path / "o")], capsys)
    assert not (tmp_path / "o").exists()


def test_non_utf8_dataset_file(gpt2, tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_bytes(b'{"text": "fine", "label": 0}\n{"text": "caf\xe9", "label": 1}\n')
    with pytest.raises(DatasetError, match=r"d.jsonl:2: not UTF-8 text \(byte 0xe9"):
        capture(gpt2, f, out=tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("kwargs, pattern", [
    ({"shard_mb": float("nan")}, "shard size"),
    ({"shard_mb": 0}, "shard size"),
    ({"shard_mb": float("inf")}, "shard size"),
    ({"max_length": -5}, "max_length"),
    ({"max_length": 0}, "max_length"),
    ({"max_length": 2.5}, "max_length"),
    ({"batch_size": 0}, "batch_size"),
])
def test_bad_numbers_are_refused_before_anything_is_written(gpt2, tmp_path, kwargs, pattern):
    with pytest.raises(ConfigError, match=pattern) as e:
        capture(gpt2, ROWS, out=tmp_path / "o", progress=False, **kwargs)
    assert "\n" not in str(e.value) and not (tmp_path / "o").exists()


def test_shard_mb_nan_on_the_command_line(tiny_gpt2_path, tmp_path, capsys):
    _one_line_cli(["capture", "--model", str(tiny_gpt2_path), "--dataset", "capitals", "--out", str(tmp_path / "o"),
                   "--shard-mb", "nan", "--device", "cpu"], capsys)
    assert not (tmp_path / "o").exists()


def test_no_write_permission_on_out(gpt2, tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    root = os.geteuid() == 0  # root ignores permissions: act as nobody for the call
    if root:
        for p in [tmp_path, *list(tmp_path.parents)[:2]]:  # nobody may walk to ro/, not write in it
            p.chmod(p.stat().st_mode | 0o011)
    try:
        if root:
            os.setegid(65534)
            os.seteuid(65534)
        with pytest.raises(StoreError, match=r"cannot create .*out \(Permission denied\)") as e:
            capture(gpt2, ROWS, out=parent / "out", progress=False)
    finally:
        if root:
            os.seteuid(0)
            os.setegid(0)
    assert "\n" not in str(e.value) and not (parent / "out").exists()


def _disk_full_after(n_ok: int, monkeypatch):
    real = writer_mod.write_safetensors
    calls = [0]

    def write(path, tensors, metadata):
        calls[0] += 1
        if calls[0] > n_ok:
            temp_name(path).write_bytes(b"half a shard")
            try:
                raise OSError(errno.ENOSPC, "No space left on device")
            finally:
                temp_name(path).unlink()  # what files.replacing does on the way out
        return real(path, tensors, metadata)

    monkeypatch.setattr(writer_mod, "write_safetensors", write)


def test_disk_full_on_first_shard_leaves_nothing(gpt2, tmp_path, monkeypatch):
    _disk_full_after(0, monkeypatch)
    with pytest.raises(StoreError, match="No space left on device.*resumes") as e:
        capture(gpt2, ROWS, out=tmp_path / "o", **SMALL)
    assert "\n" not in str(e.value) and not (tmp_path / "o").exists()


def test_disk_full_later_keeps_committed_shards_and_resumes(gpt2, tmp_path, monkeypatch):
    ref = capture(gpt2, ROWS, out=tmp_path / "ref", **SMALL)
    assert len(ref.manifest["shards"]) >= 3
    _disk_full_after(2, monkeypatch)
    with pytest.raises(StoreError, match="No space left"):
        capture(gpt2, ROWS, out=tmp_path / "o", **SMALL)
    partial = ActivationStore(tmp_path / "o")
    assert len(partial.manifest["shards"]) == 2 and partial.verify().ok
    assert not [p for p in (tmp_path / "o").iterdir() if ".tmp-" in p.name or p.name == ".lock"]
    monkeypatch.undo()
    capture(gpt2, ROWS, out=tmp_path / "o", **SMALL)
    assert fingerprint(tmp_path / "o") == fingerprint(tmp_path / "ref")


def test_probe_out_naming_a_file(tmp_path, capsys):
    import torch

    s = ActivationStore.from_tensors(tmp_path / "s", {"blocks.0.hook_out": torch.randn(40, 4)}, [i % 2 for i in range(40)])
    (tmp_path / "f").write_text("precious")
    _one_line_cli(["probe", str(s.path), "--out", str(tmp_path / "f"), "--quiet"], capsys)
    assert (tmp_path / "f").read_text() == "precious"


def test_dataset_dict_is_refused_naming_a_split(gpt2, tmp_path):
    datasets = pytest.importorskip("datasets")
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:4])})
    with pytest.raises(DatasetError, match=r'pick a split, e.g. ds\["train"\]'):
        capture(gpt2, dd, out=tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()
    s = capture(gpt2, dd["train"], out=tmp_path / "o", positions="mean", progress=False)
    assert [e["text"] for e in s.examples()] == [r["text"] for r in ROWS[:4]]
    with pytest.raises(DatasetError, match="pick a split"):
        capture(gpt2, {"train": ROWS}, out=tmp_path / "p", progress=False)


def test_finished_store_with_changed_labels_is_refused(gpt2, tmp_path):
    capture(gpt2, ROWS, out=tmp_path / "s", **SMALL)
    changed = [dict(r) for r in ROWS]
    changed[7]["label"] = 1 - changed[7]["label"]
    with pytest.raises(DatasetError, match=r"example 7 differs in label \(label: '1' in the store, '0' now\)"):
        capture(gpt2, changed, out=tmp_path / "s", **SMALL)
    assert capture(gpt2, ROWS, out=tmp_path / "s", **SMALL).verify().ok  # the same dataset: returned as is


def test_resume_after_a_text_changed_is_refused(gpt2, tmp_path, monkeypatch):
    calls = [0]
    real = writer_mod.StoreWriter._commit

    def commit_then_die(self, *args, **kwargs):
        real(self, *args, **kwargs)
        calls[0] += 1
        if calls[0] == 2:
            raise KeyboardInterrupt  # the user pressed Ctrl-C after two shards

    monkeypatch.setattr(writer_mod.StoreWriter, "_commit", commit_then_die)
    with pytest.raises(KeyboardInterrupt):
        capture(gpt2, ROWS, out=tmp_path / "s", **SMALL)
    monkeypatch.undo()
    done = ActivationStore(tmp_path / "s").n_examples
    assert 0 < done < len(ROWS)
    middle = [dict(r) for r in ROWS]
    middle[done // 2]["text"] = "a different sentence"
    with pytest.raises(DatasetError, match=rf"example {done // 2} differs in text"):
        capture(gpt2, middle, out=tmp_path / "s", **SMALL)
    later = [dict(r) for r in ROWS]
    later[-1]["text"] = "a different ending"
    with pytest.raises(DatasetError, match="another version of this dataset"):
        capture(gpt2, later, out=tmp_path / "s", **SMALL)
    assert capture(gpt2, ROWS, out=tmp_path / "s", **SMALL).complete


def test_truncation_is_one_warning_with_the_count(gpt2, tmp_path):
    rows = [{"text": "a", "label": 0}, {"text": "a much longer text that cannot fit", "label": 1},
            {"text": "another long text that will be cut", "label": 0}]
    with pytest.warns(TruncationWarning, match=r"^2 of 3 examples were longer than 6 tokens") as rec:
        capture(gpt2, rows, out=tmp_path / "s", positions="last", max_length=6, progress=False)
    assert len([w for w in rec if issubclass(w.category, TruncationWarning)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", TruncationWarning)
        capture(gpt2, rows, out=tmp_path / "t", positions="last", progress=False)
