"""`lefusion train`: lesion-focused diffusion training on the lesion ROIs of an nnU-Net raw dataset.

Objective (LeFusion eq. for the lesion-focused loss): epsilon prediction with the squared error taken
inside the lesion mask only and normalised by the lesion's voxel count, so a 5 mm nodule weighs as much
as a 30 mm one. The network also sees the clean background (lesion zeroed) and the class masks, and the
histogram condition is dropped with probability ``cond_dropout`` so classifier-free guidance has a
trained null condition. EMA weights are kept and are what sampling uses.

Run folder: ``checkpoint_latest.pt`` (every ``checkpoint_every`` steps), ``checkpoint_final.pt``,
``training_log.jsonl`` and ``loss.png``. ``resume=True`` continues exactly where the last checkpoint
stopped (model, EMA, optimiser, step and both RNG states are restored).
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from lefusion_nnunet.checkpoints.format import load_checkpoint_content, save_checkpoint
from lefusion_nnunet.data.config import DataConfig, build_data_config
from lefusion_nnunet.data.dataset import RawDataset, load_raw_dataset
from lefusion_nnunet.data.histogram import HIST_BINS, cluster_prototypes
from lefusion_nnunet.data.intensity import IntensitySpace
from lefusion_nnunet.data.lesions import LesionRoiSet, collect_lesion_rois, lesion_extents_mm
from lefusion_nnunet.data.roi import RoiGeometry, choose_roi_geometry
from lefusion_nnunet.diffusion import DenoiserConfig, NoiseSchedule, ScheduleConfig, masked_epsilon_loss
from lefusion_nnunet.diffusion.inputs import lesion_model_inputs
from lefusion_nnunet.distributed import init_distributed
from lefusion_nnunet.errors import LeFusionCheckpointError, LeFusionInputError
from lefusion_nnunet.paths import default_run_dir
from lefusion_nnunet.training.loop import (FINAL, LATEST, LOG, PLOT, TrainConfig, budget_exhausted, check_run_folder,
                                           init_training_state, optimizer_step, plot_loss, read_log_rows,
                                           remove_stale_temporaries, step_generators, training_state_content)
from lefusion_nnunet.utils import _friendly_os_error, atomic_write_bytes, resolve_device
from lefusion_nnunet.validation import (check_channel, check_labels_declared, median_spacing_zyx,
                                        note_roi_larger_than_images, validate_dataset)

log = logging.getLogger(__name__)


class _Augment:
    """Random flips along y and x of an ROI batch (numpy generator)."""

    @staticmethod
    def __call__(arrays: list[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
        axes = [a for a in (-2, -1) if rng.random() < 0.5]
        return [np.flip(a, axis=axes).copy() if axes else a for a in arrays]


def _prototypes(rois: LesionRoiSet, k: int, seed: int) -> list[dict]:
    out = []
    for c in range(rois.class_masks.shape[1]):
        present = rois.class_masks[:, c].reshape(len(rois), -1).any(1)
        out.append(cluster_prototypes(rois.histograms[present, c * HIST_BINS:(c + 1) * HIST_BINS], k, seed).to_dict())
    return out


def train_lesion_model(dataset: RawDataset, lesion_labels: list[int], out_dir: Path, config: TrainConfig,
                       roi: RoiGeometry, region_label: int | None = None, intensity: IntensitySpace | None = None,
                       channel: int = 0, resume: bool = False, overwrite: bool = False,
                       progress: bool = True, check=None) -> Path:
    """Train a lesion model; returns the path of ``checkpoint_final.pt``.

    Args:
        dataset: the raw dataset (read only).
        lesion_labels: lesion class label values (C = len; C > 1 = multi-channel decomposition).
        out_dir: run folder.
        roi: model grid (size and spacing, z, y, x).
        intensity: None -> derived from the training lesions (CT window) or per-case percentiles (MR).
        resume: continue from ``out_dir/checkpoint_latest.pt`` (a run killed before its first checkpoint
            starts from step 0).
        overwrite: allow starting over in a folder that already holds checkpoints.
        check: the result of :func:`lefusion_nnunet.validation.validate_dataset` when the caller already
            validated the dataset (else it is validated here, before anything is written).
    """

    out_dir = Path(out_dir)
    latest = out_dir / LATEST
    lesion_labels = [int(v) for v in lesion_labels]
    check_run_folder(out_dir, resume, overwrite)
    if check is None:
        check = validate_dataset(dataset, lesion_labels, region_label, channel, need_lesions=True, roi=roi)
    dist_ctx, device = init_distributed(resolve_device(config.device))
    progress = progress and dist_ctx.is_main
    if resume and not latest.exists():
        log.warning("--resume: %s holds no checkpoint yet (the run stopped before its first one); starting "
                    "from step 0", out_dir)
    state = load_checkpoint_content(latest, expected_kind="lesion") if resume and latest.exists() else None
    if state is not None:
        saved = DataConfig.from_dict(state["data_config"])
        if saved.dataset_name != dataset.name or list(saved.lesion_labels) != list(lesion_labels):
            raise LeFusionCheckpointError(f"{latest} was trained on {saved.dataset_name} labels "
                                          f"{list(saved.lesion_labels)}, not {dataset.name} labels {lesion_labels}; "
                                          f"use another -o folder.")
        if saved.channel != int(channel) or saved.region_label != region_label:
            raise LeFusionCheckpointError(f"{latest} was trained with --channel {saved.channel} and --region-label "
                                          f"{saved.region_label}, not --channel {channel} and --region-label "
                                          f"{region_label}; resume with the same options or use another -o folder.")
        if "train_config" not in state or "model_state" not in state or "optimizer_state" not in state:
            raise LeFusionCheckpointError(f"{latest} holds no training state (model, optimiser) to resume from; "
                                          f"pass --overwrite to start over.")
        intensity, roi = saved.intensity, saved.roi
        # a run written before the ring shape was recorded keeps the ring it trained with (its DataConfig's)
        config = TrainConfig.from_dict({"border_ring_shape": saved.border_ring_shape, **state["train_config"],
                                        "steps": config.steps, "device": config.device})
    rois = collect_lesion_rois(dataset, lesion_labels, roi, intensity, channel, progress=progress)
    data_config = build_data_config(dataset, lesion_labels, region_label, channel, roi, rois.intensity,
                                    border_ring_voxels=config.border_ring, border_ring_shape=config.border_ring_shape)
    model_config = DenoiserConfig.from_preset(config.preset, image_channels=len(lesion_labels), hist_bins=HIST_BINS,
                                              cond_encoding="histogram")
    schedule_config = ScheduleConfig(num_train_timesteps=config.num_train_timesteps)
    prototypes = _prototypes(rois, config.texture_clusters, config.seed)

    model, ema, optimizer, step = init_training_state(model_config, config, state, latest, device)
    schedule = NoiseSchedule(schedule_config).to(device)
    net = model
    if dist_ctx.world_size > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.startswith("cuda") else None)

    created = not out_dir.exists()
    log_file = out_dir / LOG
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        if dist_ctx.is_main:
            remove_stale_temporaries(out_dir)
            # a fresh log, or the log up to the checkpoint we resume from (rows after it are replayed)
            keep = [r for r in read_log_rows(log_file) if r["step"] <= step] if state is not None else []
            atomic_write_bytes(log_file, "".join(json.dumps(r) + "\n" for r in keep).encode())
    except OSError as exc:
        raise _friendly_os_error(exc, out_dir) from exc
    except LeFusionInputError:
        if created:
            import shutil

            shutil.rmtree(out_dir, ignore_errors=True)
        raise

    images = torch.from_numpy(rois.images)                                  # (N, Z, Y, X) model space
    masks = torch.from_numpy(rois.class_masks)                              # (N, C, Z, Y, X) bool
    hists = torch.from_numpy(rois.histograms)                               # (N, C * 16)
    summary = {"num_lesions": len(rois), "case_ids": sorted(set(rois.case_ids)), "skipped_lesions": rois.skipped,
               "lesions_per_class": [int(rois.class_masks[:, c].reshape(len(rois), -1).any(1).sum())
                                     for c in range(len(lesion_labels))]}

    def checkpoint(path: Path) -> None:
        save_checkpoint(path, {
            **training_state_content("lesion", model, ema, optimizer, step, model_config, schedule_config, config,
                                     data_config),
            "prototypes": prototypes, "training_histograms": hists.clone(), "training_summary": summary})

    augment = _Augment()
    use_amp = device.startswith("cuda")
    bar = tqdm(total=config.steps, initial=step, desc="training", disable=not progress, unit="step")
    t_last, step_last = time.perf_counter(), step
    deadline = time.perf_counter() + 60 * config.max_minutes if config.max_minutes else float("inf")
    summary["world_size"] = dist_ctx.world_size
    try:
        logf = log_file.open("a") if dist_ctx.is_main else None
    except OSError as exc:
        raise _friendly_os_error(exc, log_file) from exc
    try:
        while step < config.steps and not budget_exhausted(deadline, dist_ctx):
            rng, gen = step_generators(config.seed, dist_ctx.rank, step)
            idx = rng.integers(0, len(images), size=config.batch_size)
            x0_np, m_np = augment([images[idx].numpy(), masks[idx].numpy()], rng)
            inputs = lesion_model_inputs(torch.from_numpy(x0_np).to(device)[:, None],      # (B, 1, Z, Y, X)
                                         torch.from_numpy(m_np).to(device),                 # (B, C, Z, Y, X)
                                         border_ring=data_config.border_ring_voxels,
                                         ring_shape=data_config.border_ring_shape,
                                         spacing_zyx=data_config.roi.spacing_zyx)
            cond = hists[idx].to(device)
            t = torch.randint(0, schedule.num_train_timesteps, (config.batch_size,), generator=gen).to(device)
            noise = torch.randn(inputs.known.shape, generator=gen).to(device)
            drop = (torch.rand(config.batch_size, generator=gen) < config.cond_dropout).to(device)
            x_t = schedule.add_noise(inputs.known, noise, t).contiguous(memory_format=torch.channels_last_3d)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
                eps = net(x_t, t, inputs.context, inputs.class_masks, cond, drop_cond=drop)
            loss = masked_epsilon_loss(eps.float(), noise, inputs.class_masks)
            optimizer_step(loss, model, ema, optimizer, config, step)
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
            last = step == config.steps or budget_exhausted(deadline, dist_ctx)
            if logf is not None and (step % config.log_every == 0 or last):
                now = time.perf_counter()
                logf.write(json.dumps({"step": step, "loss": round(loss.item(), 6),
                                       "steps_per_s": round((step - step_last) / max(now - t_last, 1e-9), 4)}) + "\n")
                logf.flush()
                t_last, step_last = now, step
            if dist_ctx.is_main and (step % config.checkpoint_every == 0 or last):
                checkpoint(latest)
        if dist_ctx.is_main:
            checkpoint(out_dir / FINAL)
    except OSError as exc:  # e.g. the log line could not be written: disk full
        raise _friendly_os_error(exc, log_file) from exc
    except LeFusionInputError:
        # a checkpoint could not be written (its temporary file is already removed); a run folder this call
        # created and that holds no checkpoint is partial output: remove it
        if created and not latest.exists() and dist_ctx.is_main:
            import shutil

            if logf is not None:
                logf.close()
                logf = None
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
    finally:
        bar.close()
        if logf is not None:
            try:
                logf.close()
            except OSError:
                pass
    if dist_ctx.is_main:
        plot_loss(log_file, out_dir / PLOT)
    dist_ctx.shutdown()
    return out_dir / FINAL




def train_lesion_model_on_dataset(dataset: str | int, lesion_labels: list[int], config: TrainConfig,
                                  out_dir: Path | None = None, roi_size_zyx: tuple[int, int, int] | None = None,
                                  spacing_zyx: tuple[float, float, float] | None = None,
                                  window: tuple[float, float] | None = None, region_label: int | None = None,
                                  channel: int = 0, resume: bool = False, overwrite: bool = False) -> Path:
    """`lefusion train`: validate the dataset and the run folder, choose the model grid, train; returns the final
    checkpoint.

    Args:
        dataset: dataset id or name under ``$nnUNet_raw``.
        out_dir: run folder (default ``$nnUNet_results/<Dataset>/LeFusion_<preset>/``).
        roi_size_zyx: model ROI in voxels (z, y, x); default planned in mm from the training lesions
            (:func:`~lefusion_nnunet.data.roi.choose_roi_geometry`: every lesion fits with margin, thick slices kept).
        spacing_zyx: model spacing in mm (z, y, x); default the dataset's median spacing (coarsened by the
            default ROI plan where the lesions need it).
        window: CT window ``(lo, hi)`` in HU mapped to [-1, 1]; default chosen from the training lesions.
    """
    if window is not None and not window[0] < window[1]:
        raise LeFusionInputError(f"--window {window[0]:g} {window[1]:g} must be LO HI with LO < HI (HU).")
    raw = load_raw_dataset(dataset)
    check_labels_declared(raw, lesion_labels, region_label)  # cheap checks first
    check_channel(raw, channel)
    out = Path(out_dir) if out_dir is not None else default_run_dir(raw.name, config.preset)
    check_run_folder(out, resume, overwrite)
    check = validate_dataset(raw, lesion_labels, region_label, channel, need_lesions=True)
    spacing = spacing_zyx or median_spacing_zyx(check)
    if roi_size_zyx is None:
        roi = choose_roi_geometry(lesion_extents_mm(raw, lesion_labels), spacing,
                                  multiple=DenoiserConfig.from_preset(config.preset).spatial_divisor)
        log.info("model ROI: %s voxels at %s mm = %s mm (x, y, z), planned from the training lesions",
                 " x ".join(map(str, roi.size_zyx[::-1])), " x ".join(f"{v:g}" for v in roi.spacing_zyx[::-1]),
                 " x ".join(f"{v:.0f}" for v in roi.extent_mm[::-1]))
    else:
        roi = RoiGeometry(size_zyx=tuple(roi_size_zyx), spacing_zyx=spacing)
    note_roi_larger_than_images(check, roi)
    intensity = IntensitySpace("window", window=tuple(window)) if window else None
    return train_lesion_model(raw, lesion_labels, out, config, roi, region_label=region_label, intensity=intensity,
                              channel=channel, resume=resume, overwrite=overwrite, check=check)
