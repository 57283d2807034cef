"""Red-team inputs for ``l1dfl compare`` and the agreement statistics (issue 12 review): each test
names the input, says what the code did before and asserts what it must do now."""

import math

import numpy as np
import pytest

from nnunetv2_l1dfl.evaluation import agreement as A

# ----------------------------------------------------------------------------- agreement edge cases


def test_ccc_of_two_patients_is_the_formula_value_without_an_interval():
    """n = 2: Lin's estimate 2 s_xy / (s_x^2 + s_y^2 + (m_x - m_y)^2) exists (was NaN); the interval
    needs n >= 3 (SE divides by n - 2). n = 1 and n = 0 stay NaN."""
    x, y = np.array([1.0, 3.0]), np.array([2.0, 3.5])
    sxx, syy = np.var(x), np.var(y)
    sxy = np.mean((x - x.mean()) * (y - y.mean()))
    expected = 2 * sxy / (sxx + syy + (x.mean() - y.mean()) ** 2)
    result = A.lins_ccc(x, y)
    assert result["n"] == 2 and result["ccc"] == pytest.approx(expected) and 0 < result["ccc"] < 1
    assert math.isnan(result["ci_low"]) and math.isnan(result["ci_high"])
    assert math.isnan(A.lins_ccc([1.0], [2.0])["ccc"]) and math.isnan(A.lins_ccc([], [])["ccc"])


def test_ccc_constant_samples_follow_lins_formula():
    """Both constant and equal: 0/0, NaN. Constant and different, or one constant: rho_c = 0."""
    assert math.isnan(A.lins_ccc([2.0, 2.0, 2.0], [2.0, 2.0, 2.0])["ccc"])
    assert A.lins_ccc([1.0, 1.0, 1.0], [2.0, 2.0, 2.0])["ccc"] == 0.0
    assert A.lins_ccc([1.0, 1.0, 1.0], [1.0, 2.0, 3.0])["ccc"] == 0.0


def test_ccc_never_exceeds_one_from_rounding():
    """y = x (1 + 1e-15) made 2 s_xy exceed s_x^2 + s_y^2 by rounding: rho_c was 1.0000000000000002."""
    x = np.random.default_rng(0).normal(size=1000) * 1e-3 + 7
    result = A.lins_ccc(x, x * (1 + 1e-15))
    assert result["ccc"] <= 1.0 and result["pearson_r"] <= 1.0
    assert result["ccc"] == pytest.approx(1.0)


def test_identical_predictions_and_gt():
    """Prediction = GT: CCC 1 (no interval), bias and LoA 0, TDI 0, CP 1, TOST equivalent (p 0)."""
    x = np.array([0.5, 1.0, 2.5, 4.0, 7.0])
    a = A.biomarker_agreement(x, x.copy())
    assert a["ccc"]["ccc"] == 1.0 and math.isnan(a["ccc"]["ci_low"])
    ba = a["bland_altman"]
    assert (ba["bias"], ba["loa_low"], ba["loa_high"]) == (0.0, 0.0, 0.0)
    assert a["tdi"]["tdi"] == 0.0 and a["tdi"]["tdi_upper"] == 0.0
    assert a["coverage_probability"]["cp"] == 1.0 and a["coverage_probability"]["observed"] == 1.0
    assert a["tost"]["equivalent"] and a["tost"]["p_value"] == 0.0


def test_coverage_probability_without_a_margin_is_undefined():
    """A GT mean of 0 (every case lesion-free: lesion count, TMTV) leaves Delta = 0; TOST said n/a but
    CP said 0.000; a negative limit gave CP = -1 (a negative probability)."""
    x, y = np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.1, 2.0, 3.3, 3.9])
    for limit in (0.0, -1.0, float("nan")):
        cp = A.coverage_probability(x, y, limit)
        assert math.isnan(cp["cp"]) and math.isnan(cp["observed"]), limit
    lesion_free = A.biomarker_agreement([0.0, 0.0, 0.0], [0.0, 2.0, 0.0])
    assert lesion_free["delta"] == 0.0
    assert math.isnan(lesion_free["coverage_probability"]["cp"])
    assert math.isnan(lesion_free["tost"]["p_value"]) and not lesion_free["tost"]["equivalent"]


def test_negative_mean_gt_keeps_a_positive_margin():
    """TLA of a PET with negative values can have a negative mean: Delta was 0.2 x mean < 0, so TOST
    gave no verdict and CP was negative. Delta = margin x |mean GT|."""
    gt = np.array([-1.0, -2.0, -3.0, -2.5])
    pred = gt + np.array([0.05, -0.05, 0.02, -0.01])
    a = A.biomarker_agreement(gt, pred)
    assert a["delta"] == pytest.approx(0.2 * 2.125)
    assert 0 <= a["coverage_probability"]["cp"] <= 1
    assert a["tost"]["equivalent"]


def test_coverage_observed_share_of_one_patient():
    """n = 1: the share of patients within the limit is defined (0 or 1); the normal CP is not."""
    cp = A.coverage_probability([2.0], [2.1], 0.5)
    assert cp["observed"] == 1.0 and math.isnan(cp["cp"])


def test_tdi_and_tost_with_few_patients():
    """TDI is defined from n = 2 (its bound from n = 3); TOST needs n >= 2."""
    t2 = A.total_deviation_index([1.0, 2.0], [1.5, 2.0])
    assert t2["tdi"] == pytest.approx(1.6448536269514722 * math.sqrt(0.25)) and math.isnan(t2["tdi_upper"])
    assert math.isnan(A.total_deviation_index([1.0], [1.5])["tdi"])
    assert math.isnan(A.tost_paired([1.0], [1.5], 1.0)["p_value"])


# ----------------------------------------------------------------------------- detection: iou criterion


def _brute_force_iou_matching(table, threshold: float) -> tuple[int, float]:
    """(number of matches, total IoU) of the best one-to-one matching, by trying every injection."""
    import itertools

    iou = {(int(g), int(p)): float(v) for g, p, v in zip(table.pair_gt, table.pair_pred, table.pair_iou())}
    valid = {k: v for k, v in iou.items() if v >= threshold}
    gts = sorted({g for g, _ in valid})
    preds = sorted({p for _, p in valid})
    best = (0, 0.0)
    for k in range(min(len(gts), len(preds)), 0, -1):
        for chosen in itertools.combinations(gts, k):
            for assigned in itertools.permutations(preds, k):
                if all((g, p) in valid for g, p in zip(chosen, assigned)):
                    total = sum(valid[(g, p)] for g, p in zip(chosen, assigned))
                    best = max(best, (k, total))
        if best[0] == k:
            break
    return best


def test_iou_matching_by_components_equals_brute_force():
    """The per-component Hungarian matching finds the same number of matches and total IoU as trying
    every one-to-one assignment, on random small scenes with splits, merges and chains."""
    from nnunetv2_l1dfl.evaluation import metrics as M

    rng = np.random.default_rng(12)
    for trial in range(60):
        gt = rng.uniform(size=(3, 6, 6)) < 0.25
        pred = rng.uniform(size=(3, 6, 6)) < 0.25
        gt_labels, n_gt = M.label_lesions(gt, 6)
        pred_labels, n_pred = M.label_lesions(pred, 6)
        if n_gt > 6 or n_pred > 6:
            continue
        table = M.overlap_table(gt_labels, pred_labels, n_gt, n_pred)
        detection = M.detect_lesions(table, "iou", iou_threshold=0.1)
        matched_gt = np.flatnonzero(detection.gt_detected) + 1
        matched_pred = np.flatnonzero(~detection.pred_false_positive) + 1
        count, total = _brute_force_iou_matching(table, 0.1)
        assert detection.tp == count == len(matched_pred), trial
        iou = {(int(g), int(p)): float(v) for g, p, v in zip(table.pair_gt, table.pair_pred, table.pair_iou())}
        # the matched pairs are a one-to-one assignment reaching the optimal total IoU
        best_total = max(
            (sum(iou.get((g, p), -1e9) for g, p in zip(matched_gt, perm)) for perm in
             __import__("itertools").permutations(matched_pred.tolist())),
            default=0.0,
        )  # fmt: skip
        assert best_total == pytest.approx(total), trial


_SPECKS_SCRIPT = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
import numpy as np
from nnunetv2_l1dfl.evaluation import metrics as M
shape = (120, 120, 120)
gt = np.zeros(shape, bool)
for z in range(0, 120, 6):
    for y in range(0, 120, 6):
        for x in range(0, 120, 6):
            gt[z:z + 5, y:y + 5, x:x + 5] = True
suv = np.ones(shape, np.float32)
g = M.analyse_ground_truth(gt, suv, (2.0, 2.0, 2.0))
pred = np.zeros(shape, bool)
pred[::2, ::2, ::2] = True
e = M.evaluate_prediction(g, pred, suv, criterion="iou", iou_threshold=0.1)
print(g.n_lesions, e.tp, e.fp, e.fn)
"""


def test_iou_criterion_on_216000_specks_over_8000_lesions_fits_in_3_gb():
    """8000 GT cubes of 125 voxels, each holding 27 one-voxel predicted specks: the iou criterion
    built a dense (GT x prediction) weight matrix of the overlapping labels, 8000 x 216000 floats =
    13.8 GB, and was killed for memory (at the default threshold, where no pair is even valid).
    Now only valid pairs enter, matched per connected component."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", _SPECKS_SCRIPT], capture_output=True, text=True, cwd=root, timeout=600,
        env={**__import__("os").environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    # IoU of a speck with its cube is 1/125 < 0.1: no match; every cube FN, every speck FP
    assert done.stdout.split() == ["8000", "0", str(60**3), "8000"]
