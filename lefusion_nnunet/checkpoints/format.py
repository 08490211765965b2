"""Checkpoints: everything needed to sample, saved atomically, hashed, loaded with ``weights_only=True``.

File layout (a ``torch.save`` of a plain dict, so loading never executes code)::

    {"format": "lefusion-nnunet", "format_version": 1, "sha256": <hex of payload>, "payload": uint8 tensor}

The payload is itself a ``torch.save`` of the content dict (configs as JSON-safe dicts, state dicts,
prototypes, RNG states). A truncated file fails to load, a modified one fails the hash check, a file that
is not ours or from a newer format version is rejected with a message naming the problem.
"""
from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lefusion_nnunet.errors import LeFusionCheckpointError
from lefusion_nnunet.utils import atomic_write_bytes, sha256_file

FORMAT = "lefusion-nnunet"
FORMAT_VERSION = 1
CHECKPOINT_KINDS = ("lesion", "mask")
OUTER_KEYS = {"format", "format_version", "sha256", "payload"}
# Keys a content dict may hold; anything else is rejected on load.
REQUIRED_KEYS = {"kind", "model_config", "schedule_config", "data_config", "ema_state", "step"}
OPTIONAL_KEYS = {"train_config", "model_state", "optimizer_state", "torch_rng", "numpy_rng", "prototypes",
                 "training_histograms", "training_summary", "package_version", "sampler_defaults"}


def _serialise(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _plain(obj: Any) -> Any:
    """Numpy scalars/arrays -> Python numbers/lists (``weights_only`` loading accepts only plain types)."""
    import numpy as np

    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v) for v in obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return obj


def save_checkpoint(path: Path | str, content: dict) -> str:
    """Atomically write ``content`` to ``path``; returns the payload's SHA-256."""
    content = _plain(content)
    unknown = set(content) - REQUIRED_KEYS - OPTIONAL_KEYS
    missing = REQUIRED_KEYS - set(content)
    if unknown or missing:
        raise ValueError(f"checkpoint content has unknown keys {sorted(unknown)} / misses {sorted(missing)}")
    payload = _serialise(content)
    digest = hashlib.sha256(payload).hexdigest()
    outer = {"format": FORMAT, "format_version": FORMAT_VERSION, "sha256": digest,
             "payload": torch.frombuffer(bytearray(payload), dtype=torch.uint8)}
    atomic_write_bytes(path, _serialise(outer))
    return digest


def load_checkpoint_content(path: Path | str, expected_kind: str | None = None) -> dict:
    """Load and verify a checkpoint's content dict (tensors on CPU)."""
    path = Path(path)
    if not path.is_file():
        raise LeFusionCheckpointError(f"checkpoint {path} does not exist; check the path, or train a model with "
                                      f"`lefusion train` (`lefusion train-mask` for a mask model) first.")
    try:
        outer = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise LeFusionCheckpointError(f"checkpoint {path} cannot be read (truncated, or not a LeFusion "
                                      f"checkpoint); restore the file or retrain with `lefusion train`.") from exc
    if not isinstance(outer, dict) or outer.get("format") != FORMAT:
        raise LeFusionCheckpointError(f"{path} is not a lefusion-nnunet checkpoint; pass a file written by "
                                      f"`lefusion train`.")
    extra = sorted(str(k) for k in set(outer) - OUTER_KEYS)
    if extra:
        raise LeFusionCheckpointError(f"checkpoint {path} has unexpected entries {extra}; it was not written by "
                                      f"lefusion-nnunet (or was modified), retrain or restore it.")
    version = outer.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise LeFusionCheckpointError(f"checkpoint {path} has format version {version}, newer than this "
                                      f"lefusion-nnunet supports ({FORMAT_VERSION}); upgrade lefusion-nnunet.")
    payload = outer.get("payload")
    if not isinstance(payload, torch.Tensor) or payload.dtype != torch.uint8:
        raise LeFusionCheckpointError(f"checkpoint {path} has no payload; it is damaged, retrain or restore it.")
    raw = payload.numpy().tobytes()
    if hashlib.sha256(raw).hexdigest() != outer.get("sha256"):
        raise LeFusionCheckpointError(f"checkpoint {path} fails its content hash check (damaged or modified); "
                                      f"restore it or retrain.")
    try:
        content = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise LeFusionCheckpointError(f"checkpoint {path} holds objects that cannot be loaded safely; it was "
                                      f"not written by lefusion-nnunet.") from exc
    if not isinstance(content, dict):
        raise LeFusionCheckpointError(f"checkpoint {path} holds no content dictionary; it was not written by "
                                      f"lefusion-nnunet.")
    unknown = sorted(map(str, set(content) - REQUIRED_KEYS - OPTIONAL_KEYS))
    missing = sorted(REQUIRED_KEYS - set(content))
    if unknown or missing:
        what = " and ".join(([f"unexpected keys {unknown}"] if unknown else [])
                            + ([f"no {missing} entries"] if missing else []))
        raise LeFusionCheckpointError(f"checkpoint {path} has {what}; it was not written by this lefusion-nnunet, "
                                      f"retrain or restore it.")
    if expected_kind is not None and content["kind"] != expected_kind:
        raise LeFusionCheckpointError(f"checkpoint {path} is a {content['kind']!r} model but a "
                                      f"{expected_kind!r} model is needed here; pass the right --checkpoint.")
    return content


@dataclass(frozen=True)
class CheckpointRef:
    """A checkpoint file and the SHA-256 of its bytes (for provenance and cache keys)."""

    path: Path
    file_sha256: str

    @classmethod
    def of(cls, path: Path | str) -> "CheckpointRef":
        return cls(Path(path).resolve(), sha256_file(path))
