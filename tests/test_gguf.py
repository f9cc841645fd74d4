"""GGUF models: the cached conversion reproduces transformers' own GGUF model, is made once, survives damage and
concurrent loads; bad GGUF files are one-line errors; a Hugging Face name records its cached revision.

The SmolLM2 conversion (~35 s) happens once, in one module-scoped temporary cache; a second one (the damaged cache
rebuilt by two processes at once) is the only other conversion.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from interp import gguf
from interp.errors import ModelLoadError

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["The capital of Japan is", "Once upon a time", "def fibonacci(n):"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A fresh INTERP_CACHE holding the SmolLM2 conversion, made with progress=False (its output is kept)."""
    root = tmp_path_factory.mktemp("interp-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("INTERP_CACHE", str(root))
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            directory, sha = gguf.converted_dir(gguf.smollm2_gguf(), progress=False)
        yield {"root": root, "dir": directory, "sha": sha, "output": out.getvalue() + err.getvalue()}


@pytest.fixture(scope="module")
def reference():
    """transformers' own model loaded from the GGUF file, and its tokenizer."""
    import transformers

    path = gguf.smollm2_gguf()
    tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval(), tok


def test_conversion_is_silent_with_progress_false_and_recorded(cache):
    assert cache["output"] == ""
    marker = gguf.check_dir(cache["dir"], verify=True)
    assert marker["gguf_sha256"] == cache["sha"] == gguf.file_sha256(gguf.smollm2_gguf())
    assert set(marker["weights"]) == {"model.safetensors"}
    assert "tokenizer.json" in marker["sha256"] and "config.json" in marker["sha256"]
    assert not list(cache["dir"].parent.glob(".*"))  # no temporary directory left behind


def test_cached_dir_reproduces_transformers_gguf_model(cache, reference, monkeypatch):
    import transformers

    from interp.model import load_model, model_identity, tokenize

    monkeypatch.setenv("INTERP_CACHE", str(cache["root"]))
    ref, ref_tok = reference
    saved = transformers.AutoModelForCausalLM.from_pretrained(cache["dir"], dtype=torch.float32).eval()
    bridge = load_model("smollm2", device="cpu", progress=False)
    ident = model_identity(bridge)
    assert ident["weights_hash"] == ident["gguf_sha256"] == cache["sha"]
    with torch.inference_mode():
        for prompt in PROMPTS:
            ids = ref_tok(prompt, return_tensors="pt")["input_ids"]
            want = ref(ids).logits
            assert torch.allclose(saved(ids).logits, want, atol=1e-4, rtol=0)
            toks = tokenize(bridge, [prompt])  # the bridge prepends BOS: compare on the same ids
            got = bridge(toks.input_ids)
            assert torch.allclose(got, ref(toks.input_ids).logits, atol=1e-4, rtol=0)


def test_second_load_does_not_convert(cache, monkeypatch):
    from interp.model import load_model

    monkeypatch.setenv("INTERP_CACHE", str(cache["root"]))

    def refuse(*args, **kwargs):
        raise AssertionError("converted a second time")

    monkeypatch.setattr(gguf, "_convert", refuse)
    before = (cache["dir"] / gguf.MARKER).stat().st_mtime_ns
    assert gguf.converted_dir(gguf.smollm2_gguf(), progress=False) == (cache["dir"], cache["sha"])
    model = load_model("SmolLM2-135M-Instruct", device="cpu", verify=True)
    assert int(model.cfg.n_layers) == 30 and int(model.cfg.d_model) == 576
    assert (cache["dir"] / gguf.MARKER).stat().st_mtime_ns == before


_LOADER = """
import sys
import interp.gguf as g
real = g._convert
def counted(*a, **k):
    print("CONVERTED", flush=True)
    return real(*a, **k)
g._convert = counted
from interp.model import load_model, model_identity
m = load_model("smollm2", device="cpu", progress=False)
print("SHA", model_identity(m)["weights_hash"], flush=True)
"""


def test_damaged_cache_rebuilt_by_two_processes_at_once(cache):
    weights = cache["dir"] / "model.safetensors"
    with open(weights, "r+b") as fh:  # one byte of the first weights flipped: the file keeps its size
        n = int.from_bytes(fh.read(8), "little")
        fh.seek(8 + n + 100)
        b = fh.read(1)
        fh.seek(8 + n + 100)
        fh.write(bytes([b[0] ^ 0xFF]))
    assert gguf.read_marker(cache["dir"]) is None
    env = {**os.environ, "INTERP_CACHE": str(cache["root"]), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", _LOADER], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
        assert f"SHA {cache['sha']}" in out
    assert sum(out.count("CONVERTED") for out, _ in outs) == 1  # one converts, the other waits and reuses
    gguf.check_dir(cache["dir"], verify=True)
    assert not list(cache["dir"].parent.glob(".*"))


# ----------------------------------------------------------------------------------------------- damage detection


def _fake_conversion(path: Path, mib: int = 3) -> Path:
    """A directory laid out like a conversion: a safetensors file larger than the sampled bytes, a config, a marker."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    save_file({"a": torch.randn(mib << 18, generator=g), "b": torch.randn(10, generator=g)}, path / "model.safetensors")
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    (path / gguf.MARKER).write_text(json.dumps({"gguf_sha256": "0" * 64, **gguf._record(path)}))
    return path


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        b = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([b[0] ^ 0x01]))


@pytest.mark.parametrize(
    "damage, found_cheaply",
    [
        ("truncate", True),
        ("header", True),
        ("first-data", True),
        ("last-data", True),
        ("middle-data", False),  # beyond the sampled bytes: only verify=True rehashes it
        ("config", True),
        ("marker", True),
        ("missing", True),
    ],
)
def test_damage_is_detected(tmp_path, damage, found_cheaply):
    d = _fake_conversion(tmp_path / "conv")
    w = d / "model.safetensors"
    size = w.stat().st_size
    header = int.from_bytes(w.read_bytes()[:8], "little")
    gguf.check_dir(d, verify=True)
    if damage == "truncate":
        os.truncate(w, size - 4)
    elif damage == "header":
        _flip(w, 8 + header // 2)
    elif damage == "first-data":
        _flip(w, 8 + header + 3)
    elif damage == "last-data":
        _flip(w, size - 2)
    elif damage == "middle-data":
        _flip(w, size // 2)
    elif damage == "config":
        (d / "config.json").write_text((d / "config.json").read_text().replace("8", "9"))
    elif damage == "marker":
        (d / gguf.MARKER).write_text("{")
    else:
        (d / "config.json").unlink()
    assert (gguf.read_marker(d) is None) == found_cheaply
    assert gguf.read_marker(d, verify=True) is None
    with pytest.raises(ValueError):
        gguf.check_dir(d, verify=True)


def test_safetensors_fingerprint_checks_the_header_against_the_size(tmp_path):
    d = _fake_conversion(tmp_path / "conv", mib=1)
    w = d / "model.safetensors"
    with open(w, "ab") as fh:  # extended: the header no longer accounts for every byte
        fh.write(b"\0" * 16)
    with pytest.raises(ValueError, match="header describes"):
        gguf.safetensors_fingerprint(w)
    w.write_bytes((1 << 40).to_bytes(8, "little") + b"{}")
    with pytest.raises(ValueError, match="header length"):
        gguf.safetensors_fingerprint(w)


# ----------------------------------------------------------------------------------------------- bad GGUF files


def _tiny_gguf(path: Path, arch: str) -> Path:
    import gguf as gg

    w = gg.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    return _finish(w, path)


def _finish(w, path: Path) -> Path:
    """Write a GGUFWriter's header, metadata and tensors to ``path``."""
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_unsupported_architecture_is_a_one_line_error(tmp_path, monkeypatch):
    from interp.model import load_model

    monkeypatch.setenv("INTERP_CACHE", str(tmp_path / "cache"))
    path = _tiny_gguf(tmp_path / "toy.gguf", "toyformer")
    with pytest.raises(ModelLoadError, match="'toyformer'") as e:
        load_model(str(path), device="cpu", progress=False)
    assert "\n" not in str(e.value) and "llama" in str(e.value)
    assert not [p for p in (tmp_path / "cache" / "models").iterdir() if p.is_dir()]  # nothing half-written


def test_truncated_gguf_is_a_one_line_error(tmp_path, monkeypatch):
    from interp.model import load_model

    monkeypatch.setenv("INTERP_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "cut.gguf"
    with open(gguf.smollm2_gguf(), "rb") as fh:
        path.write_bytes(fh.read(4096))
    with pytest.raises(ModelLoadError, match="cut.gguf is not a usable GGUF file") as e:
        load_model(str(path), device="cpu", progress=False)
    assert "\n" not in str(e.value)
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "absent.gguf"), device="cpu")


# ----------------------------------------------------------------------------------------------- Hugging Face names


def _fake_hub_cache(root: Path, model_dir: Path, repo: str, commit: str) -> None:
    """The layout huggingface_hub writes: blobs named by content, a snapshot of links, refs/main naming it."""
    base = root / ("models--" + repo.replace("/", "--"))
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    snap = base / "snapshots" / commit
    snap.mkdir(parents=True)
    (base / "blobs").mkdir()
    for f in model_dir.iterdir():
        blob = base / "blobs" / gguf.file_sha256(f)
        blob.write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))


def test_hf_name_records_cached_revision_and_weights_hash(tiny_gpt2_path, tmp_path):
    from interp.model import _weights_hash

    commit = "0123456789abcdef0123456789abcdef01234567"
    _fake_hub_cache(tmp_path / "hub", tiny_gpt2_path, "someone/tiny-gpt2", commit)
    script = ("from interp.model import load_model, model_identity; import json; "
              "print(json.dumps(model_identity(load_model('someone/tiny-gpt2', device='cpu'))))")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    ident = json.loads(run.stdout.strip().splitlines()[-1])
    assert ident["name"] == "someone/tiny-gpt2"
    assert ident["revision"] == commit
    assert ident["weights_hash"] == _weights_hash(tiny_gpt2_path)
    assert "snapshot" not in ident


def test_hf_cache_identity_of_an_uncached_name(tmp_path, monkeypatch):
    from interp.model import hf_cache_identity

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    assert hf_cache_identity("nobody/absent-model") == {}
    assert hf_cache_identity("not a valid repo id!!") == {}


# ----------------------------------------------------------------------------------------------- any GGUF file

_LLAMA_NAMES = [("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"),
                ("self_attn.o_proj", "attn_output"), ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"),
                ("mlp.down_proj", "ffn_down"), ("input_layernorm", "attn_norm"), ("post_attention_layernorm", "ffn_norm")]


def _tiny_llama_gguf(tmp: Path) -> Path:
    """The tiny random Llama of interp.testing written as a float32 GGUF (weights, hyperparameters, BPE tokenizer)."""
    import gguf as gg
    import transformers

    from interp.testing import tiny_decoder

    src = tiny_decoder(tmp / "src", "llama")
    model = transformers.AutoModelForCausalLM.from_pretrained(src)
    cfg, tok = model.config, transformers.AutoTokenizer.from_pretrained(src)
    bpe = json.loads((src / "tokenizer.json").read_text())["model"]
    tokens = sorted(bpe["vocab"], key=bpe["vocab"].get)
    path = tmp / "tiny-llama.gguf"
    w = gg.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]])
    w.add_token_types([1] * len(tokens))
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    for i in range(cfg.num_hidden_layers):
        names.update({f"model.layers.{i}.{a}.weight": f"blk.{i}.{b}.weight" for a, b in _LLAMA_NAMES})
    for k, v in model.state_dict().items():
        w.add_tensor(names[k], v.numpy().astype(np.float32))
    return _finish(w, path)


def test_any_gguf_file_loads_like_transformers_loads_it(tmp_path, monkeypatch):
    import transformers

    from interp.model import load_model, model_identity, tokenize

    monkeypatch.setenv("INTERP_CACHE", str(tmp_path / "cache"))
    path = _tiny_llama_gguf(tmp_path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    model = load_model(str(path), device="cpu", progress=False)
    ident = model_identity(model)
    assert ident["gguf_sha256"] == ident["weights_hash"] == gguf.file_sha256(path)
    assert ident["name"] == str(path.resolve()) and ident["architecture"] == "LlamaForCausalLM"
    with torch.inference_mode():
        for prompt in PROMPTS:
            ids = tokenize(model, [prompt]).input_ids
            torch.testing.assert_close(model(ids), ref(ids).logits, atol=1e-4, rtol=0)
    again = load_model(str(path), device="cpu", progress=False)
    assert model_identity(again)["path"] == ident["path"]
