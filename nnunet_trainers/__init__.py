"""LeFusion trainer classes for nnU-Net v2, re-exported for nnU-Net's trainer lookup.

- imported by the guarded shim that ``lefusion install-trainer`` writes into nnU-Net's trainer folder;
- this folder is what ``lefusion trainer-dir`` prints for ``nnUNet_extTrainer`` (nnU-Net scans its plain
  modules, i.e. ``lefusion_trainers.py``).

The classes live in :mod:`lefusion_nnunet.integration.nnunet_trainer` so that they keep an importable
``__module__`` (nnU-Net drops modules imported from ``nnUNet_extTrainer`` folders after the lookup).
"""
from lefusion_nnunet.integration.nnunet_trainer import (LeFusionTrainer, LeFusionTrainer_1epoch,
                                                        LeFusionTrainer_5epochs, LeFusionTrainer_p025,
                                                        LeFusionTrainer_p075)

__all__ = ["LeFusionTrainer", "LeFusionTrainer_1epoch", "LeFusionTrainer_5epochs", "LeFusionTrainer_p025",
           "LeFusionTrainer_p075"]
