"""Image and label file I/O through nnU-Net's own reader selection.

Reading uses ``nnunetv2.imageio.reader_writer_registry`` so every file ending nnU-Net reads is read
the same way here. Arrays come back in nnU-Net's axis order: images ``(C, Z, Y, X)`` float32, labels
``(Z, Y, X)``; spacing is ``(z, y, x)`` in millimetres.

Writing goes through SimpleITK with the source file's geometry (spacing, origin, direction) and the
source file's pixel type, so voxels we did not change read back bit-identical.
"""
from __future__ import annotations

import errno
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from lefusion_nnunet.errors import LeFusionInputError
from lefusion_nnunet.utils import _friendly_os_error

Spacing = tuple[float, float, float]


@dataclass
class ImageVolume:
    """A multi-channel image as nnU-Net reads it.

    Attributes:
        array: float32 ``(C, Z, Y, X)``.
        spacing: ``(z, y, x)`` in mm.
        properties: the reader's properties (``sitk_stuff`` holds SimpleITK geometry in x, y, z order).
        source_dtypes: numpy dtype name of the stored pixels, one per channel file.
        files: the channel files, in channel order.
    """

    array: np.ndarray
    spacing: Spacing
    properties: dict
    source_dtypes: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)

    @property
    def shape_zyx(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape[1:])  # type: ignore[return-value]

    def channel(self, index: int) -> np.ndarray:
        """One channel as ``(Z, Y, X)`` float32 (a view)."""
        if not 0 <= index < self.array.shape[0]:
            raise LeFusionInputError(
                f"channel {index} was requested but {self.files[0] if self.files else 'the image'} has "
                f"{self.array.shape[0]} channel(s); pass --channel between 0 and {self.array.shape[0] - 1}.")
        return self.array[index]


def _reader_for(files: Sequence[Path]):
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_file_ending

    first = Path(files[0])
    ending = "".join(first.suffixes[-2:]) if first.name.endswith(".nii.gz") else first.suffix
    try:  # by ending only: with an example file nnU-Net would read it once more just to test the reader
        return determine_reader_writer_from_file_ending(ending, None, allow_nonmatching_filename=True,
                                                        verbose=False)()
    except Exception as exc:  # nnU-Net raises RuntimeError with a long text
        raise LeFusionInputError(f"no nnU-Net reader can open {first} (ending {ending!r}); convert it to "
                                 f".nii.gz, .nrrd or .mha.") from exc


def _stored_dtype(path: Path) -> str:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return np.dtype(sitk.GetArrayViewFromImage(sitk.Image([1] * reader.GetDimension(),
                                                          reader.GetPixelID())).dtype).name


def _check_readable(files: Sequence[Path]) -> None:
    for f in files:
        if not Path(f).is_file():
            raise LeFusionInputError(f"file {f} does not exist; check the dataset folder and dataset.json.")


def read_image(files: Sequence[Path | str]) -> ImageVolume:
    """Read the channel files of one case (``CASE_0000.ext``, ``CASE_0001.ext`` ...) as ``(C, Z, Y, X)``.

    Raises :class:`LeFusionInputError` for missing, unreadable, non-3D or non-finite images.
    """
    files = [Path(f) for f in files]
    _check_readable(files)
    dims = []
    for f in files:
        try:
            r = sitk.ImageFileReader()
            r.SetFileName(str(f))
            r.ReadImageInformation()
            dims.append((r.GetDimension(), r.GetNumberOfComponents()))
        except RuntimeError as exc:
            raise LeFusionInputError(f"{f} is not a readable image (truncated or corrupt?); re-export it.") from exc
    for f, (dim, comps) in zip(files, dims):
        if dim != 3 or comps != 1:
            raise LeFusionInputError(f"{f} is a {dim}D image with {comps} component(s) but a 3D single-component "
                                     f"volume is required; split 4D files into one file per channel "
                                     f"(CASE_0000, CASE_0001, ...).")
    rw = _reader_for(files)
    try:
        array, props = rw.read_images([str(f) for f in files])
    except Exception as exc:
        raise LeFusionInputError(f"{files[0]} could not be read ({exc}); check that all channel files of the "
                                 f"case exist and share one grid.") from exc
    for f in files:  # ITK fills a truncated NIfTI file up with zeros without an error
        if not nifti_file_complete(f):
            raise truncated_error(f)
    if not np.isfinite(array).all():
        bad = next((f for i, f in enumerate(files) if i < len(array) and not np.isfinite(array[i]).all()), files[0])
        raise LeFusionInputError(f"{bad} contains NaN or infinite voxels; replace them (e.g. by the "
                                 f"background value) before using LeFusion.")
    dtypes = [_stored_dtype(f) for f in files]
    return ImageVolume(array=array.astype(np.float32, copy=False),
                       spacing=tuple(float(s) for s in props["spacing"]),  # type: ignore[arg-type]
                       properties=props, source_dtypes=dtypes, files=files)


def read_label(file: Path | str) -> tuple[np.ndarray, dict]:
    """Read a label map as integer ``(Z, Y, X)`` plus the reader's properties."""
    file = Path(file)
    vol = read_image([file])
    arr = vol.array[0]
    if not np.all(arr == np.round(arr)):
        raise LeFusionInputError(f"label file {file} holds non-integer values; labels must be integers.")
    return arr.astype(np.int16), vol.properties | {"source_dtype": vol.source_dtypes[0]}


def read_mask(file: Path | str, like_shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Read a binary or label mask file as a ``(Z, Y, X)`` int16 array, checking its shape."""
    arr, _ = read_label(file)
    if like_shape is not None and tuple(arr.shape) != tuple(like_shape):
        raise LeFusionInputError(f"mask {file} has shape {tuple(arr.shape)} (z, y, x) but the image has "
                                 f"{tuple(like_shape)}; resample the mask onto the image grid.")
    return arr


def check_same_grid(image_props: dict, label_props: dict, image_file: Path, label_file: Path,
                    shape_a: tuple[int, ...], shape_b: tuple[int, ...], tol: float = 1e-3) -> None:
    """Raise if image and label differ in size, spacing, origin or direction beyond ``tol``."""
    if tuple(shape_a) != tuple(shape_b):
        raise LeFusionInputError(f"{label_file} has shape {tuple(shape_b)} but {image_file} has {tuple(shape_a)} "
                                 f"(z, y, x); resample the label onto the image grid.")
    a, b = image_props.get("sitk_stuff"), label_props.get("sitk_stuff")
    if a is None or b is None:
        return
    for key in ("spacing", "origin", "direction"):
        if not np.allclose(a[key], b[key], atol=tol, rtol=tol):
            raise LeFusionInputError(f"{label_file} and {image_file} differ in {key} ({b[key]} vs {a[key]}); "
                                     f"the label must share the image's geometry.")


def truncated_error(path: Path | str, what: str = "") -> LeFusionInputError:
    """The one sentence for a NIfTI file that :func:`nifti_file_complete` rejects."""
    return LeFusionInputError(f"{what + ' file ' if what else ''}{path} is truncated or corrupt (fewer voxel bytes "
                              f"than its header announces, or a bad checksum); re-export or replace it.")


def nifti_file_complete(path: Path | str) -> bool:
    """Whether a NIfTI file (``.nii`` / ``.nii.gz``) holds all the voxel bytes its header announces.

    ITK's NIfTI reader fills a truncated file up with zeros without an error (unlike its NRRD and MetaImage
    readers), so LeFusion checks the byte count itself: the gzip stream must end properly and hold at least
    ``vox_offset + voxels * bitpix / 8`` bytes.
    """
    import gzip
    import struct
    import zlib

    path = Path(path)
    name = path.name.lower()
    if name.endswith(".nii.gz"):
        opener = gzip.open
    elif name.endswith(".nii"):
        opener = open
    else:
        return True
    try:
        with opener(path, "rb") as f:
            head = f.read(540)
            total = len(head)
            while block := f.read(1 << 22):
                total += len(block)
    except (EOFError, OSError, zlib.error):
        return False
    for endian in ("<", ">"):
        if len(head) >= 4 and struct.unpack(endian + "i", head[:4])[0] == 348 and len(head) >= 112:
            dims = struct.unpack(endian + "8h", head[40:56])
            bitpix = struct.unpack(endian + "h", head[72:74])[0]
            offset = int(struct.unpack(endian + "f", head[108:112])[0])
            break
        if len(head) >= 4 and struct.unpack(endian + "i", head[:4])[0] == 540 and len(head) >= 176:
            bitpix = struct.unpack(endian + "h", head[14:16])[0]
            dims = struct.unpack(endian + "8q", head[16:80])
            offset = int(struct.unpack(endian + "q", head[168:176])[0])
            break
    else:
        return False
    n = int(np.prod([max(int(d), 1) for d in dims[1:1 + max(0, min(int(dims[0]), 7))]], dtype=np.int64))
    return total >= max(offset, 348) + n * max(int(bitpix), 8) // 8


def _to_dtype(array: np.ndarray, dtype: str) -> np.ndarray:
    dt = np.dtype(dtype)
    if np.issubdtype(dt, np.integer):
        info = np.iinfo(dt)
        return np.clip(np.rint(array), info.min, info.max).astype(dt)
    return array.astype(dt)


def write_volume(array_zyx: np.ndarray, out_file: Path | str, properties: dict, dtype: str) -> None:
    """Write one ``(Z, Y, X)`` array with the geometry in ``properties['sitk_stuff']`` and pixel ``dtype``.

    The file is written to a temporary sibling and renamed, so a crash leaves no half-written file.
    """
    import os

    out_file = Path(out_file)
    geo = properties.get("sitk_stuff")
    if geo is None:
        raise LeFusionInputError(f"cannot write {out_file}: the source was not read by a SimpleITK reader; "
                                 f"use .nii.gz, .nrrd or .mha files.")
    img = sitk.GetImageFromArray(_to_dtype(np.asarray(array_zyx), dtype))
    img.SetSpacing(geo["spacing"])
    img.SetOrigin(geo["origin"])
    img.SetDirection(geo["direction"])
    name = out_file.name
    tmp = out_file.with_name(f".tmp-{os.getpid()}-{name}")
    try:
        out_file.parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(img, str(tmp), useCompression=True)
        # ITK's NIfTI writer reports a full disk only on stderr and leaves a truncated file: verify it
        if not nifti_file_complete(tmp):
            raise OSError(errno.ENOSPC if _disk_nearly_full(tmp.parent) else errno.EIO,
                          "the written file is incomplete")
        os.replace(tmp, out_file)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise _friendly_os_error(exc, out_file) from exc
    except RuntimeError as exc:  # SimpleITK wraps I/O errors in RuntimeError
        tmp.unlink(missing_ok=True)
        text = str(exc).lower()
        if "no space left" in text or "quota" in text or _disk_nearly_full(out_file.parent):
            raise _friendly_os_error(OSError(errno.ENOSPC, "No space left on device"), out_file) from exc
        if "permission denied" in text or "read-only" in text:
            raise _friendly_os_error(OSError(errno.EACCES, "Permission denied"), out_file) from exc
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        raise LeFusionInputError(f"could not write {out_file} ({lines[-1] if lines else 'SimpleITK error'}); "
                                 f"check the output folder (partial output was removed).") from exc


def _disk_nearly_full(folder: Path, margin: int = 1 << 20) -> bool:
    """Whether the file system holding ``folder`` has less than ``margin`` bytes free."""
    import shutil

    try:
        return shutil.disk_usage(folder).free < margin
    except OSError:
        return False


def write_image_channel(channel_zyx: np.ndarray, out_file: Path | str, reference: ImageVolume,
                        channel_index: int) -> None:
    """Write one image channel in the reference's geometry and stored pixel type."""
    write_volume(channel_zyx, out_file, reference.properties, reference.source_dtypes[channel_index])


def write_label(label_zyx: np.ndarray, out_file: Path | str, properties: dict) -> None:
    """Write a label map with the reference geometry (uint8, or uint16 when labels exceed 255)."""
    dtype = properties.get("source_dtype") or ("uint8" if int(np.max(label_zyx)) < 256 else "uint16")
    if np.dtype(dtype).kind == "f":
        dtype = "uint8" if int(np.max(label_zyx)) < 256 else "uint16"
    write_volume(label_zyx, out_file, properties, dtype)


def file_ending_of(path: Path | str) -> str:
    """``.nii.gz`` aware file ending."""
    name = Path(path).name
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def voxel_to_world(index_zyx, properties: dict) -> list[float]:
    """Physical position (x, y, z mm, as SimpleITK/ITK report it) of a (z, y, x) voxel index."""
    geo = properties.get("sitk_stuff")
    if geo is None:
        return []
    spacing = np.asarray(geo["spacing"], np.float64)
    direction = np.asarray(geo["direction"], np.float64).reshape(3, 3)
    idx_xyz = np.asarray(index_zyx, np.float64)[::-1]
    return [round(float(v), 4) for v in np.asarray(geo["origin"], np.float64) + direction @ (idx_xyz * spacing)]


def world_to_voxel(point_xyz_mm, properties: dict) -> np.ndarray:
    """The inverse of :func:`voxel_to_world`: a world position (x, y, z mm) -> float voxel index (z, y, x)."""
    geo = properties.get("sitk_stuff")
    if geo is None:
        raise LeFusionInputError("--center needs the image geometry (origin, spacing, direction), which this "
                                 "image reader does not report; give the lesion mask instead.")
    spacing = np.asarray(geo["spacing"], np.float64)
    direction = np.asarray(geo["direction"], np.float64).reshape(3, 3)
    rel = np.asarray(point_xyz_mm, np.float64) - np.asarray(geo["origin"], np.float64)
    return (np.linalg.solve(direction, rel) / spacing)[::-1]


@dataclass(frozen=True)
class Header:
    """What a file header says about an image (SimpleITK order: x, y, z)."""

    file: Path
    dimension: int
    components: int
    size_xyz: tuple[int, ...]
    spacing_xyz: tuple[float, ...]
    origin_xyz: tuple[float, ...]
    direction: tuple[float, ...]
    pixel_id: int = -1

    @property
    def size_zyx(self) -> tuple[int, ...]:
        return tuple(self.size_xyz[::-1])

    @property
    def extent_mm_zyx(self) -> np.ndarray:
        return np.asarray(self.size_xyz, np.float64)[::-1] * np.asarray(self.spacing_xyz, np.float64)[::-1]


def _unreadable(path: Path, what: str = "image") -> LeFusionInputError:
    return LeFusionInputError(f"{what} file {path} cannot be read (truncated, corrupt or not an image); re-export "
                              f"or replace it.")


def read_header(path: Path | str, what: str = "image") -> Header:
    """Header of one image file, read without its voxels."""
    path = Path(path)
    if not path.is_file():
        raise LeFusionInputError(f"{what} file {path} does not exist; check the dataset folder and dataset.json.")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise _unreadable(path, what) from exc
    return Header(path, reader.GetDimension(), reader.GetNumberOfComponents(), tuple(reader.GetSize()),
                  tuple(reader.GetSpacing()), tuple(reader.GetOrigin()), tuple(reader.GetDirection()),
                  int(reader.GetPixelID()))


def _header_of(image: sitk.Image, path: Path) -> Header:
    return Header(path, image.GetDimension(), image.GetNumberOfComponentsPerPixel(), tuple(image.GetSize()),
                  tuple(image.GetSpacing()), tuple(image.GetOrigin()), tuple(image.GetDirection()),
                  int(image.GetPixelID()))


def read_volume(path: Path | str, what: str = "image") -> tuple[np.ndarray, Header]:
    """All voxels of one file as ``(Z, Y, X)`` and its header."""
    path = Path(path)
    if not path.is_file():
        raise LeFusionInputError(f"{what} file {path} does not exist; check the dataset folder and dataset.json.")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise _unreadable(path, what) from exc
    return sitk.GetArrayFromImage(image), _header_of(image, path)  # a copy: a view dies with ``image``
