"""What the L1DFL loss and its fused kernels share: the statistics type, the compute dtype and the
label check. It imports neither side, so the loss (``losses/l1dfl.py``) and the kernels
(``kernels/__init__.py``, ``cpu.py``, ``cuda.py``) both depend on it and never on each other in a
circle: ``losses.l1dfl -> kernels -> kernels._common`` and ``losses.l1dfl -> kernels._common``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch


class BinStatistics(NamedTuple):
    """What one L1DFL forward needs from the logits (K bins, B samples, C classes or regions).

    counts: (K,) int64, elements per difficulty bin over the whole batch and all classes.
    intersection: (B, C, K) float, sum of ``p * y`` per sample, class and bin.
    union: (B, C, K) float, sum of ``p^2 + y^2`` per sample, class and bin.
    focal_sum: () float, sum over participating elements of the focal term (not yet averaged).
    """

    counts: torch.Tensor
    intersection: torch.Tensor
    union: torch.Tensor
    focal_sum: torch.Tensor


def compute_dtype(logits: torch.Tensor) -> torch.dtype:
    """float64 stays float64 (gradcheck); every other float dtype computes in float32."""
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def check_labels_on_host(target: torch.Tensor | np.ndarray, num_classes: int, ignore_label: int | None) -> None:
    """Raise a ValueError naming the offending values when a label map holds a label outside
    ``[0, num_classes)`` that is not ``ignore_label``. For CPU tensors (or numpy arrays) only.

    Reads the labels through numpy (no PyTorch operator is dispatched; on CPU nothing waits for a
    device). Float labels are truncated toward zero, as ``target.long()`` does. One min/max pass
    when every label is in range; the offending values are only looked for when one is not.
    On CUDA the loss does not call this (it would stall the host); there such a target makes the
    loss NaN instead (see ``docs/method.md``).
    """
    labels = target.detach().numpy() if isinstance(target, torch.Tensor) else np.asarray(target)
    if labels.size == 0:
        return
    if labels.dtype.kind == "f":
        labels = np.trunc(labels)
    elif labels.dtype.kind == "b":
        labels = labels.view(np.uint8)
    if labels.min() >= 0 and labels.max() < num_classes:
        return
    bad = (labels < 0) | (labels >= num_classes)
    if ignore_label is not None:
        bad &= labels != ignore_label
    if not bad.any():
        return
    values = np.unique(labels[bad])
    shown = ", ".join(str(int(v)) for v in values[:5]) + (", ..." if values.size > 5 else "")
    ignore = "no ignore label is set" if ignore_label is None else f"the ignore label is {ignore_label}"
    raise ValueError(
        f"target holds label value(s) {shown} ({int(bad.sum())} voxels) outside [0, {num_classes}) for "
        f"{num_classes} classes, and {ignore}: check the dataset's labels (or set ignore_label)"
    )
