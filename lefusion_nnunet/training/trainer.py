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
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from lefusion_nnunet.data.config import DataConfig
from lefusion_nnunet.data.dataset import RawDataset
from lefusion_nnunet.data.histogram import HIST_BINS, cluster_prototypes
from lefusion_nnunet.data.intensity import IntensitySpace
from lefusion_nnunet.data.lesions import LesionRoiSet, collect_lesion_rois
from lefusion_nnunet.data.roi import RoiGeometry
from lefusion_nnunet.diffusion import (DenoiserConfig, LesionDenoiser, NoiseSchedule, ScheduleConfig,
                                       masked_epsilon_loss)
from lefusion_nnunet.distributed import DistributedContext, init_distributed
from lefusion_nnunet.errors import LeFusionCheckpointError, LeFusionInputError
from lefusion_nnunet.training.checkpoint import load_checkpoint_content, save_checkpoint
from lefusion_nnunet.utils import _friendly_os_error, atomic_write_bytes, resolve_device

log = logging.getLogger(__name__)
LATEST, FINAL, LOG, PLOT = "checkpoint_latest.pt", "checkpoint_final.pt", "training_log.jsonl", "loss.png"


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings of `lefusion train` (saved in the checkpoint)."""

    preset: str = "small"
    steps: int = 2000
    batch_size: int = 4
    lr: float = 2e-4
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    cond_dropout: float = 0.1
    checkpoint_every: int = 250
    log_every: int = 10
    num_train_timesteps: int = 300
    texture_clusters: int = 3
    seed: int = 0
    device: str = "auto"
    max_minutes: float | None = None   # wall-clock budget: stop early (and save) once exceeded

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "checkpoint_every", "log_every", "texture_clusters"):
            if getattr(self, name) < 1:
                raise LeFusionInputError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}.")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        return cls(**d)


def ema_decay_at(step: int, decay: float) -> float:
    """EMA warm-up: short runs are not dominated by the random initialisation."""
    return min(decay, (1 + step) / (10 + step))


def init_training_state(model_config: DenoiserConfig, config: TrainConfig, state: dict | None, source: Path,
                        device: str) -> tuple[LesionDenoiser, LesionDenoiser, torch.optim.Optimizer, int]:
    """The denoiser (seeded initial weights), its EMA copy and AdamW, restored from ``state`` (the content of
    checkpoint ``source``) when resuming; returns ``(model, ema, optimizer, step)`` with both models on
    ``device`` in channels-last-3d (faster Conv3d, notably the backward, on CPU and CUDA)."""
    with torch.random.fork_rng(devices=[]):  # seeded initial weights without touching the global RNG
        torch.manual_seed(config.seed)
        model = LesionDenoiser(model_config)
    ema = LesionDenoiser(model_config)
    ema.load_state_dict(model.state_dict())
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    step = 0
    if state is not None:
        try:
            model.load_state_dict(state["model_state"])
            ema.load_state_dict(state["ema_state"])
            optimizer.load_state_dict(state["optimizer_state"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise LeFusionCheckpointError(f"the weights in {source} do not fit the {config.preset!r} model it "
                                          f"records; pass --overwrite to start over.") from exc
        step = int(state["step"])
    model.to(device, memory_format=torch.channels_last_3d).train()
    ema.to(device, memory_format=torch.channels_last_3d).eval().requires_grad_(False)
    return model, ema, optimizer, step


def optimizer_step(loss: torch.Tensor, model: torch.nn.Module, ema: torch.nn.Module,
                   optimizer: torch.optim.Optimizer, config: TrainConfig, step: int) -> None:
    """Backward, gradient clipping, AdamW step and the EMA update (with warm-up) of one training step."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
    optimizer.step()
    with torch.no_grad():
        d = ema_decay_at(step, config.ema_decay)
        for p_ema, p in zip(ema.parameters(), model.parameters()):
            p_ema.lerp_(p, 1 - d)
        for b_ema, b in zip(ema.buffers(), model.buffers()):
            b_ema.copy_(b)


def training_state_content(kind: str, model: torch.nn.Module, ema: torch.nn.Module,
                           optimizer: torch.optim.Optimizer, step: int, model_config: DenoiserConfig,
                           schedule_config: ScheduleConfig, config: TrainConfig, data_config: DataConfig) -> dict:
    """The checkpoint entries every diffusion training run writes (what :func:`init_training_state` restores, plus
    the configs); callers add their kind-specific entries. Tensors are detached CPU copies."""
    return {"kind": kind, "model_config": model_config.to_dict(), "schedule_config": asdict(schedule_config),
            "train_config": config.to_dict(), "data_config": data_config.to_dict(),
            "model_state": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "ema_state": {k: v.detach().cpu() for k, v in ema.state_dict().items()},
            "optimizer_state": optimizer.state_dict(), "step": step, "package_version": _version()}


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


def read_log_rows(log_file: Path) -> list[dict]:
    """The rows of ``training_log.jsonl``; a line cut short by a crash (or otherwise unreadable) is skipped."""
    rows = []
    try:
        text = log_file.read_text(errors="replace")
    except FileNotFoundError:
        return rows
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and isinstance(row.get("loss"), (int, float)):
            rows.append(row)
    return rows


def _remove_stale_temporaries(out_dir: Path) -> None:
    """Temporary files a killed run left behind (``.checkpoint_latest.pt.tmp-<pid>``, ``.loss.png.tmp.png``)."""
    if not out_dir.is_dir():
        return
    for pattern in (f".{LATEST}.tmp-*", f".{FINAL}.tmp-*", f".{LOG}.tmp-*", f".{PLOT}.tmp*"):
        for p in out_dir.glob(pattern):
            p.unlink(missing_ok=True)


def _plot_loss(log_file: Path, out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_log_rows(log_file)
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    steps, losses = [r["step"] for r in rows], [r["loss"] for r in rows]
    ax.plot(steps, losses, lw=0.8, alpha=0.5, label="loss")
    if len(losses) >= 5:
        k = max(2, len(losses) // 20)
        ax.plot(steps[k - 1:], np.convolve(losses, np.ones(k) / k, "valid"), lw=1.5, label=f"mean of {k}")
    ax.set(xlabel="step", ylabel="masked epsilon MSE", yscale="log", title="LeFusion lesion model")
    ax.legend()
    fig.tight_layout()
    tmp = out_png.with_name(f".{out_png.name}.tmp.png")
    try:
        fig.savefig(tmp)
        tmp.replace(out_png)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise _friendly_os_error(exc, out_png) from exc
    finally:
        plt.close(fig)


def step_generators(seed: int, rank: int, step: int) -> tuple[np.random.Generator, torch.Generator]:
    """Randomness of one training step, derived from (seed, rank, step) only: resuming (also under DDP)
    replays exactly the batches, timesteps and noise an uninterrupted run would have drawn."""
    rng = np.random.default_rng([seed, rank, step])
    gen = torch.Generator()
    gen.manual_seed(int(rng.integers(0, 2**62)))
    return rng, gen


def build_data_config(dataset: RawDataset, lesion_labels: list[int], region_label: int | None, channel: int,
                      roi: RoiGeometry, intensity: IntensitySpace) -> DataConfig:
    names = {v: k for k, v in dataset.labels.items()}
    if region_label is not None:
        dataset.check_labels([region_label], "region label")
    return DataConfig(dataset_name=dataset.name, lesion_labels=tuple(lesion_labels),
                      label_names=tuple(names[v] for v in lesion_labels), region_label=region_label,
                      channel=channel, modality=dataset.modality(channel), roi=roi, intensity=intensity,
                      file_ending=dataset.file_ending)


def check_run_folder(out_dir: Path, resume: bool, overwrite: bool) -> None:
    """A run folder is only reused with ``--resume`` (continue) or ``--overwrite`` (start over)."""
    out_dir = Path(out_dir)
    latest = out_dir / LATEST
    if out_dir.exists() and not out_dir.is_dir():
        raise LeFusionInputError(f"run folder {out_dir} is a file; pass -o with a folder path.")
    if not resume and not overwrite and (latest.exists() or (out_dir / FINAL).exists()):
        raise LeFusionInputError(f"{out_dir} already holds a training run; pass --resume to continue it, "
                                 f"--overwrite to start over, or -o for another folder.")
    if resume and not latest.exists() and (out_dir / FINAL).exists():
        raise LeFusionInputError(f"--resume was given but {latest} does not exist (only {FINAL}, so that run "
                                 f"finished); pass --overwrite to start over or -o for another folder.")


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
    from lefusion_nnunet.validation import validate_dataset

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
        config = TrainConfig.from_dict({**state["train_config"], "steps": config.steps, "device": config.device})
    rois = collect_lesion_rois(dataset, lesion_labels, roi, intensity, channel, progress=progress)
    data_config = build_data_config(dataset, lesion_labels, region_label, channel, roi, rois.intensity)
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
            _remove_stale_temporaries(out_dir)
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
        while step < config.steps and not _stop(deadline, dist_ctx):
            rng, gen = step_generators(config.seed, dist_ctx.rank, step)
            idx = rng.integers(0, len(images), size=config.batch_size)
            x0_np, m_np = augment([images[idx].numpy(), masks[idx].numpy()], rng)
            x0 = torch.from_numpy(x0_np).to(device)[:, None]                               # (B, 1, Z, Y, X)
            class_masks = torch.from_numpy(m_np).to(device).float()                         # (B, C, Z, Y, X)
            union = class_masks.amax(1, keepdim=True)
            cond = hists[idx].to(device)
            t = torch.randint(0, schedule.num_train_timesteps, (config.batch_size,), generator=gen).to(device)
            noise = torch.randn((config.batch_size, len(lesion_labels), *x0.shape[2:]), generator=gen).to(device)
            drop = (torch.rand(config.batch_size, generator=gen) < config.cond_dropout).to(device)
            x_t = schedule.add_noise(x0.expand_as(noise), noise, t).contiguous(memory_format=torch.channels_last_3d)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
                eps = net(x_t, t, x0 * (1 - union), class_masks, cond, drop_cond=drop)
            loss = masked_epsilon_loss(eps.float(), noise, class_masks)
            optimizer_step(loss, model, ema, optimizer, config, step)
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
            last = step == config.steps or _stop(deadline, dist_ctx)
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
        _plot_loss(log_file, out_dir / PLOT)
    dist_ctx.shutdown()
    return out_dir / FINAL


def _stop(deadline: float, ctx: DistributedContext) -> bool:
    """Whether the time budget is spent; under DDP rank 0 decides for all so every rank stops at one step."""
    over = time.perf_counter() >= deadline
    if ctx.world_size == 1 or deadline == float("inf"):
        return over
    import torch.distributed as dist

    flag = torch.tensor([int(over)])
    dist.broadcast(flag, src=0)
    return bool(flag.item())


def _version() -> str:
    from lefusion_nnunet import __version__

    return __version__
