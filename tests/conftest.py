"""Shared fixtures: the bundled default model and a tiny GPT-2 booted from a saved directory (offline)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from interp.testing import tiny_gpt2


@pytest.fixture(scope="session")
def minilm():
    """The bundled all-MiniLM-L6-v2 (6-layer BERT) as a TransformerBridge on CPU."""
    from interp.model import load_model

    return load_model("minilm", device="cpu")


@pytest.fixture(scope="session")
def tiny_gpt2_path(tmp_path_factory):
    """A directory holding a tiny random GPT-2 (2 layers, d_model 64) and its tokenizer."""
    return tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="session")
def gpt2(tiny_gpt2_path):
    """The tiny GPT-2 booted through load_model, as a user's gpt2 would be."""
    from interp.model import load_model

    return load_model(str(tiny_gpt2_path), device="cpu")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def smollm2():
    """The bundled chat decoder SmolLM2-135M-Instruct (converted once from its GGUF into the user cache)."""
    from interp.model import load_model

    return load_model("smollm2", device="cpu")
