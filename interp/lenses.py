"""What each layer predicts: the logit lens, the tuned lens, linear shortcuts and the linear future lens.

Every lens decodes a residual ``h`` (``blocks.{l}.hook_out``) through the model's own final norm and unembedding
(:class:`Head`): the logit lens decodes ``h`` as it is; the tuned lens first applies a per-layer affine translator
``A_l h + b_l`` trained so that the decoded distribution matches the model's final one; a linear shortcut maps
``h`` to the last layer's residual by least squares (closed form) and decodes that. All of them train and
evaluate from a store that holds the last layer's residual, so no new forward passes are needed: the final
distribution of a row is ``Head(h_last)``.

>>> model = load_model("smollm2")
>>> lens = train_tuned_lens("runs/smol", model)        # a store with every layer's resid_post
>>> lens_kl("runs/smol", model, lens)                  # per-layer KL to the final distribution, held out
>>> trajectory(model, "The capital of France is", lens).plot()
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from interp.artifacts import jsonable, load_json, load_tensors, save_tensors
from interp.errors import AnalysisError, ConfigError
from interp.stats import wilson_interval
from interp.store import ActivationStore, atomic_write_json, layer_of

TUNED_FORMAT = "interp.tuned_lens"
FORMAT_VERSION = 1

# ------------------------------------------------------------------------------------------------------ the head


class Head:
    """The model's final norm and unembedding: ``logits = unembed(norm(h))``, in float32.

    ``Head.from_model(model)`` wraps the model's own modules (so the last layer's residual decodes to exactly the
    model's logits); ``Head.from_matrix(W_U)`` is a plain linear readout (no norm), e.g. for synthetic models.
    """

    def __init__(self, unembed: Callable[[Tensor], Tensor], d_model: int, d_vocab: int,
                 norm: Callable[[Tensor], Tensor] | None = None, identity: Mapping[str, Any] | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", tokenizer: Any = None,
                 linear: tuple[Tensor, Tensor | None] | None = None):
        self.unembed, self.norm, self.linear = unembed, norm, linear
        self.d_model, self.d_vocab = int(d_model), int(d_vocab)
        self.identity = dict(identity or {})
        self.dtype, self.device, self.tokenizer = dtype, torch.device(device), tokenizer

    @classmethod
    def from_model(cls, model) -> Head:
        from interp.model import is_encoder, model_device, model_identity

        if is_encoder(model) or not hasattr(model, "unembed") or not hasattr(model, "ln_final"):
            raise ConfigError(
                f"model {model_identity(model)['name']!r} has no unembedding (an encoder): lenses decode through a "
                "decoder's final norm and unembedding; load a causal LM such as 'smollm2'"
            )
        dtype = next(model.parameters()).dtype
        inner = getattr(model.unembed, "_original_component", None)
        linear = (inner.weight, inner.bias) if isinstance(inner, torch.nn.Linear) else None
        return cls(model.unembed, int(model.cfg.d_model), int(model.cfg.d_vocab), norm=model.ln_final,
                   identity=model_identity(model), dtype=dtype, device=model_device(model), tokenizer=model.tokenizer,
                   linear=linear)

    @classmethod
    def from_matrix(cls, W_U: Float[Tensor, "d_model d_vocab"], b_U: Float[Tensor, " d_vocab"] | None = None) -> Head:
        W = torch.as_tensor(W_U, dtype=torch.float32)
        b = torch.zeros(W.shape[1]) if b_U is None else torch.as_tensor(b_U, dtype=torch.float32)
        return cls(lambda h: h @ W + b, W.shape[0], W.shape[1], identity={"name": "linear head",
                   "d_model": W.shape[0]}, linear=(W.T, b))

    def cast(self, dtype: torch.dtype) -> Head:
        """The same head with its unembedding matrix multiply in ``dtype`` (the norm stays in the model's dtype):
        ``bfloat16`` runs several times faster where the hardware supports it. Itself when the unembedding is not a
        plain linear map."""
        if self.linear is None or dtype == self.dtype:
            return self
        W = self.linear[0].detach().to(dtype)
        b = None if self.linear[1] is None else self.linear[1].detach().to(dtype)
        return Head(lambda x: F.linear(x.to(dtype), W, b), self.d_model, self.d_vocab, self.norm, self.identity,
                    self.dtype, self.device, self.tokenizer)

    def parameters(self) -> list[Tensor]:
        """The model parameters the head uses (frozen while a tuned lens trains)."""
        return [p for m in (self.norm, self.unembed) if isinstance(m, torch.nn.Module) for p in m.parameters()]

    def __call__(self, h: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_vocab"]:
        x = h.to(self.device, self.dtype)
        if self.norm is not None:
            x = self.norm(x)
        return self.unembed(x).float()


def as_head(model_or_head) -> Head:
    return model_or_head if isinstance(model_or_head, Head) else Head.from_model(model_or_head)


def kl_to_final(final_logits: Float[Tensor, "n v"], logits: Float[Tensor, "n v"]) -> Float[Tensor, " n"]:
    """``KL(p_final || p_lens)`` per row, in nats."""
    lp_f = F.log_softmax(final_logits.float(), -1)
    lp = F.log_softmax(logits.float(), -1)
    return (lp_f.exp() * (lp_f - lp)).sum(-1)


def entropy(logits: Float[Tensor, "n v"]) -> Float[Tensor, " n"]:
    """Entropy of ``softmax(logits)`` per row, in nats."""
    lp = F.log_softmax(logits.float(), -1)
    return -(lp.exp() * lp).sum(-1)


def token_rank(logits: Float[Tensor, "n v"], target: Int[Tensor, " n"]) -> Int[Tensor, " n"]:
    """Rank of each row's target token (0 = the top token)."""
    t = torch.as_tensor(target, dtype=torch.int64, device=logits.device).reshape(-1, 1)
    return (logits > logits.gather(-1, t)).sum(-1)


# ------------------------------------------------------------------------------------------------------ the store side


def residual_layers(store: ActivationStore) -> dict[int, str]:
    """``{layer: hook}`` of the store's residual-stream hooks (``blocks.{l}.hook_out``)."""
    return {int(layer_of(h)): h for h in store.hooks if h.endswith(".hook_out") and h.count(".") == 2
            and layer_of(h) is not None}


def check_store(store: ActivationStore | str | os.PathLike, head: Head, need_all: bool = False) -> ActivationStore:
    """Open ``store`` and check it can feed a lens of ``head``'s model: same model, the last layer's residual, and
    real token positions (``need_all``: every position)."""
    store = store if isinstance(store, ActivationStore) else ActivationStore(store)
    info, ident = store.model_info, head.identity
    n_layers = ident.get("n_layers") or info.get("n_layers")
    if int(info.get("d_model") or store.d_model) != head.d_model:
        raise ConfigError(f"store {store.path} has d_model {store.d_model} but the model has {head.d_model}: "
                          "give the model the store was captured from")
    for key in ("weights_hash", "n_layers"):
        if info.get(key) and ident.get(key) and info[key] != ident[key]:
            raise ConfigError(f"store {store.path} was captured from {info.get('name')!r} ({key} {info[key]}), not "
                              f"from {ident.get('name')!r} ({ident[key]}); give the model the store was captured from")
    layers = residual_layers(store)
    if n_layers is None or int(n_layers) - 1 not in layers:
        last = f"blocks.{(n_layers or 0) - 1}.hook_out"
        raise ConfigError(f"store {store.path} lacks the last layer's residual ({last}), "
                          "which gives the final distribution; capture it with hooks='resid_post'")
    if store.positions == "mean" or need_all and store.positions != "all":
        want = "positions='all'" if need_all else "token positions ('all' or 'last'), not 'mean'"
        raise ConfigError(f"store {store.path} was captured with positions={store.positions!r}; this needs {want}: "
                          "capture again")
    return store


def _layers_of(store: ActivationStore, head: Head, layers: Sequence[int] | None, last: bool = True) -> list[int]:
    have = residual_layers(store)
    n = int(head.identity.get("n_layers") or store.model_info["n_layers"])
    want = sorted(have) if layers is None else [int(x) % n for x in layers]
    missing = [x for x in want if x not in have]
    if missing:
        raise ConfigError(f"layers {missing} are not in store {store.path} (it has {sorted(have)}); capture them")
    return [x for x in want if last or x != n - 1]


def _split(store: ActivationStore, rows, test_size: float, seed: int, max_rows: int | None) -> tuple[Tensor, Tensor]:
    if rows is not None:
        r = torch.as_tensor(rows, dtype=torch.int64)
        return r, r
    train, test = store.train_test_split(test_size=test_size, seed=seed)
    if max_rows is not None:
        g = torch.Generator().manual_seed(seed)
        train = train[torch.randperm(train.numel(), generator=g)[:max_rows]].sort().values
        test = test[torch.randperm(test.numel(), generator=g)[:max_rows]].sort().values
    return train, test


# ------------------------------------------------------------------------------------------------------ the tuned lens


@dataclass
class TunedLens:
    """One affine translator per layer: ``h -> h @ weight[l].T + bias[l]`` (identity for layers not trained)."""

    layers: list[int]
    weight: Float[Tensor, "layer d_model d_model"]
    bias: Float[Tensor, "layer d_model"]
    model: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    history: list[float] = field(default_factory=list)

    def translate(self, h: Float[Tensor, "... d_model"], layer: int) -> Float[Tensor, "... d_model"]:
        if layer not in self.layers:
            return h
        i = self.layers.index(layer)
        return h.float() @ self.weight[i].T.to(h.device) + self.bias[i].to(h.device)

    def logits(self, head, h: Float[Tensor, "... d_model"], layer: int) -> Float[Tensor, "... d_vocab"]:
        return as_head(head)(self.translate(h.float(), layer))

    def save(self, directory: str | os.PathLike) -> Path:
        """``tuned_lens.safetensors`` (weight, bias) and ``tuned_lens.json`` (layers, model identity, training)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        save_tensors(d / "tuned_lens.safetensors", {"weight": self.weight, "bias": self.bias})
        meta = {"format": TUNED_FORMAT, "version": FORMAT_VERSION, "layers": self.layers, "model": self.model,
                "config": self.config, "history": self.history}
        atomic_write_json(d / "tuned_lens.json", jsonable(meta))
        return d

    @classmethod
    def load(cls, directory: str | os.PathLike) -> TunedLens:
        d = Path(directory)
        meta = load_json(d / "tuned_lens.json", TUNED_FORMAT, FORMAT_VERSION, "tuned lens", AnalysisError)
        t = load_tensors(d / "tuned_lens.safetensors", "tuned lens", AnalysisError)
        n = len(meta["layers"])
        if "weight" not in t or "bias" not in t or t["weight"].shape[0] != n or t["bias"].shape[0] != n:
            raise AnalysisError(f"{d / 'tuned_lens.safetensors'} does not hold {n} translators; save the lens again")
        return cls([int(x) for x in meta["layers"]], t["weight"].float(), t["bias"].float(), dict(meta["model"]),
                   dict(meta.get("config") or {}), list(meta.get("history") or []))

    def check_model(self, head: Head) -> None:
        for key in ("d_model", "n_layers", "weights_hash"):
            a, b = self.model.get(key), head.identity.get(key)
            if a is not None and b is not None and a != b:
                raise ConfigError(f"this tuned lens was trained for {self.model.get('name')!r} ({key} {a}), not for "
                                  f"{head.identity.get('name')!r} ({b}); train one for this model")


def _load_layers(store: ActivationStore, layers: Sequence[int], rows: Tensor) -> dict[int, Tensor]:
    return {x: store.activations(residual_layers(store)[x], rows) for x in layers}


def _fit(head: Head, fast: Head, H: dict[int, Tensor], use: list[int], last: int, n_train: int,
         weight: Tensor, bias: Tensor, opt, sched, steps: int, batch_size: int, g: torch.Generator,
         dev: torch.device, history: list[float], progress: bool) -> None:
    """The tuned lens's training loop: every layer's translator on the same batch, mean KL over layers."""
    from tqdm.auto import tqdm

    for _ in tqdm(range(steps), desc="tuned lens", disable=not progress):
        idx = torch.randint(n_train, (min(batch_size, n_train),), generator=g).to(dev)
        with torch.no_grad():
            target = F.log_softmax(head(H[last][idx]), -1)
        loss = torch.zeros((), device=dev)
        for i, x in enumerate(use):
            pred = F.log_softmax(fast(H[x][idx].float() @ weight[i].T + bias[i]), -1)
            loss = loss + (target.exp() * (target - pred)).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        (loss / max(1, len(use))).backward()
        torch.nn.utils.clip_grad_norm_([weight, bias], 1.0)
        opt.step()
        sched.step()
        history.append(float(loss.detach()) / max(1, len(use)))


def train_tuned_lens(
    store: ActivationStore | str | os.PathLike,
    model,
    layers: Sequence[int] | None = None,
    *,
    steps: int = 300,
    batch_size: int = 512,
    optimizer: str = "sgd",
    lr: float | None = None,
    init: str = "identity",
    precision: str = "bfloat16",
    weight_decay: float = 0.0,
    test_size: float = 0.2,
    max_rows: int | None = 50_000,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> TunedLens:
    """Train one affine translator per layer (initialised to the identity) on the store's train rows to minimise
    ``KL(p_final || softmax(head(A_l h_l + b_l)))``, where ``p_final = softmax(head(h_last))`` comes from the store's
    last-layer residual: ``steps`` steps of ``batch_size`` rows drawn from at most ``max_rows`` train rows, the
    gradient clipped to norm 1, a 10% warm-up then cosine decay. ``optimizer="sgd"``: Nesterov momentum 0.9 with
    step ``lr * (1 - 0.9)`` (``lr`` default 1.0); ``"adam"``: Adam (``lr`` default 1e-3). ``init="shortcut"`` starts
    each translator from the least-squares map to the last layer (:func:`linear_shortcut`'s, ridge-regularised)
    instead of the identity. ``precision="bfloat16"`` runs the translated rows' unembedding in bfloat16 (as the
    tuned-lens package does under autocast); the final distribution stays in the model's dtype. The held-out rows
    (``store.train_test_split(test_size, seed)``) are left for :func:`lens_kl`."""
    head = as_head(model)
    store = check_store(store, head)
    n_layers = int(head.identity.get("n_layers") or store.model_info["n_layers"])
    use = _layers_of(store, head, layers, last=False)
    if optimizer not in ("sgd", "adam") or init not in ("identity", "shortcut"):
        raise ConfigError(f"optimizer must be 'sgd' or 'adam' and init 'identity' or 'shortcut' (got {optimizer!r}, "
                          f"{init!r})")
    lr = (1.0 if optimizer == "sgd" else 1e-3) if lr is None else lr
    if precision not in ("bfloat16", "float32"):
        raise ConfigError(f"precision must be 'bfloat16' or 'float32', got {precision!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1 or batch_size < 1 or not lr > 0:
        raise ConfigError(f"steps and batch_size must be positive integers and lr positive (got {steps}, "
                          f"{batch_size}, {lr})")
    train, _ = _split(store, None, test_size, seed, max_rows)
    dev = torch.device(device) if device is not None else head.device
    H = {x: a.to(dev) for x, a in _load_layers(store, [*use, n_layers - 1], train).items()}
    d = head.d_model
    g = torch.Generator().manual_seed(seed)
    weight = torch.eye(d, device=dev).repeat(len(use), 1, 1)
    bias = torch.zeros(len(use), d, device=dev)
    if init == "shortcut":
        for i, x in enumerate(use):
            Xc = H[x].double() - H[x].double().mean(0)
            W, b = least_squares(H[x], H[n_layers - 1], ridge=1e-3 * float((Xc * Xc).sum()) / d)
            weight[i], bias[i] = W.T, b
    weight.requires_grad_(True), bias.requires_grad_(True)
    if optimizer == "sgd":
        opt = torch.optim.SGD([weight, bias], lr=lr * 0.1, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    else:
        opt = torch.optim.Adam([weight, bias], lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, steps // 10))
                                             * 0.5 * (1 + math.cos(math.pi * s / steps)))
    history: list[float] = []
    frozen = [(p, p.requires_grad) for p in head.parameters()]
    try:
        for p, _ in frozen:
            p.requires_grad_(False)
        fast = head.cast(torch.bfloat16) if precision == "bfloat16" else head
        _fit(head, fast, H, use, n_layers - 1, train.numel(), weight, bias, opt, sched, steps, batch_size, g, dev,
             history, progress)
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)
    config = {"steps": steps, "batch_size": batch_size, "optimizer": optimizer, "lr": lr, "init": init,
              "precision": precision, "weight_decay": weight_decay, "seed": seed,
              "test_size": test_size, "train_rows": int(train.numel()), "store": str(store.path)}
    return TunedLens(use, weight.detach().cpu(), bias.detach().cpu(), dict(head.identity), config, history)


# ------------------------------------------------------------------------------------------------------ linear maps


def least_squares(X: Float[Tensor, "n d_in"], Y: Float[Tensor, "n d_out"], ridge: float = 0.0
                  ) -> tuple[Float[Tensor, "d_in d_out"], Float[Tensor, " d_out"]]:
    """``(W, b)`` minimising ``||X W + b - Y||^2 + ridge ||W||^2`` in closed form (float64 normal equations)."""
    X64, Y64 = X.double(), Y.double()
    mx, my = X64.mean(0), Y64.mean(0)
    Xc, Yc = X64 - mx, Y64 - my
    A = Xc.T @ Xc + ridge * torch.eye(X.shape[1], dtype=torch.float64, device=X.device)
    W = torch.linalg.lstsq(A, Xc.T @ Yc).solution if ridge == 0 else torch.linalg.solve(A, Xc.T @ Yc)
    return W.float(), (my - mx @ W).float()


@dataclass
class LinearMaps:
    """Least-squares maps from each layer's residual to a target residual, with their held-out accuracy."""

    layers: list[int]
    weight: Float[Tensor, "layer d_model d_model"]
    bias: Float[Tensor, "layer d_model"]
    rows: list[dict[str, Any]]
    kind: str = "shortcut"

    def apply(self, h: Float[Tensor, "... d_model"], layer: int) -> Float[Tensor, "... d_model"]:
        i = self.layers.index(layer)
        return h.float() @ self.weight[i] + self.bias[i]

    @property
    def frame(self):
        import pandas as pd

        return pd.DataFrame(self.rows)


@torch.no_grad()
def _top1(head: Head, h: Tensor, batch: int = 1024) -> Tensor:
    return torch.cat([head(h[i : i + batch]).argmax(-1).cpu() for i in range(0, h.shape[0], batch)])


@torch.no_grad()
def linear_shortcut(
    store: ActivationStore | str | os.PathLike, model, layers: Sequence[int] | None = None, *,
    ridge: float = 0.0, test_size: float = 0.2, max_rows: int | None = 50_000, seed: int = 0, progress: bool = True,
) -> LinearMaps:
    """Jump to Conclusions: the least-squares map from layer ``l``'s residual to the last layer's (train rows), and
    its precision@1 on held-out rows: how often ``argmax head(map(h_l))`` equals the model's own next-token
    prediction ``argmax head(h_last)``; the logit lens's precision@1 is given beside it."""
    from tqdm.auto import tqdm

    head = as_head(model)
    store = check_store(store, head)
    last = int(head.identity.get("n_layers") or store.model_info["n_layers"]) - 1
    use = _layers_of(store, head, layers)
    train, test = _split(store, None, test_size, seed, max_rows)
    Y_tr, Y_te = store.activations(residual_layers(store)[last], train), store.activations(
        residual_layers(store)[last], test)
    truth = _top1(head, Y_te)
    Ws, bs, rows = [], [], []
    for x in tqdm(use, desc="shortcuts", disable=not progress):
        X_tr, X_te = store.activations(residual_layers(store)[x], train), store.activations(
            residual_layers(store)[x], test)
        W, b = least_squares(X_tr, Y_tr, ridge)
        Ws.append(W), bs.append(b)
        hit = int((_top1(head, X_te.float() @ W + b) == truth).sum())
        lens_hit = int((_top1(head, X_te) == truth).sum())
        lo, hi = wilson_interval(hit / max(1, truth.numel()), truth.numel())
        rows.append({"layer": x, "precision_at_1": hit / max(1, truth.numel()), "ci_low": lo, "ci_high": hi,
                     "logit_lens_precision_at_1": lens_hit / max(1, truth.numel()), "n": int(truth.numel())})
    return LinearMaps(use, torch.stack(Ws), torch.stack(bs), rows, "shortcut")


@torch.no_grad()
def future_lens(
    store: ActivationStore | str | os.PathLike, model, layers: Sequence[int] | None = None,
    offsets: Sequence[int] = (2, 3),
    *, ridge: float = 1e-2, test_size: float = 0.2, seed: int = 0, progress: bool = True,
) -> LinearMaps:
    """The linear future lens: from the hidden state at position ``t`` of layer ``l``, predict the token at ``t+N``
    (``N`` in ``offsets``) by a least-squares map to the last layer's residual at ``t+N-1`` decoded by the head.
    Held-out accuracy against the text's token at ``t+N`` and against the model's own prediction there. Needs a
    store captured with ``positions='all'``."""
    from tqdm.auto import tqdm

    head = as_head(model)
    store = check_store(store, head, need_all=True)
    last = int(head.identity.get("n_layers") or store.model_info["n_layers"]) - 1
    use = _layers_of(store, head, layers)
    ex, pos, tok = store.example_ids(), store.token_positions().long(), store.token_ids().long()
    _, test_rows = store.train_test_split(test_size=test_size, seed=seed)
    is_test = torch.zeros(len(store), dtype=torch.bool)
    is_test[test_rows] = True
    Y_all = store.activations(residual_layers(store)[last])
    Ws, bs, rows, layer_list = [], [], [], []
    for N in offsets:
        if N < 1:
            raise ConfigError(f"offsets are tokens ahead (N >= 1), got {N}")
        src = torch.arange(len(store) - N + 1) if len(store) >= N else torch.zeros(0, dtype=torch.int64)
        ok = (ex[src + N - 1] == ex[src]) & (pos[src + N - 1] == pos[src] + N - 1)
        src = src[ok]
        has_next = torch.zeros_like(src, dtype=torch.bool)
        inside = src + N < len(store)
        has_next[inside] = (ex[src[inside] + N] == ex[src[inside]]) & (pos[src[inside] + N] == pos[src[inside]] + N)
        tr, te = src[~is_test[src]], src[is_test[src] & has_next]
        if tr.numel() < 2 or te.numel() == 0:
            raise AnalysisError(f"the store has too few positions t with a token at t+{N} in both splits; capture "
                                "longer texts or more examples")
        model_pred = _top1(head, Y_all[te + N - 1])
        for x in tqdm(use, desc=f"future lens t+{N}", disable=not progress):
            X = store.activations(residual_layers(store)[x])
            W, b = least_squares(X[tr], Y_all[tr + N - 1], ridge)
            pred = _top1(head, X[te].float() @ W + b)
            hit = int((pred == tok[te + N]).sum())
            lo, hi = wilson_interval(hit / max(1, te.numel()), te.numel())
            rows.append({"layer": x, "offset": N, "accuracy": hit / te.numel(), "ci_low": lo, "ci_high": hi,
                         "agreement_with_model": float((pred == model_pred).float().mean()), "n": int(te.numel())})
            Ws.append(W), bs.append(b), layer_list.append(x)
    return LinearMaps(layer_list, torch.stack(Ws), torch.stack(bs), rows, "future")


# ------------------------------------------------------------------------------------------------------ evaluation


@torch.no_grad()
def lens_kl(
    store: ActivationStore | str | os.PathLike, model, tuned: TunedLens | None = None,
    layers: Sequence[int] | None = None, *, rows: Int[Tensor, " n"] | Sequence[int] | None = None,
    test_size: float = 0.2, seed: int = 0, max_rows: int | None = 50_000, batch_size: int = 1024,
):
    """Per layer, the mean ``KL(p_final || p_lens)`` (nats) and top-1 agreement with the final prediction, for the
    logit lens and (given ``tuned``) the tuned lens, on ``rows`` or the held-out rows of the same split the tuned
    lens was trained with. A pandas DataFrame, one row per layer."""
    import pandas as pd

    head = as_head(model)
    store = check_store(store, head)
    if tuned is not None:
        tuned.check_model(head)
        test_size, seed = tuned.config.get("test_size", test_size), tuned.config.get("seed", seed)
    last = int(head.identity.get("n_layers") or store.model_info["n_layers"]) - 1
    use = _layers_of(store, head, layers)
    _, test = _split(store, rows, test_size, seed, max_rows)
    hooks = residual_layers(store)
    Y = store.activations(hooks[last], test)
    out = []
    for x in use:
        X = store.activations(hooks[x], test)
        sums = {"kl_logit": 0.0, "kl_tuned": 0.0, "top1_logit": 0.0, "top1_tuned": 0.0}
        for i in range(0, test.numel(), batch_size):
            fin = head(Y[i : i + batch_size])
            top = fin.argmax(-1)
            lg = head(X[i : i + batch_size])
            sums["kl_logit"] += float(kl_to_final(fin, lg).sum())
            sums["top1_logit"] += float((lg.argmax(-1) == top).sum())
            if tuned is not None:
                tl = tuned.logits(head, X[i : i + batch_size].to(head.device), x)
                sums["kl_tuned"] += float(kl_to_final(fin, tl).sum())
                sums["top1_tuned"] += float((tl.argmax(-1) == top).sum())
        row = {"layer": x, **{k: v / max(1, test.numel()) for k, v in sums.items()}, "n": int(test.numel())}
        if tuned is None:
            row = {k: v for k, v in row.items() if not k.endswith("_tuned")}
        out.append(row)
    return pd.DataFrame(out)


@dataclass
class Trajectory:
    """What each layer's lens predicts at each position of one prompt: ``[layer, pos]`` grids."""

    tokens: list[str]
    layers: list[int]
    top_ids: Int[Tensor, "layer pos k"]
    top_tokens: list[list[list[str]]]
    top_probs: Float[Tensor, "layer pos k"]
    entropy: Float[Tensor, "layer pos"]
    kl: Float[Tensor, "layer pos"]
    target_rank: Int[Tensor, "layer pos"] | None = None
    lens: str = "logit lens"

    def plot(self, other: Trajectory | None = None, color: str = "entropy"):
        """A heatmap (layers x positions) of the top token per cell, coloured by ``entropy`` or ``kl``; with
        ``other`` (e.g. the tuned lens's trajectory of the same prompt), both side by side."""
        from interp.plots import lens_trajectory_figure

        return lens_trajectory_figure([self] if other is None else [self, other], color=color)


def trajectory(model, prompt: str, tuned: TunedLens | None = None, *, k: int = 5,
               target: str | int | None = None, layers: Sequence[int] | None = None) -> Trajectory:
    """Run ``model`` on ``prompt`` and decode every layer's residual at every position with the logit lens (or
    ``tuned``): top-``k`` tokens, entropy and KL to the final distribution per cell, and, given ``target`` (a
    token string or id), its rank per cell."""
    if not isinstance(prompt, str) or not prompt:
        raise ConfigError("prompt must be a non-empty string")
    head = as_head(model)
    if tuned is not None:
        tuned.check_model(head)
    n = int(model.cfg.n_layers)
    use = list(range(n)) if layers is None else [int(x) % n for x in layers]
    names = {f"blocks.{x}.hook_out" for x in use}
    toks = model.to_tokens(prompt)
    with torch.no_grad():
        final, cache = model.run_with_cache(toks, names_filter=lambda nm: nm in names)
        final = final[0].float()
        grids = []
        for x in use:
            h = cache[f"blocks.{x}.hook_out"][0]
            grids.append(tuned.logits(head, h, x) if tuned is not None else head(h))
    logits = torch.stack(grids)  # [layer, pos, vocab]
    probs = logits.softmax(-1)
    top_p, top_i = probs.topk(k, -1)
    tokenizer = model.tokenizer

    def decode(ids: list[int]) -> list[str]:  # readable strings (" Paris"), not BPE pieces ("ĠParis")
        return [tokenizer.decode([i]) for i in ids]

    top_tokens = [[decode(row.tolist()) for row in layer] for layer in top_i.cpu()]
    rank = None
    if target is not None:
        tid = target if isinstance(target, int) else _token_id(model, target)
        rank = torch.stack([token_rank(lg, torch.full((lg.shape[0],), tid)) for lg in logits]).cpu()
    kl = torch.stack([kl_to_final(final, lg) for lg in logits])
    return Trajectory(decode(toks[0].tolist()), use, top_i.cpu(), top_tokens, top_p.cpu(),
                      torch.stack([entropy(lg) for lg in logits]).cpu(), kl.cpu(), rank,
                      "tuned lens" if tuned is not None else "logit lens")


def _token_id(model, token: str) -> int:
    ids = model.tokenizer.encode(token, add_special_tokens=False)
    if len(ids) != 1:
        raise ConfigError(f"target {token!r} is {len(ids)} tokens for this tokenizer; give a single token or its id")
    return int(ids[0])


@torch.no_grad()
def lens_rows(store: ActivationStore | str | os.PathLike, model, layer: int,
              rows: Int[Tensor, " n"] | Sequence[int], tuned: TunedLens | None = None, k: int = 5,
              target: Int[Tensor, " n"] | Sequence[int] | None = None) -> dict[str, Tensor]:
    """What the lens (logit lens, or ``tuned``) reads from ``layer`` of the store's ``rows``: ``logits``, top-``k``
    ``top_ids`` and ``top_probs``, ``entropy``, ``kl`` to the final distribution (from the store's last layer) and,
    given ``target`` token ids, ``target_rank``."""
    head = as_head(model)
    store = check_store(store, head)
    hooks, last = residual_layers(store), int(head.identity.get("n_layers") or store.model_info["n_layers"]) - 1
    layer = _layers_of(store, head, [layer])[0]
    h = store.activations(hooks[layer], rows)
    logits = tuned.logits(head, h, layer) if tuned is not None else head(h)
    final = head(store.activations(hooks[last], rows))
    p, i = logits.softmax(-1).topk(k, -1)
    out = {"logits": logits, "top_ids": i, "top_probs": p, "entropy": entropy(logits),
           "kl": kl_to_final(final, logits)}
    if target is not None:
        out["target_rank"] = token_rank(logits, torch.as_tensor(target))
    return out


__all__ = ["Head", "TunedLens", "LinearMaps", "Trajectory", "train_tuned_lens", "linear_shortcut", "future_lens",
           "lens_kl", "trajectory", "lens_rows", "least_squares", "kl_to_final", "entropy", "token_rank",
           "residual_layers", "check_store"]
