"""Probe and INLP benchmarks (issue 3): batched training vs the same work as a loop of scikit-learn fits.

1. Layer sweep: 5-fold CV over 7 hooks x 20,000 rows x d_model 384 (a synthetic store on disk).
   ``train_probes`` (one batched problem, end to end: reading the store, standardising, fitting, scoring)
   vs a loop of ``StandardScaler`` + ``LogisticRegression(solver="lbfgs")`` over the same hooks and the same
   folds (activations already in memory as float64). Prints both timings, the ratio and the held-out
   accuracies side by side. Target: >= 20x, accuracies within 1 point.
2. INLP with 20 iterations on one hook of the same size: ``interp.nullspace.inlp`` vs the same algorithm built
   on scikit-learn (explicitly projected data). Prints both timings, the ratio, and the cosine between
   corresponding directions. Target: >= 10x, same directions. Both sides use tol=1e-6 (interp's INLP
   default): at scikit-learn's default 1e-4 neither side's later directions are reproducible (each round's
   weights are only converged to a few digits and the differences compound through the projections).

The synthetic activations are anisotropic (a random rotation of a spectrum spanning 2.5 decades plus
isotropic noise and a common offset, like a residual stream); the label is planted in a 48-dimensional
subspace, a little in each direction, with a strength that grows with depth: probes are far from separable,
and INLP keeps finding signal for 20 rounds (each round removes mostly one direction of the subspace).

3. ``--small`` (issue 17): only a small sweep, 262 rows x 384 x 6 hooks, 5-fold CV over C in {0.01, 0.1, 1, 10}
   (the size of the bundled capitals dataset on MiniLM), ``train_probes`` vs the scikit-learn loop per hook,
   fold and C, alternating ``--repeats`` times; prints the medians and their ratio. Target: >= 5x.

Run: .venv/bin/python bench/probes.py [--rows 20000] [--hooks 7] [--d 384] [--dtype float32]
                                      [--sklearn-max-iter 100] [--skip-inlp] [--skip-sweep] [--small --repeats 5]
"""

from __future__ import annotations

import os

# Threads that spin while waiting (OpenMP's default) collapse when other processes share the two cores; sleep
# instead. Set before torch and scikit-learn load their OpenMP runtimes, so it applies to both sides.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import platform
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from interp.nullspace import inlp
from interp.probes import train_probes
from interp.probes.linear import group_folds
from interp.store import ActivationStore


def synthetic(n: int, d: int, n_hooks: int, seed: int = 0, k: int = 48) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Anisotropic background (a rotated spectrum over 2.5 decades, plus isotropic noise and an offset) and a
    label planted in a k-dimensional subspace U: in each direction of U the classes differ by ``2 snr`` noise
    standard deviations, the noise scale differing between directions; ``snr`` grows with depth."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    U = torch.linalg.qr(torch.randn(d, d, generator=g))[0][:, :k].T  # concept subspace [k, d]
    sig = torch.logspace(-0.5, 0.5, k)
    acts = {}
    for h in range(n_hooks):
        A = torch.linalg.qr(torch.randn(d, d, generator=g))[0]
        spectrum = torch.logspace(1, -1.5, d)
        X = (torch.randn(n, d, generator=g) * spectrum) @ A + 0.3 * torch.randn(n, d, generator=g)
        X -= (X @ U.T) @ U  # the background lives outside U
        snr = 0.05 + 0.05 * h
        Z = ((2 * y[:, None] - 1).float() * snr + torch.randn(n, k, generator=g)) * sig
        acts[f"blocks.{h}.hook_out"] = X + Z @ U + 2.0
    return acts, y


def sklearn_sweep(
    store: ActivationStore, y: np.ndarray, folds: np.ndarray, C: float | list[float], max_iter: int, tol: float
):
    """``StandardScaler`` + ``LogisticRegression(solver="lbfgs")`` per hook, fold and value of C (the scaler is
    fit once per hook and fold). Returns the time, the mean held-out accuracy per hook (one C) or per
    ``(hook, C)`` (a list of C), and how many fits stopped at ``max_iter``."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    Cs = C if isinstance(C, list) else [C]
    data = {h: store.activations(h).double().numpy() for h in store.hooks}  # not timed
    k = int(folds.max()) + 1
    out, capped = {}, 0
    t0 = time.perf_counter()
    for h, X in data.items():
        accs: dict[float, list[float]] = {c: [] for c in Cs}
        for f in range(k):
            tr, te = folds != f, folds == f
            sc = StandardScaler().fit(X[tr])
            Xtr, Xte = sc.transform(X[tr]), sc.transform(X[te])
            for c in Cs:
                clf = LogisticRegression(C=c, solver="lbfgs", max_iter=max_iter, tol=tol).fit(Xtr, y[tr])
                capped += int(clf.n_iter_[0] >= max_iter)
                accs[c].append(clf.score(Xte, y[te]))
        for c in Cs:
            out[(h, c) if isinstance(C, list) else h] = float(np.mean(accs[c]))
    return time.perf_counter() - t0, out, capped


def small_sweep(args: argparse.Namespace) -> None:
    """Issue 17: a small store (262 rows x 384, 6 hooks), 5-fold CV over 4 values of C, where the solver's fixed
    costs, not the passes, decide. interp and scikit-learn alternate ``--repeats`` times; medians and ratio."""
    Cs = [0.01, 0.1, 1.0, 10.0]
    acts, y = synthetic(262, 384, 6)
    with tempfile.TemporaryDirectory() as tmp:
        store = ActivationStore.from_tensors(Path(tmp) / "small", acts, y.tolist(), dtype=args.dtype)
        folds = group_folds(store.example_ids(), y, 5, seed=0).numpy()  # the folds train_probes uses
        train_probes(store, cv=5, C=Cs, progress=False)  # warm-up
        t_ours, t_sk, cpu_ours, cpu_sk = [], [], [], []
        for _ in range(args.repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            sweep = train_probes(store, cv=5, C=Cs, seed=0, tol=args.tol, progress=False)
            t_ours.append(time.perf_counter() - t0)
            cpu_ours.append(time.process_time() - c0)
            c0 = time.process_time()
            t, acc_sk, capped = sklearn_sweep(store, y.numpy(), folds, Cs, args.sklearn_max_iter, args.tol)
            cpu_sk.append(time.process_time() - c0)
            t_sk.append(t)
    worst = max(abs(r["heldout_accuracy"] - acc_sk[(r["hook"], r["C"])]) for r in sweep.cv_results)
    mo, ms = float(np.median(t_ours)), float(np.median(t_sk))
    print(f"\n== small sweep: 262 rows x 384, 6 hooks, 5-fold CV, C in {Cs}, tol={args.tol}, {args.repeats} "
          "interleaved repeats ==")
    print(f"interp train_probes: median {mo:.3f} s  (runs: {' '.join(f'{t:.3f}' for t in t_ours)}; "
          f"{sweep.config['passes']} passes, 6 x {6 * len(Cs)} problems incl. the final fits)")
    print(f"sklearn loop:        median {ms:.3f} s  (runs: {' '.join(f'{t:.3f}' for t in t_sk)}; "
          f"{6 * 5 * len(Cs)} fits, {capped} stopped at max_iter={args.sklearn_max_iter})")
    co, cs = float(np.median(cpu_ours)), float(np.median(cpu_sk))
    print(f"CPU time (all threads; less sensitive to other processes on the machine): interp median {co:.3f} s, "
          f"sklearn median {cs:.3f} s -> {cs / co:.1f}x")
    ratios = sorted(s / o for s, o in zip(t_sk, t_ours))
    print(f"speed-up: {ms / mo:.1f}x (ratio of medians; per-repeat ratios {ratios[0]:.1f}x-{ratios[-1]:.1f}x)   "
          f"largest held-out accuracy difference over hooks x C: {100 * worst:.2f} points")


def sklearn_inlp(
    X: np.ndarray, y: np.ndarray, tr: np.ndarray, te: np.ndarray, n_iter: int, C: float, max_iter: int, tol: float
):
    """INLP as it is usually written with scikit-learn: project the data, fit, project the weights out."""
    from sklearn.linear_model import LogisticRegression

    t0 = time.perf_counter()
    mu = X[tr].mean(0)
    s = float(np.sqrt(X[tr].var(0).mean()))
    Z = (X - mu) / s
    d = X.shape[1]
    P = np.eye(d)
    B = np.zeros((0, d))
    dirs, accs, capped = [], [], 0
    for _ in range(n_iter):
        Zp = Z @ P
        clf = LogisticRegression(C=C, solver="lbfgs", max_iter=max_iter, tol=tol).fit(Zp[tr], y[tr])
        capped += int(clf.n_iter_[0] >= max_iter)
        accs.append(clf.score(Zp[te], y[te]))
        w = P @ clf.coef_[0]
        w -= B.T @ (B @ w)
        w /= np.linalg.norm(w)
        B = np.vstack([B, w])
        P = np.eye(d) - B.T @ B
        dirs.append(w)
    return time.perf_counter() - t0, np.array(dirs), accs, capped


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--hooks", type=int, default=7)
    ap.add_argument("--d", type=int, default=384)
    ap.add_argument("--cv", type=int, default=5)
    ap.add_argument("--C", type=float, default=1.0)
    ap.add_argument("--dtype", default="float32", help="store dtype (float32 | float16 | bfloat16)")
    ap.add_argument("--sklearn-max-iter", type=int, default=100, help="scikit-learn's max_iter (its default: 100)")
    ap.add_argument("--tol", type=float, default=1e-4, help="sweep: tol on both sides (scikit-learn's default)")
    ap.add_argument("--inlp-tol", type=float, default=1e-6,
                    help="INLP: tol on both sides (interp's INLP default; directions need tight convergence)")
    ap.add_argument("--inlp-sklearn-max-iter", type=int, default=1000)
    ap.add_argument("--inlp-iter", type=int, default=20)
    ap.add_argument("--skip-sweep", action="store_true")
    ap.add_argument("--skip-inlp", action="store_true")
    ap.add_argument("--small", action="store_true",
                    help="only the small sweep (262 rows x 384, 6 hooks, 5 folds, 4 C), interleaved and repeated")
    ap.add_argument("--repeats", type=int, default=5, help="--small: interleaved repeats of both sides")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")  # sklearn's ConvergenceWarning at max_iter: counted and printed instead
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads "
          f"{torch.get_num_threads()}, torch {torch.__version__}, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}, "
          f"load average {os.getloadavg()[0]:.1f}")
    if args.small:
        small_sweep(args)
        return
    acts, y = synthetic(args.rows, args.d, args.hooks)
    with tempfile.TemporaryDirectory() as tmp:
        store = ActivationStore.from_tensors(Path(tmp) / "store", acts, y.tolist(), dtype=args.dtype)
        del acts
        yn = y.numpy()
        print(f"store: {len(store)} rows x {len(store.hooks)} hooks x d_model {store.d_model}, {store.dtype_name}")

        if not args.skip_sweep:
            train_probes(store, cv=args.cv, C=args.C, hooks=store.hooks[:1], max_rows=2000, progress=False)  # warm-up
            t0 = time.perf_counter()
            sweep = train_probes(store, cv=args.cv, C=args.C, seed=0, tol=args.tol, progress=False)
            t_ours = time.perf_counter() - t0
            folds = group_folds(store.example_ids(), y, args.cv, seed=0).numpy()  # the folds train_probes used
            t_sk, acc_sk, capped = sklearn_sweep(store, yn, folds, args.C, args.sklearn_max_iter, args.tol)
            print(f"\n== layer sweep: {args.cv}-fold CV, {len(store.hooks)} hooks, C={args.C}, tol={args.tol} ==")
            print(f"{'hook':<20} {'interp acc':>10} {'sklearn acc':>11} {'diff':>6}")
            worst = 0.0
            for r in sweep.rows:
                diff = r["heldout_accuracy"] - acc_sk[r["hook"]]
                worst = max(worst, abs(diff))
                print(f"{r['hook']:<20} {r['heldout_accuracy']:>10.4f} {acc_sk[r['hook']]:>11.4f} {diff:>+6.4f}")
            print(f"interp train_probes: {t_ours:.2f} s ({sweep.config['passes']} passes over the activations, "
                  f"all {len(store.hooks) * (args.cv + 1)} problems converged: "
                  f"{all(r['converged'] for r in sweep.rows)})")
            print(f"sklearn loop:        {t_sk:.2f} s ({len(store.hooks) * args.cv} fits, max_iter="
                  f"{args.sklearn_max_iter}, tol={args.tol}, {capped} stopped at max_iter)")
            print(f"speed-up: {t_sk / t_ours:.1f}x   largest accuracy difference: {100 * worst:.2f} points")

        if not args.skip_inlp:
            hook = store.hooks[-1]
            tr_rows, te_rows = store.train_test_split(test_size=0.25, seed=0, use_dataset_split=False)
            tr = np.zeros(len(store), bool)
            tr[tr_rows.numpy()] = True
            te = ~tr
            t0 = time.perf_counter()
            res = inlp(store, hook, max_iter=args.inlp_iter, margin=None, C=args.C, seed=0, test="random",
                       tol=args.inlp_tol, progress=False)
            t_ours = time.perf_counter() - t0
            X = store.activations(hook).double().numpy()
            t_sk, dirs_sk, accs_sk, capped = sklearn_inlp(
                X, yn, tr, te, args.inlp_iter, args.C, args.inlp_sklearn_max_iter, args.inlp_tol
            )
            cosines = np.abs((res.directions.double().numpy() * dirs_sk).sum(1))
            print(f"\n== INLP: {args.inlp_iter} iterations at {hook}, C={args.C}, tol={args.inlp_tol} ==")
            print(f"{'iter':>4} {'interp acc':>10} {'sklearn acc':>11} {'|cos|':>7}")
            for i in range(args.inlp_iter):
                print(f"{i:>4} {res.accuracies[i]:>10.4f} {accs_sk[i]:>11.4f} {cosines[i]:>7.4f}")
            print(f"interp inlp:        {t_ours:.2f} s")
            print(f"sklearn INLP loop:  {t_sk:.2f} s (tol={args.inlp_tol}, max_iter={args.inlp_sklearn_max_iter}, "
                  f"{capped} of {args.inlp_iter} fits stopped at max_iter)")
            print(f"speed-up: {t_sk / t_ours:.1f}x   direction cosines: min {cosines.min():.4f}, "
                  f"median {np.median(cosines):.4f}")


if __name__ == "__main__":
    main()
