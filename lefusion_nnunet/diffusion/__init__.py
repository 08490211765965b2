"""Diffusion components: noise schedule (pure math), lesion denoiser (network), loss, samplers."""
from lefusion_nnunet.diffusion.losses import masked_epsilon_loss
from lefusion_nnunet.diffusion.sampler_config import SamplerConfig
from lefusion_nnunet.diffusion.samplers import (DDIMInpaintSampler, DPMSolverInpaintSampler, InpaintingSampler,
                                                RePaintSampler, SamplerStepOutput, make_sampler, repaint_jump_schedule)
from lefusion_nnunet.diffusion.schedule import NoiseSchedule, ScheduleConfig, extract
from lefusion_nnunet.diffusion.unet import DenoiserConfig, LesionDenoiser

__all__ = [
    "DDIMInpaintSampler", "DPMSolverInpaintSampler", "DenoiserConfig", "InpaintingSampler", "LesionDenoiser",
    "NoiseSchedule", "RePaintSampler", "SamplerConfig", "SamplerStepOutput", "ScheduleConfig", "extract",
    "make_sampler", "masked_epsilon_loss", "repaint_jump_schedule",
]
