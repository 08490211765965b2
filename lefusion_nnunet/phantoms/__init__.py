"""Procedural phantoms in nnU-Net raw format: the embedded default data (no download needed).

* :mod:`~lefusion_nnunet.phantoms.chest`: CT chest with lungs, vessels and nodules of three textures;
* :mod:`~lefusion_nnunet.phantoms.cardiac`: MR-like myocardium with infarct and microvascular obstruction.
"""
from __future__ import annotations

from pathlib import Path

from lefusion_nnunet.data.dataset import env_folder
from lefusion_nnunet.errors import LeFusionInputError
from lefusion_nnunet.phantoms.cardiac import CardiacPhantomConfig, generate_cardiac_phantom
from lefusion_nnunet.phantoms.chest import PhantomConfig, generate_chest_phantom

PHANTOM_KINDS = {"chest": (PhantomConfig, generate_chest_phantom, 501, "LeFusionChestPhantom"),
                 "cardiac": (CardiacPhantomConfig, generate_cardiac_phantom, 511, "LeFusionCardiacPhantom")}


def generate_phantom(kind: str = "chest", raw_root: Path | str | None = None, dataset_id: int | None = None,
                     name: str | None = None, overwrite: bool = False, **config) -> Path:
    """Write a phantom dataset under ``raw_root`` (default ``$nnUNet_raw``); returns its folder.

    Args:
        kind: ``"chest"`` (dataset 501 by default) or ``"cardiac"`` (511).
        config: fields of the kind's config (``num_cases``, ``shape_zyx`` (voxels, z y x), ``seed``, ...); None
            values keep the defaults.
    """
    if kind not in PHANTOM_KINDS:
        raise LeFusionInputError(f"unknown phantom kind {kind!r}; use one of {', '.join(PHANTOM_KINDS)}.")
    config_class, generate, default_id, default_name = PHANTOM_KINDS[kind]
    out = Path(raw_root) if raw_root is not None else env_folder("nnUNet_raw")
    cfg = config_class(**{k: v for k, v in config.items() if v is not None})
    return generate(out, dataset_id or default_id, name or default_name, cfg, overwrite=overwrite)
