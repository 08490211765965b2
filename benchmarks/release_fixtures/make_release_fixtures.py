"""Write the release-equivalence fixtures under tests/fixtures/release/ by running the authors' own code.

Needs a checkout of github.com/M3DV/LeFusion (never copied into this repository) and, importable, the
packages its model code uses: ``rotary-embedding-torch==0.1.5``, ``einops``, ``einops-exts`` (install them
outside this project, e.g. ``pip install --target /tmp/release_site ...`` and pass ``--site``)::

    python benchmarks/release_fixtures/make_release_fixtures.py --release /path/to/LeFusion \\
        --site /tmp/release_site [--out tests/fixtures/release]

Writes, for the kinds ``lidc`` (C=1, 16-bin condition), ``emidec`` (C=2, 32) and ``diffmask`` (2 input
channels, 1 output, no condition) at a small width (``dim`` 8, ``dim_mults`` (1, 2, 2, 2), 2 attention heads):

* ``<kind>_small.pt``: a checkpoint in the release's ``Trainer.save`` format, ``{'step', 'model', 'ema',
  'scaler'}``, state-dict keys as ``GaussianDiffusion_Nolatent(nn.DataParallel(Unet3D))`` names them
  (``denoise_fn.module.*`` plus the 12 schedule buffers), seeded weights (PyTorch's default initialisation,
  norm gains and biases perturbed; ``ema`` = ``model`` plus small seeded noise, so the two are distinguishable);
* ``<kind>_eps.pt``: seeded inputs ``x`` (B, C, Z, Y, X), timesteps ``t`` (B,), condition ``cond`` (B, K)
  (DiffMask: ``sphere`` (B, 1, Z, Y, X)) and the release model's output ``eps`` for the ``model`` weights;
* ``<kind>_full_keys.json``: ``{key: shape}`` of the full-width published model (lidc dim 64, emidec 72,
  diffmask 64), from instantiating the release class (no weights are stored).

All files hold plain tensors / dicts, so ``torch.load(weights_only=True)`` reads them.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import nn

SMALL_DIM = 8
SMALL_HEADS = 2                # attention width heads x 32 (the published models: 8 x 32)
SMALL_MULTS = (1, 2, 2, 2)     # four levels like the published (1, 2, 4, 8), narrower at the bottom
SMALL_ROI = (8, 16, 16)        # (Z, Y, X)
TIMESTEPS = 300
KINDS = {
    # kind: (release sub-folder, channels (network input), out_dim, cond_dim, full-width dim, ROI (Z, Y, X))
    "lidc": ("LeFusion", 1, None, 16, 64, (32, 64, 64)),
    "emidec": ("LeFusion", 2, None, 32, 72, (10, 72, 72)),
    "diffmask": ("DiffMask", 2, 1, None, 64, (32, 64, 64)),
}


def import_release(release: Path, folder: str):
    """The release's ``ddpm.diffusion`` module of ``folder`` (both folders name their package ``ddpm``)."""
    for name in [m for m in sys.modules if m == "ddpm" or m.startswith("ddpm.")]:
        del sys.modules[name]
    root = str(release / folder)
    sys.path.insert(0, root)
    try:
        import ddpm.diffusion as module  # noqa: PLC0415  (the release's code, imported from --release)
    finally:
        sys.path.remove(root)
    return module


def build(module, kind: str, dim: int, roi: tuple[int, int, int], heads: int = 8,
          mults: tuple[int, ...] = (1, 2, 4, 8)) -> nn.Module:
    """``GaussianDiffusion_Nolatent(nn.DataParallel(Unet3D(...)))`` exactly as the release's train.py builds it."""
    _, channels, out_dim, cond_dim, _, _ = KINDS[kind]
    net = module.Unet3D(dim=dim, dim_mults=mults, channels=channels, out_dim=out_dim, cond_dim=cond_dim,
                        attn_heads=heads)
    if kind == "diffmask":
        return module.GaussianDiffusion_Nolatent(nn.DataParallel(net), image_size=roi[1], num_frames=roi[0],
                                                 timesteps=TIMESTEPS, loss_type="l1")
    return module.GaussianDiffusion_Nolatent(nn.DataParallel(net), image_size=roi[1], num_frames=roi[0],
                                             channels=channels, timesteps=TIMESTEPS, loss_type="l1", data_type=kind)


def randomise(model: nn.Module, generator: torch.Generator) -> None:
    """Perturb the parameters PyTorch initialises to constants (norm gains and biases, the layer-norm gammas), so
    every parameter affects the output; the rest keep their seeded default initialisation (unit-scale outputs,
    like a trained eps-predictor's)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if name.endswith("gamma") or (".norm." in name and name.endswith("weight")):
                p.copy_(1 + 0.1 * noise)
            elif ".norm." in name and name.endswith("bias"):
                p.copy_(0.1 * noise)


def make_kind(release: Path, out: Path, kind: str, seed: int) -> None:
    folder, channels, out_dim, cond_dim, full_dim, full_roi = KINDS[kind]
    module = import_release(release, folder)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)                        # the release's modules draw their initial weights globally
    diffusion = build(module, kind, SMALL_DIM, SMALL_ROI, SMALL_HEADS, SMALL_MULTS)
    randomise(diffusion, g)
    model_sd = {k: v.detach().clone() for k, v in diffusion.state_dict().items()}
    ema_sd = {k: (v + 0.01 * torch.randn(v.shape, generator=g) if k.startswith("denoise_fn.") and v.is_floating_point()
                  else v.clone()) for k, v in model_sd.items()}
    scaler = torch.amp.GradScaler("cpu", enabled=False).state_dict() if hasattr(torch, "amp") else {}
    torch.save({"step": 1234, "model": model_sd, "ema": ema_sd, "scaler": scaler}, out / f"{kind}_small.pt")

    net = diffusion.denoise_fn.module.eval()
    b, (z, y, x) = 2, SMALL_ROI
    in_channels = 1 if kind == "diffmask" else channels
    sample = {"x": torch.randn((b, in_channels, z, y, x), generator=g),
              "t": torch.tensor([3, 271])}
    with torch.no_grad():
        if kind == "diffmask":
            sample["sphere"] = (torch.rand((b, 1, z, y, x), generator=g) > 0.5).float() * 2 - 1
            eps = net(sample["x"], sample["t"], sphere=sample["sphere"])
        else:
            hist = torch.rand((b, cond_dim // 16, 16), generator=g)      # one 16-bin histogram per class
            sample["cond"] = (hist / hist.sum(-1, keepdim=True)).reshape(b, cond_dim)
            eps = net(sample["x"], sample["t"], cond=sample["cond"])
    torch.save({**sample, "eps": eps}, out / f"{kind}_eps.pt")

    full = build(module, kind, full_dim, full_roi)
    shapes = {k: list(v.shape) for k, v in full.state_dict().items()}
    (out / f"{kind}_full_keys.json").write_text(json.dumps(shapes, indent=0) + "\n")
    print(f"{kind}: {len(model_sd)} tensors small, {len(shapes)} full-width, "
          f"{sum(p.numel() for p in full.denoise_fn.parameters()):,} full-width parameters")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--release", type=Path, required=True, help="checkout of github.com/M3DV/LeFusion")
    parser.add_argument("--site", type=Path, action="append", default=[],
                        help="extra import path holding rotary_embedding_torch, einops, einops_exts")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[2] / "tests/fixtures/release")
    parser.add_argument("--seed", type=int, default=20250101)
    args = parser.parse_args(argv)
    for site in args.site:
        sys.path.insert(0, str(site))
    args.out.mkdir(parents=True, exist_ok=True)
    for i, kind in enumerate(KINDS):
        make_kind(args.release, args.out, kind, args.seed + i)


if __name__ == "__main__":
    main()
