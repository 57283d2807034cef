"""Patient- and lesion-level metrics for PET lesion segmentation: plain functions on numpy arrays.

Definitions follow ``docs/evaluation.md`` (the L1DFL paper's Table 1 and Appendix B, autoPET and the
lymphoma framework of Ahamed et al.).

Conventions used throughout:

- 3D arrays are in (z, y, x) order, as ``SimpleITK.GetArrayFromImage`` returns them, and C-contiguous;
  "array order" means that C order.
- ``spacing_mm`` is the voxel size in mm in the same (z, y, x) order.
- Lesions are connected components of a binary mask (cc3d, 6/18/26-connectivity, 18 by default).
- The PET array holds SUV (or whatever unit the PET channel has; SUV statistics inherit it).

The work per case is organised so that nothing loops over components: the ground truth is analysed
once (:func:`analyse_ground_truth`) and every prediction is scored against it through one sparse
overlap table between GT and predicted components (:func:`overlap_table`), from which detection,
lesion Dice, FPV and FNV are read off.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import cc3d
import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.spatial import ConvexHull, QhullError
from scipy.spatial.distance import cdist

from nnunetv2_l1dfl.evaluation.definitions import CONNECTIVITIES, CRITERIA, EMPTY_POLICIES, SCENARIOS

logger = logging.getLogger(__name__)


# Above this many (GT x prediction) label pairs the overlap table is built with np.unique instead
# of a dense bincount, so that a prediction made of a million noise specks cannot exhaust memory.
_DENSE_PAIR_LIMIT = 1 << 22


# ----------------------------------------------------------------------------- basic helpers


def foreground_mask(label_map: np.ndarray, label: int | None = None) -> np.ndarray:
    """Binary foreground of a label map: ``label_map > 0``, or ``label_map == label`` if given."""
    if label is None:
        return label_map > 0
    return label_map == label


def label_lesions(mask: np.ndarray, connectivity: int = 18) -> tuple[np.ndarray, int]:
    """Connected components of a binary 3D mask.

    Returns ``(labels, n)``: labels numbered 1..n in order of first appearance in array order
    (cc3d's numbering), 0 for background; the dtype is the smallest unsigned type cc3d deems safe.
    """
    if connectivity not in CONNECTIVITIES:
        raise ValueError(f"connectivity must be one of {CONNECTIVITIES}, got {connectivity}")
    if mask.ndim != 3:
        raise ValueError(f"mask must be 3D (z, y, x), got shape {mask.shape}")
    labels, n = cc3d.connected_components(
        np.ascontiguousarray(mask, dtype=bool), connectivity=connectivity, return_N=True
    )
    return labels, int(n)


def voxel_volume_ml(spacing_mm: tuple[float, float, float]) -> float:
    """Volume of one voxel in ml (= cm^3) from its spacing in mm."""
    return float(np.prod(np.asarray(spacing_mm, dtype=np.float64))) / 1000.0


def dice_from_counts(intersection: float, size_a: float, size_b: float, empty_policy: str = "nan") -> float:
    """Dice 2|A n B| / (|A| + |B|) from voxel counts.

    Both sets empty: NaN with ``empty_policy="nan"`` (the default: such cases are excluded from
    means and counted separately), 1.0 with ``"one"``. One set empty and the other not: 0.0.
    """
    if empty_policy not in EMPTY_POLICIES:
        raise ValueError(f"empty_policy must be one of {EMPTY_POLICIES}, got {empty_policy!r}")
    denominator = float(size_a) + float(size_b)
    if denominator == 0:
        return float("nan") if empty_policy == "nan" else 1.0
    return 2.0 * float(intersection) / denominator


def dice_score(mask_a: np.ndarray, mask_b: np.ndarray, empty_policy: str = "nan") -> float:
    """Dice between two binary masks of the same shape; see :func:`dice_from_counts` for empties."""
    if mask_a.shape != mask_b.shape:
        raise ValueError(f"mask shapes differ: {mask_a.shape} vs {mask_b.shape}")
    a = mask_a.astype(bool, copy=False)
    b = mask_b.astype(bool, copy=False)
    return dice_from_counts(np.count_nonzero(a & b), np.count_nonzero(a), np.count_nonzero(b), empty_policy)


def f1_from_counts(tp: int, fp: int, fn: int, empty_policy: str = "nan") -> float:
    """Detection F1 = 2TP / (2TP + FP + FN); TP = FP = FN = 0 follows ``empty_policy`` (NaN or 1)."""
    return dice_from_counts(tp, tp + fp, tp + fn, empty_policy)


def scenario_of(n_lesions: int) -> str:
    """Lesion-burden scenario of a case: ``negative`` (no GT lesion), ``single`` or ``multiple``."""
    return SCENARIOS[min(int(n_lesions), 2)]


# ----------------------------------------------------------------------------- Dmax


def max_pairwise_distance(points: np.ndarray) -> float:
    """Largest Euclidean distance between any two rows of ``points`` (k, d), in their units.

    The diameter of a point set is attained between vertices of its convex hull, so only those are
    compared. Degenerate sets are handled explicitly: k < 2 gives 0.0; points on a line give the
    extent along it; points in a plane (a one-slice lesion) use the 2D hull in that plane.
    """
    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 2:
        raise ValueError(f"points must be (k, d), got shape {points.shape}")
    if len(points) < 2:
        return 0.0
    centred = points - points.mean(axis=0)
    _, singular_values, basis = np.linalg.svd(centred, full_matrices=False)
    if singular_values[0] == 0:
        return 0.0  # all points identical
    rank = int(np.count_nonzero(singular_values > singular_values[0] * 1e-9))
    if rank == 1:
        along = centred @ basis[0]
        return float(along.max() - along.min())
    in_subspace = centred @ basis[:rank].T  # distances are preserved: the points lie in the subspace
    try:
        candidates = points[ConvexHull(in_subspace).vertices]
    except QhullError:  # numerically degenerate beyond the rank test: compare all points
        candidates = points
    return _max_distance_brute_force(candidates)


def _max_distance_brute_force(points: np.ndarray, block: int = 2048) -> float:
    best = 0.0
    for start in range(0, len(points), block):
        distances = cdist(points[start : start + block], points[start:])
        best = max(best, float(distances.max()))
    return best


def _row_extreme_indices(flat_indices: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Of sorted flat indices, keep the first and last voxel of every (z, y) row.

    Any convex-hull vertex of a voxel set is extreme along x within its row, so this keeps every
    hull vertex while shrinking a solid lesion's point set to its surface in x.
    """
    rows = flat_indices // shape[-1]
    new_row = np.flatnonzero(np.diff(rows)) + 1
    starts = np.concatenate(([0], new_row))
    ends = np.concatenate((new_row - 1, [len(flat_indices) - 1]))
    return flat_indices[np.unique(np.concatenate((starts, ends)))]


def dmax_from_flat_indices(
    flat_indices: np.ndarray, shape: tuple[int, int, int], spacing_mm: tuple[float, float, float]
) -> float:
    """Dmax in mm of the voxels at the given sorted flat indices (array order); NaN when empty."""
    if len(flat_indices) == 0:
        return float("nan")
    extremes = _row_extreme_indices(np.asarray(flat_indices), shape)
    coordinates = np.stack(np.unravel_index(extremes, shape), axis=1).astype(np.float64)
    return max_pairwise_distance(coordinates * np.asarray(spacing_mm, dtype=np.float64))


def dmax_mm(mask: np.ndarray, spacing_mm: tuple[float, float, float]) -> float:
    """Lesion dissemination Dmax (mm): largest distance between the centres of any two foreground
    voxels of a 3D mask, spacing applied. NaN for an empty mask, 0.0 for a single voxel."""
    mask = np.ascontiguousarray(mask)
    return dmax_from_flat_indices(np.flatnonzero(mask), mask.shape, spacing_mm)


# ----------------------------------------------------------------------------- ground truth


@dataclass(frozen=True)
class GroundTruthLesions:
    """Everything about a case's GT that does not depend on the prediction (computed once per case).

    Per-lesion arrays have length ``n_lesions``; entry ``i`` is the component labelled ``i + 1``.
    """

    labels: np.ndarray  # (z, y, x) component labels, 0 = background
    n_lesions: int
    flat_indices: np.ndarray  # (n_fg,) sorted flat indices of GT foreground voxels
    voxel_counts: np.ndarray  # (n,) int64
    suv_max: np.ndarray  # (n,) float64
    suv_sum: np.ndarray  # (n,) float64
    suvmax_flat_index: np.ndarray  # (n,) int64, first voxel in array order on ties
    voxel_volume_ml: float
    dmax_mm: float  # NaN without lesions

    @property
    def volume_ml(self) -> np.ndarray:
        return self.voxel_counts * self.voxel_volume_ml

    @property
    def suv_mean(self) -> np.ndarray:
        return self.suv_sum / np.maximum(self.voxel_counts, 1)

    @property
    def tla(self) -> np.ndarray:
        """Total lesion activity per lesion: sum of SUV x voxel volume (SUV x ml)."""
        return self.suv_sum * self.voxel_volume_ml

    @property
    def tmtv_ml(self) -> float:
        return float(self.voxel_counts.sum()) * self.voxel_volume_ml

    @property
    def total_tla(self) -> float:
        return float(self.suv_sum.sum()) * self.voxel_volume_ml

    @property
    def suvmax_zyx(self) -> np.ndarray:
        """(n, 3) voxel index (z, y, x) of each lesion's SUVmax voxel."""
        return np.stack(np.unravel_index(self.suvmax_flat_index, self.labels.shape), axis=1)


def analyse_ground_truth(
    gt_mask: np.ndarray,
    suv: np.ndarray,
    spacing_mm: tuple[float, float, float],
    connectivity: int = 18,
) -> GroundTruthLesions:
    """Components, volumes, SUV statistics, SUVmax voxels and Dmax of a binary GT mask.

    Args:
        gt_mask: (z, y, x) bool, the lesion foreground.
        suv: (z, y, x) PET in SUV, same shape; must be finite inside the GT.
        spacing_mm: voxel size (z, y, x) in mm.
        connectivity: 6, 18 or 26.

    SUVmax ties inside a lesion resolve to the first voxel in array order. An empty mask gives
    ``n_lesions = 0``, empty arrays and ``dmax_mm = NaN``.
    """
    if gt_mask.shape != suv.shape:
        raise ValueError(f"GT shape {gt_mask.shape} and PET shape {suv.shape} differ")
    labels, n_lesions = label_lesions(gt_mask, connectivity)
    flat_indices = np.flatnonzero(gt_mask)  # a bool scan is cheaper than one over the label map
    lesion_of_voxel = labels.ravel()[flat_indices].astype(np.int64)
    suv_values = np.ascontiguousarray(suv).ravel()[flat_indices].astype(np.float64)
    if not np.all(np.isfinite(suv_values)):
        raise ValueError("PET has non-finite values (NaN or inf) inside the GT lesions")
    voxel_counts = np.bincount(lesion_of_voxel, minlength=n_lesions + 1)[1:]
    suv_sum = np.bincount(lesion_of_voxel, weights=suv_values, minlength=n_lesions + 1)[1:]
    # Sort voxels by lesion, then SUV descending, then array order: the first of each lesion is
    # its SUVmax voxel with ties going to the earliest voxel.
    order = np.lexsort((flat_indices, -suv_values, lesion_of_voxel))
    firsts = order[np.searchsorted(lesion_of_voxel[order], np.arange(1, n_lesions + 1))]
    return GroundTruthLesions(
        labels=labels,
        n_lesions=n_lesions,
        flat_indices=flat_indices,
        voxel_counts=voxel_counts.astype(np.int64),
        suv_max=suv_values[firsts],
        suv_sum=suv_sum,
        suvmax_flat_index=flat_indices[firsts].astype(np.int64),
        voxel_volume_ml=voxel_volume_ml(spacing_mm),
        dmax_mm=dmax_from_flat_indices(flat_indices, gt_mask.shape, spacing_mm),
    )


# ----------------------------------------------------------------------------- overlap table


@dataclass(frozen=True)
class OverlapTable:
    """Sparse contingency table between GT components and predicted components.

    ``gt_sizes[i]`` / ``pred_sizes[j]`` are voxel counts of GT lesion i / predicted component j
    (index 0 unused and 0). ``pair_gt``, ``pair_pred``, ``pair_voxels`` list every (i, j), both
    >= 1, that share at least one voxel, with the shared voxel count, sorted by (i, j).
    """

    gt_sizes: np.ndarray
    pred_sizes: np.ndarray
    pair_gt: np.ndarray
    pair_pred: np.ndarray
    pair_voxels: np.ndarray

    @property
    def n_gt(self) -> int:
        return len(self.gt_sizes) - 1

    @property
    def n_pred(self) -> int:
        return len(self.pred_sizes) - 1

    def dense(self) -> np.ndarray:
        """(n_gt + 1, n_pred + 1) voxel counts with row/column 0 = the other mask's background
        (entry [0, 0], voxels in neither, is left at 0)."""
        table = np.zeros((self.n_gt + 1, self.n_pred + 1), dtype=np.int64)
        table[self.pair_gt, self.pair_pred] = self.pair_voxels
        table[1:, 0] = self.gt_sizes[1:] - table[1:, 1:].sum(axis=1)
        table[0, 1:] = self.pred_sizes[1:] - table[1:, 1:].sum(axis=0)
        return table

    def pair_iou(self) -> np.ndarray:
        union = self.gt_sizes[self.pair_gt] + self.pred_sizes[self.pair_pred] - self.pair_voxels
        return self.pair_voxels / union


def overlap_table_from_codes(gt_codes: np.ndarray, pred_codes: np.ndarray, n_gt: int, n_pred: int) -> OverlapTable:
    """Overlap table from the GT and predicted component labels of the same voxels (any voxels
    where at least one is foreground; background-background voxels may be left out)."""
    gt_codes = gt_codes.astype(np.int64, copy=False)
    pred_codes = pred_codes.astype(np.int64, copy=False)
    n_cols = n_pred + 1
    joint = gt_codes * n_cols + pred_codes
    if (n_gt + 1) * n_cols <= _DENSE_PAIR_LIMIT:
        counts = np.bincount(joint, minlength=(n_gt + 1) * n_cols)
        codes = np.flatnonzero(counts)
        counts = counts[codes]
    else:
        codes, counts = np.unique(joint, return_counts=True)
    gt_of, pred_of = np.divmod(codes, n_cols)
    gt_sizes = np.bincount(gt_of, weights=counts, minlength=n_gt + 1).astype(np.int64)
    pred_sizes = np.bincount(pred_of, weights=counts, minlength=n_cols).astype(np.int64)
    gt_sizes[0] = 0
    pred_sizes[0] = 0
    both = (gt_of > 0) & (pred_of > 0)
    return OverlapTable(gt_sizes, pred_sizes, gt_of[both], pred_of[both], counts[both].astype(np.int64))


def overlap_table(gt_labels: np.ndarray, pred_labels: np.ndarray, n_gt: int, n_pred: int) -> OverlapTable:
    """One contingency table per case: voxel overlaps between all GT and predicted components,
    computed in one pass over the voxels that are foreground in either label map."""
    if gt_labels.shape != pred_labels.shape:
        raise ValueError(f"label map shapes differ: {gt_labels.shape} vs {pred_labels.shape}")
    union = np.flatnonzero((gt_labels != 0) | (pred_labels != 0))
    return overlap_table_from_codes(gt_labels.ravel()[union], pred_labels.ravel()[union], n_gt, n_pred)


# ----------------------------------------------------------------------------- detection


@dataclass(frozen=True)
class Detection:
    """Lesion detection under one criterion.

    ``gt_detected`` (n_gt,) says which GT lesions count as detected (TP); ``pred_false_positive``
    (n_pred,) which predicted components count as FP. ``tp + fn == n_gt`` always.
    """

    criterion: str
    gt_detected: np.ndarray
    pred_false_positive: np.ndarray

    @property
    def tp(self) -> int:
        return int(np.count_nonzero(self.gt_detected))

    @property
    def fn(self) -> int:
        return int(len(self.gt_detected) - self.tp)

    @property
    def fp(self) -> int:
        return int(np.count_nonzero(self.pred_false_positive))


def detect_lesions(
    table: OverlapTable,
    criterion: str = "suvmax",
    pred_label_at_suvmax: np.ndarray | None = None,
    iou_threshold: float = 0.1,
) -> Detection:
    """Classify GT lesions and predicted components as TP / FN / FP.

    Criteria (``docs/evaluation.md``):

    - ``suvmax`` (default, the paper): GT lesion i is TP when its SUVmax voxel lies in the
      predicted mask, else FN; a predicted component overlapping no GT lesion is FP (one that
      overlaps a lesion but misses its SUVmax voxel is neither TP nor FP).
    - ``overlap``: GT lesion is TP when any predicted voxel overlaps it; FP as above.
    - ``iou``: one-to-one Hungarian matching among the pairs with IoU >= ``iou_threshold``: the
      assignment maximises the number of such pairs, then their total IoU; matched GT lesions are
      TP, unmatched GT lesions FN and unmatched predicted components FP (picai-style).
    - ``lymphoma_crit3`` (Ahamed et al., criterion 3): each predicted component is paired with the
      GT lesion of highest IoU (ties: lowest label); it is TP if it contains that lesion's SUVmax
      voxel, else FP; GT lesions without a TP component are FN.

    Args:
        table: the case's overlap table.
        criterion: one of ``CRITERIA``.
        pred_label_at_suvmax: (n_gt,) predicted component label at each GT lesion's SUVmax voxel
            (0 = background); required by ``suvmax`` and ``lymphoma_crit3``.
        iou_threshold: IoU needed for a match under ``iou``, in (0, 1].
    """
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    n_gt, n_pred = table.n_gt, table.n_pred
    pred_overlaps_gt = np.zeros(n_pred + 1, dtype=bool)
    pred_overlaps_gt[table.pair_pred] = True
    no_gt_overlap = ~pred_overlaps_gt[1:]
    if criterion in ("suvmax", "lymphoma_crit3"):
        if pred_label_at_suvmax is None or len(pred_label_at_suvmax) != n_gt:
            raise ValueError(f"criterion {criterion!r} needs pred_label_at_suvmax with one entry per GT lesion")
        pred_label_at_suvmax = np.asarray(pred_label_at_suvmax, dtype=np.int64)

    if criterion == "suvmax":
        return Detection(criterion, pred_label_at_suvmax > 0, no_gt_overlap)

    if criterion == "overlap":
        gt_overlapped = np.zeros(n_gt + 1, dtype=bool)
        gt_overlapped[table.pair_gt] = True
        return Detection(criterion, gt_overlapped[1:], no_gt_overlap)

    iou = table.pair_iou()
    if criterion == "iou":
        if not 0 < iou_threshold <= 1:
            raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}")
        gt_detected = np.zeros(n_gt, dtype=bool)
        pred_matched = np.zeros(n_pred, dtype=bool)
        if len(iou):
            gt_ids, gt_rows = np.unique(table.pair_gt, return_inverse=True)
            pred_ids, pred_cols = np.unique(table.pair_pred, return_inverse=True)
            valid = iou >= iou_threshold
            # Maximising total IoU over all pairs can trade two above-threshold matches for one
            # high-IoU match plus one below threshold. Scoring every valid pair as a bonus larger
            # than any possible IoU sum makes the assignment maximise the number of valid matches
            # first and their total IoU second; pairs below the threshold score 0 (never useful).
            bonus = float(min(len(gt_ids), len(pred_ids)) + 1)
            weights = np.zeros((len(gt_ids), len(pred_ids)))
            weights[gt_rows[valid], pred_cols[valid]] = bonus + iou[valid]
            rows, cols = linear_sum_assignment(weights, maximize=True)
            good = weights[rows, cols] > 0
            gt_detected[gt_ids[rows[good]] - 1] = True
            pred_matched[pred_ids[cols[good]] - 1] = True
        return Detection(criterion, gt_detected, ~pred_matched)

    # lymphoma_crit3: best GT per predicted component (highest IoU, then lowest GT label)
    gt_detected = np.zeros(n_gt, dtype=bool)
    pred_true = np.zeros(n_pred, dtype=bool)
    if len(iou):
        order = np.lexsort((table.pair_gt, -iou, table.pair_pred))
        first_of_pred = order[np.flatnonzero(np.diff(table.pair_pred[order], prepend=-1))]
        best_pred = table.pair_pred[first_of_pred]
        best_gt = table.pair_gt[first_of_pred]
        hit = pred_label_at_suvmax[best_gt - 1] == best_pred
        pred_true[best_pred[hit] - 1] = True
        gt_detected[best_gt[hit] - 1] = True
    return Detection(criterion, gt_detected, ~pred_true)


# ----------------------------------------------------------------------------- one prediction


@dataclass(frozen=True)
class PredictionEvaluation:
    """Patient- and lesion-level results of one prediction against one case's GT."""

    dice: float
    tp: int
    fp: int
    fn: int
    f1: float
    fpv_ml: float
    fnv_ml: float
    tmtv_pred_ml: float
    tla_pred: float
    n_lesions_pred: int
    lesion_detected: np.ndarray  # (n_gt,) bool
    lesion_dice: np.ndarray  # (n_gt,) float64, 0 when the detection criterion calls the lesion missed

    def case_metrics(self) -> dict:
        """The patient-level numbers as a flat dict (the prediction's columns of cases.csv)."""
        return {
            "dice": self.dice,
            "tp": self.tp,
            "fp": self.fp,
            "fn": self.fn,
            "f1": self.f1,
            "fpv_ml": self.fpv_ml,
            "fnv_ml": self.fnv_ml,
            "tmtv_pred_ml": self.tmtv_pred_ml,
            "tla_pred": self.tla_pred,
            "n_lesions_pred": self.n_lesions_pred,
            "disease_pred": self.n_lesions_pred > 0,
        }


def evaluate_prediction(
    gt: GroundTruthLesions,
    pred_mask: np.ndarray,
    suv: np.ndarray,
    *,
    criterion: str = "suvmax",
    iou_threshold: float = 0.1,
    connectivity: int = 18,
    empty_policy: str = "nan",
) -> PredictionEvaluation:
    """Score one binary prediction (z, y, x) against an analysed GT (same shape, same spacing).

    Patient level: volume DSC, TP/FP/FN and F1 under ``criterion``, FPV (ml of predicted
    components touching no GT lesion), FNV (ml of GT lesions touching no predicted component),
    predicted TMTV (ml) and TLA (SUV x ml). Lesion level: detection under ``criterion`` and lesion
    DSC against the union of predicted components overlapping the lesion, set to 0 for every
    lesion the criterion calls missed (FN) even when a component overlaps it (e.g. one that misses
    the SUVmax voxel under ``suvmax``), so that a lesion's DSC and its detection never contradict
    each other. Empty cases follow ``empty_policy``.
    """
    if pred_mask.shape != gt.labels.shape:
        raise ValueError(f"prediction shape {pred_mask.shape} differs from GT shape {gt.labels.shape}")
    pred_labels, n_pred = label_lesions(pred_mask, connectivity)
    # Voxels foreground in either mask, from the GT's stored indices and one scan of the binary
    # prediction: no pass over the full-size label maps.
    union = np.union1d(gt.flat_indices, np.flatnonzero(pred_mask))
    gt_codes = gt.labels.ravel()[union]
    pred_codes = pred_labels.ravel()[union]
    table = overlap_table_from_codes(gt_codes, pred_codes, gt.n_lesions, n_pred)
    pred_label_at_suvmax = pred_labels.ravel()[gt.suvmax_flat_index]
    detection = detect_lesions(table, criterion, pred_label_at_suvmax, iou_threshold)

    vv = gt.voxel_volume_ml
    n_pred_voxels = int(table.pred_sizes.sum())
    n_gt_voxels = int(table.gt_sizes.sum())
    intersection = int(table.pair_voxels.sum())

    inter_per_gt = np.bincount(table.pair_gt, weights=table.pair_voxels, minlength=gt.n_lesions + 1)[1:]
    touching_pred_voxels = np.bincount(
        table.pair_gt, weights=table.pred_sizes[table.pair_pred], minlength=gt.n_lesions + 1
    )[1:]
    lesion_dice = np.where(
        detection.gt_detected & (inter_per_gt > 0),
        2.0 * inter_per_gt / np.maximum(gt.voxel_counts + touching_pred_voxels, 1),
        0.0,
    )
    gt_touched = inter_per_gt > 0
    pred_touched = np.zeros(n_pred + 1, dtype=bool)
    pred_touched[table.pair_pred] = True
    fpv_voxels = int(table.pred_sizes[1:][~pred_touched[1:]].sum())
    fnv_voxels = int(gt.voxel_counts[~gt_touched].sum())
    suv_union = np.ascontiguousarray(suv).ravel()[union]
    tla_pred = float(suv_union[pred_codes != 0].sum(dtype=np.float64)) * vv

    return PredictionEvaluation(
        dice=dice_from_counts(intersection, n_gt_voxels, n_pred_voxels, empty_policy),
        tp=detection.tp,
        fp=detection.fp,
        fn=detection.fn,
        f1=f1_from_counts(detection.tp, detection.fp, detection.fn, empty_policy),
        fpv_ml=fpv_voxels * vv,
        fnv_ml=fnv_voxels * vv,
        tmtv_pred_ml=n_pred_voxels * vv,
        tla_pred=tla_pred,
        n_lesions_pred=n_pred,
        lesion_detected=detection.gt_detected,
        lesion_dice=lesion_dice,
    )


def ground_truth_case_metrics(gt: GroundTruthLesions) -> dict:
    """Patient-level numbers that depend on the GT only (columns of cases.csv)."""
    return {
        "n_lesions_gt": gt.n_lesions,
        "scenario": scenario_of(gt.n_lesions),
        "tmtv_gt_ml": gt.tmtv_ml,
        "tla_gt": gt.total_tla,
        "dmax_mm": gt.dmax_mm,
        "disease_gt": gt.n_lesions > 0,
    }


def lesion_table(gt: GroundTruthLesions) -> list[dict]:
    """One dict per GT lesion with its prediction-independent columns of lesions.csv."""
    zyx = gt.suvmax_zyx
    return [
        {
            "lesion_id": i + 1,
            "volume_ml": float(gt.volume_ml[i]),
            "n_voxels": int(gt.voxel_counts[i]),
            "suv_max": float(gt.suv_max[i]),
            "suv_mean": float(gt.suv_mean[i]),
            "tla": float(gt.tla[i]),
            "suvmax_z": int(zyx[i, 0]),
            "suvmax_y": int(zyx[i, 1]),
            "suvmax_x": int(zyx[i, 2]),
        }
        for i in range(gt.n_lesions)
    ]
