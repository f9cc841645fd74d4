"""Device names: a device this machine lacks is a one-line error at every entry point, not a torch assertion."""

from __future__ import annotations

import pytest
import torch

from interp.devices import available_devices, resolve_device
from interp.errors import ConfigError

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")


def test_resolve_device_names():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert resolve_device(None, "cpu") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert available_devices()[0] == "cpu"
    with pytest.raises(ConfigError, match=r"unknown device 'gpu'; use one of cpu"):
        resolve_device("gpu")
    with pytest.raises(ConfigError, match="device type 'xpu' is not supported"):
        resolve_device("xpu")


@no_cuda
def test_cuda_without_a_gpu_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"device 'cuda' asked for, but this torch build has no CUDA .*device='cpu'"):
        resolve_device("cuda")
    with pytest.raises(ConfigError, match="'cuda:1' asked for"):
        resolve_device("cuda:1")


@no_cuda
def test_entry_points_refuse_a_missing_gpu_in_one_line(tmp_path, capsys):
    from interp.cli import main
    from interp.model import load_model
    from interp.nullspace import inlp
    from interp.probes.linear import LinearProbe, train_probes
    from interp.sae import SAE, train_topk_sae
    from interp.store import ActivationStore

    X = torch.randn(64, 8)
    y = torch.arange(64) % 2
    store = ActivationStore.from_tensors(tmp_path / "s", {"blocks.0.hook_out": X}, labels=y.tolist())
    calls = [
        lambda: load_model("minilm", device="cuda"),
        lambda: LinearProbe(device="cuda").fit(X, y),
        lambda: train_probes(store, "label", device="cuda", progress=False),
        lambda: inlp(store, "blocks.0.hook_out", "label", device="cuda", progress=False),
        lambda: SAE(8, 16, "topk", k=2, device="cuda"),
        lambda: train_topk_sae(store, 0, 16, 2, batch_size=32, n_steps=1, device="cuda", progress=False),
    ]
    for call in calls:
        with pytest.raises(ConfigError, match="asked for, but"):
            call()
    SAE(8, 16, "topk", k=2, hook_name="blocks.0.hook_out").save(tmp_path / "sae")
    assert main(["sae", "eval", str(tmp_path / "sae"), str(store.path), "--device", "cuda", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "device 'cuda' asked for" in err
