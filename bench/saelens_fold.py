"""interp's loading of SAELens TopK SAEs saved with ``rescale_acts_by_decoder_norm: true`` (issue 11) vs SAELens.

Not part of the project's dependencies: run it in a separate environment that has ``sae-lens`` installed, with
interp on ``PYTHONPATH``. A ``TopKTrainingSAE`` with SAELens's default config (which sets
``rescale_acts_by_decoder_norm=True``) gets random weights whose decoder rows have norms from 0.05 to 20 and is
written with ``save_inference_model`` (what SAELens's trainer writes); the directory is loaded by SAELens
(``SAE.load_from_disk``) and by ``interp.SAE.load`` (which folds the norms into the weights), and both encode,
decode and reconstruct the same random inputs. Prints the largest absolute differences and the share of
rows whose active latents agree.

Run: PYTHONPATH=. <venv with sae-lens>/bin/python bench/saelens_fold.py [--d-in 384] [--d-sae 3072] [--k 32]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-in", type=int, default=384)
    ap.add_argument("--d-sae", type=int, default=3072)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--rows", type=int, default=4096)
    args = ap.parse_args()
    import sae_lens
    from sae_lens import SAE as LensSAE
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    from interp.sae import SAE

    g = torch.Generator().manual_seed(0)
    cfg = TopKTrainingSAEConfig(d_in=args.d_in, d_sae=args.d_sae, k=args.k)
    assert cfg.rescale_acts_by_decoder_norm, "SAELens's TopK training default changed"
    train = TopKTrainingSAE(cfg)
    with torch.no_grad():
        train.W_enc.copy_(torch.randn(args.d_in, args.d_sae, generator=g) / args.d_in**0.5)
        train.b_enc.copy_(0.1 * torch.randn(args.d_sae, generator=g))
        W_dec = torch.randn(args.d_sae, args.d_in, generator=g)
        norms = torch.logspace(-1.3, 1.3, args.d_sae)[torch.randperm(args.d_sae, generator=g)]
        train.W_dec.copy_(W_dec / W_dec.norm(dim=1, keepdim=True) * norms[:, None])
        train.b_dec.copy_(0.1 * torch.randn(args.d_in, generator=g))
    x = torch.randn(args.rows, args.d_in, generator=g)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "topk"
        train.save_inference_model(path)
        saved_flag = __import__("json").loads((path / "cfg.json").read_text()).get("rescale_acts_by_decoder_norm")
        lens = LensSAE.load_from_disk(str(path), device="cpu")
        ours = SAE.load(path)
        with torch.no_grad():
            f_lens, f_ours = lens.encode(x), ours.encode(x)
            d_lens, d_ours = lens.decode(f_lens), ours.decode(f_ours)
            r_lens, r_ours = lens(x), ours(x)
    same_support = ((f_lens != 0) == (f_ours != 0)).all(1).float().mean()
    print(f"sae-lens {sae_lens.__version__}, torch {torch.__version__}; cfg.json rescale_acts_by_decoder_norm="
          f"{saved_flag}; d_in {args.d_in}, d_sae {args.d_sae}, k {args.k}, {args.rows} random rows, float32")
    print(f"rows with the same active latents: {100 * float(same_support):.2f}%")
    print(f"max |encode diff| {float((f_lens - f_ours).abs().max()):.3g} (latent scale {float(f_lens.abs().max()):.3g})")
    print(f"max |decode diff| {float((d_lens - d_ours).abs().max()):.3g} (output scale {float(d_lens.abs().max()):.3g})")
    print(f"max |forward diff| {float((r_lens - r_ours).abs().max()):.3g}")


if __name__ == "__main__":
    main()
