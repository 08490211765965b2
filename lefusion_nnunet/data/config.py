"""DataConfig: what a checkpoint was trained on, and so what it can be applied to."""
from __future__ import annotations

from dataclasses import dataclass, field

from lefusion_nnunet.configs import JsonConfig
from lefusion_nnunet.data.dataset import RawDataset
from lefusion_nnunet.data.intensity import IntensitySpace
from lefusion_nnunet.data.roi import RoiGeometry
from lefusion_nnunet.errors import LeFusionCheckpointError

#: Border ring shapes (:data:`lefusion_nnunet.diffusion.inputs.RING_SHAPES`, repeated here because ``data/``
#: imports no torch; a test keeps the two equal). "cube" = the 26-neighbourhood ring of older checkpoints.
BORDER_RING_SHAPES: tuple[str, ...] = ("cube", "faces", "in-plane", "in-plane-faces")


@dataclass(frozen=True)
class DataConfig(JsonConfig):
    """Training data of a LeFusion model.

    Attributes:
        dataset_name: nnU-Net dataset name (``DatasetXXX_Name``).
        lesion_labels: label values of the C lesion classes, in channel order.
        label_names: names of those labels (from dataset.json).
        region_label: host-region label (e.g. lung) lesions must lie in, or None.
        channel: image channel the model was trained on.
        modality: ``"CT"`` or ``"MR"`` (dataset.json channel name).
        roi: the model grid (size, spacing in mm, z, y, x).
        intensity: native <-> model mapping.
        file_ending: the dataset's file ending.
        border_ring_voxels: model voxels generated around each lesion mask (the partial-volume edge real lesions
            have outside their labels), in training and sampling alike; 0 for checkpoints written before it.
        border_ring_shape: how each ring step grows the mask
            (:func:`lefusion_nnunet.diffusion.inputs.border_ring_region`): ``"cube"`` (26-neighbourhood, every
            axis; what checkpoints written before this field used, hence the default), ``"faces"``,
            ``"in-plane"`` or ``"in-plane-faces"`` (along the axes no coarser than 1.5 x the finest only).
    """

    dataset_name: str
    lesion_labels: tuple[int, ...]
    label_names: tuple[str, ...]
    region_label: int | None
    channel: int
    modality: str
    roi: RoiGeometry
    intensity: IntensitySpace
    file_ending: str = ".nii.gz"
    extra: dict = field(default_factory=dict)
    border_ring_voxels: int = 0
    border_ring_shape: str = "cube"

    def __post_init__(self) -> None:
        if self.border_ring_shape not in BORDER_RING_SHAPES:
            raise LeFusionCheckpointError(f"border_ring_shape {self.border_ring_shape!r} is not one of "
                                          f"{', '.join(BORDER_RING_SHAPES)}; the checkpoint was written by a newer or "
                                          f"a modified version of lefusion-nnunet.")

    @property
    def num_classes(self) -> int:
        return len(self.lesion_labels)

    def check_compatible(self, labels: dict[str, int], modality: str, what: str) -> None:
        """Raise if a dataset's labels/modality do not fit this checkpoint (``labels`` name -> value)."""
        values = set(labels.values())
        missing = [v for v in self.lesion_labels if v not in values]
        if missing:
            raise LeFusionCheckpointError(f"the checkpoint was trained for lesion label(s) {list(self.lesion_labels)} "
                                          f"but {what} has no label {missing}; use a checkpoint trained on "
                                          f"this dataset's labels.")
        if modality != self.modality:
            raise LeFusionCheckpointError(f"the checkpoint was trained on {self.modality} images but {what} is "
                                          f"{modality}; use a checkpoint trained on this modality.")


def build_data_config(dataset: RawDataset, lesion_labels: list[int], region_label: int | None, channel: int,
                      roi: RoiGeometry, intensity: IntensitySpace, border_ring_voxels: int = 0,
                      border_ring_shape: str = "cube") -> DataConfig:
    names = {v: k for k, v in dataset.labels.items()}
    if region_label is not None:
        dataset.check_labels([region_label], "region label")
    return DataConfig(dataset_name=dataset.name, lesion_labels=tuple(lesion_labels),
                      label_names=tuple(names[v] for v in lesion_labels), region_label=region_label,
                      channel=channel, modality=dataset.modality(channel), roi=roi, intensity=intensity,
                      file_ending=dataset.file_ending, border_ring_voxels=int(border_ring_voxels),
                      border_ring_shape=border_ring_shape)
