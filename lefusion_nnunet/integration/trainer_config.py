"""``lefusion trainer-config``: check a dataset, a lesion checkpoint and variant settings now (not mid-training)
and write the settings ``LeFusionTrainer`` reads (``lefusion_trainer.json`` next to the preprocessed dataset)."""
from __future__ import annotations

from pathlib import Path

from lefusion_nnunet.checkpoints.loaders import checkpoint_data_config
from lefusion_nnunet.data.dataset import dataset_folder_name, load_raw_dataset
from lefusion_nnunet.integration.trainer_settings import TrainerSettings, write_trainer_settings
from lefusion_nnunet.paths import find_default_checkpoint, trainer_settings_file
from lefusion_nnunet.validation import check_output_absent, validate_variant_inputs
from lefusion_nnunet.variant_settings import VariantSettings


def configure_trainer(dataset: str | int, variants: VariantSettings, checkpoint: Path | str | None = None,
                      probability: float = 0.5, batch_size: int = 4, device: str = "auto",
                      overwrite: bool = False, bank_build: str = "background") -> Path:
    """Validate and write the LeFusionTrainer settings of ``dataset``; returns the settings file.

    Args:
        dataset: dataset id or name (under ``$nnUNet_raw``; the settings go next to ``$nnUNet_preprocessed``'s).
        variants: how synthetic lesions are shaped, placed and textured (K = ``variants.per_case``).
        checkpoint: lesion checkpoint; default: the newest ``lefusion train`` run of the dataset.
        probability: P, chance a drawn lesion-free case is replaced by one of its variants.
        overwrite: replace an existing settings file.
        bank_build: ``"background"`` (training starts at once) or ``"before-training"`` (the whole bank first).
    """
    name = dataset_folder_name(dataset)
    check_output_absent(trainer_settings_file(name), overwrite, "LeFusion trainer settings")
    checkpoint = Path(checkpoint) if checkpoint is not None else find_default_checkpoint(name)
    settings = TrainerSettings(checkpoint=str(checkpoint.resolve()), probability=probability, variants=variants,
                               batch_size=batch_size, device=device, bank_build=bank_build)
    validate_variant_inputs(load_raw_dataset(name), checkpoint_data_config(checkpoint, expected_kind="lesion"),
                            variants, lesion_free_hint="LeFusionTrainer only adds lesions to lesion-free cases, "
                                                       "add some")
    return write_trainer_settings(name, settings)
