"""Fused L1DFL statistics on CPU: numba kernels, one pass forward and one pass backward.

Work partition: the voxels of each sample are cut into chunks of ``CHUNK_VOXELS``; each chunk
writes its own partial counts (int64) and float64 partial sums, and the partials are then added in
chunk order, so the result is bitwise identical for any number of threads. The chunks are shared
out to ``torch.get_num_threads()`` threads (the calling one and a small pool) running the GIL-free
kernels.

Inside a chunk, blocks of ``BLOCK`` voxels go through short elementwise loops over 1D contiguous
rows (softmax, bins, focal terms) that LLVM vectorizes, using the float32 exp/log of
:mod:`._vecmath`, and then one scalar loop adds every element into its (lane, class, bin) slot.
What keeps the loops vectorizable: no loads under a condition (load both, then select), few arrays
per loop (LLVM gives up when too many pointer pairs need run-time overlap checks), no float
reductions (they would need reassociation). The scalar scatter uses ``LANES`` copies of the
accumulators (consecutive voxels in different copies) so that repeated updates of the same bin do
not form one long dependency chain through memory; ignored voxels go to a discarded slot.

Arithmetic is done in the logits' dtype (float32, or float64 for gradcheck): the constants come in
as a typed array because numba would otherwise promote ``1 - p`` to float64, and the bin of an
element must come from exactly the float32 ``|p - y|`` that the reference bins.

Forward saves the probabilities ``p`` (same size as the logits) and the focal gradient factor (per
voxel for softmax, per element for regions), so the backward is arithmetic only. Compiled code is
cached on disk (``cache=True``): the first call with a new dtype combination compiles for some
seconds, later processes load it.
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from numba import njit

from nnunetv2_l1dfl.kernels._common import check_labels_on_host
from nnunetv2_l1dfl.kernels._vecmath import fexp, flog, flush_denormals_on, restore_fp_state

CHUNK_VOXELS = 16384
"""Voxels per work item. Fixed, so the summation order does not depend on the thread count."""
BLOCK = 512
"""Voxels per vectorized step (its temporaries stay in the L1 cache); divides CHUNK_VOXELS."""
LANES = 4
"""Accumulator copies in the scatter loop (voxel j goes to copy j % LANES)."""

_JIT = {"cache": True, "nogil": True, "fastmath": False, "error_model": "numpy"}


@njit(**_JIT)
def _bin(g, n_per_unit):
    """``floor(float64(g) * n + 1/2)`` clamped to [0, n]: :func:`bin_index` for one element."""
    return min(max(np.int64(np.floor(np.float64(g) * n_per_unit + 0.5)), 0), n_per_unit)


@njit(inline="always", **_JIT)
def _int_power(base, exponent, one):
    """``base ** exponent`` for an integer exponent in [0, 31] by squaring (branch free, vectorizable)."""
    result = one
    square = base
    for bit in range(5):
        result = result * square if (exponent >> bit) & 1 else result
        square = square * square
    return result


@njit(inline="always", **_JIT)
def _focal_terms(q, log_pt, gamma, gamma_int, zero, one):
    """Focal loss ``f = -q^gamma log p_t`` and ``A = df / d log p_t`` for ``q = 1 - p_t``.

    ``A = gamma q^(gamma-1) p_t log p_t - q^gamma``. Integer gamma (``gamma_int >= 0``) uses exact
    products (gamma = 2 gives ``q * q`` like PyTorch); otherwise ``exp((gamma-1) log q)``, with the
    first term of A taken as 0 when q == 0 so that gamma < 1 stays finite.
    """
    if gamma_int >= 0:
        q_gm1 = _int_power(q, max(gamma_int - 1, 0), one)
        q_g = q_gm1 * q if gamma_int >= 1 else one
    else:
        q_pos = q > zero
        q_gm1 = fexp((gamma - one) * flog(q if q_pos else one))
        q_gm1 = q_gm1 if q_pos else zero
        q_g = q_gm1 * q
    a = gamma * q_gm1 * (one - q) * log_pt - q_g
    return -q_g * log_pt, a


@njit(**_JIT)
def _scatter_add(slots, values, acc, n):
    """``acc[slots[j]] += values[j]`` for j < n (scalar: the slots are data dependent)."""
    for j in range(n):
        acc[slots[j]] += values[j]


@njit(**_JIT)
def _scatter_count(slots, acc, n):
    """``acc[slots[j]] += 1`` for j < n."""
    for j in range(n):
        acc[slots[j]] += 1


@njit(**_JIT)
def _sum_lanes(values, acc, n):
    """``acc[j % 8] += values[j]``: a float sum in 8 independent lanes, in a fixed order."""
    full = n - n % 8
    for j0 in range(0, full, 8):
        for lane in range(8):
            acc[lane] += values[j0 + lane]
    for j in range(full, n):
        acc[j - full] += values[j]


@njit(**_JIT)
def _flush_lanes(cnt, inter, union, facc, nc, num_bins, counts_out, inter_out, union_out):
    """Add the lane copies (LANES x C x K slots) of one chunk into its partials; returns the focal sum."""
    stride = nc * num_bins
    for lane in range(LANES):
        for c in range(nc):
            for k in range(num_bins):
                slot = lane * stride + c * num_bins + k
                counts_out[k] += cnt[slot]
                inter_out[c, k] += inter[slot]
                union_out[c, k] += union[slot]
    focal = 0.0
    for lane in range(8):
        focal += facc[lane]
    return focal


@njit(**_JIT)
def _softmax_forward(
    chunk_begin, chunk_end, x, t, consts, gamma_int, n_per_unit, has_ignore, ignore_label, chunk,
    p_out, a_out, counts_part, inter_part, union_part, focal_part,
):  # fmt: skip
    """Softmax statistics of x (B, C, V) with labels t (B, 1, V) into per-chunk partials.

    Also writes p_out (B, C, V) = softmax(x) and a_out (B, V) = A, the focal factor (0 where
    ignored or where the label is no class: such a voxel has y = 0 for every class).
    """
    fp_state = flush_denormals_on()  # subnormals are 100x slower on x86
    zero, one, gamma = consts[0], consts[1], consts[3]
    nb, nc, nv = x.shape
    num_bins = n_per_unit + 1
    num_slots = LANES * nc * num_bins
    discard = num_slots  # ignored voxels are added here and dropped
    chunks_per_sample = (nv + chunk - 1) // chunk
    for ci in range(chunk_begin, chunk_end):
        b = ci // chunks_per_sample
        v0 = (ci % chunks_per_sample) * chunk
        v1 = min(v0 + chunk, nv)
        cnt = np.zeros(num_slots + 1, np.int64)
        inter = np.zeros(num_slots + 1, np.float64)
        union = np.zeros(num_slots + 1, np.float64)
        facc = np.zeros(8, np.float64)
        vmax = np.empty(BLOCK, x.dtype)
        vsum = np.empty(BLOCK, x.dtype)
        x_t = np.empty(BLOCK, x.dtype)
        p_t = np.empty(BLOCK, x.dtype)
        f_buf = np.empty(BLOCK, x.dtype)
        u_buf = np.empty((nc, BLOCK), x.dtype)
        k_buf = np.empty((nc, BLOCK), np.int64)
        k_t = np.empty(BLOCK, np.int64)
        for start in range(v0, v1, BLOCK):
            stop = min(start + BLOCK, v1)
            n = stop - start
            tb = t[b, 0, start:stop]
            x0 = x[b, 0, start:stop]
            for j in range(n):
                vmax[j] = x0[j]
            for c in range(1, nc):
                xc = x[b, c, start:stop]
                for j in range(n):
                    vmax[j] = max(vmax[j], xc[j])
            for j in range(n):
                vsum[j] = zero
            for c in range(nc):
                xc = x[b, c, start:stop]
                pc = p_out[b, c, start:stop]
                for j in range(n):
                    e = fexp(xc[j] - vmax[j])
                    pc[j] = e
                    vsum[j] += e
            for c in range(nc):
                pc = p_out[b, c, start:stop]
                for j in range(n):
                    pc[j] = pc[j] / vsum[j]
            # bins -> slots (lane, class, bin), union terms p^2 + y^2
            for c in range(nc):
                pc = p_out[b, c, start:stop]
                kc = k_buf[c]
                uc = u_buf[c]
                for j in range(n):
                    label = tb[j]
                    y = one if label == c else zero
                    slot = (j % LANES) * (nc * num_bins) + c * num_bins + _bin(abs(pc[j] - y), n_per_unit)
                    kc[j] = discard if has_ignore & (label == ignore_label) else slot
                    uc[j] = pc[j] * pc[j] + y
            # the target class's logit, probability and slot (loads first, then select)
            for j in range(n):
                x_t[j] = zero
                p_t[j] = zero
                k_t[j] = discard
            for c in range(nc):
                xc = x[b, c, start:stop]
                for j in range(n):
                    value = xc[j]
                    old = x_t[j]
                    x_t[j] = value if tb[j] == c else old
            for c in range(nc):
                pc = p_out[b, c, start:stop]
                for j in range(n):
                    value = pc[j]
                    old = p_t[j]
                    p_t[j] = value if tb[j] == c else old
            for c in range(nc):
                kc = k_buf[c]
                for j in range(n):
                    value = kc[j]
                    old = k_t[j]
                    k_t[j] = value if tb[j] == c else old
            for j in range(n):  # log p_t from the logits (log-softmax), into x_t
                x_t[j] = (x_t[j] - vmax[j]) - flog(vsum[j])
            ab = a_out[b, start:stop]
            for j in range(n):
                f, a = _focal_terms(one - p_t[j], x_t[j], gamma, gamma_int, zero, one)
                label = tb[j]
                counted = (label >= 0) & (label < nc) & ((label != ignore_label) | (not has_ignore))
                f_buf[j] = f if counted else zero
                ab[j] = a if counted else zero
            # scalar: add every element into its slot
            for c in range(nc):
                _scatter_count(k_buf[c], cnt, n)
                _scatter_add(k_buf[c], u_buf[c], union, n)
            _scatter_add(k_t, p_t, inter, n)
            _sum_lanes(f_buf, facc, n)
        focal_part[ci] = _flush_lanes(
            cnt, inter, union, facc, nc, num_bins, counts_part[ci], inter_part[ci], union_part[ci]
        )
    restore_fp_state(fp_state)


@njit(**_JIT)
def _softmax_backward(
    chunk_begin, chunk_end, t, p, a, g_inter, g_union, g_focal, consts, n_per_unit, has_ignore, ignore_label, chunk, grad,
):  # fmt: skip
    """grad (B, C, V) of the logits from the saved p (B, C, V) and focal factor a (B, V).

    ``grad_c = p_c (G_c - sum_j p_j G_j) + g_F A (delta_ct - p_c)`` with
    ``G_c = g_I[b, c, k_c] y_c + 2 g_U[b, c, k_c] p_c``; zero for ignored voxels.
    """
    fp_state = flush_denormals_on()  # subnormals are 100x slower on x86
    zero, one, two = consts[0], consts[1], consts[2]
    gf = g_focal[0]
    nb, nc, nv = p.shape
    chunks_per_sample = (nv + chunk - 1) // chunk
    for ci in range(chunk_begin, chunk_end):
        b = ci // chunks_per_sample
        v0 = (ci % chunks_per_sample) * chunk
        v1 = min(v0 + chunk, nv)
        s_pg = np.empty(BLOCK, p.dtype)
        for start in range(v0, v1, BLOCK):
            stop = min(start + BLOCK, v1)
            n = stop - start
            tb = t[b, 0, start:stop]
            for j in range(n):
                s_pg[j] = zero
            # G_c into grad, sum_j p_j G_j into s_pg
            for c in range(nc):
                gi = g_inter[b, c]
                gu = g_union[b, c]
                pc = p[b, c, start:stop]
                gc = grad[b, c, start:stop]
                for j in range(n):
                    y = one if tb[j] == c else zero
                    k = _bin(abs(pc[j] - y), n_per_unit)
                    gc[j] = gi[k] * y + two * gu[k] * pc[j]
                for j in range(n):
                    s_pg[j] += pc[j] * gc[j]
            ab = a[b, start:stop]
            for c in range(nc):
                pc = p[b, c, start:stop]
                gc = grad[b, c, start:stop]
                for j in range(n):
                    label = tb[j]
                    y = one if label == c else zero
                    value = pc[j] * (gc[j] - s_pg[j]) + (gf * ab[j]) * (y - pc[j])
                    gc[j] = zero if has_ignore & (label == ignore_label) else value
    restore_fp_state(fp_state)


@njit(**_JIT)
def _sigmoid_forward(
    chunk_begin, chunk_end, x, t, consts, gamma_int, n_per_unit, has_ignore, chunk,
    p_out, f_out, counts_part, inter_part, union_part, focal_part,
):  # fmt: skip
    """Region (sigmoid) statistics of x (B, R, V); t (B, R[+1], V), the ignore mask last if has_ignore.

    Also writes p_out = sigmoid(x) and f_out = s (1 - p_t) A, the focal gradient per element
    (0 where ignored). The target is binary (nonzero = 1).
    """
    fp_state = flush_denormals_on()  # subnormals are 100x slower on x86
    zero, one, gamma = consts[0], consts[1], consts[3]
    nb, nr, nv = x.shape
    num_bins = n_per_unit + 1
    num_slots = LANES * nr * num_bins
    discard = num_slots
    chunks_per_sample = (nv + chunk - 1) // chunk
    for ci in range(chunk_begin, chunk_end):
        b = ci // chunks_per_sample
        v0 = (ci % chunks_per_sample) * chunk
        v1 = min(v0 + chunk, nv)
        cnt = np.zeros(num_slots + 1, np.int64)
        inter = np.zeros(num_slots + 1, np.float64)
        union = np.zeros(num_slots + 1, np.float64)
        facc = np.zeros(8, np.float64)
        y_buf = np.empty(BLOCK, x.dtype)
        i_buf = np.empty(BLOCK, x.dtype)
        u_buf = np.empty(BLOCK, x.dtype)
        f_buf = np.empty(BLOCK, x.dtype)
        k_buf = np.empty(BLOCK, np.int64)
        for start in range(v0, v1, BLOCK):
            stop = min(start + BLOCK, v1)
            n = stop - start
            mb = t[b, nr if has_ignore else 0, start:stop]
            for r in range(nr):
                xb = x[b, r, start:stop]
                tb = t[b, r, start:stop]
                pb = p_out[b, r, start:stop]
                fb = f_out[b, r, start:stop]
                for j in range(n):
                    y_buf[j] = one if tb[j] != 0 else zero
                for j in range(n):
                    # e = exp(-|x|) gives sigmoid(x) and sigmoid(-x) both without cancellation
                    xv = xb[j]
                    e = fexp(-abs(xv))
                    pb[j] = (one if xv >= zero else e) / (one + e)
                for j in range(n):
                    slot = (j % LANES) * (nr * num_bins) + r * num_bins + _bin(abs(pb[j] - y_buf[j]), n_per_unit)
                    k_buf[j] = discard if has_ignore & (mb[j] != 0) else slot
                for j in range(n):
                    i_buf[j] = pb[j] * y_buf[j]
                    u_buf[j] = pb[j] * pb[j] + y_buf[j] * y_buf[j]
                # p_t = sigmoid(z), z = x where y = 1 else -x; log p_t = -(max(-z, 0) + log1p(exp(-|z|)))
                for j in range(n):
                    xv = xb[j]
                    is_one = y_buf[j] > 0.5
                    e = fexp(-abs(xv))
                    d = one + e
                    q = (e if (xv >= zero) == is_one else one) / d  # 1 - p_t = sigmoid(-z)
                    z = xv if is_one else -xv
                    log1p_e = flog(d) * (e / (d - one)) if d > one else e  # log1p(e), exact for tiny e
                    log_pt = -(max(-z, zero) + log1p_e)
                    f, a = _focal_terms(q, log_pt, gamma, gamma_int, zero, one)
                    f_buf[j] = f
                    fb[j] = q * a if is_one else -(q * a)
                if has_ignore:
                    for j in range(n):
                        masked = mb[j] != 0
                        value = f_buf[j]
                        f_buf[j] = zero if masked else value
                    for j in range(n):
                        masked = mb[j] != 0
                        value = fb[j]
                        fb[j] = zero if masked else value
                _scatter_count(k_buf, cnt, n)
                _scatter_add(k_buf, i_buf, inter, n)
                _scatter_add(k_buf, u_buf, union, n)
                _sum_lanes(f_buf, facc, n)
        focal_part[ci] = _flush_lanes(
            cnt, inter, union, facc, nr, num_bins, counts_part[ci], inter_part[ci], union_part[ci]
        )
    restore_fp_state(fp_state)


@njit(**_JIT)
def _sigmoid_backward(
    chunk_begin, chunk_end, t, p, f, g_inter, g_union, g_focal, consts, n_per_unit, has_ignore, chunk, grad,
):  # fmt: skip
    """grad (B, R, V) = (g_I y + 2 g_U p) p (1 - p) + g_F f; zero where the ignore mask is set."""
    fp_state = flush_denormals_on()  # subnormals are 100x slower on x86
    zero, one, two = consts[0], consts[1], consts[2]
    gf = g_focal[0]
    nb, nr, nv = p.shape
    chunks_per_sample = (nv + chunk - 1) // chunk
    for ci in range(chunk_begin, chunk_end):
        b = ci // chunks_per_sample
        v0 = (ci % chunks_per_sample) * chunk
        v1 = min(v0 + chunk, nv)
        mb = t[b, nr if has_ignore else 0, v0:v1]
        for r in range(nr):
            gi = g_inter[b, r]
            gu = g_union[b, r]
            pb = p[b, r, v0:v1]
            tb = t[b, r, v0:v1]
            fb = f[b, r, v0:v1]
            gb = grad[b, r, v0:v1]
            for j in range(v1 - v0):
                pr = pb[j]
                y = one if tb[j] != 0 else zero
                k = _bin(abs(pr - y), n_per_unit)
                gb[j] = (gi[k] * y + two * gu[k] * pr) * pr * (one - pr) + gf * fb[j]
            if has_ignore:
                for j in range(v1 - v0):
                    masked = mb[j] != 0
                    value = gb[j]
                    gb[j] = zero if masked else value
    restore_fp_state(fp_state)


@njit(**_JIT)
def _reduce_partials(counts_part, inter_part, union_part, focal_part, nb, counts, inter, union, focal):
    """Add the per-chunk partials in chunk order (deterministic) into counts, inter, union, focal[0]."""
    nchunks = counts_part.shape[0]
    chunks_per_sample = nchunks // nb
    counts[:] = 0
    inter[:] = 0
    union[:] = 0
    total = 0.0
    for ci in range(nchunks):
        b = ci // chunks_per_sample
        counts += counts_part[ci]
        inter[b] += inter_part[ci]
        union[b] += union_part[ci]
        total += focal_part[ci]
    focal[0] = total


def _gamma_int(gamma: float) -> int:
    """``int(gamma)`` when gamma is an integer in [0, 31] (exact products), else -1 (exp/log)."""
    return int(gamma) if float(gamma).is_integer() and 0 <= gamma <= 31 else -1


def _target_for_kernel(target: torch.Tensor, regions: bool) -> np.ndarray:
    """The target as a (B, channels, V) numpy array: int16 labels, or uint8 binary regions.

    One target dtype per mode keeps the number of compiled specializations small. int16 is what
    nnU-Net sends for label maps and bool (viewed as uint8) for regions, so those cost nothing;
    other label types are converted (floats truncated like ``target.long()``), other region
    types become ``target != 0``.
    """
    target = target.detach()
    if regions:
        if target.dtype == torch.bool:
            target = target.view(torch.uint8)
        elif target.dtype != torch.uint8:
            target = (target != 0).view(torch.uint8)
    elif target.dtype != torch.int16:
        labels = target.to(torch.int64) if target.is_floating_point() else target
        low, high = int(labels.min()), int(labels.max())
        if low < -(2**15) or high >= 2**15:
            raise ValueError(f"label values must fit in int16, got target values in [{low}, {high}]")
        target = labels.to(torch.int16)
    target = target.contiguous()
    return target.reshape(target.shape[0], target.shape[1], -1).numpy()


@functools.cache
def _thread_pool(pid: int, workers: int) -> ThreadPoolExecutor:
    """Helper threads for the kernels, one pool per process (a forked child makes its own)."""
    del pid  # part of the cache key only
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="l1dfl-kernel")


def _run_chunks(kernel, num_chunks: int, *args) -> None:
    """Run ``kernel(chunk_begin, chunk_end, *args)`` over [0, num_chunks) on torch's thread count.

    The chunks are split into equal contiguous ranges, one per thread (the kernels release the
    GIL); which thread runs a chunk does not change its result. The calling thread runs the first
    range, pool threads the others. Idle pool threads block instead of spinning (OpenMP would keep
    spinning and slow down PyTorch's own threads right after the loss).
    """
    workers = max(1, min(torch.get_num_threads(), num_chunks))
    if workers == 1:
        kernel(0, num_chunks, *args)
        return
    bounds = [num_chunks * i // workers for i in range(workers + 1)]
    pool = _thread_pool(os.getpid(), workers - 1)
    futures = [pool.submit(kernel, bounds[i], bounds[i + 1], *args) for i in range(1, workers)]
    try:
        kernel(bounds[0], bounds[1], *args)
    finally:
        for future in futures:
            future.result()


INPUT_DTYPES = (torch.float32, torch.float64)
"""Logit dtypes the kernels take; the caller casts others (float16, bfloat16) to float32."""


def _consts(gamma: float, dtype: torch.dtype) -> np.ndarray:
    """0, 1, 2 and gamma in the compute dtype (typed constants keep float32 math in float32)."""
    return np.array([0.0, 1.0, 2.0, gamma], dtype=np.float64 if dtype == torch.float64 else np.float32)


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

    logits (B, C, ...) float32 or float64, contiguous, on CPU (the caller converts other dtypes);
    target (B, 1, ...) labels or (B, R[+1], ...) regions. Returns counts (K,) int64, intersection and
    union (B, C, K) and focal_sum () in the logits' dtype, and (p, focal factor) for :func:`backward`.
    """
    nb, nc = logits.shape[:2]
    x = logits.detach().reshape(nb, nc, -1)
    t = _target_for_kernel(target, regions)
    if not regions:  # the kernels would count such a label as "no class": a finite, wrong loss
        check_labels_on_host(t, nc, ignore_label)
    nv = x.shape[2]
    num_bins = n_per_unit + 1
    chunks = nb * ((nv + CHUNK_VOXELS - 1) // CHUNK_VOXELS)
    counts_part = torch.zeros((chunks, num_bins), dtype=torch.int64)
    inter_part = torch.zeros((chunks, nc, num_bins), dtype=torch.float64)
    union_part = torch.zeros((chunks, nc, num_bins), dtype=torch.float64)
    focal_part = torch.zeros((chunks,), dtype=torch.float64)
    partials = (counts_part.numpy(), inter_part.numpy(), union_part.numpy(), focal_part.numpy())
    p = torch.empty_like(x)
    aux = torch.empty_like(x) if regions else torch.empty((nb, nv), dtype=x.dtype)
    consts = _consts(gamma, x.dtype)
    has_ignore = ignore_label is not None
    if regions:
        args = (x.numpy(), t, consts, _gamma_int(gamma), n_per_unit, has_ignore, CHUNK_VOXELS)
        _run_chunks(_sigmoid_forward, chunks, *args, p.numpy(), aux.numpy(), *partials)
    else:
        label = int(ignore_label) if has_ignore else 0
        args = (x.numpy(), t, consts, _gamma_int(gamma), n_per_unit, has_ignore, label, CHUNK_VOXELS)
        _run_chunks(_softmax_forward, chunks, *args, p.numpy(), aux.numpy(), *partials)
    counts = torch.empty((num_bins,), dtype=torch.int64)
    inter = torch.empty((nb, nc, num_bins), dtype=torch.float64)
    union = torch.empty((nb, nc, num_bins), dtype=torch.float64)
    focal = torch.empty((1,), dtype=torch.float64)
    _reduce_partials(*partials, nb, counts.numpy(), inter.numpy(), union.numpy(), focal.numpy())
    stats = (counts, inter.to(x.dtype), union.to(x.dtype), focal.to(x.dtype).reshape(()))
    return stats, (p, aux)


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
    """Gradient of the logits as (B, C, V) in the compute dtype, one pass over what forward saved.

    g_inter, g_union (B, C, K) and g_focal () are the incoming gradients of the statistics;
    gamma is already folded into the saved focal factor.
    """
    del gamma
    p, aux = saved
    t = _target_for_kernel(target, regions)
    nb, _, nv = p.shape
    chunks = nb * ((nv + CHUNK_VOXELS - 1) // CHUNK_VOXELS)
    dtype = p.dtype
    gi = g_inter.detach().to(dtype).contiguous().numpy()
    gu = g_union.detach().to(dtype).contiguous().numpy()
    gf = g_focal.detach().to(dtype).reshape(1).numpy()
    consts = _consts(0.0, dtype)
    grad = torch.empty_like(p)
    has_ignore = ignore_label is not None
    if regions:
        args = (t, p.numpy(), aux.numpy(), gi, gu, gf, consts, n_per_unit, has_ignore, CHUNK_VOXELS)
        _run_chunks(_sigmoid_backward, chunks, *args, grad.numpy())
    else:
        label = int(ignore_label) if has_ignore else 0
        args = (t, p.numpy(), aux.numpy(), gi, gu, gf, consts, n_per_unit, has_ignore, label, CHUNK_VOXELS)
        _run_chunks(_softmax_backward, chunks, *args, grad.numpy())
    return grad
