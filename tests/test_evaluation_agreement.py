"""Agreement statistics (agreement.py) against hand computation, Monte Carlo coverage of their
intervals, and independent packages: pingouin 0.7 (Bland-Altman lines of ``plot_blandaltman``,
``tost``) and statsmodels 0.15 (``ttost_paired``). No maintained registry package computes Lin's
CCC with its confidence interval (pingouin and statsmodels have none), so the CCC is checked against
a hand computation in a different algebraic form and its interval by simulation."""

import math

import numpy as np
import pytest
from scipy import stats as st
from scipy.stats import wilcoxon

from nnunetv2_l1dfl.evaluation import agreement as A

GT = np.array([2.0, 4.0, 6.0, 8.0, 10.0, 12.0])
PRED = np.array([2.5, 3.5, 6.5, 9.0, 9.0, 13.5])  # d = 0.5, -0.5, 0.5, 1, -1, 1.5


def test_ccc_hand_computation():
    """rho_c = 1 - mean(d^2) / (s_x^2 + s_y^2 + (m_x - m_y)^2), moments over n: the same number
    as 2 s_xy / (...) written another way; the accuracy factor C_b = rho_c / r."""
    d = PRED - GT
    mean_sq = np.mean(d**2)
    expected = 1 - mean_sq / (GT.var() + PRED.var() + (GT.mean() - PRED.mean()) ** 2)
    result = A.lins_ccc(GT, PRED)
    assert result["n"] == 6
    assert result["ccc"] == pytest.approx(expected, rel=1e-12)
    r = np.corrcoef(GT, PRED)[0, 1]
    assert result["pearson_r"] == pytest.approx(r) and result["bias_correction"] == pytest.approx(expected / r)
    assert result["ci_low"] < result["ccc"] < result["ci_high"] < 1


def test_ccc_ci_hand_computation_and_edge_cases():
    """The Fisher-z bounds from Lin's SE, term by term, on a case with a mean shift (u != 0)."""
    x = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0])
    y = np.array([1.5, 2.9, 3.2, 5.1, 5.4, 6.8, 8.3, 8.6])
    n = len(x)
    sx, sy = x.std(), y.std()
    r = np.corrcoef(x, y)[0, 1]
    ccc = 2 * r * sx * sy / (sx**2 + sy**2 + (x.mean() - y.mean()) ** 2)
    u = (x.mean() - y.mean()) / math.sqrt(sx * sy)
    terms = [
        (1 - r**2) * ccc**2 / ((1 - ccc**2) * r**2),
        2 * ccc**3 * (1 - ccc) * u**2 / (r * (1 - ccc**2) ** 2),
        -(ccc**4) * u**4 / (2 * r**2 * (1 - ccc**2) ** 2),
    ]
    se = math.sqrt(sum(terms) / (n - 2))
    result = A.lins_ccc(x, y)
    assert result["ccc"] == pytest.approx(ccc)
    assert result["ci_low"] == pytest.approx(math.tanh(math.atanh(ccc) - 1.959963984540054 * se))
    assert result["ci_high"] == pytest.approx(math.tanh(math.atanh(ccc) + 1.959963984540054 * se))
    perfect = A.lins_ccc(x, x)
    assert perfect["ccc"] == 1.0 and math.isnan(perfect["ci_low"])  # no interval at |rho_c| = 1
    assert math.isnan(A.lins_ccc(x[:1], y[:1])["ccc"]) and math.isnan(A.lins_ccc(x[:2], y[:2])["ci_low"])
    with pytest.raises(ValueError, match="finite"):
        A.lins_ccc([1.0, np.nan, 2.0], [1.0, 2.0, 3.0])


def test_ccc_interval_covers_the_true_value_95_percent_of_the_time():
    """Bivariate normal with sigma_x = 1, sigma_y = 1.2, rho = 0.9, mean shift 0.3: the true
    rho_c = 2 * 0.9 * 1.2 / (1 + 1.44 + 0.09). 600 samples of n = 40: coverage within 0.92-0.98
    (binomial sd 0.009 at 0.95)."""
    rng = np.random.default_rng(0)
    true = 2 * 0.9 * 1.2 / (1 + 1.44 + 0.09)
    cov = [[1.0, 0.9 * 1.2], [0.9 * 1.2, 1.44]]
    hits = 0
    for _ in range(600):
        x, y = rng.multivariate_normal([5.0, 5.3], cov, size=40).T
        result = A.lins_ccc(x, y)
        hits += result["ci_low"] <= true <= result["ci_high"]
    assert 0.92 <= hits / 600 <= 0.98


def test_bland_altman_hand_and_pingouin():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pingouin

    d = PRED - GT
    result = A.bland_altman(GT, PRED)
    assert result["bias"] == pytest.approx(2.0 / 6)
    assert result["sd"] == pytest.approx(d.std(ddof=1))
    assert result["loa_high"] == pytest.approx(2.0 / 6 + 1.96 * d.std(ddof=1))
    for percentage, ours in ((False, result), (True, result["percent"])):
        fig, ax = plt.subplots()
        pingouin.plot_blandaltman(PRED, GT, percentage=percentage, ax=ax)  # x - y = PRED - GT
        levels = sorted({round(float(line.get_ydata()[0]), 9) for line in ax.lines} - {0.0})
        plt.close(fig)
        assert levels == pytest.approx(sorted([ours["loa_low"], ours["bias"], ours["loa_high"]])), percentage
    # percent: relative to the pair's mean; pairs with mean 0 are excluded and counted
    zero = A.bland_altman([0.0, 2.0, 4.0], [0.0, 3.0, 4.0])
    assert zero["n"] == 3 and zero["percent"]["n"] == 2 and zero["percent"]["n_excluded"] == 1
    assert zero["percent"]["bias"] == pytest.approx((100 * 1 / 2.5 + 0) / 2)


def test_tdi_hand_computation_and_coverage():
    """d = 1, 2, -1, 0, 3: MSD = 15 / 4, TDI_0.9 = 1.6449 sqrt(3.75); W = ln 3.75 with
    SE_W^2 = 2 (1 - 1 / 3.75^2) / 3."""
    reference = np.zeros(5)
    measured = np.array([1.0, 2.0, -1.0, 0.0, 3.0])
    result = A.total_deviation_index(reference, measured, 0.9)
    k = st.norm.ppf(0.95)
    assert result["msd"] == pytest.approx(3.75)
    assert result["tdi"] == pytest.approx(k * math.sqrt(3.75))
    se_w = math.sqrt(2 * (1 - 1 / 3.75**2) / 3)
    assert result["tdi_upper"] == pytest.approx(k * math.exp((math.log(3.75) + st.norm.ppf(0.95) * se_w) / 2))
    assert A.total_deviation_index(reference, reference)["tdi"] == 0.0
    # with d ~ N(0, 2^2), 90 % of |d| lie below 1.645 * 2: the upper bound covers that about 95 %
    rng = np.random.default_rng(1)
    true = k * 2.0
    covered = sum(A.total_deviation_index(np.zeros(50), rng.normal(0, 2, 50))["tdi_upper"] >= true for _ in range(400))
    assert 0.91 <= covered / 400 <= 0.99


def test_coverage_probability_hand_computation():
    """d = +-0.5, +-1.5: mean 0, sd sqrt(5/3); CP(1) = 2 Phi(1 / sd) - 1; observed share 1/2."""
    result = A.coverage_probability(np.zeros(4), np.array([0.5, -0.5, 1.5, -1.5]), 1.0)
    assert result["cp"] == pytest.approx(2 * st.norm.cdf(1 / math.sqrt(5 / 3)) - 1)
    assert result["observed"] == 0.5
    assert A.coverage_probability(np.zeros(3), np.full(3, 0.5), 1.0)["cp"] == 1.0  # sd 0, inside
    assert A.coverage_probability(np.zeros(3), np.full(3, 2.0), 1.0)["cp"] == 0.0


def test_tost_against_statsmodels_and_pingouin():
    from pingouin import tost
    from statsmodels.stats.weightstats import ttost_paired

    rng = np.random.default_rng(2)
    gt = rng.gamma(4.0, 2.5, 30)
    pred = gt * rng.normal(1.03, 0.08, 30)
    bound = 0.2 * gt.mean()
    ours = A.tost_paired(gt, pred, bound)
    p_statsmodels, lower, upper = ttost_paired(pred, gt, -bound, bound)
    assert ours["p_value"] == pytest.approx(p_statsmodels, rel=1e-9)
    assert ours["p_lower"] == pytest.approx(lower[1], rel=1e-9) and ours["p_upper"] == pytest.approx(upper[1], rel=1e-9)
    assert ours["p_value"] == pytest.approx(float(tost(pred, gt, bound=bound, paired=True)["pval"].iloc[0]), rel=1e-9)
    assert ours["equivalent"] and ours["ci_low"] > -bound and ours["ci_high"] < bound
    far = A.tost_paired(gt, gt * 1.3, bound)  # every prediction 30 % high: not equivalent within 20 %
    assert not far["equivalent"] and far["p_value"] > 0.05
    assert far["p_value"] == pytest.approx(ttost_paired(gt * 1.3, gt, -bound, bound)[0], rel=1e-9)
    assert A.tost_paired(gt, gt, bound)["equivalent"]  # sd 0 inside the bounds
    assert not A.tost_paired(gt, gt, 0.0)["equivalent"]  # no margin (GT mean 0): never equivalent


def test_biomarker_agreement_excludes_and_counts_undefined_cases():
    """SUVmax is undefined (NaN) without lesions: a case without GT lesions and a case whose
    prediction is empty are left out of every statistic and counted apart; the margin is 20 % of
    the mean GT of the included cases."""
    gt = np.array([5.0, 7.0, np.nan, 9.0, 11.0, 6.0])
    pred = np.array([5.5, 6.5, 3.0, np.nan, 11.0, 6.0])
    result = A.biomarker_agreement(gt, pred)
    assert (result["n"], result["n_excluded_no_gt"], result["n_excluded_no_pred"]) == (4, 1, 1)
    kept_gt, kept_pred = np.array([5.0, 7.0, 11.0, 6.0]), np.array([5.5, 6.5, 11.0, 6.0])
    assert result["delta"] == pytest.approx(0.2 * kept_gt.mean())
    assert result["ccc"]["ccc"] == pytest.approx(A.lins_ccc(kept_gt, kept_pred)["ccc"])
    assert result["tost"]["bound"] == result["coverage_probability"]["limit"] == result["delta"]
    assert result["bland_altman"]["n"] == 4
    nothing = A.biomarker_agreement(np.full(3, np.nan), np.array([1.0, np.nan, 2.0]))  # no GT lesion anywhere
    assert (nothing["n"], nothing["n_excluded_no_gt"]) == (0, 3)
    assert math.isnan(nothing["delta"]) and math.isnan(nothing["ccc"]["ccc"]) and not nothing["tost"]["equivalent"]
    assert math.isnan(nothing["tost"]["p_value"]) and math.isnan(nothing["coverage_probability"]["cp"])


def test_absolute_error_tests_match_scipy_with_bonferroni():
    rng = np.random.default_rng(4)
    gt = {b: rng.gamma(3.0, 2.0, 12) for b in A.BIOMARKERS}
    predicted = {
        "ref": {b: v + rng.normal(0, 1.0, 12) for b, v in gt.items()},
        "new": {b: v + rng.normal(0, 0.2, 12) for b, v in gt.items()},
    }
    predicted["new"]["suv_max"][0] = np.nan  # an undefined pair is dropped and counted
    rows = A.absolute_error_tests(gt, predicted, "ref")
    assert len(rows) == 6 and all(r["family_size"] == 6 for r in rows)
    row = next(r for r in rows if r["biomarker"] == "suv_max")
    assert row["n_pairs"] == 11 and row["n_dropped"] == 1
    new = np.abs(predicted["new"]["suv_max"] - gt["suv_max"])[1:]
    ref = np.abs(predicted["ref"]["suv_max"] - gt["suv_max"])[1:]
    p = wilcoxon(new, ref, alternative="less").pvalue
    assert row["p_value"] == pytest.approx(p) and row["p_bonferroni"] == pytest.approx(min(1.0, 6 * p))
