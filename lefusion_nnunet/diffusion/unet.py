"""The lesion denoiser: a 3D convolutional UNet that predicts the noise eps of x_t.

The network knows nothing of noise schedules: it maps ``(x_t, t, context, class_masks, cond)`` to
eps. Inputs are ``(B, C, Z, Y, X)`` with C = number of lesion classes; the image channels and the
context are in model units [-1, 1]; masks are {0, 1} with 1 = lesion = region to generate.
Timestep and histogram-condition embeddings are added and injected into every residual block by
FiLM (scale and shift right after the block's second GroupNorm). A learned null-condition embedding
replaces the histogram embedding where ``cond`` is None or ``drop_cond[b]`` is True, which is what
classifier-free guidance needs. Works on CPU and CUDA, with ``channels_last_3d`` and bf16 autocast.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lefusion_nnunet.configs import JsonConfig
from lefusion_nnunet.errors import LeFusionInputError

PRESETS: dict[str, dict[str, Any]] = {
    # Unit tests and smoke runs.
    "tiny": dict(base_channels=8, channel_mults=(1, 2), num_res_blocks=1, attention_at_bottleneck=False,
                 stem_stride=2),
    # CPU default: a stride-2 stem keeps every 3x3x3 conv off the full-resolution grid.
    "small": dict(base_channels=32, channel_mults=(1, 2, 4), num_res_blocks=1, attention_at_bottleneck=False,
                  stem_stride=2),
    # GPU: full-resolution UNet with attention at the bottleneck.
    "base": dict(base_channels=64, channel_mults=(1, 2, 4, 8), num_res_blocks=2, attention_at_bottleneck=True,
                 stem_stride=1),
}


COND_ENCODINGS = ("raw", "histogram")


@dataclass(frozen=True)
class DenoiserConfig(JsonConfig):
    """Architecture of :class:`LesionDenoiser`; the defaults are the ``"small"`` preset.

    Args:
        image_channels: C, number of lesion classes (multi-channel decomposition).
        hist_bins: histogram bins per class; the condition has ``C * hist_bins`` entries.
        base_channels: width of the first level.
        channel_mults: width multiplier per resolution level (one 2x downsampling between levels).
        num_res_blocks: residual blocks per level (encoder and decoder each).
        attention_at_bottleneck: add one self-attention block at the lowest resolution.
        dropout: dropout inside residual blocks.
        stem_stride: 1 or 2. With 2 the input is downsampled once by the stem and a thin
            full-resolution branch feeds the output head (much cheaper on CPU).
        gradient_checkpointing: recompute residual/attention blocks in backward while training.
        cond_encoding: how the (B, C * hist_bins) condition enters the condition MLP. ``"raw"``: as given
            (any feature vector; the mask model's size/boundary features). ``"histogram"``: per class, the
            normalised histogram scaled by ``hist_bins`` (a flat histogram is all ones) next to its cumulative
            sum mapped to [-1, 1]. The cumulative sum turns a shift of intensity mass (a solid core in a
            ground-glass nodule: about 20 % of the mass moved up by several bins) into a large, order-aware
            input difference, where the raw bins differ by a few hundredths each.
    Spatial dims must be divisible by :attr:`spatial_divisor` = stem_stride * 2 ** (len(mults) - 1).
    """

    image_channels: int = 1
    hist_bins: int = 16
    base_channels: int = 32
    channel_mults: tuple[int, ...] = (1, 2, 4)
    num_res_blocks: int = 1
    attention_at_bottleneck: bool = False
    dropout: float = 0.0
    stem_stride: int = 2
    gradient_checkpointing: bool = False
    cond_encoding: str = "raw"

    def __post_init__(self) -> None:
        object.__setattr__(self, "channel_mults", tuple(int(m) for m in self.channel_mults))
        for name in ("image_channels", "hist_bins", "base_channels", "num_res_blocks"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise LeFusionInputError(f"DenoiserConfig.{name} must be a positive integer, got {value!r}.")
        if not self.channel_mults or min(self.channel_mults) < 1:
            raise LeFusionInputError(f"DenoiserConfig.channel_mults must be positive integers, "
                                     f"got {self.channel_mults!r}.")
        if self.stem_stride not in (1, 2):
            raise LeFusionInputError(f"DenoiserConfig.stem_stride must be 1 or 2, got {self.stem_stride!r}.")
        if self.cond_encoding not in COND_ENCODINGS:
            raise LeFusionInputError(f"DenoiserConfig.cond_encoding must be one of {', '.join(COND_ENCODINGS)}, "
                                     f"got {self.cond_encoding!r}.")
        if not 0.0 <= self.dropout < 1.0:
            raise LeFusionInputError(f"DenoiserConfig.dropout must be in [0, 1), got {self.dropout!r}.")

    @property
    def spatial_divisor(self) -> int:
        return self.stem_stride * 2 ** (len(self.channel_mults) - 1)

    @classmethod
    def from_preset(cls, name: str, image_channels: int = 1, hist_bins: int = 16, **overrides: Any) -> "DenoiserConfig":
        """Build a named preset (``"tiny"``, ``"small"``, ``"base"``); ``overrides`` replace fields."""
        if name not in PRESETS:
            raise LeFusionInputError(f"unknown denoiser preset {name!r}; valid presets are {', '.join(PRESETS)}.")
        return cls(image_channels=image_channels, hist_bins=hist_bins, **{**PRESETS[name], **overrides})


def _groups(channels: int) -> int:
    """GroupNorm groups: about 4 channels per group, at most 32, dividing ``channels``."""
    g = max(1, min(32, channels // 4))
    while channels % g:
        g -= 1
    return g


class _OneDnnConv3dFunction(torch.autograd.Function):
    """oneDNN 3D convolution whose backward also stays on oneDNN at batch 1.

    The backward PyTorch registers for ``mkldnn_convolution`` re-runs the backend choice, which again picks the
    im2col kernel at batch 1 (a batch-1 training step of ``tiny`` measured 3-4x slower than a batch-2 step). A
    batch-1 backward therefore runs at batch 2 with a zero-gradient twin of the sample: the twin adds nothing
    to the weight and bias gradients, and its input gradient is dropped.
    """

    @staticmethod
    def forward(ctx, input: Tensor, weight: Tensor, bias: Tensor | None, padding, stride, dilation,
                groups: int) -> Tensor:
        ctx.save_for_backward(input, weight)
        ctx.conv = (list(padding), list(stride), list(dilation), groups, None if bias is None else list(bias.shape))
        return torch.ops.aten.mkldnn_convolution(input, weight, bias, padding, stride, dilation, groups)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        input, weight = ctx.saved_tensors
        padding, stride, dilation, groups, bias_sizes = ctx.conv
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias_sizes is not None and ctx.needs_input_grad[2]]
        n = input.shape[0]
        if n == 1:
            input = torch.cat([input, input])
            grad_out = torch.cat([grad_out, torch.zeros_like(grad_out)])
        grad_in, grad_w, grad_b = torch.ops.aten.convolution_backward(
            grad_out, input, weight, bias_sizes, stride, padding, dilation, False, [0] * len(stride), groups, mask)
        if grad_in is not None:
            grad_in = grad_in[:n]
        return grad_in, grad_w, grad_b, None, None, None, None


class Conv3d(nn.Conv3d):
    """``nn.Conv3d`` that always takes oneDNN (mkldnn) for float32 inputs on CPU, forward and backward.

    PyTorch's CPU heuristic sends a batch-1 3D convolution whose ``N * C * Z * Y`` is at most 20,480 (the deeper
    levels of the ``small`` preset at 64x64x32) to its im2col kernel, measured 5-12x slower than oneDNN on
    2 cores, so single-lesion sampling ran at a quarter of the batch-4 throughput. Same parameters and
    state-dict keys as ``nn.Conv3d``; other devices and dtypes are untouched.
    """

    def _conv_forward(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if (input.device.type == "cpu" and input.dtype == torch.float32 and weight.dtype == torch.float32
                and self.padding_mode == "zeros" and not isinstance(self.padding, str)
                and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
            if torch.is_grad_enabled() and (input.requires_grad or weight.requires_grad):
                return _OneDnnConv3dFunction.apply(input, weight, bias, self.padding, self.stride, self.dilation,
                                                   self.groups)
            return torch.ops.aten.mkldnn_convolution(input, weight, bias, self.padding, self.stride, self.dilation,
                                                     self.groups)
        return super()._conv_forward(input, weight, bias)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding (Vaswani et al. 2017) of (B,) timesteps -> (B, dim) float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.to(torch.float32)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    return F.pad(emb, (0, dim - 2 * half))


class ResBlock(nn.Module):
    """GroupNorm-SiLU-Conv3d x2 with FiLM from the (time + condition) embedding and a residual path."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(in_ch), in_ch)
        self.conv1 = Conv3d(in_ch, out_ch, 3, padding=1)
        self.film = nn.Linear(emb_dim, 2 * out_ch)
        self.norm2 = nn.GroupNorm(_groups(out_ch), out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = Conv3d(out_ch, out_ch, 3, padding=1)
        self.skip = Conv3d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(F.silu(emb)).chunk(2, dim=1)
        expand = (...,) + (None,) * (h.ndim - 2)
        h = self.norm2(h) * (1 + scale[expand]) + shift[expand]
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over all voxels (used at the bottleneck only)."""

    def __init__(self, channels: int, head_dim: int = 64):
        super().__init__()
        self.heads = max(1, channels // head_dim)
        self.norm = nn.GroupNorm(_groups(channels), channels)
        self.qkv = Conv3d(channels, 3 * channels, 1)
        self.proj = Conv3d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        b, c, *spatial = x.shape
        n = math.prod(spatial)
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, n).permute(1, 0, 2, 4, 3)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])          # (b, heads, n, d)
        out = out.permute(0, 1, 3, 2).reshape(b, c, *spatial)
        return x + self.proj(out)


class LesionDenoiser(nn.Module):
    """3D UNet eps-predictor conditioned on timestep, context, class masks and lesion histograms."""

    def __init__(self, config: DenoiserConfig | None = None):
        super().__init__()
        self.config = cfg = config or DenoiserConfig()
        C, base = cfg.image_channels, cfg.base_channels
        in_ch = 2 * C + 1
        emb_dim = 4 * base
        self.time_dim = max(base, 32)
        self.time_mlp = nn.Sequential(nn.Linear(self.time_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        cond_in = C * cfg.hist_bins * (2 if cfg.cond_encoding == "histogram" else 1)
        self.cond_mlp = nn.Sequential(nn.Linear(cond_in, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.null_cond = nn.Parameter(torch.randn(emb_dim) * 0.02)

        if cfg.stem_stride == 2:
            hi = max(4, base // 4)
            self.stem_full = Conv3d(in_ch, hi, 3, padding=1)
            self.stem = Conv3d(hi, base, 3, stride=2, padding=1)
            self.head_up = nn.ConvTranspose3d(base, hi, 2, stride=2)
            head_ch = 2 * hi
        else:
            self.stem_full = self.head_up = None
            self.stem = Conv3d(in_ch, base, 3, padding=1)
            head_ch = base

        widths = [base * m for m in cfg.channel_mults]
        self.down_blocks = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        ch = base
        for level, width in enumerate(widths):
            blocks = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResBlock(ch, width, emb_dim, cfg.dropout))
                ch = width
            self.down_blocks.append(blocks)
            last = level == len(widths) - 1
            self.downsamples.append(nn.Identity() if last else Conv3d(ch, ch, 3, stride=2, padding=1))

        self.mid = nn.ModuleList([ResBlock(ch, ch, emb_dim, cfg.dropout)])
        if cfg.attention_at_bottleneck:
            self.mid.append(AttentionBlock(ch))
        self.mid.append(ResBlock(ch, ch, emb_dim, cfg.dropout))

        self.up_blocks = nn.ModuleList()
        self.upsamples = nn.ModuleList()
        for level in reversed(range(len(widths))):
            width = widths[level]
            last = level == len(widths) - 1
            # Upsample the coarser level to this one, halving work with a cheap k=2, s=2 transposed conv.
            self.upsamples.append(nn.Identity() if last else nn.ConvTranspose3d(ch, width, 2, stride=2))
            ch = ch if last else width
            blocks = nn.ModuleList()
            for i in range(cfg.num_res_blocks):
                blocks.append(ResBlock(ch + width if i == 0 else width, width, emb_dim, cfg.dropout))
            ch = width
            self.up_blocks.append(blocks)

        self.out_norm = nn.GroupNorm(_groups(head_ch), head_ch)
        self.out_conv = Conv3d(head_ch, C, 3, padding=1)
        nn.init.zeros_(self.out_conv.weight)
        nn.init.zeros_(self.out_conv.bias)

    # ------------------------------------------------------------------------------------------
    def _run(self, block: nn.Module, h: Tensor, emb: Tensor) -> Tensor:
        if self.config.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, h, emb, use_reentrant=False)
        return block(h, emb)

    def encode_condition(self, cond: Tensor) -> Tensor:
        """(B, C * hist_bins) condition -> the condition MLP's input (see ``DenoiserConfig.cond_encoding``)."""
        if self.config.cond_encoding == "raw":
            return cond
        bins = self.config.hist_bins
        hist = cond.reshape(cond.shape[0], -1, bins)                                  # (B, C, bins)
        cdf = hist.cumsum(-1) * 2 - 1
        return torch.cat([hist * bins, cdf], dim=-1).reshape(cond.shape[0], -1)

    def embed(self, t: Tensor, cond: Tensor | None, drop_cond: Tensor | None, batch: int) -> Tensor:
        """(B, 4 * base) embedding = time MLP + (histogram MLP or learned null condition)."""
        dtype = self.null_cond.dtype
        t_emb = self.time_mlp(timestep_embedding(t, self.time_dim).to(dtype))
        null = self.null_cond[None].expand(batch, -1)
        if cond is None:
            c_emb = null
        else:
            expected = (batch, self.config.image_channels * self.config.hist_bins)
            if tuple(cond.shape) != expected:
                raise ValueError(f"cond must have shape {expected}, got {tuple(cond.shape)}")
            c_emb = self.cond_mlp(self.encode_condition(cond.to(dtype)))
            if drop_cond is not None:
                drop = torch.as_tensor(drop_cond, device=c_emb.device).reshape(batch, 1).to(torch.bool)
                c_emb = torch.where(drop, null.to(c_emb.dtype), c_emb)
        return t_emb + c_emb

    def forward(self, x_t: Tensor, t: Tensor, context: Tensor, class_masks: Tensor,
                cond: Tensor | None = None, drop_cond: Tensor | None = None) -> Tensor:
        """Predict eps.

        Args:
            x_t: (B, C, Z, Y, X) noisy image channels, model units.
            t: (B,) long timesteps in [0, T) (a scalar is broadcast).
            context: (B, 1, Z, Y, X) clean image with the lesion zeroed (x0 * (1 - union_mask)).
            class_masks: (B, C, Z, Y, X) {0, 1}, 1 = lesion voxel of that class.
            cond: (B, C * hist_bins) histograms, or None = null condition for every sample.
            drop_cond: (B,) bool, True -> learned null condition for that sample.
        Returns:
            (B, C, Z, Y, X) predicted noise.
        """
        cfg = self.config
        b, c, *spatial = x_t.shape
        if c != cfg.image_channels or len(spatial) != 3:
            raise ValueError(f"x_t must be (B, {cfg.image_channels}, Z, Y, X), got {tuple(x_t.shape)}")
        if tuple(context.shape) != (b, 1, *spatial) or tuple(class_masks.shape) != tuple(x_t.shape):
            raise ValueError(f"context must be {(b, 1, *spatial)} and class_masks {tuple(x_t.shape)}, got "
                             f"{tuple(context.shape)} and {tuple(class_masks.shape)}")
        if any(s % cfg.spatial_divisor for s in spatial):
            raise ValueError(f"spatial size {tuple(spatial)} must be divisible by {cfg.spatial_divisor} "
                             f"for this denoiser configuration; pad the ROI")
        t = torch.as_tensor(t, device=x_t.device)
        t = t.expand(b) if t.ndim == 0 else t
        emb = self.embed(t, cond, drop_cond, b)

        h = torch.cat([x_t, context.to(x_t.dtype), class_masks.to(x_t.dtype)], dim=1)
        full = None
        if self.stem_full is not None:
            full = F.silu(self.stem_full(h))
            h = self.stem(full)
        else:
            h = self.stem(h)

        skips = []
        for blocks, down in zip(self.down_blocks, self.downsamples):
            for block in blocks:
                h = self._run(block, h, emb)
            skips.append(h)
            h = down(h)
        for block in self.mid:
            h = self._run(block, h, emb)
        for blocks, up in zip(self.up_blocks, self.upsamples):
            h = torch.cat([up(h), skips.pop()], dim=1)
            for block in blocks:
                h = self._run(block, h, emb)

        if full is not None:
            h = torch.cat([self.head_up(h), full], dim=1)
        return self.out_conv(F.silu(self.out_norm(h)))
