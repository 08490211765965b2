"""The one synthesis path: native lesion mask -> model ROI -> inpainting sampler -> pasted back.

Used by ``lefusion synthesize``, the offline enlarger and the nnU-Net trainer alike:

1. the ROI (model grid) is centred on the lesion mask and resampled from the native image;
2. it is mapped to model space [-1, 1] by the checkpoint's intensity space;
3. the sampler inpaints the lesion region (background merged with the real ROI at every step);
4. the generated ROI is mapped back to native units and pasted into the native image *only inside the
   native lesion mask*: every other voxel is bit-identical to the input.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from scipy import ndimage

from lefusion_nnunet.data.config import DataConfig
from lefusion_nnunet.data.histogram import HIST_BINS, Prototypes, TextureSpec, resolve_texture
from lefusion_nnunet.data.lesions import mr_value_range
from lefusion_nnunet.data.roi import (extract_roi, extract_roi_mask, mask_fits_roi, paste_roi,
                                      roi_center_for_mask, roi_origin_for_center)
from lefusion_nnunet.diffusion import (DenoiserConfig, LesionDenoiser, NoiseSchedule, SamplerConfig,
                                       ScheduleConfig, make_sampler)
from lefusion_nnunet.errors import LeFusionCheckpointError, LeFusionInputError
from lefusion_nnunet.training.checkpoint import load_checkpoint_content
from lefusion_nnunet.utils import resolve_device, sha256_file


@dataclass
class LoadedCheckpoint:
    """A lesion model ready to sample, with everything its checkpoint recorded."""

    path: Path
    file_sha256: str
    data: DataConfig
    prototypes: list[Prototypes]
    training_histograms: np.ndarray
    training_summary: dict
    model: LesionDenoiser
    schedule: NoiseSchedule
    sampler_defaults: dict = field(default_factory=dict)


def load_lesion_checkpoint(path: Path | str, device: str = "cpu") -> LoadedCheckpoint:
    """Load a lesion checkpoint (EMA weights) onto ``device`` in eval mode."""
    content = load_checkpoint_content(path, expected_kind="lesion")
    try:
        model = LesionDenoiser(DenoiserConfig.from_dict(content["model_config"]))
        model.load_state_dict(content["ema_state"])  # strict: unexpected or missing weights are rejected
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
class LesionRequest:
    """One lesion to synthesise.

    Attributes:
        image: native ``(Z, Y, X)`` image (the channel the model was trained on).
        spacing: ``(z, y, x)`` mm.
        class_masks: bool ``(C, Z, Y, X)``: where to generate each lesion class (native grid).
        texture: ``(C * 16,)`` histogram condition, or None for a random training-lesion texture.
        value_range: native range mapped to [-1, 1]; None -> from the intensity space (MR: this case's percentiles).
    """

    image: np.ndarray
    spacing: tuple[float, float, float]
    class_masks: np.ndarray
    texture: np.ndarray | None = None
    value_range: tuple[float, float] | None = None


def _as_generators(generator, n: int, device: str) -> list[torch.Generator] | torch.Generator | None:
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    gens = list(generator)
    if len(gens) != n:
        raise ValueError(f"{len(gens)} generators for {n} requests")
    return gens


class LesionSynthesizer:
    """Inpaints lesions with a trained LeFusion checkpoint.

    Args:
        checkpoint: a :class:`LoadedCheckpoint` or a checkpoint path.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        sampler: sampler settings; default: the fast DDIM inpainting sampler.
        guidance_scale: classifier-free guidance weight w (1 = plain conditional model).
        batch_size: ROIs per network call.
    """

    #: How lesions are made (recorded in provenance; the copy-paste baseline says ``"copy-paste"``).
    method = "lefusion"

    def __init__(self, checkpoint: LoadedCheckpoint | str | Path, device: str = "auto",
                 sampler: SamplerConfig | None = None, guidance_scale: float = 1.0, batch_size: int = 4):
        self.device = resolve_device(device)
        self.checkpoint = (checkpoint if isinstance(checkpoint, LoadedCheckpoint)
                           else load_lesion_checkpoint(checkpoint, self.device))
        self.checkpoint.model.to(self.device, memory_format=torch.channels_last_3d)
        self.checkpoint.schedule = self.checkpoint.schedule.to(self.device)
        self.sampler_config = sampler or SamplerConfig(**self.checkpoint.sampler_defaults)
        self.sampler = make_sampler(self.sampler_config)
        if guidance_scale < 0:
            raise LeFusionInputError(f"--guidance {guidance_scale} must be >= 0.")
        self.guidance_scale = float(guidance_scale)
        if batch_size < 1:
            raise LeFusionInputError(f"--batch-size {batch_size} must be at least 1.")
        self.batch_size = int(batch_size)

    @classmethod
    def from_checkpoint(cls, path: Path | str, device: str = "auto", sampler_overrides: dict | None = None,
                        guidance_scale: float = 1.0, batch_size: int = 4) -> "LesionSynthesizer":
        """Load ``path`` and build a synthesizer whose sampler is the checkpoint's default sampler with
        ``sampler_overrides`` (SamplerConfig fields, e.g. ``{"num_steps": 10}``) applied on top."""
        device = resolve_device(device)
        loaded = load_lesion_checkpoint(path, device)
        sampler = SamplerConfig(**{**loaded.sampler_defaults, **(sampler_overrides or {})})
        return cls(loaded, device=device, sampler=sampler, guidance_scale=guidance_scale, batch_size=batch_size)

    @property
    def data(self) -> DataConfig:
        return self.checkpoint.data

    def texture_condition(self, specs: TextureSpec | Sequence[TextureSpec], rng: np.random.Generator) -> np.ndarray:
        """The ``(C * 16,)`` condition for one spec (all classes) or one spec per class."""
        if isinstance(specs, TextureSpec):
            specs = [specs] * self.data.num_classes
        if len(specs) != self.data.num_classes:
            raise LeFusionInputError(f"{len(specs)} texture choices given for {self.data.num_classes} lesion classes.")
        hists = self.checkpoint.training_histograms
        return np.concatenate([
            resolve_texture(s, self.checkpoint.prototypes[c], hists[:, c * HIST_BINS:(c + 1) * HIST_BINS], rng)
            for c, s in enumerate(specs)]).astype(np.float32)

    # -- the data path -------------------------------------------------------------------------------------
    def _prepare(self, req: LesionRequest, rng: np.random.Generator) -> dict:
        data = self.data
        masks = np.asarray(req.class_masks, bool)
        if masks.ndim != 4 or masks.shape[0] != data.num_classes or masks.shape[1:] != req.image.shape:
            raise LeFusionInputError(f"lesion masks of shape {masks.shape} do not match {data.num_classes} class(es) "
                                     f"on an image of shape {req.image.shape} (z, y, x).")
        union = masks.any(0)
        origin = roi_origin_for_center(roi_center_for_mask(union), req.spacing, data.roi)
        if not mask_fits_roi(union, req.spacing, origin, data.roi, margin=0.0):
            raise LeFusionInputError(f"the lesion mask does not fit the model ROI ({data.roi.extent_mm.round(1).tolist()} "
                                     f"mm, z, y, x); use a smaller lesion or a model trained with a larger --roi-size.")
        value_range = req.value_range or (mr_value_range(data.intensity, req.image) if data.intensity.kind == "percentile"
                                          else data.intensity.case_range(req.image))
        roi_model = data.intensity.to_model(extract_roi(req.image, req.spacing, origin, data.roi), value_range)
        roi_masks = np.stack([extract_roi_mask(m, req.spacing, origin, data.roi) for m in masks])
        gen_mask = roi_masks.any(0)
        identity = np.allclose(np.asarray(data.roi.spacing_zyx), np.asarray(req.spacing))
        if not identity:  # resampled: generate one voxel further so paste-back interpolation sees lesion values
            gen_mask = ndimage.binary_dilation(gen_mask)
        texture = req.texture if req.texture is not None else self.texture_condition(TextureSpec("random"), rng)
        return dict(origin=origin, value_range=value_range, roi=roi_model, masks=roi_masks, gen_mask=gen_mask,
                    texture=np.asarray(texture, np.float32), union=union)

    def _eps_fn(self, context: torch.Tensor, class_masks: torch.Tensor, cond: torch.Tensor):
        model, w = self.checkpoint.model, self.guidance_scale
        use_amp = self.device.startswith("cuda")

        def eps_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            x_t = x_t.contiguous(memory_format=torch.channels_last_3d)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
                if w == 1.0:
                    out = model(x_t, t, context, class_masks, cond)
                else:
                    b = x_t.shape[0]
                    drop = torch.cat([torch.zeros(b, dtype=torch.bool, device=x_t.device),
                                      torch.ones(b, dtype=torch.bool, device=x_t.device)])
                    both = model(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([context, context]),
                                 torch.cat([class_masks, class_masks]), torch.cat([cond, cond]), drop_cond=drop)
                    eps_c, eps_u = both.float().chunk(2)
                    out = eps_u + w * (eps_c - eps_u)
            return out.float()
        return eps_fn

    def _sample_batch(self, prepared: list[dict], generators) -> list[np.ndarray]:
        dev, c = self.device, self.data.num_classes
        roi = torch.from_numpy(np.stack([p["roi"] for p in prepared])).to(dev)[:, None]        # (B, 1, Z, Y, X)
        masks = torch.from_numpy(np.stack([p["masks"] for p in prepared])).to(dev).float()     # (B, C, Z, Y, X)
        gen_mask = torch.from_numpy(np.stack([p["gen_mask"] for p in prepared])).to(dev).float()[:, None]
        cond = torch.from_numpy(np.stack([p["texture"] for p in prepared])).to(dev)
        known = roi.expand(-1, c, -1, -1, -1).contiguous()
        context = roi * (1.0 - gen_mask)
        x0 = self.sampler.sample(self._eps_fn(context, masks, cond), self.checkpoint.schedule, known, gen_mask,
                                 generator=generators)
        if c == 1:
            composed = x0[:, 0]
        else:  # multi-channel decomposition: output = sum_c channel_c * mask_c (ring: channel mean)
            any_class = masks.sum(1, keepdim=True).clamp(min=1.0)
            composed = torch.where(masks.any(1), (x0 * masks).sum(1) / any_class[:, 0], x0.mean(1))
        return [composed[i].float().cpu().numpy() for i in range(len(prepared))]

    def synthesize(self, requests: list[LesionRequest], generator=None, rng: np.random.Generator | None = None,
                   progress: bool = False) -> list[np.ndarray]:
        """Synthesise every request; returns native ``(Z, Y, X)`` float32 images changed only inside each mask.

        Args:
            generator: one ``torch.Generator`` for all, or one per request (for results that do not depend
                on batch composition), or None.
            rng: numpy generator for random texture choices (requests without ``texture``).
        """
        rng = rng if rng is not None else np.random.default_rng()
        gens = _as_generators(generator, len(requests), self.device)
        prepared = [self._prepare(r, rng) for r in requests]
        outputs: list[np.ndarray] = []
        from tqdm.auto import tqdm

        starts = range(0, len(requests), self.batch_size)
        for s in tqdm(starts, desc="synthesising", disable=not progress, leave=False):
            chunk = prepared[s:s + self.batch_size]
            g = gens[s:s + self.batch_size] if isinstance(gens, list) else gens
            for p, req, roi_out in zip(chunk, requests[s:s + self.batch_size], self._sample_batch(chunk, g)):
                native_roi = self.data.intensity.to_native(roi_out, p["value_range"])
                outputs.append(paste_roi(req.image, req.spacing, p["origin"], self.data.roi, native_roi, p["union"]))
        return outputs


def seeded_generator(seed: int, *keys: object, device: str = "cpu") -> torch.Generator:
    """A torch generator seeded from ``seed`` and any keys (e.g. case id, variant index): stable across runs."""
    import hashlib

    digest = hashlib.sha256(repr((seed,) + tuple(keys)).encode()).digest()
    g = torch.Generator(device=device)
    g.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return g


def seeded_rng(seed: int, *keys: object) -> np.random.Generator:
    """A numpy generator seeded from ``seed`` and keys, matching :func:`seeded_generator`'s derivation."""
    import hashlib

    digest = hashlib.sha256(repr((seed,) + tuple(keys)).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


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
    import shutil

    from lefusion_nnunet.data.io import (check_same_grid, file_ending_of, read_image, read_label, write_image_channel,
                                         write_label)
    from lefusion_nnunet.utils import atomic_directory
    from lefusion_nnunet.validation import check_output_absent

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
    [new_channel] = synth.synthesize([request], generator=[seeded_generator(seed, "synthesize",
                                                                            device=synth.device)], rng=rng)
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
