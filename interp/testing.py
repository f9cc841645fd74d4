"""Small, fully offline models for tests, notebooks and benchmarks.

``tiny_gpt2(path)`` writes a randomly initialised GPT-2 (``transformers.GPT2Config``) and a byte-level BPE
tokenizer trained on a built-in corpus to ``path``, so that it boots through exactly the loading code a user's
``gpt2`` takes: ``load_model(path)``.
"""

from __future__ import annotations

import json
from pathlib import Path

_CORPUS = [
    "The capital of France is Paris. The capital of Japan is Tokyo. The capital of Italy is Rome.",
    "Question: Did you finish the report? Answer: Yes, I sent it this morning.",
    "Honest answers help people trust each other; deceptive answers hide the truth.",
    "Marie Curie studied radioactivity in Paris and won two Nobel prizes.",
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the sun.",
    "Once upon a time a small model learned to count: one two three four five six seven eight nine ten.",
    "Steering vectors push a model's residual stream along a direction during generation.",
    "I love this movie, it is wonderful and happy. I hate that film, it is terrible and sad.",
]


def tiny_gpt2(
    path: str | Path,
    n_layer: int = 2,
    d_model: int = 64,
    n_head: int = 4,
    n_ctx: int = 128,
    vocab_size: int = 512,
    seed: int = 0,
) -> Path:
    """Write a tiny random GPT-2 with its tokenizer to ``path`` (created if needed) and return the path."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_CORPUS * 4, trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>"
    )
    tok.save_pretrained(path)
    torch.manual_seed(seed)
    cfg = GPT2Config(
        n_layer=n_layer,
        n_embd=d_model,
        n_head=n_head,
        n_positions=n_ctx,
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    GPT2LMHeadModel(cfg).eval().save_pretrained(path)
    (path / "interp_tiny.json").write_text(json.dumps({"made_by": "interp.testing.tiny_gpt2", "seed": seed}))
    return path
