"""The published LeFusion denoiser (M3DV/LeFusion ``Unet3D``), re-implemented to load its weights.

A factorised 3D UNet: in-plane ``(1, 3, 3)`` convolutions, per-slice linear attention over (Y, X),
softmax attention along Z (rotary position embedding plus a learned relative-position bias) at every
level, a sinusoidal time MLP and a histogram condition concatenated to the time embedding (with a learned
null condition). It sees only ``x_t``, ``t`` and the condition: no context or mask channels. Tensors are
``(B, C, Z, Y, X)``; Z is the release's "frames" axis (32 slices for LIDC, 10 for EMIDEC).

Parameter and buffer names follow the release's state dict exactly (the ``fn`` nesting of its
``Residual(PreNorm(...))`` wrappers included), so ``load_state_dict(strict=True)`` takes the release's
tensors once the ``denoise_fn.module.`` prefix and the schedule buffers are removed. The computation is
our own and is arranged for CPU speed: oneDNN convolutions at batch 1, fused layer norms on a token
layout, rotary embedding as one complex multiplication, fused scaled-dot-product attention, and attention
along Z in chunks that stay in cache.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lefusion_nnunet.diffusion.release_blocks import (DepthAttentionBlock, LinearAttentionBlock, PlaneAttentionBlock,
                                                      RelativePositionBias, ResnetBlock, RotaryFrequencies,
                                                      SinusoidalTime)
from lefusion_nnunet.diffusion.unet import Conv3d
from lefusion_nnunet.errors import LeFusionInputError

# The release's training/inference configurations (its *.sh scripts and hydra configs).
RELEASE_PRESETS: dict[str, dict[str, Any]] = {
    "lidc": dict(dim=64, channels=1, out_dim=None, cond_dim=16),
    "emidec": dict(dim=72, channels=2, out_dim=None, cond_dim=32),
    "diffmask": dict(dim=64, channels=2, out_dim=1, cond_dim=None),
}


@dataclass(frozen=True)
class ReleaseUnetConfig:
    """Architecture of :class:`ReleaseUnet` (the release's ``Unet3D`` constructor arguments).

    Args:
        dim: width of the first level (the release passes its ROI edge length: 64 LIDC, 72 EMIDEC).
        dim_mults: width multiplier per level; one in-plane 2x downsampling between levels.
        channels: input channels (1 LIDC, 2 EMIDEC, 2 DiffMask = noisy mask + sphere prior).
        out_dim: output channels; None = ``channels``.
        cond_dim: condition length (16-bin histogram per class: 16 LIDC, 32 EMIDEC); None = unconditional.
        attn_heads: heads of every attention.
        attn_dim_head: head width of the Z-attention (linear and mid attention use 32).
        init_kernel_size: in-plane kernel of the first convolution (odd).
        resnet_groups: GroupNorm groups in residual blocks.
        use_sparse_linear_attn: per-slice linear attention at every level.
    Y and X must be divisible by :attr:`spatial_divisor`; Z is free.
    """

    dim: int = 64
    dim_mults: tuple[int, ...] = (1, 2, 4, 8)
    channels: int = 1
    out_dim: int | None = None
    cond_dim: int | None = 16
    attn_heads: int = 8
    attn_dim_head: int = 32
    init_kernel_size: int = 7
    resnet_groups: int = 8
    use_sparse_linear_attn: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "dim_mults", tuple(int(m) for m in self.dim_mults))
        for name in ("dim", "channels", "attn_heads", "attn_dim_head", "resnet_groups"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise LeFusionInputError(f"ReleaseUnetConfig.{name} must be a positive integer, got {value!r}.")
        for name in ("out_dim", "cond_dim"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise LeFusionInputError(f"ReleaseUnetConfig.{name} must be None or a positive integer, "
                                         f"got {value!r}.")
        if not self.dim_mults or min(self.dim_mults) < 1:
            raise LeFusionInputError(f"ReleaseUnetConfig.dim_mults must be positive, got {self.dim_mults!r}.")
        if self.init_kernel_size % 2 != 1:
            raise LeFusionInputError(f"ReleaseUnetConfig.init_kernel_size must be odd, got {self.init_kernel_size}.")
        widths = [self.dim] + [self.dim * m for m in self.dim_mults]
        if any(w % self.resnet_groups for w in widths):
            raise LeFusionInputError(f"ReleaseUnetConfig widths {widths} must be divisible by resnet_groups "
                                     f"{self.resnet_groups}.")

    @property
    def output_channels(self) -> int:
        return self.out_dim if self.out_dim is not None else self.channels

    @property
    def spatial_divisor(self) -> int:
        """Y and X must be multiples of this (one 2x in-plane downsampling per level but the last)."""
        return 2 ** (len(self.dim_mults) - 1)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "ReleaseUnetConfig":
        """The release's ``"lidc"``, ``"emidec"`` or ``"diffmask"`` model; ``overrides`` replace fields."""
        if name not in RELEASE_PRESETS:
            raise LeFusionInputError(f"unknown release model {name!r}; valid names are {', '.join(RELEASE_PRESETS)}.")
        return cls(**{**RELEASE_PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["dim_mults"] = list(self.dim_mults)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ReleaseUnetConfig":
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise LeFusionInputError(f"unknown ReleaseUnetConfig keys {sorted(unknown)}; the checkpoint may come "
                                     f"from a newer lefusion_nnunet.")
        return cls(**d)


# ---------------------------------------------------------------------------------------------- network
class ReleaseUnet(nn.Module):
    """The published LeFusion / DiffMask eps-predictor: ``forward(x, t, cond)`` -> eps."""

    def __init__(self, config: ReleaseUnetConfig | None = None):
        super().__init__()
        self.config = cfg = config or ReleaseUnetConfig()
        dim, heads = cfg.dim, cfg.attn_heads
        rotary = RotaryFrequencies(min(32, cfg.attn_dim_head))

        def depth_attn(width: int) -> DepthAttentionBlock:
            return DepthAttentionBlock(width, heads, cfg.attn_dim_head, rotary)

        def plane_attn(width: int) -> nn.Module:
            return LinearAttentionBlock(width, heads) if cfg.use_sparse_linear_attn else nn.Identity()

        self.time_rel_pos_bias = RelativePositionBias(heads, max_distance=32)
        k = cfg.init_kernel_size
        self.init_conv = Conv3d(cfg.channels, dim, (1, k, k), padding=(0, k // 2, k // 2))
        self.init_temporal_attn = depth_attn(dim)
        time_dim = 4 * dim
        self.time_mlp = nn.Sequential(SinusoidalTime(dim), nn.Linear(dim, time_dim), nn.GELU(),
                                      nn.Linear(time_dim, time_dim))
        self.null_cond_emb = nn.Parameter(torch.randn(1, cfg.cond_dim)) if cfg.cond_dim else None
        emb_dim = time_dim + (cfg.cond_dim or 0)
        dims = [dim] + [dim * m for m in cfg.dim_mults]
        in_out = list(zip(dims[:-1], dims[1:]))
        g = cfg.resnet_groups
        self.downs, self.ups = nn.ModuleList(), nn.ModuleList()     # registered in the release's order
        for i, (d_in, d_out) in enumerate(in_out):
            last = i == len(in_out) - 1
            self.downs.append(nn.ModuleList([
                ResnetBlock(d_in, d_out, emb_dim, g), ResnetBlock(d_out, d_out, emb_dim, g),
                plane_attn(d_out), depth_attn(d_out),
                nn.Identity() if last else Conv3d(d_out, d_out, (1, 4, 4), (1, 2, 2), (0, 1, 1))]))
        mid = dims[-1]
        self.mid_block1 = ResnetBlock(mid, mid, emb_dim, g)
        self.mid_spatial_attn = PlaneAttentionBlock(mid, heads)
        self.mid_temporal_attn = depth_attn(mid)
        self.mid_block2 = ResnetBlock(mid, mid, emb_dim, g)
        for i, (d_in, d_out) in enumerate(reversed(in_out)):
            last = i == len(in_out) - 1
            self.ups.append(nn.ModuleList([
                ResnetBlock(2 * d_out, d_in, emb_dim, g), ResnetBlock(d_in, d_in, emb_dim, g),
                plane_attn(d_in), depth_attn(d_in),
                nn.Identity() if last else nn.ConvTranspose3d(d_in, d_in, (1, 4, 4), (1, 2, 2), (0, 1, 1))]))
        self.final_conv = nn.Sequential(ResnetBlock(2 * dim, dim, None, g), Conv3d(dim, cfg.output_channels, 1))

    def to(self, *args: Any, **kwargs: Any) -> "ReleaseUnet":
        """``nn.Module.to`` without ``memory_format``: the release's 1x1 ``Conv2d`` weights are 4-D, which
        ``channels_last_3d`` refuses, and the network chooses its activation layout itself (channels-last)."""
        kwargs.pop("memory_format", None)
        return super().to(*args, **kwargs)

    def embed(self, t: Tensor, cond: Tensor | None, drop_cond: Tensor | None, batch: int) -> Tensor:
        """(B, 4 * dim + cond_dim) embedding: time MLP output next to the condition (or the null condition)."""
        emb = self.time_mlp(t)
        if self.null_cond_emb is None:
            return emb
        k = self.null_cond_emb.shape[1]
        null = self.null_cond_emb.expand(batch, k)
        if cond is None:
            c = null
        else:
            if cond.numel() not in (k, batch * k):
                raise ValueError(f"cond must have {k} or (B={batch}) x {k} entries, got shape {tuple(cond.shape)}")
            c = cond.to(device=emb.device, dtype=emb.dtype).reshape(-1, k).expand(batch, k)
            if drop_cond is not None:
                c = torch.where(torch.as_tensor(drop_cond, device=c.device).reshape(batch, 1).bool(), null, c)
        return torch.cat([emb, c.to(emb.dtype)], dim=-1)

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None = None, drop_cond: Tensor | None = None) -> Tensor:
        """Predict eps.

        Args:
            x: (B, channels, Z, Y, X) noisy input in model units [-1, 1] (DiffMask: noisy mask, sphere).
            t: (B,) long timesteps in [0, T) (a scalar is broadcast).
            cond: (B, cond_dim) or (cond_dim,) histograms (16 bins over [-1, 1] per class, summing to 1);
                None = the learned null condition (the release's own forward substitutes a fixed one-hot
                histogram for None; its null embedding is what it trains for dropped conditions). Ignored by
                unconditional models.
            drop_cond: (B,) bool, True -> null condition for that sample (classifier-free guidance).
        Returns:
            (B, output_channels, Z, Y, X) predicted noise.
        """
        cfg = self.config
        b, c, *spatial = x.shape
        if c != cfg.channels or len(spatial) != 3:
            raise ValueError(f"x must be (B, {cfg.channels}, Z, Y, X), got {tuple(x.shape)}")
        if spatial[1] % cfg.spatial_divisor or spatial[2] % cfg.spatial_divisor:
            raise ValueError(f"Y and X {tuple(spatial[1:])} must be divisible by {cfg.spatial_divisor}")
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(b) if t.ndim == 0 else t
        emb = self.embed(t, cond, drop_cond, b)
        pos_bias = self.time_rel_pos_bias(spatial[0], x.device).to(x.dtype).contiguous()

        # channels-last inside: oneDNN convolutions skip a reorder and the attention blocks' token views are free
        h = self.init_conv(x.contiguous(memory_format=torch.channels_last_3d))
        r = h
        h = self.init_temporal_attn(h, pos_bias)
        skips = []
        for block1, block2, plane, depth, down in self.downs:
            h = depth(plane(block2(block1(h, emb), emb)), pos_bias)
            skips.append(h)
            h = down(h)
        h = self.mid_block1(h, emb)
        h = self.mid_temporal_attn(self.mid_spatial_attn(h), pos_bias)
        h = self.mid_block2(h, emb)
        for block1, block2, plane, depth, up in self.ups:
            h = torch.cat([h, skips.pop()], dim=1)
            h = up(depth(plane(block2(block1(h, emb), emb)), pos_bias))
        return self.final_conv(torch.cat([h, r], dim=1)).contiguous()


# ---------------------------------------------------------------------------------------------- adapters
class ReleaseLesionDenoiser(ReleaseUnet):
    """:class:`ReleaseUnet` behind the lesion samplers' call signature (same parameters and state-dict keys).

    ``context`` and ``class_masks`` are accepted and ignored: the release's denoiser sees only x_t, t and the
    histogram condition (the samplers' background merge keeps the known ROI outside the mask).
    """

    def forward(self, x_t: Tensor, t: Tensor, context: Tensor | None = None, class_masks: Tensor | None = None,
                cond: Tensor | None = None, drop_cond: Tensor | None = None) -> Tensor:
        """x_t (B, C, Z, Y, X), t (B,), cond (B, C * 16) -> eps (B, C, Z, Y, X); see :meth:`ReleaseUnet.forward`."""
        return super().forward(x_t, t, cond, drop_cond)


class ReleaseMaskDenoiser(ReleaseUnet):
    """The release's DiffMask network behind the mask sampler's call signature.

    ``x_t`` is the noisy mask (B, 1, Z, Y, X) in [-1, 1]; ``context`` is our sphere channel
    ``clip((r - d) / r, -1, 1)`` (B, 1, Z, Y, X), turned into the release's binary sphere prior (1 where d <= r,
    else -1) and appended as the second input channel. ``class_masks`` (host-region hint) and ``cond`` (size
    features) are ignored: the release's mask model has neither.
    """

    def forward(self, x_t: Tensor, t: Tensor, context: Tensor | None = None, class_masks: Tensor | None = None,
                cond: Tensor | None = None, drop_cond: Tensor | None = None) -> Tensor:
        """-> eps (B, 1, Z, Y, X)."""
        if context is None:
            raise ValueError("the DiffMask model needs the sphere channel as context")
        sphere = torch.where(context >= 0, 1.0, -1.0).to(x_t.dtype)
        return super().forward(torch.cat([x_t, sphere.expand_as(x_t)], dim=1), t)
