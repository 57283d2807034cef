"""From per-case and per-lesion rows to every number of the report: Table 1, strata, patient-level
detection, statistics and calibration, gathered in one JSON-serialisable dict.

Conventions: means and standard deviations (sample, ddof = 1) and medians/quartiles (numpy's
linear interpolation) ignore NaN values, whose number is reported as ``n_nan``. Strata are always
defined from the GT, with the edges stored beside the numbers.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from nnunetv2_l1dfl import __version__
from nnunetv2_l1dfl.evaluation.stats import compare_to_reference

TABLE1_METRICS = ("dice", "tp", "fp", "fn", "f1")
TABLE1_SCENARIOS = ("all", "single", "multiple")


def describe(values: Sequence[float]) -> dict:
    """n (finite values), n_nan, mean, sd (ddof=1), median, q1, q3; NaN statistics when empty."""
    x = np.asarray(values, dtype=np.float64)
    finite = x[np.isfinite(x)]
    nan = float("nan")
    if len(finite) == 0:
        return {"n": 0, "n_nan": int(len(x)), "mean": nan, "sd": nan, "median": nan, "q1": nan, "q3": nan}
    q1, median, q3 = np.quantile(finite, [0.25, 0.5, 0.75])
    return {
        "n": int(len(finite)),
        "n_nan": int(len(x) - len(finite)),
        "mean": float(finite.mean()),
        "sd": float(finite.std(ddof=1)) if len(finite) > 1 else nan,
        "median": float(median),
        "q1": float(q1),
        "q3": float(q3),
    }


def _median(values: Sequence[float]) -> float:
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    return float(np.median(x)) if len(x) else float("nan")


def bin_edges(values: Sequence[float], quantiles: Sequence[float], edges: Sequence[float] | None) -> list[float]:
    """Edges given explicitly, else the quantiles of the finite values (duplicates merged)."""
    if edges is not None:
        return [float(e) for e in edges]
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    if len(x) == 0:
        return []
    unique = np.unique(np.quantile(x, quantiles))
    return [float(e) for e in (unique if len(unique) > 1 else np.repeat(unique, 2))]


def assign_bins(values: Sequence[float], edges: Sequence[float]) -> np.ndarray:
    """Bin index of each value for edges e0 <= e1 <= ... <= ek: bin b = [e_b, e_b+1), the last bin
    closed [e_k-1, e_k]; -1 outside the edges, for NaN, or without edges."""
    x = np.asarray(values, dtype=np.float64)
    if len(edges) < 2:
        return np.full(len(x), -1, dtype=np.int64)
    e = np.asarray(edges, dtype=np.float64)
    index = np.searchsorted(e, x, side="right") - 1
    index[x == e[-1]] = len(e) - 2
    index[~np.isfinite(x) | (x < e[0]) | (x > e[-1])] = -1
    return index.astype(np.int64)


def _bin_label(lower: float, upper: float, last: bool, unit: str) -> str:
    return f"[{lower:.4g}, {upper:.4g}{']' if last else ')'} {unit}"


class _CaseTable:
    """Case rows arranged as per-trainer arrays aligned on the sorted case IDs."""

    def __init__(self, case_rows: list[dict], trainers: list[str]):
        self.trainers = trainers
        self.case_ids = sorted({row["case_id"] for row in case_rows})
        position = {c: i for i, c in enumerate(self.case_ids)}
        self.rows = {t: [None] * len(self.case_ids) for t in trainers}
        for row in case_rows:
            self.rows[row["trainer"]][position[row["case_id"]]] = row
        for trainer, rows in self.rows.items():
            missing = [c for c, r in zip(self.case_ids, rows) if r is None]
            if missing:
                raise ValueError(f"{trainer} has no result for cases {missing}")
        self.gt = self.rows[trainers[0]]  # GT columns are identical for every trainer

    def gt_values(self, column: str) -> np.ndarray:
        return np.array([r[column] for r in self.gt])

    def values(self, trainer: str, column: str) -> np.ndarray:
        return np.array([r[column] for r in self.rows[trainer]], dtype=np.float64)


def _table1(table: _CaseTable, selected: np.ndarray, statistics: list[dict], reference: str) -> list[dict]:
    p_of = {row["trainer"]: row for row in statistics if row["metric"] == "dice"}
    rows = []
    for trainer in table.trainers:
        row = {"trainer": trainer, "n_cases": int(selected.sum())}
        for metric in TABLE1_METRICS:
            row[metric] = describe(table.values(trainer, metric)[selected])
        test = p_of.get(trainer)
        row["tested"] = test is not None
        row["p_dice"] = test["p_bonferroni"] if test else None
        row["significant"] = test["significant"] if test else None
        row["is_reference"] = trainer == reference
        rows.append(row)
    return rows


def _patient_detection(table: _CaseTable) -> dict:
    disease = table.gt_values("disease_gt").astype(bool)
    result = {}
    for trainer in table.trainers:
        called = np.array([r["disease_pred"] for r in table.rows[trainer]], dtype=bool)
        tp, fn = int(np.sum(disease & called)), int(np.sum(disease & ~called))
        tn, fp = int(np.sum(~disease & ~called)), int(np.sum(~disease & called))
        n = len(disease)
        result[trainer] = {
            "tp": tp,
            "fp": fp,
            "tn": tn,
            "fn": fn,
            "accuracy": (tp + tn) / n if n else float("nan"),
            "sensitivity": tp / (tp + fn) if tp + fn else float("nan"),
            "specificity": tn / (tn + fp) if tn + fp else float("nan"),
        }
    return result


def _tmtv_thresholds(table: _CaseTable, options) -> dict:
    tmtv = table.gt_values("tmtv_gt_ml").astype(np.float64)
    scenario = table.gt_values("scenario")
    groups = {}
    for name in TABLE1_SCENARIOS:
        members = (tmtv > 0) & ((scenario == name) if name != "all" else True)
        if options.tmtv_edges_ml is not None:
            thresholds = [float(e) for e in options.tmtv_edges_ml]
            quantiles = [None] * len(thresholds)
        elif members.any():
            thresholds = [float(v) for v in np.quantile(tmtv[members], options.tmtv_quantiles)]
            quantiles = [float(q) for q in options.tmtv_quantiles]
        else:
            thresholds, quantiles = [], []
        rows = []
        for threshold, quantile in zip(thresholds, quantiles):
            selected = members & (tmtv >= threshold)
            rows.append(
                {
                    "threshold_ml": threshold,
                    "quantile": quantile,
                    "n_cases": int(selected.sum()),
                    "median_dice": {t: _median(table.values(t, "dice")[selected]) for t in table.trainers},
                }
            )
        groups[name] = {"n_cases": int(members.sum()), "thresholds": rows}
    return {"source": "edges" if options.tmtv_edges_ml is not None else "quantiles", "groups": groups}


def _grouped(values_by_trainer: dict[str, np.ndarray], index: np.ndarray, edges: list[float], prefix: str, unit: str):
    bins = []
    for b in range(max(len(edges) - 1, 0)):
        selected = index == b
        bins.append(
            {
                "name": f"{prefix}{b}",
                "label": _bin_label(edges[b], edges[b + 1], b == len(edges) - 2, unit),
                "lower": edges[b],
                "upper": edges[b + 1],
                "n": int(selected.sum()),
                "dice": {t: describe(v[selected]) for t, v in values_by_trainer.items()},
            }
        )
    return bins


def assign_strata(case_rows: list[dict], lesion_rows: list[dict], options) -> dict:
    """Compute the Dmax-group and lesion-volume-bin edges from the GT and write each row's group
    into a ``dmax_group`` (multiple-lesion cases only) / ``volume_bin`` column; returns the edges."""
    multiple = [r for r in case_rows if r["scenario"] == "multiple"]
    dmax_of_case = {r["case_id"]: r["dmax_mm"] for r in multiple}
    dmax_edges = bin_edges(list(dmax_of_case.values()), options.dmax_quantiles, options.dmax_edges_mm)
    group_of_case = dict(zip(dmax_of_case, assign_bins(list(dmax_of_case.values()), dmax_edges)))
    for row in case_rows:
        group = group_of_case.get(row["case_id"], -1)
        row["dmax_group"] = f"G{group}" if group >= 0 else ""
    volume_of_lesion = {(r["case_id"], r["lesion_id"]): r["volume_ml"] for r in lesion_rows}
    volume_edges = bin_edges(
        list(volume_of_lesion.values()), options.lesion_volume_quantiles, options.lesion_volume_edges_ml
    )
    bin_of_lesion = dict(zip(volume_of_lesion, assign_bins(list(volume_of_lesion.values()), volume_edges)))
    for row in lesion_rows:
        b = bin_of_lesion[(row["case_id"], row["lesion_id"])]
        row["volume_bin"] = f"V{b}" if b >= 0 else ""
    return {"dmax_edges_mm": dmax_edges, "lesion_volume_edges_ml": volume_edges}


def _dmax_groups(table: _CaseTable, edges: list[float], options) -> dict:
    multiple = table.gt_values("scenario") == "multiple"
    dmax = table.gt_values("dmax_mm").astype(np.float64)
    index = np.where(multiple, assign_bins(dmax, edges), -2)
    dice = {t: table.values(t, "dice") for t in table.trainers}
    return {
        "source": "edges" if options.dmax_edges_mm is not None else "quantiles",
        "edges_mm": edges,
        "n_cases": int(multiple.sum()),
        "n_outside": int(np.sum(index == -1)),
        "groups": _grouped(dice, index, edges, "G", "mm"),
    }


def _lesion_bins(lesion_rows: list[dict], trainers: list[str], edges: list[float], options) -> dict:
    bins = []
    for b in range(max(len(edges) - 1, 0)):
        name = f"V{b}"
        entry = {
            "name": name,
            "label": _bin_label(edges[b], edges[b + 1], b == len(edges) - 2, "ml"),
            "lower": edges[b],
            "upper": edges[b + 1],
            "n_lesions": 0,
            "trainers": {},
        }
        for trainer in trainers:
            rows = [r for r in lesion_rows if r["trainer"] == trainer and r["volume_bin"] == name]
            detected = _detected_per_gt_lesion(rows)
            entry["n_lesions"] = len(detected)
            entry["n_units"] = len(rows)
            entry["trainers"][trainer] = {
                "detection_rate": float(detected.mean()) if len(detected) else float("nan"),
                "dice": describe([r["dice"] for r in rows]),
            }
        bins.append(entry)
    n_outside = len({(r["case_id"], r["lesion_id"]) for r in lesion_rows if r["trainer"] == trainers[0] and r["volume_bin"] == ""})
    return {
        "source": "edges" if options.lesion_volume_edges_ml is not None else "quantiles",
        "edges_ml": edges,
        "n_outside": n_outside,
        "bins": bins,
    }


def _detected_per_gt_lesion(rows: list[dict]) -> np.ndarray:
    """Detection flags, one per GT lesion: a lesion split over several DSC units (``paper``) has
    several rows, all with the same ``detected``."""
    flags = {(r["case_id"], r["lesion_id"]): r["detected"] for r in rows}
    return np.array(list(flags.values()), dtype=bool)


def _lesion_overall(lesion_rows: list[dict], trainers: list[str]) -> dict:
    result = {}
    for trainer in trainers:
        rows = [r for r in lesion_rows if r["trainer"] == trainer]
        detected = _detected_per_gt_lesion(rows)
        result[trainer] = {
            "n_lesions": len(detected),
            "n_dice_units": len(rows),
            "n_detected": int(detected.sum()),
            "detection_rate": float(detected.mean()) if len(detected) else float("nan"),
            "dice": describe([r["dice"] for r in rows]),
        }
    return result


def policies(options) -> dict:
    """The edge-case policies in force, in words (printed in the report)."""
    empty = (
        "NaN: excluded from means, medians and tests, counted as n_nan"
        if options.empty_policy == "nan"
        else "1.0 (perfect agreement)"
    )
    return {
        "foreground": "label > 0" if options.label is None else f"label == {options.label}",
        "lesions": f"connected components, {options.connectivity}-connectivity",
        "detection": {
            "suvmax": "GT lesion TP if its SUVmax voxel is inside the prediction, else FN; predicted "
            "component touching no GT lesion is FP",
            "overlap": "GT lesion TP if any predicted voxel overlaps it, else FN; predicted component "
            "touching no GT lesion is FP",
            "iou": f"one-to-one Hungarian matching among pairs with IoU >= {options.iou_threshold}, maximising "
            "the number of matches, then their total IoU; matched GT lesions TP, unmatched GT lesions FN, "
            "unmatched predicted components FP",
            "lymphoma_crit3": "each predicted component paired with its highest-IoU GT lesion, TP if it "
            "contains that lesion's SUVmax voxel, else FP; GT lesions without a TP component FN",
        }[options.criterion],
        "suvmax_ties": "the first voxel in array (z, y, x) order",
        "empty_gt_and_prediction": f"DSC and F1 = {empty}",
        "empty_gt_with_prediction": "DSC 0, F1 0, every predicted component FP",
        "f1": "2TP / (2TP + FP + FN) per case",
        "lesion_dice": (
            "the paper's (Appendix B.0.2): a GT lesion and a predicted component match when they share "
            "any voxel; DSC of every matched pair (a GT lesion split over k components gives k pairs, a "
            "component merging k GT lesions is scored against each with its full size); DSC 0 only for a "
            "GT lesion no component overlaps; components matching no GT lesion are not scored here"
            if options.lesion_dsc == "paper"
            else "one per GT lesion, against the union of predicted components overlapping the lesion; 0 "
            "when the detection criterion calls the lesion missed (FN), even if a component overlaps it"
        ),
        "fpv_fnv": "ml of predicted components touching no GT lesion / of GT lesions touching no "
        "predicted component (criterion-independent)",
        "dmax": "largest distance between GT foreground voxel centres (mm), from convex-hull vertices; "
        "NaN without GT lesions, 0 for one voxel",
        "tla": "sum of SUV x voxel volume (SUV x ml)",
        "summary_statistics": "NaN values ignored and counted; sd with ddof=1; quantiles by linear interpolation",
        "statistics": "one-sided paired Wilcoxon signed-rank, H1: trainer better than the reference; pairs "
        f"with NaN dropped; zero_method={options.zero_method}; all-zero differences give p = 1; "
        f"Bonferroni over the declared family; alpha = {options.alpha}",
        "predictions": "scored as found (raw validation/ or given folders); no postprocessing applied",
        "agreement": "per patient, prediction against GT: SUVmax / SUVmean over all lesion voxels of the "
        "case, TLA = total TLG, TMTV, lesion count, Dmax; a case where a biomarker is undefined (SUVmax, "
        "SUVmean, Dmax without GT or without predicted lesions) is left out of that biomarker and counted; "
        "differences are prediction - GT; Lin's CCC with a Fisher-z 95 % CI (Lin's delta-method SE); "
        "Bland-Altman bias +- 1.96 sd, percent relative to the pair's mean; TDI at "
        f"{options.tdi_coverage:g} coverage and coverage probability of +-Delta (Lin 2000, normal "
        f"approximation); TOST on the paired differences with bounds +-Delta, Delta = "
        f"{options.equivalence_margin:g} x mean GT of the included cases, alpha = {options.alpha}; "
        "absolute errors compared with the reference by one-sided Wilcoxon (H1: smaller), Bonferroni over "
        "trainers x biomarkers",
        "calibration_region": (
            f"GT dilated by a cube of +-{options.calibration_margin_voxels} voxels plus the predicted foreground"
            if options.calibration_region == "lesion_roi"
            else "the whole volume"
        ),
    }


def _agreement(table: _CaseTable, options) -> dict:
    from nnunetv2_l1dfl.evaluation.agreement import BIOMARKERS, absolute_error_tests, biomarker_agreement

    gt = {b: table.gt_values(g).astype(np.float64) for b, (g, _, _) in BIOMARKERS.items()}
    predicted = {t: {b: table.values(t, p) for b, (_, p, _) in BIOMARKERS.items()} for t in table.trainers}
    biomarkers = {}
    for name, (_, _, unit) in BIOMARKERS.items():
        biomarkers[name] = {
            "unit": unit,
            "trainers": {
                t: biomarker_agreement(
                    gt[name], predicted[t][name], options.equivalence_margin, options.alpha, options.tdi_coverage
                )
                for t in table.trainers
            },
        }
    tests = absolute_error_tests(gt, predicted, table.trainers[0], tuple(BIOMARKERS), options.zero_method, options.alpha)
    for row in tests:
        biomarkers[row["biomarker"]]["trainers"][row["trainer"]]["absolute_error_test"] = row
    return {
        "margin": options.equivalence_margin,
        "alpha": options.alpha,
        "tdi_coverage": options.tdi_coverage,
        "biomarkers": biomarkers,
        "absolute_error_tests": tests,
    }


def build_summary(
    case_rows: list[dict],
    lesion_rows: list[dict],
    calibration: dict[str, dict],
    trainers: list[str],
    options,
    inputs: dict,
) -> dict:
    """Every number of the report as a dict (NaN where undefined; the writer maps NaN to null).

    Adds the ``dmax_group`` column to ``case_rows`` and ``volume_bin`` to ``lesion_rows``.
    The first trainer is the reference of the statistics.
    """
    if len(trainers) < 2:
        raise ValueError(f"need at least two trainers, got {trainers}")
    reference = trainers[0]
    table = _CaseTable(case_rows, trainers)
    edges = assign_strata(case_rows, lesion_rows, options)
    scenario = table.gt_values("scenario")
    statistics = compare_to_reference(
        {t: {m: table.values(t, m) for m in options.test_metrics} for t in trainers},
        reference,
        options.test_metrics,
        options.zero_method,
        options.alpha,
    )
    everything = np.ones(len(table.case_ids), dtype=bool)
    table1 = {"all": _table1(table, everything, statistics, reference)}
    for name in ("single", "multiple"):
        table1[name] = _table1(table, scenario == name, [], reference)
    negative = scenario == "negative"
    return {
        "tool": "l1dfl compare",
        "version": __version__,
        "inputs": inputs,
        "options": options.as_dict(),
        "policies": policies(options),
        "trainers": list(trainers),
        "reference": reference,
        "cases": {
            "n": len(table.case_ids),
            "negative": int(negative.sum()),
            "single": int(np.sum(scenario == "single")),
            "multiple": int(np.sum(scenario == "multiple")),
            "n_lesions_gt": int(table.gt_values("n_lesions_gt").sum()),
        },
        "table1": table1,
        "negative_cases": {
            t: {
                "n": int(negative.sum()),
                "fp": describe(table.values(t, "fp")[negative]),
                "fpv_ml": describe(table.values(t, "fpv_ml")[negative]),
                "n_with_fp": int(np.sum(table.values(t, "fp")[negative] > 0)),
            }
            for t in trainers
        },
        "volumes": {
            t: {m: describe(table.values(t, m)) for m in ("fpv_ml", "fnv_ml", "tmtv_pred_ml")} for t in trainers
        },
        "tmtv_gt_ml": describe(table.gt_values("tmtv_gt_ml").astype(np.float64)),
        "patient_detection": _patient_detection(table),
        "lesions": _lesion_overall(lesion_rows, trainers),
        "strata": {
            "scenario": {
                name: {t: describe(table.values(t, "dice")[everything if name == "all" else scenario == name])
                       for t in trainers}
                for name in TABLE1_SCENARIOS
            },
            "tmtv_thresholds": _tmtv_thresholds(table, options),
            "dmax_groups": _dmax_groups(table, edges["dmax_edges_mm"], options),
            "lesion_volume_bins": _lesion_bins(lesion_rows, trainers, edges["lesion_volume_edges_ml"], options),
        },
        "statistics": statistics,
        "agreement": _agreement(table, options),
        "calibration": calibration,
    }
