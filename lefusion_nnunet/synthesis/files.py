"""Synthesis on files: one lesion inpainted into one case given as image / mask / label files.

``lefusion synthesize`` is this module; the enlarger and the trainer work on arrays (:mod:`lefusion_nnunet.variants`).
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Sequence

import numpy as np

from lefusion_nnunet.data.histogram import TextureSpec
from lefusion_nnunet.data.io import (check_same_grid, file_ending_of, read_image, read_label, write_image_channel,
                                     write_label)
from lefusion_nnunet.errors import LeFusionInputError
from lefusion_nnunet.seeding import seeded_generator, seeded_rng
from lefusion_nnunet.synthesis.lesion import LesionRequest, LesionSynthesizer
from lefusion_nnunet.synthesis.masks import MaskGenerator, generate_case_mask
from lefusion_nnunet.utils import atomic_directory
from lefusion_nnunet.validation import check_output_absent


def read_class_masks(mask: np.ndarray, lesion_labels: Sequence[int], mask_file: Path | str) -> np.ndarray:
    """A mask file's array -> bool ``(C, Z, Y, X)``: binary (any non-zero) for one class, label values for several."""
    if len(lesion_labels) == 1:
        masks = (mask != 0)[None]
    else:
        masks = np.stack([mask == v for v in lesion_labels])
        if not masks.any() and mask.any():
            raise LeFusionInputError(f"mask {mask_file} holds none of the lesion labels {list(lesion_labels)}; "
                                     f"for a multi-class model label each class with its value.")
    if not masks.any():
        raise LeFusionInputError(f"mask {mask_file} is empty; mark the lesion region with non-zero voxels.")
    return masks


def synthesize_files(synth: LesionSynthesizer, image_files: Sequence[Path | str], mask_file: Path | str,
                     out_dir: Path | str, label_file: Path | str | None = None,
                     textures: Sequence[TextureSpec] | None = None, seed: int = 0, overwrite: bool = False) -> dict:
    """Inpaint a lesion into one case given as files; writes image channel(s) and label into ``out_dir``.

    The outputs keep the input's file names, format, pixel type and geometry; the label is the input label
    (or zeros) with each lesion class's value set inside its mask. Returns the written paths.
    """
    check_output_absent(out_dir, overwrite, "output folder")
    data = synth.data
    vol = read_image(image_files)
    mask, mprops = read_label(mask_file)
    check_same_grid(vol.properties, mprops, vol.files[0], Path(mask_file), vol.shape_zyx, mask.shape)
    if label_file is not None:
        label, lprops = read_label(label_file)
        check_same_grid(vol.properties, lprops, vol.files[0], Path(label_file), vol.shape_zyx, label.shape)
    else:
        label, lprops = np.zeros(vol.shape_zyx, np.int16), dict(vol.properties, source_dtype="uint8")
    class_masks = read_class_masks(mask, data.lesion_labels, mask_file)
    rng = seeded_rng(seed, "synthesize")
    texture = synth.texture_condition(list(textures) if textures else TextureSpec("random"), rng)
    request = LesionRequest(vol.channel(data.channel), vol.spacing, class_masks, texture)
    [new_channel] = synth.synthesize([request], generator=[seeded_generator(seed, "synthesize")], rng=rng)
    for c, value in enumerate(data.lesion_labels):
        label = np.where(class_masks[c], value, label)
    out_dir = Path(out_dir)
    first = vol.files[0].name
    ending = file_ending_of(first)
    stem = first[: -len(ending)]
    label_name = Path(label_file).name if label_file else (stem[:-5] if stem[-5:-4] == "_" else stem) + ending
    written = {}
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        for i, f in enumerate(vol.files):
            if i == data.channel:
                write_image_channel(new_channel, tmp / f.name, vol, i)
            else:
                shutil.copy2(f, tmp / f.name)
            written[f"image_{i:04d}"] = str(out_dir / f.name)
        write_label(label, tmp / label_name, lprops)
        written["label"] = str(out_dir / label_name)
    return written


def write_sampled_mask(mask_checkpoint: Path, image_file: Path, label_file: Path | None, out_file: Path,
                       size_mm: tuple[float, float], boundary: float, center_mm: tuple[float, float, float] | None,
                       region_label: int | None, seed: int, device: str = "auto") -> dict:
    """Sample a diffusion lesion mask for one image and write it (class label values, the image's geometry).

    The diameter is drawn uniformly from ``size_mm`` with ``seed``. Returns the mask's record (centre voxel,
    requested and obtained diameter, volume, boundary). Used by `sample-mask`; `synthesize --mask-source
    diffusion` can call it to make its ``--mask`` file.
    """
    gen = MaskGenerator(mask_checkpoint, device=device)
    vol = read_image([image_file])
    label = None
    if label_file is not None:
        label, lprops = read_label(label_file)
        check_same_grid(vol.properties, lprops, vol.files[0], Path(label_file), vol.shape_zyx, label.shape)
    lo, hi = (float(v) for v in size_mm)
    if not 0 < lo <= hi:
        raise LeFusionInputError(f"--size-mm {lo} {hi} must be two diameters 0 < MIN <= MAX in mm.")
    diameter = float(seeded_rng(seed, "size").uniform(lo, hi)) if hi > lo else lo
    made = generate_case_mask(gen, vol.channel(0), vol.spacing, vol.properties, label, diameter, boundary, seed,
                              center_mm, region_label)
    out = np.zeros(vol.shape_zyx, np.int16)
    for c, value in enumerate(gen.data.lesion_labels):
        out[made.masks[c]] = value
    write_label(out, out_file, dict(vol.properties, source_dtype="uint8"))
    return made.info
