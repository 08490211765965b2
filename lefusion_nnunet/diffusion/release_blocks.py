"""Building blocks of :class:`~lefusion_nnunet.diffusion.release_unet.ReleaseUnet` (the published LeFusion denoiser).

Attribute names reproduce the parameter paths of the release's state dict (its ``Residual(PreNorm(...))`` nesting
appears as ``fn`` / ``norm`` slots); the computations are arranged for CPU speed (see ``release_unet``). Tensors are
``(B, C, Z, Y, X)``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lefusion_nnunet.diffusion.unet import Conv3d

# Tokens an attention block processes at once (bounds its working set to tens of MB).
_CHUNK_TOKENS = 16384


class _Slot(nn.Module):
    """Holds a child as ``fn`` (and optionally a channel ``norm``) so parameter paths match the release."""

    def __init__(self, fn: nn.Module, norm: nn.Module | None = None):
        super().__init__()
        self.fn = fn
        if norm is not None:
            self.norm = norm


class ChannelLayerNorm(nn.Module):
    """Layer norm over C of (B, C, Z, Y, X) with a gain only (``gamma`` of shape (1, C, 1, 1, 1)), eps 1e-5."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.gamma = nn.Parameter(torch.ones(1, dim, 1, 1, 1))

    def tokens(self, x: Tensor) -> Tensor:
        """(B, C, Z, Y, X) -> normalised (B, Z, Y, X, C) (contiguous token layout)."""
        return F.layer_norm(x.permute(0, 2, 3, 4, 1), (x.shape[1],), self.gamma.reshape(-1), None, self.eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.tokens(x).permute(0, 4, 1, 2, 3)


class RotaryFrequencies(nn.Module):
    """Rotary position embedding (Su et al. 2021) on interleaved feature pairs, ``rotary-embedding-torch``
    0.1.5 numerics: pair j of a d-feature vector at position n turns by n * 10000 ** (-2 j / dim)."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("freqs", 1.0 / 10000 ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))

    def rotation(self, n: int, device: torch.device) -> Tensor:
        """(n, dim / 2) complex unit numbers exp(i * position * freq)."""
        angles = torch.arange(n, device=device, dtype=self.freqs.dtype)[:, None] * self.freqs.to(device)[None]
        return torch.polar(torch.ones_like(angles), angles)


def relative_position_buckets(n: int, num_buckets: int = 32, max_distance: int = 32,
                              device: torch.device | None = None) -> Tensor:
    """(n, n) long T5-style buckets of i - j: half the buckets per sign, exact below a quarter, log-spaced up
    to ``max_distance``."""
    pos = torch.arange(n, device=device)
    rel = pos[:, None] - pos[None, :]
    half = num_buckets // 2
    sign = (rel < 0).long() * half
    dist = rel.abs()
    exact = half // 2
    far = exact + (torch.log(dist.clamp(min=1).float() / exact) / math.log(max_distance / exact)
                   * (half - exact)).long()
    far = far.clamp(max=half - 1)
    return sign + torch.where(dist < exact, dist, far)


class RelativePositionBias(nn.Module):
    """Learned per-head bias of the Z-attention logits, indexed by the bucket of i - j."""

    def __init__(self, heads: int, num_buckets: int = 32, max_distance: int = 32):
        super().__init__()
        self.num_buckets, self.max_distance = num_buckets, max_distance
        self.relative_attention_bias = nn.Embedding(num_buckets, heads)

    def forward(self, n: int, device: torch.device) -> Tensor:
        """(heads, n, n) additive bias."""
        buckets = relative_position_buckets(n, self.num_buckets, self.max_distance, device)
        return self.relative_attention_bias(buckets).permute(2, 0, 1)


class HeadAttention(nn.Module):
    """Parameters of a softmax attention (``to_qkv``, ``to_out``, no biases; optional rotary)."""

    def __init__(self, dim: int, heads: int, dim_head: int, rotary: RotaryFrequencies | None = None):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        if rotary is not None:
            self.rotary_emb = rotary
        self.to_qkv = nn.Linear(dim, 3 * heads * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim, bias=False)

    def attend(self, tokens: Tensor, bias: Tensor | None = None, rotation: Tensor | None = None) -> Tensor:
        """(N, L, dim) normalised tokens -> (N, L, dim): attention within each of the N sequences.

        ``bias``: (1, heads, L, L) additive logits bias; ``rotation``: (L, r / 2) complex rotary factors.
        """
        n, length, _ = tokens.shape
        h, d = self.heads, self.dim_head
        qkv = F.linear(tokens, self.to_qkv.weight).view(n, length, 3, h, d)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))                 # (N, h, L, d) views
        if rotation is not None:
            q, k = _rotate(q, rotation), _rotate(k, rotation)
        bias = None if bias is None else bias.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)             # scale d ** -0.5
        return F.linear(out.transpose(1, 2).reshape(n, length, h * d), self.to_out.weight)


def _rotate(x: Tensor, rotation: Tensor) -> Tensor:
    """Rotary embedding of (N, h, L, d) along L: feature pairs (2j, 2j + 1) of the first r features times
    the complex ``rotation`` (L, r / 2), i.e. (a, b) -> (a cos - b sin, b cos + a sin), in one pass."""
    r = 2 * rotation.shape[-1]
    pairs = x[..., :r] if x.dtype == torch.float32 else x[..., :r].float()
    turned = torch.view_as_real(torch.view_as_complex(pairs.unflatten(-1, (r // 2, 2))) * rotation)
    turned = turned.flatten(-2).to(x.dtype)
    return turned if r == x.shape[-1] else torch.cat([turned, x[..., r:]], dim=-1)


def _chunks(total: int, per_item: int) -> range:
    """Start indices of chunks of ``total`` items holding about ``_CHUNK_TOKENS`` tokens each."""
    return range(0, total, max(1, _CHUNK_TOKENS // per_item))


class DepthAttentionBlock(nn.Module):
    """x + Attention_Z(LayerNorm_C(x)): softmax attention along Z at every (y, x), rotary + position bias.

    Runs in chunks of Y rows straight from ``x``, so the (tokens x 3 * heads * dim_head) projections stay in
    cache instead of being written out for the whole volume.
    """

    def __init__(self, dim: int, heads: int, dim_head: int, rotary: RotaryFrequencies):
        super().__init__()
        self.fn = _Slot(_Slot(HeadAttention(dim, heads, dim_head, rotary)), norm=ChannelLayerNorm(dim))

    def forward(self, x: Tensor, pos_bias: Tensor) -> Tensor:
        """x (B, C, Z, Y, X), ``pos_bias`` (heads, Z, Z) -> (B, C, Z, Y, X)."""
        attn: HeadAttention = self.fn.fn.fn
        norm: ChannelLayerNorm = self.fn.norm
        b, c, z, y, w = x.shape
        rotation = attn.rotary_emb.rotation(z, x.device)
        bias = pos_bias[None]
        out = torch.empty_like(x)
        step = _chunks(y, b * z * w).step
        for y0 in range(0, y, step):
            part = x[:, :, :, y0:y0 + step]                                           # (B, C, Z, y', X)
            rows = part.shape[3]
            tokens = F.layer_norm(part.permute(0, 3, 4, 2, 1), (c,), norm.gamma.reshape(-1), None, norm.eps)
            update = attn.attend(tokens.reshape(b * rows * w, z, c), bias, rotation)
            torch.add(part, update.view(b, rows, w, z, c).permute(0, 4, 3, 1, 2), out=out[:, :, :, y0:y0 + step])
        return out


class PlaneAttentionBlock(nn.Module):
    """x + Attention_YX(LayerNorm_C(x)): softmax attention over the (y, x) positions of each slice."""

    def __init__(self, dim: int, heads: int, dim_head: int = 32):
        super().__init__()
        self.fn = _Slot(_Slot(HeadAttention(dim, heads, dim_head)), norm=ChannelLayerNorm(dim))

    def forward(self, x: Tensor) -> Tensor:
        b, c, z, y, w = x.shape
        tokens = self.fn.norm.tokens(x).reshape(b * z, y * w, c)
        out = self.fn.fn.fn.attend(tokens)
        return x + out.view(b, z, y, w, c).permute(0, 4, 1, 2, 3)


class PlaneLinearAttention(nn.Module):
    """Parameters of the per-slice linear attention (1x1 ``Conv2d`` weights, as in the release)."""

    def __init__(self, dim: int, heads: int, dim_head: int = 32):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        self.to_qkv = nn.Conv2d(dim, 3 * heads * dim_head, 1, bias=False)
        self.to_out = nn.Conv2d(heads * dim_head, dim, 1)


class LinearAttentionBlock(nn.Module):
    """x + LinearAttention_YX(LayerNorm_C(x)) (Shen et al. 2021) per slice and head: q softmax over
    features, k softmax over positions, out = (k^T v)^T q, then the output projection.

    Per chunk of slices, ``context = k^T v`` (heads x d x e) is multiplied into the output projection
    first, so ``out = q @ (blockdiag(context) W_out^T)`` costs one (positions x hd) x (hd x C) product.
    """

    def __init__(self, dim: int, heads: int, dim_head: int = 32):
        super().__init__()
        self.fn = _Slot(PlaneLinearAttention(dim, heads, dim_head), norm=ChannelLayerNorm(dim))

    def forward(self, x: Tensor) -> Tensor:
        """x (B, C, Z, Y, X) -> (B, C, Z, Y, X)."""
        p: PlaneLinearAttention = self.fn.fn
        norm: ChannelLayerNorm = self.fn.norm
        b, c, z, y, w = x.shape
        h, d, n = p.heads, p.dim_head, y * w
        hd = h * d
        w_qkv, w_out = p.to_qkv.weight.flatten(1), p.to_out.weight.flatten(1)         # (3hd, C), (C, hd)
        w_q, w_k, w_v = w_qkv.split(hd)
        w_out_heads = w_out.t().reshape(h, d, c) * d ** -0.5                           # q scale folded in
        out = torch.empty_like(x)
        step = _chunks(z, b * n).step
        for z0 in range(0, z, step):
            part = x[:, :, z0:z0 + step]                                              # (B, C, z', Y, X)
            s = b * part.shape[2]
            tokens = F.layer_norm(part.permute(0, 2, 3, 4, 1), (c,), norm.gamma.reshape(-1), None,
                                  norm.eps).reshape(s, n, c)
            q = F.linear(tokens, w_q).view(s, n, h, d).softmax(dim=-1)                # (S, n, h, d)
            # k and v feature-major, (S, h, d, n): the softmax over positions runs along rows, k^T v is batched
            k_t = torch.matmul(w_k, tokens.transpose(1, 2)).softmax(dim=-1).view(s, h, d, n)
            v_t = torch.matmul(w_v, tokens.transpose(1, 2)).view(s, h, d, n)
            context = torch.matmul(k_t, v_t.transpose(-1, -2))                         # (S, h, d, e)
            mixed = torch.matmul(context, w_out_heads)                                # (S, h, d, C)
            update = torch.baddbmm(p.to_out.bias, q.reshape(s, n, hd), mixed.reshape(s, hd, c))
            torch.add(part, update.view(b, -1, y, w, c).permute(0, 4, 1, 2, 3), out=out[:, :, z0:z0 + step])
        return out


class ConvNormAct(nn.Module):
    """In-plane (1, 3, 3) conv -> GroupNorm -> optional FiLM (x * (1 + scale) + shift) -> SiLU."""

    def __init__(self, dim: int, dim_out: int, groups: int):
        super().__init__()
        self.proj = Conv3d(dim, dim_out, (1, 3, 3), padding=(0, 1, 1))
        self.norm = nn.GroupNorm(groups, dim_out)

    def forward(self, x: Tensor, scale_shift: tuple[Tensor, Tensor] | None = None) -> Tensor:
        h = self.proj(x)
        if scale_shift is None:
            h = self.norm(h)
        elif h.shape[0] == 1:       # fold FiLM into the GroupNorm affine: one pass instead of three
            scale, shift = scale_shift
            gain = scale[0] + 1
            h = F.group_norm(h, self.norm.num_groups, self.norm.weight * gain,
                             self.norm.bias * gain + shift[0], self.norm.eps)
        else:
            scale, shift = (s[(...,) + (None,) * 3] for s in scale_shift)
            h = torch.addcmul(shift, self.norm(h), scale + 1)
        return F.silu(h, inplace=not (torch.is_grad_enabled() and h.requires_grad))


class ResnetBlock(nn.Module):
    """Two :class:`ConvNormAct` with FiLM from the (time + condition) embedding after the first, 1x1x1 skip."""

    def __init__(self, dim: int, dim_out: int, emb_dim: int | None, groups: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * dim_out)) if emb_dim is not None else None
        self.block1 = ConvNormAct(dim, dim_out, groups)
        self.block2 = ConvNormAct(dim_out, dim_out, groups)
        self.res_conv = Conv3d(dim, dim_out, 1) if dim != dim_out else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        scale_shift = None
        if self.mlp is not None:
            scale_shift = tuple(self.mlp(emb).chunk(2, dim=1))
        return self.block2(self.block1(x, scale_shift)).add_(self.res_conv(x))


class SinusoidalTime(nn.Module):
    """(B,) timesteps -> (B, dim): sin then cos of t * 10000 ** (-k / (dim / 2 - 1)), k < dim / 2."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, t: Tensor) -> Tensor:
        half = self.dim // 2
        freqs = torch.exp(torch.arange(half, device=t.device) * -(math.log(10000) / (half - 1)))
        args = t.to(torch.float32)[:, None] * freqs[None]
        return torch.cat([args.sin(), args.cos()], dim=-1)
