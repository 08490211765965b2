"""Loading checkpoints for sampling: the lesion model, the mask model, and what both record.

Every reader of a checkpoint file goes through :func:`~lefusion_nnunet.checkpoints.format.load_checkpoint_content`
(``weights_only=True``, hash-checked); this module turns its content into ready-to-sample models (EMA weights,
eval mode) and offers the small look-ups other layers need (:func:`checkpoint_data_config`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lefusion_nnunet.checkpoints.format import load_checkpoint_content
from lefusion_nnunet.checkpoints.release import build_release_model
from lefusion_nnunet.data.config import DataConfig
from lefusion_nnunet.data.histogram import Prototypes
from lefusion_nnunet.diffusion import DenoiserConfig, LesionDenoiser, NoiseSchedule, SamplerConfig, ScheduleConfig
from lefusion_nnunet.errors import LeFusionCheckpointError, LeFusionInputError
from lefusion_nnunet.utils import sha256_file

#: Sampler written into mask checkpoints as their default.
DEFAULT_MASK_SAMPLER = SamplerConfig(name="ddim", num_steps=10, eta=0.0)


def checkpoint_data_config(path: Path | str, expected_kind: str | None = None) -> DataConfig:
    """The :class:`DataConfig` a checkpoint recorded (labels, ROI, intensity space), without building its model."""
    return DataConfig.from_dict(load_checkpoint_content(path, expected_kind=expected_kind)["data_config"])


def _ema_model(content: dict, path: Path | str) -> nn.Module:
    """The checkpoint's denoiser with its EMA weights (strict: missing or unexpected weights are rejected).

    Our own models are :class:`LesionDenoiser`; a model imported from the LeFusion release (its ``model_config``
    names the architecture, see :mod:`lefusion_nnunet.checkpoints.release`) comes as the release network behind
    the same call signature ``(x_t, t, context, class_masks, cond, drop_cond)``.
    """
    try:
        with torch.random.fork_rng(devices=[]):  # building a model must not advance the caller's torch RNG
            model = build_release_model(content["model_config"])
            if model is None:
                model = LesionDenoiser(DenoiserConfig.from_dict(content["model_config"]))
        model.load_state_dict(content["ema_state"])
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
        raise LeFusionCheckpointError(f"checkpoint {path} is incomplete or its weights do not fit its model "
                                      f"configuration ({type(exc).__name__}); use a checkpoint_final.pt written by "
                                      f"`lefusion train` or retrain.") from exc
    return model


@dataclass
class LoadedCheckpoint:
    """A lesion model ready to sample, with everything its checkpoint recorded."""

    path: Path
    file_sha256: str
    data: DataConfig
    prototypes: list[Prototypes]
    training_histograms: np.ndarray
    training_summary: dict
    model: nn.Module                     # LesionDenoiser, or an imported release model's adapter
    schedule: NoiseSchedule
    sampler_defaults: dict = field(default_factory=dict)


def load_lesion_checkpoint(path: Path | str, device: str = "cpu") -> LoadedCheckpoint:
    """Load a lesion checkpoint (EMA weights) onto ``device`` in eval mode."""
    content = load_checkpoint_content(path, expected_kind="lesion")
    model = _ema_model(content, path)
    try:
        data = DataConfig.from_dict(content["data_config"])
        prototypes = [Prototypes.from_dict(p) for p in content["prototypes"]]
        histograms = content["training_histograms"].numpy()
        schedule = NoiseSchedule(ScheduleConfig(**content["schedule_config"]))
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
        raise LeFusionCheckpointError(f"checkpoint {path} is incomplete or its weights do not fit its model "
                                      f"configuration ({type(exc).__name__}); use a checkpoint_final.pt written by "
                                      f"`lefusion train` or retrain.") from exc
    model.to(device).eval()
    return LoadedCheckpoint(
        path=Path(path), file_sha256=sha256_file(path), data=data, prototypes=prototypes,
        training_histograms=histograms, training_summary=dict(content.get("training_summary", {})), model=model,
        schedule=schedule.to(device), sampler_defaults=dict(content.get("sampler_defaults", {})))


@dataclass
class LoadedMaskCheckpoint:
    """A mask model ready to sample: EMA weights in eval mode, its data config and training features."""

    path: Path
    file_sha256: str
    data: DataConfig
    model: nn.Module                     # LesionDenoiser, or the imported DiffMask adapter
    schedule: NoiseSchedule
    features: np.ndarray                 # (N, C * 4) training lesion features
    training_summary: dict
    sampler_defaults: dict


def load_mask_checkpoint(path: Path | str, device: str = "cpu") -> LoadedMaskCheckpoint:
    """Load a ``"mask"`` checkpoint written by :func:`train_mask_model`."""
    content = load_checkpoint_content(path, expected_kind="mask")
    model = _ema_model(content, path).to(device).eval()
    summary = dict(content.get("training_summary", {}))
    return LoadedMaskCheckpoint(
        path=Path(path), file_sha256=sha256_file(path), data=DataConfig.from_dict(content["data_config"]), model=model,
        schedule=NoiseSchedule(ScheduleConfig(**content["schedule_config"])).to(device),
        features=np.asarray(summary.pop("features"), np.float32), training_summary=summary,
        sampler_defaults=dict(content.get("sampler_defaults", {})))


def check_mask_checkpoint_matches(mask_data: DataConfig, lesion_data: DataConfig, mask_path: Path | str) -> None:
    """Raise when a mask model's lesion labels differ from the lesion model's."""
    if tuple(mask_data.lesion_labels) != tuple(lesion_data.lesion_labels):
        raise LeFusionInputError(f"the mask checkpoint {mask_path} was trained for lesion label(s) "
                                 f"{list(mask_data.lesion_labels)} but the lesion model for "
                                 f"{list(lesion_data.lesion_labels)}; train-mask with the same --lesion-label values.")
