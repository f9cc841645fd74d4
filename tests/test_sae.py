"""interp.sae: SAELens/EleutherAI I/O against hand-written files, metrics against in-memory references, TopK
training on planted dictionaries, resume, the train-only latent ranking of ``compare``, the CLI, the notebook."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from interp.errors import ConfigError, HookError, InterpError, SAEError
from interp.comparisons import compare
from interp.sae import SAE, evaluate, train_topk_sae
from interp.store import ActivationStore

HOOK = "blocks.0.hook_out"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def one_thread():
    """Training on tiny matrices: one intra-op thread is as fast, and immune to OpenMP spin-waiting when other
    processes share the cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _randomize(sae: SAE, seed: int = 0) -> SAE:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g).to(p.dtype))
        if sae.threshold is not None:
            sae.threshold.copy_(torch.rand(sae.threshold.shape, generator=g).to(sae.dtype))
    return sae


def _write_saelens(path: Path, cfg: dict, tensors: dict) -> Path:
    path.mkdir(parents=True)
    (path / "cfg.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "sae_weights.safetensors"))
    return path


def _planted_dictionary(n=20000, d=32, n_atoms=64, k_true=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    atoms = torch.randn(n_atoms, d, generator=g)
    atoms /= atoms.norm(dim=1, keepdim=True)
    idx = torch.stack([torch.randperm(n_atoms, generator=g)[:k_true] for _ in range(n)])
    mags = torch.rand(n, k_true, generator=g) + 0.5
    X = (mags[..., None] * atoms[idx]).sum(1) + 0.01 * torch.randn(n, d, generator=g)
    return X, atoms


# ------------------------------------------------------------------------------------------------ I/O


@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu"])
def test_save_load_round_trip_is_exact(tmp_path, arch):
    sae = _randomize(
        SAE(24, 96, arch, k=5 if arch == "topk" else None, hook_name="blocks.2.hook_resid_post", model_name="gpt2")
    )
    sae.metadata["context_size"] = 128
    sae.save(tmp_path / "sae")
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["architecture"] == arch and cfg["d_in"] == 24 and cfg["d_sae"] == 96
    assert cfg["metadata"]["hook_name"] == "blocks.2.hook_resid_post" and cfg["metadata"]["model_name"] == "gpt2"
    assert cfg["apply_b_dec_to_input"] is True and cfg["normalize_activations"] == "none"
    assert ("k" in cfg) == (arch == "topk")
    # SAELens 6 treats a cfg without metadata.sae_lens_version >= 6 as pre-6 and drops the nested metadata
    assert cfg["metadata"]["sae_lens_version"] == "6.0.0"
    back = SAE.load(tmp_path / "sae")
    assert back.architecture == arch and back.k == sae.k and back.hook_name == sae.hook_name
    assert back.metadata["context_size"] == 128
    for name, t in sae.state_tensors().items():
        assert torch.equal(t, back.state_tensors()[name]), name
    x = torch.randn(7, 24)
    assert torch.equal(sae.encode(x), back.encode(x))


def test_round_trip_keeps_bfloat16(tmp_path):
    sae = _randomize(SAE(16, 32, "standard", dtype="bfloat16"))
    sae.save(tmp_path / "s")
    assert json.loads((tmp_path / "s" / "cfg.json").read_text())["dtype"] == "bfloat16"
    back = SAE.load(tmp_path / "s")
    assert back.dtype == torch.bfloat16 and torch.equal(back.W_enc, sae.W_enc)


def test_handwritten_saelens6_jumprelu_encodes_as_the_formula(tmp_path):
    g = torch.Generator().manual_seed(3)
    d_in, d_sae = 8, 20
    W_enc, W_dec = torch.randn(d_in, d_sae, generator=g), torch.randn(d_sae, d_in, generator=g)
    b_enc, b_dec = torch.randn(d_sae, generator=g), torch.randn(d_in, generator=g)
    threshold = torch.rand(d_sae, generator=g) * 0.5
    threshold[0] = -0.3  # a negative threshold: SAELens still applies ReLU
    cfg = {
        "architecture": "jumprelu", "d_in": d_in, "d_sae": d_sae, "dtype": "float32", "device": "cpu",
        "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
        "metadata": {"model_name": "gemma-2-2b", "hook_name": "blocks.5.hook_resid_post", "hook_head_index": None,
                     "prepend_bos": True, "context_size": 1024, "sae_lens_version": "6.5.1"},
    }  # fmt: skip
    path = _write_saelens(
        tmp_path / "j", cfg, {"W_enc": W_enc, "W_dec": W_dec, "b_enc": b_enc, "b_dec": b_dec, "threshold": threshold}
    )
    sae = SAE.load(path)
    assert (sae.architecture, sae.hook_name, sae.model_name) == ("jumprelu", "blocks.5.hook_resid_post", "gemma-2-2b")
    x = torch.randn(50, d_in, generator=g)
    pre = (x - b_dec) @ W_enc + b_enc
    want = torch.relu(pre) * (pre > threshold)
    torch.testing.assert_close(sae.encode(x), want)
    assert (sae.encode(x) != 0).any() and (sae.encode(x) == 0).any()
    torch.testing.assert_close(sae.decode(want), want @ W_dec + b_dec)
    torch.testing.assert_close(sae(x), want @ W_dec + b_dec)
    sae.save(tmp_path / "again")  # a SAELens 6 SAE keeps its version and metadata
    meta = json.loads((tmp_path / "again" / "cfg.json").read_text())["metadata"]
    assert meta["sae_lens_version"] == "6.5.1" and meta["context_size"] == 1024 and "source_sae_lens_version" not in meta


def test_handwritten_saelens6_topk_and_standard(tmp_path):
    g = torch.Generator().manual_seed(4)
    W_enc, W_dec = torch.randn(6, 30, generator=g), torch.randn(30, 6, generator=g)
    b_enc, b_dec = torch.randn(30, generator=g), torch.randn(6, generator=g)
    tensors = {"W_enc": W_enc, "W_dec": W_dec, "b_enc": b_enc, "b_dec": b_dec}
    base = {"d_in": 6, "d_sae": 30, "dtype": "float32", "normalize_activations": "none", "metadata": {"hook_name": "h"}}
    topk = SAE.load(_write_saelens(tmp_path / "t", {**base, "architecture": "topk", "k": 4,
                                                    "apply_b_dec_to_input": True}, tensors))  # fmt: skip
    std = SAE.load(_write_saelens(tmp_path / "s", {**base, "architecture": "standard",
                                                   "apply_b_dec_to_input": False}, tensors))  # fmt: skip
    x = torch.randn(40, 6, generator=g)
    pre = (x - b_dec) @ W_enc + b_enc
    vals, idx = torch.relu(pre).topk(4, dim=-1)
    want = torch.zeros_like(pre).scatter(-1, idx, vals)
    torch.testing.assert_close(topk.encode(x), want)
    assert ((topk.encode(x) != 0).sum(-1) <= 4).all()
    torch.testing.assert_close(std.encode(x), torch.relu(x @ W_enc + b_enc))  # no b_dec subtraction


def saelens_topk_rescaled(path: Path, d_in=8, d_sae=40, k=5, seed=7):
    """A TopK SAE as SAELens's TopK trainer saves it by default: ``rescale_acts_by_decoder_norm: true`` with
    decoder rows of any norm (here 0.05 to 20), and the reference computation SAELens does with that flag:
    pre-activations times the decoder norms before TopK (with ReLU), activations divided by them before
    decoding."""
    g = torch.Generator().manual_seed(seed)
    W_enc = torch.randn(d_in, d_sae, generator=g)
    W_dec = torch.randn(d_sae, d_in, generator=g)
    W_dec = W_dec / W_dec.norm(dim=1, keepdim=True) * torch.logspace(-1.3, 1.3, d_sae)[torch.randperm(d_sae, generator=g)][:, None]
    b_enc, b_dec = torch.randn(d_sae, generator=g), torch.randn(d_in, generator=g)
    cfg = {"architecture": "topk", "d_in": d_in, "d_sae": d_sae, "k": k, "dtype": "float32",
           "apply_b_dec_to_input": True, "normalize_activations": "none", "rescale_acts_by_decoder_norm": True,
           "metadata": {"hook_name": HOOK, "sae_lens_version": "6.54.12"}}
    _write_saelens(path, cfg, {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec})
    n = W_dec.double().norm(dim=1)

    def encode(x):
        pre = ((x.double() - b_dec.double()) @ W_enc.double() + b_enc.double()) * n
        vals, idx = pre.topk(k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, idx, vals.relu())

    def decode(f):
        return (f / n) @ W_dec.double() + b_dec.double()

    return encode, decode


def test_saelens_topk_with_rescale_acts_by_decoder_norm_is_folded_at_load(tmp_path):
    """Issue 11: interp refused SAELens's default TopK SAEs; the flag is folded into the weights at load."""
    encode, decode = saelens_topk_rescaled(tmp_path / "t")
    sae = SAE.load(tmp_path / "t")
    x = torch.randn(300, 8, generator=torch.Generator().manual_seed(1))
    f = sae.encode(x)
    want = encode(x)
    # the same latents fire (the flag changes which ones: without it the selection differs)
    assert torch.equal(f != 0, want != 0)
    torch.testing.assert_close(f.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae.decode(f).double(), decode(want), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae(x).double(), decode(want), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(40))
    assert "rescale_acts_by_decoder_norm" not in json.dumps(sae.cfg())  # folded: saved as a plain TopK SAE
    back = SAE.load(sae.save(tmp_path / "again"))
    torch.testing.assert_close(back.encode(x), f)


def test_rescale_acts_by_decoder_norm_on_other_architectures_is_refused(tmp_path):
    g = torch.Generator().manual_seed(0)
    t = {"W_enc": torch.randn(4, 6, generator=g), "b_enc": torch.zeros(6), "W_dec": torch.randn(6, 4, generator=g),
         "b_dec": torch.zeros(4)}
    cfg = {"architecture": "standard", "d_in": 4, "d_sae": 6, "rescale_acts_by_decoder_norm": True}
    with pytest.raises(SAEError, match="rescale_acts_by_decoder_norm=true on a standard SAE"):
        SAE.load(_write_saelens(tmp_path / "s", cfg, t))


def test_older_saelens_configs(tmp_path):
    g = torch.Generator().manual_seed(5)
    tensors = {"W_enc": torch.randn(6, 12, generator=g), "W_dec": torch.randn(12, 6, generator=g),
               "b_enc": torch.randn(12, generator=g), "b_dec": torch.randn(6, generator=g)}  # fmt: skip
    v5 = {"architecture": "standard", "d_in": 6, "d_sae": 12, "activation_fn_str": "topk",
          "activation_fn_kwargs": {"k": 3}, "hook_name": "blocks.1.hook_resid_post", "hook_layer": 1,
          "model_name": "gpt2", "apply_b_dec_to_input": True, "normalize_activations": "none", "dtype": "float32",
          "context_size": 128, "finetuning_scaling_factor": False}  # fmt: skip
    sae = SAE.load(_write_saelens(tmp_path / "v5", v5, tensors))
    assert (sae.architecture, sae.k, sae.hook_name, sae.model_name) == ("topk", 3, "blocks.1.hook_resid_post", "gpt2")
    x = torch.randn(9, 6, generator=g)
    assert ((sae.encode(x) > 0).sum(-1) <= 3).all()
    old = {"d_in": 6, "d_sae": 12, "hook_point": "blocks.2.hook_resid_pre", "hook_point_layer": 2,
           "model_name": "gpt2-small", "normalize_activations": False}  # fmt: skip
    sae = SAE.load(_write_saelens(tmp_path / "old", old, tensors))
    assert (sae.architecture, sae.hook_name, sae.apply_b_dec_to_input) == ("standard", "blocks.2.hook_resid_pre", True)
    # saving an old one writes the SAELens 6 layout
    sae.save(tmp_path / "old6")
    cfg = json.loads((tmp_path / "old6" / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == "blocks.2.hook_resid_pre" and "hook_point" not in cfg
    v3 = SAE.load(_write_saelens(tmp_path / "v3", {**old, "sae_lens_version": "3.2.0"}, tensors))
    v3.save(tmp_path / "v3to6")
    meta = json.loads((tmp_path / "v3to6" / "cfg.json").read_text())["metadata"]
    assert (meta["sae_lens_version"], meta["source_sae_lens_version"]) == ("6.0.0", "3.2.0")


def test_runtime_normalisations_match_saelens_formulas(tmp_path):
    g = torch.Generator().manual_seed(6)
    tensors = {"W_enc": torch.randn(5, 9, generator=g), "W_dec": torch.randn(9, 5, generator=g),
               "b_enc": torch.randn(9, generator=g), "b_dec": torch.randn(5, generator=g)}  # fmt: skip
    x = 3 * torch.randn(11, 5, generator=g) + 1
    W_enc, W_dec, b_enc, b_dec = tensors["W_enc"], tensors["W_dec"], tensors["b_enc"], tensors["b_dec"]
    cfg = {"architecture": "standard", "d_in": 5, "d_sae": 9, "apply_b_dec_to_input": True}
    cnr = SAE.load(_write_saelens(tmp_path / "c", {**cfg, "normalize_activations": "constant_norm_rescale"}, tensors))
    coeff = 5**0.5 / x.norm(dim=-1, keepdim=True)
    f = torch.relu((x * coeff - b_dec) @ W_enc + b_enc)
    torch.testing.assert_close(cnr.encode(x), f)
    torch.testing.assert_close(cnr(x), (f @ W_dec + b_dec) / coeff)
    ln = SAE.load(_write_saelens(tmp_path / "l", {**cfg, "normalize_activations": "layer_norm"}, tensors))
    mu, sd = x.mean(-1, keepdim=True), (x - x.mean(-1, keepdim=True)).std(-1, keepdim=True)
    f = torch.relu(((x - mu) / (sd + 1e-5) - b_dec) @ W_enc + b_enc)
    torch.testing.assert_close(ln.encode(x), f)
    torch.testing.assert_close(ln(x), (f @ W_dec + b_dec) * sd + mu)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_topk_sparse_decode_matches_the_dense_formula(dtype):
    sae = _randomize(SAE(24, 96, "topk", k=5, seed=0, dtype=dtype))
    x = torch.randn(50, 24)
    with torch.no_grad():
        x_hat, f = sae.reconstruct(x)  # decoder reads the k active rows only
    dense = f @ sae.W_dec.detach() + sae.b_dec.detach()
    tol = {"float32": 1e-5, "bfloat16": 2e-2}[dtype]
    torch.testing.assert_close(x_hat.float(), dense.float(), rtol=tol, atol=tol)
    assert ((f != 0).sum(-1) <= 5).all()
    x_grad, f_grad = sae.reconstruct(x)  # with autograd: the dense path
    assert torch.equal(f, f_grad.detach())
    torch.testing.assert_close(x_hat.float(), x_grad.detach().float(), rtol=tol, atol=tol)


def test_eleuther_sparsify_layout(tmp_path):
    g = torch.Generator().manual_seed(7)
    d_in, d_sae, k = 10, 40, 6
    enc_w, enc_b = torch.randn(d_sae, d_in, generator=g), torch.randn(d_sae, generator=g)
    W_dec, b_dec = torch.randn(d_sae, d_in, generator=g), torch.randn(d_in, generator=g)
    path = tmp_path / "sae-dir" / "layers.3"
    path.mkdir(parents=True)
    eai_cfg = {"expansion_factor": 4, "normalize_decoder": True, "num_latents": 0, "k": k, "multi_topk": False,
               "skip_connection": False, "d_in": d_in}  # fmt: skip
    (path / "cfg.json").write_text(json.dumps(eai_cfg))
    save_file({"encoder.weight": enc_w, "encoder.bias": enc_b, "W_dec": W_dec, "b_dec": b_dec},
              str(path / "sae.safetensors"))  # fmt: skip
    sae = SAE.load(path)
    assert (sae.architecture, sae.d_in, sae.d_sae, sae.k) == ("topk", d_in, d_sae, k)
    assert sae.hook_name == "blocks.3.hook_resid_post"
    x = torch.randn(30, d_in, generator=g)
    acts = torch.relu(torch.nn.functional.linear(x - b_dec, enc_w, enc_b))
    top_acts, top_idx = acts.topk(k, dim=-1)
    want = torch.zeros(30, d_sae).scatter(-1, top_idx, top_acts)
    torch.testing.assert_close(sae.encode(x), want)
    torch.testing.assert_close(sae.decode(want), want @ W_dec + b_dec)
    sae.save(tmp_path / "as-saelens")  # converted to the SAELens layout
    torch.testing.assert_close(SAE.load(tmp_path / "as-saelens").encode(x), want)
    (path / "cfg.json").write_text(json.dumps({**eai_cfg, "activation": "groupmax"}))
    with pytest.raises(SAEError, match="activation='groupmax' is not supported"):
        SAE.load(path)


def test_bad_files_give_clear_errors(tmp_path):
    sae = _randomize(SAE(8, 16, "jumprelu"))
    sae.save(tmp_path / "ok")
    # corrupt weights: garbage bytes, then a truncated file
    shutil.copytree(tmp_path / "ok", tmp_path / "garbage")
    (tmp_path / "garbage" / "sae_weights.safetensors").write_bytes(b"\x00\x01not a safetensors file" * 10)
    with pytest.raises(SAEError, match="corrupt"):
        SAE.load(tmp_path / "garbage")
    shutil.copytree(tmp_path / "ok", tmp_path / "trunc")
    w = tmp_path / "trunc" / "sae_weights.safetensors"
    w.write_bytes(w.read_bytes()[:-50])
    with pytest.raises(SAEError, match="corrupt"):
        SAE.load(tmp_path / "trunc")
    # a weights file that lacks the threshold of a jumprelu SAE
    t = sae.state_tensors()
    t.pop("threshold")
    _write_saelens(tmp_path / "nothr", json.loads((tmp_path / "ok" / "cfg.json").read_text()), t)
    with pytest.raises(SAEError, match="threshold"):
        SAE.load(tmp_path / "nothr")
    # cfg disagreeing with the weights, NaN weights, unsupported settings, broken JSON
    cfg = json.loads((tmp_path / "ok" / "cfg.json").read_text())
    _write_saelens(tmp_path / "din", {**cfg, "d_in": 9}, sae.state_tensors())
    with pytest.raises(SAEError, match="d_in=9"):
        SAE.load(tmp_path / "din")
    bad = sae.state_tensors()
    bad["W_dec"][0, 0] = float("nan")
    _write_saelens(tmp_path / "nan", cfg, bad)
    with pytest.raises(SAEError, match="non-finite"):
        SAE.load(tmp_path / "nan")
    _write_saelens(tmp_path / "norm", {**cfg, "normalize_activations": "whiten_everything"}, sae.state_tensors())
    with pytest.raises(SAEError, match="normalize_activations"):
        SAE.load(tmp_path / "norm")
    _write_saelens(tmp_path / "gated", {**cfg, "architecture": "gated"}, sae.state_tensors())
    with pytest.raises(SAEError, match="gated"):
        SAE.load(tmp_path / "gated")
    _write_saelens(tmp_path / "json", cfg, sae.state_tensors())
    (tmp_path / "json" / "cfg.json").write_text("{not json")
    with pytest.raises(SAEError, match="JSON"):
        SAE.load(tmp_path / "json")
    with pytest.raises(SAEError, match="no SAE directory"):
        SAE.load(tmp_path / "missing")
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(SAEError, match="sae_weights.safetensors"):
        SAE.load(tmp_path / "noweights")
    for err in (SAEError("x"),):  # one-line messages, catchable as InterpError
        assert isinstance(err, InterpError)


# ------------------------------------------------------------------------------------------------ stores


def test_store_mismatches_are_clear(tmp_path):
    acts = {HOOK: torch.randn(64, 12), "blocks.1.hook_out": torch.randn(64, 12)}
    store = ActivationStore.from_tensors(tmp_path / "s", acts)
    with pytest.raises(SAEError, match="d_in=8 does not match"):
        evaluate(SAE(8, 16, "topk", k=2, hook_name=HOOK), store, progress=False)
    with pytest.raises(HookError, match="blocks.7.hook_out"):
        evaluate(SAE(12, 16, "topk", k=2), store, "blocks.7.hook_out", progress=False)
    with pytest.raises(HookError, match="lacks"):
        evaluate(SAE(12, 16, "topk", k=2, hook_name="blocks.5.hook_resid_post"), store, progress=False)
    with pytest.raises(HookError, match="pass hook"):
        evaluate(SAE(12, 16, "topk", k=2), store, progress=False)  # no hook_name, two hooks in the store
    with pytest.raises(HookError):
        train_topk_sae(store, "blocks.9.hook_out", 16, 2, batch_size=16, n_steps=1, progress=False)
    with pytest.raises(SAEError, match="width"):
        SAE(8, 16, "standard").encode(torch.randn(3, 12))
    # an alias of the stored hook is accepted
    m = evaluate(_randomize(SAE(12, 16, "standard", hook_name="blocks.1.hook_resid_post")), store, progress=False)
    assert m.hook == "blocks.1.hook_out"


def test_metrics_match_an_in_memory_reference(tmp_path):
    g = torch.Generator().manual_seed(8)
    X = torch.randn(1000, 16, generator=g) * torch.linspace(0.2, 3, 16) + 2
    store = ActivationStore.from_tensors(tmp_path / "s", {HOOK: X}, shard_bytes=10_000)  # several shards
    assert len(store.manifest["shards"]) > 3
    sae = _randomize(SAE(16, 64, "topk", k=5, hook_name=HOOK), seed=2)
    with torch.no_grad():
        sae.b_enc[:10] = -100.0  # ten latents that never fire
    m = evaluate(sae, store, batch_size=97, progress=False)  # batches that straddle shards
    with torch.no_grad():
        x_hat, f = sae.reconstruct(X)
    err = (x_hat - X).pow(2)
    assert m.n_rows == 1000
    assert m.mse == pytest.approx(float(err.mean()), rel=1e-5)
    assert m.fve == pytest.approx(float(1 - err.sum() / (X - X.mean(0)).pow(2).sum()), rel=1e-5)
    assert m.l0 == pytest.approx(float((f != 0).sum(-1).float().mean()), rel=1e-6)
    assert m.n_dead == int(((f != 0).sum(0) == 0).sum()) >= 10
    torch.testing.assert_close(m.firing_frequency, (f != 0).float().mean(0))
    assert m.plot().data  # a figure


def test_iter_encode_streams_every_row_once(tmp_path):
    X = torch.randn(300, 8)
    store = ActivationStore.from_tensors(tmp_path / "s", {HOOK: X}, dtype="float16", shard_bytes=1000)
    sae = _randomize(SAE(8, 20, "standard", hook_name=HOOK))
    rows, acts = [], []
    for r, f in sae.iter_encode(store, batch_size=64, progress=False):
        assert torch.is_grad_enabled() and not f.requires_grad  # no_grad does not leak into the caller's loop
        rows.append(r)
        acts.append(f)
    assert torch.equal(torch.cat(rows), torch.arange(300))
    with pytest.raises(SAEError, match="d_in=9"):
        SAE(9, 20, "standard").iter_encode(store)  # checked before the first batch
    torch.testing.assert_close(torch.cat(acts), sae.encode(X.half().float()))


# ------------------------------------------------------------------------------------------------ training


def test_topk_training_recovers_planted_atoms(tmp_path, one_thread):
    X, atoms = _planted_dictionary()
    store = ActivationStore.from_tensors(tmp_path / "s", {HOOK: X})
    sae = train_topk_sae(store, HOOK, d_sae=128, k=4, n_steps=1000, batch_size=256, lr=3e-3, seed=0, progress=False)
    cos = (atoms @ sae.W_dec.detach().T).max(dim=1).values
    assert cos.mean() > 0.9, cos
    m = evaluate(sae, store, progress=False)
    assert m.fve > 0.9 and m.l0 <= 4
    assert sae.hook_name == HOOK and sae.architecture == "topk"
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(128))


def test_checkpoints_and_bit_exact_resume(tmp_path, one_thread):
    X, _ = _planted_dictionary(n=4000, d=16, n_atoms=32)
    store = ActivationStore.from_tensors(tmp_path / "s", {HOOK: X})
    kw = dict(n_steps=40, batch_size=128, lr=3e-3, seed=3, checkpoint_every=10, keep_checkpoints=None,
              dead_after_tokens=512, progress=False)  # fmt: skip
    full = train_topk_sae(store, HOOK, 64, 3, out_dir=tmp_path / "a", **kw)
    ck = sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir())
    assert ck == ["step_000010", "step_000020", "step_000030"]
    step20 = tmp_path / "a" / "checkpoints" / "step_000020"
    assert {p.name for p in step20.iterdir()} == {"cfg.json", "sae_weights.safetensors", "training_state.json",
                                                   "optimizer.safetensors"}  # fmt: skip
    assert SAE.load(step20).d_sae == 64  # checkpoints are SAEs in the SAELens layout
    # an interrupted run: only the step-20 checkpoint survived
    shutil.copytree(step20, tmp_path / "b" / "checkpoints" / "step_000020")
    resumed = train_topk_sae(store, HOOK, 64, 3, out_dir=tmp_path / "b", resume=True, **kw)
    for name, t in full.state_tensors().items():
        assert torch.equal(t, resumed.state_tensors()[name]), name
    assert full.history_ == resumed.history_
    assert torch.equal(SAE.load(tmp_path / "b").W_dec, full.W_dec)
    with pytest.raises(SAEError, match="resume"):
        train_topk_sae(store, HOOK, 64, 3, out_dir=tmp_path / "a", **kw)
    with pytest.raises(SAEError, match="other settings"):
        train_topk_sae(store, HOOK, 64, 3, out_dir=tmp_path / "b", resume=True, **{**kw, "lr": 1e-3, "n_steps": 50})
    # resuming a finished run returns it
    again = train_topk_sae(store, HOOK, 64, 3, out_dir=tmp_path / "a", resume=True, **kw)
    assert torch.equal(again.W_enc, full.W_enc)
    with pytest.raises(ConfigError, match="batch"):
        train_topk_sae(store, HOOK, 64, 3, batch_size=10_000, n_steps=1, progress=False)


def test_auxk_gives_dead_latents_a_gradient():
    from interp.sae import _train_step

    X, _ = _planted_dictionary(n=512, d=16, n_atoms=24, k_true=2, seed=2)
    cfg = {"k": 2, "dead_after_tokens": 1000, "aux_k": 8}
    dead = torch.tensor([3, 7, 11])

    def run(aux_coef):
        sae = SAE(16, 32, "topk", k=2, seed=0)
        with torch.no_grad():  # dead latents: positive pre-activations, but never in the top k
            sae.b_enc.fill_(20.0)
            sae.b_enc[dead] = 5.0
        before = {n: t.clone() for n, t in sae.state_tensors().items()}
        opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
        since = torch.zeros(32, dtype=torch.int64)
        since[dead] = 5000
        _, aux, n_dead = _train_step(sae, opt, X, since, {**cfg, "aux_coef": aux_coef}, 1e-2)
        assert n_dead == 3 and (since[dead] == 5000 + 512).all()  # still dead, counters advanced
        assert (since[torch.tensor([i for i in range(32) if i not in dead.tolist()])] <= 512).all()
        return aux, {n: (sae.state_tensors()[n] - before[n]).abs() for n in before}

    aux, moved = run(1 / 32)
    assert aux > 0
    assert (moved["W_enc"][:, dead].sum(0) > 0).all() and (moved["W_dec"][dead].sum(1) > 0).all()
    aux, moved = run(0.0)
    assert aux == 0.0
    assert (moved["W_enc"][:, dead] == 0).all() and (moved["W_dec"][dead] == 0).all()


# ------------------------------------------------------------------------------------------------ compare


def _identity_sae(d: int, hook: str | None = HOOK) -> SAE:
    """latent i = relu(x_i): every latent's meaning is known."""
    sae = SAE(d, d, "standard", apply_b_dec_to_input=False, hook_name=hook)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(d))
        sae.W_dec.copy_(torch.eye(d))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def _planted_concept_store(path, n=800, d=32, seed=0):
    """Latent 0 predicts the label everywhere, latent 3 weakly, latent 5 only on test rows."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    is_test = torch.arange(n) >= int(0.75 * n)
    X = 0.5 * torch.randn(n, d, generator=g)
    X[:, 0] += 1.5 * y
    X[:, 3] += 0.6 * y
    X[:, 5] = torch.where(is_test, 8.0 * y + 0.1, torch.zeros(n))
    examples = [
        {"id": i, "label": ["no", "yes"][int(y[i])], "split": "test" if is_test[i] else "train"} for i in range(n)
    ]
    return ActivationStore.from_tensors(path, {HOOK: X}, examples=examples), X, y, is_test


def test_compare_ranks_latents_on_training_rows_only(tmp_path, one_thread):
    store, X, y, is_test = _planted_concept_store(tmp_path / "s")
    sae = _identity_sae(32)
    res = compare(store, None, "label", sae, progress=False)
    f = torch.relu(X)
    train = ~is_test
    gap_train = f[train & (y == 1)].mean(0) - f[train & (y == 0)].mean(0)
    gap_all = f[y == 1].mean(0) - f[y == 0].mean(0)
    assert int(gap_all.abs().argmax()) == 5  # ranking on all rows would pick the test-only latent
    torch.testing.assert_close(res.gap, gap_train)
    assert res.ranking[:2].tolist() == [0, 3]
    assert res.best_latent == 0
    assert res.gap[5] == 0 and 5 not in res.ranking[:16].tolist()
    t = res.table.set_index("method")
    assert list(t.index) == ["dense probe", "diff-in-means", "best SAE latent"] + [
        f"sparse probe k={k}" for k in (1, 2, 4, 8, 16)
    ]
    assert t.loc["sparse probe k=2", "latents"] == [0, 3] and t.loc["best SAE latent", "latents"] == [0]
    for k in (1, 2, 4, 8, 16):
        assert 5 not in t.loc[f"sparse probe k={k}", "latents"]
    # the dense probe sees the test-only feature's weight as ~0 and the concept through latent 0
    assert t.loc["dense probe", "auroc"] > 0.9 and t.loc["diff-in-means", "auroc"] > 0.9
    assert t.loc["sparse probe k=1", "auroc"] == pytest.approx(t.loc["best SAE latent", "auroc"], abs=1e-6)
    assert ((t["accuracy"] > 0.5) & (t["accuracy"] <= 1)).all()
    assert res.provenance["positive_class"] == "yes" and res.provenance["n_test"] == 200
    fig = res.plot()
    assert len(fig.data) == 2 and list(fig.data[0].x) == list(res.table["method"])
    res.save(tmp_path / "cmp")
    back = type(res).load(tmp_path / "cmp")
    assert torch.equal(back.ranking, res.ranking) and back.table["auroc"].tolist() == res.table["auroc"].tolist()
    assert "sparse probe k=16" in str(res)


def test_compare_errors(tmp_path):
    store, X, y, _ = _planted_concept_store(tmp_path / "s", n=200, d=8)
    with pytest.raises(SAEError, match="does not match"):
        compare(store, None, "label", _identity_sae(16), progress=False)
    with pytest.raises(HookError):
        compare(store, "blocks.4.hook_out", "label", _identity_sae(8), progress=False)
    with pytest.raises(InterpError, match="colour"):
        compare(store, None, "colour", _identity_sae(8), progress=False)
    multi = ActivationStore.from_tensors(tmp_path / "m", {HOOK: torch.randn(90, 8)}, [0, 1, 2] * 30)
    with pytest.raises(InterpError, match="binary"):
        compare(multi, None, "label", _identity_sae(8), progress=False)


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_train_eval_compare(tmp_path, one_thread, capsys):
    from interp.cli import main

    X, _ = _planted_dictionary(n=3000, d=16, n_atoms=24, k_true=2)
    y = (X[:, 0] > 0).long()
    store = ActivationStore.from_tensors(tmp_path / "s", {"blocks.1.hook_out": X}, y)
    out = tmp_path / "sae"
    argv = ["sae", "train", str(store.path), "--hook", "blocks.1.hook_resid_post", "--d-sae", "48", "--k", "3",
            "--out", str(out), "--steps", "30", "--batch-size", "200", "--checkpoint-every", "10",
            "--quiet"]  # fmt: skip
    assert main(argv) == 0
    assert (out / "cfg.json").exists() and (out / "sae_weights.safetensors").exists()
    assert (out / "checkpoints" / "step_000020" / "optimizer.safetensors").exists()
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["k"] == 3 and cfg["metadata"]["hook_name"] == "blocks.1.hook_out"
    assert main(argv) == 2  # exists: asks for --resume
    assert "--resume" in capsys.readouterr().err
    assert main(argv + ["--resume"]) == 0
    capsys.readouterr()
    assert main(["sae", "eval", str(out), str(store.path), "--json", "--quiet"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    ref = evaluate(SAE.load(out), store, progress=False)
    assert metrics["fve"] == pytest.approx(ref.fve) and metrics["n_rows"] == 3000
    html = tmp_path / "cmp.html"
    rc = main(["sae", "compare", str(out), str(store.path), "--label", "label", "--ks", "1,4", "--out",
               str(tmp_path / "cmp"), "--html", str(html), "--quiet"])  # fmt: skip
    assert rc == 0
    text = capsys.readouterr().out
    assert "sparse probe k=4" in text and "dense probe" in text and html.exists()
    assert (tmp_path / "cmp" / "comparison.json").exists()
    assert main(["sae", "eval", str(out), str(store.path), "--hook", "blocks.6.hook_out"]) == 2
    assert "blocks.6.hook_out" in capsys.readouterr().err


def test_comparison_save_load_round_trip(tmp_path):
    from interp.comparisons import SAEComparison

    X = torch.randn(600, 12, generator=torch.Generator().manual_seed(5))
    store = ActivationStore.from_tensors(tmp_path / "s", {"blocks.1.hook_out": X}, labels=(torch.arange(600) % 2).tolist())
    result = compare(store, None, "label", _randomize(SAE(12, 24, "topk", k=3, hook_name="blocks.1.hook_out")),
                     ks=(1, 2), progress=False)  # fmt: skip
    back = SAEComparison.load(result.save(tmp_path / "cmp"))
    assert back.best_latent == result.best_latent and back.provenance == json.loads(json.dumps(result.provenance))
    assert torch.equal(back.gap, result.gap) and torch.equal(back.ranking, result.ranking)
    assert back.table.drop(columns="latents").equals(result.table.drop(columns="latents"))
    (tmp_path / "cmp" / "latents.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(SAEError, match="latents.safetensors is damaged"):
        SAEComparison.load(tmp_path / "cmp")


# ------------------------------------------------------------------------------------------------ top activations


def test_top_activations_are_the_largest_over_the_whole_store(tmp_path):
    from interp.sae import top_activations

    g = torch.Generator().manual_seed(11)
    X = torch.randn(5000, 16, generator=g)
    store = ActivationStore.from_tensors(tmp_path / "s", {"blocks.1.hook_out": X}, labels=(torch.arange(5000) % 2).tolist())
    sae = _randomize(SAE(16, 40, "standard", hook_name="blocks.1.hook_out"))
    with torch.no_grad():  # latent 7 fires on 5 rows only: shift its bias down to its 6th-largest pre-activation
        sae.b_enc[7] -= sae.encode_pre(X)[:, 7].topk(6).values[-1]
    f = sae.encode(X)
    rare = int((f[:, 7] > 0).sum())
    assert rare == 5
    table = top_activations(store, sae, [3, 7], n=10, batch_size=700, progress=False)  # 8 batches
    for latent, want_n in ((3, 10), (7, rare)):
        part = table[table.latent == latent]
        ref = f[:, latent].topk(want_n)
        assert list(part["rank"]) == list(range(want_n))
        assert sorted(part["row"]) == sorted(ref.indices.tolist())
        torch.testing.assert_close(torch.tensor(part["activation"].tolist()), ref.values, rtol=1e-5, atol=1e-5)
    assert (table["activation"] > 0).all() and set(table["label"]) <= {0, 1}
    assert {"example_id", "position", "token_id", "text"} <= set(table.columns)
    with pytest.raises(ConfigError, match=r"latents \[40\] are outside 0..39"):
        top_activations(store, sae, 40, progress=False)
    with pytest.raises(ConfigError, match="latents must be integer latent ids"):
        top_activations(store, sae, [1.5], progress=False)
    same = top_activations(store, sae, torch.tensor([3, 7]), n=10, progress=False)  # a tensor of ids works too
    assert same.drop(columns="activation").equals(table.drop(columns="activation"))


def test_top_activations_name_tokens_with_the_store_models_tokenizer(gpt2, tiny_gpt2_path, tmp_path, capsys):
    from transformers import AutoTokenizer

    from interp.capture import capture
    from interp.cli import main
    from interp.sae import top_activations

    texts = ["the cat sat on the mat", "a dog ran in the park today", "once upon a time"]
    store = capture(gpt2, texts, ["blocks.1.hook_resid_post"], "all", tmp_path / "cap", progress=False)
    sae = _randomize(SAE(64, 32, "topk", k=4, hook_name="blocks.1.hook_out"))
    fired = (sae.encode(store.activations("blocks.1.hook_out", torch.arange(len(store)))) > 0).any(0)
    latents = fired.nonzero().flatten()[:2].tolist()
    table = top_activations(store, sae, latents, n=3, progress=False)
    tok = AutoTokenizer.from_pretrained(str(tiny_gpt2_path))
    assert len(table) > 0 and list(table["token"]) == [tok.convert_ids_to_tokens(int(t)) for t in table["token_id"]]
    assert set(table["text"]) <= set(texts)
    assert "token" not in top_activations(store, sae, latents[0], n=2, tokenizer=None, progress=False).columns
    sae.save(tmp_path / "sae")
    argv = ["sae", "top", str(tmp_path / "sae"), str(store.path), "--latent", str(latents[0]), "-n", "2", "--json"]
    assert main([*argv, "--quiet"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["rank"] for r in rows] == [0, 1] and all(r["latent"] == latents[0] for r in rows)


# ------------------------------------------------------------------------------------------------ notebook


@pytest.mark.slow
def test_notebook_runs(monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")  # the kernel's OpenMP threads sleep instead of spinning
    nb = nbformat.read(REPO / "notebooks" / "04_sae_vs_probes.ipynb", as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "sparse probe k=16" in outputs and "steering comparison at blocks.6.hook_out" in outputs
