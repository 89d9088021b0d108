"""models/attention/ema_fused.py: the fused EMA kernels, run on the CPU under Triton's interpreter
in float64, against the PyTorch module on random inputs and random weights: outputs, input gradients
and every parameter gradient within 1e-9, every output element written (outputs poisoned with NaN
first). Skipped where Triton is absent; on a GPU, tests/test_gpu.py runs the compiled kernels."""
import math

import pytest
import torch

from models.attention import ema_fused
from models.attention.ema import EMA

pytestmark = [
    pytest.mark.skipif(not ema_fused.available(),
                       reason="Triton is not installed (the CPU build of torch)"),
    pytest.mark.skipif(not ema_fused.interpreted(),
                       reason="needs TRITON_INTERPRET=1 (tests/conftest.py sets it "
                              "unless EMA_TEST_GPU=1)"),
]
TOLERANCE = 1e-9


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every buffer the kernels write starts as NaN: an element they leave unwritten fails the
    test."""
    monkeypatch.setattr(ema_fused, "_new_like", lambda t: torch.full_like(t, math.nan))
    monkeypatch.setattr(ema_fused, "_new", lambda size, **kw: torch.full(size, math.nan, **kw))


def random_pair(channels: int, groups: int, seed: int = 0):
    """The same EMA with random weights (not the initial ones: a zero bias or a unit scale would
    hide a misplaced term), PyTorch and fused, in float64."""
    torch.manual_seed(seed)
    plain = EMA(channels, groups, fused=False).double()
    with torch.no_grad():
        for p in plain.parameters():
            p.normal_(0, 0.5)
    fused = EMA(channels, groups, fused=True).double()
    fused.load_state_dict(plain.state_dict())
    return plain, fused


def outputs_and_gradients(module, x, grad, parameters=None):
    """The output and the gradients of the input and of every parameter (of `parameters`, the
    module's own by default, e.g. a compiled wrapper's original module)."""
    parameters = parameters or module
    parameters.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    out = module(x)
    out.backward(grad)
    return {"output": out.detach(), "input": x.grad,
            **{name: p.grad.clone() for name, p in parameters.named_parameters()}}


def assert_fused_equals_pytorch(b, c, h, w, groups, channels_last=False):
    plain, fused = random_pair(c, groups)
    x = torch.randn(b, c, h, w, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    grad = torch.randn_like(x)
    expected, got = outputs_and_gradients(plain, x, grad), outputs_and_gradients(fused, x, grad)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.isfinite(got[name]).all(), f"{name}: an element left unwritten (NaN)"
        error = (got[name] - expected[name]).abs().max().item()
        assert error <= TOLERANCE, f"{name}: max abs difference {error:.2e}"
    if channels_last:
        assert got["output"].is_contiguous(memory_format=torch.channels_last)
        assert got["input"].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("k, h", [(8, 32), (16, 16), (32, 8), (64, 4)])
def test_resnet50_tiles(k, h):
    """ResNet50's four EMA tiles (k channels of a group, h x h), two groups, two images."""
    assert_fused_equals_pytorch(2, 2 * k, h, h, 2)


@pytest.mark.parametrize("b, c, h, w, groups", [
    (2, 12, 5, 9, 2),  # odd sizes, k = 6 (not a power of two)
    (2, 8, 7, 3, 2),
    (2, 16, 1, 1, 2),  # a 1x1 map
    (1, 16, 1, 1, 2),  # a batch of one 1x1 map
    (1, 4, 6, 6, 4),  # k = 1, four groups
    (1, 6, 2, 5, 3),  # k = 2, three groups
])
def test_odd_shapes(b, c, h, w, groups):
    assert_fused_equals_pytorch(b, c, h, w, groups)


def test_channels_last_input():
    assert_fused_equals_pytorch(2, 32, 6, 5, 2, channels_last=True)


def test_a_detector_sized_map_takes_the_pytorch_path_and_fused_true_says_why():
    """256 channels at 80x80: one map of 128 x 128 blocks, more than one program holds."""
    x = torch.randn(1, 256, 80, 80)
    assert "larger than the kernels hold" in ema_fused.unsupported(x, 32)
    default, plain = EMA(256), EMA(256, fused=False)
    plain.load_state_dict(default.state_dict())
    assert not default.takes_fused_path(x)
    assert torch.equal(default(x), plain(x))
    with pytest.raises(ValueError,
                       match=r"EMA\(fused=True\) cannot run on this input: a map of 80 x 80"):
        EMA(256, fused=True)(x)


def test_none_keeps_the_pytorch_path_on_the_cpu():
    x = torch.randn(2, 16, 4, 4, dtype=torch.float64)
    assert not EMA(16, 2).takes_fused_path(x) and EMA(16, 2, fused=True).takes_fused_path(x)


def test_the_paths_share_parameters_and_state_dict():
    plain, fused = EMA(64, fused=False), EMA(64, fused=True)
    assert plain.state_dict().keys() == fused.state_dict().keys() == EMA(64).state_dict().keys()
    assert [p.shape for p in plain.parameters()] == [p.shape for p in fused.parameters()]
    with pytest.raises(ValueError, match="fused must be None, True or False"):
        EMA(64, fused="yes")


def test_without_triton_none_trains_as_before_and_true_says_why(monkeypatch):
    monkeypatch.setattr(ema_fused, "triton", None)
    x = torch.randn(2, 16, 4, 4)
    EMA(16, 2)(x).sum().backward()
    with pytest.raises(ValueError, match="Triton is not installed"):
        EMA(16, 2, fused=True)(x)


def test_on_the_cpu_without_the_interpreter_true_says_why(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        EMA(16, 2, fused=True)(torch.randn(2, 16, 4, 4))


def test_parameter_gradients_repeat_bitwise():
    """The partials are summed by torch in a fixed order: two backward passes agree bit for bit."""
    _, fused = random_pair(16, 2)
    x, grad = torch.randn(1, 16, 5, 5,
                          dtype=torch.float64), torch.randn(1, 16, 5, 5, dtype=torch.float64)
    first, second = outputs_and_gradients(fused, x, grad), outputs_and_gradients(fused, x, grad)
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_the_custom_op_registration():
    """torch.library's own checks: schema, fake (meta) implementation, autograd registration."""
    _, fused = random_pair(8, 2)
    x = torch.randn(1, 8, 3, 3, dtype=torch.float64, requires_grad=True)
    args = (x, fused.conv1x1.weight, fused.conv1x1.bias, fused.gn.weight, fused.gn.bias,
            fused.conv3x3.weight,
            fused.conv3x3.bias, fused.groups, fused.gn.eps)
    torch.library.opcheck(ema_fused.ema_fused, args)


def test_torch_compile_traces_the_fused_op_without_a_graph_break():
    _, fused = random_pair(16, 2)
    x = torch.randn(2, 16, 5, 5, dtype=torch.float64)
    explanation = torch._dynamo.explain(fused)(x)
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0)
    compiled = torch.compile(fused, backend="eager", fullgraph=True)
    grad = torch.randn_like(x)
    expected, got = outputs_and_gradients(fused, x,
                                          grad), outputs_and_gradients(compiled, x, grad, fused)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=TOLERANCE)


def test_autocast_does_not_reach_inside_the_op():
    """Under autocast the op's PyTorch glue still computes in float32, forward and backward: the
    same output and gradients as without it (a float32 input)."""
    _, fused = random_pair(16, 2)
    fused = fused.float()
    x, grad = torch.randn(2, 16, 5, 5), torch.randn(2, 16, 5, 5)
    plain = outputs_and_gradients(fused, x, grad)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = outputs_and_gradients(fused, x, grad)
    for name in plain:
        assert torch.equal(plain[name], under[name]), name


def test_inputs_beyond_32_bit_offsets_take_the_pytorch_path():
    far = torch.empty(0, device="meta").as_strided((2, 16, 4, 4), (2**31, 16, 4, 1))
    assert "32-bit offsets" in ema_fused.unsupported(far, 2, "cuda")
    many = torch.empty(2**20 + 1, 64, 4, 8, device="meta", dtype=torch.bfloat16)  # > 2**31
    assert "2,147,485,696 elements" in ema_fused.unsupported(many, 32, "cuda")
    most = torch.empty(2**20, 64, 4, 8, device="meta", dtype=torch.bfloat16)  # offsets < 2**31
    assert ema_fused.unsupported(most, 32, "cuda") is None
    assert ema_fused.unsupported(torch.empty(2, 16, 4, 4, device="meta"), 2, "cuda") is None
