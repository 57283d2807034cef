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

from nnunetv2_l1dfl.evaluation.definitions import (
    CONNECTIVITIES,
    CRITERIA,
    EMPTY_POLICIES,
    LESION_DSC_DEFINITIONS,
    SCENARIOS,
)
from nnunetv2_l1dfl.evaluation.quantities import (  # noqa: F401 (re-exported: metrics' public names)
    LesionQuantities,
    dmax_from_flat_indices,
    dmax_mm,
    lesion_quantities_from_flat,
    max_pairwise_distance,
    patient_quantities_from_flat,
    voxel_volume_ml,
)

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


# ----------------------------------------------------------------------------- ground truth


@dataclass(frozen=True)
class GroundTruthLesions:
    """Everything about a case's GT that does not depend on the prediction (computed once per case).

    The per-lesion numbers are ``quantities`` (:class:`quantities.LesionQuantities`, the one
    definition of volume, SUVmax, SUVmean, SUVpeak and TLA/TLG shared with ``l1dfl predict``);
    entry ``i`` is the component labelled ``i + 1``. ``patient`` holds the patient numbers of
    :func:`quantities.patient_quantities` (TMTV, total TLG, SUVmax, SUVmean, Dmax).
    """

    labels: np.ndarray  # (z, y, x) component labels, 0 = background
    n_lesions: int
    flat_indices: np.ndarray  # (n_fg,) sorted flat indices of GT foreground voxels
    quantities: LesionQuantities
    patient: dict
    spacing_mm: tuple[float, float, float]

    @property
    def voxel_volume_ml(self) -> float:
        return voxel_volume_ml(self.spacing_mm)

    @property
    def voxel_counts(self) -> np.ndarray:
        return self.quantities.n_voxels

    @property
    def suv_max(self) -> np.ndarray:
        return self.quantities.suv_max

    @property
    def suv_sum(self) -> np.ndarray:
        return self.quantities.suv_sum

    @property
    def suvmax_flat_index(self) -> np.ndarray:
        return self.quantities.suvmax_flat_index

    @property
    def volume_ml(self) -> np.ndarray:
        return self.quantities.volume_ml

    @property
    def suv_mean(self) -> np.ndarray:
        return self.quantities.suv_mean

    @property
    def tla(self) -> np.ndarray:
        """Total lesion activity per lesion: sum of SUV x voxel volume (SUV x ml) = TLG."""
        return self.quantities.tlg

    @property
    def tmtv_ml(self) -> float:
        return self.patient["tmtv_ml"]

    @property
    def total_tla(self) -> float:
        return self.patient["total_tlg"]

    @property
    def dmax_mm(self) -> float:
        return self.patient["dmax_mm"]

    @property
    def suvmax_zyx(self) -> np.ndarray:
        """(n, 3) voxel index (z, y, x) of each lesion's SUVmax voxel."""
        return self.quantities.suvmax_zyx


def analyse_ground_truth(
    gt_mask: np.ndarray,
    suv: np.ndarray,
    spacing_mm: tuple[float, float, float],
    connectivity: int = 18,
) -> GroundTruthLesions:
    """Components of a binary GT mask and their quantities (``quantities.py``), and Dmax.

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
    spacing = tuple(float(s) for s in spacing_mm)
    lesions = lesion_quantities_from_flat(labels, n_lesions, flat_indices, suv, spacing)
    suv_values = np.ascontiguousarray(suv).ravel()[flat_indices]
    patient = patient_quantities_from_flat(flat_indices, n_lesions, suv_values, gt_mask.shape, spacing)
    return GroundTruthLesions(
        labels=labels,
        n_lesions=n_lesions,
        flat_indices=flat_indices,
        quantities=lesions,
        patient=patient,
        spacing_mm=spacing,
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


def _hungarian_matches(pair_gt: np.ndarray, pair_pred: np.ndarray, pair_iou: np.ndarray):
    """One-to-one matching among the given (valid) pairs that maximises the number of matches, then
    their total IoU; yields ``(gt_labels, pred_labels)`` of the matched pairs, in batches.

    Pairs below the IoU threshold never help, so only the valid pairs enter. The bipartite graph
    they form splits into connected components that are matched independently (the optimum of the
    whole is the union of the components' optima), so the dense assignment matrix is per component:
    a prediction of 100 000 specks over thousands of GT lesions needs no (GT x prediction) matrix.
    """
    if len(pair_gt) == 0:
        return
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    gt_ids, gt_rows = np.unique(pair_gt, return_inverse=True)
    pred_ids, pred_cols = np.unique(pair_pred, return_inverse=True)
    n_g = len(gt_ids)
    graph = coo_matrix(
        (np.ones(len(pair_gt)), (gt_rows, n_g + pred_cols)), shape=(n_g + len(pred_ids), n_g + len(pred_ids))
    )
    _, component_of_node = connected_components(graph, directed=False)
    component = component_of_node[gt_rows]  # of each pair
    # Components with a single pair are that pair's match: no assignment to solve.
    pairs_per_component = np.bincount(component)
    single = pairs_per_component[component] == 1
    yield gt_ids[gt_rows[single]], pred_ids[pred_cols[single]]
    rest = np.flatnonzero(~single)
    rest = rest[np.argsort(component[rest], kind="stable")]
    bounds = np.flatnonzero(np.diff(component[rest])) + 1
    for members in np.split(rest, bounds):
        if len(members) == 0:
            continue
        rows_g, local_rows = np.unique(gt_rows[members], return_inverse=True)
        cols_p, local_cols = np.unique(pred_cols[members], return_inverse=True)
        # Maximising total IoU alone can trade two matches for one high-IoU match. Scoring every
        # pair as a bonus larger than any possible IoU sum maximises the number of matches first
        # and their total IoU second; absent pairs score 0 (never chosen as a match).
        bonus = float(min(len(rows_g), len(cols_p)) + 1)
        weights = np.zeros((len(rows_g), len(cols_p)))
        weights[local_rows, local_cols] = bonus + pair_iou[members]
        rows, cols = linear_sum_assignment(weights, maximize=True)
        good = weights[rows, cols] > 0
        yield gt_ids[rows_g[rows[good]]], pred_ids[cols_p[cols[good]]]


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
        valid = iou >= iou_threshold
        for gt_ids, pred_ids in _hungarian_matches(table.pair_gt[valid], table.pair_pred[valid], iou[valid]):
            gt_detected[gt_ids - 1] = True
            pred_matched[pred_ids - 1] = True
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
class LesionDice:
    """The lesion-level DSC values of one prediction, one entry per scoring unit.

    ``definition="paper"`` (Appendix B.0.2): a GT lesion and a predicted component match when they
    share any voxel; every matched pair is a unit with DSC 2|G n P| / (|G| + |P|) of that GT lesion
    G and that component P; a GT lesion with no match is a unit with DSC 0 (``pred_label`` 0).
    A GT lesion split over k components is k units; a component merging k GT lesions appears in k
    units, each scored with its full size. Predicted components matching no GT lesion are no unit.

    ``definition="criterion"`` (before issue 12): one unit per GT lesion, DSC against the union of
    the predicted components overlapping it (``pred_label`` -1), 0 when the detection criterion
    calls the lesion missed (FN) even if a component overlaps it.

    Units are sorted by GT label, then predicted label.
    """

    definition: str
    gt_index: np.ndarray  # (m,) int64, 0-based GT lesion index (GT label - 1)
    pred_label: np.ndarray  # (m,) int64, predicted component label; 0 = no match; -1 = union (criterion)
    dice: np.ndarray  # (m,) float64

    def per_gt_lesion(self) -> np.ndarray:
        """(n_gt,) DSC per GT lesion, where every GT lesion has exactly one unit (always for
        ``criterion``; for ``paper`` when no GT lesion is split). Raises ValueError otherwise."""
        if len(np.unique(self.gt_index)) != len(self.gt_index):
            raise ValueError("a GT lesion is matched by several predicted components; read the units")
        return self.dice


def lesion_dice_units(
    table: OverlapTable, gt_detected: np.ndarray, definition: str = "paper"
) -> LesionDice:
    """Lesion-level DSC units of one prediction from its overlap table (see :class:`LesionDice`);
    ``gt_detected`` (n_gt,) is the detection criterion's verdict, used by ``criterion`` only."""
    if definition not in LESION_DSC_DEFINITIONS:
        raise ValueError(f"lesion DSC definition must be one of {LESION_DSC_DEFINITIONS}, got {definition!r}")
    n_gt = table.n_gt
    inter_per_gt = np.bincount(table.pair_gt, weights=table.pair_voxels, minlength=n_gt + 1)[1:]
    if definition == "criterion":
        touching_pred_voxels = np.bincount(
            table.pair_gt, weights=table.pred_sizes[table.pair_pred], minlength=n_gt + 1
        )[1:]
        dice = np.where(
            gt_detected & (inter_per_gt > 0),
            2.0 * inter_per_gt / np.maximum(table.gt_sizes[1:] + touching_pred_voxels, 1),
            0.0,
        )
        return LesionDice(definition, np.arange(n_gt, dtype=np.int64), np.full(n_gt, -1, dtype=np.int64), dice)
    pair_dice = 2.0 * table.pair_voxels / (table.gt_sizes[table.pair_gt] + table.pred_sizes[table.pair_pred])
    unmatched = np.flatnonzero(inter_per_gt == 0)
    gt_index = np.concatenate((table.pair_gt - 1, unmatched)).astype(np.int64)
    pred_label = np.concatenate((table.pair_pred, np.zeros(len(unmatched)))).astype(np.int64)
    dice = np.concatenate((pair_dice, np.zeros(len(unmatched))))
    order = np.lexsort((pred_label, gt_index))
    return LesionDice(definition, gt_index[order], pred_label[order], dice[order].astype(np.float64))


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
    patient_pred: dict  # quantities.patient_quantities of the prediction's components
    lesion_detected: np.ndarray  # (n_gt,) bool
    lesion_n_overlapping: np.ndarray  # (n_gt,) int64, predicted components sharing a voxel with the lesion
    lesion_dsc: LesionDice

    @property
    def n_lesions_pred(self) -> int:
        return self.patient_pred["n_lesions"]

    @property
    def tmtv_pred_ml(self) -> float:
        return self.patient_pred["tmtv_ml"]

    @property
    def tla_pred(self) -> float:
        return self.patient_pred["total_tlg"]

    @property
    def lesion_dice(self) -> np.ndarray:
        """(n_gt,) lesion DSC per GT lesion; see :meth:`LesionDice.per_gt_lesion`."""
        return self.lesion_dsc.per_gt_lesion()

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
            "suv_max_pred": self.patient_pred["suv_max"],
            "suv_mean_pred": self.patient_pred["suv_mean"],
            "dmax_pred_mm": self.patient_pred["dmax_mm"],
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
    lesion_dsc: str = "paper",
) -> PredictionEvaluation:
    """Score one binary prediction (z, y, x) against an analysed GT (same shape, same spacing).

    Patient level: volume DSC, TP/FP/FN and F1 under ``criterion``, FPV (ml of predicted
    components touching no GT lesion), FNV (ml of GT lesions touching no predicted component),
    and the prediction's own patient quantities (``quantities.patient_quantities``: TMTV, total
    TLA, SUVmax, SUVmean, Dmax, lesion count). Lesion level: detection under ``criterion`` and the
    lesion DSC units of ``lesion_dsc`` (:class:`LesionDice`: ``paper`` per matched pair, the
    default; ``criterion`` per GT lesion, 0 when the criterion calls it missed). Empty cases follow
    ``empty_policy``.
    """
    if pred_mask.shape != gt.labels.shape:
        raise ValueError(f"prediction shape {pred_mask.shape} differs from GT shape {gt.labels.shape}")
    pred_labels, n_pred = label_lesions(pred_mask, connectivity)
    # Voxels foreground in either mask, from the GT's stored indices and one scan of the binary
    # prediction: no pass over the full-size label maps.
    pred_flat = np.flatnonzero(pred_mask)
    union = np.union1d(gt.flat_indices, pred_flat)
    gt_codes = gt.labels.ravel()[union]
    pred_codes = pred_labels.ravel()[union]
    table = overlap_table_from_codes(gt_codes, pred_codes, gt.n_lesions, n_pred)
    pred_label_at_suvmax = pred_labels.ravel()[gt.suvmax_flat_index]
    detection = detect_lesions(table, criterion, pred_label_at_suvmax, iou_threshold)

    vv = gt.voxel_volume_ml
    n_pred_voxels = int(table.pred_sizes.sum())
    n_gt_voxels = int(table.gt_sizes.sum())
    intersection = int(table.pair_voxels.sum())

    n_overlapping = np.bincount(table.pair_gt, minlength=gt.n_lesions + 1)[1:].astype(np.int64)
    gt_touched = n_overlapping > 0
    pred_touched = np.zeros(n_pred + 1, dtype=bool)
    pred_touched[table.pair_pred] = True
    fpv_voxels = int(table.pred_sizes[1:][~pred_touched[1:]].sum())
    fnv_voxels = int(gt.voxel_counts[~gt_touched].sum())
    suv_pred = np.ascontiguousarray(suv).ravel()[pred_flat]
    patient_pred = patient_quantities_from_flat(pred_flat, n_pred, suv_pred, pred_mask.shape, gt.spacing_mm)

    return PredictionEvaluation(
        dice=dice_from_counts(intersection, n_gt_voxels, n_pred_voxels, empty_policy),
        tp=detection.tp,
        fp=detection.fp,
        fn=detection.fn,
        f1=f1_from_counts(detection.tp, detection.fp, detection.fn, empty_policy),
        fpv_ml=fpv_voxels * vv,
        fnv_ml=fnv_voxels * vv,
        patient_pred=patient_pred,
        lesion_detected=detection.gt_detected,
        lesion_n_overlapping=n_overlapping,
        lesion_dsc=lesion_dice_units(table, detection.gt_detected, lesion_dsc),
    )


def ground_truth_case_metrics(gt: GroundTruthLesions) -> dict:
    """Patient-level numbers that depend on the GT only (columns of cases.csv)."""
    return {
        "n_lesions_gt": gt.n_lesions,
        "scenario": scenario_of(gt.n_lesions),
        "tmtv_gt_ml": gt.tmtv_ml,
        "tla_gt": gt.total_tla,
        "suv_max_gt": gt.patient["suv_max"],
        "suv_mean_gt": gt.patient["suv_mean"],
        "dmax_mm": gt.dmax_mm,
        "disease_gt": gt.n_lesions > 0,
    }


def lesion_table(gt: GroundTruthLesions) -> list[dict]:
    """One dict per GT lesion with its prediction-independent columns of lesions.csv (the
    quantities of ``quantities.lesion_quantities``; ``tla`` and ``tlg`` are the same number)."""
    rows = []
    for row in gt.quantities.rows():
        row["tla"] = row["tlg"]
        rows.append(row)
    return rows
