"""Settings of ``LeFusionTrainer``: a JSON file next to the preprocessed dataset, overridden by env vars.

nnU-Net builds trainers with a fixed ``__init__`` signature, so the trainer cannot take arguments. It reads
:class:`TrainerSettings` from (later wins):

1. defaults (:class:`TrainerSettings` fields);
2. ``$nnUNet_preprocessed/<Dataset>/lefusion_trainer.json`` (written by ``lefusion trainer-config``), or the
   file named by ``LEFUSION_SETTINGS`` instead;
3. environment variables:

   ============================================  ==============================================================
   ``LEFUSION_SETTINGS``                         path of a settings JSON used instead of the dataset's file
   ``LEFUSION_CHECKPOINT``                       lesion checkpoint (default: newest ``lefusion train`` run)
   ``LEFUSION_PROBABILITY``                      P: chance that a lesion-free training case is replaced by
                                                 one of its synthetic variants when drawn (0..1, default 0.5)
   ``LEFUSION_PER_CASE``                         K: synthetic variants per lesion-free training case (default 16)
   ``LEFUSION_SEED``                             seed of the variants (default 0)
   ``LEFUSION_BATCH_SIZE``                       ROIs per diffusion network call while building (default 4)
   ``LEFUSION_DEVICE``                           ``auto`` (the trainer's device), ``cpu`` or ``cuda``
   ``LEFUSION_BANK_BUILD``                       ``background`` (default: training starts at once, variants
                                                 join as they are made) or ``before-training`` (the whole bank
                                                 is built before the first iteration)
   ``LEFUSION_ITERATIONS_PER_EPOCH``             overrides nnU-Net's ``num_iterations_per_epoch`` (250)
   ``LEFUSION_VAL_ITERATIONS_PER_EPOCH``         overrides nnU-Net's ``num_val_iterations_per_epoch`` (50)
   ============================================  ==============================================================

Without a checkpoint in the file or the environment, the dataset's default checkpoint
(:func:`lefusion_nnunet.paths.find_default_checkpoint`) is used.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lefusion_nnunet.configs import JsonConfig
from lefusion_nnunet.data.dataset import dataset_folder_name
from lefusion_nnunet.errors import LeFusionInputError
from lefusion_nnunet.paths import find_default_checkpoint, trainer_settings_file
from lefusion_nnunet.utils import atomic_write_json
from lefusion_nnunet.variant_settings import VariantSettings

ENV_SETTINGS = "LEFUSION_SETTINGS"
ENV_CHECKPOINT = "LEFUSION_CHECKPOINT"
ENV_PROBABILITY = "LEFUSION_PROBABILITY"
ENV_PER_CASE = "LEFUSION_PER_CASE"
ENV_SEED = "LEFUSION_SEED"
ENV_BATCH_SIZE = "LEFUSION_BATCH_SIZE"
ENV_DEVICE = "LEFUSION_DEVICE"
ENV_ITERATIONS = "LEFUSION_ITERATIONS_PER_EPOCH"
ENV_VAL_ITERATIONS = "LEFUSION_VAL_ITERATIONS_PER_EPOCH"
ENV_BANK_BUILD = "LEFUSION_BANK_BUILD"
ENV_VARS = (ENV_SETTINGS, ENV_CHECKPOINT, ENV_PROBABILITY, ENV_PER_CASE, ENV_SEED, ENV_BATCH_SIZE, ENV_DEVICE,
            ENV_ITERATIONS, ENV_VAL_ITERATIONS, ENV_BANK_BUILD)

#: When the bank is built: "background" (training starts at once; early epochs draw from the variants made so far)
#: or "before-training" (the whole bank exists before the first iteration). Both build the same bank.
BANK_BUILD_MODES = ("background", "before-training")

#: K, variants per lesion-free training case, when neither the settings file nor ``LEFUSION_PER_CASE`` sets it.
#: A 1,000-epoch nnU-Net run makes 1,000 x 250 iterations x batch 2 = 500,000 case loads: with 100 training cases
#: each lesion-free case is drawn ~5,000 times, P = 0.5 of them synthetic, so K = 2 would show each synthetic
#: lesion ~1,250 times and K = 16 ~160 times (each still augmented by nnU-Net). The bank grows linearly in K:
#: per lesion-free 512 x 512 x 128 case 16 x (~0.5 s of the default sampler's network time per lesion on 2 CPU
#: cores, less on a GPU, + ~0.4 s for the rest, benchmarks/clinical_scale.py) = ~15 s, and 16 x 0.27 MB = ~4.3 MB on
#: disk, ~3 % of the 128 MiB float32 case nnU-Net stores. 50 lesion-free training cases: 800 variants, ~12 min on 2
#: CPU cores in the background while training runs, ~220 MB, built once per fold and reused by ``--c`` and later
#: runs.
DEFAULT_PER_CASE = 16


def _default_variants() -> VariantSettings:
    return VariantSettings(per_case=DEFAULT_PER_CASE)


@dataclass(frozen=True)
class TrainerSettings(JsonConfig):
    """What ``LeFusionTrainer`` synthesises and how often it uses it.

    Attributes:
        checkpoint: lesion checkpoint file, or None for the dataset's default checkpoint.
        probability: P, chance that a drawn lesion-free training case is replaced by one of its variants.
        variants: :class:`lefusion_nnunet.variants.VariantSettings` (``per_case`` = K, masks, textures, sampler);
            K defaults to :data:`DEFAULT_PER_CASE` (16), also when a settings file's ``variants`` omit it.
        batch_size: ROIs per diffusion network call while the bank is built.
        device: ``"auto"`` (the trainer's device), ``"cpu"`` or ``"cuda"`` for building the bank.
        bank_build: ``"background"`` (training starts at once and lesion-free cases join the draw pool as their
            variants are made) or ``"before-training"`` (the whole bank is built before the first iteration);
            not part of the bank's key (both build the same bank).
        num_iterations_per_epoch: None keeps nnU-Net's value (250); set it for short runs.
        num_val_iterations_per_epoch: None keeps nnU-Net's value (50).
    """

    config_title = "LeFusion trainer settings"

    checkpoint: str | None = None
    probability: float = 0.5
    variants: VariantSettings = field(default_factory=_default_variants)
    batch_size: int = 4
    device: str = "auto"
    bank_build: str = "background"
    num_iterations_per_epoch: int | None = None
    num_val_iterations_per_epoch: int | None = None

    def __post_init__(self) -> None:
        if self.checkpoint is not None:
            object.__setattr__(self, "checkpoint", str(self.checkpoint))
        if not isinstance(self.probability, (int, float)) or isinstance(self.probability, bool) \
                or not 0.0 <= float(self.probability) <= 1.0:
            raise LeFusionInputError(f"LeFusion probability {self.probability!r} must be a number between 0 and 1.")
        object.__setattr__(self, "probability", float(self.probability))
        if isinstance(self.variants, dict):
            object.__setattr__(self, "variants", VariantSettings.from_dict(self.variants))
        if not _is_int(self.batch_size) or self.batch_size < 1:
            raise LeFusionInputError(f"LeFusion batch size {self.batch_size!r} must be an integer >= 1.")
        if not isinstance(self.device, str) or not (self.device in ("auto", "cpu", "mps")
                                                    or self.device.startswith("cuda")):
            raise LeFusionInputError(f"LeFusion device {self.device!r} is unknown; use auto, cpu or cuda.")
        if self.bank_build not in BANK_BUILD_MODES:
            raise LeFusionInputError(f"LeFusion bank build {self.bank_build!r} is unknown; use "
                                     f"{' or '.join(BANK_BUILD_MODES)}.")
        for name in ("num_iterations_per_epoch", "num_val_iterations_per_epoch"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 1):
                raise LeFusionInputError(f"LeFusion {name} {value!r} must be an integer >= 1 (or null).")
        per_case = getattr(self.variants, "per_case", 1)
        if not _is_int(per_case) or per_case < 1:
            raise LeFusionInputError(f"LeFusion variants per case {per_case!r} must be an integer >= 1.")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainerSettings":
        """Inverse of :meth:`to_dict`; ``variants`` without ``per_case`` get the trainer's K (not enlarge's)."""
        variants = d.get("variants")
        if isinstance(variants, dict) and "per_case" not in variants:
            d = dict(d, variants=dict(variants, per_case=DEFAULT_PER_CASE))
        return super().from_dict(d)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _settings_path(dataset_name: str) -> Path:

    return trainer_settings_file(dataset_name)


def _dataset_name(name_or_id: str | int) -> str:

    return dataset_folder_name(name_or_id)


def _read_settings_file(path: Path) -> TrainerSettings:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise LeFusionInputError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}); fix it or rewrite "
                                 f"it with `lefusion trainer-config`.") from exc
    except OSError as exc:
        raise LeFusionInputError(f"LeFusion trainer settings {path} cannot be read ({exc.strerror}); check the "
                                 f"path (set by {ENV_SETTINGS} or `lefusion trainer-config`).") from exc
    if not isinstance(data, dict):
        raise LeFusionInputError(f"{path} must hold a JSON object of LeFusion trainer settings; rewrite it with "
                                 f"`lefusion trainer-config`.")
    ckpt = data.get("checkpoint")
    if ckpt and not Path(ckpt).is_absolute():  # relative paths are relative to the settings file
        data = dict(data, checkpoint=str((path.parent / ckpt).resolve()))
    try:
        return TrainerSettings.from_dict(data)
    except LeFusionInputError as exc:
        raise LeFusionInputError(f"{path}: {exc}") from exc
    except (TypeError, ValueError, KeyError) as exc:
        raise LeFusionInputError(f"{path} holds invalid LeFusion trainer settings ({exc}); rewrite it with "
                                 f"`lefusion trainer-config`.") from exc


def _env_number(var: str, kind: type, what: str):
    text = os.environ.get(var)
    if text is None or text.strip() == "":
        return None
    try:
        return kind(text)
    except ValueError:
        raise LeFusionInputError(f"environment variable {var}={text!r} is not {what}; set it to {what} or "
                                 f"unset it.") from None


def _apply_env(settings: TrainerSettings) -> TrainerSettings:
    changes: dict[str, Any] = {}
    ckpt = os.environ.get(ENV_CHECKPOINT)
    if ckpt:
        changes["checkpoint"] = str(Path(ckpt).expanduser().resolve())
    for var, name, kind, what in ((ENV_PROBABILITY, "probability", float, "a number between 0 and 1"),
                                  (ENV_BATCH_SIZE, "batch_size", int, "an integer >= 1"),
                                  (ENV_ITERATIONS, "num_iterations_per_epoch", int, "an integer >= 1"),
                                  (ENV_VAL_ITERATIONS, "num_val_iterations_per_epoch", int, "an integer >= 1")):
        value = _env_number(var, kind, what)
        if value is not None:
            changes[name] = value
    for var, name in ((ENV_DEVICE, "device"), (ENV_BANK_BUILD, "bank_build")):
        text = os.environ.get(var)
        if text and text.strip():
            changes[name] = text.strip()
    variant_changes: dict[str, Any] = {}
    per_case = _env_number(ENV_PER_CASE, int, "an integer >= 1")
    if per_case is not None:
        variant_changes["per_case"] = per_case
    seed = _env_number(ENV_SEED, int, "an integer")
    if seed is not None:
        variant_changes["seed"] = seed
    if variant_changes:
        changes["variants"] = dataclasses.replace(settings.variants, **variant_changes)
    if not changes:
        return settings
    try:
        return dataclasses.replace(settings, **changes)
    except LeFusionInputError as exc:
        raise LeFusionInputError(f"{exc} (from the LEFUSION_* environment variables)") from exc


def load_trainer_settings(dataset_name: str | int, require_checkpoint: bool = True) -> TrainerSettings:
    """Settings for ``dataset_name``: file (or ``$LEFUSION_SETTINGS``), then env overrides, then defaults.

    With ``require_checkpoint`` the checkpoint is resolved (the dataset's default when none is set) and must
    exist; otherwise ``checkpoint`` may stay None (used when the trainer is only constructed).
    """
    name = _dataset_name(dataset_name)
    override = os.environ.get(ENV_SETTINGS)
    if override:
        path = Path(override).expanduser()
        if not path.is_file():
            raise LeFusionInputError(f"{ENV_SETTINGS}={override} does not name a file; point it at a settings "
                                     f"JSON written by `lefusion trainer-config` or unset it.")
        settings = _read_settings_file(path)
    elif os.environ.get("nnUNet_preprocessed"):
        path = _settings_path(name)
        settings = _read_settings_file(path) if path.is_file() else TrainerSettings()
    else:  # nnU-Net allows building a trainer without its folders (inference); so do we
        settings = TrainerSettings()
    settings = _apply_env(settings)
    if require_checkpoint:
        settings = resolve_checkpoint(settings, name)
    return settings


def resolve_checkpoint(settings: TrainerSettings, dataset_name: str) -> TrainerSettings:
    """Fill in the dataset's default checkpoint when none is set; check that the file exists."""
    if settings.checkpoint is None:

        return dataclasses.replace(settings, checkpoint=str(find_default_checkpoint(dataset_name)))
    if not Path(settings.checkpoint).is_file():
        raise LeFusionInputError(f"LeFusion checkpoint {settings.checkpoint} does not exist; fix "
                                 f"{ENV_CHECKPOINT} or rerun `lefusion trainer-config -d {dataset_name} "
                                 f"--checkpoint ...`.")
    return settings


def write_trainer_settings(dataset_name: str | int, settings: TrainerSettings) -> Path:
    """Atomically write ``settings`` to ``$nnUNet_preprocessed/<Dataset>/lefusion_trainer.json``; returns the path."""
    name = _dataset_name(dataset_name)
    path = _settings_path(name)
    data = settings.to_dict()
    if data["checkpoint"] is not None:
        data["checkpoint"] = str(Path(data["checkpoint"]).expanduser().resolve())
    atomic_write_json(path, data)
    return path
