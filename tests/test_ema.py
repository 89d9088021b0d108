"""EMA against an independent, loop-level computation of the seven steps of docs/reference.md, 2.2 EMA."""
import pytest
import torch
import torch.nn.functional as F

from models.attention import EMA
from models.attention.ema import FoldedEMA  # the authors' sequence of operations


def sigmoid(t):
    return 1 / (1 + torch.exp(-t))


def softmax(values):
    e = [torch.exp(v - max(values)) for v in values]
    total = sum(e)
    return [v / total for v in e]


def ema_reference(x, ema):
    """Channel by channel, group by group, with no reshapes, pools or library convolutions."""
    batch, channels, height, width = x.shape
    k = channels // ema.groups
    w1, b1 = ema.conv1x1.weight[:, :, 0, 0], ema.conv1x1.bias
    w3, b3 = ema.conv3x3.weight, ema.conv3x3.bias
    gamma, beta, eps = ema.gn.weight, ema.gn.bias, ema.gn.eps
    images = []
    for b in range(batch):
        out_channels = []
        for group in range(ema.groups):
            g = [x[b, group * k + c] for c in range(k)]  # step 1: k maps of (H, W)
            # step 2: strip pooling, shared 1x1 conv on the concatenated strips
            strips = [torch.cat([gc.sum(1) / width, gc.sum(0) / height]) for gc in g]
            mixed = [b1[o] + sum(w1[o, c] * strips[c] for c in range(k)) for o in range(k)]
            # step 3: gates, then GroupNorm with one channel per group
            x1 = []
            for c in range(k):
                y = g[c] * sigmoid(mixed[c][:height])[:, None] * sigmoid(mixed[c][height:])[None, :]
                mean = y.sum() / y.numel()
                var = ((y - mean) ** 2).sum() / y.numel()
                x1.append((y - mean) / torch.sqrt(var + eps) * gamma[c] + beta[c])
            # step 4: 3x3 convolution with zero padding, as shifted sums
            padded = [F.pad(gc, (1, 1, 1, 1)) for gc in g]
            x2 = [b3[o] + sum(w3[o, c, i, j] * padded[c][i:i + height, j:j + width]
                              for c in range(k) for i in range(3) for j in range(3))
                  for o in range(k)]
            # step 5: softmax over channels of each branch's global mean
            a1 = softmax([t.sum() / t.numel() for t in x1])
            a2 = softmax([t.sum() / t.numel() for t in x2])
            # step 6: cross-spatial weights
            m = sum(a1[c] * x2[c] + a2[c] * x1[c] for c in range(k))
            # step 7
            out_channels += [gc * sigmoid(m) for gc in g]
        images.append(torch.stack(out_channels))
    return torch.stack(images)


def randomized_ema(channels, factor):
    torch.manual_seed(channels * 100 + factor)
    ema = EMA(channels, factor).double()
    with torch.no_grad():
        for p in ema.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return ema


@pytest.mark.parametrize("batch,channels,height,width,factor", [
    (2, 64, 5, 7, 8),
    (1, 64, 4, 4, 16),
    (2, 64, 6, 3, 32),
    (1, 128, 3, 5, 32),
    (2, 32, 1, 1, 8),
    (1, 16, 2, 9, 16),
])
def test_ema_matches_loop_reference(batch, channels, height, width, factor):
    ema = randomized_ema(channels, factor)
    x = torch.randn(batch, channels, height, width, dtype=torch.float64, requires_grad=True)
    upstream_grad = torch.randn(batch, channels, height, width, dtype=torch.float64)

    out = ema(x)
    (grad,) = torch.autograd.grad(out, x, upstream_grad)
    expected = ema_reference(x, ema)
    (expected_grad,) = torch.autograd.grad(expected, x, upstream_grad)

    assert out.shape == x.shape
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-5)
    # The comparison means something: the module does change its input.
    assert (out - x).abs().max() > 1e-3


def test_upstream_state_dict_loads_strictly():
    # Names and shapes of the authors' EmaModule(channels=256, factor=32), k = 8.
    k = 8
    upstream = {
        "gn.weight": (k,), "gn.bias": (k,),
        "conv1x1.weight": (k, k, 1, 1), "conv1x1.bias": (k,),
        "conv3x3.weight": (k, k, 3, 3), "conv3x3.bias": (k,),
    }
    state = {name: torch.randn(shape) for name, shape in upstream.items()}
    ema = EMA(256, 32)
    ema.load_state_dict(state, strict=True)
    assert torch.equal(ema.conv3x3.weight, state["conv3x3.weight"])
    assert sum(p.numel() for p in ema.parameters()) == 10 * k * k + 4 * k


@pytest.mark.parametrize("channels,factor", [(48, 32), (16, 32), (0, 32), (64, 0), (64, -8), (100, 8)])
def test_ema_rejects_bad_channels_at_construction(channels, factor):
    with pytest.raises(ValueError, match="positive multiple of factor"):
        EMA(channels, factor)


def test_ema_keeps_the_input_dtype_under_autocast(monkeypatch):
    """CUDA's autocast runs GroupNorm in float32, and the authors' EMA still returns bf16 (its matmuls
    run in bf16); ours too, so that the residual stream after it stays bf16 as in the baseline
    network. CPU autocast leaves GroupNorm in bf16, so CUDA's rule is imitated here."""

    group_norm = torch.group_norm
    monkeypatch.setattr(torch, "group_norm", lambda x, *args: group_norm(x.float(), *args))
    ours = randomized_ema(64, 8).float()
    upstream = FoldedEMA(64, 8)
    upstream.load_state_dict(ours.state_dict())
    x = torch.randn(2, 64, 6, 5).bfloat16()
    with torch.autocast("cpu", torch.bfloat16):
        out, expected = ours(x), upstream(x)
    assert out.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected.float(), rtol=0.02, atol=0.02)
    assert ours(x.float()).dtype == torch.float32  # no autocast: float32 in, float32 out


@pytest.mark.parametrize("training", [True, False])
def test_ema_takes_a_batch_of_one_1x1_map(training):
    """The authors' folded GroupNorm sees B*G maps, so one image with 1x1 maps passes; ours too."""

    ours = randomized_ema(64, 8).train(training)
    upstream = FoldedEMA(64, 8).double().train(training)
    upstream.load_state_dict(ours.state_dict())
    x = torch.randn(1, 64, 1, 1, dtype=torch.float64)
    torch.testing.assert_close(ours(x), upstream(x), rtol=0, atol=1e-12)
