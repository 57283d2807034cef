"""Voxel-wise calibration of predicted probabilities (the L1DFL paper's Table 2 and Figure 6).

Per voxel: confidence = max_c p_c, entropy = -sum_c p_c ln p_c (nats; 0 ln 0 = 0), correct =
(argmax_c p_c == GT label). Summed over a region of interest so that the sea of easy background does
not hide everything: by default the GT dilated by a margin plus the predicted foreground.

Counts are kept as sums (:class:`CalibrationCounts`) so cases can be processed in parallel and added
up afterwards; :meth:`CalibrationCounts.summary` turns them into the reported means, the calibration
gap (mean confidence of correct minus incorrect voxels, larger is better), the expected calibration
error (ECE) and the reliability-diagram bins.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.ndimage import maximum_filter

from nnunetv2_l1dfl.evaluation.definitions import CALIBRATION_REGIONS


def _bounding_box(mask: np.ndarray, margin: int) -> tuple[slice, ...] | None:
    slices = []
    for axis in range(mask.ndim):
        present = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if len(present) == 0:
            return None
        slices.append(slice(max(present[0] - margin, 0), min(present[-1] + margin + 1, mask.shape[axis])))
    return tuple(slices)


def dilate_cube(mask: np.ndarray, margin_voxels: int) -> np.ndarray:
    """Dilate a binary mask by a cube of +-``margin_voxels`` (Chebyshev distance), working only
    inside the mask's bounding box grown by the margin."""
    if margin_voxels < 0:
        raise ValueError(f"margin_voxels must be >= 0, got {margin_voxels}")
    out = np.zeros(mask.shape, dtype=bool)
    box = _bounding_box(mask, margin_voxels)
    if box is None:
        return out
    if margin_voxels == 0:
        out[box] = mask[box]
        return out
    out[box] = maximum_filter(mask[box].astype(np.uint8), size=2 * margin_voxels + 1, mode="constant") > 0
    return out


def calibration_region(
    gt_mask: np.ndarray, pred_mask: np.ndarray, region: str = "lesion_roi", margin_voxels: int = 3
) -> np.ndarray:
    """Voxels whose calibration is scored, as a (z, y, x) bool mask.

    ``lesion_roi``: GT dilated by a cube of +-``margin_voxels`` voxels, united with the predicted
    foreground (both empty: an empty region). ``whole_volume``: every voxel.
    """
    if region not in CALIBRATION_REGIONS:
        raise ValueError(f"calibration region must be one of {CALIBRATION_REGIONS}, got {region!r}")
    if region == "whole_volume":
        return np.ones(gt_mask.shape, dtype=bool)
    return dilate_cube(gt_mask, margin_voxels) | pred_mask


@dataclass
class CalibrationCounts:
    """Sums over voxels, split by correctness, plus the reliability-diagram bins.

    Bins are equal-width on confidence [0, 1]; bin b holds 0 <= b/n_bins <= confidence, with
    confidence 1.0 in the last bin.
    """

    n_bins: int = 15
    n_correct: int = 0
    n_incorrect: int = 0
    entropy_sum_correct: float = 0.0
    entropy_sum_incorrect: float = 0.0
    confidence_sum_correct: float = 0.0
    confidence_sum_incorrect: float = 0.0
    bin_count: np.ndarray = field(default=None)  # type: ignore[assignment]
    bin_confidence_sum: np.ndarray = field(default=None)  # type: ignore[assignment]
    bin_correct: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.n_bins < 1:
            raise ValueError(f"n_bins must be >= 1, got {self.n_bins}")
        if self.bin_count is None:
            self.bin_count = np.zeros(self.n_bins, dtype=np.int64)
            self.bin_confidence_sum = np.zeros(self.n_bins)
            self.bin_correct = np.zeros(self.n_bins, dtype=np.int64)

    def __add__(self, other: CalibrationCounts) -> CalibrationCounts:
        if self.n_bins != other.n_bins:
            raise ValueError(f"cannot add calibration counts with {self.n_bins} and {other.n_bins} bins")
        return CalibrationCounts(
            n_bins=self.n_bins,
            n_correct=self.n_correct + other.n_correct,
            n_incorrect=self.n_incorrect + other.n_incorrect,
            entropy_sum_correct=self.entropy_sum_correct + other.entropy_sum_correct,
            entropy_sum_incorrect=self.entropy_sum_incorrect + other.entropy_sum_incorrect,
            confidence_sum_correct=self.confidence_sum_correct + other.confidence_sum_correct,
            confidence_sum_incorrect=self.confidence_sum_incorrect + other.confidence_sum_incorrect,
            bin_count=self.bin_count + other.bin_count,
            bin_confidence_sum=self.bin_confidence_sum + other.bin_confidence_sum,
            bin_correct=self.bin_correct + other.bin_correct,
        )

    def summary(self) -> dict:
        """Means per correctness, calibration gap, ECE and bins; NaN where a group is empty."""

        def mean(total: float, n: int) -> float:
            return total / n if n else float("nan")

        n_total = self.n_correct + self.n_incorrect
        confidence_correct = mean(self.confidence_sum_correct, self.n_correct)
        confidence_incorrect = mean(self.confidence_sum_incorrect, self.n_incorrect)
        with np.errstate(invalid="ignore", divide="ignore"):
            bin_confidence = self.bin_confidence_sum / self.bin_count
            bin_accuracy = self.bin_correct / self.bin_count
        filled = self.bin_count > 0
        ece = (
            float(np.sum(self.bin_count[filled] * np.abs(bin_accuracy[filled] - bin_confidence[filled])) / n_total)
            if n_total
            else float("nan")
        )
        edges = np.linspace(0.0, 1.0, self.n_bins + 1)
        return {
            "n_voxels": n_total,
            "n_correct": self.n_correct,
            "n_incorrect": self.n_incorrect,
            "accuracy": mean(self.n_correct, n_total),
            "entropy_correct": mean(self.entropy_sum_correct, self.n_correct),
            "entropy_incorrect": mean(self.entropy_sum_incorrect, self.n_incorrect),
            "confidence_correct": confidence_correct,
            "confidence_incorrect": confidence_incorrect,
            "calibration_gap": confidence_correct - confidence_incorrect,
            "ece": ece,
            "bins": [
                {
                    "lower": float(edges[b]),
                    "upper": float(edges[b + 1]),
                    "n_voxels": int(self.bin_count[b]),
                    "mean_confidence": float(bin_confidence[b]),
                    "accuracy": float(bin_accuracy[b]),
                }
                for b in range(self.n_bins)
            ],
        }


def full_probabilities(probabilities: np.ndarray) -> np.ndarray:
    """(C, ...) class probabilities; a single channel (C = 1, a sigmoid foreground probability)
    becomes (2, ...) = (1 - p, p)."""
    probabilities = np.asarray(probabilities, dtype=np.float32)
    if probabilities.shape[0] == 1:
        return np.concatenate((1.0 - probabilities, probabilities), axis=0)
    return probabilities


def voxel_calibration(probabilities: np.ndarray, gt_labels: np.ndarray, n_bins: int = 15) -> CalibrationCounts:
    """Calibration sums of N voxels.

    Args:
        probabilities: (C, N) class probabilities (C >= 2, summing to 1 over C), or (1, N) sigmoid
            foreground probabilities.
        gt_labels: (N,) integer GT labels in 0..C-1.
        n_bins: reliability-diagram bins.
    """
    probabilities = full_probabilities(probabilities)
    if probabilities.ndim != 2 or probabilities.shape[1] != len(gt_labels):
        raise ValueError(f"probabilities {probabilities.shape} do not match {len(gt_labels)} GT labels")
    counts = CalibrationCounts(n_bins=n_bins)
    if probabilities.shape[1] == 0:
        return counts
    probabilities = probabilities.astype(np.float64)
    predicted = probabilities.argmax(axis=0)
    confidence = probabilities.max(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(probabilities > 0, probabilities * np.log(probabilities), 0.0)
    entropy = -plogp.sum(axis=0)
    correct = predicted == np.asarray(gt_labels)
    counts.n_correct = int(correct.sum())
    counts.n_incorrect = int((~correct).sum())
    counts.entropy_sum_correct = float(entropy[correct].sum())
    counts.entropy_sum_incorrect = float(entropy[~correct].sum())
    counts.confidence_sum_correct = float(confidence[correct].sum())
    counts.confidence_sum_incorrect = float(confidence[~correct].sum())
    bins = np.minimum((confidence * n_bins).astype(np.int64), n_bins - 1)
    counts.bin_count = np.bincount(bins, minlength=n_bins)
    counts.bin_confidence_sum = np.bincount(bins, weights=confidence, minlength=n_bins)
    counts.bin_correct = np.bincount(bins, weights=correct, minlength=n_bins).astype(np.int64)
    return counts


def case_calibration(
    probabilities: np.ndarray,
    gt_label_map: np.ndarray,
    *,
    region: str = "lesion_roi",
    margin_voxels: int = 3,
    n_bins: int = 15,
    source: str = "probabilities",
) -> CalibrationCounts:
    """Calibration sums of one case inside its region of interest.

    Args:
        probabilities: (C, z, y, x) as nnU-Net writes to ``<case>.npz`` (key ``probabilities``),
            in the same array order as the GT; C = 1 means sigmoid foreground probabilities.
        gt_label_map: (z, y, x) integer GT labels (0 = background).
        region, margin_voxels: see :func:`calibration_region`; the predicted foreground is the
            argmax of ``probabilities``.
        source: name of the file, for error messages.
    """
    if probabilities.ndim != 4 or probabilities.shape[1:] != gt_label_map.shape:
        raise ValueError(
            f"{source}: probabilities of shape {probabilities.shape} do not match the GT shape "
            f"{gt_label_map.shape} (expected (C, z, y, x))"
        )
    n_classes = max(probabilities.shape[0], 2)
    max_label = int(gt_label_map.max(initial=0))
    if max_label >= n_classes:
        raise ValueError(f"{source}: GT holds label {max_label} but the probabilities have only {n_classes} classes")
    if probabilities.shape[0] == 1:
        pred_mask = probabilities[0] >= 0.5
    else:
        pred_mask = probabilities.argmax(axis=0) > 0
    roi = np.flatnonzero(calibration_region(gt_label_map > 0, pred_mask, region, margin_voxels))
    roi_probabilities = probabilities.reshape(probabilities.shape[0], -1)[:, roi]
    if probabilities.shape[0] > 1 and roi.size:
        worst = float(np.abs(roi_probabilities.sum(axis=0, dtype=np.float64) - 1.0).max())
        if worst > 1e-2:
            raise ValueError(
                f"{source}: probabilities do not sum to 1 over the {probabilities.shape[0]} channels "
                f"(off by up to {worst:.3g}); region-based (sigmoid) outputs with more than one "
                "channel are not supported, run with --no-calibration"
            )
    return voxel_calibration(roi_probabilities, gt_label_map.ravel()[roi], n_bins)
