"""Module scanned by nnU-Net when this folder is in ``nnUNet_extTrainer``: re-exports the LeFusion trainers."""
from lefusion_nnunet.integration.nnunet_trainer import (LeFusionTrainer, LeFusionTrainer_1epoch,  # noqa: F401
                                                        LeFusionTrainer_5epochs, LeFusionTrainer_p025,
                                                        LeFusionTrainer_p075)
