"""lefusion-nnunet: LeFusion lesion-focused diffusion as an nnU-Net v2 plugin.

Public API (imported lazily so `import lefusion_nnunet` stays light):

- :func:`lefusion_nnunet.enlarge` - offline enlargement of an nnU-Net raw dataset
- :class:`lefusion_nnunet.synthesis.LesionSynthesizer` - inpaint lesions with a trained checkpoint
- :func:`lefusion_nnunet.training.trainer.train_lesion_model` - the `lefusion train` loop
- :func:`lefusion_nnunet.data.phantom.generate_chest_phantom` - the embedded default dataset
"""
from __future__ import annotations

__version__ = "0.1.0"


def enlarge(*args, **kwargs):
    """Offline dataset enlargement; see :func:`lefusion_nnunet.enlargement.enlarge`."""
    from lefusion_nnunet.enlargement.run import enlarge as _enlarge

    return _enlarge(*args, **kwargs)
