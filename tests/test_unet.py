"""LesionDenoiser: shapes, null condition, gradients, configs, presets (tiny configs, 16^3)."""
import json

import pytest
import torch

from lefusion_nnunet.diffusion.unet import PRESETS, DenoiserConfig, LesionDenoiser

S = (16, 16, 16)


def _inputs(C, B=2, seed=0, hist_bins=16):
    g = torch.Generator().manual_seed(seed)
    x_t = torch.randn(B, C, *S, generator=g)
    context = torch.rand(B, 1, *S, generator=g) * 2 - 1
    masks = (torch.rand(B, C, *S, generator=g) > 0.7).float()
    cond = torch.rand(B, C * hist_bins, generator=g)
    t = torch.randint(0, 50, (B,), generator=g)
    return x_t, t, context, masks, cond


def _model(C=1, seed=0, **overrides):
    torch.manual_seed(seed)  # parameter init only; library code never seeds
    model = LesionDenoiser(DenoiserConfig.from_preset("tiny", image_channels=C, **overrides))
    with torch.no_grad():  # make the zero-initialised output conv non-trivial
        model.out_conv.weight.normal_(0, 0.1)
        model.out_conv.bias.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("stem_stride", [1, 2])
@pytest.mark.parametrize("C", [1, 2])
def test_output_shape_equals_input_shape(C, stem_stride):
    x_t, t, context, masks, cond = _inputs(C)
    model = LesionDenoiser(DenoiserConfig.from_preset("tiny", image_channels=C, stem_stride=stem_stride))
    with torch.no_grad():
        out = model(x_t, t, context, masks, cond)
        assert out.shape == x_t.shape
        assert float(out.abs().max()) == 0.0  # zero-initialised output conv
        out = _model(C, stem_stride=stem_stride)(x_t, t, context, masks, cond)
    assert out.shape == x_t.shape and bool(torch.isfinite(out).all()) and float(out.abs().max()) > 0


def test_cond_none_equals_all_dropped():
    x_t, t, context, masks, cond = _inputs(1)
    model = _model().eval()
    with torch.no_grad():
        a = model(x_t, t, context, masks, None)
        b = model(x_t, t, context, masks, cond, drop_cond=torch.tensor([True, True]))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_drop_cond_changes_output_per_sample():
    x_t, t, context, masks, cond = _inputs(1)
    model = _model().eval()
    with torch.no_grad():
        kept = model(x_t, t, context, masks, cond)
        dropped = model(x_t, t, context, masks, cond, drop_cond=torch.tensor([True, True]))
        mixed = model(x_t, t, context, masks, cond, drop_cond=torch.tensor([True, False]))
    for b in range(2):
        assert (kept[b] - dropped[b]).abs().max() > 1e-4
    torch.testing.assert_close(mixed[0], dropped[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(mixed[1], kept[1], atol=1e-5, rtol=0)


def test_gradient_flows_to_all_parameters():
    x_t, t, context, masks, cond = _inputs(2)
    model = _model(C=2).train()
    model(x_t, t, context, masks, cond, drop_cond=torch.tensor([True, False])).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and bool(torch.isfinite(p.grad).all()), name
    assert float(model.stem.weight.grad.abs().sum()) > 0
    assert float(model.null_cond.grad.abs().sum()) > 0
    assert float(model.cond_mlp[0].weight.grad.abs().sum()) > 0


def test_gradient_checkpointing_matches_plain():
    x_t, t, context, masks, cond = _inputs(1)
    plain, ckpt = _model(), _model(gradient_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    outs = []
    for model in (plain, ckpt):
        out = model.train()(x_t, t, context, masks, cond)
        out.square().mean().backward()
        outs.append((out.detach(), model.stem.weight.grad.clone()))
    torch.testing.assert_close(outs[0][0], outs[1][0])
    torch.testing.assert_close(outs[0][1], outs[1][1])


def test_channels_last_and_bf16_autocast():
    x_t, t, context, masks, cond = _inputs(1)
    model = _model().eval()
    with torch.no_grad():
        ref = model(x_t, t, context, masks, cond)
        cl = torch.channels_last_3d
        model_cl = _model().eval().to(memory_format=cl)
        out_cl = model_cl(x_t.to(memory_format=cl), t, context.to(memory_format=cl), masks.to(memory_format=cl), cond)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out_bf = model(x_t, t, context, masks, cond)
    torch.testing.assert_close(out_cl, ref, atol=1e-4, rtol=1e-4)
    assert out_bf.shape == ref.shape and bool(torch.isfinite(out_bf).all())
    assert float((out_bf.float() - ref).abs().max()) < 0.1 * float(ref.abs().max()) + 0.05


def test_config_round_trip():
    cfg = DenoiserConfig.from_preset("base", image_channels=2, dropout=0.1)
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["channel_mults"] == [1, 2, 4, 8]
    back = DenoiserConfig.from_dict(d)
    assert back == cfg and isinstance(back.channel_mults, tuple)
    with pytest.raises(ValueError, match="unknown DenoiserConfig key"):
        DenoiserConfig.from_dict({**d, "bogus": 1})


def test_presets_build():
    expected = {"tiny": (8, (1, 2)), "small": (32, (1, 2, 4)), "base": (64, (1, 2, 4, 8))}
    for name, (base, mults) in expected.items():
        cfg = DenoiserConfig.from_preset(name)
        assert (cfg.base_channels, cfg.channel_mults) == (base, mults)
        with torch.device("meta"):
            n = sum(p.numel() for p in LesionDenoiser(cfg).parameters())
        assert n > 0
    assert DenoiserConfig() == DenoiserConfig.from_preset("small")
    assert DenoiserConfig.from_preset("base").attention_at_bottleneck
    # The small preset's stride-2 stem path really runs (16 is divisible by its divisor 8).
    small = LesionDenoiser(DenoiserConfig.from_preset("small"))
    x_t, t, context, masks, cond = _inputs(1, B=1)
    with torch.no_grad():
        assert small(x_t, t, context, masks, cond).shape == x_t.shape
    with pytest.raises(ValueError, match="divisible by 8"):
        small(torch.zeros(1, 1, 12, 16, 16), t, torch.zeros(1, 1, 12, 16, 16), torch.zeros(1, 1, 12, 16, 16))


def test_invalid_preset_names_valid_ones():
    with pytest.raises(ValueError) as info:
        DenoiserConfig.from_preset("huge")
    for name in PRESETS:
        assert name in str(info.value)


def test_bad_shapes_raise():
    model = _model()
    x_t, t, context, masks, cond = _inputs(1)
    with pytest.raises(ValueError, match="cond"):
        model(x_t, t, context, masks, cond[:, :8])
    with pytest.raises(ValueError, match="x_t"):
        model(torch.cat([x_t, x_t], 1), t, context, masks, cond)


@pytest.mark.parametrize("stride,kernel", [(1, 3), (2, 3), (1, 1)])
@pytest.mark.parametrize("batch", [1, 2])
def test_onednn_conv3d_matches_torch_conv3d_values_and_gradients(stride, kernel, batch):
    """The CPU conv that always takes oneDNN (PyTorch sends small batch-1 3D convs to a slow kernel, forward and
    backward) computes what nn.Conv3d computes, forward and backward (input, weight and bias gradients), in both
    memory formats, and keeps nn.Conv3d's state dict."""
    if not torch.backends.mkldnn.is_available():
        pytest.skip("oneDNN not built into this torch")
    from lefusion_nnunet.diffusion.unet import Conv3d

    torch.manual_seed(0)
    ref = torch.nn.Conv3d(6, 10, kernel, stride=stride, padding=kernel // 2)
    ours = Conv3d(6, 10, kernel, stride=stride, padding=kernel // 2)
    ours.load_state_dict(ref.state_dict())
    for fmt in (torch.contiguous_format, torch.channels_last_3d):
        x = torch.randn(batch, 6, 8, 12, 10).contiguous(memory_format=fmt)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        a, b = ref(xa), ours(xb)
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
        a.square().sum().backward()
        b.square().sum().backward()
        assert xb.grad.shape == xa.grad.shape
        torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(ours.bias.grad, ref.bias.grad, rtol=1e-4, atol=1e-3)
        ref.zero_grad(), ours.zero_grad()
    frozen = torch.randn(batch, 6, 8, 12, 10)                 # weight gradients only (input needs none)
    ours(frozen).sum().backward()
    ref(frozen).sum().backward()
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-3)
    assert set(ours.state_dict()) == set(ref.state_dict())


def test_histogram_condition_encoding():
    """'histogram' feeds the scaled histogram and its cumulative sum per class; a checkpoint config written
    before the field existed loads as 'raw' (its weights keep fitting)."""
    model = LesionDenoiser(DenoiserConfig.from_preset("tiny", image_channels=2, cond_encoding="histogram"))
    hist = torch.zeros(1, 2, 16)
    hist[0, 0, 3] = 1.0                        # class 0: all mass in bin 3
    hist[0, 1] = 1 / 16                        # class 1: flat
    enc = model.encode_condition(hist.reshape(1, 32)).reshape(1, 2, 32)
    assert enc.shape == (1, 2, 32)
    torch.testing.assert_close(enc[0, 1, :16], torch.ones(16))
    assert enc[0, 0, 16 + 2] == -1 and enc[0, 0, 16 + 3] == 1 and enc[0, 1, 31] == 1
    assert model.cond_mlp[0].in_features == 64
    x_t, t, context, masks, cond = _inputs(2, B=2)
    assert model(x_t, t, context, masks, cond).shape == x_t.shape
    old = DenoiserConfig.from_preset("tiny").to_dict()
    del old["cond_encoding"]
    assert DenoiserConfig.from_dict(old).cond_encoding == "raw"
    with pytest.raises(Exception, match="cond_encoding"):
        DenoiserConfig(cond_encoding="cdf")
