"""Import the published LeFusion models (M3DV/LeFusion ``lidc.pt``, ``emidec.pt``, ``diffmask.pt``).

The release's ``Trainer.save`` writes ``{'step', 'model', 'ema', 'scaler'}``; ``model`` and ``ema`` are state dicts
of ``GaussianDiffusion_Nolatent`` around ``nn.DataParallel(Unet3D)``: keys ``denoise_fn.module.*`` plus 12 schedule
buffers (``betas``, ``alphas_cumprod``, ...). :func:`import_release_checkpoint` reads such a file with
``torch.load(weights_only=True)`` (never modifying it), infers the architecture from the tensor shapes, loads the
weights into :class:`~lefusion_nnunet.diffusion.release_unet.ReleaseUnet` with ``strict=True``, checks the schedule
buffers against our cosine schedule, and writes one of our checkpoints (``"lesion"`` for lidc / emidec, ``"mask"``
for diffmask) recording the architecture, intensity space, ROI size and spacing, labels, prototypes, schedule and
provenance (the source file's SHA-256).

What the release fixes, and so what an import records (read from its code):

* LIDC: HU clamped to [-1000, 400] and mapped linearly to [-1, 1] (our CT window of the same bounds); ROI
  32 x 64 x 64 (z, y, x); the condition is the 16-bin histogram over [-1, 1] of the lesion voxels, normalised to
  sum 1 (``torch.histc``: equal bins, the top edge in the last bin; the same bins as
  :func:`~lefusion_nnunet.data.histogram.lesion_histogram`); 3 prototypes (its ``hist_clusters/lidc_clusters.json``).
* EMIDEC: each file rescaled from its own min / max to [-1, 1] (our percentile space with (0, 100)); ROI
  10 x 72 x 72; two channels (labels 3 infarct, 4 no-reflow) with one 16-bin histogram each; its prototypes file has
  one centre per class (centre 0 for the first channel, centre 1 for the second, as its inference pairs them).
* DiffMask: the noisy mask (1 channel, {-1, 1}) next to a binary sphere prior ({-1, 1}), no condition; ROI as LIDC.
* Spacing: the release never resamples (its ROIs keep each scan's native voxel size, and its authors say spacing
  had little effect), so the model grid's spacing is an assumption: :data:`DEFAULT_SPACING_XYZ` unless given.
* Schedule: cosine, T = 300; the release clips betas at 0.9999 where ours clips at 0.999, so the two agree at every
  timestep but the last (t = T - 1: sqrt(alpha_bar) 5e-5 vs 1.6e-4); the import records the difference.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from lefusion_nnunet.checkpoints.format import save_checkpoint
from lefusion_nnunet.data.config import DataConfig
from lefusion_nnunet.data.intensity import IntensitySpace
from lefusion_nnunet.data.mask_shapes import MASK_FEATURES, reference_mm
from lefusion_nnunet.data.roi import RoiGeometry
from lefusion_nnunet.diffusion import NoiseSchedule, SamplerConfig, ScheduleConfig
from lefusion_nnunet.diffusion.release_unet import (ReleaseLesionDenoiser, ReleaseMaskDenoiser, ReleaseUnet,
                                                    ReleaseUnetConfig)
from lefusion_nnunet.errors import LeFusionCheckpointError, LeFusionInputError
from lefusion_nnunet import __version__
from lefusion_nnunet.utils import sha256_file

RELEASE_KINDS = ("lidc", "emidec", "diffmask")
RELEASE_WEIGHTS = ("model", "ema")
#: ``model_config["architecture"]`` of imported checkpoints (our own models have no such key).
RELEASE_LESION_ARCHITECTURE = "lefusion-release-unet3d"
RELEASE_MASK_ARCHITECTURE = "lefusion-release-diffmask"
_PREFIX = "denoise_fn.module."
_SCHEDULE_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                     "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                     "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                     "posterior_mean_coef1", "posterior_mean_coef2")

#: Model-grid spacing (x, y, z) in mm assumed when ``spacing`` is not given: the release keeps native voxels, so
#: these are typical values of its data (LIDC-IDRI in-plane ~0.7 mm, 1.25 mm slices; EMIDEC ~1.5 mm in-plane,
#: 10 mm slices), not facts of the file. Pass the spacing of your own scans where it differs.
DEFAULT_SPACING_XYZ: dict[str, tuple[float, float, float]] = {
    "lidc": (0.7, 0.7, 1.25), "emidec": (1.5, 1.5, 10.0), "diffmask": (0.7, 0.7, 1.25)}

#: The release's texture prototypes (``LeFusion/inference/hist_clusters/*_clusters.json``), 16 bins over [-1, 1]
#: each, in the release's order (lidc: cluster 0 darkest / ground-glass-like .. 2 solid; emidec: one per class).
RELEASE_PROTOTYPES: dict[str, list[list[float]]] = {
    "lidc": [
        [0.0, 0.0, 0.014150944, 0.066037737, 0.14150943, 0.18396227, 0.047169812, 0.11792453, 0.099056602,
         0.084905662, 0.11792453, 0.080188677, 0.047169812, 0.0, 0.0, 0.0],
        [0.0, 0.0, 0.0, 0.00028868360, 0.0066397227, 0.038106237, 0.066397227, 0.081120089, 0.092090070,
         0.12066974, 0.18071593, 0.32072750, 0.077944569, 0.010392610, 0.0040415702, 0.00086605083],
        [0.0, 0.0, 0.0, 0.0, 0.00011234693, 0.0, 0.00056173466, 0.00067408156, 0.0022469386, 0.0055049993,
         0.022694079, 0.23986068, 0.69666332, 0.030221323, 0.0012358162, 0.00022469385]],
    "emidec": [
        [0.0] * 10 + [0.0060314, 0.29192, 0.65561, 0.045838, 0.00060314, 0.0],
        [0.0] * 10 + [0.0667, 0.9333, 0.0, 0.0, 0.0, 0.0]],
}


@dataclass(frozen=True)
class ReleaseKind:
    """What the release fixes for one published model (see the module docstring)."""

    checkpoint_kind: str                     # "lesion" or "mask"
    architecture: str
    roi_size_zyx: tuple[int, int, int]
    lesion_labels: tuple[int, ...]
    label_names: tuple[str, ...]
    modality: str
    intensity: IntensitySpace
    in_channels: int                         # network input channels
    cond_dim: int | None


RELEASE_FACTS: dict[str, ReleaseKind] = {
    "lidc": ReleaseKind("lesion", RELEASE_LESION_ARCHITECTURE, (32, 64, 64), (1,), ("nodule",), "CT",
                        IntensitySpace("window", (-1000.0, 400.0)), 1, 16),
    "emidec": ReleaseKind("lesion", RELEASE_LESION_ARCHITECTURE, (10, 72, 72), (3, 4), ("infarction", "no_reflow"),
                          "MR", IntensitySpace("percentile", percentiles=(0.0, 100.0)), 2, 32),
    "diffmask": ReleaseKind("mask", RELEASE_MASK_ARCHITECTURE, (32, 64, 64), (1,), ("nodule",), "CT",
                            IntensitySpace("window", (-1000.0, 400.0)), 2, None),
}


@dataclass(frozen=True)
class ImportedCheckpoint:
    """The result of :func:`import_release_checkpoint`: where it went and what it holds."""

    path: Path
    checkpoint_kind: str
    source_sha256: str
    model_config: ReleaseUnetConfig
    step: int
    num_tensors: int
    spacing_xyz: tuple[float, float, float]
    lesion_labels: tuple[int, ...]


# --------------------------------------------------------------------------------------------------- reading
def read_release_file(path: Path | str, weights: str = "model") -> tuple[dict, dict, int]:
    """``(network state, schedule buffers, step)`` of a release checkpoint; ``weights`` picks ``model`` or ``ema``.

    The network state has the ``denoise_fn.module.`` prefix removed. Raises :class:`LeFusionCheckpointError` with
    one sentence for anything that is not a readable release file.
    """
    path = Path(path)
    if weights not in RELEASE_WEIGHTS:
        raise LeFusionInputError(f"--weights {weights!r} is not one of {', '.join(RELEASE_WEIGHTS)}.")
    if not path.is_file():
        raise LeFusionCheckpointError(f"{path} does not exist; download lidc.pt / emidec.pt / diffmask.pt from the "
                                      f"LeFusion release first.")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise LeFusionCheckpointError(f"{path} cannot be read as a plain-tensor PyTorch file (truncated, not a "
                                      f"checkpoint, or holding objects that cannot be loaded safely).") from exc
    if not isinstance(data, dict) or not isinstance(data.get(weights), dict):
        raise LeFusionCheckpointError(f"{path} is not a LeFusion release checkpoint: it has no {weights!r} state "
                                      f"dictionary (expected the keys 'step', 'model', 'ema', 'scaler').")
    state = data[weights]
    net = {k[len(_PREFIX):]: v for k, v in state.items() if isinstance(k, str) and k.startswith(_PREFIX)}
    buffers = {k: v for k, v in state.items() if k in _SCHEDULE_BUFFERS}
    other = sorted(str(k) for k in state if k not in buffers and not (isinstance(k, str) and k.startswith(_PREFIX)))
    if not net or other or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise LeFusionCheckpointError(f"{path} is not a LeFusion release checkpoint: its {weights!r} weights are not "
                                      f"all '{_PREFIX}*' tensors and schedule buffers"
                                      + (f" (unexpected {other[:3]})" if other else "") + ".")
    step = data.get("step", 0)
    return net, buffers, int(step) if isinstance(step, int) else 0


def infer_release_config(state: dict) -> ReleaseUnetConfig:
    """The :class:`ReleaseUnetConfig` whose parameters have the shapes of ``state`` (prefix already removed)."""
    try:
        init = state["init_conv.weight"]                                   # (dim, channels, 1, k, k)
        heads = state["time_rel_pos_bias.relative_attention_bias.weight"].shape[1]
        qkv = state["init_temporal_attn.fn.fn.fn.to_qkv.weight"]           # (3 * heads * dim_head, dim)
        levels = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("downs."))
        widths = [state[f"downs.{i}.0.block1.proj.weight"].shape[0] for i in range(levels)]
        out = state["final_conv.1.weight"].shape[0]
    except (KeyError, ValueError, IndexError, AttributeError) as exc:
        raise LeFusionCheckpointError(f"the weights do not have the layout of the release's Unet3D "
                                      f"(missing {exc}); pass lidc.pt, emidec.pt or diffmask.pt.") from exc
    dim, channels = int(init.shape[0]), int(init.shape[1])
    if any(w % dim for w in widths):
        raise LeFusionCheckpointError(f"the level widths {widths} are not multiples of the first width {dim}; the "
                                      f"file is not a release Unet3D.")
    cond = state.get("null_cond_emb")
    return ReleaseUnetConfig(
        dim=dim, dim_mults=tuple(w // dim for w in widths), channels=channels,
        out_dim=None if out == channels else int(out), cond_dim=None if cond is None else int(cond.shape[1]),
        attn_heads=int(heads), attn_dim_head=int(qkv.shape[0]) // (3 * int(heads)),
        init_kernel_size=int(init.shape[-1]), use_sparse_linear_attn="downs.0.2.fn.fn.to_qkv.weight" in state)


def load_release_network(state: dict, config: ReleaseUnetConfig) -> ReleaseUnet:
    """A :class:`ReleaseUnet` holding ``state`` (``strict=True``: every key and shape must match)."""
    model = ReleaseUnet(config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise LeFusionCheckpointError(f"the weights do not fit the release architecture inferred from them "
                                      f"({str(exc).splitlines()[0]}); the file is not a release Unet3D.") from exc
    return model


def check_release_schedule(buffers: dict, num_timesteps: int | None = None) -> ScheduleConfig:
    """Our :class:`ScheduleConfig` equal to the release's buffers at every timestep but the last (see module doc)."""
    betas = buffers.get("betas")
    if betas is None or betas.ndim != 1 or len(betas) < 2:
        raise LeFusionCheckpointError("the release file has no schedule buffers ('betas'); it is not a "
                                      "GaussianDiffusion_Nolatent checkpoint.")
    config = ScheduleConfig(num_train_timesteps=num_timesteps or len(betas), beta_schedule="cosine")
    ours = NoiseSchedule(config)
    for name in ("betas", "alphas_cumprod", "sqrt_alphas_cumprod", "posterior_mean_coef1"):
        theirs = buffers.get(name)
        if theirs is None or theirs.shape != betas.shape or \
                not torch.allclose(theirs[:-1].double(), getattr(ours, name)[:-1].double(), rtol=1e-5, atol=1e-6):
            raise LeFusionCheckpointError(f"the release file's {name!r} schedule is not the cosine schedule with "
                                          f"T = {len(betas)} that LeFusion uses; it cannot be imported.")
    return config


# --------------------------------------------------------------------------------------------------- building
def build_release_model(model_config: dict) -> nn.Module | None:
    """The imported denoiser for a checkpoint's ``model_config``, or None when it is not an imported release model.

    Lesion models get :class:`ReleaseLesionDenoiser`, mask models :class:`ReleaseMaskDenoiser`: both take the call
    signature of our samplers' models (``x_t, t, context, class_masks, cond, drop_cond``).
    """
    architecture = model_config.get("architecture") if isinstance(model_config, dict) else None
    classes = {RELEASE_LESION_ARCHITECTURE: ReleaseLesionDenoiser, RELEASE_MASK_ARCHITECTURE: ReleaseMaskDenoiser}
    if architecture not in classes:
        return None
    fields = {k: v for k, v in model_config.items() if k != "architecture"}
    return classes[architecture](ReleaseUnetConfig.from_dict(fields))


def _check_kind(kind: str, config: ReleaseUnetConfig, path: Path) -> ReleaseKind:
    if kind not in RELEASE_FACTS:
        raise LeFusionInputError(f"--kind {kind!r} is not one of {', '.join(RELEASE_KINDS)}.")
    facts = RELEASE_FACTS[kind]
    if config.channels != facts.in_channels or config.cond_dim != facts.cond_dim or \
            (kind == "diffmask") != (config.output_channels == 1 and config.channels == 2):
        found = f"{config.channels} input channel(s), condition {config.cond_dim}, {config.output_channels} output(s)"
        raise LeFusionCheckpointError(f"{path} holds a model with {found}, which is not the release's {kind} model "
                                      f"({facts.in_channels} input channel(s), condition {facts.cond_dim}); pass the "
                                      f"right --kind.")
    return facts


def _spacing(kind: str, spacing: Sequence[float] | None) -> tuple[float, float, float]:
    values = tuple(float(s) for s in (spacing if spacing is not None else DEFAULT_SPACING_XYZ[kind]))
    if len(values) != 3 or min(values) <= 0:
        raise LeFusionInputError(f"--spacing {list(values)} must be three positive numbers X Y Z in mm.")
    return values  # type: ignore[return-value]


def _labels(facts: ReleaseKind, config: ReleaseUnetConfig, lesion_labels: Sequence[int] | None) -> tuple[int, ...]:
    labels = tuple(int(v) for v in (lesion_labels if lesion_labels else facts.lesion_labels))
    classes = config.output_channels
    if len(labels) != classes or len(set(labels)) != len(labels) or min(labels) < 1:
        raise LeFusionInputError(f"the model has {classes} lesion class(es); pass {classes} distinct positive "
                                 f"--lesion-label value(s), not {list(labels)}.")
    return labels


def import_release_checkpoint(path: Path | str, kind: str, weights: str = "model",
                              lesion_labels: Sequence[int] | None = None, spacing: Sequence[float] | None = None,
                              out: Path | str = "imported.pt", roi_size_zyx: Sequence[int] | None = None
                              ) -> ImportedCheckpoint:
    """Convert a published LeFusion file into one of our checkpoints (the source file is only read).

    Args:
        path: ``lidc.pt``, ``emidec.pt`` or ``diffmask.pt`` (the release's ``Trainer.save`` format).
        kind: ``"lidc"``, ``"emidec"`` (lesion models) or ``"diffmask"`` (mask model).
        weights: ``"model"`` (what the release's inference loads) or ``"ema"``.
        lesion_labels: label value per lesion class in channel order (default lidc/diffmask 1, emidec 3 4).
        spacing: model-grid spacing X Y Z in mm (default :data:`DEFAULT_SPACING_XYZ`).
        out: where to write our checkpoint.
        roi_size_zyx: model grid (z, y, x); default the release's (lidc/diffmask 32 64 64, emidec 10 72 72).
    """
    path = Path(path)
    state, buffers, step = read_release_file(path, weights)
    config = infer_release_config(state)
    facts = _check_kind(kind, config, path)
    load_release_network(state, config)
    schedule_config = check_release_schedule(buffers)
    spacing_xyz = _spacing(kind, spacing)
    labels = _labels(facts, config, lesion_labels)
    size = tuple(int(s) for s in (roi_size_zyx or facts.roi_size_zyx))
    if size[1] % config.spatial_divisor or size[2] % config.spatial_divisor:
        raise LeFusionInputError(f"ROI size {list(size)} (z, y, x): y and x must be multiples of "
                                 f"{config.spatial_divisor} for this model.")
    roi = RoiGeometry(size_zyx=size, spacing_zyx=spacing_xyz[::-1])
    source_sha = sha256_file(path)
    last_beta = float(buffers["betas"][-1])
    provenance = {"source": "M3DV/LeFusion release", "release_kind": kind, "source_file": path.name,
                  "source_sha256": source_sha, "weights": weights, "release_step": step,
                  "release_last_beta": last_beta, "spacing_assumed": spacing is None,
                  "imported_by": f"lefusion-nnunet {__version__}"}
    names = facts.label_names if labels == facts.lesion_labels else tuple(f"label_{v}" for v in labels)
    extra: dict = {"release_import": provenance}
    if facts.checkpoint_kind == "mask":
        extra["mask_model"] = {"encoding": "cumulative", "features_per_channel": MASK_FEATURES,
                               "sphere": "binary: inside (r - d) / r >= 0 -> 1, else -1 (release DiffMask)",
                               "region_hint": False, "reference_mm": reference_mm(roi)}
    data = DataConfig(dataset_name=f"LeFusionRelease_{kind}", lesion_labels=labels, label_names=names,
                      region_label=None, channel=0, modality=facts.modality, roi=roi, intensity=facts.intensity,
                      extra=extra, border_ring_voxels=0)       # the release generates exactly the mask
    content = {"kind": facts.checkpoint_kind,
               "model_config": {"architecture": facts.architecture, **config.to_dict()},
               "schedule_config": schedule_config.to_dict(), "data_config": data.to_dict(),
               "ema_state": {k: v.detach().clone() for k, v in state.items()}, "step": step,
               "package_version": __version__}
    if facts.checkpoint_kind == "lesion":
        centers = RELEASE_PROTOTYPES[kind]
        per_class = [centers] if len(labels) == 1 else [[centers[c]] for c in range(len(labels))]
        content["prototypes"] = [{"centers": p, "counts": [1] * len(p)} for p in per_class]
        # "random" texture = a prototype jittered +-10 % per bin, as the release's inference perturbs its centres
        rows = centers if len(labels) == 1 else [sum((centers[c] for c in range(len(labels))), [])]
        content["training_histograms"] = torch.tensor(rows, dtype=torch.float32)
        content["training_summary"] = {"num_lesions": 0, "imported_from": provenance}
    else:
        content["training_summary"] = {"num_lesions": 0, "imported_from": provenance,
                                       # the DiffMask network ignores the condition; one neutral feature row
                                       "features": [[0.5, 0.3, 1.0, 1.0] * len(labels)]}
        content["sampler_defaults"] = SamplerConfig(name="ddim", num_steps=10).to_dict()
    out = Path(out)
    if out.resolve() == path.resolve():
        raise LeFusionInputError(f"-o {out} is the release file itself; write the import to another path.")
    save_checkpoint(out, content)
    return ImportedCheckpoint(out, facts.checkpoint_kind, source_sha, config, step, len(state), spacing_xyz, labels)
