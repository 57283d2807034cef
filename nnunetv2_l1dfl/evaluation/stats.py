"""Paired statistics between trainers: one-sided Wilcoxon signed-rank tests with Bonferroni correction.

Cases are paired by case ID. Each metric is tested in the direction that means "better" for the
trainer under test compared with the reference trainer: greater for DSC, F1 and TP; less for FP,
FN, FPV and FNV. Pairs with a NaN on either side (an empty-empty case under the NaN policy) are
dropped and counted. The Bonferroni factor is the size of the declared family: the number of
metrics tested times the number of trainers compared with the reference.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from scipy.stats import wilcoxon

from nnunetv2_l1dfl.evaluation.definitions import DEFAULT_TEST_METRICS, METRIC_DIRECTIONS, ZERO_METHODS


def paired_wilcoxon(
    values: Sequence[float],
    reference_values: Sequence[float],
    better: str = "greater",
    zero_method: str = "wilcox",
) -> dict:
    """One-sided paired Wilcoxon signed-rank test that ``values`` are better than the reference.

    Args:
        values, reference_values: paired samples (same length, same case order).
        better: ``"greater"`` (H1: values - reference shifted above 0) or ``"less"``.
        zero_method: how scipy treats zero differences (``wilcox`` drops them).

    Returns a dict with ``n_pairs`` (pairs without NaN), ``n_dropped`` (pairs with a NaN),
    ``median_difference`` (median of values - reference), ``statistic`` and ``p_value``. No pairs:
    statistic and p are NaN. All differences zero: no evidence of a difference, p = 1.
    """
    if better not in ("greater", "less"):
        raise ValueError(f"better must be 'greater' or 'less', got {better!r}")
    if zero_method not in ZERO_METHODS:
        raise ValueError(f"zero_method must be one of {ZERO_METHODS}, got {zero_method!r}")
    x = np.asarray(values, dtype=np.float64)
    y = np.asarray(reference_values, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"paired samples must be 1D of the same length, got {x.shape} and {y.shape}")
    keep = np.isfinite(x) & np.isfinite(y)
    differences = x[keep] - y[keep]
    result = {
        "n_pairs": int(keep.sum()),
        "n_dropped": int((~keep).sum()),
        "median_difference": float(np.median(differences)) if len(differences) else float("nan"),
        "statistic": float("nan"),
        "p_value": float("nan"),
    }
    if len(differences) == 0:
        return result
    if not np.any(differences != 0):
        result.update(statistic=0.0, p_value=1.0)
        return result
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # scipy warns about the normal approximation with ties
        test = wilcoxon(x[keep], y[keep], zero_method=zero_method, alternative=better)
    result.update(statistic=float(test.statistic), p_value=float(test.pvalue))
    return result


def bonferroni(p_values: Sequence[float], family_size: int | None = None) -> np.ndarray:
    """Bonferroni-adjusted p-values: min(1, p x m), m = ``family_size`` or the number of p-values.
    NaN stays NaN."""
    p = np.asarray(p_values, dtype=np.float64)
    m = len(p) if family_size is None else int(family_size)
    if m < len(p):
        raise ValueError(f"family_size {m} is smaller than the number of p-values {len(p)}")
    return np.minimum(p * m, 1.0)


def compare_to_reference(
    metric_values: dict[str, dict[str, Sequence[float]]],
    reference: str,
    metrics: Sequence[str] = DEFAULT_TEST_METRICS,
    zero_method: str = "wilcox",
    alpha: float = 0.05,
) -> list[dict]:
    """Test every non-reference trainer against the reference on every metric of the family.

    Args:
        metric_values: ``{trainer: {metric: values}}``, values in the same case order for every
            trainer.
        reference: the trainer the others are compared with.
        metrics: the declared family of metrics; each must be in ``METRIC_DIRECTIONS``.
        alpha: significance level applied to the Bonferroni-adjusted p-values.

    Returns one dict per (trainer, metric) with the fields of :func:`paired_wilcoxon` plus
    ``trainer``, ``reference``, ``metric``, ``better``, ``family_size``, ``p_bonferroni`` and
    ``significant``.
    """
    unknown = [m for m in metrics if m not in METRIC_DIRECTIONS]
    if unknown:
        raise ValueError(f"no 'better' direction known for metrics {unknown}; known: {sorted(METRIC_DIRECTIONS)}")
    if reference not in metric_values:
        raise ValueError(f"reference trainer {reference!r} not among {sorted(metric_values)}")
    others = [t for t in metric_values if t != reference]
    family_size = len(others) * len(metrics)
    rows = []
    for trainer in others:
        for metric in metrics:
            row = {"trainer": trainer, "reference": reference, "metric": metric, "better": METRIC_DIRECTIONS[metric]}
            row.update(
                paired_wilcoxon(
                    metric_values[trainer][metric],
                    metric_values[reference][metric],
                    METRIC_DIRECTIONS[metric],
                    zero_method,
                )
            )
            rows.append(row)
    adjusted = bonferroni([row["p_value"] for row in rows], family_size) if rows else []
    for row, p in zip(rows, adjusted):
        row["family_size"] = family_size
        row["p_bonferroni"] = float(p)
        row["significant"] = bool(p < alpha) if np.isfinite(p) else False
    return rows
