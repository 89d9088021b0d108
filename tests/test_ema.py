"""EMA against an independent, loop-level computation of the seven steps of docs/reference.md, 2.2
EMA."""
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


@pytest.mark.parametrize("channels,factor",
                         [(48, 32), (16, 32), (0, 32), (64, 0), (64, -8), (100, 8)])
def test_ema_rejects_bad_channels_at_construction(channels, factor):
    with pytest.raises(ValueError, match="positive multiple of factor"):
        EMA(channels, factor)


def test_ema_keeps_the_input_dtype_under_autocast(monkeypatch):
    """CUDA's autocast runs GroupNorm in float32, and the authors' EMA still returns bf16 (its
    matmuls run in bf16); ours too, so that the residual stream after it stays bf16 as in the
    baseline network. CPU autocast leaves GroupNorm in bf16, so CUDA's rule is imitated here."""

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


# The 3x3 branch by algebra (docs/reference.md, 2.2 EMA) against the authors' formulation, float64.
# ResNet101's EMA inputs are ResNet50's (the same four stage widths and maps; 23 blocks, not 6, in
# the third stage), so these shapes cover both.
RESNET50_AND_101 = [(2, 256, 32, 32, 32), (2, 512, 16, 16, 32), (2, 1024, 8, 8, 32),
                    (2, 2048, 4, 4, 32)]
ODD = [(2, 64, 5, 9, 32), (3, 96, 7, 3, 32), (2, 64, 1, 1, 32), (2, 64, 1, 7, 32),
       (2, 64, 6, 1, 32),
       (2, 32, 5, 4, 32),  # k = 1
       (1, 64, 4, 6, 8)]   # a batch of one


def relative_error(got, want):
    """Largest |difference| over the reference's largest magnitude, floored at 1: a gradient that
    is zero analytically (GroupNorm's weight on a 1x1 map) is compared with rounding's scale."""
    return ((got - want).abs().max() / want.abs().max().clamp(min=1)).item()


def compare_with_folded(shape, memory_format, run=lambda module, x: module(x)):
    batch, channels, height, width, factor = shape
    ours = randomized_ema(channels, factor)
    folded = FoldedEMA(channels, factor).double()
    folded.load_state_dict(ours.state_dict())
    x = torch.randn(batch, channels, height, width, dtype=torch.float64)
    x = x.contiguous(memory_format=memory_format).requires_grad_()
    grad = torch.randn(x.shape, dtype=torch.float64)
    out, expected = run(ours, x), folded(x)
    got = torch.autograd.grad(out, [x, *ours.parameters()], grad)
    want = torch.autograd.grad(expected, [x, *folded.parameters()], grad)
    names = ["output", "input gradient"] + [f"{name} gradient"
                                            for name, _ in ours.named_parameters()]
    errors = {name: relative_error(a, b) for name, a,
              b in zip(names, [out, *got], [expected, *want])}
    assert max(errors.values()) < 1e-12, errors
    assert (expected - x).abs().max() > 1e-2  # the module does change its input
    return out


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last],
                         ids=["nchw", "nhwc"])
@pytest.mark.parametrize("shape", RESNET50_AND_101 + ODD, ids=lambda s: "x".join(map(str, s[:4]))
                         + f"-G{s[4]}")
def test_ema_equals_the_authors_formulation(shape, memory_format):
    out = compare_with_folded(shape, memory_format)
    assert out.is_contiguous(memory_format=memory_format)


@pytest.mark.parametrize("shape", [(2, 64, 5, 9, 32), (2, 64, 1, 1, 32), (1, 64, 6, 1, 8)],
                         ids=["5x9", "1x1", "6x1"])
def test_ema_as_compiled_equals_the_authors_formulation(shape):
    """Under torch.compile the k -> 1 filter's tap sums (SharedFilter) are traced by dynamo and
    AOTAutograd (backend aot_eager: the graphs the compiler gets, without its C++ build),
    in one graph with no break, and exact."""
    torch._dynamo.reset()
    explained = []

    def compiled(module, x):
        explained.append(torch._dynamo.explain(module)(x))
        return torch.compile(module, backend="aot_eager", dynamic=False)(x)

    compare_with_folded(shape, torch.contiguous_format, compiled)
    assert (explained[0].graph_count, explained[0].graph_break_count) == (1, 0)


def test_ema_never_makes_the_3x3_branch():
    """Forward and backward run no convolution (x2 = conv3x3(x) is never made; the k -> 1 filter
    runs as tap sums); the forward makes fewer tensors of x's size than the authors' formulation."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Outputs(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            made = isinstance(out, torch.Tensor) and not out._is_view()  # a new tensor, not a view
            self.made.append((str(func), out.shape if made else None))
            return out

    x = torch.randn(2, 256, 8, 8, requires_grad=True)
    counts = {}
    for module in (EMA(256), FoldedEMA(256)):
        with Outputs() as seen:
            seen.made = []
            out = module(x)
            counts[type(module).__name__] = sum(shape is not None and shape.numel() == x.numel()
                                                for _, shape in seen.made)
            out.sum().backward()
        convolutions = [shape for func, shape in seen.made if "convolution" in func]
        if isinstance(module, FoldedEMA):
            assert (2 * 32, 8, 8, 8) in convolutions  # the check can fail: x2, folded
        else:
            assert convolutions == []
    assert counts["EMA"] < counts["FoldedEMA"], counts


@pytest.mark.parametrize("with_kernels", [False, True], ids=["alone", "with-ema_fused"])
def test_ema_py_works_copied_into_another_project(tmp_path, with_kernels):
    """models/attention/ema.py in a folder of another project's (which has a `models` package of its
    own): it imports, runs and equals the repo's EMA; with ema_fused.py beside it, the kernels are
    found (fused=True then asks for Triton's interpreter on the CPU), without it fused=True says
    so."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    attention = Path(__file__).resolve().parents[1] / "models" / "attention"
    shutil.copy(attention / "ema.py", tmp_path)
    if with_kernels:
        shutil.copy(attention / "ema_fused.py", tmp_path)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "__init__.py").write_text(
        "raise ImportError('the other project models')\n")
    script = (
        "import torch, ema\n"
        "m = ema.EMA(64)\n"
        "m.load_state_dict(torch.load('state.pt'))\n"
        "torch.save(m(torch.load('x.pt')), 'out.pt')\n"
        "try:\n    ema.EMA(64, fused=True)(torch.load('x.pt'))\nexcept ValueError as e:\n    "
        "print(e)\n")
    ours = randomized_ema(64, 32).float()
    x = torch.randn(2, 64, 6, 6)
    torch.save(ours.state_dict(), tmp_path / "state.pt")
    torch.save(x, tmp_path / "x.pt")
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                          text=True,
                          env={"PATH": "", "PYTHONPATH": ""})
    assert done.returncode == 0, done.stderr
    missing = "needs ema_fused.py beside ema.py"
    assert (missing in done.stdout) != with_kernels, done.stdout
    if with_kernels:
        assert ("Triton's interpreter" in done.stdout
                or "Triton is not installed" in done.stdout), done.stdout
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), ours(x), rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:FutureWarning")
def test_ema_under_torch_func_and_torchscript():
    """Per-sample gradients (vmap of grad) and second derivatives (a Hessian-vector product by
    double backward) through EMA equal the authors' formulation's; a traced EMA saves and loads."""
    import io

    from torch.func import functional_call, grad, vmap

    ours = randomized_ema(64, 32)
    folded = FoldedEMA(64, 32).double()
    folded.load_state_dict(ours.state_dict())
    x = torch.randn(3, 64, 5, 4, dtype=torch.float64)

    def per_sample_grads(module):
        def loss(params, image):
            return functional_call(module, params, (image[None],)).square().sum()
        return vmap(grad(loss), in_dims=(None, 0))(dict(module.named_parameters()), x)

    got, want = per_sample_grads(ours), per_sample_grads(folded)
    for name in want:
        assert relative_error(got[name], want[name]) < 1e-12, name
    vector = torch.randn_like(x)
    hvps = [torch.autograd.functional.hvp(lambda t: module(t).square().sum(), x, vector)[1]
            for module in (ours, folded)]
    assert relative_error(*hvps) < 1e-12

    buffer = io.BytesIO()
    torch.jit.save(torch.jit.trace(ours, x), buffer)
    buffer.seek(0)
    assert relative_error(torch.jit.load(buffer)(x), folded(x)) < 1e-12


def test_spatial_gate_is_the_authors_gate():
    """The gates that gradcam.py and --gate-images draw: the authors' output over their input."""
    ours = randomized_ema(64, 8)
    folded = FoldedEMA(64, 8).double()
    folded.load_state_dict(ours.state_dict())
    x = torch.randn(2, 64, 5, 7, dtype=torch.float64)
    gate = ours.spatial_gate(x)
    assert gate.shape == (2, 8, 5, 7)
    torch.testing.assert_close(gate, (folded(x) / x).unflatten(1, (8, 8))[:, :, 0], rtol=1e-10,
                               atol=0)
