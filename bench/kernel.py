"""Benchmark: the fused Triton loss/gradient kernel for probe sweeps, against the torch path and a per-probe loop.

A probe sweep is H hooks x P problems (folds x values of C) of L2-regularised logistic regression over one
activation matrix per hook. Every solver iteration is one loss/gradient evaluation, i.e. one pass over X.
Measured side by side in one run, on the same data:

* per pass: the fused kernel (all P probes in one pass over X), the plain-torch path (all P probes, the
  reference ``loss_grad_torch``), and a per-probe loop (P passes of the kernel with one probe each: what
  fitting the probes one at a time costs per step);
* the fused pass's bandwidth: bytes of X read per pass / pass time, as a fraction of the GPU's peak (a table
  of datasheet peaks by device name, ``--peak-gbs`` to override) and of what a plain streaming read of X
  reaches on this GPU;
* a full sweep: ``fit_logistic`` over all H x P problems with each backend, and the per-probe loop (P fits
  of one probe each, over all hooks), to the same tolerance.

On a GPU the default size is the issue's: H=32, P=40 (5 folds x 8 values of C), N=50,000, d=4096, bfloat16
(13 GB of activations). Without a GPU the kernel cannot run (Triton's interpreter is a correctness tool, far
too slow to time); the bench says so and measures the CPU torch path at a reduced size instead.

    python bench/kernel.py                       # GPU: the issue's size; CPU: H=4, N=4096, d=256
    python bench/kernel.py --hooks 8 --rows 20000 --sweep-tiles
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import re
import statistics
import sys
import time

import torch

from interp.probes.kernel import default_config, get_loss_grad, loss_grad_torch
from interp.probes.solver import fit_logistic

# Datasheet peak memory bandwidth in GB/s, by device name (first match wins: more specific names first).
PEAK_GBS = [
    (r"GH200", 4000.0),
    (r"H200", 4800.0),
    (r"H100.*NVL", 3900.0),
    (r"H100.*PCIe", 2000.0),
    (r"H100|H800", 3350.0),
    (r"B200", 8000.0),
    (r"A100.*80GB.*PCIe|A100 80GB PCIe", 1935.0),
    (r"A100.*80GB", 2039.0),
    (r"A100|A800", 1555.0),
    (r"L40S", 864.0),
    (r"L40", 864.0),
    (r"L4\b", 300.0),
    (r"A10\b|A10G", 600.0),
    (r"RTX 4090", 1008.0),
    (r"RTX 3090", 936.0),
    (r"V100", 900.0),
]


def peak_bandwidth(name: str) -> float | None:
    for pattern, gbs in PEAK_GBS:
        if re.search(pattern, name):
            return gbs
    return None


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(fn, dev: torch.device, reps: int, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds (synchronised on CUDA)."""
    for _ in range(warmup):
        fn()
    sync(dev)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(dev)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def make_problem(H: int, N: int, d: int, folds: int, n_C: int, dtype: torch.dtype, dev: torch.device, seed: int):
    """Activations with a planted direction per hook, labels, fold masks and C values (P = folds * n_C)."""
    g = torch.Generator(device=dev).manual_seed(seed)
    X = torch.empty(H, N, d, dtype=dtype, device=dev)
    w = torch.randn(H, d, generator=g, device=dev) / math.sqrt(d)
    for h in range(H):  # one hook at a time: no float32 copy of the whole tensor
        X[h] = torch.randn(N, d, generator=g, device=dev, dtype=dtype)
    # labels from hook 0's direction, noisier at later hooks' (each hook finds its own optimum)
    z = (X[0].float() @ w[0]) * 3.0
    y = (torch.rand(N, generator=g, device=dev) < torch.sigmoid(z)).float()
    fold = torch.randint(0, folds, (N,), generator=g, device=dev)
    masks = torch.stack([(fold != f).float() for f in range(folds)])  # [folds, N]
    Cs = torch.logspace(-3, 1, n_C, device=dev)
    S = masks.repeat(n_C, 1)  # [n_C * folds, N]: C-major
    Y = y[None].expand_as(S).contiguous()
    C = Cs.repeat_interleave(folds)
    return X, Y, S, C


def fmt_s(t: float) -> str:
    return f"{t * 1e3:9.2f} ms" if t < 10 else f"{t:9.2f} s "


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--hooks", type=int, default=None, help="H (GPU default 32, CPU 4)")
    ap.add_argument("--rows", type=int, default=None, help="N (GPU default 50000, CPU 4096)")
    ap.add_argument("--d-model", type=int, default=None, help="d (GPU default 4096, CPU 256)")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--n-C", type=int, default=8, help="values of C (log-spaced 1e-3..10)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions per pass figure")
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--max-iter", type=int, default=300)
    ap.add_argument("--no-sweep", action="store_true", help="per-pass figures only, no full sweeps")
    ap.add_argument("--peak-gbs", type=float, default=None, help="peak memory bandwidth in GB/s (overrides the table)")
    ap.add_argument("--sweep-tiles", action="store_true", help="GPU: also time other tile sizes of the kernel")
    ap.add_argument(
        "--interpret",
        action="store_true",
        help="run the kernel's code path on CPU in Triton's interpreter (a check that this script runs, at tiny "
        "sizes such as --hooks 2 --rows 64 --d-model 32; the times mean nothing)",
    )
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)

    if a.interpret:
        os.environ["TRITON_INTERPRET"] = "1"
        a.device = "cpu"
    dev = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    gpu = dev.type == "cuda"
    kernel = gpu or a.interpret  # the fused kernel runs (compiled on the GPU, interpreted with --interpret)
    H = a.hooks or (32 if gpu else 4)
    N = a.rows or (50_000 if gpu else 4096)
    d = a.d_model or (4096 if gpu else 256)
    P = a.folds * a.n_C
    dtype = getattr(torch, a.dtype)
    reps = a.reps or (5 if gpu else 3)
    esize = torch.finfo(dtype).bits // 8
    x_bytes = H * N * d * esize

    print(f"# bench/kernel.py  {time.strftime('%Y-%m-%d %H:%M')}  torch {torch.__version__}  "
          f"python {platform.python_version()}")  # fmt: skip
    peak = None
    if kernel:
        try:
            import triton
        except ImportError:
            print("triton is not installed: the fused kernel cannot run; pip install triton")
            return 2
        print(f"triton {triton.__version__}")
    if gpu:
        name = torch.cuda.get_device_name(dev)
        peak = a.peak_gbs or peak_bandwidth(name)
        print(f"device: {name}, peak bandwidth {'%.0f GB/s' % peak if peak else 'unknown (pass --peak-gbs)'}")
    else:
        cpu = platform.processor() or platform.machine()
        print(f"device: CPU ({cpu}, {torch.get_num_threads()} threads)")
        if a.interpret:
            print("NOTE: --interpret runs the kernel in Triton's CPU interpreter: a check of this script, "
                  "not a timing.")  # fmt: skip
        else:
            print("NOTE: the fused Triton kernel needs a CUDA GPU; these are the CPU torch path's figures at a "
                  "reduced size.")  # fmt: skip
            print("      Run on a GPU for the kernel, the per-probe loop with the kernel, and the bandwidth fraction.")
    print(f"size: H={H} hooks, P={P} probes ({a.folds} folds x {a.n_C} C), N={N}, d={d}, {a.dtype}; "
          f"X = {x_bytes / 1e9:.3f} GB")  # fmt: skip

    X, Y, S, C = make_problem(H, N, d, a.folds, a.n_C, dtype, dev, a.seed)
    W = torch.randn(H, P, d, device=dev) * 0.01
    b = torch.zeros(H, P, device=dev)
    backend = "triton" if kernel else "torch"
    fast = get_loss_grad(backend, dev)
    fast_name = "fused kernel" if kernel else "torch path"

    # ---- per pass
    print("\n## one pass (loss + gradient of every probe), median of", reps)
    rows: list[tuple[str, float]] = []
    t_fast = timed(lambda: fast(X, W, b, Y, S), dev, reps)
    rows.append((f"{fast_name}, all {P} probes in one pass", t_fast))
    t_torch = None
    if kernel:
        try:
            t_torch = timed(lambda: loss_grad_torch(X, W, b, Y, S), dev, reps)
            rows.append((f"torch path, all {P} probes", t_torch))
        except torch.cuda.OutOfMemoryError:
            print("torch path: out of GPU memory (it upcasts X to float32)")
        if gpu:
            torch.cuda.empty_cache()

    def per_probe_pass():
        for p in range(P):
            fast(X, W[:, p : p + 1].contiguous(), b[:, p : p + 1].contiguous(), Y[p : p + 1], S[p : p + 1])

    t_loop = timed(per_probe_pass, dev, max(1, reps // 2))
    rows.append((f"per-probe loop ({P} passes of one probe, {fast_name})", t_loop))
    for label, t in rows:
        print(f"  {label:<60s} {fmt_s(t)}")
    print(f"  speed-up of one batched pass over the per-probe loop: {t_loop / t_fast:6.1f}x")
    if t_torch is not None:
        print(f"  speed-up of the fused kernel over the torch path:     {t_torch / t_fast:6.1f}x")
    if kernel:
        from interp.probes.kernel import loss_grad_triton

        gbs = x_bytes / t_fast / 1e9
        stream = timed(lambda: X.sum(dim=1), dev, reps)  # reads X once, writes [H, d]
        s_gbs = x_bytes / stream / 1e9
        print(f"\n## bandwidth of the fused pass: {x_bytes / 1e9:.3f} GB of X per pass")
        print(f"  fused pass: {gbs:8.1f} GB/s" + (f" = {gbs / peak:5.1%} of peak {peak:.0f} GB/s" if peak else ""))
        print(f"  plain streaming read of X (X.sum(dim=1)): {s_gbs:8.1f} GB/s"
              + (f" = {s_gbs / peak:5.1%} of peak" if peak else ""))  # fmt: skip
        print(f"  fused pass / streaming read: {gbs / s_gbs:5.1%}")
        print(f"  tiles: {default_config(P, dtype, interpret=a.interpret)}")
        if dtype != torch.float32:  # diagnostic: how much of the pass is the second tensor-core product
            t_1 = timed(lambda: loss_grad_triton(X, W, b, Y, S, split=False), dev, reps)
            print(f"  diagnostic, weights/residuals rounded once (split=False, not used by the solver): "
                  f"{fmt_s(t_1)} = {x_bytes / t_1 / 1e9:.1f} GB/s")  # fmt: skip
        if a.sweep_tiles:
            print("\n## tile sizes (block_n, block_d, num_warps, num_stages): pass time, GB/s")
            for bn in (32, 64, 128):
                for bd in (32, 64, 128):
                    for nw in (4, 8):
                        for ns in (2, 3, 4):
                            kw = dict(block_n=bn, block_d=bd, num_warps=nw, num_stages=ns)
                            try:
                                t = timed(lambda: loss_grad_triton(X, W, b, Y, S, **kw), dev, 3)
                            except Exception as e:  # out of shared memory / registers for this tile
                                print(f"  {bn:4d} {bd:4d} {nw:2d} {ns:2d}   failed: {type(e).__name__}")
                                continue
                            print(f"  {bn:4d} {bd:4d} {nw:2d} {ns:2d}   {fmt_s(t)}  {x_bytes / t / 1e9:7.1f} GB/s")

    if a.no_sweep:
        return 0

    # ---- full sweeps: same solver, same tolerance
    print(f"\n## full sweep: fit_logistic over {H} x {P} problems, tol={a.tol}, max_iter={a.max_iter}")
    kw = dict(max_iter=a.max_iter, tol=a.tol, warn=False)
    sweeps: list[tuple[str, float, int]] = []
    results = {}

    def run(label, fn):
        sync(dev)
        t0 = time.perf_counter()
        passes = fn()
        sync(dev)
        sweeps.append((label, time.perf_counter() - t0, passes))

    def batched(bk):
        results[bk] = fit_logistic(X, Y, S, C, backend=bk, **kw)
        return results[bk].n_passes

    run(f"batched, {fast_name}", lambda: batched(backend))
    if kernel and t_torch is not None:
        try:
            run("batched, torch path", lambda: batched("torch"))
        except torch.cuda.OutOfMemoryError:
            print("torch path sweep: out of GPU memory")
        if gpu:
            torch.cuda.empty_cache()

    def per_probe():
        total = 0
        for p in range(P):
            r = fit_logistic(X, Y[p : p + 1], S[p : p + 1], C[p : p + 1], backend=backend, **kw)
            total += r.n_passes
        return total

    run(f"per-probe loop ({P} fits of one probe), {fast_name}", per_probe)
    for label, t, passes in sweeps:
        print(f"  {label:<60s} {fmt_s(t)}  ({passes} passes over X)")
    t_b = sweeps[0][1]
    for label, t, _ in sweeps[1:]:
        print(f"  {label}: {t / t_b:6.1f}x the time of the batched {fast_name}")
    main_res = results[backend]
    print(f"  batched sweep: {main_res.converged.float().mean().item():.0%} of problems converged")
    if "torch" in results and backend != "torch":
        diff = (main_res.coef - results["torch"].coef).abs().max().item()
        scale = results["torch"].coef.abs().max().item()
        print(f"  largest |coef difference| fused vs torch path: {diff:.2e} (largest |coef| {scale:.2e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
