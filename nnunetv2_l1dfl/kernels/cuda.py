"""Fused L1DFL statistics on CUDA: Triton kernels, one pass forward and one pass backward.

Grid: (blocks of ``BLOCK`` voxels, sample). Each program reads the C logits of its voxels once,
computes p, the bins and the focal terms in registers, and writes its own partial histogram
(integer counts, float sums of ``p*y`` and ``p^2 + y^2`` per class and bin, focal sum) to a
buffer; PyTorch then adds the partials (integers, and a fixed-shape float reduction), so the
result is deterministic and there are no float atomics and no host synchronization. The per-bin
sums of a block are a reduction of a (voxels x bins) one-hot mask, which needs no atomics either.

The backward recomputes p and the bins from the logits (nothing but the inputs is saved: on a GPU
the memory traffic, not the arithmetic, is the cost) and writes the gradient in the logits' dtype.
Logits may be float16, bfloat16, float32 or float64; arithmetic is float32 (float64 stays float64).

The kernels also run under the Triton interpreter (``TRITON_INTERPRET=1`` set before this module
is imported) on CPU tensors, which is how they are tested on machines without a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
"""Logit dtypes the kernels read directly (no float32 copy of half-precision logits)."""
BLOCK = 512
"""Voxels per program."""
NUM_WARPS = 4


@triton.jit
def _bin_of(g, N_PER_UNIT: tl.constexpr):
    """floor(float64(g) * n + 1/2) clamped to [0, n], as int32 (bin_index of the reference)."""
    k = tl.floor(g.to(tl.float64) * N_PER_UNIT + 0.5).to(tl.int32)
    return tl.minimum(tl.maximum(k, 0), N_PER_UNIT)


@triton.jit
def _int_power(base, EXPONENT: tl.constexpr):
    result = tl.full(base.shape, 1.0, base.dtype)
    for _ in tl.static_range(EXPONENT):
        result = result * base
    return result


@triton.jit
def _focal_terms(q, log_pt, gamma, GAMMA_INT: tl.constexpr):
    """Focal loss f = -q^gamma log p_t and A = df / d log p_t, q = 1 - p_t (see kernels/__init__)."""
    if GAMMA_INT >= 0:
        if GAMMA_INT >= 1:
            q_gm1 = _int_power(q, GAMMA_INT - 1)
            q_g = q_gm1 * q
        else:
            q_gm1 = tl.full(q.shape, 1.0, q.dtype)
            q_g = q_gm1
    else:
        q_pos = q > 0
        q_gm1 = tl.exp((gamma - 1.0) * tl.log(tl.where(q_pos, q, 1.0)))
        q_gm1 = tl.where(q_pos, q_gm1, 0.0)
        q_g = q_gm1 * q
    a = gamma * q_gm1 * (1.0 - q) * log_pt - q_g
    return -q_g * log_pt, a


@triton.jit
def _load_compute(ptr, offs, mask, IS_FP64: tl.constexpr):
    """Logits in the compute dtype: float64 for float64 logits, float32 otherwise.

    One return statement: the compiler types every ``return`` of a function alike, even under a
    constexpr branch (two returns of different dtypes fail to compile; the interpreter accepts them).
    """
    x = tl.load(ptr + offs, mask=mask, other=0.0)
    if IS_FP64:
        x = x.to(tl.float64)
    else:
        x = x.to(tl.float32)
    return x


@triton.jit
def _softmax_block_prologue(
    x_ptr, t_ptr, b64, pid, V, ignore_label,
    C: tl.constexpr, HAS_IGNORE: tl.constexpr, IS_FP64: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Shared start of the softmax kernels for one block of voxels of sample ``b64``: offsets, the
    in-range and valid masks, the labels, the sample's logits base pointer, and the softmax's
    running max and sum of exponentials (recomputed identically forward and backward)."""
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    in_range = offs < V
    label = tl.load(t_ptr + b64 * V + offs, mask=in_range, other=0).to(tl.int32)
    valid = in_range
    if HAS_IGNORE:
        valid = valid & (label != ignore_label)
    x_base = x_ptr + b64 * C * V
    vmax = _load_compute(x_base, offs, in_range, IS_FP64)
    for c in tl.static_range(1, C):
        vmax = tl.maximum(vmax, _load_compute(x_base + c * V, offs, in_range, IS_FP64))
    vsum = tl.zeros_like(vmax)
    for c in tl.static_range(C):
        vsum += tl.exp(_load_compute(x_base + c * V, offs, in_range, IS_FP64) - vmax)
    return offs, in_range, label, valid, x_base, vmax, vsum


@triton.jit
def _softmax_forward_kernel(
    x_ptr, t_ptr, counts_ptr, inter_ptr, union_ptr, focal_ptr,
    V, ignore_label, gamma,
    C: tl.constexpr, N_PER_UNIT: tl.constexpr, KP: tl.constexpr, HAS_IGNORE: tl.constexpr,
    GAMMA_INT: tl.constexpr, IS_FP64: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Partial statistics of one block of voxels of sample b: counts (B, P, KP) int32,
    inter/union (B, P, C, KP), focal (B, P); P = number of blocks per sample."""
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    b64 = tl.program_id(1).to(tl.int64)
    offs, in_range, label, valid, x_base, vmax, vsum = _softmax_block_prologue(
        x_ptr, t_ptr, b64, pid, V, ignore_label, C, HAS_IGNORE, IS_FP64, BLOCK
    )

    bins = tl.arange(0, KP)
    counts = tl.zeros((KP,), tl.int32)
    x_t = tl.zeros_like(vmax)
    p_t = tl.zeros_like(vmax)
    part = (b64 * num_programs + pid) * C * KP
    # A label outside [0, C) that is not the ignore label: NaN in every union and the focal sum of
    # this block, so the loss is NaN (a check on the host would stall it; see docs/method.md).
    no_class = valid & ((label < 0) | (label >= C))
    zero = tl.zeros_like(vmax)
    poison = tl.sum(tl.where(no_class, zero / zero, zero), axis=0)
    for c in tl.static_range(C):
        xc = _load_compute(x_base + c * V, offs, in_range, IS_FP64)
        p = tl.exp(xc - vmax) / vsum
        is_t = label == c
        y = is_t.to(p.dtype)
        k = _bin_of(tl.abs(p - y), N_PER_UNIT)
        onehot = (k[:, None] == bins[None, :]) & valid[:, None]
        counts += tl.sum(onehot.to(tl.int32), axis=0)
        inter = tl.sum(tl.where(onehot, (p * y)[:, None], 0.0), axis=0)
        union = tl.sum(tl.where(onehot, (p * p + y)[:, None], 0.0), axis=0) + poison
        tl.store(inter_ptr + part + c * KP + bins, inter)
        tl.store(union_ptr + part + c * KP + bins, union)
        x_t = tl.where(is_t, xc, x_t)
        p_t = tl.where(is_t, p, p_t)
    log_pt = (x_t - vmax) - tl.log(vsum)
    f, _ = _focal_terms(1.0 - p_t, log_pt, gamma, GAMMA_INT)
    counted = valid & (label >= 0) & (label < C)
    tl.store(counts_ptr + (b64 * num_programs + pid) * KP + bins, counts)
    tl.store(focal_ptr + b64 * num_programs + pid, tl.sum(tl.where(counted, f, 0.0), axis=0) + poison)


@triton.jit
def _softmax_class_terms(
    x_base, g_inter_ptr, g_union_ptr, b64, c, offs, in_range, label, vmax, vsum, V,
    C: tl.constexpr, N_PER_UNIT: tl.constexpr, IS_FP64: tl.constexpr,
):  # fmt: skip
    """Backward terms of class ``c`` for a block: its logit, p, target mask and value, and the
    incoming gradients of the intersection and union sums of the element's (sample, class, bin)."""
    xc = _load_compute(x_base + c * V, offs, in_range, IS_FP64)
    p = tl.exp(xc - vmax) / vsum
    is_t = label == c
    y = is_t.to(p.dtype)
    k = _bin_of(tl.abs(p - y), N_PER_UNIT)
    table = (b64 * C + c) * (N_PER_UNIT + 1) + k
    g_i = tl.load(g_inter_ptr + table, mask=in_range, other=0.0).to(p.dtype)
    g_u = tl.load(g_union_ptr + table, mask=in_range, other=0.0).to(p.dtype)
    return xc, p, is_t, y, g_i, g_u


@triton.jit
def _softmax_backward_kernel(
    x_ptr, t_ptr, g_inter_ptr, g_union_ptr, g_focal_ptr, grad_ptr,
    V, ignore_label, gamma,
    C: tl.constexpr, N_PER_UNIT: tl.constexpr, HAS_IGNORE: tl.constexpr,
    GAMMA_INT: tl.constexpr, IS_FP64: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """grad (B, C, V) in the logits' dtype, recomputing p and the bins from the logits."""
    pid = tl.program_id(0)
    b64 = tl.program_id(1).to(tl.int64)
    offs, in_range, label, valid, x_base, vmax, vsum = _softmax_block_prologue(
        x_ptr, t_ptr, b64, pid, V, ignore_label, C, HAS_IGNORE, IS_FP64, BLOCK
    )
    g_focal = tl.load(g_focal_ptr).to(vmax.dtype)
    # sum_j p_j G_j and the target class's logit and probability
    s_pg = tl.zeros_like(vmax)
    x_t = tl.zeros_like(vmax)
    p_t = tl.zeros_like(vmax)
    for c in tl.static_range(C):
        xc, p, is_t, y, g_i, g_u = _softmax_class_terms(
            x_base, g_inter_ptr, g_union_ptr, b64, c, offs, in_range, label, vmax, vsum, V, C, N_PER_UNIT, IS_FP64
        )
        s_pg += p * (g_i * y + 2.0 * g_u * p)
        x_t = tl.where(is_t, xc, x_t)
        p_t = tl.where(is_t, p, p_t)
    log_pt = (x_t - vmax) - tl.log(vsum)
    _, a = _focal_terms(1.0 - p_t, log_pt, gamma, GAMMA_INT)
    counted = valid & (label >= 0) & (label < C)
    fa = tl.where(counted, g_focal * a, 0.0)
    for c in tl.static_range(C):
        _, p, _, y, g_i, g_u = _softmax_class_terms(
            x_base, g_inter_ptr, g_union_ptr, b64, c, offs, in_range, label, vmax, vsum, V, C, N_PER_UNIT, IS_FP64
        )
        grad = p * (g_i * y + 2.0 * g_u * p - s_pg) + fa * (y - p)
        grad = tl.where(valid, grad, 0.0)
        tl.store(grad_ptr + b64 * C * V + c * V + offs, grad.to(grad_ptr.dtype.element_ty), mask=in_range)


@triton.jit
def _sigmoid_terms(xv, y, gamma, GAMMA_INT: tl.constexpr):
    """p = sigmoid(x), and the focal loss and gradient factor s (1 - p_t) A for a binary y."""
    e = tl.exp(-tl.abs(xv))  # sigmoid(x) and sigmoid(-x) from exp(-|x|), without cancellation
    d = 1.0 + e
    positive = xv >= 0
    p = tl.where(positive, 1.0, e) / d
    is_one = y > 0.5
    q = tl.where(positive == is_one, e, 1.0) / d  # 1 - p_t = sigmoid(-z), z = x if y = 1 else -x
    z = tl.where(is_one, xv, -xv)
    log1p_e = tl.where(d > 1.0, tl.log(d) * (e / (d - 1.0)), e)  # log1p(e), exact for tiny e
    log_pt = -(tl.maximum(-z, 0.0) + log1p_e)
    f, a = _focal_terms(q, log_pt, gamma, GAMMA_INT)
    return p, f, tl.where(is_one, q * a, -(q * a))


@triton.jit
def _load_region_target(t_ptr, offs, mask, dtype):
    """A binary region target (nonzero = 1), as 0.0 / 1.0 in the compute dtype."""
    tv = tl.load(t_ptr + offs, mask=mask, other=0)
    return (tv != 0).to(dtype)


@triton.jit
def _region_block_prologue(
    t_ptr, pid, V,
    R: tl.constexpr, T_CHANNELS: tl.constexpr, HAS_IGNORE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Shared start of the region kernels for block ``pid`` of sample ``program_id(1)``: the sample
    index (int64), the voxel offsets, the in-range mask and the valid mask (in range and not marked
    by the ignore channel, the target's channel R, when there is one)."""
    b64 = tl.program_id(1).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    in_range = offs < V
    valid = in_range
    if HAS_IGNORE:
        ignored = tl.load(t_ptr + (b64 * T_CHANNELS + R) * V + offs, mask=in_range, other=0)
        valid = valid & (ignored == 0)
    return b64, offs, in_range, valid


@triton.jit
def _sigmoid_forward_kernel(
    x_ptr, t_ptr, counts_ptr, inter_ptr, union_ptr, focal_ptr,
    V, gamma,
    R: tl.constexpr, T_CHANNELS: tl.constexpr, N_PER_UNIT: tl.constexpr, KP: tl.constexpr,
    HAS_IGNORE: tl.constexpr, GAMMA_INT: tl.constexpr, IS_FP64: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Region statistics of one block: x (B, R, V), t (B, R[+1], V) with the ignore mask last."""
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    b64, offs, in_range, valid = _region_block_prologue(t_ptr, pid, V, R, T_CHANNELS, HAS_IGNORE, BLOCK)
    bins = tl.arange(0, KP)
    counts = tl.zeros((KP,), tl.int32)
    focal = tl.zeros((BLOCK,), tl.float32)
    if IS_FP64:
        focal = focal.to(tl.float64)
    part = (b64 * num_programs + pid) * R * KP
    for r in tl.static_range(R):
        xv = _load_compute(x_ptr + (b64 * R + r) * V, offs, in_range, IS_FP64)
        y = _load_region_target(t_ptr + (b64 * T_CHANNELS + r) * V, offs, in_range, xv.dtype)
        p, f, _ = _sigmoid_terms(xv, y, gamma, GAMMA_INT)
        k = _bin_of(tl.abs(p - y), N_PER_UNIT)
        onehot = (k[:, None] == bins[None, :]) & valid[:, None]
        counts += tl.sum(onehot.to(tl.int32), axis=0)
        inter = tl.sum(tl.where(onehot, (p * y)[:, None], 0.0), axis=0)
        union = tl.sum(tl.where(onehot, (p * p + y * y)[:, None], 0.0), axis=0)
        tl.store(inter_ptr + part + r * KP + bins, inter)
        tl.store(union_ptr + part + r * KP + bins, union)
        focal += tl.where(valid, f, 0.0)
    tl.store(counts_ptr + (b64 * num_programs + pid) * KP + bins, counts)
    tl.store(focal_ptr + b64 * num_programs + pid, tl.sum(focal, axis=0))


@triton.jit
def _sigmoid_backward_kernel(
    x_ptr, t_ptr, g_inter_ptr, g_union_ptr, g_focal_ptr, grad_ptr,
    V, gamma,
    R: tl.constexpr, T_CHANNELS: tl.constexpr, N_PER_UNIT: tl.constexpr, HAS_IGNORE: tl.constexpr,
    GAMMA_INT: tl.constexpr, IS_FP64: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """grad (B, R, V) = (g_I y + 2 g_U p) p (1 - p) + g_F s (1 - p_t) A; zero where ignored."""
    pid = tl.program_id(0)
    b64, offs, in_range, valid = _region_block_prologue(t_ptr, pid, V, R, T_CHANNELS, HAS_IGNORE, BLOCK)
    num_bins = N_PER_UNIT + 1
    for r in tl.static_range(R):
        xv = _load_compute(x_ptr + (b64 * R + r) * V, offs, in_range, IS_FP64)
        g_focal = tl.load(g_focal_ptr).to(xv.dtype)
        y = _load_region_target(t_ptr + (b64 * T_CHANNELS + r) * V, offs, in_range, xv.dtype)
        p, _, focal_factor = _sigmoid_terms(xv, y, gamma, GAMMA_INT)
        k = _bin_of(tl.abs(p - y), N_PER_UNIT)
        table = (b64 * R + r) * num_bins + k
        g_i = tl.load(g_inter_ptr + table, mask=in_range, other=0.0).to(p.dtype)
        g_u = tl.load(g_union_ptr + table, mask=in_range, other=0.0).to(p.dtype)
        grad = (g_i * y + 2.0 * g_u * p) * p * (1.0 - p) + g_focal * focal_factor
        grad = tl.where(valid, grad, 0.0)
        tl.store(grad_ptr + (b64 * R + r) * V + offs, grad.to(grad_ptr.dtype.element_ty), mask=in_range)


def _gamma_int(gamma: float) -> int:
    """``int(gamma)`` for an integer gamma up to 16 (exact products, compiled in), else -1."""
    return int(gamma) if float(gamma).is_integer() and 0 <= gamma <= 16 else -1


def _target_for_kernel(target: torch.Tensor, regions: bool) -> torch.Tensor:
    """The target as a contiguous tensor the kernels can load.

    bool becomes uint8 (a view); in softmax mode float labels become int32 (truncated like
    ``target.long()``); region targets are read as binary (nonzero = 1) whatever their dtype.
    """
    if target.dtype == torch.bool:
        target = target.view(torch.uint8)
    if target.is_floating_point() and not regions:
        target = target.to(torch.int64).to(torch.int32)
    return target.contiguous()


def forward(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    n_per_unit: int,
    gamma: float,
    regions: bool,
    ignore_label: int | None,
) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, ...]]:
    """One fused pass: ``((counts, intersection, union, focal_sum), saved_for_backward)``.

    logits (B, C, ...) contiguous, any dtype of INPUT_DTYPES; target as for ``L1DFLLoss``.
    Statistics are float32 (float64 for float64 logits); the logits are saved for the backward.
    """
    nb, nc = logits.shape[:2]
    nv = logits[0, 0].numel()
    device = logits.device
    is_fp64 = logits.dtype == torch.float64
    out_dtype = torch.float64 if is_fp64 else torch.float32
    num_bins = n_per_unit + 1
    kp = triton.next_power_of_2(num_bins)
    programs = triton.cdiv(nv, BLOCK)
    counts_part = torch.empty((nb, programs, kp), dtype=torch.int32, device=device)
    inter_part = torch.empty((nb, programs, nc, kp), dtype=out_dtype, device=device)
    union_part = torch.empty((nb, programs, nc, kp), dtype=out_dtype, device=device)
    focal_part = torch.empty((nb, programs), dtype=out_dtype, device=device)
    t = _target_for_kernel(target, regions)
    common = {"N_PER_UNIT": n_per_unit, "KP": kp, "GAMMA_INT": _gamma_int(gamma), "IS_FP64": is_fp64}
    if regions:
        _sigmoid_forward_kernel[(programs, nb)](
            logits, t, counts_part, inter_part, union_part, focal_part, nv, float(gamma),
            R=nc, T_CHANNELS=t.shape[1], HAS_IGNORE=ignore_label is not None,
            BLOCK=BLOCK, num_warps=NUM_WARPS, **common,
        )  # fmt: skip
    else:
        _softmax_forward_kernel[(programs, nb)](
            logits, t, counts_part, inter_part, union_part, focal_part, nv,
            0 if ignore_label is None else int(ignore_label), float(gamma),
            C=nc, HAS_IGNORE=ignore_label is not None, BLOCK=BLOCK, num_warps=NUM_WARPS, **common,
        )  # fmt: skip
    # fixed-shape reductions of the partials: deterministic, no host sync
    counts = counts_part[..., :num_bins].sum(dim=(0, 1), dtype=torch.int64)
    inter = inter_part[..., :num_bins].sum(dim=1, dtype=torch.float64).to(out_dtype)
    union = union_part[..., :num_bins].sum(dim=1, dtype=torch.float64).to(out_dtype)
    focal = focal_part.sum(dtype=torch.float64).to(out_dtype)
    return (counts, inter, union, focal), (logits,)


def backward(
    target: torch.Tensor,
    saved: tuple[torch.Tensor, ...],
    g_inter: torch.Tensor,
    g_union: torch.Tensor,
    g_focal: torch.Tensor,
    *,
    n_per_unit: int,
    gamma: float,
    regions: bool,
    ignore_label: int | None,
) -> torch.Tensor:
    """Gradient of the logits, in their dtype and shape, from the saved logits in one pass."""
    (logits,) = saved
    nb, nc = logits.shape[:2]
    nv = logits[0, 0].numel()
    is_fp64 = logits.dtype == torch.float64
    grad = torch.empty_like(logits)
    t = _target_for_kernel(target, regions)
    table_dtype = torch.float64 if is_fp64 else torch.float32
    gi = g_inter.detach().to(table_dtype).contiguous()
    gu = g_union.detach().to(table_dtype).contiguous()
    gf = g_focal.detach().to(table_dtype).reshape(1)
    programs = triton.cdiv(nv, BLOCK)
    common = {"N_PER_UNIT": n_per_unit, "GAMMA_INT": _gamma_int(gamma), "IS_FP64": is_fp64}
    if regions:
        _sigmoid_backward_kernel[(programs, nb)](
            logits, t, gi, gu, gf, grad, nv, float(gamma),
            R=nc, T_CHANNELS=t.shape[1], HAS_IGNORE=ignore_label is not None,
            BLOCK=BLOCK, num_warps=NUM_WARPS, **common,
        )  # fmt: skip
    else:
        _softmax_backward_kernel[(programs, nb)](
            logits, t, gi, gu, gf, grad, nv, 0 if ignore_label is None else int(ignore_label),
            float(gamma), C=nc, HAS_IGNORE=ignore_label is not None, BLOCK=BLOCK,
            num_warps=NUM_WARPS, **common,
        )  # fmt: skip
    return grad
