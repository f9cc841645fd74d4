"""Detectors: token alignment, planted-signal fitting and calibration, scoring, streaming, save/load, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from interp.datasets import token_labels_from_spans, token_mask_for_region
from interp.detectors import Detector, aggregate_scores, threshold_at_fpr
from interp.errors import ConfigError, DetectorError, InterpError
from interp.model import model_identity, tokenize
from interp.store import ActivationStore

REPO = Path(__file__).resolve().parent.parent
HOOK = "blocks.2.hook_out"


# ----------------------------------------------------------------------------------------------- token alignment
# Offsets below were checked by hand against the characters of each text (end exclusive).

MARIE = "Marie Curie studied in Paris."  # Curie = [6, 11), Paris = [23, 28)
NEE = "Dr. Zylberquist, née Ana, won."  # Zylberquist = [4, 15), née = [17, 20)


def test_token_labels_bert_hand_checked(minilm):
    toks = tokenize(minilm, [MARIE, NEE])
    pieces = minilm.tokenizer.convert_ids_to_tokens(toks.input_ids[0, : toks.lengths[0]].tolist())
    assert pieces == ["[CLS]", "marie", "cu", "##rie", "studied", "in", "paris", ".", "[SEP]"]
    assert toks.offsets[0] == [(0, 0), (0, 5), (6, 8), (8, 11), (12, 19), (20, 22), (23, 28), (28, 29), (0, 0)]
    spans = [{"start": 6, "end": 11, "label": 1}, {"start": 23, "end": 28, "label": 0}]
    assert MARIE[6:11] == "Curie" and MARIE[23:28] == "Paris"
    # [CLS]/[SEP] never labelled; both word pieces of Curie get its label; the full stop after Paris does not
    assert token_labels_from_spans(toks.offsets[0], spans) == [-1, -1, 1, 1, -1, -1, 0, -1, -1]
    # a span ending where the next word piece starts does not leak into it: "Cu" only = [6, 8)
    assert token_labels_from_spans(toks.offsets[0], [{"start": 6, "end": 8, "label": 1}]) == [-1, -1, 1] + [-1] * 6
    # accent stripped by the tokenizer, offsets still point into the original text
    pieces2 = minilm.tokenizer.convert_ids_to_tokens(toks.input_ids[1, : toks.lengths[1]].tolist())
    assert pieces2[3:7] == ["z", "##yl", "##ber", "##quist"] and pieces2[8] == "nee"
    assert toks.offsets[1][3:7] == [(4, 5), (5, 7), (7, 10), (10, 15)] and toks.offsets[1][8] == (17, 20)
    spans2 = [{"start": 4, "end": 15, "label": 1}, {"start": 17, "end": 20, "label": 0}]
    labs = token_labels_from_spans(toks.offsets[1], spans2)
    assert labs == [-1, -1, -1, 1, 1, 1, 1, -1, 0, -1, -1, -1, -1, -1]
    assert token_mask_for_region(toks.offsets[0], [23, 29]) == [False] * 6 + [True, True, False]


def test_token_labels_gpt2_hand_checked(gpt2):
    toks = tokenize(gpt2, [MARIE, NEE])
    # byte-level BPE: a word's leading space belongs to its token (" Cur" = [5, 9)); BOS has (0, 0)
    assert toks.offsets[0] == [(0, 0), (0, 5), (5, 9), (9, 11), (11, 18), (18, 19), (19, 22), (22, 28), (28, 29)]
    assert [MARIE[a:b] for a, b in toks.offsets[0][1:]] == ["Marie", " Cur", "ie", " studie", "d", " in", " Paris", "."]
    spans = [{"start": 6, "end": 11, "label": 1}, {"start": 23, "end": 28, "label": 0}]
    assert token_labels_from_spans(toks.offsets[0], spans) == [-1, -1, 1, 1, -1, -1, -1, 0, -1]
    # "Marie" = [0, 5) ends where " Cur" starts: the space token is not part of the span
    assert token_labels_from_spans(toks.offsets[0], [{"start": 0, "end": 5, "label": 1}]) == [-1, 1] + [-1] * 7
    # "é" is two bytes, two tokens with the same character offsets; both are inside "née" = [17, 20)
    off = toks.offsets[1]
    assert off[14:19] == [(16, 17), (17, 18), (18, 19), (18, 19), (19, 20)]
    labs = token_labels_from_spans(off, [{"start": 17, "end": 20, "label": 1}])
    assert [i for i, v in enumerate(labs) if v == 1] == [15, 16, 17, 18]
    assert token_mask_for_region(toks.offsets[0], [23, 28]) == [False] * 7 + [True, False]


# ----------------------------------------------------------------------------------------------- helpers


def test_aggregate_and_threshold_helpers():
    s = torch.tensor([0.5, -1.0, 3.0, 2.0])
    assert aggregate_scores(s, "mean") == pytest.approx(1.125)
    assert aggregate_scores(s, "max") == 3.0
    assert aggregate_scores(s, "last") == 2.0
    assert aggregate_scores(s, "topk", k=2) == pytest.approx(2.5)
    assert aggregate_scores(s, "topk", k=10) == pytest.approx(1.125)
    assert aggregate_scores(torch.empty(0), "max") != aggregate_scores(torch.empty(0), "max")  # NaN
    with pytest.raises(ConfigError, match="aggregation"):
        aggregate_scores(s, "median")
    neg = torch.arange(1000, dtype=torch.float32)
    t = threshold_at_fpr(neg, 0.01)
    assert int((neg > t).sum()) == 10
    assert threshold_at_fpr(torch.arange(50.0), 0.01) == 49.0  # fewer than 100 negatives: none may pass


# ----------------------------------------------------------------------------------------------- planted signal


def _planted_store(path, n=3000, d=32, shift=5.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = (torch.rand(n, generator=g) < 0.5).long()
    u = torch.randn(d, generator=g)
    u /= u.norm()
    X = torch.randn(n, d, generator=g) + shift * y[:, None] * u
    return ActivationStore.from_tensors(path, {HOOK: X}, y), u


@pytest.mark.parametrize("method", ["probe", "diff_in_means"])
def test_planted_example_signal_auroc_and_fpr(tmp_path, method):
    store, u = _planted_store(tmp_path / "s")
    det = Detector.fit(store, "label", method=method, progress=False)
    assert det.hook_ == HOOK and det.level_ == "example" and det.calibration_["source"] == "validation"
    rep = det.report(store)  # held-out test rows, never seen in fit or calibration
    assert rep.metrics["example"]["auroc"] > 0.99
    assert rep.metrics["example"]["fpr"] <= 0.02
    # fresh negatives from the same distribution: the 1%-FPR threshold gives at most 2% there
    g = torch.Generator().manual_seed(123)
    fresh = torch.randn(20000, 32, generator=g)
    assert float((det.token_scores(fresh) > det.threshold_).double().mean()) <= 0.02
    # the scorer points along the planted direction
    assert float(torch.nn.functional.cosine_similarity(det.weight_, u, dim=0)) > 0.9
    # sklearn-compatible ground truth for the AUROC
    from sklearn.metrics import roc_auc_score

    _, test = store.train_test_split()
    s = det.token_scores(store.activations(HOOK, test))
    assert rep.metrics["example"]["auroc"] == pytest.approx(roc_auc_score(store.labels()[test], s), abs=1e-9)


def test_planted_token_signal_token_and_span_level(tmp_path):
    g = torch.Generator().manual_seed(1)
    n_ex, L, d = 400, 12, 24
    u = torch.randn(d, generator=g)
    u /= u.norm()
    X = torch.randn(n_ex * L, d, generator=g)
    tl = torch.full((n_ex * L,), -1, dtype=torch.int64)
    ex_label = []
    for e in range(n_ex):
        fab = e % 2
        ex_label.append(fab)
        for p in (3, 4, 5, 8, 9):  # two entity spans per example: [3, 6) and [8, 10)
            tl[e * L + p] = fab if p < 6 else 0
            if fab and p < 6:
                X[e * L + p] += 6.0 * u
    store = ActivationStore.from_tensors(
        tmp_path / "tok",
        {HOOK: X},
        examples=[{"id": e, "label": ex_label[e]} for e in range(n_ex)],
        example_id=torch.arange(n_ex).repeat_interleave(L),
        position=torch.arange(L).repeat(n_ex),
        token_label=tl,
        positions="all",
    )
    det = Detector.fit(store, "token_label", aggregation="max", progress=False)
    assert det.level_ == "token" and det.mask_ == "text"
    rep = det.report(store)
    assert rep.metrics["token"]["auroc"] > 0.99 and rep.metrics["span"]["auroc"] > 0.99
    # spans are runs of equal labels: 2 per example in the test split
    assert rep.metrics["span"]["n"] == 2 * rep.metrics["example"]["n"]
    assert rep.metrics["token"]["fpr"] <= 0.02
    # example-level via the max over tokens separates texts with a fabricated entity
    assert rep.metrics["example"]["auroc"] > 0.99


def test_control_calibration_and_bad_labels(tmp_path):
    store, _ = _planted_store(tmp_path / "s", n=800)
    g = torch.Generator().manual_seed(5)
    control = ActivationStore.from_tensors(tmp_path / "c", {HOOK: torch.randn(5000, 32, generator=g)})
    det = Detector.fit(store, "label", control=control, progress=False)
    assert det.calibration_["source"] == "control" and det.calibration_["n_negatives"] == 5000
    scores = det.token_scores(control.activations(HOOK))
    assert int((scores > det.threshold_).sum()) == 50  # exactly floor(1% of 5000) of the control above
    three = ActivationStore.from_tensors(tmp_path / "three", {HOOK: torch.randn(30, 32)}, [0, 1, 2] * 10)
    with pytest.raises(DetectorError, match="exactly two"):
        Detector.fit(three, "label", progress=False)
    with pytest.raises(DetectorError, match="not a field"):
        Detector.fit(store, "colour", progress=False)
    with pytest.raises(ConfigError, match="aggregation"):
        Detector.fit(store, "label", aggregation="median", progress=False)


# ----------------------------------------------------------------------------------------------- scoring a model


def _gpt2_detector(gpt2, hook="blocks.0.hook_out", threshold=0.0, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(int(gpt2.cfg.d_model), generator=g)
    ident = model_identity(gpt2)
    return Detector.from_direction(v, ident, hook=hook, scale=2.0, offset=-0.1, threshold=threshold, **kw)


def test_score_matches_captured_rows_and_aggregates(gpt2, tmp_path):
    from interp.capture import capture

    texts = ["The capital of France is Paris.", "Hello", "Once upon a time a small model learned to count."]
    store = capture(gpt2, texts, hooks=["blocks.0.hook_out"], positions="all", out=tmp_path / "cap",
                    dtype="float32", progress=False)
    for agg in ("mean", "max", "topk", "last"):
        det = _gpt2_detector(gpt2, aggregation=agg, k=3, mask="all")
        res = det.score(gpt2, texts, batch_size=2)  # padded batches
        stored = det.token_scores(store.activations("blocks.0.hook_out"))
        eid = store.example_ids()
        for i in range(len(texts)):
            torch.testing.assert_close(res.scores[i], stored[eid == i], atol=1e-4, rtol=0)
            assert res.aggregate[i] == pytest.approx(aggregate_scores(res.scores[i], agg, 3), abs=1e-9)
    # mask='text' leaves BOS out; a character range selects the tokens over it
    det = _gpt2_detector(gpt2, aggregation="mean")
    t = det.score(gpt2, texts[:1], mask="text")
    assert t.masks[0].tolist() == [False] + [True] * (len(t.masks[0]) - 1)
    r = det.score(gpt2, texts[:1], mask=[[25, 30]])  # "Paris"
    assert "".join(t for t, m in zip(r.tokens[0], r.masks[0].tolist()) if m).strip() == "Paris"
    assert r.aggregate[0] == pytest.approx(float(r.scores[0][r.masks[0]].double().mean()), abs=1e-9)
    assert r.flagged.tolist() == [bool(r.aggregate[0] > 0.0)]
    assert "over mask" in r.format(0) and "\x1b[" in r.format(0, color=True)
    fig = r.plot(0, width=4)
    assert fig.data[0].z.shape == ((len(r.scores[0]) + 3) // 4, 4)


def test_region_mask_mean_equals_pooled_store(minilm, tmp_path):
    """A mean-over-'response' detector scores text exactly like the store's mean:response rows (BERT, padding)."""
    from interp.capture import capture
    from interp.datasets import load_dataset

    rows = load_dataset("deception")[:6]
    store = capture(minilm, rows, hooks=["blocks.2.hook_out"], positions="mean:response", out=tmp_path / "m",
                    dtype="float32", progress=False)
    g = torch.Generator().manual_seed(0)
    det = Detector.from_direction(torch.randn(384, generator=g), store.model_info, hook="blocks.2.hook_resid_post",
                                  aggregation="mean", mask="response")
    later = []
    with minilm.hooks(fwd_hooks=[("blocks.3.hook_out", lambda act, hook: later.append(1))]):
        res = det.score(minilm, rows, batch_size=4)
    assert later == []  # the forward ends at the detector's hook: later blocks never run
    torch.testing.assert_close(res.aggregate.float(), det.token_scores(store.activations(2)), atol=1e-4, rtol=0)
    for i, ex in enumerate(rows):  # exactly the tokens over the response's characters
        a, b = ex.regions["response"]
        sel = [o for o, m in zip(res.offsets[i], res.masks[i].tolist()) if m]
        assert sel and all(s < b and e > a for s, e in sel)
    rep = det.report(minilm, rows, split=None)
    from sklearn.metrics import roc_auc_score

    y = [ex.label for ex in rows]
    assert rep.metrics["example"]["auroc"] == pytest.approx(roc_auc_score(y, res.aggregate.numpy()), abs=1e-9)
    assert set(rep.metrics) == {"example", "token", "span"}
    assert rep.labels == [int(v == 1) for v in y]  # the heatmap's true-label column
    fig = rep.plot([0, 1])
    side = fig.data[1]
    assert side.x[0] == "true label" and side.text[0][0] == ("pos" if y[0] == 1 else "neg")
    assert "blocks.2.hook_out" in fig.layout.title.text and "all-MiniLM-L6-v2" in fig.layout.title.text


# ----------------------------------------------------------------------------------------------- streaming


@pytest.mark.parametrize("hook", ["blocks.0.hook_out", "blocks.1.hook_out"])
def test_monitor_scores_equal_one_pass(gpt2, hook):
    det = _gpt2_detector(gpt2, hook=hook, mask="all")
    seen = []
    res = det.monitor(gpt2, "The capital of France", max_new_tokens=12, do_sample=True, seed=7, stop_at_eos=False,
                      on_token=lambda i, tid, s, sc: seen.append((i, tid, s, sc)))
    assert len(res.token_ids) == 12 and not res.stopped and res.reason == "max_new_tokens"
    assert [x[0] for x in seen] == list(range(12)) and [x[1] for x in seen] == res.token_ids.tolist()
    one = det.score(gpt2, res.full_ids)
    n = len(res.prompt_ids)
    torch.testing.assert_close(one.scores[0][n:], res.scores, atol=1e-4, rtol=0)
    torch.testing.assert_close(one.scores[0][:n], res.prompt_scores, atol=1e-4, rtol=0)
    assert [x[3] for x in seen] == pytest.approx(res.scores.tolist(), abs=1e-6)
    # same seed, same generation; the hook is gone afterwards
    again = det.monitor(gpt2, "The capital of France", max_new_tokens=12, do_sample=True, seed=7, stop_at_eos=False)
    assert again.token_ids.tolist() == res.token_ids.tolist()
    assert all(not hp.fwd_hooks for hp in gpt2.hook_dict.values())


def test_monitor_stop_above_first_crossing(gpt2):
    det = _gpt2_detector(gpt2, hook="blocks.1.hook_out")
    full = det.monitor(gpt2, "Once upon a time", max_new_tokens=16, do_sample=True, seed=3, stop_at_eos=False)
    s = full.scores
    thr = float(torch.quantile(s, 0.8))
    first = int(torch.nonzero(s > thr)[0])
    res = det.monitor(gpt2, "Once upon a time", max_new_tokens=16, do_sample=True, seed=3, stop_at_eos=False,
                      stop_above=thr)
    assert res.stopped and res.stop_index == first and res.reason == "stop_above"
    assert res.token_ids.tolist() == full.token_ids[: first + 1].tolist()
    torch.testing.assert_close(res.scores, s[: first + 1], atol=1e-5, rtol=0)
    # stop_above=True uses the detector's threshold; a callback returning True stops too
    det.threshold_ = thr
    assert det.monitor(gpt2, "Once upon a time", 16, do_sample=True, seed=3, stop_at_eos=False,
                       stop_above=True).stop_index == first
    cb = det.monitor(gpt2, "Once upon a time", 16, do_sample=True, seed=3, stop_at_eos=False,
                     on_token=lambda i, *_: i == 4)
    assert cb.reason == "callback" and len(cb.token_ids) == 5


def test_monitor_refuses_encoder(minilm):
    det = Detector.from_direction(torch.randn(384), model_identity(minilm), hook="blocks.1.hook_out")
    with pytest.raises(DetectorError, match="cannot generate"):
        det.monitor(minilm, "Hello", max_new_tokens=3)


# ----------------------------------------------------------------------------------------------- save / load / CLI


def test_save_load_new_process_same_scores(gpt2, tiny_gpt2_path, tmp_path):
    det = _gpt2_detector(gpt2, hook="blocks.1.hook_out", aggregation="max", threshold=0.3)
    out = det.save(tmp_path / "det")
    assert sorted(p.name for p in out.iterdir()) == ["detector.json", "detector.safetensors"]
    texts = ["The quick brown fox jumps over the lazy dog.", "Paris"]
    here = det.score(gpt2, texts)
    # a new process loads it through the CLI and prints per-token scores as JSON
    cmd = [sys.executable, "-m", "interp", "detect", "score", str(out), "--model", str(tiny_gpt2_path),
           "--device", "cpu", "--json"] + [a for t in texts for a in ("--text", t)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    recs = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(recs) == 2
    for i, rec in enumerate(recs):
        torch.testing.assert_close(torch.tensor(rec["scores"]), here.scores[i], atol=1e-5, rtol=0)
        assert rec["aggregate"] == pytest.approx(float(here.aggregate[i]), abs=1e-5)
        assert rec["token_ids"] == here.token_ids[i].tolist()
    loaded = Detector.load(out, model=gpt2)
    assert loaded.threshold_ == pytest.approx(0.3) and loaded.aggregation == "max"
    torch.testing.assert_close(loaded.weight_, det.weight_)
    assert loaded.direction_ is not None and loaded.direction_.hook == "blocks.1.hook_out"


def test_cli_fit_and_monitor(tmp_path, tiny_gpt2_path, capsys):
    from interp.cli import main

    store, _ = _planted_store(tmp_path / "s", n=600)
    assert main(["detect", "fit", str(store.path), "--label", "label", "--out", str(tmp_path / "d"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "validation" in out and "threshold" in out
    loaded = Detector.load(tmp_path / "d")
    assert loaded.metrics_["example"]["auroc"] > 0.99
    assert main(["detect", "report", str(tmp_path / "d"), "--store", str(store.path), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["metrics"]["example"]["auroc"] > 0.99
    # the synthetic detector is 32 wide: the 64-wide tiny GPT-2 is refused with one line, exit 2
    assert main(["detect", "monitor", str(tmp_path / "d"), "--model", str(tiny_gpt2_path), "--prompt", "Hi"]) == 2
    assert "d_model=64" in capsys.readouterr().err


def test_cli_monitor_gpt2(gpt2, tiny_gpt2_path, tmp_path, capsys):
    from interp.cli import main

    _gpt2_detector(gpt2, threshold=0.0).save(tmp_path / "g")
    code = main(["detect", "monitor", str(tmp_path / "g"), "--model", str(tiny_gpt2_path), "--prompt",
                 "The capital", "--max-new-tokens", "5", "--sample", "--no-eos-stop", "--device", "cpu", "--json"])
    assert code == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["index"] for x in lines[:-1]] == [0, 1, 2, 3, 4] and lines[-1]["tokens"] == 5


# ----------------------------------------------------------------------------------------------- bad input


def test_bad_inputs(gpt2, tmp_path):
    narrow = Detector.from_direction(torch.randn(32), {"name": "other", "d_model": 32}, hook="blocks.0.hook_out")
    with pytest.raises(DetectorError, match="d_model=64.*width 32"):
        narrow.score(gpt2, ["hello"])
    det = _gpt2_detector(gpt2)
    with pytest.raises(DetectorError, match=r"span \[0, 50\) lies outside text 0"):
        det.score(gpt2, ["short"], mask=[[0, 50]])
    with pytest.raises(DetectorError, match="no region 'response'"):
        det.score(gpt2, ["short"], mask="response")
    with pytest.raises(InterpError, match="outside the text"):
        det.score(gpt2, [{"text": "short", "spans": [{"start": 2, "end": 9, "label": 1}]}], mask="spans")
    other = Detector.from_direction(torch.randn(64), {**model_identity(gpt2), "weights_hash": "0123456789abcdef"},
                                    hook="blocks.0.hook_out")
    with pytest.raises(DetectorError, match="made for model"):
        other.score(gpt2, ["hello"])
    path = det.save(tmp_path / "d")
    (path / "detector.safetensors").unlink()
    with pytest.raises(DetectorError, match="missing detector.safetensors"):
        Detector.load(path)
    det.save(tmp_path / "e")
    (tmp_path / "e" / "detector.json").unlink()
    with pytest.raises(DetectorError, match="missing detector.json"):
        Detector.load(tmp_path / "e")
    det.save(tmp_path / "f")
    narrow.save(tmp_path / "n")
    with pytest.raises(DetectorError, match="d_model=64"):
        Detector.load(tmp_path / "n", model=gpt2)
    (tmp_path / "n" / "detector.safetensors").replace(tmp_path / "f" / "detector.safetensors")
    with pytest.raises(DetectorError, match="sha256"):
        Detector.load(tmp_path / "f")
    with pytest.raises(ConfigError, match="context"):
        det.monitor(gpt2, "hello", max_new_tokens=10_000)
    with pytest.raises(DetectorError, match="not fitted"):
        Detector().score(gpt2, ["hello"])


# ----------------------------------------------------------------------------------------------- notebook


def test_notebook_runs():
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(REPO / "notebooks" / "05_detectors.ipynb", as_version=4)
    resources = {"metadata": {"path": str(REPO)}}
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3", resources=resources)
    client.execute()


# ----------------------------------------------------------------------------------------------- pairs, NaN (issues 11, 13)


def _paired_store(path, n_pairs=40, d=16, seed=0, field="country", nan_row=None):
    """Two examples per group (one negative, one positive) sharing a group vector; a weak planted signal."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n_pairs, d, generator=g) * 3
    u = torch.randn(d, generator=g)
    X = torch.cat([base + torch.randn(n_pairs, d, generator=g) + y * u for y in (0, 1)])
    y = torch.cat([torch.zeros(n_pairs), torch.ones(n_pairs)]).long()
    if nan_row is not None:
        X[nan_row, 0] = float("nan")
    examples = [{"id": i, "text": f"t{i}", "label": int(y[i]), field: f"g{i % n_pairs}"} for i in range(2 * n_pairs)]
    return ActivationStore.from_tensors(path, {HOOK: X}, examples=examples, example_id=torch.arange(2 * n_pairs))


@pytest.mark.parametrize("field", ["country", "pair_id"])
def test_fit_keeps_paired_examples_on_one_side_by_default(tmp_path, field):
    store = _paired_store(tmp_path / "s", field=field)
    det = Detector()
    rows = torch.arange(len(store))
    fit_rows, val_rows = det._val_split(store, rows)
    ex = store.examples()
    fit_g = {ex[int(e)][field] for e in store.example_ids()[fit_rows]}
    val_g = {ex[int(e)][field] for e in store.example_ids()[val_rows]}
    assert fit_g and val_g and not (fit_g & val_g)
    fitted = Detector.fit(store, "label", rows=rows, progress=False)
    assert fitted.provenance_["group"] == field
    # group=False: split by example, so some groups straddle the split
    fit_rows, val_rows = Detector(group=False)._val_split(store, rows)
    assert {ex[int(e)][field] for e in store.example_ids()[fit_rows]} & {
        ex[int(e)][field] for e in store.example_ids()[val_rows]}


def test_fit_warns_when_validation_auroc_is_below_chance(tmp_path):
    import warnings

    below = 0
    for seed in range(6):  # no signal at all: about half the seeds land below 0.5
        g = torch.Generator().manual_seed(seed)
        X, y = torch.randn(80, 8, generator=g), (torch.arange(80) % 2)
        store = ActivationStore.from_tensors(tmp_path / f"n{seed}", {HOOK: X}, y)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            det = Detector.fit(store, "label", rows=torch.arange(80), seed=seed, progress=False)
        auroc = det.metrics_["example"]["auroc"]
        warned = any("below chance" in str(w.message) for w in caught)
        assert warned == (auroc < 0.5)
        below += auroc < 0.5
    assert below >= 1


def test_fit_refuses_nan_activations_anywhere(tmp_path):
    for row in (0, 79):  # wherever the NaN row lands (fit or validation), the fit refuses it
        store = _paired_store(tmp_path / f"nan{row}", nan_row=row)
        with pytest.raises(DetectorError, match="NaN or infinite"):
            Detector.fit(store, "label", rows=torch.arange(80), progress=False)


def test_cli_detect_new_names_old_aliases_and_steered_monitor(gpt2, tiny_gpt2_path, tmp_path, capsys):
    from interp.cli import main
    from interp.directions import Direction

    store = _paired_store(tmp_path / "s", field="pair_id")
    for flag in ("--group-by", "--group"):
        out = tmp_path / flag.strip("-")
        assert main(["detect", "fit", str(store.path), "--out", str(out), flag, "pair_id", "--quiet", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["hook"] == HOOK
        assert Detector.load(out).provenance_.get("group") == "pair_id"
    assert main(["detect", "fit", str(store.path), "--out", str(tmp_path / "n"), "--group-by", "none", "--quiet"]) == 0
    assert Detector.load(tmp_path / "n").provenance_.get("group") is None
    capsys.readouterr()
    # monitor while steering: the per-token scores differ from the unsteered run
    _gpt2_detector(gpt2, threshold=0.0).save(tmp_path / "g")
    v = torch.randn(64, generator=torch.Generator().manual_seed(0))
    Direction(vector=v / v.norm(), hook="blocks.0.hook_out").save(tmp_path / "dir")
    base = ["detect", "monitor", str(tmp_path / "g"), "--model", str(tiny_gpt2_path), "--prompt", "The capital",
            "--max-new-tokens", "3", "--no-eos-stop", "--device", "cpu", "--json"]
    assert main(base) == 0
    plain = [json.loads(x) for x in capsys.readouterr().out.splitlines()][:-1]
    assert main([*base, "--steer", str(tmp_path / "dir"), "--alpha", "8"]) == 0
    pushed = [json.loads(x) for x in capsys.readouterr().out.splitlines()][:-1]
    assert len(plain) == len(pushed) == 3 and any(abs(a["score"] - b["score"]) > 1e-3 for a, b in zip(plain, pushed))
    assert main([*base, "--quiet"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1  # the summary only
