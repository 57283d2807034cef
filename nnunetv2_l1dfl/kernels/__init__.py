"""Fused L1DFL statistics kernels: numba on CPU, Triton on CUDA.

``fused_bin_statistics`` returns the same :class:`~nnunetv2_l1dfl.kernels._common.BinStatistics` as
``bin_statistics_reference`` (one pass over the logits forward, one pass backward through a custom
``torch.autograd.Function``), or ``None`` when no kernel serves the tensor's device, in which case
the loss falls back to the reference path.

Backward, per element ``(b, c, v)`` in bin ``k`` (the incoming gradients of the statistics are
``g_I, g_U`` of shape (B, C, K) and ``g_F`` a scalar; counts get none):

- softmax: ``G_c = g_I[b,c,k_c] y_c + 2 g_U[b,c,k_c] p_c`` and
  ``dL/dx_c = p_c (G_c - sum_j p_j G_j) + g_F A (delta_ct - p_c)`` with ``t`` the target class and
  ``A = d focal / d log p_t = gamma (1-p_t)^(gamma-1) p_t log p_t - (1-p_t)^gamma``;
- sigmoid (regions): ``dL/dx = (g_I y + 2 g_U p) p (1 - p) + g_F s (1 - p_t) A(p_t)`` with
  ``s = +1`` where ``y = 1`` and ``-1`` elsewhere;
- ignored voxels get a zero gradient.

Both backends partition the work in a fixed way and add float partials in a fixed order (no float
atomics), so results are deterministic; counts are integers.
"""

from __future__ import annotations

import functools
import logging
from types import ModuleType

import torch

from nnunetv2_l1dfl.kernels._common import BinStatistics, compute_dtype

logger = logging.getLogger(__name__)


@functools.cache
def cpu_backend() -> ModuleType | None:
    """The numba backend module, or None when numba is not importable."""
    try:
        from nnunetv2_l1dfl.kernels import cpu
    except ImportError as e:
        logger.warning("numba is not available (%s): L1DFL uses the plain PyTorch path on CPU", e)
        return None
    return cpu


@functools.cache
def cuda_backend() -> ModuleType | None:
    """The Triton backend module, or None when Triton is not importable."""
    try:
        from nnunetv2_l1dfl.kernels import cuda
    except ImportError as e:
        logger.warning("Triton is not available (%s): L1DFL uses the plain PyTorch path on CUDA", e)
        return None
    return cuda


def backend_for(device: torch.device) -> ModuleType | None:
    """The kernel module serving ``device`` (numba for CPU, Triton for CUDA), or None."""
    if device.type == "cpu":
        return cpu_backend()
    if device.type == "cuda":
        return cuda_backend()
    return None


class FusedBinStatistics(torch.autograd.Function):
    """``(counts, intersection, union, focal_sum)`` of the logits in one pass; backward in one pass.

    Inputs: contiguous logits (B, C, ...) in one of ``backend.INPUT_DTYPES`` (the caller casts
    others), target as for ``L1DFLLoss``, the backend module (``kernels.cpu`` or ``kernels.cuda``)
    and the loss settings. Outputs: counts (K,) int64 (not differentiable), intersection and union
    (B, C, K) and focal_sum (), float32 (float64 for float64 logits). The gradient of the logits
    comes back in their dtype; it is not differentiable again (no double backward).
    """

    @staticmethod
    def forward(ctx, logits, target, backend, n_per_unit, gamma, regions, ignore_label):
        options = {"n_per_unit": n_per_unit, "gamma": gamma, "regions": regions, "ignore_label": ignore_label}
        stats, saved = backend.forward(logits, target, **options)
        ctx.backend = backend
        ctx.options = options
        ctx.logits_shape = logits.shape
        ctx.save_for_backward(target, *saved)
        ctx.mark_non_differentiable(stats[0])
        ctx.set_materialize_grads(False)
        return stats

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_counts, g_inter, g_union, g_focal):
        target, *saved = ctx.saved_tensors
        # outputs the loss did not use arrive as None (materialize_grads is off): zeros instead
        shape = (ctx.logits_shape[0], ctx.logits_shape[1], ctx.options["n_per_unit"] + 1)
        incoming = [g for g in (g_inter, g_union, g_focal) if g is not None]
        if not incoming:
            return None, None, None, None, None, None, None
        like = incoming[0]
        g_inter = torch.zeros(shape, dtype=like.dtype, device=like.device) if g_inter is None else g_inter
        g_union = torch.zeros(shape, dtype=like.dtype, device=like.device) if g_union is None else g_union
        g_focal = torch.zeros((), dtype=like.dtype, device=like.device) if g_focal is None else g_focal
        grad = ctx.backend.backward(target, tuple(saved), g_inter, g_union, g_focal, **ctx.options)
        return grad.reshape(ctx.logits_shape), None, None, None, None, None, None


@torch.compiler.disable
def fused_bin_statistics(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    n_per_unit: int,
    gamma: float,
    regions: bool,
    ignore_label: int | None,
):
    """Fused :class:`BinStatistics` of one loss call, or None when no kernel serves ``logits.device``.

    logits (B, C, X, Y[, Z]) of any float dtype: float64 stays float64, every other dtype is
    computed in float32 and its gradient is returned in the logits' dtype (autograd casts it).
    target (B, 1, ...) integer label map (any integer/bool/float dtype; a label outside [0, C) that
    is not the ignore label is a ValueError naming it on CPU, and makes the union and focal sums,
    hence the loss, NaN on CUDA, where a check would stall the host) or, with ``regions``, the (B, R[+1], ...) binary
    region target (nonzero = 1, any dtype) with the ignore mask last when ``ignore_label`` is set.
    ``torch.compile`` does not trace into this function (a graph break): the kernels run eagerly.
    """
    backend = backend_for(logits.device)
    if backend is None:
        return None
    if target.device != logits.device:
        raise ValueError(f"target is on {target.device} but logits are on {logits.device}")
    x = logits if logits.dtype in backend.INPUT_DTYPES else logits.to(compute_dtype(logits))
    x = x.contiguous()
    counts, inter, union, focal = FusedBinStatistics.apply(
        x, target, backend, int(n_per_unit), float(gamma), bool(regions), ignore_label
    )
    return BinStatistics(counts=counts, intersection=inter, union=union, focal_sum=focal)
