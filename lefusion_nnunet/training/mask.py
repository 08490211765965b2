"""Training of the lesion-mask model (`lefusion train-mask`): mask ROIs on the model grid and the training loop.

The encodings (cumulative channels, sphere channel, condition features) are in :mod:`lefusion_nnunet.data.mask_shapes`;
sampling is :class:`lefusion_nnunet.mask_diffusion.MaskGenerator`. The loss is plain eps MSE over all voxels
(a mask is the whole ROI).
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from tqdm.auto import tqdm

from lefusion_nnunet.checkpoints.format import load_checkpoint_content, save_checkpoint
from lefusion_nnunet.checkpoints.loaders import DEFAULT_MASK_SAMPLER, checkpoint_data_config
from lefusion_nnunet.data.config import DataConfig, build_data_config
from lefusion_nnunet.data.dataset import RawDataset, load_raw_dataset
from lefusion_nnunet.data.intensity import IntensitySpace
from lefusion_nnunet.data.io import read_label
from lefusion_nnunet.data.lesions import median_spacing
from lefusion_nnunet.data.mask_shapes import (MASK_FEATURES, cumulative_channels, mask_features, reference_mm,
                                              sphere_channel)
from lefusion_nnunet.data.masks import LESION_CONNECTIVITY, equivalent_diameter_mm, mask_volume_mm3
from lefusion_nnunet.data.roi import (RoiGeometry, extract_roi_mask, mask_fits_roi, roi_center_for_mask,
                                      roi_origin_for_center)
from lefusion_nnunet.diffusion import DenoiserConfig, NoiseSchedule, ScheduleConfig
from lefusion_nnunet.errors import LeFusionCheckpointError, LeFusionInputError
from lefusion_nnunet.paths import default_run_dir
from lefusion_nnunet.training.lesion import plot_loss, remove_stale_temporaries
from lefusion_nnunet.training.loop import (FINAL, LATEST, LOG, PLOT, TrainConfig, check_run_folder, init_training_state,
                                           optimizer_step, read_log_rows, step_generators, training_state_content)
from lefusion_nnunet.utils import _friendly_os_error, atomic_write_bytes, resolve_device
from lefusion_nnunet.validation import validate_dataset

__all__ = ["DEFAULT_MASK_SAMPLER", "MaskRoiSet", "collect_mask_rois", "train_mask_model"]

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------------------
# training data
@dataclass
class MaskRoiSet:
    """Training lesion masks on the model grid.

    Attributes:
        masks: bool ``(N, C, Z, Y, X)`` cumulative channels.
        regions: bool ``(N, Z, Y, X)`` host region (region label plus the lesions); all true without region label.
        spheres: float32 ``(N, Z, Y, X)`` sphere channel at the lesion's centroid and equivalent radius.
        features: float32 ``(N, C * 4)`` condition features.
        case_ids: source case of each ROI; skipped: lesions not used (larger than the ROI).
    """

    masks: np.ndarray
    regions: np.ndarray
    spheres: np.ndarray
    features: np.ndarray
    case_ids: list[str]
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.masks)


def collect_mask_rois(dataset: RawDataset, lesion_labels: Sequence[int], geometry: RoiGeometry,
                      region_label: int | None = None, progress: bool = True) -> MaskRoiSet:
    """Cut every lesion's masks (label files only) on the model grid, centred like the lesion model's ROIs."""
    lesion_labels = [int(v) for v in lesion_labels]
    dataset.check_labels(lesion_labels, "lesion label")
    if region_label is not None:
        dataset.check_labels([int(region_label)], "region label")
    ref = reference_mm(geometry)
    masks, regions, spheres, feats, case_ids, skipped = [], [], [], [], [], []
    cases = [c for c in dataset.cases if c.label is not None]
    for case in tqdm(cases, desc="reading lesion masks", disable=not progress, leave=False):
        label, props = read_label(case.label)
        lesion_any = np.isin(label, lesion_labels)
        if not lesion_any.any():
            continue
        spacing = tuple(float(s) for s in props["spacing"])
        host = np.isin(label, [int(region_label)] + lesion_labels) if region_label is not None else None
        components, n = ndimage.label(lesion_any, structure=LESION_CONNECTIVITY)
        for comp in range(1, n + 1):
            region = components == comp
            origin = roi_origin_for_center(roi_center_for_mask(region), spacing, geometry)
            if not mask_fits_roi(region, spacing, origin, geometry, margin=0.0):
                skipped.append(f"{case.case_id}: lesion {comp} is larger than the ROI "
                               f"({geometry.extent_mm.round(1).tolist()} mm)")
                continue
            classes = np.stack([extract_roi_mask(region & (label == v), spacing, origin, geometry)
                                for v in lesion_labels])
            cum = cumulative_channels(classes)
            if not cum[0].any():
                continue
            reg = (extract_roi_mask(host, spacing, origin, geometry) | cum[0]) if host is not None \
                else np.ones(geometry.size_zyx, bool)
            centroid = np.argwhere(cum[0]).mean(0)
            radius = equivalent_diameter_mm(mask_volume_mm3(cum[0], geometry.spacing_zyx)) / 2
            masks.append(cum)
            regions.append(reg)
            spheres.append(sphere_channel(geometry.size_zyx, geometry.spacing_zyx, centroid, radius))
            feats.append(mask_features(cum, geometry.spacing_zyx, ref))
            case_ids.append(case.case_id)
    if not masks:
        raise LeFusionInputError(f"no usable lesion with label(s) {lesion_labels} in {dataset.folder}; check "
                                 f"--lesion-label against dataset.json labels {dataset.labels}"
                                 + (f" ({len(skipped)} lesion(s) were larger than the ROI)" if skipped else "") + ".")
    for reason in skipped:
        log.warning("skipped %s", reason)
    return MaskRoiSet(np.stack(masks), np.stack(regions), np.stack(spheres), np.stack(feats), case_ids, skipped)


# ------------------------------------------------------------------------------------------------------------
# training
def train_mask_model(dataset: RawDataset, lesion_labels: Sequence[int], out_dir: Path | str, config: TrainConfig,
                     roi: RoiGeometry, region_label: int | None = None, resume: bool = False, overwrite: bool = False,
                     progress: bool = True, check=None) -> Path:
    """Train a lesion mask model (`lefusion train-mask`); returns the path of ``checkpoint_final.pt``.

    Same run folder, resume (per-step randomness from ``(seed, step)``, so a resumed run equals an uninterrupted
    one) and time-budget rules as :func:`lefusion_nnunet.training.trainer.train_lesion_model`, single process
    (``config.texture_clusters`` is unused). The checkpoint has kind ``"mask"``. ``check``: the result of
    :func:`lefusion_nnunet.validation.validate_dataset` if the caller already ran it (label files only are read).
    """

    lesion_labels = [int(v) for v in lesion_labels]
    out_dir = Path(out_dir)
    latest = out_dir / LATEST
    check_run_folder(out_dir, resume, overwrite)
    if check is None:
        validate_dataset(dataset, lesion_labels, region_label, 0, need_lesions=True, read_voxels="none", roi=roi)
    device = resolve_device(config.device)
    if resume and not latest.exists():
        log.warning("--resume: %s holds no checkpoint yet; starting from step 0", out_dir)
    state = load_checkpoint_content(latest, expected_kind="mask") if resume and latest.exists() else None
    if state is not None:
        saved = DataConfig.from_dict(state["data_config"])
        if saved.dataset_name != dataset.name or list(saved.lesion_labels) != lesion_labels:
            raise LeFusionCheckpointError(f"{latest} was trained on {saved.dataset_name} labels "
                                          f"{list(saved.lesion_labels)}, not {dataset.name} labels {lesion_labels}; "
                                          f"use another -o folder.")
        if saved.region_label != region_label:
            raise LeFusionCheckpointError(f"{latest} was trained with --region-label {saved.region_label}, not "
                                          f"{region_label}; resume with the same options or use another -o folder.")
        roi = saved.roi
        config = TrainConfig.from_dict({**state["train_config"], "steps": config.steps, "device": config.device})
    rois = collect_mask_rois(dataset, lesion_labels, roi, region_label, progress=progress)
    data_config = build_data_config(dataset, lesion_labels, region_label, 0, roi, IntensitySpace())
    data_config = DataConfig.from_dict({**data_config.to_dict(), "extra": {"mask_model": {
        "encoding": "cumulative", "features_per_channel": MASK_FEATURES, "sphere": "clip((r - d) / r, -1, 1)",
        "region_hint": region_label is not None, "reference_mm": reference_mm(roi)}}})
    C = len(lesion_labels)
    model_config = DenoiserConfig.from_preset(config.preset, image_channels=C, hist_bins=MASK_FEATURES)
    schedule_config = ScheduleConfig(num_train_timesteps=config.num_train_timesteps)
    model, ema, optimizer, step = init_training_state(model_config, config, state, latest, device)
    schedule = NoiseSchedule(schedule_config).to(device)
    log_file = out_dir / LOG
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out_dir)
        keep = [r for r in read_log_rows(log_file) if r["step"] <= step] if state is not None else []
        atomic_write_bytes(log_file, "".join(json.dumps(r) + "\n" for r in keep).encode())
    except OSError as exc:
        raise _friendly_os_error(exc, out_dir) from exc

    x_all = torch.from_numpy(rois.masks.astype(np.float32) * 2 - 1)          # (N, C, Z, Y, X) in {-1, 1}
    region_all = torch.from_numpy(rois.regions.astype(np.float32))            # (N, Z, Y, X)
    sphere_all = torch.from_numpy(rois.spheres)                               # (N, Z, Y, X)
    feats = torch.from_numpy(rois.features)
    summary = {"num_lesions": len(rois), "case_ids": sorted(set(rois.case_ids)), "skipped_lesions": rois.skipped,
               "features": rois.features.tolist(),
               "lesions_per_class": [int(rois.masks[:, c].reshape(len(rois), -1).any(1).sum()) for c in range(C)]}

    def checkpoint(path: Path) -> None:
        save_checkpoint(path, {
            **training_state_content("mask", model, ema, optimizer, step, model_config, schedule_config, config,
                                     data_config),
            "training_summary": summary, "sampler_defaults": DEFAULT_MASK_SAMPLER.to_dict()})

    bar = tqdm(total=config.steps, initial=step, desc="training mask model", disable=not progress, unit="step")
    t_last, step_last = time.perf_counter(), step
    deadline = time.perf_counter() + 60 * config.max_minutes if config.max_minutes else float("inf")
    try:
        with log_file.open("a") as logf:
            while step < config.steps and time.perf_counter() < deadline:
                rng, gen = step_generators(config.seed, 0, step)
                idx = rng.integers(0, len(x_all), size=config.batch_size)
                axes = [a for a in (-2, -1) if rng.random() < 0.5]            # random y / x flips
                x0, region, sphere = x_all[idx], region_all[idx][:, None], sphere_all[idx][:, None]
                if axes:
                    x0, region, sphere = (torch.flip(a, axes) for a in (x0, region, sphere))
                x0, region, sphere = x0.to(device), region.to(device), sphere.to(device)
                t = torch.randint(0, schedule.num_train_timesteps, (config.batch_size,), generator=gen).to(device)
                noise = torch.randn(x0.shape, generator=gen).to(device)
                drop = (torch.rand(config.batch_size, generator=gen) < config.cond_dropout).to(device)
                x_t = schedule.add_noise(x0, noise, t).contiguous(memory_format=torch.channels_last_3d)
                eps = model(x_t, t, sphere, region.expand_as(x0), feats[idx].to(device), drop_cond=drop)
                loss = F.mse_loss(eps.float(), noise)
                optimizer_step(loss, model, ema, optimizer, config, step)
                step += 1
                bar.update(1)
                last = step == config.steps or time.perf_counter() >= deadline
                if step % config.log_every == 0 or last:
                    now = time.perf_counter()
                    logf.write(json.dumps({"step": step, "loss": round(loss.item(), 6), "steps_per_s": round(
                        (step - step_last) / max(now - t_last, 1e-9), 4)}) + "\n")
                    logf.flush()
                    t_last, step_last = now, step
                if step % config.checkpoint_every == 0 or last:
                    checkpoint(latest)
        checkpoint(out_dir / FINAL)
    except OSError as exc:
        raise _friendly_os_error(exc, log_file) from exc
    finally:
        bar.close()
    plot_loss(log_file, out_dir / PLOT)
    return out_dir / FINAL


def train_mask_model_on_dataset(dataset: str | int, lesion_labels: Sequence[int], config: TrainConfig,
                                out_dir: Path | None = None, lesion_checkpoint: Path | str | None = None,
                                roi_size_zyx: tuple[int, int, int] | None = None,
                                spacing_zyx: tuple[float, float, float] | None = None,
                                region_label: int | None = None, resume: bool = False,
                                overwrite: bool = False) -> Path:
    """`lefusion train-mask`: the mask model's grid and region label from ``lesion_checkpoint`` (recommended) or
    the arguments (ROI default 32 x 64 x 64 voxels at the dataset's median spacing); returns the final checkpoint."""
    raw = load_raw_dataset(dataset)
    raw.check_labels(lesion_labels, "--lesion-label")
    like = checkpoint_data_config(lesion_checkpoint, "lesion") if lesion_checkpoint is not None else None
    size = roi_size_zyx or (like.roi.size_zyx if like else (32, 64, 64))
    spacing = (spacing_zyx or (like.roi.spacing_zyx if like else None)
               or median_spacing([c.images[0] for c in raw.cases]))
    region = region_label if region_label is not None else (like.region_label if like else None)
    out = Path(out_dir) if out_dir is not None else default_run_dir(raw.name, config.preset, kind="mask")
    return train_mask_model(raw, lesion_labels, out, config, RoiGeometry(size, spacing), region_label=region,
                            resume=resume, overwrite=overwrite)
