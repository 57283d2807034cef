"""Agreement of predicted PET biomarkers with the ground truth, per patient (Dzikunu et al., IEEE
TRPMS 2025, arXiv 2504.16237): Lin's concordance correlation coefficient, Bland-Altman bias and
limits of agreement, total deviation index and coverage probability (Lin 2000), and the TOST
equivalence test. Plain functions on paired 1D arrays; ``reference`` is always the GT and
``measured`` the prediction, and every difference is ``measured - reference``.

Formulas (stated here and in docs/evaluation.md so that each number can be checked by hand):

- CCC (Lin 1989): rho_c = 2 s_xy / (s_x^2 + s_y^2 + (m_x - m_y)^2) with moments over n (not n - 1).
  95 % CI: Fisher's z = atanh(rho_c) with Lin's delta-method standard error
  SE^2 = [ (1 - r^2) rho_c^2 / ((1 - rho_c^2) r^2) + 2 rho_c^3 (1 - rho_c) u^2 / (r (1 - rho_c^2)^2)
  - rho_c^4 u^4 / (2 r^2 (1 - rho_c^2)^2) ] / (n - 2), u = (m_x - m_y) / sqrt(s_x s_y), r Pearson's
  correlation; CI = tanh(z -+ z_{0.975} SE).
- Bland-Altman (1986): bias = mean(d), LoA = bias -+ 1.96 sd(d) (ddof 1); percent differences are
  100 d / ((measured + reference) / 2), the difference relative to the pair's mean.
- TDI at coverage p (Lin 2000, normal approximation): TDI_p = z_{(1+p)/2} sqrt(MSD) with
  MSD = sum(d^2) / (n - 1); its one-sided upper 95 % bound exp((W + z_{0.95} SE_W) / 2) z_{(1+p)/2}
  with W = ln(MSD), SE_W^2 = 2 (1 - mean(d)^4 / MSD^2) / (n - 2).
- Coverage probability of a limit delta (Lin 2000, d ~ normal): CP = Phi((delta - mean(d)) / sd(d))
  - Phi((-delta - mean(d)) / sd(d)).
- TOST (Schuirmann 1987) on the paired differences with bounds -+ Delta, Delta = margin x mean(GT)
  over the same patients (default margin 0.2, the paper's 20 %): two one-sided t-tests with n - 1
  degrees of freedom, p = max of the two; equivalent when p < alpha, i.e. when the 1 - 2 alpha
  confidence interval of mean(d) lies inside (-Delta, Delta).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats as st

#: the per-patient biomarkers: name -> (GT column, prediction column, unit) of cases.csv
BIOMARKERS = {
    "suv_max": ("suv_max_gt", "suv_max_pred", "SUV"),
    "suv_mean": ("suv_mean_gt", "suv_mean_pred", "SUV"),
    "tla": ("tla_gt", "tla_pred", "SUV x ml"),
    "tmtv": ("tmtv_gt_ml", "tmtv_pred_ml", "ml"),
    "lesion_count": ("n_lesions_gt", "n_lesions_pred", "lesions"),
    "dmax": ("dmax_mm", "dmax_pred_mm", "mm"),
}
#: how the biomarkers are named in the report
BIOMARKER_TITLES = {
    "suv_max": "SUVmax",
    "suv_mean": "SUVmean",
    "tla": "TLA (= TLG)",
    "tmtv": "TMTV",
    "lesion_count": "Lesion count",
    "dmax": "Lesion spread Dmax",
}

_NAN = float("nan")


def _pair(reference: Sequence[float], measured: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(reference, dtype=np.float64)
    y = np.asarray(measured, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"paired samples must be 1D of the same length, got {x.shape} and {y.shape}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError("paired samples must be finite (drop undefined pairs first: finite_pairs)")
    return x, y


def finite_pairs(reference: Sequence[float], measured: Sequence[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(reference, measured, keep)``: the pairs where both values are finite, and the mask."""
    x = np.asarray(reference, dtype=np.float64)
    y = np.asarray(measured, dtype=np.float64)
    keep = np.isfinite(x) & np.isfinite(y)
    return x[keep], y[keep], keep


def lins_ccc(reference: Sequence[float], measured: Sequence[float], confidence: float = 0.95) -> dict:
    """Lin's concordance correlation coefficient with its Fisher-z confidence interval.

    Returns ``n``, ``ccc``, ``ci_low``, ``ci_high``, ``pearson_r``, ``bias_correction`` (C_b =
    rho_c / r, the accuracy factor) and ``se_z``. The estimate is defined for n >= 2 unless both
    samples are constant and equal (0/0: NaN); one constant sample, or two constant and different
    ones, give rho_c = 0 (Lin's formula: no covariance). The interval needs n >= 3 (the SE divides
    by n - 2). |rho_c| = 1 (perfect agreement) gives no interval (bounds NaN): z is infinite. Where
    r = 0 or r is undefined the delta-method SE is undefined and the bounds are NaN. Rounding can
    put 2 s_xy a hair above s_x^2 + s_y^2: rho_c is clipped to [-1, 1].
    """
    x, y = _pair(reference, measured)
    n = len(x)
    result = {"n": n, "ccc": _NAN, "ci_low": _NAN, "ci_high": _NAN, "pearson_r": _NAN, "bias_correction": _NAN,
              "se_z": _NAN}  # fmt: skip
    if n < 2:
        return result
    mx, my = x.mean(), y.mean()
    sxx, syy = np.mean((x - mx) ** 2), np.mean((y - my) ** 2)
    sxy = np.mean((x - mx) * (y - my))
    denominator = sxx + syy + (mx - my) ** 2
    if denominator == 0:
        return result  # both constant and equal: agreement is not measurable as a correlation
    ccc = min(max(2 * sxy / denominator, -1.0), 1.0)
    result["ccc"] = float(ccc)
    if sxx == 0 or syy == 0:
        return result
    r = min(max(sxy / math.sqrt(sxx * syy), -1.0), 1.0)
    result["pearson_r"] = float(r)
    result["bias_correction"] = float(ccc / r) if r != 0 else _NAN
    if abs(ccc) >= 1 or r == 0 or n < 3:
        return result
    u = (mx - my) / math.sqrt(math.sqrt(sxx) * math.sqrt(syy))
    one_minus = 1 - ccc**2
    variance = (
        (1 - r**2) * ccc**2 / (one_minus * r**2)
        + 2 * ccc**3 * (1 - ccc) * u**2 / (r * one_minus**2)
        - ccc**4 * u**4 / (2 * r**2 * one_minus**2)
    ) / (n - 2)
    if not variance > 0:
        return result
    se = math.sqrt(variance)
    z = math.atanh(ccc)
    q = st.norm.ppf(0.5 + confidence / 2)
    result.update(se_z=se, ci_low=math.tanh(z - q * se), ci_high=math.tanh(z + q * se))
    return result


def bland_altman(reference: Sequence[float], measured: Sequence[float], agreement: float = 1.96) -> dict:
    """Bland-Altman bias and limits of agreement of ``measured - reference``, absolute and percent.

    Returns ``n``, ``bias``, ``sd`` (ddof 1), ``loa_low``, ``loa_high`` and ``percent`` = the same
    for 100 (measured - reference) / mean(measured, reference), over the pairs whose mean is not 0
    (``percent["n_excluded"]`` counts the others, e.g. TMTV 0 in both). sd and LoA need n >= 2.
    """
    x, y = _pair(reference, measured)

    def describe(d: np.ndarray) -> dict:
        n = len(d)
        bias = float(d.mean()) if n else _NAN
        sd = float(d.std(ddof=1)) if n > 1 else _NAN
        return {"n": n, "bias": bias, "sd": sd, "loa_low": bias - agreement * sd, "loa_high": bias + agreement * sd}

    result = describe(y - x)
    mean = (x + y) / 2
    nonzero = mean != 0
    percent = describe(100 * (y - x)[nonzero] / np.abs(mean[nonzero]))
    percent["n_excluded"] = int((~nonzero).sum())
    result["percent"] = percent
    return result


def total_deviation_index(
    reference: Sequence[float], measured: Sequence[float], coverage: float = 0.9, confidence: float = 0.95
) -> dict:
    """TDI at ``coverage`` (Lin 2000's normal approximation) and its one-sided upper bound.

    Returns ``n``, ``coverage``, ``msd`` (sum d^2 / (n - 1)), ``tdi`` and ``tdi_upper``; n < 3 gives
    NaN for the bound (n < 2 for everything). MSD 0 gives TDI 0 and bound 0.
    """
    x, y = _pair(reference, measured)
    if not 0 < coverage < 1:
        raise ValueError(f"coverage must be in (0, 1), got {coverage}")
    d = y - x
    n = len(d)
    result = {"n": n, "coverage": coverage, "msd": _NAN, "tdi": _NAN, "tdi_upper": _NAN}
    if n < 2:
        return result
    msd = float(np.sum(d**2) / (n - 1))
    k = st.norm.ppf(0.5 + coverage / 2)
    result.update(msd=msd, tdi=float(k * math.sqrt(msd)))
    if msd == 0:
        result["tdi_upper"] = 0.0
        return result
    if n >= 3:
        se_w = math.sqrt(max(2 * (1 - d.mean() ** 4 / msd**2) / (n - 2), 0.0))
        result["tdi_upper"] = float(k * math.exp((math.log(msd) + st.norm.ppf(confidence) * se_w) / 2))
    return result


def coverage_probability(reference: Sequence[float], measured: Sequence[float], limit: float) -> dict:
    """Probability that |measured - reference| < ``limit`` for a new patient, with the differences
    taken as normal with the sample mean and sd (Lin 2000). sd 0: 1 if |mean| < limit, else 0.
    Returns ``n``, ``limit``, ``cp`` and ``observed`` (the share of patients within the limit,
    defined from n = 1; ``cp`` needs n >= 2). A limit that is not a positive finite number (no
    margin: a GT mean of 0) gives NaN for both, as TOST has no verdict there."""
    x, y = _pair(reference, measured)
    d = y - x
    n = len(d)
    result = {"n": n, "limit": float(limit), "cp": _NAN, "observed": _NAN}
    if n < 1 or not (math.isfinite(limit) and limit > 0):
        return result
    result["observed"] = float(np.mean(np.abs(d) < limit))
    if n < 2:
        return result
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    if sd == 0:
        cp = float(abs(mean) < limit)
    else:
        cp = float(st.norm.cdf((limit - mean) / sd) - st.norm.cdf((-limit - mean) / sd))
    result["cp"] = cp
    return result


def tost_paired(reference: Sequence[float], measured: Sequence[float], bound: float, alpha: float = 0.05) -> dict:
    """TOST equivalence test of the mean paired difference ``measured - reference`` within
    (-bound, bound): H0 mean(d) <= -bound or mean(d) >= bound.

    Returns ``n``, ``bound``, ``mean_difference``, ``t_lower``, ``p_lower`` (H0 mean <= -bound),
    ``t_upper``, ``p_upper`` (H0 mean >= bound), ``p_value`` (the larger), ``ci_low``/``ci_high``
    (the 1 - 2 alpha interval of the mean difference) and ``equivalent`` (p < alpha). sd 0: p is 0
    when |mean| < bound and 1 otherwise. n < 2 or bound <= 0 (e.g. a GT mean of 0): NaN, not
    equivalent.
    """
    x, y = _pair(reference, measured)
    d = y - x
    n = len(d)
    result = {"n": n, "bound": float(bound), "alpha": alpha, "mean_difference": float(d.mean()) if n else _NAN,
              "t_lower": _NAN, "p_lower": _NAN, "t_upper": _NAN, "p_upper": _NAN, "p_value": _NAN,
              "ci_low": _NAN, "ci_high": _NAN, "equivalent": False}  # fmt: skip
    if n < 2 or not bound > 0:
        return result
    mean, se = float(d.mean()), float(d.std(ddof=1)) / math.sqrt(n)
    if se == 0:
        inside = abs(mean) < bound
        p = 0.0 if inside else 1.0
        result.update(p_lower=p, p_upper=p, p_value=p, ci_low=mean, ci_high=mean, equivalent=inside)
        return result
    t_lower = (mean + bound) / se
    t_upper = (mean - bound) / se
    p_lower = float(st.t.sf(t_lower, n - 1))
    p_upper = float(st.t.cdf(t_upper, n - 1))
    half = st.t.ppf(1 - alpha, n - 1) * se
    p = max(p_lower, p_upper)
    result.update(t_lower=float(t_lower), p_lower=p_lower, t_upper=float(t_upper), p_upper=p_upper, p_value=p,
                  ci_low=mean - half, ci_high=mean + half, equivalent=bool(p < alpha))  # fmt: skip
    return result


def biomarker_agreement(
    reference: Sequence[float],
    measured: Sequence[float],
    margin: float = 0.2,
    alpha: float = 0.05,
    coverage: float = 0.9,
) -> dict:
    """Every agreement statistic of one biomarker and one trainer against the GT.

    Pairs with an undefined value on either side (NaN: SUVmax, SUVmean or Dmax of a case without
    GT or without predicted lesions) are excluded and counted: ``n_excluded_no_gt`` (GT undefined),
    ``n_excluded_no_pred`` (GT defined, prediction undefined: a case whose lesions were all missed).
    The equivalence bound and the coverage-probability limit are both Delta = ``margin`` x |mean GT|
    of the included patients (the absolute value: a biomarker with a negative mean, e.g. the TLA of
    a PET with negative voxels, keeps a positive margin; a mean of 0 leaves none).
    """
    x_all = np.asarray(reference, dtype=np.float64)
    y_all = np.asarray(measured, dtype=np.float64)
    x, y, keep = finite_pairs(x_all, y_all)
    bound = margin * abs(float(x.mean())) if len(x) else _NAN
    return {
        "n": int(keep.sum()),
        "n_excluded_no_gt": int(np.sum(~np.isfinite(x_all))),
        "n_excluded_no_pred": int(np.sum(np.isfinite(x_all) & ~np.isfinite(y_all))),
        "mean_gt": float(x.mean()) if len(x) else _NAN,
        "mean_pred": float(y.mean()) if len(y) else _NAN,
        "margin": margin,
        "delta": bound,
        "ccc": lins_ccc(x, y),
        "bland_altman": bland_altman(x, y),
        "tdi": total_deviation_index(x, y, coverage),
        "coverage_probability": coverage_probability(x, y, bound),
        "tost": tost_paired(x, y, bound, alpha),
    }


def absolute_error_tests(
    gt: dict[str, np.ndarray],
    predicted: dict[str, dict[str, np.ndarray]],
    reference: str,
    biomarkers: Sequence[str] = tuple(BIOMARKERS),
    zero_method: str = "wilcox",
    alpha: float = 0.05,
) -> list[dict]:
    """Paired comparison of the trainers' absolute errors |prediction - GT| per patient: one-sided
    Wilcoxon signed-rank test (H1: the trainer's errors are smaller than the reference trainer's),
    Bonferroni over (trainers compared) x (biomarkers); pairs with an undefined error on either side
    are dropped and counted (as ``stats.paired_wilcoxon``).

    Args:
        gt: ``{biomarker: GT values}`` in case order.
        predicted: ``{trainer: {biomarker: predicted values}}`` in the same case order.
        reference: the trainer the others are compared with.
    """
    from nnunetv2_l1dfl.evaluation.stats import bonferroni, paired_wilcoxon

    if reference not in predicted:
        raise ValueError(f"reference trainer {reference!r} not among {sorted(predicted)}")
    others = [t for t in predicted if t != reference]
    family_size = len(others) * len(biomarkers)
    rows = []
    for trainer in others:
        for biomarker in biomarkers:
            truth = np.asarray(gt[biomarker], dtype=np.float64)
            errors = np.abs(np.asarray(predicted[trainer][biomarker], dtype=np.float64) - truth)
            reference_errors = np.abs(np.asarray(predicted[reference][biomarker], dtype=np.float64) - truth)
            row = {"trainer": trainer, "reference": reference, "biomarker": biomarker, "better": "less"}
            row.update(paired_wilcoxon(errors, reference_errors, "less", zero_method))
            rows.append(row)
    adjusted = bonferroni([row["p_value"] for row in rows], family_size) if rows else []
    for row, p in zip(rows, adjusted):
        row["family_size"] = family_size
        row["p_bonferroni"] = float(p)
        row["significant"] = bool(p < alpha) if np.isfinite(p) else False
    return rows
