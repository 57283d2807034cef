"""Metrics on hand-built cases whose every number is known (docs/evaluation.md definitions)."""

import itertools
import math

import numpy as np
import pytest

from nnunetv2_l1dfl.evaluation import metrics as M

SPACING = (2.0, 1.0, 1.0)  # one voxel = 0.002 ml
VOXEL_ML = 0.002


def case(shape=(6, 12, 12)):
    return np.zeros(shape, dtype=bool), np.ones(shape, dtype=np.float32)


def score(gt_mask, pred_mask, suv, criterion="suvmax", **kwargs):
    gt = M.analyse_ground_truth(gt_mask, suv, SPACING)
    return gt, M.evaluate_prediction(gt, pred_mask, suv, criterion=criterion, **kwargs)


def counts(evaluation):
    return evaluation.tp, evaluation.fp, evaluation.fn


# ----------------------------------------------------------------------------- ground truth


def test_ground_truth_lesion_statistics():
    gt_mask, suv = case()
    gt_mask[1:3, 1:4, 1:4] = True  # 18 voxels
    gt_mask[4, 8, 8:10] = True  # 2 voxels, one slice thick
    suv[1:3, 1:4, 1:4] = 2.0
    suv[2, 3, 3] = 7.0
    suv[4, 8, 8:10] = (4.0, 6.0)
    gt = M.analyse_ground_truth(gt_mask, suv, SPACING)
    assert gt.n_lesions == 2
    np.testing.assert_array_equal(gt.voxel_counts, [18, 2])
    np.testing.assert_allclose(gt.volume_ml, [18 * VOXEL_ML, 2 * VOXEL_ML])
    np.testing.assert_allclose(gt.suv_max, [7.0, 6.0])
    np.testing.assert_allclose(gt.suv_mean, [(17 * 2 + 7) / 18, 5.0])
    np.testing.assert_allclose(gt.tla, [(17 * 2 + 7) * VOXEL_ML, 10 * VOXEL_ML])
    np.testing.assert_array_equal(gt.suvmax_zyx, [[2, 3, 3], [4, 8, 9]])
    assert gt.tmtv_ml == pytest.approx(20 * VOXEL_ML)
    # Dmax between voxel centres (1, 1, 1) and (4, 8, 9): 6 mm, 7 mm, 8 mm apart
    assert gt.dmax_mm == pytest.approx(math.sqrt(6**2 + 7**2 + 8**2))
    row = M.ground_truth_case_metrics(gt)
    assert row["scenario"] == "multiple" and row["n_lesions_gt"] == 2 and row["disease_gt"]


def test_non_finite_pet_inside_lesion_is_an_error():
    gt_mask, suv = case()
    gt_mask[1, 1, 1] = True
    suv[1, 1, 1] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        M.analyse_ground_truth(gt_mask, suv, SPACING)


@pytest.mark.parametrize(
    "offset, connectivity, n_expected",
    [((0, 1, 1), 6, 2), ((0, 1, 1), 18, 1), ((1, 1, 1), 18, 2), ((1, 1, 1), 26, 1), ((0, 0, 1), 6, 1)],
)
def test_connectivity(offset, connectivity, n_expected):
    mask, _ = case()
    mask[2, 2, 2] = True
    mask[2 + offset[0], 2 + offset[1], 2 + offset[2]] = True
    assert M.label_lesions(mask, connectivity)[1] == n_expected


def test_bad_connectivity_is_rejected():
    with pytest.raises(ValueError, match="connectivity"):
        M.label_lesions(np.zeros((2, 2, 2), bool), 8)


# ----------------------------------------------------------------------------- detection cases


def test_split_prediction():
    """One GT lesion (z 1-2, y 1-6, x 1-2: 24 voxels, SUVmax at (1, 1, 1)) predicted as two
    components: P1 = y 1-2 (8 voxels, holds the SUVmax voxel), P2 = y 5-6 (8 voxels)."""
    gt_mask, suv = case()
    gt_mask[1:3, 1:7, 1:3] = True
    suv[1, 1, 1] = 9.0
    pred = np.zeros_like(gt_mask)
    pred[1:3, 1:3, 1:3] = True
    pred[1:3, 5:7, 1:3] = True
    expected = {"suvmax": (1, 0, 0), "overlap": (1, 0, 0), "iou": (1, 1, 0), "lymphoma_crit3": (1, 1, 0)}
    for criterion, tp_fp_fn in expected.items():
        _, ev = score(gt_mask, pred, suv, criterion)
        assert counts(ev) == tp_fp_fn, criterion
        assert ev.n_lesions_pred == 2
        assert ev.dice == pytest.approx(2 * 16 / (24 + 16))
        # paper (default): one DSC per matched pair, 2*8/(24+8) each, whatever the criterion
        units = ev.lesion_dsc
        assert units.definition == "paper"
        np.testing.assert_array_equal(units.gt_index, [0, 0])
        np.testing.assert_array_equal(units.pred_label, [1, 2])
        np.testing.assert_allclose(units.dice, [0.5, 0.5])
        with pytest.raises(ValueError, match="several predicted components"):
            _ = ev.lesion_dice
        assert ev.fpv_ml == 0.0 and ev.fnv_ml == 0.0
        # criterion: one DSC per GT lesion against the union of both components
        _, ev = score(gt_mask, pred, suv, criterion, lesion_dsc="criterion")
        assert ev.lesion_dice[0] == pytest.approx(2 * 16 / (24 + 16))
        np.testing.assert_array_equal(ev.lesion_dsc.pred_label, [-1])
    _, ev = score(gt_mask, pred, suv, "iou")
    assert ev.f1 == pytest.approx(2 / 3)


def test_merged_prediction():
    """Two GT lesions (8 voxels each) joined by one predicted component of 24 voxels (both lesions
    and the 8 voxels between them). Its IoU with each lesion is 8/24; on this tie crit3 pairs it
    with the lower label, GT1, whose SUVmax voxel it holds: TP 1, FN 1."""
    gt_mask, suv = case()
    gt_mask[1:3, 1:3, 1:3] = True
    gt_mask[1:3, 1:3, 5:7] = True
    suv[1, 1, 1] = 8.0
    suv[1, 1, 5] = 9.0
    pred = np.zeros_like(gt_mask)
    pred[1:3, 1:3, 1:7] = True  # 24 voxels including the 8 voxels between the lesions
    expected = {"suvmax": (2, 0, 0), "overlap": (2, 0, 0), "iou": (1, 0, 1), "lymphoma_crit3": (1, 0, 1)}
    for criterion, tp_fp_fn in expected.items():
        gt, ev = score(gt_mask, pred, suv, criterion)
        assert counts(ev) == tp_fp_fn, criterion
        assert gt.n_lesions == 2 and ev.n_lesions_pred == 1
        # paper: each GT lesion paired with the whole merged component, 2*8/(8+24), detected or not
        np.testing.assert_allclose(ev.lesion_dice, [2 * 8 / (8 + 24)] * 2)
        np.testing.assert_array_equal(ev.lesion_dsc.pred_label, [1, 1])
        # criterion: 2*8/(8+24) for a detected lesion, 0 for the one the criterion calls missed
        _, old = score(gt_mask, pred, suv, criterion, lesion_dsc="criterion")
        np.testing.assert_allclose(old.lesion_dice, np.where(old.lesion_detected, 2 * 8 / (8 + 24), 0.0))
        assert ev.dice == pytest.approx(2 * 16 / (16 + 24))
    np.testing.assert_array_equal(score(gt_mask, pred, suv, "lymphoma_crit3")[1].lesion_detected, [True, False])
    _, ev = score(gt_mask, pred, suv, "iou", iou_threshold=0.5)  # IoU 1/3 < 0.5: nothing matches
    assert counts(ev) == (0, 1, 2)


def test_lymphoma_crit3_pairs_component_with_highest_iou_lesion():
    """A component covering all of GT2 (8 voxels) and one voxel of GT1, where GT1's SUVmax lies:
    IoU with GT2 is 8/10 (with GT1 1/17), so it is judged against GT2 and holds GT2's SUVmax -> TP for GT2; GT1 is FN
    under crit3 although the suvmax criterion counts both."""
    gt_mask, suv = case()
    gt_mask[1:3, 1:3, 1:3] = True  # GT1
    gt_mask[1:3, 1:3, 4:6] = True  # GT2, separated by x = 3
    suv[1, 1, 2] = 9.0  # GT1's SUVmax
    suv[1, 1, 4] = 8.0  # GT2's SUVmax
    pred = np.zeros_like(gt_mask)
    pred[1:3, 1:3, 4:6] = True
    pred[1, 1, 2:4] = True  # bridge into GT1 through (1, 1, 3)
    _, crit3 = score(gt_mask, pred, suv, "lymphoma_crit3")
    _, suvmax = score(gt_mask, pred, suv, "suvmax")
    assert counts(crit3) == (1, 0, 1)
    np.testing.assert_array_equal(crit3.lesion_detected, [False, True])
    assert counts(suvmax) == (2, 0, 0)


def test_missed_suvmax_voxel():
    """The prediction covers the whole lesion but its SUVmax voxel: FN (not FP) under suvmax, TP
    under overlap; patient DSC 2*17/(18+17) either way, lesion DSC 0 when missed."""
    gt_mask, suv = case()
    gt_mask[1:3, 1:4, 1:4] = True
    suv[2, 2, 2] = 9.0
    pred = gt_mask.copy()
    pred[2, 2, 2] = False
    _, ev = score(gt_mask, pred, suv, "suvmax")
    assert counts(ev) == (0, 0, 1)
    assert ev.f1 == 0.0
    assert ev.dice == pytest.approx(34 / 35)
    assert ev.lesion_dice[0] == pytest.approx(34 / 35)  # paper: the overlapping pair's DSC
    assert score(gt_mask, pred, suv, "suvmax", lesion_dsc="criterion")[1].lesion_dice[0] == 0.0
    assert ev.fnv_ml == 0.0  # the lesion is touched (FNV is criterion-independent)
    _, ev = score(gt_mask, pred, suv, "overlap")
    assert counts(ev) == (1, 0, 0)
    assert ev.lesion_dice[0] == pytest.approx(34 / 35)


def test_issue12_sphere_without_its_seven_central_voxels():
    """Issue 12's example: a GT ball of radius 10 voxels (4169 voxels, hottest at the centre) and a
    prediction of the whole ball except the centre and its 6 face neighbours (one component, a shell
    around the hole). The paper's lesion DSC is 2 (N - 7) / (2N - 7) = 0.99916; the criterion-coupled
    definition gives 0 because the prediction misses the SUVmax voxel (suvmax: FN)."""
    r = np.arange(-12, 13)
    ball = (r[:, None, None] ** 2 + r[None, :, None] ** 2 + r[None, None, :] ** 2) <= 100
    gt_mask = ball.copy()
    suv = np.where(ball, 4.0, 1.0).astype(np.float32)
    suv[12, 12, 12] = 9.0
    pred = gt_mask.copy()
    for dz, dy, dx in [(0, 0, 0), (1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1)]:
        pred[12 + dz, 12 + dy, 12 + dx] = False
    n = int(ball.sum())
    assert n == 4169
    _, ev = score(gt_mask, pred, suv, "suvmax")
    assert counts(ev) == (0, 0, 1) and ev.n_lesions_pred == 1
    assert ev.lesion_dice[0] == pytest.approx(2 * (n - 7) / (2 * n - 7)) and ev.lesion_dice[0] > 0.999
    _, old = score(gt_mask, pred, suv, "suvmax", lesion_dsc="criterion")
    assert old.lesion_dice[0] == 0.0
    with pytest.raises(ValueError, match="lesion DSC definition"):
        score(gt_mask, pred, suv, lesion_dsc="union")


def test_criterion_lesion_dice_is_zero_for_every_lesion_the_criterion_misses():
    """GT1 (z 1-2, y 1-3, x 1-3: 18 voxels, SUVmax at (2, 2, 2)) is covered on slice z = 1 only
    (9 voxels): overlap 9, IoU 9/18. GT2 (x 8-9 on (1, 1): 2 voxels) is predicted exactly. GT1's
    overlap DSC is 2*9/(18+9) = 2/3, but suvmax and crit3 call it missed (its SUVmax voxel is
    outside), so its lesion DSC is 0 there under ``lesion_dsc="criterion"``; overlap and iou detect
    it and keep 2/3. The paper's definition gives 2/3 under every criterion."""
    gt_mask, suv = case()
    gt_mask[1:3, 1:4, 1:4] = True
    suv[2, 2, 2] = 9.0
    gt_mask[1, 1, 8:10] = True
    suv[1, 1, 9] = 5.0
    pred = np.zeros_like(gt_mask)
    pred[1, 1:4, 1:4] = True
    pred[1, 1, 8:10] = True
    expected = {
        "suvmax": ((1, 0, 1), [0.0, 1.0]),
        "lymphoma_crit3": ((1, 1, 1), [0.0, 1.0]),
        "overlap": ((2, 0, 0), [2 / 3, 1.0]),
        "iou": ((2, 0, 0), [2 / 3, 1.0]),
    }
    for criterion, (tp_fp_fn, lesion_dice) in expected.items():
        _, paper = score(gt_mask, pred, suv, criterion)
        np.testing.assert_allclose(paper.lesion_dice, [2 / 3, 1.0], err_msg=criterion)
        _, ev = score(gt_mask, pred, suv, criterion, lesion_dsc="criterion")
        assert counts(ev) == tp_fp_fn, criterion
        np.testing.assert_allclose(ev.lesion_dice, lesion_dice, err_msg=criterion)
        np.testing.assert_array_equal(ev.lesion_detected, np.asarray(lesion_dice) > 0, err_msg=criterion)
        assert ev.dice == pytest.approx(2 * 11 / (20 + 11)), criterion  # patient DSC is unaffected
        assert ev.fnv_ml == 0.0, criterion


def test_iou_matching_maximises_the_number_of_matches_above_threshold():
    """One row (z 1, y 1) along x: GT A = x 1-5 (5 voxels), GT B = x 7 (1 voxel); P2 = x 1
    (1 voxel), P1 = x 3-7 (5 voxels). IoU(A, P1) = 3/7, IoU(A, P2) = 1/5, IoU(B, P1) = 1/5,
    IoU(B, P2) = 0. Maximising total IoU picks A-P1 alone (3/7 > 2/5): one match. With the default
    threshold 0.1 both A-P2 and B-P1 are valid, so the right answer is two matches: TP 2, FP 0, FN 0."""
    gt_mask, suv = case()
    gt_mask[1, 1, 1:6] = True
    gt_mask[1, 1, 7] = True
    pred = np.zeros_like(gt_mask)
    pred[1, 1, 1] = True
    pred[1, 1, 3:8] = True
    gt, ev = score(gt_mask, pred, suv, "iou")
    assert gt.n_lesions == 2 and ev.n_lesions_pred == 2
    assert counts(ev) == (2, 0, 0)
    assert ev.f1 == 1.0
    np.testing.assert_array_equal(ev.lesion_detected, [True, True])
    # paper: pairs (A, P2) 2*1/(5+1), (A, P1) 2*3/(5+5), (B, P1) 2*1/(1+5); cc3d labels P2 (first in
    # array order) 1 and P1 2
    np.testing.assert_array_equal(ev.lesion_dsc.gt_index, [0, 0, 1])
    np.testing.assert_array_equal(ev.lesion_dsc.pred_label, [1, 2, 2])
    np.testing.assert_allclose(ev.lesion_dsc.dice, [2 * 1 / 6, 2 * 3 / 10, 2 * 1 / 6])
    # criterion: against all overlapping components: A meets 1 + 3 of 6 predicted voxels, B 1 of 5
    _, ev = score(gt_mask, pred, suv, "iou", lesion_dsc="criterion")
    np.testing.assert_allclose(ev.lesion_dice, [2 * 4 / (5 + 6), 2 * 1 / (1 + 5)])
    # above 1/5 only A-P1 (3/7) can match: TP 1, FP 1 (P2), FN 1 (B)
    _, ev = score(gt_mask, pred, suv, "iou", iou_threshold=0.25, lesion_dsc="criterion")
    assert counts(ev) == (1, 1, 1)
    np.testing.assert_array_equal(ev.lesion_detected, [True, False])
    np.testing.assert_allclose(ev.lesion_dice, [2 * 4 / (5 + 6), 0.0])


def test_iou_matching_on_a_hand_built_table():
    """detect_lesions on a 2x2 overlap table: GT sizes (10, 4), predicted sizes (10, 4); overlaps
    A-P1 8 (IoU 8/12), A-P2 1 (1/13), B-P1 1 (1/13), B-P2 none. Total IoU is largest for A-P1
    alone (2/3 > 2/13), but at threshold 0.05 A-P2 and B-P1 are two valid matches; at 0.1 only
    A-P1 is valid."""
    table = M.OverlapTable(
        gt_sizes=np.array([0, 10, 4]),
        pred_sizes=np.array([0, 10, 4]),
        pair_gt=np.array([1, 1, 2]),
        pair_pred=np.array([1, 2, 1]),
        pair_voxels=np.array([8, 1, 1]),
    )
    np.testing.assert_allclose(table.pair_iou(), [8 / 12, 1 / 13, 1 / 13])
    detection = M.detect_lesions(table, "iou", iou_threshold=0.05)
    assert (detection.tp, detection.fp, detection.fn) == (2, 0, 0)
    detection = M.detect_lesions(table, "iou", iou_threshold=0.1)
    assert (detection.tp, detection.fp, detection.fn) == (1, 1, 1)
    np.testing.assert_array_equal(detection.gt_detected, [True, False])
    np.testing.assert_array_equal(detection.pred_false_positive, [False, True])
    with pytest.raises(ValueError, match="iou_threshold"):
        M.detect_lesions(table, "iou", iou_threshold=0.0)


def test_false_positives_and_volumes():
    """GT: one 18-voxel lesion (SUV 2, hottest 4) predicted exactly, plus FP blobs of 4 and 1
    voxels (SUV 1) and a second GT lesion (2 voxels) that is missed."""
    gt_mask, suv = case()
    gt_mask[1:3, 1:4, 1:4] = True
    suv[1:3, 1:4, 1:4] = 2.0
    suv[1, 1, 1] = 4.0
    gt_mask[5, 10, 10:12] = True
    pred = np.zeros_like(gt_mask)
    pred[1:3, 1:4, 1:4] = True
    pred[0, 8:10, 8:10] = True
    pred[5, 0, 0] = True
    gt, ev = score(gt_mask, pred, suv)
    assert counts(ev) == (1, 2, 1)
    assert ev.f1 == pytest.approx(2 / (2 + 2 + 1))
    assert ev.fpv_ml == pytest.approx(5 * VOXEL_ML)
    assert ev.fnv_ml == pytest.approx(2 * VOXEL_ML)
    assert ev.tmtv_pred_ml == pytest.approx(23 * VOXEL_ML)
    assert ev.tla_pred == pytest.approx((17 * 2 + 4 + 5 * 1) * VOXEL_ML)
    assert ev.dice == pytest.approx(2 * 18 / (20 + 23))
    np.testing.assert_allclose(ev.lesion_dice, [1.0, 0.0])
    np.testing.assert_array_equal(ev.lesion_detected, [True, False])
    assert gt.tmtv_ml == pytest.approx(20 * VOXEL_ML)


def test_empty_cases_follow_the_policy():
    empty, suv = case()
    gt, ev = score(empty, empty, suv)
    assert math.isnan(ev.dice) and math.isnan(ev.f1)
    assert counts(ev) == (0, 0, 0) and ev.fpv_ml == 0.0 and ev.fnv_ml == 0.0
    assert math.isnan(gt.dmax_mm) and gt.n_lesions == 0
    assert M.ground_truth_case_metrics(gt)["scenario"] == "negative"
    _, ev = score(empty, empty, suv, empty_policy="one")
    assert ev.dice == 1.0 and ev.f1 == 1.0

    pred = empty.copy()
    pred[2, 2, 2:4] = True
    _, ev = score(empty, pred, suv)  # empty GT, a prediction
    assert ev.dice == 0.0 and ev.f1 == 0.0 and counts(ev) == (0, 1, 0)
    assert ev.fpv_ml == pytest.approx(2 * VOXEL_ML)
    for criterion in M.CRITERIA:
        assert counts(score(empty, pred, suv, criterion)[1]) == (0, 1, 0)

    _, ev = score(pred, empty, suv)  # a lesion, no prediction
    assert ev.dice == 0.0 and ev.f1 == 0.0 and counts(ev) == (0, 0, 1)
    assert ev.fnv_ml == pytest.approx(2 * VOXEL_ML)
    np.testing.assert_array_equal(ev.lesion_dice, [0.0])


def test_suvmax_ties_resolve_to_first_voxel_in_array_order():
    gt_mask, suv = case()
    gt_mask[1:3, 1:3, 1:3] = True
    suv[1, 2, 2] = 6.0  # first in array order of the two maxima
    suv[2, 1, 1] = 6.0
    gt = M.analyse_ground_truth(gt_mask, suv, SPACING)
    np.testing.assert_array_equal(gt.suvmax_zyx, [[1, 2, 2]])
    second_only = np.zeros_like(gt_mask)
    second_only[2, 1, 1] = True
    first_only = np.zeros_like(gt_mask)
    first_only[1, 2, 2] = True
    assert counts(M.evaluate_prediction(gt, second_only, suv)) == (0, 0, 1)
    assert counts(M.evaluate_prediction(gt, first_only, suv)) == (1, 0, 0)


def test_single_voxel_and_one_slice_lesions():
    gt_mask, suv = case()
    gt_mask[3, 5, 5] = True
    gt, ev = score(gt_mask, gt_mask, suv)
    assert gt.dmax_mm == 0.0 and ev.dice == 1.0 and counts(ev) == (1, 0, 0)
    slab, _ = case()
    slab[2, 1:6, 2:9] = True  # one slice, 5 x 7 voxels
    assert M.dmax_mm(slab, SPACING) == pytest.approx(math.hypot(4, 6))
    line, _ = case()
    line[1:5, 3, 3] = True  # collinear along z
    assert M.dmax_mm(line, SPACING) == pytest.approx(6.0)


def _dmax_oracle(mask, spacing):
    """All pairs with explicit loops over coordinate lists (slow, for small masks only)."""
    points = [np.array(p) * np.array(spacing) for p in zip(*np.nonzero(mask))]
    return max((float(np.sqrt(((a - b) ** 2).sum())) for a, b in itertools.combinations(points, 2)), default=0.0)


def test_dmax_matches_all_pairs_oracle_on_random_masks():
    rng = np.random.default_rng(7)
    for _ in range(12):
        mask = rng.random((5, 7, 6)) < rng.uniform(0.02, 0.4)
        if not mask.any():
            continue
        spacing = tuple(rng.uniform(0.5, 3.0, 3))
        assert M.dmax_mm(mask, spacing) == pytest.approx(_dmax_oracle(mask, spacing), rel=1e-12)


def test_max_pairwise_distance_degenerate_sets():
    assert M.max_pairwise_distance(np.zeros((0, 3))) == 0.0
    assert M.max_pairwise_distance(np.ones((4, 3))) == 0.0
    square = np.array([[0, 0, 0], [0, 3, 0], [0, 0, 4], [0, 3, 4], [0, 1, 1]], float)
    assert M.max_pairwise_distance(square) == pytest.approx(5.0)


# ----------------------------------------------------------------------------- tables and oracle


def test_overlap_table_dense_and_sparse_paths_agree(monkeypatch):
    rng = np.random.default_rng(3)
    gt_labels, n_gt = M.label_lesions(rng.random((6, 10, 10)) < 0.15)
    pred_labels, n_pred = M.label_lesions(rng.random((6, 10, 10)) < 0.15)
    dense = M.overlap_table(gt_labels, pred_labels, n_gt, n_pred)
    monkeypatch.setattr(M, "_DENSE_PAIR_LIMIT", 0)
    sparse = M.overlap_table(gt_labels, pred_labels, n_gt, n_pred)
    np.testing.assert_array_equal(dense.dense(), sparse.dense())
    # against a loop over component pairs
    table = dense.dense()
    for i in range(1, n_gt + 1):
        for j in range(1, n_pred + 1):
            assert table[i, j] == np.count_nonzero((gt_labels == i) & (pred_labels == j))
        assert table[i, 0] == np.count_nonzero((gt_labels == i) & (pred_labels == 0))


def _oracle(gt_mask, pred_mask, suv):
    """Per-component loops, written independently of the vectorised code."""
    gt_labels, n_gt = M.label_lesions(gt_mask)
    pred_labels, n_pred = M.label_lesions(pred_mask)
    tp_suvmax = tp_overlap = 0
    fnv = 0
    lesion_dice_suvmax, lesion_dice_overlap, pairs = [], [], []
    for i in range(1, n_gt + 1):
        lesion = gt_labels == i
        values = np.where(lesion, suv, -np.inf).ravel()
        hottest = int(np.argmax(values))  # argmax returns the first maximum in array order
        hit = bool(pred_mask.ravel()[hottest])
        tp_suvmax += hit
        touching = set(np.unique(pred_labels[lesion])) - {0}
        tp_overlap += bool(touching)
        fnv += 0 if touching else lesion.sum()
        union = np.isin(pred_labels, list(touching)) if touching else np.zeros_like(lesion)
        dice = 2 * (lesion & union).sum() / (lesion.sum() + union.sum()) if touching else 0.0
        lesion_dice_overlap.append(dice)
        lesion_dice_suvmax.append(dice if hit else 0.0)  # 0 for lesions the criterion misses
        for j in sorted(touching):  # the paper: every overlapping pair, 0 for an unmatched lesion
            component = pred_labels == j
            pairs.append((i - 1, j, 2 * (lesion & component).sum() / (lesion.sum() + component.sum())))
        if not touching:
            pairs.append((i - 1, 0, 0.0))
    fp = fpv = 0
    for j in range(1, n_pred + 1):
        component = pred_labels == j
        if not (component & gt_mask).any():
            fp += 1
            fpv += component.sum()
    return tp_suvmax, tp_overlap, fp, n_gt, fpv, fnv, lesion_dice_suvmax, lesion_dice_overlap, pairs


def test_against_loop_oracle_on_random_cases():
    rng = np.random.default_rng(11)
    for _ in range(6):
        gt_mask = rng.random((6, 12, 12)) < 0.08
        pred_mask = (gt_mask & (rng.random(gt_mask.shape) < 0.7)) | (rng.random(gt_mask.shape) < 0.04)
        suv = rng.integers(1, 6, gt_mask.shape).astype(np.float32)  # many ties
        tp_suvmax, tp_overlap, fp, n_gt, fpv, fnv, dice_suvmax, dice_overlap, pairs = _oracle(gt_mask, pred_mask, suv)
        _, ev = score(gt_mask, pred_mask, suv, "suvmax")
        assert counts(ev) == (tp_suvmax, fp, n_gt - tp_suvmax)
        assert ev.fpv_ml == pytest.approx(fpv * VOXEL_ML) and ev.fnv_ml == pytest.approx(fnv * VOXEL_ML)
        units = ev.lesion_dsc
        np.testing.assert_array_equal(units.gt_index, [g for g, _, _ in pairs])
        np.testing.assert_array_equal(units.pred_label, [p for _, p, _ in pairs])
        np.testing.assert_allclose(units.dice, [d for _, _, d in pairs])
        _, ev = score(gt_mask, pred_mask, suv, "suvmax", lesion_dsc="criterion")
        np.testing.assert_allclose(ev.lesion_dice, dice_suvmax)
        assert ev.dice == pytest.approx(M.dice_score(gt_mask, pred_mask))
        _, ev = score(gt_mask, pred_mask, suv, "overlap", lesion_dsc="criterion")
        assert counts(ev) == (tp_overlap, fp, n_gt - tp_overlap)
        np.testing.assert_allclose(ev.lesion_dice, dice_overlap)


def test_lesion_table_rows():
    gt_mask, suv = case()
    gt_mask[1:3, 1:3, 1:3] = True
    suv[1:3, 1:3, 1:3] = 4.0
    rows = M.lesion_table(M.analyse_ground_truth(gt_mask, suv, SPACING))
    # SUVpeak: the 6.2 mm sphere at (2, 1, 1) mm spacing holds 3 x 13 + 2 x 5 ... voxels; here only
    # its count matters: the sphere at any lesion voxel holds the 8 lesion voxels (SUV 4) and
    # background (SUV 1), so the value is checked in test_evaluation_quantities.py
    assert rows == [
        {
            "lesion_id": 1, "volume_ml": pytest.approx(8 * VOXEL_ML), "n_voxels": 8, "suv_max": 4.0,
            "suv_mean": 4.0, "tla": pytest.approx(32 * VOXEL_ML), "tlg": pytest.approx(32 * VOXEL_ML),
            "suvmax_z": 1, "suvmax_y": 1, "suvmax_x": 1, "centroid_z": 1.5, "centroid_y": 1.5, "centroid_x": 1.5,
            "suv_peak": rows[0]["suv_peak"], "suv_peak_at_max": rows[0]["suv_peak_at_max"],
        }
    ]  # fmt: skip
    assert 1.0 < rows[0]["suv_peak_at_max"] <= rows[0]["suv_peak"] < 4.0
