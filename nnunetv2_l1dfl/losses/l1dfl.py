"""The L1-weighted Dice Focal Loss (L1DFL) of Dzikunu et al. (arXiv 2502.02756), for nnU-Net v2.

``L1DFL = WDL + FL``:

- difficulty of every element ``g = |p - y|`` (no gradient), ``p = softmax(logits)`` (or sigmoid for
  region-based training), ``y`` the one-hot target;
- ``K = 1/bin_width + 1`` bins centred on ``k * bin_width``; bin ``k`` covers
  ``[max(c_k - w/2, 0), min(c_k + w/2, 1))`` (the last one also holds 1.0), so the first and last
  bins are half as wide;
- ``count_k`` over the whole batch and all classes (ignored voxels excluded), ``N = sum_k count_k``,
  density ``GD_k = count_k / width_k``, weight ``beta_k = N / GD_k``;
- weighted squared-denominator Dice per sample and class, background included:
  ``WDL = 1 - mean_bc (2 sum beta p y + s) / (sum beta (p^2 + y^2) + s)``;
- focal term as MONAI ``FocalLoss(gamma, use_softmax=True)``: ``sum -(1 - p)^gamma y log p / N``.

Because ``beta`` only depends on an element's bin, the forward pass needs nothing but, per bin,
the integer count and, per (sample, class, bin), the sums of ``p*y`` and ``p^2 + y^2``
(:class:`BinStatistics`). Those statistics come from a fused kernel (``nnunetv2_l1dfl.kernels``:
numba on CPU, Triton on CUDA) or from :func:`bin_statistics_reference`, the plain PyTorch version
that is also the reference the kernels are tested against. Everything after them (weights, Dice,
reductions, DDP) is :func:`reduce_bin_statistics`, written once.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

# BinStatistics and compute_dtype live below both this module and the kernels (one-way imports);
# they stay importable from here.
from nnunetv2_l1dfl.kernels._common import BinStatistics, check_labels_on_host, compute_dtype

Backend = Literal["auto", "fused", "reference"]


def bins_per_unit(bin_width: float) -> int:
    """Return ``1 / bin_width`` as an integer, or raise when ``bin_width`` does not divide 1.

    A width that does not divide [0, 1] would give overlapping or gapped bins, so it is rejected.
    """
    if isinstance(bin_width, bool) or not isinstance(bin_width, (int, float)) or not math.isfinite(bin_width):
        raise ValueError(f"bin_width must be a number in (0, 1] that divides 1, got {bin_width!r}")
    if not 0 < bin_width <= 1:
        raise ValueError(f"bin_width must lie in (0, 1] and divide 1 (e.g. 0.05, 0.1, 0.2), got {bin_width}")
    n = round(1.0 / bin_width)
    if abs(n * bin_width - 1.0) > 1e-9:
        raise ValueError(
            f"bin_width must divide 1 exactly (1/bin_width an integer, e.g. 0.05, 0.1, 0.2, 0.25, 0.5), "
            f"got {bin_width} (1/bin_width = {1.0 / bin_width:.6g})"
        )
    return n


def bin_widths(n_per_unit: int, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """Effective widths of the ``n_per_unit + 1`` bins: ``w/2, w, ..., w, w/2`` (one bin of width 1 if n=1)."""
    w = 1.0 / n_per_unit
    widths = torch.full((n_per_unit + 1,), w, dtype=dtype, device=device)
    widths[0] = w / 2
    widths[-1] = w / 2
    return widths


def bin_index(g: torch.Tensor, n_per_unit: int) -> torch.Tensor:
    """Bin of each difficulty ``g`` in [0, 1]: ``floor(g * n + 1/2)`` as int64.

    Evaluated in float64: for float32 ``g`` the product and the sum are then exact, so an element
    exactly on an edge ``(k + 1/2) / n`` lands in bin ``k + 1`` (bins are closed on the left) and
    ``g = 1`` in the last bin, with no rounding surprises near edges.
    """
    return torch.floor(g.to(torch.float64) * n_per_unit + 0.5).to(torch.int64)


def check_shapes(logits: torch.Tensor, target: torch.Tensor, regions: bool, ignore_label: int | None) -> None:
    """Raise a ValueError naming both shapes when logits and target do not fit together."""
    if logits.ndim not in (4, 5):
        raise ValueError(f"logits must be (B, C, X, Y) or (B, C, X, Y, Z), got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be a floating point tensor, got {logits.dtype}")
    if target.ndim != logits.ndim or target.shape[0] != logits.shape[0] or target.shape[2:] != logits.shape[2:]:
        raise ValueError(
            f"target shape {tuple(target.shape)} does not match logits shape {tuple(logits.shape)}: "
            "expected the same batch size and spatial shape"
        )
    if logits.numel() == 0:
        raise ValueError(
            f"logits of shape {tuple(logits.shape)} hold no elements (batch size 0, no class or a spatial "
            "dimension of size 0): the loss of an empty batch is undefined"
        )
    if regions:
        expected = logits.shape[1] + (1 if ignore_label is not None else 0)
        if target.shape[1] != expected:
            raise ValueError(
                f"region-based target must have {expected} channels (one per region"
                f"{' plus the ignore mask last' if ignore_label is not None else ''}), got target shape "
                f"{tuple(target.shape)} for logits shape {tuple(logits.shape)}"
            )
    else:
        if logits.shape[1] < 2:
            raise ValueError(f"softmax L1DFL needs C >= 2 classes (background included), got logits {tuple(logits.shape)}")
        if target.shape[1] != 1:
            raise ValueError(
                f"target must be a label map of shape (B, 1, ...), got {tuple(target.shape)} "
                f"for logits {tuple(logits.shape)}"
            )


def _probabilities_and_target(
    logits: torch.Tensor, target: torch.Tensor, regions: bool, ignore_label: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Return p, y (both (B, C, ...)), the valid mask (B, 1, ...), the logits in the compute dtype
    and, for label maps, the mask (B, 1, ...) of labels outside [0, C) that are not the ignore label
    (None for regions).

    Such labels get class 0 here so that the one-hot scatter stays in bounds (on CUDA an
    out-of-bounds scatter is a device-side assert); :func:`bin_statistics_reference` then makes
    the statistics NaN. On CPU it raises before, naming the labels.
    """
    x = logits.to(compute_dtype(logits))
    if regions:
        if ignore_label is not None:
            valid = target[:, -1:] == 0
            y = target[:, :-1].to(x.dtype)
        else:
            valid = torch.ones_like(target[:, :1], dtype=torch.bool)
            y = target.to(x.dtype)
        p = torch.sigmoid(x)
        return p, y, valid, x, None
    labels = target[:, 0].long()
    invalid = (labels < 0) | (labels >= x.shape[1])
    if ignore_label is not None:
        valid = (labels != ignore_label)[:, None]
        invalid = invalid & valid[:, 0]
        labels = torch.where(valid[:, 0] & ~invalid, labels, torch.zeros_like(labels))
    else:
        valid = torch.ones_like(labels, dtype=torch.bool)[:, None]
        labels = torch.where(invalid, torch.zeros_like(labels), labels)
    y = torch.zeros_like(x).scatter_(1, labels[:, None], 1.0)
    p = torch.softmax(x, dim=1)
    return p, y, valid, x, invalid[:, None]


def focal_elementwise(x: torch.Tensor, y: torch.Tensor, gamma: float, regions: bool) -> torch.Tensor:
    """Per-element focal loss ``-(1 - p_t)^gamma log p_t`` (B, C, ...), alpha unused.

    Softmax: nonzero only for the target class (MONAI ``softmax_focal_loss`` on a one-hot target).
    Sigmoid: ``p_t = sigmoid(z)`` with ``z = x`` where ``y = 1`` and ``-x`` where ``y = 0``
    (MONAI ``sigmoid_focal_loss`` for a binary target).
    """
    if regions:
        z = torch.where(y > 0.5, x, -x)
        log_pt = nn.functional.logsigmoid(z)
        one_minus_pt = torch.sigmoid(-z)
        return -(one_minus_pt**gamma) * log_pt
    log_p = torch.log_softmax(x, dim=1)
    return -((1 - log_p.exp()) ** gamma) * log_p * y


def bin_statistics_reference(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    n_per_unit: int,
    gamma: float,
    regions: bool = False,
    ignore_label: int | None = None,
) -> BinStatistics:
    """Plain PyTorch :class:`BinStatistics`, differentiable by autograd; the reference for the kernels.

    One masked reduction per bin (K of them): deterministic on every device, no host sync, no
    data-dependent shapes. Memory is a few full-size temporaries; the fused kernels avoid them.

    A label map with a label outside [0, C) that is not ``ignore_label``: on CPU a ValueError
    naming the label; on other devices, where looking would stall the host, every union sum and
    the focal sum become NaN, so the loss is NaN (nnU-Net then logs a NaN train loss).
    """
    if not regions and target.device.type == "cpu":
        check_labels_on_host(target[:, 0], logits.shape[1], ignore_label)
    p, y, valid, x, invalid = _probabilities_and_target(logits, target, regions, ignore_label)
    num_bins = n_per_unit + 1
    bins = bin_index((p - y).abs().detach(), n_per_unit)
    valid_f = valid.to(p.dtype)
    py = p * y * valid_f
    union_elements = (p * p + y * y) * valid_f
    focal = focal_elementwise(x, y, gamma, regions) * valid_f
    if invalid is not None:  # NaN where a label is no class (NaN * 0 stays NaN in every bin's sum)
        poison = torch.where(invalid, torch.full_like(valid_f, float("nan")), torch.zeros_like(valid_f))
        union_elements = union_elements + poison
        focal = focal + poison

    counts, inter, union = [], [], []
    valid_b = valid.expand_as(bins)
    for k in range(num_bins):
        in_bin = (bins == k) & valid_b
        counts.append(in_bin.sum())
        in_bin_f = in_bin.to(p.dtype)
        inter.append((py * in_bin_f).flatten(2).sum(-1))
        union.append((union_elements * in_bin_f).flatten(2).sum(-1))
    return BinStatistics(
        counts=torch.stack(counts).to(torch.int64),
        intersection=torch.stack(inter, dim=-1),
        union=torch.stack(union, dim=-1),
        focal_sum=focal.sum(),
    )


def bin_weights(counts: torch.Tensor, n_per_unit: int, weighted: bool = True) -> torch.Tensor:
    """``beta_k = N / (count_k / width_k)`` in float64, 0 for empty bins; all ones when not ``weighted``."""
    if not weighted:
        return torch.ones(counts.shape, dtype=torch.float64, device=counts.device)
    counts_f = counts.to(torch.float64)
    total = counts_f.sum()
    widths = bin_widths(n_per_unit, device=counts.device)
    return torch.where(counts > 0, total * widths / counts_f.clamp_min(1.0), torch.zeros_like(counts_f))


def _is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def reduce_bin_statistics(
    stats: BinStatistics,
    *,
    n_per_unit: int,
    smooth: float,
    batch_dice: bool,
    ddp: bool,
    weighted: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn :class:`BinStatistics` into ``(weighted Dice loss, focal loss)``, scalars of the compute dtype.

    Under DDP (``ddp=True`` and a process group initialized) the counts are all-reduced (detached,
    integers) so every rank weights with the global histogram; the focal sum is divided by
    ``N_global / world_size`` so that DDP's gradient averaging yields the global mean; with
    ``batch_dice`` the weighted Dice sums are gathered with gradient like nnU-Net's own Dice.
    """
    counts = stats.counts
    distributed = ddp and _is_distributed()
    if distributed:
        counts = counts.clone()
        torch.distributed.all_reduce(counts)
    beta = bin_weights(counts, n_per_unit, weighted).to(stats.intersection.dtype)
    intersection = (stats.intersection * beta).sum(-1)  # (B, C)
    union = (stats.union * beta).sum(-1)
    if batch_dice:
        if distributed:
            from nnunetv2.utilities.ddp_allgather import AllGatherGrad

            intersection = AllGatherGrad.apply(intersection).flatten(0, 1)
            union = AllGatherGrad.apply(union).flatten(0, 1)
        intersection = intersection.sum(0, keepdim=True)
        union = union.sum(0, keepdim=True)
    dice = (2 * intersection + smooth) / (union + smooth)
    dice_loss = 1 - dice.mean()

    n_elements = counts.sum().to(stats.focal_sum.dtype)
    if distributed:
        n_elements = n_elements / torch.distributed.get_world_size()
    focal_loss = stats.focal_sum / n_elements.clamp_min(1.0)
    out_dtype = stats.intersection.dtype  # float32, or float64 for float64 logits
    return dice_loss.to(out_dtype), focal_loss.to(out_dtype)


class L1DFLLoss(nn.Module):
    """L1-weighted Dice Focal Loss on nnU-Net shapes.

    Args:
        bin_width: width of the difficulty bins; must divide 1 (paper: 0.1; grid 0.05, 0.1, 0.2).
        gamma: focal exponent, >= 0 (paper: 2; grid 1, 2, 5).
        smooth: Dice smoothing ``s`` (published code: 1e-8).
        ignore_label: label value (softmax) to leave out of the histogram, N, Dice and focal term;
            for ``regions`` any non-None value means the target's last channel is the ignore mask.
        regions: nnU-Net region-based training: sigmoid outputs and a (B, R, ...) binary target.
        batch_dice: Dice sums over the batch per class instead of per sample and class.
        ddp: under ``torch.distributed`` (only when a process group is initialized; otherwise it
            changes nothing), use the global histogram (and gathered Dice sums with ``batch_dice``),
            so N ranks equal one process on the concatenated batch. Default True, like nnU-Net's
            ``MemoryEfficientSoftDiceLoss``; False gives each rank its own histogram.
        weighted: False gives the paper's DFL baseline (all weights 1).
        focal: False leaves the focal term out (the paper's DL baseline with ``weighted=False``).
        backend: "auto" (fused kernel when one exists for the device, else reference), "fused"
            (error if none), "reference" (plain PyTorch, autograd backward).

    Shapes: ``logits`` (B, C, X, Y[, Z]) in any float dtype (computed in float32, float64 kept);
    ``target`` (B, 1, ...) integer label map in [0, C) plus the ignore label, or (B, R[+1], ...)
    for regions. Any other label is an error on CPU (ValueError naming it, both backends) and
    makes the loss NaN on CUDA (checking there would stall the host); an empty batch or spatial
    dimension is a ValueError on every device. Returns a float32 scalar (float64 for float64 logits). Background is included in
    the Dice mean.
    """

    def __init__(
        self,
        bin_width: float = 0.1,
        gamma: float = 2.0,
        *,
        smooth: float = 1e-8,
        ignore_label: int | None = None,
        regions: bool = False,
        batch_dice: bool = False,
        ddp: bool = True,
        weighted: bool = True,
        focal: bool = True,
        backend: Backend = "auto",
    ) -> None:
        super().__init__()
        self.n_per_unit = bins_per_unit(bin_width)
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not math.isfinite(gamma) or gamma < 0:
            raise ValueError(f"gamma must be a finite number >= 0 (paper: 1, 2 or 5), got {gamma!r}")
        if isinstance(smooth, bool) or not isinstance(smooth, (int, float)) or not math.isfinite(smooth) or smooth < 0:
            raise ValueError(f"smooth must be a finite number >= 0, got {smooth!r}")
        if ignore_label is not None and (isinstance(ignore_label, bool) or not isinstance(ignore_label, int)):
            raise ValueError(f"ignore_label must be None or an int label value, got {ignore_label!r}")
        if backend not in ("auto", "fused", "reference"):
            raise ValueError(f"backend must be one of 'auto', 'fused', 'reference', got {backend!r}")
        self.bin_width = float(bin_width)
        self.gamma = float(gamma)
        self.smooth = float(smooth)
        self.ignore_label = ignore_label
        self.regions = bool(regions)
        self.batch_dice = bool(batch_dice)
        self.ddp = bool(ddp)
        self.weighted = bool(weighted)
        self.focal = bool(focal)
        self.backend = backend

    @property
    def num_bins(self) -> int:
        return self.n_per_unit + 1

    def extra_repr(self) -> str:
        return (
            f"bin_width={self.bin_width:g}, gamma={self.gamma:g}, smooth={self.smooth:g}, "
            f"ignore_label={self.ignore_label}, regions={self.regions}, batch_dice={self.batch_dice}, "
            f"ddp={self.ddp}, weighted={self.weighted}, focal={self.focal}, backend={self.backend!r}"
        )

    def statistics(self, logits: torch.Tensor, target: torch.Tensor) -> BinStatistics:
        """The per-bin statistics of one call, from the fused kernel or the reference path."""
        check_shapes(logits, target, self.regions, self.ignore_label)
        options = dict(n_per_unit=self.n_per_unit, gamma=self.gamma, regions=self.regions,
                       ignore_label=self.ignore_label)
        if self.backend != "reference":
            from nnunetv2_l1dfl.kernels import fused_bin_statistics

            stats = fused_bin_statistics(logits, target, **options)
            if stats is not None:
                return stats
            if self.backend == "fused":
                raise RuntimeError(
                    f"backend='fused' but no fused L1DFL kernel is available for {logits.device.type} "
                    "tensors (numba on CPU, Triton on CUDA); run `l1dfl doctor`"
                )
        return bin_statistics_reference(logits, target, **options)

    def components(self, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(weighted Dice loss, focal loss)``; :meth:`forward` is their sum (the Dice term alone
        when ``focal`` is False; the focal loss is still returned, for logging)."""
        # nnU-Net calls the loss inside autocast: opt out so that nothing here runs in half precision
        with torch.autocast(device_type=logits.device.type, enabled=False):
            stats = self.statistics(logits, target)
            return reduce_bin_statistics(
                stats,
                n_per_unit=self.n_per_unit,
                smooth=self.smooth,
                batch_dice=self.batch_dice,
                ddp=self.ddp,
                weighted=self.weighted,
            )

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        dice_loss, focal_loss = self.components(logits, target)
        return dice_loss + focal_loss if self.focal else dice_loss


class DiceFocalLoss(L1DFLLoss):
    """The paper's DFL baseline: plain squared-denominator Dice (all weights 1) + the same focal term.

    Same arguments, shapes and reductions as :class:`L1DFLLoss`; ``bin_width`` is accepted but only
    shapes the (unused) histogram.
    """

    def __init__(self, gamma: float = 2.0, **kwargs) -> None:
        kwargs.setdefault("bin_width", 0.1)
        for fixed in ("weighted", "focal"):
            if fixed in kwargs:
                raise TypeError(f"DiceFocalLoss fixes {fixed!r}; use L1DFLLoss to choose it")
        super().__init__(gamma=gamma, weighted=False, **kwargs)


class SquaredDiceLoss(L1DFLLoss):
    """The paper's DL baseline: plain squared-denominator Dice, ``1 - mean_bc (2 I + s) / (U + s)``.

    All weights 1 and no focal term; otherwise the same reductions as :class:`L1DFLLoss` (per
    sample and class with background, ``smooth`` 1e-8, ignore label, regions, batch Dice, DDP).
    Not nnU-Net's ``nnUNetTrainerDiceLoss``, whose soft Dice has a linear denominator
    (``sum p + sum y``), smoothing 1e-5 and leaves the background out.
    """

    def __init__(self, **kwargs) -> None:
        kwargs.setdefault("bin_width", 0.1)
        for fixed in ("weighted", "focal", "gamma"):
            if fixed in kwargs:
                raise TypeError(f"SquaredDiceLoss fixes {fixed!r}; use L1DFLLoss to choose it")
        super().__init__(weighted=False, focal=False, **kwargs)
