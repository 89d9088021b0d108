"""EMA fused: the whole module in one Triton kernel forward and one backward, for CUDA.

Everything EMA computes is local to one (image, group) tile of k x H x W values (8x32x32 at most in
a CIFAR ResNet50): one program holds its tile whole and computes the seven steps of
docs/reference.md 2.2 without writing an intermediate to memory. The forward reads x and writes the
output; the backward reads x and the output's gradient, recomputes the forward's values (cheaper
than storing and reading them back), and writes the input's gradient and one row of
parameter-gradient partials per tile, which torch then sums: no float atomics, so two runs on one
GPU give the same gradients. The 3x3 convolution runs inside the kernels, tap by tap over the input
channels, reading x's neighbours from memory (cache); its backward writes the 3x3 branch's gradient
once to a scratch buffer and reads it back shifted.

`ema_fused(x, ...)` is a torch.library custom op with an autograd formula and a fake (meta)
implementation, so torch.compile traces it without a graph break and CUDA graphs capture it. On the
CPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1), float64 included: that is how
the tests prove them. Without Triton (the CPU build of torch) this module imports, and `available()`
says False.
"""
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU build of torch has no Triton
    triton = None

# The largest tile one program holds, in blocks (below): ResNet50's first stage, 8 x 32 x 32
# channels and positions, is 16 x 32 x 32. Larger maps (detectors: 8 x 80 x 80 is 16 x 128 x 128)
# take the PyTorch path.
MAX_TILE = 16384

# Whether EMA(fused=None) takes these kernels on CUDA. Off until a GPU has run tests/test_gpu.py's
# fused tests and benchmark.py on them (docs/speed.md, The GPU check): proven under the interpreter
# only.
ON_CUDA_BY_DEFAULT = False


def available() -> bool:
    """Whether Triton is here to run the kernels."""
    return triton is not None


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def blocks(k: int, h: int, w: int) -> tuple[int, int, int]:
    """The kernel's block sizes: powers of two, at least 16 channels and 16 positions (the smallest
    product tl.dot takes on a GPU), the width widened first."""
    bk, bh, bw = (1 << max(0, n - 1).bit_length() for n in (k, h, w))
    bh = max(2, bh)
    return max(16, bk), bh, max(bw, 16 // bh)


def unsupported(x: torch.Tensor, groups: int):
    """Why the kernels cannot run on x, or None."""
    if triton is None:
        return "Triton is not installed (the CPU build of torch has none)"
    if x.dim() != 4:
        return f"the kernels take a (B, C, H, W) tensor, got {x.dim()} dimensions"
    if x.device.type == "cpu" and not interpreted():
        return "on the CPU the kernels run only under Triton's interpreter (TRITON_INTERPRET=1)"
    if x.device.type not in ("cpu", "cuda"):
        return f"the kernels run on CUDA, not {x.device.type}"
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        return f"the kernels take floating-point input, got {x.dtype}"
    bk, bh, bw = blocks(x.shape[1] // groups, *x.shape[2:])
    if bk * bh * bw > MAX_TILE:
        return (
            f"a group's tile of {x.shape[1] // groups} x {x.shape[2]} x {x.shape[3]} values "
            f"(blocks {bk}x{bh}x{bw}) is larger than the kernels hold ({MAX_TILE})")
    return None


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other dtype computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# every output the kernels write is allocated here (the tests poison it)
_new_like = torch.empty_like
_new = torch.empty


if triton is not None:
    @triton.jit
    def _shifted(ptr, c, i, j, di, dj, sc, sh, sw, K, H, W, DTYPE: tl.constexpr):
        """The tile's values at (c, i + di, j + dj), 0 outside the map: (BK, BH, BW)."""
        ii, jj = i + di, j + dj
        inside = (c < K) & (i < H) & (j < W) & (ii >= 0) & (ii < H) & (jj >= 0) & (jj < W)
        return tl.load(ptr + c * sc + ii * sh + jj * sw, mask=inside, other=0).to(DTYPE)

    @triton.jit
    def _tap(w3_ptr, kk, t, K, DTYPE: tl.constexpr):
        """The 3x3 convolution's (k out x k in) weights at tap t, 0 on padded channels."""
        return tl.load(w3_ptr + kk[:, None] * K * 9 + kk[None, :] * 9 + t,
                       mask=(kk[:, None] < K) & (kk[None, :] < K),
                       other=0).to(DTYPE)

    @triton.jit
    def _tap_product(w, xs, BK: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr,
                     DOT: tl.constexpr):
        """w (BK, BK) applied to each position of xs (BK, BH, BW), on the tensor cores where DOT is
        16-bit."""
        flat = tl.reshape(xs, (BK, BH * BW))
        out = tl.dot(w.to(DOT), flat.to(DOT), input_precision="ieee", out_dtype=xs.dtype)
        return tl.reshape(out, (BK, BH, BW))

    @triton.jit
    def _tile(x_ptr, w1_ptr, b1_ptr, gamma_ptr, beta_ptr, w3_ptr, b3_ptr, base, sxc, sxh, sxw, K, H,
              W, eps,
              BK: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr, DTYPE: tl.constexpr,
              DOT: tl.constexpr):
        """The forward's values for one tile (each (BK, BH, BW) unless named otherwise)."""
        kk = tl.arange(0, BK)
        c = kk[:, None, None]
        i = tl.arange(0, BH)[None, :, None]
        j = tl.arange(0, BW)[None, None, :]
        valid = (c < K) & (i < H) & (j < W)
        x = tl.load(x_ptr + base + c * sxc + i * sxh + j * sxw, mask=valid, other=0).to(DTYPE)
        # 2. Strip pooling and the shared 1x1 convolution, (BK, BH) and (BK, BW).
        xh = tl.sum(x, axis=2) / W
        xw = tl.sum(x, axis=1) / H
        w1 = tl.load(w1_ptr + kk[:, None] * K + kk[None, :],
                     mask=(kk[:, None] < K) & (kk[None, :] < K),
                     other=0).to(DTYPE)
        b1 = tl.load(b1_ptr + kk, mask=kk < K, other=0).to(DTYPE)
        gh = 1 / (1 + tl.exp(-(tl.sum(w1[:, :, None] * xh[None, :, :], axis=1) + b1[:, None])))
        gw = 1 / (1 + tl.exp(-(tl.sum(w1[:, :, None] * xw[None, :, :], axis=1) + b1[:, None])))
        # 3. GroupNorm branch: one channel per group, statistics over the valid H x W only.
        y = x * gh[:, :, None] * gw[:, None, :]
        mu = tl.sum(tl.sum(y, axis=2), axis=1) / (H * W)
        d = tl.where(valid, y - mu[:, None, None], 0)
        rstd = 1 / tl.sqrt(tl.sum(tl.sum(d * d, axis=2), axis=1) / (H * W) + eps)
        gamma = tl.load(gamma_ptr + kk, mask=kk < K, other=0).to(DTYPE)
        beta = tl.load(beta_ptr + kk, mask=kk < K, other=0).to(DTYPE)
        xhat = d * rstd[:, None, None]
        x1 = xhat * gamma[:, None, None] + beta[:, None, None]
        # 4. 3x3 branch: one (k x k) @ (k x H*W) product per tap, neighbours read from memory.
        x2 = tl.zeros((BK, BH, BW), DTYPE) + tl.load(b3_ptr + kk, mask=kk < K,
                                                     other=0).to(DTYPE)[:, None, None]
        for t in tl.static_range(9):
            xs = _shifted(x_ptr + base, c, i, j, t // 3 - 1, t % 3 - 1, sxc, sxh, sxw, K, H, W,
                          DTYPE)
            x2 += _tap_product(_tap(w3_ptr, kk, t, K, DTYPE), xs, BK, BH, BW, DOT)
        x2 = tl.where(valid, x2, 0)
        # 5. Channel descriptors: softmax over the k channels; a1 = softmax(beta) (each map of x1
        # has mean exactly its bias), a2 = softmax of x2's map means. (BK,) each, 0 on padded
        # channels.
        b_ = tl.where(kk < K, beta, float("-inf"))
        a1 = tl.exp(b_ - tl.max(b_, axis=0))
        a1 = a1 / tl.sum(a1, axis=0)
        z = tl.where(kk < K, tl.sum(tl.sum(x2, axis=2), axis=1) / (H * W), float("-inf"))
        a2 = tl.exp(z - tl.max(z, axis=0))
        a2 = a2 / tl.sum(a2, axis=0)
        # 6. Cross-spatial learning, (BH, BW); 7's gate is sigmoid of it.
        m = tl.sum(a1[:, None, None] * x2 + a2[:, None, None] * tl.where(valid, x1, 0), axis=0)
        s = 1 / (1 + tl.exp(-m))
        return x, valid, xh, xw, w1, gh, gw, rstd, xhat, gamma, x1, x2, a1, a2, s

    @triton.jit
    def _forward_kernel(x_ptr, out_ptr, w1_ptr, b1_ptr, gamma_ptr, beta_ptr, w3_ptr, b3_ptr,
                        sxb, sxc, sxh, sxw, sob, soc, soh, sow, G, K, H, W, eps,
                        BK: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr, DTYPE: tl.constexpr,
                        DOT: tl.constexpr):
        pid = tl.program_id(0)
        b, g = pid // G, pid % G
        x, valid, _, _, _, _, _, _, _, _, _, _, _, _, s = _tile(
            x_ptr, w1_ptr, b1_ptr, gamma_ptr, beta_ptr, w3_ptr, b3_ptr, b * sxb + g * K * sxc, sxc,
            sxh, sxw,
            K, H, W, eps, BK, BH, BW, DTYPE, DOT)
        c = tl.arange(0, BK)[:, None, None]
        i = tl.arange(0, BH)[None, :, None]
        j = tl.arange(0, BW)[None, None, :]
        out = x * s[None, :, :]  # 7. gate
        tl.store(out_ptr + b * sob + (g * K + c) * soc + i * soh + j * sow,
                 out.to(out_ptr.dtype.element_ty),
                 mask=valid)

    @triton.jit
    def _backward_kernel(x_ptr, go_ptr, dx_ptr, scratch_ptr, part_ptr, w1_ptr, b1_ptr, gamma_ptr,
                         beta_ptr,
                         w3_ptr, b3_ptr, sxb, sxc, sxh, sxw, sgb, sgc, sgh, sgw, sdb, sdc, sdh, sdw,
                         G, K, H, W, eps, P,
                         BK: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr, DTYPE: tl.constexpr,
                        DOT: tl.constexpr):
        pid = tl.program_id(0)
        b, g = pid // G, pid % G
        base = b * sxb + g * K * sxc
        x, valid, xh, xw, w1, gh, gw, rstd, xhat, gamma, x1, x2, a1, a2, s = _tile(
            x_ptr, w1_ptr, b1_ptr, gamma_ptr, beta_ptr, w3_ptr, b3_ptr, base, sxc, sxh, sxw,
            K, H, W, eps, BK, BH, BW, DTYPE, DOT)
        kk = tl.arange(0, BK)
        c = kk[:, None, None]
        i = tl.arange(0, BH)[None, :, None]
        j = tl.arange(0, BW)[None, None, :]
        go = tl.load(go_ptr + b * sgb + (g * K + c) * sgc + i * sgh + j * sgw, mask=valid,
                     other=0).to(DTYPE)
        # 7. out = x * s
        dx = go * s[None, :, :]
        dm = tl.sum(go * x, axis=0) * s * (1 - s)
        # 6. m = sum_c a1 x2 + a2 x1
        da1 = tl.sum(tl.sum(dm[None, :, :] * x2, axis=2), axis=1)
        da2 = tl.sum(tl.sum(dm[None, :, :] * tl.where(valid, x1, 0), axis=2), axis=1)
        # 5. a2 = softmax(mean x2): its gradient spreads evenly over each valid map.
        dz = a2 * (da2 - tl.sum(a2 * da2, axis=0))
        dx2 = tl.where(valid, a1[:, None, None] * dm[None, :, :] + dz[:, None, None] / (H * W), 0)
        dx1 = a2[:, None, None] * dm[None, :, :]
        # 3. GroupNorm: x1 = xhat * gamma + beta
        dgamma = tl.sum(tl.sum(dx1 * xhat, axis=2), axis=1)
        dbeta = tl.sum(tl.sum(dx1, axis=2), axis=1)
        dxhat = dx1 * gamma[:, None, None]
        mean_dxhat = tl.sum(tl.sum(dxhat, axis=2), axis=1) / (H * W)
        mean_dxhat_xhat = tl.sum(tl.sum(dxhat * xhat, axis=2), axis=1) / (H * W)
        dy = tl.where(valid, rstd[:, None, None] * (dxhat - mean_dxhat[:, None, None]
                                                    - xhat * mean_dxhat_xhat[:, None, None]), 0)
        # y = x * gh * gw
        dx += dy * gh[:, :, None] * gw[:, None, :]
        dsh = tl.sum(dy * x * gw[:, None, :], axis=2) * gh * (1 - gh)
        dsw = tl.sum(dy * x * gh[:, :, None], axis=1) * gw * (1 - gw)
        # 2. gh = sigmoid(w1 @ xh + b1), gw likewise; xh, xw the strip means.
        dw1 = tl.sum(dsh[:, None, :] * xh[None, :, :],
                     axis=2) + tl.sum(dsw[:, None, :] * xw[None, :, :], axis=2)
        db1 = tl.sum(dsh, axis=1) + tl.sum(dsw, axis=1)
        dxh = tl.sum(w1[:, :, None] * dsh[:, None, :], axis=0)
        dxw = tl.sum(w1[:, :, None] * dsw[:, None, :], axis=0)
        dx += dxh[:, :, None] / W + dxw[:, None, :] / H
        # 4. x2 = conv3x3(x) + b3: dx2 through the scratch buffer, read back shifted.
        db3 = tl.sum(tl.sum(dx2, axis=2), axis=1)
        sbase = pid * K * H * W
        tl.store(scratch_ptr + sbase + c * H * W + i * W + j, dx2, mask=valid)
        tl.debug_barrier()
        row = pid * P  # this tile's row of parameter-gradient partials
        dx2_flat = tl.reshape(dx2, (BK, BH * BW))
        for t in tl.static_range(9):
            di, dj = t // 3 - 1, t % 3 - 1
            xs = tl.reshape(_shifted(x_ptr + base, c, i, j, di, dj, sxc, sxh, sxw, K, H, W, DTYPE),
                            (BK, BH * BW))
            dw3 = tl.dot(dx2_flat.to(DOT), tl.trans(xs).to(DOT), input_precision="ieee",
                         out_dtype=DTYPE)
            tl.store(part_ptr + row + 5 * K + K * K + kk[:, None] * K * 9 + kk[None, :] * 9 + t,
                     dw3,
                     mask=(kk[:, None] < K) & (kk[None, :] < K))
            ds = _shifted(scratch_ptr + sbase, c, i, j, -di, -dj, H * W, W, 1, K, H, W, DTYPE)
            dx += _tap_product(tl.trans(_tap(w3_ptr, kk, t, K, DTYPE)), ds, BK, BH, BW, DOT)
        tl.store(dx_ptr + b * sdb + (g * K + c) * sdc + i * sdh + j * sdw,
                 dx.to(dx_ptr.dtype.element_ty),
                 mask=valid)
        one = kk < K
        tl.store(part_ptr + row + kk, dgamma, mask=one)
        tl.store(part_ptr + row + K + kk, dbeta, mask=one)
        tl.store(part_ptr + row + 2 * K + kk, da1, mask=one)
        tl.store(part_ptr + row + 3 * K + kk, db1, mask=one)
        tl.store(part_ptr + row + 4 * K + kk, db3, mask=one)
        tl.store(part_ptr + row + 5 * K + kk[:, None] * K + kk[None, :], dw1,
                 mask=one[:, None] & one[None, :])


def _launch_args(x, k):
    bk, bh, bw = blocks(k, *x.shape[2:])
    compute = tl.float64 if x.dtype == torch.float64 else tl.float32
    # The 3x3 products on the tensor cores in x's 16-bit dtype (as autocast's convolution), else
    # exact.
    dot = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}.get(x.dtype, compute)
    if interpreted():  # the interpreter's 16-bit tl.dot gives wrong sums: float32 there
        dot = compute
    return dict(BK=bk, BH=bh, BW=bw, DTYPE=compute, DOT=dot,
                num_warps=8 if bk * bh * bw >= 8192 else 4)


def _flat_params(params):
    """The parameters as contiguous tensors (the kernels index them as (k, k) and (k, k, 9))."""
    return [p.contiguous() for p in params]


@torch.library.custom_op("ema::fused", mutates_args=())
def ema_fused(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, gamma: torch.Tensor,
              beta: torch.Tensor,
              w3: torch.Tensor, b3: torch.Tensor, groups: int, eps: float) -> torch.Tensor:
    """EMA's output for x (B, C, H, W) with the shared weights of a group of k = C / groups
    channels."""
    b, channels, h, w = x.shape
    k = channels // groups
    out = _new_like(x)
    _forward_kernel[(b * groups,)](x, out, *_flat_params((w1, b1, gamma, beta, w3, b3)),
                                   *x.stride(),
                                   *out.stride(), groups, k, h, w, eps, **_launch_args(x, k))
    return out


@ema_fused.register_fake
def _(x, w1, b1, gamma, beta, w3, b3, groups, eps):
    return torch.empty_like(x)


# A tile's row of partials: dgamma, dbeta, da1, db1, db3 (k each), dw1 (k x k), dw3 (k x k x 9).


@torch.library.custom_op("ema::fused_backward", mutates_args=())
def ema_fused_backward(grad: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor,
                       gamma: torch.Tensor,
                       beta: torch.Tensor, w3: torch.Tensor, b3: torch.Tensor, groups: int,
                       eps: float) -> list[torch.Tensor]:
    """(dx, dw1, db1, dgamma, dbeta, dw3, db3)."""
    b, channels, h, w = x.shape
    k = channels // groups
    compute = _compute_dtype(x.dtype)
    tiles, width = b * groups, 5 * k + k * k + 9 * k * k
    dx = _new_like(x)
    scratch = _new((tiles, k, h, w), dtype=compute, device=x.device)
    partials = _new((tiles, width), dtype=compute, device=x.device)
    _backward_kernel[(tiles,)](x, grad, dx, scratch, partials,
                               *_flat_params((w1, b1, gamma, beta, w3, b3)),
                               *x.stride(), *grad.stride(), *dx.stride(), groups, k, h, w, eps,
                               width,
                               **_launch_args(x, k))
    sums = partials.sum(0)  # a reduction in a fixed order: deterministic, no atomics
    dgamma, dbeta, da1, db1, db3 = sums[:5 * k].view(5, k)
    dw1 = sums[5 * k:5 * k + k * k].view(k, k)
    dw3 = sums[5 * k + k * k:].view(k, k, 3, 3)
    a1 = beta.to(compute).softmax(0)
    dbeta = dbeta + a1 * (da1 - (a1 * da1).sum())  # a1 = softmax(beta)
    # Copies: the outputs of a custom op may not be views of each other.
    return [dx] + [grad.to(p.dtype, copy=True).view_as(p) for grad, p in
                   ((dw1, w1), (db1, b1), (dgamma, gamma), (dbeta, beta), (dw3, w3), (db3, b3))]


@ema_fused_backward.register_fake
def _(grad, x, w1, b1, gamma, beta, w3, b3, groups, eps):
    return [torch.empty_like(x), torch.empty_like(w1), torch.empty_like(b1),
            torch.empty_like(gamma),
            torch.empty_like(beta), torch.empty_like(w3), torch.empty_like(b3)]


def _setup_context(ctx, inputs, output):
    x, w1, b1, gamma, beta, w3, b3, groups, eps = inputs
    ctx.save_for_backward(x, w1, b1, gamma, beta, w3, b3)
    ctx.groups, ctx.eps = groups, eps


def _backward(ctx, grad):
    grads = ema_fused_backward(grad, *ctx.saved_tensors, ctx.groups, ctx.eps)
    return (*grads, None, None)


ema_fused.register_autograd(_backward, setup_context=_setup_context)
