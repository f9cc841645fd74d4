"""Small, fully offline models for tests, notebooks and benchmarks.

``tiny_gpt2(path)`` writes a randomly initialised GPT-2 (``transformers.GPT2Config``) and a byte-level BPE
tokenizer trained on a built-in corpus to ``path``, so that it boots through exactly the loading code a user's
``gpt2`` takes: ``load_model(path)``. ``tiny_decoder(path, "llama")`` and ``tiny_decoder(path, "neox")`` do the
same for a Llama (RoPE, RMSNorm, grouped-query attention, gated MLP) and a GPT-NeoX (parallel attention and MLP,
partial rotary): the three attention/cache layouts decoder code must handle.
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


def _tokenizer(path: Path, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

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
    return tok


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
    return tiny_decoder(path, "gpt2", n_layer=n_layer, d_model=d_model, n_head=n_head, n_ctx=n_ctx,
                        vocab_size=vocab_size, seed=seed)


ARCHITECTURES = ("gpt2", "llama", "neox")


def tiny_decoder(
    path: str | Path,
    arch: str = "gpt2",
    n_layer: int = 2,
    d_model: int = 64,
    n_head: int = 4,
    n_ctx: int = 128,
    vocab_size: int = 512,
    seed: int = 0,
) -> Path:
    """Write a tiny random decoder of architecture ``arch`` (``"gpt2"``, ``"llama"`` or ``"neox"``) with its
    tokenizer to ``path`` (created if needed) and return the path."""
    import torch
    import transformers as tf

    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer(path, vocab_size)
    torch.manual_seed(seed)
    ids = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    if arch == "gpt2":
        cfg = tf.GPT2Config(n_layer=n_layer, n_embd=d_model, n_head=n_head, n_positions=n_ctx, **ids)
        model = tf.GPT2LMHeadModel(cfg)
    elif arch == "llama":
        cfg = tf.LlamaConfig(num_hidden_layers=n_layer, hidden_size=d_model, num_attention_heads=n_head,
                             num_key_value_heads=max(1, n_head // 2), intermediate_size=2 * d_model,
                             max_position_embeddings=n_ctx, tie_word_embeddings=False, **ids)
        model = tf.LlamaForCausalLM(cfg)
    else:
        cfg = tf.GPTNeoXConfig(num_hidden_layers=n_layer, hidden_size=d_model, num_attention_heads=n_head,
                               intermediate_size=4 * d_model, max_position_embeddings=n_ctx, rotary_pct=0.5,
                               use_parallel_residual=True, **ids)
        model = tf.GPTNeoXForCausalLM(cfg)
    model.eval().save_pretrained(path)
    (path / "interp_tiny.json").write_text(json.dumps({"made_by": f"interp.testing.tiny_decoder({arch!r})", "seed": seed}))
    return path
