"""Downstream benchmark: do synthetic lesions help a segmenter? Real-only vs copy-paste vs LeFusion.

For a dataset with few labelled lesion cases and many lesion-free cases, the same segmenter is trained on

  (a) ``real``: the real training cases only (lesion and lesion-free cases);
  (b) ``copy-paste``: (a) + K copy-paste variants of every lesion-free training case
      (:class:`lefusion_nnunet.copy_paste.CopyPasteSynthesizer`: real lesion masks, filled with a real lesion's
      voxels with intensity transfer);
  (c) ``lefusion``: (a) + K LeFusion variants of every lesion-free training case (``lefusion enlarge
      --mask-source real``: the same masks at the same places as (b), only the filling differs);
  (d) ``lefusion-diffmask``: (c) with masks from the lesion mask diffusion model (``--mask-source diffusion``),

each with several seeds, and scored on held-out real cases: lesion Dice (mean over held-out cases with a lesion,
and pooled over all voxels), per-lesion detection sensitivity and false-positive components per case
(:mod:`lefusion_nnunet.evaluation.downstream`), reported as mean ± sample std over seeds.

Data. ``DATASET = phantom`` generates the chest phantom (default 5 lesion + 15 lesion-free training cases,
nodules of three textures) and an independent held-out set from another seed (default 12 lesion + 4 lesion-free
cases, ids ``heldout_XXX``). Any other value names an nnU-Net raw dataset (id, name or folder): lesion cases are
found from the labels and :func:`lefusion_nnunet.evaluation.held_out_split` holds out ``--test-cases`` of them
(plus ``--test-free-cases`` lesion-free ones); the training dataset written for the arms references only the
remaining cases, so the lesion model, the mask model, the copy-paste library, the masks' host regions and the
intensity normalisation never see a held-out case (checked with :func:`check_no_leakage` for every arm).

Segmenter. ``--segmenter unet`` (default, the documented reduced CPU setting): nnU-Net's building blocks at a
small size - a ``PlainConvUNet`` from dynamic-network-architectures (instance norm, leaky ReLU, kernels/strides
chosen from the spacing as nnU-Net does for anisotropic data, features ``--features``), nnU-Net's
``DC_and_CE_loss`` (batch Dice, no background), SGD (momentum 0.99, Nesterov, weight decay 3e-5, poly learning
rate from 0.01, gradient clip 12), nnU-Net's CT normalisation from the arm's own training cases, patches of
``--patch`` voxels with one third of each batch centred on a foreground voxel (class drawn uniformly among the
classes present, as nnU-Net oversamples), random mirroring as the only augmentation, no deep supervision, a fixed
number of iterations (``--iterations``; the same for every arm), final weights (no checkpoint selection), and
nnU-Net's Gaussian-weighted sliding-window inference (step 0.5, its ``compute_gaussian``) followed by argmax.
The training target is the lesion label(s) against everything else (``--targets lesion``, default: the small
budget goes to the lesion; ``--targets all`` trains every label of dataset.json as nnU-Net does); the
lesion label is scored. Oversampled patches are centred on a voxel of a randomly drawn target class present in
the case, so the arms differ in how many patches show a lesion exactly as nnU-Net's would; the copy-paste arm
has the same number of synthetic lesions, in the same places, as the LeFusion arm, so (b) vs (c) isolates
what the lesion *appearance* adds. ``--segmenter nnunet`` runs nnU-Net
itself instead (``nnUNetv2_plan_and_preprocess``, ``nnUNetv2_train ID 3d_fullres all -tr --nnunet-trainer``,
``nnUNetv2_predict``), for machines with a GPU.

No tuning on the held-out cases: the defaults below were chosen while developing on ``--phantom-seed 0`` (its
held-out set is seed 1000); the reported run uses ``--phantom-seed 1`` (training seed 1, held-out seed 1001), whose
held-out cases were not looked at before. The final weights are scored once; predictions are not post-processed.

    # the full CPU run (about an hour on 2 cores; see README for the measured time)
    python benchmarks/downstream.py phantom --out benchmarks/results/downstream.json \\
        --out-md benchmarks/results/downstream.md
    # smoke test at toy size (a few minutes)
    python benchmarks/downstream.py phantom --quick

Prints one JSON object (also written to ``--out``) and a markdown table (``--out-md``). Intermediate results are
kept in ``--work``; ``--resume`` reuses finished steps (datasets, models, per-seed scores) after an interruption.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

ARMS = ("real", "copy-paste", "lefusion", "lefusion-diffmask")
ARM_TITLES = {"real": "(a) real only", "copy-paste": "(b) real + copy-paste",
              "lefusion": "(c) real + LeFusion", "lefusion-diffmask": "(d) real + LeFusion, diffusion masks"}
PHANTOM_LESION_LABEL, PHANTOM_REGION_LABEL = 2, 1
#: Offsets from --id-base of the datasets the benchmark writes under <work>/nnUNet_raw.
DATASET_OFFSETS = {"train": 0, "test": 1, "copy-paste": 2, "lefusion": 3, "lefusion-diffmask": 4}
DATASET_NAMES = {"train": "DownstreamTrain", "test": "DownstreamTest", "copy-paste": "DownstreamCopyPaste",
                 "lefusion": "DownstreamLeFusion", "lefusion-diffmask": "DownstreamLeFusionDiffMask"}


def log(msg: str) -> None:
    print(f"[downstream {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# =========================================================================================================
# the reduced segmenter (nnU-Net building blocks)
# =========================================================================================================
@dataclass(frozen=True)
class SegmenterConfig:
    """Settings of the reduced CPU segmenter (see the module docstring)."""

    features: tuple[int, ...] = (8, 16, 32, 64)
    patch_zyx: tuple[int, int, int] = (16, 48, 48)
    batch_size: int = 2
    iterations: int = 1500
    lr: float = 0.01
    weight_decay: float = 3e-5
    momentum: float = 0.99
    grad_clip: float = 12.0
    oversample_foreground: float = 0.33
    tile_step: float = 0.5
    mirror_tta: bool = False
    threads: int = 2
    tile_batch: int = 4
    targets: str = "lesion"          # "lesion": lesion label(s) vs rest; "all": every label of dataset.json

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def plan_network(spacing_zyx, patch_zyx, n_stages: int) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
    """Kernel sizes and strides per stage, nnU-Net style for anisotropic spacing.

    An axis is downsampled (stride 2) at a stage when its current spacing is at most twice the finest current
    spacing and its remaining size is even and at least 8; it gets a kernel of 3 when its spacing (after that
    stage's stride) is at most twice the finest, else 1.
    """
    sp = np.asarray(spacing_zyx, np.float64).copy()
    size = np.asarray(patch_zyx, np.int64).copy()
    kernels, strides = [], []
    for s in range(n_stages):
        if s == 0:
            stride = (1, 1, 1)
        else:
            stride = tuple(2 if (sp[a] <= 2 * sp.min() and size[a] % 2 == 0 and size[a] >= 8) else 1 for a in range(3))
        sp = sp * np.asarray(stride)
        size = size // np.asarray(stride)
        kernels.append(tuple(3 if sp[a] <= 2 * sp.min() else 1 for a in range(3)))
        strides.append(stride)
    return kernels, strides


def build_network(in_channels: int, num_classes: int, spacing_zyx, config: SegmenterConfig):
    import torch
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    kernels, strides = plan_network(spacing_zyx, config.patch_zyx, len(config.features))
    return PlainConvUNet(in_channels, len(config.features), list(config.features), torch.nn.Conv3d, kernels, strides,
                         2, num_classes, 2, True, torch.nn.InstanceNorm3d, {"eps": 1e-5, "affine": True}, None, None,
                         torch.nn.LeakyReLU, {"inplace": True}, deep_supervision=False)


@dataclass
class SegCase:
    """One case in memory: normalised image ``(C, Z, Y, X)`` float32, label ``(Z, Y, X)`` int16."""

    case_id: str
    image: np.ndarray
    label: np.ndarray
    spacing: tuple[float, float, float]
    locations: dict = field(default_factory=dict)   # foreground label -> (N, 3) voxel indices (subsampled)


def read_cases(dataset, case_ids=None) -> list[tuple[str, np.ndarray, np.ndarray, tuple]]:
    """Raw (image (C, Z, Y, X), label, spacing) of a raw dataset's cases."""
    from lefusion_nnunet.data.io import read_image, read_label

    out = []
    for case in dataset.cases:
        if case_ids is not None and case.case_id not in case_ids:
            continue
        vol = read_image(case.images)
        label, _ = read_label(case.label)
        out.append((case.case_id, np.asarray(vol.array, np.float32), label.astype(np.int16), tuple(vol.spacing)))
    return out


@dataclass(frozen=True)
class Normalization:
    """nnU-Net's CT normalisation (clip to foreground 0.5/99.5 percentiles, z-score with foreground mean/std),
    per channel, from training cases; channels that are not CT are z-scored per case."""

    ct: tuple[bool, ...]
    stats: tuple[tuple[float, float, float, float], ...]   # per channel: (lo, hi, mean, std); unused for non-CT

    @classmethod
    def fit(cls, raw_cases, channel_names: dict) -> "Normalization":
        n_ch = raw_cases[0][1].shape[0]
        ct = tuple(str(channel_names.get(str(c), "")).upper() == "CT" for c in range(n_ch))
        rng = np.random.default_rng(1234)  # nnU-Net's fingerprint also samples with a fixed seed
        stats = []
        for c in range(n_ch):
            samples = []
            for _, image, label, _ in raw_cases:
                fg = image[c][label > 0]
                if len(fg) > 10000:
                    fg = fg[rng.choice(len(fg), 10000, replace=False)]
                samples.append(fg)
            v = np.concatenate(samples) if samples else np.zeros(1, np.float32)
            if v.size == 0:
                v = np.concatenate([r[1][c].ravel() for r in raw_cases])
            lo, hi = np.percentile(v, [0.5, 99.5])
            stats.append((float(lo), float(hi), float(v.mean()), float(v.std())))
        return cls(ct, tuple(stats))

    def apply(self, image: np.ndarray) -> np.ndarray:
        out = np.empty_like(image, dtype=np.float32)
        for c in range(image.shape[0]):
            if self.ct[c]:
                lo, hi, mean, std = self.stats[c]
                out[c] = (np.clip(image[c], lo, hi) - mean) / max(std, 1e-8)
            else:
                out[c] = (image[c] - image[c].mean()) / max(float(image[c].std()), 1e-8)
        return out

    def to_dict(self) -> dict:
        return {"ct": list(self.ct), "stats": [list(s) for s in self.stats]}


def _pad_to(arr: np.ndarray, shape_zyx, value) -> tuple[np.ndarray, tuple]:
    """Pad the last three axes to at least ``shape_zyx`` (centred); returns the array and the crop back."""
    spatial = arr.shape[-3:]
    need = [max(0, int(t) - int(s)) for s, t in zip(spatial, shape_zyx)]
    if not any(need):
        return arr, tuple(slice(0, s) for s in spatial)
    pads = [(n // 2, n - n // 2) for n in need]
    full = [(0, 0)] * (arr.ndim - 3) + pads
    crop = tuple(slice(p[0], p[0] + s) for p, s in zip(pads, spatial))
    return np.pad(arr, full, mode="constant", constant_values=value), crop


def prepare_cases(raw_cases, norm: Normalization, patch_zyx, rng_seed: int = 1234) -> list[SegCase]:
    rng = np.random.default_rng(rng_seed)
    out = []
    for case_id, image, label, spacing in raw_cases:
        img, _ = _pad_to(norm.apply(image), patch_zyx, 0.0)
        lab, _ = _pad_to(label, patch_zyx, 0)
        locs = {}
        for v in np.unique(lab):
            if v <= 0:
                continue
            idx = np.argwhere(lab == v)
            if len(idx) > 10000:
                idx = idx[np.sort(rng.choice(len(idx), 10000, replace=False))]
            locs[int(v)] = idx
        out.append(SegCase(case_id, img, lab, spacing, locs))
    return out


def sample_batch(cases: list[SegCase], config: SegmenterConfig, rng: np.random.Generator):
    """A batch of patches: nnU-Net's rule, the last ``round(B * oversample)`` items centred on foreground."""
    p = np.asarray(config.patch_zyx)
    b = config.batch_size
    n_random = round(b * (1 - config.oversample_foreground))
    imgs, labs = [], []
    for i in range(b):
        case = cases[int(rng.integers(len(cases)))]
        shape = np.asarray(case.label.shape)
        if i >= n_random and case.locations:
            classes = sorted(case.locations)
            locs = case.locations[classes[int(rng.integers(len(classes)))]]
            voxel = locs[int(rng.integers(len(locs)))]
            lo = np.clip(voxel - p // 2, 0, shape - p)
        else:
            lo = np.array([int(rng.integers(0, s - q + 1)) for s, q in zip(shape, p)])
        sl = tuple(slice(int(a), int(a + q)) for a, q in zip(lo, p))
        img = case.image[(slice(None),) + sl]
        lab = case.label[sl]
        for axis in range(3):  # mirroring, as nnU-Net's only spatial augmentation kept here
            if rng.random() < 0.5:
                img = np.flip(img, axis + 1)
                lab = np.flip(lab, axis)
        imgs.append(np.ascontiguousarray(img))
        labs.append(np.ascontiguousarray(lab))
    return np.stack(imgs), np.stack(labs)[:, None]


def train_segmenter(cases: list[SegCase], num_classes: int, spacing_zyx, config: SegmenterConfig, seed: int,
                    progress_every: int = 50):
    """Train the reduced segmenter; returns the network (eval mode) and the loss curve (every 10 iterations)."""
    import torch
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    torch.set_num_threads(config.threads)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = build_network(cases[0].image.shape[0], num_classes, spacing_zyx, config)
    net = net.to(memory_format=torch.channels_last_3d)  # about 2x faster Conv3d on CPU
    loss_fn = DC_and_CE_loss({"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": False}, {}, weight_ce=1,
                             weight_dice=1, ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss)
    opt = torch.optim.SGD(net.parameters(), config.lr, momentum=config.momentum, nesterov=True,
                          weight_decay=config.weight_decay)
    rng = np.random.default_rng([int(seed), 0x5E6])
    net.train()
    curve, running = [], []
    t0, c0 = time.perf_counter(), time.process_time()
    for it in range(config.iterations):
        for group in opt.param_groups:
            group["lr"] = config.lr * (1 - it / config.iterations) ** 0.9
        x, y = sample_batch(cases, config, rng)
        x = torch.from_numpy(x).contiguous(memory_format=torch.channels_last_3d)
        y = torch.from_numpy(y.astype(np.int64))
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(net(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), config.grad_clip)
        opt.step()
        running.append(float(loss.detach()))
        if (it + 1) % 10 == 0 or it + 1 == config.iterations:
            curve.append(round(float(np.mean(running)), 5))
            running = []
        if progress_every and (it + 1) % progress_every == 0:
            log(f"  iteration {it + 1}/{config.iterations}, loss {curve[-1]:.4f}, "
                f"{(time.perf_counter() - t0) / (it + 1):.2f} s/it ({(time.process_time() - c0) / (it + 1):.2f} "
                f"CPU s/it)")
    net.eval()
    return net, curve


def predict_case(net, image: np.ndarray, config: SegmenterConfig, num_classes: int) -> np.ndarray:
    """Gaussian-weighted sliding-window prediction (nnU-Net's tiling and weighting) -> label map (Z, Y, X)."""
    import torch
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian, compute_steps_for_sliding_window

    patch = tuple(int(v) for v in config.patch_zyx)
    img, crop = _pad_to(image, patch, 0.0)
    shape = img.shape[1:]
    steps = compute_steps_for_sliding_window(shape, patch, config.tile_step)
    gauss = compute_gaussian(patch, sigma_scale=1.0 / 8, value_scaling_factor=10, dtype=torch.float32,
                             device=torch.device("cpu"))
    logits = torch.zeros((num_classes, *shape), dtype=torch.float32)
    weight = torch.zeros(shape, dtype=torch.float32)
    x_all = torch.from_numpy(img)
    tiles = [(slice(z, z + patch[0]), slice(y, y + patch[1]), slice(x, x + patch[2]))
             for z in steps[0] for y in steps[1] for x in steps[2]]

    def run(batch: torch.Tensor) -> torch.Tensor:
        return net(batch.contiguous(memory_format=torch.channels_last_3d)).float()

    with torch.no_grad():
        for start in range(0, len(tiles), config.tile_batch):  # batches of tiles: batch-1 convs are slow on CPU
            group = tiles[start:start + config.tile_batch]
            batch = torch.stack([x_all[(slice(None),) + sl] for sl in group])
            pred = run(batch)
            if config.mirror_tta:
                n = 1
                for axes in ((2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)):
                    pred = pred + torch.flip(run(torch.flip(batch, axes)), axes)
                    n += 1
                pred = pred / n
            for sl, p in zip(group, pred):
                logits[(slice(None),) + sl] += p * gauss
                weight[sl] += gauss
    labels = torch.argmax(logits / weight, 0).numpy().astype(np.int16)
    return labels[crop]


# =========================================================================================================
# data
# =========================================================================================================
def _write_dataset_json(folder: Path, name: str, channel_names: dict, labels: dict, n: int, ending: str,
                        extra: dict | None = None, dataset: dict | None = None) -> None:
    dj = {"channel_names": channel_names, "labels": labels, "numTraining": n, "file_ending": ending, "name": name}
    if dataset is not None:
        dj["dataset"] = dataset
    dj.update(extra or {})
    (folder / "dataset.json").write_text(json.dumps(dj, indent=2) + "\n")


def make_phantom_data(args, raw: Path) -> dict:
    """Training phantom (few lesion cases, many lesion-free) + an independent held-out phantom (other seed)."""
    from lefusion_nnunet.phantoms.chest import (LABELS, PhantomConfig, generate_chest_phantom, make_phantom_case,
                                                write_case_files, write_raw_dataset)

    shape = tuple(args.shape[::-1]) if args.shape else PhantomConfig().shape_zyx
    n_l, n_f = args.train_lesion_cases, args.train_free_cases
    train_cfg = PhantomConfig(num_cases=n_l + n_f, lesion_free_fraction=n_f / (n_l + n_f), shape_zyx=shape,
                              seed=args.phantom_seed)
    test_seed = args.phantom_seed + 1000
    t_l, t_f = args.test_cases, args.test_free_cases
    test_cfg = PhantomConfig(num_cases=t_l + t_f, lesion_free_fraction=t_f / (t_l + t_f), shape_zyx=shape,
                             seed=test_seed)
    ids = {k: args.id_base + v for k, v in DATASET_OFFSETS.items()}
    if not args.resume:  # start from fresh data (a changed configuration must not reuse old cases)
        for part in ("train", "test"):
            old = _existing(raw, ids[part])
            if old is not None:
                shutil.rmtree(old)
    train_dir = _existing(raw, ids["train"])
    if train_dir is None:
        train_dir = generate_chest_phantom(raw, ids["train"], DATASET_NAMES["train"], train_cfg)
    test_dir = _existing(raw, ids["test"])
    if test_dir is None:
        nodules = {}

        def fill(partial: Path) -> None:
            z, y, x = test_cfg.shape_zyx
            sz, sy, sx = test_cfg.spacing_zyx
            origin = (-0.5 * (x - 1) * sx, -0.5 * (y - 1) * sy, -150.0 - 0.5 * (z - 1) * sz)  # centred, as the phantom
            for i in range(test_cfg.num_cases):
                case = make_phantom_case(test_cfg, i)
                cid = f"heldout_{i:03d}"
                write_case_files(partial, cid, case.image, case.label, test_cfg.spacing_zyx, origin,
                                 test_cfg.file_ending)
                nodules[cid] = [n.to_dict() for n in case.nodules]
            _write_dataset_json(partial, DATASET_NAMES["test"], {"0": "CT"}, dict(LABELS), test_cfg.num_cases,
                                test_cfg.file_ending, {"lefusion_phantom": test_cfg.to_dict()})
            (partial / "heldout_nodules.json").write_text(json.dumps(nodules, indent=1) + "\n")

        test_dir = write_raw_dataset(raw, ids["test"], DATASET_NAMES["test"], fill)
    manifest_path = test_dir / "heldout_nodules.json"
    train_manifest = json.loads((train_dir / "phantom_manifest.json").read_text())
    lesion = sorted(c["case_id"] for c in train_manifest["cases"] if c["has_lesion"])
    free = sorted(c["case_id"] for c in train_manifest["cases"] if not c["has_lesion"])
    test_nodules = json.loads(manifest_path.read_text())
    return {"train_dir": train_dir, "test_dir": test_dir, "lesion_labels": [PHANTOM_LESION_LABEL],
            "region_label": PHANTOM_REGION_LABEL, "channel": 0,
            "split": {"train_lesion": lesion, "train_free": free,
                      "test_lesion": sorted(c for c, n in test_nodules.items() if n),
                      "test_free": sorted(c for c, n in test_nodules.items() if not n), "unused": []},
            "phantom": {"train": train_cfg.to_dict(), "test": test_cfg.to_dict()},
            "test_nodules": test_nodules,
            "textures": sorted({n["texture"] for ns in test_nodules.values() for n in ns})}


def _existing(raw: Path, dataset_id: int) -> Path | None:
    found = sorted(raw.glob(f"Dataset{dataset_id:03d}_*")) if raw.is_dir() else []
    return found[0] if found and (found[0] / "dataset.json").is_file() else None


def split_raw_dataset(args, raw: Path) -> dict:
    """Hold out real cases of an existing dataset; write training / test datasets that reference the files."""
    from lefusion_nnunet.data.dataset import label_presence, load_raw_dataset
    from lefusion_nnunet.errors import LeFusionInputError
    from lefusion_nnunet.evaluation.downstream import held_out_split

    if args.lesion_label is None:
        raise LeFusionInputError("pass --lesion-label for a dataset other than the phantom.")
    src = load_raw_dataset(args.dataset)
    labels = [int(args.lesion_label)]
    src.check_labels(labels, "--lesion-label")
    presence = label_presence(src, labels)
    lesion = [c for c, has in presence.items() if has]
    free = [c for c, has in presence.items() if not has]
    split = held_out_split(lesion, free, args.test_cases, args.split_seed, n_test_free=args.test_free_cases,
                           n_train_lesion=args.train_lesion_cases, n_train_free=args.train_free_cases)
    ids = {k: args.id_base + v for k, v in DATASET_OFFSETS.items()}
    dirs = {}
    for part, case_ids in (("train", split.train), ("test", split.test)):
        folder = raw / f"Dataset{ids[part]:03d}_{DATASET_NAMES[part]}"
        if not (args.resume and (folder / "dataset.json").is_file()):
            folder.mkdir(parents=True, exist_ok=True)
            entries = {c: {"images": [str(Path(p).resolve()) for p in src.case(c).images],
                           "label": str(Path(src.case(c).label).resolve())} for c in case_ids}
            dj = {k: v for k, v in src.dataset_json.items() if k not in ("dataset", "numTraining", "name")}
            _write_dataset_json(folder, folder.name, dj.pop("channel_names", dj.pop("modality", {})), dj.pop("labels"),
                                len(case_ids), dj.pop("file_ending"), {"source_dataset": src.name, **dj}, entries)
        dirs[part] = folder
    return {"train_dir": dirs["train"], "test_dir": dirs["test"], "lesion_labels": labels,
            "region_label": args.region_label, "channel": args.channel, "split": split.to_dict(),
            "source_dataset": src.name, "test_nodules": None, "textures": []}


# =========================================================================================================
# arms
# =========================================================================================================
def _settings(args, mask_source: str, mask_checkpoint: str | None = None, region_label=None):
    from lefusion_nnunet.variant_settings import VariantSettings

    kw = {}
    if mask_checkpoint is not None:
        kw["mask_checkpoint"] = mask_checkpoint
    sampler = {"num_steps": args.sampler_steps} if args.sampler_steps else {}
    return VariantSettings(per_case=args.per_case, mask_source=mask_source, size_mm=tuple(args.size_mm),
                           region_label=region_label, textures=("random",), boundary=args.boundary, sampler=sampler,
                           seed=args.synthesis_seed, **kw)


def _roi(args, train_ds):
    from lefusion_nnunet.data.lesions import median_spacing
    from lefusion_nnunet.data.roi import RoiGeometry

    spacing = median_spacing([c.images[0] for c in train_ds.cases])
    return RoiGeometry(tuple(int(v) for v in args.roi_size[::-1]), spacing)


def _train_config(args, preset: str, steps: int, minutes):
    from lefusion_nnunet.training.loop import TrainConfig

    return TrainConfig(preset=preset, steps=steps, batch_size=args.lesion_batch_size, seed=args.synthesis_seed,
                       device=args.device, max_minutes=minutes, checkpoint_every=max(steps, 1),
                       log_every=max(1, min(50, steps)))


def build_arms(args, data: dict, raw: Path, work: Path, timings: dict) -> dict:
    """Write the arm datasets (b)-(d); returns arm -> {"dir": folder} or {"skipped": reason}."""
    from lefusion_nnunet.data.dataset import load_raw_dataset
    from lefusion_nnunet.enlargement.run import enlarge

    train_ds = load_raw_dataset(data["train_dir"])
    region = data["region_label"]
    labels = data["lesion_labels"]
    roi = _roi(args, train_ds)
    arms: dict = {"real": {"dir": data["train_dir"]}}
    ids = {k: args.id_base + v for k, v in DATASET_OFFSETS.items()}

    def dest(arm: str) -> str:
        return f"Dataset{ids[arm]:03d}_{DATASET_NAMES[arm]}"

    def reuse(arm: str) -> Path | None:
        d = raw / dest(arm)
        if (d / "dataset.json").is_file():
            if args.resume:
                return d
            shutil.rmtree(d)
        return None

    if "copy-paste" in args.arms:
        d = reuse("copy-paste")
        if d is None:
            from lefusion_nnunet.synthesis.copy_paste import CopyPasteSynthesizer

            t = time.perf_counter()
            synth = CopyPasteSynthesizer.from_dataset(train_ds, labels, region_label=region, channel=data["channel"],
                                                      roi=roi, blend_mm=args.blend_mm)
            summary = enlarge(train_ds.folder, dest("copy-paste"), settings=_settings(args, "real", region_label=region),
                              synthesizer=synth, progress=False)
            timings["synthesis_copy-paste"] = round(time.perf_counter() - t, 1)
            log(summary.format())
            d = summary.destination
        arms["copy-paste"] = {"dir": d}

    ckpt = None
    if {"lefusion", "lefusion-diffmask"} & set(args.arms):
        from lefusion_nnunet.training.lesion import train_lesion_model

        run_dir = work / "lesion_model"
        ckpt = run_dir / "checkpoint_final.pt"
        if not (args.resume and ckpt.is_file()):
            t = time.perf_counter()
            log(f"training the lesion model ({args.lesion_preset}, {args.lesion_steps} steps)")
            ckpt = train_lesion_model(train_ds, labels, run_dir, _train_config(args, args.lesion_preset,
                                      args.lesion_steps, args.lesion_minutes), roi, region_label=region,
                                      channel=data["channel"], overwrite=True, progress=False)
            timings["lesion_model_training"] = round(time.perf_counter() - t, 1)

    if "lefusion" in args.arms:
        d = reuse("lefusion")
        if d is None:
            t = time.perf_counter()
            summary = enlarge(train_ds.folder, dest("lefusion"), checkpoint=ckpt,
                              settings=_settings(args, "real", region_label=region), batch_size=args.synthesis_batch_size,
                              device=args.device, progress=False)
            timings["synthesis_lefusion"] = round(time.perf_counter() - t, 1)
            log(summary.format())
            d = summary.destination
        arms["lefusion"] = {"dir": d}

    if "lefusion-diffmask" in args.arms:
        arms["lefusion-diffmask"] = _diffmask_arm(args, train_ds, labels, region, roi, ckpt, raw, work, dest, reuse,
                                                  timings)
    return arms


def _diffmask_arm(args, train_ds, labels, region, roi, ckpt, raw, work, dest, reuse, timings) -> dict:
    from lefusion_nnunet.enlargement.run import enlarge
    from lefusion_nnunet.variant_settings import MASK_SOURCES

    if "diffusion" not in MASK_SOURCES:
        return {"skipped": "this version of lefusion_nnunet.variants has no --mask-source diffusion"}
    try:
        from lefusion_nnunet.training.mask import train_mask_model
    except ImportError as exc:
        return {"skipped": f"mask diffusion is not available ({exc})"}
    d = reuse("lefusion-diffmask")
    if d is not None:
        return {"dir": d}
    run_dir = work / "mask_model"
    mask_ckpt = run_dir / "checkpoint_final.pt"
    if not (args.resume and mask_ckpt.is_file()):
        t = time.perf_counter()
        log(f"training the mask model ({args.mask_preset}, {args.mask_steps} steps)")
        mask_ckpt = train_mask_model(train_ds, labels, run_dir, _train_config(args, args.mask_preset, args.mask_steps,
                                     args.mask_minutes), roi, region_label=region, overwrite=True, progress=False)
        timings["mask_model_training"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    summary = enlarge(train_ds.folder, dest("lefusion-diffmask"), checkpoint=ckpt,
                      settings=_settings(args, "diffusion", str(mask_ckpt), region_label=region),
                      batch_size=args.synthesis_batch_size, device=args.device, progress=False)
    timings["synthesis_lefusion-diffmask"] = round(time.perf_counter() - t, 1)
    log(summary.format())
    return {"dir": summary.destination}


def arm_composition(folder: Path, split: dict) -> dict:
    """Case counts of an arm's training set and the provenance map (synthetic -> source case)."""
    from lefusion_nnunet.data.dataset import load_raw_dataset
    from lefusion_nnunet.enlargement.run import PROVENANCE_NAME

    ds = load_raw_dataset(folder)
    prov_file = folder / PROVENANCE_NAME
    derived = {}
    if prov_file.is_file():
        prov = json.loads(prov_file.read_text())
        derived = {k: v["source_case"] for k, v in prov["synthetic_cases"].items()}
    ids = [c.case_id for c in ds.cases]
    return {"cases": ids, "derived_from": derived, "n_real": len(ids) - len(derived), "n_synthetic": len(derived),
            "n_real_lesion_cases": len(split["train_lesion"]), "n_real_lesion_free_cases": len(split["train_free"])}


# =========================================================================================================
# scoring
# =========================================================================================================
def texture_sensitivity(pred: np.ndarray, gt_lesion: np.ndarray, nodules: list[dict]) -> dict[str, list[int]]:
    """Phantom only: texture -> [detected, total] over the case's nodules (by the component at each centre)."""
    from lefusion_nnunet.evaluation.downstream import connected_lesions

    comps, _ = connected_lesions(gt_lesion)
    out: dict[str, list[int]] = {}
    for n in nodules:
        comp = comps[tuple(n["center_zyx"])]
        if comp == 0:
            continue
        hit = bool((pred & (comps == comp)).any())
        rec = out.setdefault(n["texture"], [0, 0])
        rec[0] += int(hit)
        rec[1] += 1
    return out


def score_predictions(preds: dict[str, np.ndarray], test_cases, lesion_labels, test_nodules) -> dict:
    from lefusion_nnunet.evaluation.downstream import aggregate, evaluate_case, lesion_union

    metrics, per_texture = [], {}
    for case_id, _image, label, spacing in test_cases:
        pred = preds[case_id]
        metrics.append(evaluate_case(case_id, pred, label, lesion_labels, spacing))
        if test_nodules is not None:
            for tex, (hit, total) in texture_sensitivity(lesion_union(pred, lesion_labels),
                                                          lesion_union(label, lesion_labels),
                                                          test_nodules.get(case_id, [])).items():
                rec = per_texture.setdefault(tex, [0, 0])
                rec[0] += hit
                rec[1] += total
    summary = aggregate(metrics)
    for tex, (hit, total) in sorted(per_texture.items()):
        summary[f"sensitivity_{tex}"] = hit / total if total else float("nan")
    return {"summary": summary, "cases": [m.to_dict() for m in metrics]}


def run_unet_arm(arm: str, folder: Path, seeds, config: SegmenterConfig, data: dict, test_raw, results_dir: Path,
                 resume: bool) -> list[dict]:
    from lefusion_nnunet.data.dataset import load_raw_dataset

    ds = load_raw_dataset(folder)
    lesion_labels = [int(v) for v in data["lesion_labels"]]
    raw_cases = read_cases(ds)
    spacings = np.array([c[3] for c in raw_cases])
    if not np.allclose(spacings, spacings[0], rtol=0.01):
        from lefusion_nnunet.errors import LeFusionInputError

        raise LeFusionInputError("the reduced segmenter does not resample: all cases must share one spacing; use "
                                 "--segmenter nnunet for this dataset.")
    spacing = tuple(float(v) for v in spacings[0])
    norm = Normalization.fit(raw_cases, ds.channel_names)   # nnU-Net's foreground: every label > 0
    if config.targets == "lesion":  # lesion class k (1..C) vs everything else (0)
        num_classes = len(lesion_labels) + 1
        lut = np.zeros(max(max(ds.labels.values()), max(lesion_labels)) + 1, np.int16)
        for k, v in enumerate(lesion_labels, start=1):
            lut[v] = k
        raw_cases = [(cid, img, lut[lab], sp) for cid, img, lab, sp in raw_cases]
        back = np.array([0] + lesion_labels, np.int16)
    else:
        num_classes = max(ds.labels.values()) + 1
        back = np.arange(num_classes, dtype=np.int16)
    cases = prepare_cases(raw_cases, norm, config.patch_zyx)
    del raw_cases
    test_images = {cid: norm.apply(img) for cid, img, _, _ in test_raw}
    out = []
    for seed in seeds:
        res_file = results_dir / f"{arm}_seed{seed}.json"
        if resume and res_file.is_file():
            old = json.loads(res_file.read_text())
            if old.get("segmenter_config") == config.to_dict() and old.get("dataset") == folder.name:
                out.append(old)
                log(f"{arm} seed {seed}: reused {res_file}")
                continue
        log(f"{arm} seed {seed}: training on {len(cases)} cases, {config.iterations} iterations")
        t = time.perf_counter()
        net, curve = train_segmenter(cases, num_classes, spacing, config, seed)
        t_train = time.perf_counter() - t
        t = time.perf_counter()
        preds = {cid: back[predict_case(net, img, config, num_classes)] for cid, img in test_images.items()}
        t_pred = time.perf_counter() - t
        scored = score_predictions(preds, test_raw, data["lesion_labels"], data["test_nodules"])
        rec = {"arm": arm, "seed": seed, "dataset": folder.name, "segmenter_config": config.to_dict(), **scored,
               "loss_curve": curve, "train_seconds": round(t_train, 1), "predict_seconds": round(t_pred, 1),
               "normalization": norm.to_dict()}
        s = rec["summary"]
        log(f"{arm} seed {seed}: dice {s['dice']:.3f}, sensitivity {s['sensitivity']:.3f}, "
            f"FP/case {s['fp_per_case']:.2f} ({t_train:.0f} s training, {t_pred:.0f} s prediction)")
        results_dir.mkdir(parents=True, exist_ok=True)
        res_file.write_text(json.dumps(rec, indent=1, default=_json_default) + "\n")
        out.append(rec)
    return out


def run_nnunet_arm(arm: str, folder: Path, seeds, args, data: dict, test_raw, work: Path, results_dir: Path) -> list[dict]:
    """nnU-Net itself: plan/preprocess once, then per seed train fold 'all', predict the held-out images, score."""
    from lefusion_nnunet.data.io import read_label

    env = dict(os.environ)
    env.setdefault("nnUNet_def_n_proc", str(args.threads))
    env.setdefault("nnUNet_n_proc_DA", str(max(1, args.threads)))
    dataset_id = int(folder.name[7:10])

    def sh(cmd: list[str]) -> None:
        log("$ " + shlex.join(cmd))
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode != 0:
            print(proc.stdout[-4000:], file=sys.stderr)
            raise RuntimeError(f"`{shlex.join(cmd)}` failed with exit code {proc.returncode}")

    pre = Path(env["nnUNet_preprocessed"]) / folder.name
    if not (pre / "nnUNetPlans.json").is_file():
        sh(["nnUNetv2_plan_and_preprocess", "-d", str(dataset_id), "-c", args.nnunet_config,
            "--verify_dataset_integrity", "-np", str(args.threads)])
    from lefusion_nnunet.data.dataset import load_raw_dataset

    test_ds = load_raw_dataset(data["test_dir"])
    ending = test_ds.file_ending
    images_in = work / "heldout_images"
    if not images_in.is_dir():
        images_in.mkdir(parents=True)
        for case in test_ds.cases:
            for i, f in enumerate(case.images):
                os.symlink(Path(f).resolve(), images_in / f"{case.case_id}_{i:04d}{ending}")
    device = "cuda" if args.device in ("auto", "cuda") else args.device
    out = []
    for seed in seeds:
        res_file = results_dir / f"{arm}_seed{seed}.json"
        if args.resume and res_file.is_file():
            out.append(json.loads(res_file.read_text()))
            continue
        model_dir = Path(env["nnUNet_results"]) / folder.name / f"{args.nnunet_trainer}__nnUNetPlans__{args.nnunet_config}"
        keep = model_dir.with_name(model_dir.name + f"__seed{seed}")
        t = time.perf_counter()
        if not (keep / "fold_all" / "checkpoint_final.pth").is_file():
            if model_dir.exists():
                shutil.rmtree(model_dir)
            sh(["nnUNetv2_train", str(dataset_id), args.nnunet_config, "all", "-tr", args.nnunet_trainer,
                "-device", device])
            if keep.exists():
                shutil.rmtree(keep)
            os.replace(model_dir, keep)
        t_train = time.perf_counter() - t
        pred_dir = work / "predictions" / f"{arm}_seed{seed}"
        t = time.perf_counter()
        sh(["nnUNetv2_predict_from_modelfolder", "-i", str(images_in), "-o", str(pred_dir), "-m", str(keep),
            "-f", "all", "-npp", "1", "-nps", "1", "-device", device])
        t_pred = time.perf_counter() - t
        preds = {cid: read_label(pred_dir / f"{cid}{ending}")[0] for cid, *_ in test_raw}
        scored = score_predictions(preds, test_raw, data["lesion_labels"], data["test_nodules"])
        rec = {"arm": arm, "seed": seed, **scored, "train_seconds": round(t_train, 1), "predict_seconds": round(t_pred, 1),
               "note": "nnU-Net training is not seeded; seeds are repeated runs"}
        results_dir.mkdir(parents=True, exist_ok=True)
        res_file.write_text(json.dumps(rec, indent=1, default=_json_default) + "\n")
        out.append(rec)
    return out


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o))


def _clean(o):
    """NaN -> None for strict JSON."""
    if isinstance(o, float):
        return None if math.isnan(o) else o
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    return o


# =========================================================================================================
# report
# =========================================================================================================
def markdown_table(result: dict) -> str:
    from lefusion_nnunet.evaluation.downstream import format_mean_std

    seeds = result["config"]["seeds"]
    lines = ["| arm | training cases (real + synthetic) | lesion Dice | pooled Dice | sensitivity | FP / case |",
             "| --- | --- | --- | --- | --- | --- |"]
    textures = result.get("textures") or []
    for arm in result["config"]["arms"]:
        rec = result["arms"].get(arm, {})
        title = ARM_TITLES[arm]
        if "skipped" in rec:
            lines.append(f"| {title} | skipped: {rec['skipped']} | | | | |")
            continue
        s = rec["summary"]
        comp = rec["composition"]
        cells = [format_mean_std(s[m]["mean"], s[m]["std"], 2 if m == "fp_per_case" else 3)
                 for m in ("dice", "dice_pooled", "sensitivity", "fp_per_case")]
        lines.append(f"| {title} | {comp['n_real']} + {comp['n_synthetic']} | " + " | ".join(cells) + " |")
    out = "\n".join(lines)
    if textures:
        tl = ["", "Per-texture detection sensitivity on the held-out nodules (mean ± std over seeds):", "",
              "| arm | " + " | ".join(textures) + " |", "| --- |" + " --- |" * len(textures)]
        for arm in result["config"]["arms"]:
            rec = result["arms"].get(arm, {})
            if "skipped" in rec:
                continue
            s = rec["summary"]
            tl.append(f"| {ARM_TITLES[arm]} | " + " | ".join(
                format_mean_std(s[f"sensitivity_{t}"]["mean"], s[f"sensitivity_{t}"]["std"])
                if f"sensitivity_{t}" in s else "n/a" for t in textures) + " |")
        out += "\n" + "\n".join(tl)
    n_test = result["data"]["n_test_cases"]
    out += (f"\n\n{len(seeds)} seed(s) ({', '.join(map(str, seeds))}); held-out: {n_test['lesion']} real lesion "
            f"case(s) with {result['data']['n_test_lesions']} lesion(s) + {n_test['lesion_free']} lesion-free case(s). "
            f"Command: `{result['command']}` ({result['total_seconds'] / 60:.1f} min on {result['machine']}).\n")
    return out


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("dataset", help="'phantom' (generated) or an nnU-Net raw dataset id / name / folder")
    ap.add_argument("--work", type=Path, default=Path("downstream_work"), help="work folder (datasets, models, scores)")
    ap.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="segmenter training seeds")
    ap.add_argument("--quick", action="store_true", help="toy sizes everywhere (smoke test, a few minutes)")
    ap.add_argument("--resume", action="store_true", help="reuse finished datasets, models and per-seed scores")
    ap.add_argument("--out", type=Path, default=None, help="write the JSON result here")
    ap.add_argument("--out-md", type=Path, default=None, help="write the markdown table here")
    g = ap.add_argument_group("data")
    g.add_argument("--train-lesion-cases", type=int, default=5, help="labelled lesion cases used for training")
    g.add_argument("--train-free-cases", type=int, default=15, help="lesion-free cases used for training")
    g.add_argument("--test-cases", type=int, default=12, help="held-out real lesion cases")
    g.add_argument("--test-free-cases", type=int, default=4, help="held-out lesion-free cases")
    g.add_argument("--phantom-seed", type=int, default=1,
                   help="training phantom seed (held-out: seed + 1000); the defaults were chosen on seed 0")
    g.add_argument("--shape", type=int, nargs=3, default=None, metavar=("X", "Y", "Z"),
                   help="phantom volume size (default: the phantom's 96 96 48)")
    g.add_argument("--lesion-label", type=int, default=None, help="lesion label (datasets other than the phantom)")
    g.add_argument("--region-label", type=int, default=None, help="host-region label (other datasets)")
    g.add_argument("--channel", type=int, default=0, help="image channel the lesion model learns (other datasets)")
    g.add_argument("--split-seed", type=int, default=0, help="seed of the held-out split (other datasets)")
    g.add_argument("--id-base", type=int, default=940, help="first of the 5 dataset ids the benchmark writes")
    s = ap.add_argument_group("synthesis (arms b-d)")
    s.add_argument("--per-case", type=int, default=2, help="synthetic variants per lesion-free training case")
    s.add_argument("--size-mm", type=float, nargs=2, default=[8.0, 20.0], metavar=("MIN", "MAX"))
    s.add_argument("--boundary", type=float, default=0.3)
    s.add_argument("--roi-size", type=int, nargs=3, default=[32, 32, 16], metavar=("X", "Y", "Z"),
                   help="lesion / mask model ROI (also the size cap of copy-paste lesions)")
    s.add_argument("--lesion-preset", default="small", choices=["tiny", "small", "base"])
    s.add_argument("--lesion-steps", type=int, default=1000)
    s.add_argument("--lesion-minutes", type=float, default=None, help="wall-clock cap of lesion-model training")
    s.add_argument("--lesion-batch-size", type=int, default=4)
    s.add_argument("--mask-preset", default="small", choices=["tiny", "small", "base"])
    s.add_argument("--mask-steps", type=int, default=800)
    s.add_argument("--mask-minutes", type=float, default=None, help="wall-clock cap of mask-model training")
    s.add_argument("--sampler-steps", type=int, default=None, help="DDIM steps (default: the checkpoint's)")
    s.add_argument("--synthesis-batch-size", type=int, default=4)
    s.add_argument("--blend-mm", type=float, default=1.0, help="copy-paste blending ramp inside the mask (mm)")
    s.add_argument("--synthesis-seed", type=int, default=0)
    m = ap.add_argument_group("segmenter")
    m.add_argument("--segmenter", choices=["unet", "nnunet"], default="unet",
                   help="unet: the reduced CPU setting; nnunet: nnUNetv2_train (GPU)")
    m.add_argument("--iterations", type=int, default=1500, help="training iterations per run (unet)")
    m.add_argument("--batch-size", type=int, default=2, help="patches per iteration (unet)")
    m.add_argument("--patch", type=int, nargs=3, default=[48, 48, 16], metavar=("X", "Y", "Z"), help="patch (unet)")
    m.add_argument("--features", type=int, nargs="+", default=[8, 16, 32, 64], help="features per stage (unet)")
    m.add_argument("--tta", action="store_true", help="mirroring test-time augmentation (unet)")
    m.add_argument("--targets", choices=["lesion", "all"], default="lesion",
                   help="unet training targets: the lesion label(s) vs rest, or every label of dataset.json")
    m.add_argument("--threads", type=int, default=2, help="torch threads")
    m.add_argument("--device", default="cpu", help="device of the lesion / mask models (and nnU-Net)")
    m.add_argument("--nnunet-trainer", default="nnUNetTrainer_100epochs", help="nnU-Net trainer (nnunet)")
    m.add_argument("--nnunet-config", default="3d_fullres", help="nnU-Net configuration (nnunet)")
    args = ap.parse_args(argv)
    if args.quick:
        if args.dataset == "phantom":
            args.train_lesion_cases, args.train_free_cases = 3, 3
            args.test_cases, args.test_free_cases = 2, 1
            args.shape = args.shape or [64, 64, 32]
        args.per_case = 1
        args.lesion_preset = args.mask_preset = "tiny"
        args.lesion_steps = args.mask_steps = 4
        args.lesion_batch_size = 2
        args.sampler_steps = args.sampler_steps or 2
        args.iterations = 4
        args.patch = [32, 32, 16]
        args.features = [4, 8, 16]
        args.seeds = args.seeds[:1] if args.seeds == [0, 1, 2] else args.seeds
        if args.work == Path("downstream_work"):
            args.work = Path("downstream_work_quick")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    command = "python benchmarks/downstream.py " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    work = args.work.resolve()
    raw = work / "nnUNet_raw"
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (work / var).mkdir(parents=True, exist_ok=True)
        os.environ[var] = str(work / var)
    os.environ.setdefault("nnUNet_def_n_proc", "1")
    import torch

    torch.set_num_threads(args.threads)
    from _common import emit

    from lefusion_nnunet.data.dataset import load_raw_dataset
    from lefusion_nnunet.evaluation.downstream import check_no_leakage, connected_lesions, summarize_seeds

    t_total = time.perf_counter()
    timings: dict = {}
    t = time.perf_counter()
    data = make_phantom_data(args, raw) if args.dataset == "phantom" else split_raw_dataset(args, raw)
    timings["data"] = round(time.perf_counter() - t, 1)
    split = data["split"]
    test_ds = load_raw_dataset(data["test_dir"])
    test_raw = read_cases(test_ds)
    test_ids = [c for c, *_ in test_raw]
    n_test_lesions = sum(connected_lesions(np.isin(lab, data["lesion_labels"]))[1] for _, _, lab, _ in test_raw)

    arms = build_arms(args, data, raw, work, timings)
    config = SegmenterConfig(features=tuple(args.features), patch_zyx=tuple(args.patch[::-1]),
                             batch_size=args.batch_size, iterations=args.iterations, mirror_tta=args.tta,
                             threads=args.threads, targets=args.targets)
    results_dir = work / "scores"
    arm_results: dict = {}
    for arm in args.arms:
        info = arms.get(arm, {"skipped": "not built"})
        if "skipped" in info:
            log(f"{arm}: skipped ({info['skipped']})")
            arm_results[arm] = {"skipped": info["skipped"]}
            continue
        comp = arm_composition(info["dir"], split)
        check_no_leakage(comp["cases"], test_ids, comp["derived_from"])
        check_no_leakage(comp["cases"], split["test_lesion"] + split["test_free"] + split.get("unused", []),
                         comp["derived_from"])
        t = time.perf_counter()
        if args.segmenter == "unet":
            per_seed = run_unet_arm(arm, info["dir"], args.seeds, config, data, test_raw, results_dir, args.resume)
        else:
            per_seed = run_nnunet_arm(arm, info["dir"], args.seeds, args, data, test_raw, work, results_dir)
        timings[f"segmenter_{arm}"] = round(time.perf_counter() - t, 1)
        metric_names = [k for k in per_seed[0]["summary"] if k.startswith(("dice", "sensitivity", "fp_per_case"))]
        arm_results[arm] = {"dataset": info["dir"].name,
                            "composition": {k: v for k, v in comp.items() if k not in ("cases", "derived_from")},
                            "summary": summarize_seeds([r["summary"] for r in per_seed], metric_names),
                            "per_seed": per_seed}
    total = time.perf_counter() - t_total
    result = {
        "benchmark": "downstream", "command": command, "dataset": args.dataset,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}",
        "total_seconds": round(total, 1), "timings_seconds": timings,
        "config": {"arms": args.arms, "seeds": args.seeds, "segmenter": args.segmenter,
                   "segmenter_config": config.to_dict() if args.segmenter == "unet" else
                   {"trainer": args.nnunet_trainer, "configuration": args.nnunet_config},
                   "per_case": args.per_case, "size_mm": args.size_mm, "roi_size_xyz": args.roi_size,
                   "lesion_model": {"preset": args.lesion_preset, "steps": args.lesion_steps},
                   "mask_model": {"preset": args.mask_preset, "steps": args.mask_steps},
                   "sampler_steps": args.sampler_steps, "blend_mm": args.blend_mm, "quick": args.quick},
        "data": {"split": split, "n_test_cases": {"lesion": len(split["test_lesion"]),
                                                  "lesion_free": len(split["test_free"])},
                 "n_test_lesions": int(n_test_lesions), "phantom": data.get("phantom"),
                 "source_dataset": data.get("source_dataset")},
        "textures": data.get("textures", []),
        "arms": arm_results,
    }
    result = _clean(json.loads(json.dumps(result, default=_json_default)))
    for arm, rec in result["arms"].items():  # JSON null -> NaN for the table
        for v in rec.get("summary", {}).values():
            v["mean"] = float("nan") if v["mean"] is None else v["mean"]
            v["std"] = float("nan") if v["std"] is None else v["std"]
    table = markdown_table(result)
    result_json = _clean(result)
    emit(result_json, args.out)
    print("\n" + table)
    if args.out_md:
        args.out_md.parent.mkdir(parents=True, exist_ok=True)
        args.out_md.write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
