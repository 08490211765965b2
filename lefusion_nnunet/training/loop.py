"""Machinery shared by the lesion and the mask training loops: run folder, seeded init, AdamW + EMA step,
checkpoint content, per-step generators, log reading and the loss plot.

The loops themselves are :func:`lefusion_nnunet.training.lesion.train_lesion_model` and
:func:`lefusion_nnunet.training.mask.train_mask_model`.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from lefusion_nnunet import __version__
from lefusion_nnunet.configs import JsonConfig
from lefusion_nnunet.data.config import DataConfig
from lefusion_nnunet.diffusion import DenoiserConfig, LesionDenoiser, ScheduleConfig
from lefusion_nnunet.diffusion.inputs import RING_SHAPES
from lefusion_nnunet.distributed import DistributedContext
from lefusion_nnunet.errors import LeFusionCheckpointError, LeFusionInputError
from lefusion_nnunet.utils import _friendly_os_error

LATEST, FINAL, LOG, PLOT = "checkpoint_latest.pt", "checkpoint_final.pt", "training_log.jsonl", "loss.png"


@dataclass(frozen=True)
class TrainConfig(JsonConfig):
    """Optimisation settings of `lefusion train` (saved in the checkpoint)."""

    preset: str = "small"
    steps: int = 4000                  # the lesion model's recipe (texture benchmark: batch 8, ~3,500 steps)
    batch_size: int = 8
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
    border_ring: int = 1               # model voxels generated around each lesion (its partial-volume edge)
    border_ring_shape: str = "in-plane-faces"  # how each ring step grows (diffusion.inputs.RING_SHAPES)

    def __post_init__(self) -> None:
        if isinstance(self.border_ring, bool) or not isinstance(self.border_ring, int) or self.border_ring < 0:
            raise LeFusionInputError(f"--border-ring {self.border_ring!r} must be a whole number of voxels >= 0.")
        if self.border_ring_shape not in RING_SHAPES:
            raise LeFusionInputError(f"--border-ring-shape {self.border_ring_shape!r} is not one of "
                                     f"{', '.join(RING_SHAPES)}; pick one of those.")
        for name in ("steps", "batch_size", "checkpoint_every", "log_every", "texture_clusters"):
            if getattr(self, name) < 1:
                raise LeFusionInputError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}.")


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
            "optimizer_state": optimizer.state_dict(), "step": step, "package_version": package_version()}


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


def remove_stale_temporaries(out_dir: Path) -> None:
    """Temporary files a killed run left behind (``.checkpoint_latest.pt.tmp-<pid>``, ``.loss.png.tmp.png``)."""
    if not out_dir.is_dir():
        return
    for pattern in (f".{LATEST}.tmp-*", f".{FINAL}.tmp-*", f".{LOG}.tmp-*", f".{PLOT}.tmp*"):
        for p in out_dir.glob(pattern):
            p.unlink(missing_ok=True)


def plot_loss(log_file: Path, out_png: Path) -> None:
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


def budget_exhausted(deadline: float, ctx: DistributedContext) -> bool:
    """Whether the time budget is spent; under DDP rank 0 decides for all so every rank stops at one step."""
    over = time.perf_counter() >= deadline
    if ctx.world_size == 1 or deadline == float("inf"):
        return over
    import torch.distributed as dist

    flag = torch.tensor([int(over)])
    dist.broadcast(flag, src=0)
    return bool(flag.item())


def package_version() -> str:

    return __version__
