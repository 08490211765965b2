"""Lesion mask diffusion ("DiffMask"): generate lesion masks with size, location and boundary control.

A second diffusion model learns the *shape* of the lesions of a dataset, on the same kind of model grid as
the lesion model (ROI size and spacing, z, y, x). It reuses :class:`~lefusion_nnunet.diffusion.LesionDenoiser`:

* ``x_t``: the C mask channels in [-1, 1] (-1 = outside). Channels are *cumulative* in lesion-label order:
  channel c = voxels of class c or of any later class, so an inner class (MVO inside an infarct) stays nested
  inside the outer one; ``decode_cumulative`` gives disjoint class masks back.
* ``context``: the sphere channel ``clip((r - d) / r, -1, 1)`` (``d`` = distance in mm to the requested
  centre, ``r`` = requested equivalent radius): 1 at the centre, 0 on the sphere, -1 from 2 r outward.
* ``class_masks``: the host region (``region_label`` or the allowed region at sampling), repeated C times, so
  the model learns lesions that follow their host (an infarct follows the myocardial wall).
* ``cond``: 4 features per channel (relative equivalent diameter, irregularity = 1 - sphericity, present,
  volume fraction of the whole lesion); dropped with probability ``cond_dropout`` (learned null condition).

The loss is plain eps MSE over all voxels (a mask is the whole ROI). Sampling runs DDIM over the whole ROI
(an inpainting sampler with an all-ones generation mask) and post-processes (:func:`postprocess_masks`):

1. size-dependent smoothing of the outer channel: Gaussian, sigma = ``(0.1 + 0.2 * (1 - boundary)) * r`` mm (``r``
   the requested equivalent radius); the component (>= 0.5) overlapping the requested sphere most is the base
   shape (the sphere itself if none does);
2. the shape becomes a signed distance map (mm) plus a weak pull toward the requested sphere (0.2 x the
   distance beyond it), perturbed by smooth noise (correlation length 0.3 r) of amplitude ``boundary * 0.25 * r``
   mm (like the ellipsoid masks of :mod:`lefusion_nnunet.data.masks`). Larger amplitudes are counter-productive:
   the mask then breaks up and its largest piece is a compact noise blob;
3. **threshold**: from the lowest point near the centre the mask grows through increasing level values (an
   ordered flood: a threshold on the level restricted to one connected piece) until it has the requested volume
   (equivalent-sphere diameter) inside the allowed region; holes filled. The requested size is therefore
   enforced by post-processing, not by the network alone (with small training budgets the network gives the
   shape and the location, the threshold gives the size);
4. inner channels: the top voxels of each inner channel inside the outer mask, as many as the reference
   training lesion's volume fraction, largest component, nested.

``boundary`` (0 = smooth ... 1 = irregular) thus steers the post-processing (smoothing vs. perturbation) and the
network's irregularity condition (the ``boundary`` quantile of the training lesions' irregularity).
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from tqdm.auto import tqdm

from lefusion_nnunet.data.config import DataConfig
from lefusion_nnunet.data.dataset import RawDataset
from lefusion_nnunet.data.intensity import IntensitySpace
from lefusion_nnunet.data.io import read_label
from lefusion_nnunet.data.masks import (_smooth_noise, equivalent_diameter_mm, keep_largest_component,
                                        mask_volume_mm3, roi_mask_to_native, sphere_volume_mm3, sphericity)
from lefusion_nnunet.data.roi import (RoiGeometry, extract_roi_mask, mask_fits_roi, roi_center_for_mask,
                                      roi_origin_for_center)
from lefusion_nnunet.diffusion import (DDIMInpaintSampler, DenoiserConfig, LesionDenoiser, NoiseSchedule,
                                       SamplerConfig, ScheduleConfig)
from lefusion_nnunet.errors import LeFusionCheckpointError, LeFusionInputError
from lefusion_nnunet.training.checkpoint import load_checkpoint_content, save_checkpoint
from lefusion_nnunet.training.trainer import (FINAL, LATEST, LOG, PLOT, TrainConfig, _plot_loss,
                                              _remove_stale_temporaries, _version, build_data_config,
                                              check_run_folder, init_training_state, optimizer_step, read_log_rows,
                                              step_generators)
from lefusion_nnunet.utils import _friendly_os_error, atomic_write_bytes, resolve_device, sha256_file

log = logging.getLogger(__name__)

#: Condition features per mask channel: relative diameter, irregularity, present, volume fraction.
MASK_FEATURES = 4
#: Post-processing constants (see the module docstring).
SMOOTH_MIN, SMOOTH_FRACTION = 0.1, 0.2          # smoothing sigma = (SMOOTH_MIN + (1 - b) SMOOTH_FRACTION) r
BOUNDARY_AMPLITUDE, NOISE_CORRELATION = 0.25, 0.3   # perturbation b * 0.25 r, correlation length 0.3 r
SPHERE_PULL = 0.2
#: The generated volume is accepted when within this relative error of the request (native grid).
VOLUME_TOLERANCE = 0.05
DEFAULT_MASK_SAMPLER = SamplerConfig(name="ddim", num_steps=10)


# ------------------------------------------------------------------------------------------------------------
# encodings
def cumulative_channels(class_masks: np.ndarray) -> np.ndarray:
    """Disjoint class masks ``(C, ...)`` -> cumulative channels: channel c = classes c..C-1 (bool)."""
    m = np.asarray(class_masks, bool)
    return np.flip(np.logical_or.accumulate(np.flip(m, 0), axis=0), 0).copy()


def decode_cumulative(channels: np.ndarray) -> np.ndarray:
    """Cumulative channels ``(C, ...)`` -> disjoint class masks (class c = channel c minus channel c + 1)."""
    m = np.asarray(channels, bool).copy()
    for c in range(1, len(m)):                       # enforce nesting first
        m[c] &= m[c - 1]
    out = m.copy()
    out[:-1] &= ~m[1:]
    return out


def sphere_channel(shape_zyx: Sequence[int], spacing_zyx: Sequence[float], center_zyx: Sequence[float],
                   radius_mm: float) -> np.ndarray:
    """float32 ``clip((r - d) / r, -1, 1)`` with ``d`` the distance (mm) of each voxel to ``center_zyx`` (voxels)."""
    r = max(float(radius_mm), 1e-3)
    return np.clip((r - center_distance_mm(shape_zyx, spacing_zyx, center_zyx)) / r, -1.0, 1.0).astype(np.float32)


def center_distance_mm(shape_zyx: Sequence[int], spacing_zyx: Sequence[float],
                       center_zyx: Sequence[float]) -> np.ndarray:
    """float64 ``(Z, Y, X)`` distance in mm of every voxel to ``center_zyx`` (voxel coordinates)."""
    sp = np.asarray(spacing_zyx, np.float64)
    axes = [((np.arange(n) - c) * s) ** 2 for n, c, s in zip(shape_zyx, center_zyx, sp)]
    return np.sqrt(axes[0][:, None, None] + axes[1][None, :, None] + axes[2][None, None, :])


def mask_features(cumulative: np.ndarray, spacing_zyx: Sequence[float], reference_mm: float) -> np.ndarray:
    """``(C * 4,)`` condition of cumulative channels: per channel (equivalent diameter / ``reference_mm``,
    1 - sphericity, present 0/1, volume / outer volume)."""
    outer = max(mask_volume_mm3(cumulative[0], spacing_zyx), 1e-6)
    rows = []
    for ch in cumulative:
        v = mask_volume_mm3(ch, spacing_zyx)
        if v == 0:
            rows.append([0.0, 0.0, 0.0, 0.0])
            continue
        rows.append([equivalent_diameter_mm(v) / reference_mm, float(np.clip(1.0 - sphericity(ch, spacing_zyx), 0, 1)),
                     1.0, v / outer])
    return np.asarray(rows, np.float32).ravel()


def _reference_mm(roi: RoiGeometry) -> float:
    return float(np.mean(roi.extent_mm))


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
    ref = _reference_mm(geometry)
    masks, regions, spheres, feats, case_ids, skipped = [], [], [], [], [], []
    cases = [c for c in dataset.cases if c.label is not None]
    for case in tqdm(cases, desc="reading lesion masks", disable=not progress, leave=False):
        label, props = read_label(case.label)
        lesion_any = np.isin(label, lesion_labels)
        if not lesion_any.any():
            continue
        spacing = tuple(float(s) for s in props["spacing"])
        host = np.isin(label, [int(region_label)] + lesion_labels) if region_label is not None else None
        components, n = ndimage.label(lesion_any, structure=np.ones((3, 3, 3)))
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
    from lefusion_nnunet.validation import validate_dataset

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
        "region_hint": region_label is not None, "reference_mm": _reference_mm(roi)}}})
    C = len(lesion_labels)
    model_config = DenoiserConfig.from_preset(config.preset, image_channels=C, hist_bins=MASK_FEATURES)
    schedule_config = ScheduleConfig(num_train_timesteps=config.num_train_timesteps)
    model, ema, optimizer, step = init_training_state(model_config, config, state, latest, device)
    schedule = NoiseSchedule(schedule_config).to(device)
    log_file = out_dir / LOG
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(out_dir)
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
            "kind": "mask", "model_config": model_config.to_dict(), "schedule_config": asdict(schedule_config),
            "train_config": config.to_dict(), "data_config": data_config.to_dict(),
            "model_state": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "ema_state": {k: v.detach().cpu() for k, v in ema.state_dict().items()},
            "optimizer_state": optimizer.state_dict(), "step": step, "training_summary": summary,
            "sampler_defaults": DEFAULT_MASK_SAMPLER.to_dict(), "package_version": _version()})

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
    _plot_loss(log_file, out_dir / PLOT)
    return out_dir / FINAL


# ------------------------------------------------------------------------------------------------------------
# loading and sampling
@dataclass
class LoadedMaskCheckpoint:
    """A mask model ready to sample: EMA weights in eval mode, its data config and training features."""

    path: Path
    file_sha256: str
    data: DataConfig
    model: LesionDenoiser
    schedule: NoiseSchedule
    features: np.ndarray                 # (N, C * 4) training lesion features
    training_summary: dict
    sampler_defaults: dict


def load_mask_checkpoint(path: Path | str, device: str = "cpu") -> LoadedMaskCheckpoint:
    """Load a ``"mask"`` checkpoint written by :func:`train_mask_model`."""
    content = load_checkpoint_content(path, expected_kind="mask")
    model = LesionDenoiser(DenoiserConfig.from_dict(content["model_config"]))
    model.load_state_dict(content["ema_state"])
    model.to(device).eval()
    summary = dict(content.get("training_summary", {}))
    return LoadedMaskCheckpoint(
        path=Path(path), file_sha256=sha256_file(path), data=DataConfig.from_dict(content["data_config"]), model=model,
        schedule=NoiseSchedule(ScheduleConfig(**content["schedule_config"])).to(device),
        features=np.asarray(summary.pop("features"), np.float32), training_summary=summary,
        sampler_defaults=dict(content.get("sampler_defaults", {})))


def _check_boundary(boundary: float) -> float:
    if not 0.0 <= float(boundary) <= 1.0:
        raise LeFusionInputError(f"--boundary {boundary} must lie between 0 (smooth) and 1 (irregular).")
    return float(boundary)


def postprocess_masks(soft: np.ndarray, spacing_zyx: Sequence[float], target_voxels: float, boundary: float,
                      center_zyx: Sequence[float], radius_mm: float, rng: np.random.Generator,
                      allowed: np.ndarray | None = None, inner_fractions: Sequence[float] = ()) -> np.ndarray:
    """Turn sampled mask channels into cumulative bool masks of a requested size (see the module docstring).

    Args:
        soft: ``(C, Z, Y, X)`` sampled channels in [-1, 1] (cumulative encoding).
        target_voxels: requested outer-mask voxel count on this grid.
        boundary: 0 smooth ... 1 irregular.
        center_zyx, radius_mm: the requested sphere (voxels, mm).
        allowed: bool ``(Z, Y, X)``: lesion voxels only here (None = everywhere).
        inner_fractions: for channels 1..C-1, the volume fraction of the outer mask they should fill
            (0 = absent).
    Returns:
        bool ``(C, Z, Y, X)`` cumulative (nested) masks; the outer one has ``round(target_voxels)`` voxels when
        the allowed region permits (fewer after the largest-component step only if the region is fragmented).
    """
    b = _check_boundary(boundary)
    soft = np.asarray(soft, np.float32)
    C, shape = soft.shape[0], soft.shape[1:]
    sp = np.asarray(spacing_zyx, np.float64)
    allowed = np.ones(shape, bool) if allowed is None else np.asarray(allowed, bool)
    r = max(float(radius_mm), float(sp.min()))
    p = (soft[0] + 1.0) / 2.0
    sigma = (SMOOTH_MIN + (1.0 - b) * SMOOTH_FRACTION) * r / sp
    if sigma.max() > 0.05:
        p = ndimage.gaussian_filter(p, sigma, mode="constant")
    sphere_d = center_distance_mm(shape, sp, center_zyx)
    ball = sphere_d <= r
    base = _component_on_ball((p >= 0.5) & allowed, ball)
    if not base.any():
        base = ball
    level = ndimage.distance_transform_edt(~base, sampling=sp) - ndimage.distance_transform_edt(base, sampling=sp)
    level = level + SPHERE_PULL * np.maximum(sphere_d - r, 0.0)
    if b > 0:
        noise = _smooth_noise(rng, shape, np.maximum(NOISE_CORRELATION * r / sp, 0.5))
        level = level - b * BOUNDARY_AMPLITUDE * r * noise
    level = np.where(allowed, level + 1e-3 * sphere_d, np.inf)     # ties go to voxels nearer the centre
    outer = np.zeros(shape, bool)
    if allowed.any():
        near = ball & allowed
        pool = np.where(near if near.any() else allowed, level, np.inf)
        seed = np.unravel_index(int(np.argmin(pool)), shape)
        outer = _select_volume(level, allowed, max(1, int(round(target_voxels))), seed)
    out = np.zeros((C, *shape), bool)
    out[0] = outer
    for c in range(1, C):
        frac = float(inner_fractions[c - 1]) if c - 1 < len(inner_fractions) else 0.0
        n_in = int(round(frac * out[c - 1].sum()))
        if n_in < 1:
            break
        q = (soft[c] + 1.0) / 2.0
        q = ndimage.gaussian_filter(q, np.maximum(sigma, 0.5))
        depth = ndimage.distance_transform_edt(out[c - 1], sampling=sp)
        score = np.where(out[c - 1], q + 0.05 * depth / max(depth.max(), 1e-6), -np.inf).ravel()
        thresh = np.partition(score, score.size - n_in)[score.size - n_in]
        out[c] = keep_largest_component(score.reshape(shape) >= thresh) & out[c - 1]
    return out


_OFFSETS26 = np.array([(a, b, c) for a in (-1, 0, 1) for b in (-1, 0, 1) for c in (-1, 0, 1) if (a, b, c) != (0, 0, 0)])


def _grow(level: np.ndarray, allowed: np.ndarray, seed: Sequence[int], k: int) -> np.ndarray:
    """Ordered region growing: from ``seed``, repeatedly add the 26-neighbour of lowest ``level`` inside
    ``allowed`` until the region has ``k`` voxels (or no allowed neighbour is left). Always one component."""
    import heapq

    shape = np.asarray(level.shape)
    out = np.zeros(level.shape, bool)
    seen = np.zeros(level.shape, bool)
    heap = [(float(level[tuple(seed)]), tuple(int(v) for v in seed))]
    seen[tuple(seed)] = True
    n = 0
    while heap and n < k:
        _, idx = heapq.heappop(heap)
        out[idx] = True
        n += 1
        nb = np.asarray(idx) + _OFFSETS26
        nb = nb[((nb >= 0) & (nb < shape)).all(1)]
        for z, y, x in nb:
            if not seen[z, y, x] and allowed[z, y, x]:
                seen[z, y, x] = True
                heapq.heappush(heap, (float(level[z, y, x]), (int(z), int(y), int(x))))
    return out


def _select_volume(level: np.ndarray, allowed: np.ndarray, want: int, seed: Sequence[int],
                   max_rounds: int = 4) -> np.ndarray:
    """One component of about ``want`` voxels grown from ``seed`` through the lowest ``level`` of ``allowed``,
    holes filled (filling adds voxels, so the growth target is lowered by what it added, a few rounds)."""
    k, best, best_err = want, np.zeros(level.shape, bool), None
    for _ in range(max_rounds):
        outer = ndimage.binary_fill_holes(_grow(level, allowed, seed, max(1, k))) & allowed
        got = int(outer.sum())
        if best_err is None or abs(got - want) < best_err:
            best, best_err = outer, abs(got - want)
        if best_err <= max(1, 0.01 * want) or got < k:         # close enough, or the region is exhausted
            break
        k = max(1, k - (got - want))
    return best


def _component_on_ball(mask: np.ndarray, ball: np.ndarray) -> np.ndarray:
    """The 26-connected component of ``mask`` overlapping ``ball`` most (empty when none overlaps)."""
    labels, n = ndimage.label(mask, structure=np.ones((3, 3, 3)))
    if n == 0:
        return np.zeros_like(mask)
    overlap = np.bincount(labels[ball], minlength=n + 1)
    overlap[0] = 0
    return labels == int(np.argmax(overlap)) if overlap.max() > 0 else np.zeros_like(mask)


@dataclass
class GeneratedMask:
    """A mask made for one case: disjoint class masks on the native grid and a JSON-safe record."""

    masks: np.ndarray                     # bool (C, Z, Y, X)
    info: dict


class MaskGenerator:
    """Samples lesion masks from a mask checkpoint with size, location and boundary control.

    Args:
        checkpoint: a :class:`LoadedMaskCheckpoint` or a checkpoint path.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        sampler: DDIM settings (default: the checkpoint's, 10 steps).
        guidance_scale: classifier-free guidance weight on the size/irregularity condition.
    """

    def __init__(self, checkpoint: LoadedMaskCheckpoint | str | Path, device: str = "auto",
                 sampler: SamplerConfig | None = None, guidance_scale: float = 1.0):
        self.device = resolve_device(device)
        self.checkpoint = checkpoint if isinstance(checkpoint, LoadedMaskCheckpoint) \
            else load_mask_checkpoint(checkpoint, self.device)
        self.checkpoint.model.to(self.device)
        self.checkpoint.schedule = self.checkpoint.schedule.to(self.device)
        cfg = sampler or SamplerConfig(**(self.checkpoint.sampler_defaults or DEFAULT_MASK_SAMPLER.to_dict()))
        if cfg.name != "ddim":
            raise LeFusionInputError("the mask model samples with the ddim sampler only; pass --sampler ddim.")
        self.sampler = DDIMInpaintSampler(cfg)
        if guidance_scale < 0:
            raise LeFusionInputError(f"--guidance {guidance_scale} must be >= 0.")
        self.guidance_scale = float(guidance_scale)

    @property
    def data(self) -> DataConfig:
        return self.checkpoint.data

    @property
    def num_classes(self) -> int:
        return self.data.num_classes

    def condition(self, diameter_mm: float, boundary: float, rng: np.random.Generator) -> np.ndarray:
        """``(C * 4,)`` condition: a random training lesion's features, rescaled to ``diameter_mm``, with the
        irregularity set to the ``boundary`` quantile of the training lesions'."""
        feats = self.checkpoint.features.reshape(len(self.checkpoint.features), self.num_classes, MASK_FEATURES)
        ref = feats[int(rng.integers(len(feats)))].copy()
        ratio = (float(diameter_mm) / _reference_mm(self.data.roi)) / max(float(ref[0, 0]), 1e-6)
        ref[:, 0] *= ratio
        for c in range(self.num_classes):
            present = feats[:, c, 2] > 0
            if ref[c, 2] > 0 and present.any():
                ref[c, 1] = float(np.quantile(feats[present, c, 1], _check_boundary(boundary)))
        return ref.ravel().astype(np.float32)

    def sample_soft(self, centers_zyx: np.ndarray, diameter_mm: float, conds: np.ndarray,
                    regions: np.ndarray | None = None, generator=None) -> np.ndarray:
        """Raw DDIM samples ``(n, C, Z, Y, X)`` in [-1, 1] on the model grid.

        Args:
            centers_zyx: ``(n, 3)`` sphere centres in model-grid voxels.
            conds: ``(n, C * 4)`` conditions (:meth:`condition`).
            regions: bool ``(n, Z, Y, X)`` host/allowed region hint, or None (everywhere).
            generator: a torch generator or one per sample.
        """
        roi = self.data.roi
        n, C = len(centers_zyx), self.num_classes
        shape = (n, C, *roi.size_zyx)
        spheres = np.stack([sphere_channel(roi.size_zyx, roi.spacing_zyx, c, diameter_mm / 2) for c in centers_zyx])
        reg = np.ones((n, *roi.size_zyx), np.float32) if regions is None else np.asarray(regions, np.float32)
        if not self.data.extra.get("mask_model", {}).get("region_hint", False):
            reg = np.ones_like(reg)
        dev = self.device
        context = torch.from_numpy(spheres[:, None]).to(dev)
        hint = torch.from_numpy(reg[:, None]).to(dev).expand(shape).contiguous()
        cond = torch.from_numpy(np.asarray(conds, np.float32)).to(dev)
        model, w = self.checkpoint.model, self.guidance_scale

        def eps_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            if w == 1.0:
                return model(x_t, t, context, hint, cond).float()
            b = x_t.shape[0]
            drop = torch.cat([torch.zeros(b, dtype=torch.bool), torch.ones(b, dtype=torch.bool)]).to(x_t.device)
            both = model(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([context, context]),
                         torch.cat([hint, hint]), torch.cat([cond, cond]), drop_cond=drop).float()
            eps_c, eps_u = both.chunk(2)
            return eps_u + w * (eps_c - eps_u)

        known = torch.zeros(shape, device=dev)
        ones = torch.ones((n, 1, *roi.size_zyx), device=dev)
        x0 = self.sampler.sample(eps_fn, self.checkpoint.schedule, known, ones, generator=generator)
        return x0.float().cpu().numpy()

    def sample(self, diameter_mm: float, boundary: float = 0.3, n: int = 1, generator=None,
               rng: np.random.Generator | None = None, center_zyx: Sequence[float] | None = None,
               region: np.ndarray | None = None) -> np.ndarray:
        """``n`` post-processed masks on the model grid: bool ``(n, C, Z, Y, X)`` disjoint class masks.

        Args:
            diameter_mm: equivalent-sphere diameter of the whole lesion (all classes), mm.
            boundary: 0 smooth ... 1 irregular.
            center_zyx: sphere centre in model voxels (default: the ROI centre).
            region: bool ``(Z, Y, X)`` allowed region on the model grid (default: everywhere).
        """
        rng = rng if rng is not None else np.random.default_rng()
        _check_diameter(diameter_mm)
        roi = self.data.roi
        center = np.asarray(center_zyx if center_zyx is not None else (np.asarray(roi.size_zyx) - 1) / 2.0, np.float64)
        conds = np.stack([self.condition(diameter_mm, boundary, rng) for _ in range(n)])
        regions = None if region is None else np.broadcast_to(np.asarray(region, bool), (n, *roi.size_zyx))
        soft = self.sample_soft(np.repeat(center[None], n, 0), diameter_mm, conds, regions, generator)
        target = sphere_volume_mm3(diameter_mm) / float(np.prod(roi.spacing_zyx))
        out = []
        for i in range(n):
            fr = conds[i].reshape(self.num_classes, MASK_FEATURES)[1:, 3]
            cum = postprocess_masks(soft[i], roi.spacing_zyx, target, boundary, center, diameter_mm / 2, rng,
                                    None if region is None else regions[i], fr)
            out.append(decode_cumulative(cum))
        return np.stack(out)

    def generate_in_case(self, allowed_zyx: np.ndarray, spacing_zyx: Sequence[float], diameter_mm: float,
                         boundary: float, rng: np.random.Generator, generator=None,
                         center_zyx: Sequence[float] | None = None, max_centers: int = 4) -> GeneratedMask | None:
        """A lesion mask for one case on its native grid, every voxel inside ``allowed_zyx``.

        The centre is ``center_zyx`` (native voxels; the nearest allowed voxel is used) or a random allowed
        place (:func:`lefusion_nnunet.data.masks.choose_center`, up to ``max_centers`` tries when the region
        around a centre is too small). The mask is sampled on the model grid around the centre with the allowed
        region as hint, post-processed to the requested volume, resampled to the native grid, intersected with
        ``allowed`` and its threshold corrected until the native volume is within 5 % (up to 4 rounds).

        Returns:
            :class:`GeneratedMask` (disjoint class masks ``(C, Z, Y, X)`` and a record: centre, requested and
            obtained diameter, volume, boundary), or None when no centre gives the requested size.
        """
        from lefusion_nnunet.data.masks import choose_center, nearest_allowed_voxel

        _check_diameter(diameter_mm)
        b = _check_boundary(boundary)
        allowed = np.asarray(allowed_zyx, bool)
        sp = np.asarray(spacing_zyx, np.float64)
        roi = self.data.roi
        scale = np.asarray(roi.spacing_zyx) / sp
        want_mm3 = sphere_volume_mm3(diameter_mm)
        best: GeneratedMask | None = None
        tries = 1 if center_zyx is not None else max_centers
        for attempt in range(tries):
            center = (nearest_allowed_voxel(allowed, center_zyx, sp) if center_zyx is not None
                      else choose_center(allowed, sp, diameter_mm / 2, rng))
            if center is None:
                return None
            origin = roi_origin_for_center(center, sp, roi)
            region = extract_roi_mask(allowed, sp, origin, roi)
            center_model = (center - origin) / scale
            cond = self.condition(diameter_mm, b, rng)[None]
            soft = self.sample_soft(center_model[None], diameter_mm, cond, region[None], generator)[0]
            fractions = cond[0].reshape(self.num_classes, MASK_FEATURES)[1:, 3]
            target = want_mm3 / float(np.prod(roi.spacing_zyx))
            post_seed = int(rng.integers(1 << 62))
            for _ in range(4):
                cum = postprocess_masks(soft, roi.spacing_zyx, target, b, center_model, diameter_mm / 2,
                                        np.random.default_rng(post_seed), region, fractions)
                native = roi_mask_to_native(cum, origin, sp, roi, allowed.shape)
                native[0] = keep_largest_component(native[0] & allowed)
                for c in range(1, len(native)):
                    native[c] &= native[c - 1]
                got = mask_volume_mm3(native[0], sp)
                if got > 0 and abs(got / want_mm3 - 1.0) <= VOLUME_TOLERANCE:
                    break
                target *= want_mm3 / max(got, float(np.prod(sp)))
            classes = decode_cumulative(native)
            got = mask_volume_mm3(native[0], sp)
            info = {"center_voxel_zyx": [int(v) for v in center], "requested_diameter_mm": round(float(diameter_mm), 4),
                    "diameter_mm": round(equivalent_diameter_mm(got), 4), "volume_mm3": round(got, 4),
                    "boundary": b, "attempt": attempt}
            candidate = GeneratedMask(classes, info)
            if best is None or abs(got - want_mm3) < abs(mask_volume_mm3(best.masks, sp) - want_mm3):
                best = candidate
            if got > 0 and abs(got / want_mm3 - 1.0) <= 2 * VOLUME_TOLERANCE:
                break
        if best is None or not best.masks.any():
            return None
        return best


def _check_diameter(diameter_mm: float) -> None:
    if not (math.isfinite(float(diameter_mm)) and float(diameter_mm) > 0):
        raise LeFusionInputError(f"lesion diameter {diameter_mm} mm must be a positive number.")


def check_mask_checkpoint_matches(mask_data: DataConfig, lesion_data: DataConfig, mask_path: Path | str) -> None:
    """Raise when a mask model's lesion labels differ from the lesion model's."""
    if tuple(mask_data.lesion_labels) != tuple(lesion_data.lesion_labels):
        raise LeFusionInputError(f"the mask checkpoint {mask_path} was trained for lesion label(s) "
                                 f"{list(mask_data.lesion_labels)} but the lesion model for "
                                 f"{list(lesion_data.lesion_labels)}; train-mask with the same --lesion-label values.")


def generate_case_mask(generator: MaskGenerator, image_zyx: np.ndarray, spacing_zyx: Sequence[float],
                       properties: dict, label_zyx: np.ndarray | None, diameter_mm: float, boundary: float,
                       seed: int = 0, center_mm: Sequence[float] | None = None, region_label: int | None = None,
                       region_mask: np.ndarray | None = None) -> GeneratedMask:
    """A diffusion lesion mask for one image (what `lefusion sample-mask` and `synthesize --mask-source diffusion`
    do): the allowed region is ``region_mask`` > ``region_label`` (default: the mask model's) > the body, minus
    existing lesions; the centre is ``center_mm`` (world x, y, z mm) or random. Raises
    :class:`LeFusionInputError` when no mask of that size fits."""
    from lefusion_nnunet.data.masks import allowed_region
    from lefusion_nnunet.synthesis import seeded_generator, seeded_rng
    from lefusion_nnunet.variants import world_to_voxel

    region_label = region_label if region_label is not None else generator.data.region_label
    lesions = list(generator.data.lesion_labels)
    if region_mask is not None:
        allowed = allowed_region(label_zyx, region_mask=region_mask, lesion_labels=lesions)
    elif region_label is not None and label_zyx is not None:
        allowed = allowed_region(label_zyx, region_label=int(region_label), lesion_labels=lesions)
    else:
        allowed = allowed_region(label_zyx, image=image_zyx, lesion_labels=lesions)
    center = None if center_mm is None else world_to_voxel(center_mm, properties)
    if center is not None and ((center < -0.5).any() or (center > np.asarray(allowed.shape) - 0.5).any()):
        raise LeFusionInputError(f"--center {list(center_mm)} mm lies outside the image (voxel "
                                 f"{np.round(center, 1).tolist()} of {list(allowed.shape)}, z, y, x); pick a point "
                                 f"inside.")
    made = generator.generate_in_case(allowed, spacing_zyx, diameter_mm, boundary, seeded_rng(seed, "mask"),
                                      seeded_generator(seed, "mask"), center_zyx=center)
    if made is None:
        raise LeFusionInputError(f"no {diameter_mm:.1f} mm lesion fits the allowed region of this image; use a "
                                 f"smaller --size-mm, another --center or another --region-label.")
    return made
