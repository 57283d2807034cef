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
