"""EMA fused: EMA's forward and backward as Triton kernels for CUDA, on the algebra of ema.py.

EMA's large tensors are x, the output and their gradients, (B, C, H, W); everything else is small:
per-channel strips (k x H and k x W per (image, group) tile), per-channel sums, k x 9 window sums
and the shared weights. The kernels stream each tile a chunk of channels at a time, whole maps
only, so that every per-channel statistic (strip sums, GroupNorm's mean and variance, the sums the
backward needs) is computed where its map is held, and nothing larger than a chunk lives in
registers. The small tensors are mixed across channels by the shared weights in PyTorch between
the kernels. Each program writes its own rows of partial sums, and torch sums them in a fixed
order: no float atomics, so two runs on one GPU give the same gradients.

- forward: `_strips_kernel` (row, column and window sums of x), then PyTorch (the gates, the
  channel descriptors, the k -> 1 filter of step 6), then `_forward_kernel` (GroupNorm, step 6's
  map, the gate, the output: two passes over the tile).
- backward: the same first two, then `_backward_maps_kernel` (the gate's map, the gradient that
  reaches it, and per-channel sums of it), PyTorch (the parameters' gradients, and what the
  strips, the window sums and the descriptors pass back), then `_backward_input_kernel` (x's
  gradient, one chunk per program).

`ema_fused(x, ...)` is a torch.library custom op with an autograd formula and a fake (meta)
implementation, so torch.compile traces it without a graph break and CUDA graphs capture it. On the
CPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1), float64 included: that is how
the tests prove them; tests/compile_check.py compiles them for GPUs without one. Without Triton
(the CPU build of torch) this module imports, and `available()` says False. Whether EMA(fused=None)
takes them on a GPU is measured on that GPU (training/ema_kernels.py): `CHOSEN` holds the verdicts.
"""
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU build of torch has no Triton
    triton = None

# A chunk: as many whole maps (in blocks: powers of two) as fit CHUNK values, 4 a thread at 4 warps.
# A larger map takes more warps, up to MAX_MAP values (32 x 32) at 8; a map larger than that (a
# detector's 80 x 80 is 128 x 128 blocks) takes the PyTorch path.
CHUNK = 512
MAX_MAP = 1024
MAX_REGISTERS = 128  # a thread's, at most (a quarter of an SM's 65,536 at 4 warps)
MAX_OFFSET = 2**31  # the kernels index x, its gradient and their buffers in 32-bit integers

# Where EMA(fused=None) takes these kernels on CUDA: {choice_key(x, groups): True or False}, filled
# by a measurement on the GPU at hand (training/ema_kernels.py). An input not in it takes the
# PyTorch path.
CHOSEN: dict = {}


def available() -> bool:
    """Whether Triton is here to run the kernels."""
    return triton is not None


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def blocks(k: int, h: int, w: int) -> tuple[int, int, int]:
    """The kernels' block sizes (chunk channels, rows, columns): powers of two covering the map,
    as many channels as fit CHUNK values, at most the group's k rounded up."""
    bk, bh, bw = (1 << max(0, n - 1).bit_length() for n in (k, h, w))
    return max(1, min(bk, CHUNK // (bh * bw))), bh, bw


def choice_key(x: torch.Tensor, groups: int) -> tuple:
    """The key of CHOSEN for an input x: (channels, height, width, groups, dtype's name)."""
    return (*x.shape[1:], groups, str(x.dtype).removeprefix("torch."))


def unsupported(x: torch.Tensor, groups: int, device_type: str = None):
    """Why the kernels cannot run on x (or on a meta tensor of its shape on device_type), or
    None."""
    device_type = device_type or x.device.type
    if triton is None:
        return "Triton is not installed (the CPU build of torch has none)"
    if x.dim() != 4:
        return f"the kernels take a (B, C, H, W) tensor, got {x.dim()} dimensions"
    if device_type == "cpu" and not interpreted():
        return "on the CPU the kernels run only under Triton's interpreter (TRITON_INTERPRET=1)"
    if device_type not in ("cpu", "cuda"):
        return f"the kernels run on CUDA, not {device_type}"
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        return f"the kernels take floating-point input, got {x.dtype}"
    if max(x.numel(), farthest(x) + 1) > MAX_OFFSET:
        return (f"an input of {x.numel():,} elements (or strides reaching that far) is more than "
                f"the kernels' 32-bit offsets address")
    _, bh, bw = blocks(1, *x.shape[2:])
    if bh * bw > MAX_MAP:
        return (f"a map of {x.shape[2]} x {x.shape[3]} (blocks {bh}x{bw}) is larger than the "
                f"kernels hold ({MAX_MAP} values)")
    return None


def farthest(t: torch.Tensor) -> int:
    """The largest element offset a tensor's strides reach."""
    return sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()) if size)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other dtype computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# every buffer the kernels write is allocated here (the tests poison it)
_new_like = torch.empty_like
_new = torch.empty


if triton is not None:
    @triton.jit
    def _chunk(c0, K, H, W, CB: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr):
        """Indices of a chunk of CB channels from c0, (CB, 1, 1), (1, BH, 1), (1, 1, BW), and
        where it lies inside the tile."""
        c = c0 + tl.arange(0, CB)[:, None, None]
        i = tl.arange(0, BH)[None, :, None]
        j = tl.arange(0, BW)[None, None, :]
        return c, i, j, (c < K) & (i < H) & (j < W)

    @triton.jit
    def _read_by_tap(i, j, di, dj, H, W):
        """Where input pixel (i, j) is read by tap (di, dj) of a 3x3 convolution (zero padding)."""
        return (i - di >= 0) & (i - di < H) & (j - dj >= 0) & (j - dj < W)

    @triton.jit
    def _read_at_tap(xt, c, i, j, di, dj, valid, sxc, sxh, sxw, H, W, DTYPE: tl.constexpr):
        """The chunk's x at (i + di, j + dj), what tap (di, dj) reads for output (i, j); 0 outside
        the map (zero padding)."""
        inside = valid & (i + di >= 0) & (i + di < H) & (j + dj >= 0) & (j + dj < W)
        return tl.load(xt + c * sxc + (i + di) * sxh + (j + dj) * sxw, mask=inside,
                       other=0).to(DTYPE)

    @triton.jit
    def _per_channel(ptr, tile, c0, K, CB: tl.constexpr, DTYPE: tl.constexpr):
        """(CB,) values of a (B * C) buffer for the chunk's channels."""
        c = c0 + tl.arange(0, CB)
        return tl.load(ptr + tile * K + c, mask=c < K, other=0).to(DTYPE)

    @triton.jit
    def _strip_index(c0, K, L, CB: tl.constexpr, BL: tl.constexpr):
        """(CB, 1) channels from c0 and (1, BL) positions along a strip of length L, and where they
        lie inside the tile."""
        c, n = c0 + tl.arange(0, CB)[:, None], tl.arange(0, BL)[None, :]
        return c, n, (c < K) & (n < L)

    @triton.jit
    def _strips(ptr, tile, c0, K, L, CB: tl.constexpr, BL: tl.constexpr, DTYPE: tl.constexpr):
        """A chunk's (CB, BL) strips of a (B * C, L) buffer (rows: L = H, columns: L = W)."""
        c, n, inside = _strip_index(c0, K, L, CB, BL)
        return tl.load(ptr + (tile * K + c) * L + n, mask=inside, other=0).to(DTYPE)

    @triton.jit
    def _store_strips(ptr, values, tile, c0, K, L, CB: tl.constexpr, BL: tl.constexpr):
        c, n, inside = _strip_index(c0, K, L, CB, BL)
        tl.store(ptr + (tile * K + c) * L + n, values, mask=inside)

    @triton.jit
    def _normalized(x, gh, gw, valid, n, eps):
        """Step 3 on a chunk: y = x times both gates, each map normalised by its own mean and
        variance (two passes: exact). (x̂, mean, rstd)."""
        y = x * gh[:, :, None] * gw[:, None, :]
        mu = tl.sum(tl.sum(y, axis=2), axis=1) / n
        d = tl.where(valid, y - mu[:, None, None], 0)
        rstd = 1 / tl.sqrt(tl.sum(tl.sum(d * d, axis=2), axis=1) / n + eps)
        return d * rstd[:, None, None], mu, rstd

    @triton.jit
    def _logits(xt, sxc, sxh, sxw, gh_ptr, gw_ptr, a2_ptr, gamma_ptr, beta_ptr, v_ptr, tile, c0,
                K, H, W, eps, CB: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr,
                DTYPE: tl.constexpr):
        """A chunk's share of step 6's map, (BH, BW): Σ_c a2_c x1_c plus x through the k -> 1
        filter v (9 taps, neighbours read from memory); and the chunk's x."""
        c, i, j, valid = _chunk(c0, K, H, W, CB, BH, BW)
        x = tl.load(xt + c * sxc + i * sxh + j * sxw, mask=valid, other=0).to(DTYPE)
        gh = _strips(gh_ptr, tile, c0, K, H, CB, BH, DTYPE)
        gw = _strips(gw_ptr, tile, c0, K, W, CB, BW, DTYPE)
        xhat, _, _ = _normalized(x, gh, gw, valid, H * W, eps)
        gamma = _per_channel(gamma_ptr, 0, c0, K, CB, DTYPE)
        beta = _per_channel(beta_ptr, 0, c0, K, CB, DTYPE)
        a2 = _per_channel(a2_ptr, tile, c0, K, CB, DTYPE)
        weighted = tl.where(valid, xhat * (a2 * gamma)[:, None, None] + (a2 * beta)[:, None, None],
                            0)
        for t in range(9):  # a loop, not unrolled: one tap's values live at a time
            di, dj = t // 3 - 1, t % 3 - 1
            shifted = _read_at_tap(xt, c, i, j, di, dj, valid, sxc, sxh, sxw, H, W, DTYPE)
            vt = tl.load(v_ptr + c * 9 + t, mask=c < K, other=0).to(DTYPE)
            weighted += vt * shifted
        return tl.sum(weighted, axis=0), x

    @triton.jit
    def _strips_kernel(x_ptr, rows_ptr, cols_ptr, windows_ptr, sxb, sxc, sxh, sxw, G, K, H, W,
                       CB: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr, DTYPE: tl.constexpr):
        """For one chunk of one tile: each map's row sums, column sums, and the sums over the
        pixels each of the 9 taps reads (the window sums)."""
        tile, c0 = tl.program_id(0), tl.program_id(1) * CB
        c, i, j, valid = _chunk(c0, K, H, W, CB, BH, BW)
        x = tl.load(x_ptr + (tile // G) * sxb + (tile % G) * K * sxc + c * sxc + i * sxh
                    + j * sxw, mask=valid, other=0).to(DTYPE)
        _store_strips(rows_ptr, tl.sum(x, axis=2), tile, c0, K, H, CB, BH)
        _store_strips(cols_ptr, tl.sum(x, axis=1), tile, c0, K, W, CB, BW)
        one = c0 + tl.arange(0, CB)
        for t in range(9):  # a loop, not unrolled: one tap's values live at a time
            read = _read_by_tap(i, j, t // 3 - 1, t % 3 - 1, H, W)
            tl.store(windows_ptr + (tile * K + one) * 9 + t,
                     tl.sum(tl.sum(tl.where(read, x, 0), axis=2), axis=1), mask=one < K)

    @triton.jit
    def _forward_kernel(x_ptr, out_ptr, gh_ptr, gw_ptr, a2_ptr, gamma_ptr, beta_ptr, v_ptr,
                        shift_ptr, sxb, sxc, sxh, sxw, sob, soc, soh, sow, G, K, H, W, eps,
                        CB: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr,
                        DTYPE: tl.constexpr):
        """One tile: step 6's map over all channels, its sigmoid (step 7's gate), the output."""
        tile = tl.program_id(0)
        b, g = tile // G, tile % G
        xt = x_ptr + b * sxb + g * K * sxc
        m = tl.zeros((BH, BW), DTYPE) + tl.load(shift_ptr).to(DTYPE)
        for c0 in range(0, K, CB):
            part, _ = _logits(xt, sxc, sxh, sxw, gh_ptr, gw_ptr, a2_ptr, gamma_ptr, beta_ptr,
                              v_ptr, tile, c0, K, H, W, eps, CB, BH, BW, DTYPE)
            m += part
        s = 1 / (1 + tl.exp(-m))
        for c0 in range(0, K, CB):
            c, i, j, valid = _chunk(c0, K, H, W, CB, BH, BW)
            x = tl.load(xt + c * sxc + i * sxh + j * sxw, mask=valid, other=0).to(DTYPE)
            tl.store(out_ptr + b * sob + (g * K + c) * soc + i * soh + j * sow,
                     (x * s[None, :, :]).to(out_ptr.dtype.element_ty), mask=valid)

    @triton.jit
    def _backward_maps_kernel(x_ptr, go_ptr, gh_ptr, gw_ptr, a2_ptr, gamma_ptr, beta_ptr, v_ptr,
                              shift_ptr, s_ptr, dm_ptr, dm_sum_ptr, sxb, sxc, sxh, sxw, sgb, sgc,
                              sgh, sgw, G, K, H, W, eps, CB: tl.constexpr, BH: tl.constexpr,
                              BW: tl.constexpr, DTYPE: tl.constexpr):
        """One tile: the gate s and the gradient dm that reaches its logits, maps that the kernels
        after it read, and dm's sum."""
        tile = tl.program_id(0)
        b, g = tile // G, tile % G
        xt, got = x_ptr + b * sxb + g * K * sxc, go_ptr + b * sgb + g * K * sgc
        m = tl.zeros((BH, BW), DTYPE) + tl.load(shift_ptr).to(DTYPE)
        p = tl.zeros((BH, BW), DTYPE)  # Σ_c go_c·x_c
        for c0 in range(0, K, CB):
            part, x = _logits(xt, sxc, sxh, sxw, gh_ptr, gw_ptr, a2_ptr, gamma_ptr, beta_ptr,
                              v_ptr, tile, c0, K, H, W, eps, CB, BH, BW, DTYPE)
            m += part
            c, i, j, valid = _chunk(c0, K, H, W, CB, BH, BW)
            go = tl.load(got + c * sgc + i * sgh + j * sgw, mask=valid, other=0).to(DTYPE)
            p += tl.sum(go * x, axis=0)
        s = 1 / (1 + tl.exp(-m))
        dm = s * (1 - s) * p  # 0 outside the map, where p is
        map_i, map_j = tl.arange(0, BH)[:, None], tl.arange(0, BW)[None, :]
        on_map = (map_i < H) & (map_j < W)
        tl.store(s_ptr + tile * H * W + map_i * W + map_j, s, mask=on_map)
        tl.store(dm_ptr + tile * H * W + map_i * W + map_j, dm, mask=on_map)
        tl.store(dm_sum_ptr + tile, tl.sum(tl.sum(dm, axis=1), axis=0))

    @triton.jit
    def _backward_channels_kernel(x_ptr, gh_ptr, gw_ptr, a2_ptr, gamma_ptr, dm_ptr, dm_sum_ptr,
                                  mu_ptr, rstd_ptr, a_ptr, dgh_ptr, dgw_ptr, q_ptr, sxb, sxc, sxh,
                                  sxw, G, K, H, W, eps, CB: tl.constexpr, BH: tl.constexpr,
                                  BW: tl.constexpr, DTYPE: tl.constexpr):
        """One chunk of one tile, per channel: GroupNorm's mean and rstd, A = Σ dm·x̂, the gates'
        gradients (GroupNorm's backward), and Q[c, t] = Σ dm·(x_c read by tap t)."""
        tile, c0 = tl.program_id(0), tl.program_id(1) * CB
        c, i, j, valid = _chunk(c0, K, H, W, CB, BH, BW)
        xt = x_ptr + (tile // G) * sxb + (tile % G) * K * sxc
        x = tl.load(xt + c * sxc + i * sxh + j * sxw, mask=valid, other=0).to(DTYPE)
        dm = tl.load(dm_ptr + tile * H * W + i * W + j, mask=(i < H) & (j < W), other=0).to(DTYPE)
        gh = _strips(gh_ptr, tile, c0, K, H, CB, BH, DTYPE)
        gw = _strips(gw_ptr, tile, c0, K, W, CB, BW, DTYPE)
        n = H * W
        xhat, mu, rstd = _normalized(x, gh, gw, valid, n, eps)
        a = tl.sum(tl.sum(dm * xhat, axis=2), axis=1)
        alpha = rstd * _per_channel(a2_ptr, tile, c0, K, CB, DTYPE) * _per_channel(
            gamma_ptr, 0, c0, K, CB, DTYPE)
        # GroupNorm's backward: the gradient reaching y = x·gh·gw, times x
        dy_x = tl.where(valid, alpha[:, None, None] * (
            dm - tl.load(dm_sum_ptr + tile).to(DTYPE) / n - xhat * (a / n)[:, None, None]), 0) * x
        one = c0 + tl.arange(0, CB)
        tl.store(mu_ptr + tile * K + one, mu, mask=one < K)
        tl.store(rstd_ptr + tile * K + one, rstd, mask=one < K)
        tl.store(a_ptr + tile * K + one, a, mask=one < K)
        _store_strips(dgh_ptr, tl.sum(dy_x * gw[:, None, :], axis=2), tile, c0, K, H, CB, BH)
        _store_strips(dgw_ptr, tl.sum(dy_x * gh[:, :, None], axis=1), tile, c0, K, W, CB, BW)
        for t in range(9):  # a loop, not unrolled: one tap's values live at a time
            di, dj = t // 3 - 1, t % 3 - 1
            shifted = _read_at_tap(xt, c, i, j, di, dj, valid, sxc, sxh, sxw, H, W, DTYPE)
            tl.store(q_ptr + (tile * K + one) * 9 + t,
                     tl.sum(tl.sum(dm * shifted, axis=2), axis=1), mask=one < K)

    @triton.jit
    def _backward_input_kernel(x_ptr, go_ptr, dx_ptr, gh_ptr, gw_ptr, a2_ptr, gamma_ptr, v_ptr,
                               s_ptr, dm_ptr, dm_sum_ptr, mu_ptr, rstd_ptr, a_ptr, dxh_ptr,
                               dxw_ptr, dwin_ptr, sxb, sxc, sxh, sxw, sgb, sgc, sgh, sgw,
                               sdb, sdc, sdh, sdw, G, K, H, W, CB: tl.constexpr,
                               BH: tl.constexpr, BW: tl.constexpr, DTYPE: tl.constexpr):
        """x's gradient for one chunk of one tile, every path summed: the output's gate, GroupNorm
        (through the gates' product), step 6's filter (dm read back shifted), the window sums of
        the descriptors a2, and the strips of the gates."""
        tile, c0 = tl.program_id(0), tl.program_id(1) * CB
        b, g = tile // G, tile % G
        c, i, j, valid = _chunk(c0, K, H, W, CB, BH, BW)
        x = tl.load(x_ptr + b * sxb + (g * K + c) * sxc + i * sxh + j * sxw, mask=valid,
                    other=0).to(DTYPE)
        go = tl.load(go_ptr + b * sgb + (g * K + c) * sgc + i * sgh + j * sgw, mask=valid,
                     other=0).to(DTYPE)
        maps = tile * H * W + i * W + j  # (1, BH, BW)
        on_map = (i < H) & (j < W)
        s = tl.load(s_ptr + maps, mask=on_map, other=0).to(DTYPE)
        dm = tl.load(dm_ptr + maps, mask=on_map, other=0).to(DTYPE)
        gh = _strips(gh_ptr, tile, c0, K, H, CB, BH, DTYPE)
        gw = _strips(gw_ptr, tile, c0, K, W, CB, BW, DTYPE)
        mu = _per_channel(mu_ptr, tile, c0, K, CB, DTYPE)
        rstd = _per_channel(rstd_ptr, tile, c0, K, CB, DTYPE)
        a = _per_channel(a_ptr, tile, c0, K, CB, DTYPE)
        alpha = rstd * _per_channel(a2_ptr, tile, c0, K, CB, DTYPE) * _per_channel(
            gamma_ptr, 0, c0, K, CB, DTYPE)
        n = H * W
        gates = gh[:, :, None] * gw[:, None, :]
        xhat = (x * gates - mu[:, None, None]) * rstd[:, None, None]
        dy = alpha[:, None, None] * (dm - tl.load(dm_sum_ptr + tile).to(DTYPE) / n
                                     - xhat * (a / n)[:, None, None])
        dx = go * s + dy * gates + _strips(dxh_ptr, tile, c0, K, H, CB, BH, DTYPE)[:, :, None]
        dx += _strips(dxw_ptr, tile, c0, K, W, CB, BW, DTYPE)[:, None, :]
        for t in range(9):  # a loop, not unrolled: one tap's values live at a time
            di, dj = t // 3 - 1, t % 3 - 1
            read = _read_by_tap(i, j, di, dj, H, W)
            back = tl.load(dm_ptr + tile * H * W + (i - di) * W + (j - dj), mask=read & on_map,
                           other=0).to(DTYPE)
            vt = tl.load(v_ptr + c * 9 + t, mask=c < K, other=0).to(DTYPE)
            wt = tl.load(dwin_ptr + (tile * K + c) * 9 + t, mask=c < K, other=0).to(DTYPE)
            dx += vt * back + tl.where(read, wt, 0)
        tl.store(dx_ptr + b * sdb + (g * K + c) * sdc + i * sdh + j * sdw,
                 dx.to(dx_ptr.dtype.element_ty), mask=valid)


# The kernels that loop over a tile's chunks: left to itself, ptxas holds them at 80 registers and
# spills (fp16); bounded at MAX_REGISTERS, they do not (tests/compile_check.py).
LOOPING = ("_forward_kernel", "_backward_maps_kernel")


def launch_settings(cb: int, bh: int, bw: int, kernel: str) -> dict:
    """Triton's options for launching `kernel` at these blocks: its warps, one stage (no software
    pipelining of the loads, which would hold a chunk per stage), and the looping kernels' register
    bound."""
    settings = dict(num_warps=warps(cb * bh * bw), num_stages=1)
    if kernel in LOOPING:
        settings["maxnreg"] = MAX_REGISTERS
    return settings


def warps(chunk: int) -> int:
    """Warps for a chunk of that many values: 4 values a thread."""
    return max(4, chunk // 128)


class _Small:
    """The small tensors both directions share, for x (B, C, H, W) in groups of k channels, in the
    compute dtype: row, column and window sums (B, G, k, H | W | 9), the gates (B * C, H | W), the
    descriptors a1 (k) and a2 (B, G, k), step 6's k -> 1 filter v (k, 9) and its constant a1·b3."""

    def __init__(self, x, w1, b1, gamma, beta, w3, b3, groups):
        b, channels, h, w = x.shape
        k, compute = channels // groups, _compute_dtype(x.dtype)
        self.k, self.h, self.w = k, h, w
        self.blocks = blocks(k, h, w)
        self.params = [p.to(compute).contiguous() for p in (w1, b1, gamma, beta, w3, b3)]
        w1, b1, gamma, beta, w3, b3 = self.params
        self.rows = _new((b, groups, k, h), dtype=compute, device=x.device)
        self.cols = _new((b, groups, k, w), dtype=compute, device=x.device)
        self.windows = _new((b, groups, k, 9), dtype=compute, device=x.device)
        self.chunks = (b * groups, triton.cdiv(k, self.blocks[0]))
        _strips_kernel[self.chunks](x, self.rows, self.cols, self.windows, *x.stride(), groups,
                                    k, h, w, **self.launch("_strips_kernel"))
        # 2. the shared 1x1 convolution on the strip means, and a sigmoid
        self.means = torch.cat([self.rows / w, self.cols / h], dim=3)
        gates = (w1.view(k, k) @ self.means + b1[:, None]).sigmoid()
        self.gh, self.gw = (part.contiguous() for part in gates.split([h, w], dim=3))
        # 5. a1 = softmax(GroupNorm's bias); a2 = softmax of the 3x3 branch's map means
        self.a1 = beta.softmax(0)
        w3 = w3.view(k, k, 9)
        self.w3 = w3
        self.a2 = (b3 + torch.einsum("cdt,bgdt->bgc", w3, self.windows) / (h * w)).softmax(-1)
        # 6. a1ᵀ·x2 is x through the one filter v = a1ᵀ·W3, plus a1·b3
        self.v = torch.einsum("c,cdt->dt", self.a1, w3).contiguous()
        self.shift = (self.a1 @ b3).reshape(1)

    def launch(self, kernel: str) -> dict:
        """The blocks, the compute dtype, and Triton's options for launching `kernel`."""
        cb, bh, bw = self.blocks
        compute = tl.float64 if self.rows.dtype == torch.float64 else tl.float32
        return dict(CB=cb, BH=bh, BW=bw, DTYPE=compute, **launch_settings(cb, bh, bw, kernel))


@torch.library.custom_op("ema::fused", mutates_args=())
def ema_fused(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, gamma: torch.Tensor,
              beta: torch.Tensor, w3: torch.Tensor, b3: torch.Tensor, groups: int,
              eps: float) -> torch.Tensor:
    """EMA's output for x (B, C, H, W) with the shared weights of a group of k = C / groups
    channels."""
    with torch.autocast(x.device.type, enabled=False):  # the glue in the compute dtype, always
        small = _Small(x, w1, b1, gamma, beta, w3, b3, groups)
    _, gamma, beta, _, _ = small.params[1:]
    out = _new_like(x)
    _forward_kernel[(x.shape[0] * groups,)](
        x, out, small.gh, small.gw, small.a2, gamma, beta, small.v, small.shift, *x.stride(),
        *out.stride(), groups, small.k, small.h, small.w, eps, **small.launch("_forward_kernel"))
    return out


@ema_fused.register_fake
def _(x, w1, b1, gamma, beta, w3, b3, groups, eps):
    return torch.empty_like(x)


@torch.library.custom_op("ema::fused_backward", mutates_args=())
def ema_fused_backward(grad: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor,
                       gamma: torch.Tensor, beta: torch.Tensor, w3: torch.Tensor,
                       b3: torch.Tensor, groups: int, eps: float) -> list[torch.Tensor]:
    """(dx, dw1, db1, dgamma, dbeta, dw3, db3)."""
    with torch.autocast(x.device.type, enabled=False):
        return _backward(grad, x, w1, b1, gamma, beta, w3, b3, groups, eps)


def _backward(grad, x, w1, b1, gamma, beta, w3, b3, groups, eps):
    if farthest(grad) >= MAX_OFFSET:  # e.g. a gradient broadcast from a sum: x's checks hold
        grad = grad.contiguous()
    small = _Small(x, w1, b1, gamma, beta, w3, b3, groups)
    w1_, _, gamma_, beta_, _, b3_ = small.params
    b, _, h, w = x.shape
    k, n, tiles, compute = small.k, h * w, b * groups, small.rows.dtype

    def new(*size):
        return _new(size, dtype=compute, device=x.device)

    s, dm, dm_sum = new(tiles, h, w), new(tiles, h, w), new(b, groups)
    _backward_maps_kernel[(tiles,)](
        x, grad, small.gh, small.gw, small.a2, gamma_, beta_, small.v, small.shift, s, dm, dm_sum,
        *x.stride(), *grad.stride(), groups, k, h, w, eps,
        **small.launch("_backward_maps_kernel"))
    mu, rstd, a, q = new(b, groups, k), new(b, groups, k), new(b, groups, k), new(b, groups, k, 9)
    dgh, dgw = new(b, groups, k, h), new(b, groups, k, w)
    _backward_channels_kernel[small.chunks](
        x, small.gh, small.gw, small.a2, gamma_, dm, dm_sum, mu, rstd, a, dgh, dgw, q, *x.stride(),
        groups, k, h, w, eps, **small.launch("_backward_channels_kernel"))
    a1, a2, w3_ = small.a1, small.a2, small.w3
    # 6 and 5: the descriptors. a2 weighs x1 = x̂·gamma + beta, whose sum with dm is gamma·A +
    # beta·Σdm; the softmax passes it to a2's logits z, the 3x3 branch's map means.
    da2 = gamma_ * a + beta_ * dm_sum[..., None]
    dz = a2 * (da2 - (a2 * da2).sum(-1, keepdim=True))
    dgamma, total = (a2 * a).sum((0, 1)), dm_sum.sum()
    dv = q.sum((0, 1))  # step 6's filter v = a1ᵀ·W3, and its constant a1·b3
    dw3 = a1[:, None, None] * dv + torch.einsum("bgc,bgdt->cdt", dz, small.windows) / n
    db3 = dz.sum((0, 1)) + a1 * total
    da1 = torch.einsum("cdt,dt->c", w3_, dv) + b3_ * total
    dbeta = (a2 * dm_sum[..., None]).sum((0, 1)) + a1 * (da1 - (a1 * da1).sum())
    dwindows = (torch.einsum("cdt,bgc->bgdt", w3_, dz) / n).contiguous()
    # 2. the gates' sigmoid, the shared 1x1 convolution, the strip means
    dpre = torch.cat([dgh * small.gh * (1 - small.gh), dgw * small.gw * (1 - small.gw)], dim=3)
    dw1 = torch.einsum("bgcp,bgdp->cd", dpre, small.means)
    db1 = dpre.sum((0, 1, 3))
    dmeans = w1_.view(k, k).T @ dpre
    dxh, dxw = (dmeans[..., :h] / w).contiguous(), (dmeans[..., h:] / h).contiguous()
    dx = _new_like(x)
    _backward_input_kernel[small.chunks](
        x, grad, dx, small.gh, small.gw, a2, gamma_, small.v, s, dm, dm_sum, mu, rstd, a, dxh, dxw,
        dwindows, *x.stride(), *grad.stride(), *dx.stride(), groups, k, h, w,
        **small.launch("_backward_input_kernel"))
    # Copies: the outputs of a custom op may not be views of each other.
    return [dx] + [grad.to(p.dtype, copy=True).view_as(p) for grad, p in
                   ((dw1, w1), (db1, b1), (dgamma, gamma), (dbeta, beta), (dw3, w3), (db3, b3))]


@ema_fused_backward.register_fake
def _(grad, x, w1, b1, gamma, beta, w3, b3, groups, eps):
    return [torch.empty_like(x), torch.empty_like(w1), torch.empty_like(b1),
            torch.empty_like(gamma), torch.empty_like(beta), torch.empty_like(w3),
            torch.empty_like(b3)]


def _setup_context(ctx, inputs, output):
    x, w1, b1, gamma, beta, w3, b3, groups, eps = inputs
    ctx.save_for_backward(x, w1, b1, gamma, beta, w3, b3)
    ctx.groups, ctx.eps = groups, eps


def _autograd_backward(ctx, grad):
    grads = ema_fused_backward(grad, *ctx.saved_tensors, ctx.groups, ctx.eps)
    return (*grads, None, None)


ema_fused.register_autograd(_autograd_backward, setup_context=_setup_context)
