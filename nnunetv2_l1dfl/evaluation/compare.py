"""Orchestration of ``l1dfl compare``: score every case for every trainer, in parallel, then
summarise, write the tables and report, and draw the figures.

Per case, the GT and PET are read and the GT lesions analysed once; then each trainer's prediction
is read, checked against the GT geometry and scored (:func:`evaluate_case_files`). Cases run in
worker processes (``n_processes``); the results are small row dicts and calibration sums.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from nnunetv2_l1dfl.evaluation import metrics
from nnunetv2_l1dfl.evaluation.calibration import CalibrationCounts, case_calibration
from nnunetv2_l1dfl.evaluation.definitions import (
    CALIBRATION_REGIONS,
    DEFAULT_TEST_METRICS,
    DEFAULT_TMTV_QUANTILES,
    LESION_DSC_DEFINITIONS,
    METRIC_DIRECTIONS,
    ZERO_METHODS,
)
from nnunetv2_l1dfl.evaluation.io import (
    REPORT_FILES,
    CaseFiles,
    CompareInputError,
    check_case_geometry,
    check_geometry,
    load_probabilities,
    read_image,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompareOptions:
    """Every choice ``docs/evaluation.md`` leaves open, with its default.

    Attributes:
        criterion: lesion detection criterion, one of ``metrics.CRITERIA``.
        lesion_dsc: lesion-level DSC definition, ``paper`` (per matched pair, the default) or
            ``criterion`` (per GT lesion, coupled to the detection criterion); see
            ``metrics.LesionDice``.
        iou_threshold: IoU needed for a match under criterion ``iou``.
        connectivity: 6, 18 or 26 for connected components.
        label: score only this label (GT and prediction ``== label``); None = every label > 0.
        empty_policy: DSC and F1 of an empty GT with an empty prediction: ``nan`` (excluded from
            means and counted) or ``one``.
        tmtv_quantiles: GT TMTV quantiles used as thresholds (median DSC of cases >= each).
        tmtv_edges_ml: explicit TMTV thresholds (ml), replacing the quantiles.
        dmax_quantiles / dmax_edges_mm: Dmax groups of multiple-lesion cases (quartiles G0-G3).
        lesion_volume_quantiles / lesion_volume_edges_ml: lesion volume bins of the lesion table.
        test_metrics: the declared family of the Wilcoxon tests.
        zero_method: scipy's treatment of zero differences in the Wilcoxon test.
        alpha: significance level on Bonferroni-adjusted p-values, and of the TOST equivalence tests.
        equivalence_margin: TOST bound and coverage-probability limit as a fraction of the mean GT
            value of each biomarker (the paper's 20 %).
        tdi_coverage: coverage of the total deviation index (0.9: TDI_0.9).
        calibration: use ``<case>.npz`` probabilities when present.
        calibration_region / calibration_margin_voxels / calibration_bins: see calibration.py.
        geometry_tolerance: absolute tolerance on spacing/origin (mm) and direction cosines.
        max_label: the largest label value dataset.json declares (its ``labels``); a GT or predicted
            voxel above it fails the case naming the file (a label 2 in a one-label dataset is a
            wrong file, not a lesion). None (no dataset.json): every value > 0 is foreground.
        n_processes: cases scored in parallel.
        mip_cases: how many cases with the largest disagreement between trainers get a PET MIP.
        plots: draw PNG figures.
    """

    criterion: str = "suvmax"
    lesion_dsc: str = "paper"
    iou_threshold: float = 0.1
    connectivity: int = 18
    label: int | None = None
    empty_policy: str = "nan"
    tmtv_quantiles: tuple[float, ...] = DEFAULT_TMTV_QUANTILES
    tmtv_edges_ml: tuple[float, ...] | None = None
    dmax_quantiles: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    dmax_edges_mm: tuple[float, ...] | None = None
    lesion_volume_quantiles: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    lesion_volume_edges_ml: tuple[float, ...] | None = None
    test_metrics: tuple[str, ...] = DEFAULT_TEST_METRICS
    zero_method: str = "wilcox"
    alpha: float = 0.05
    equivalence_margin: float = 0.2
    tdi_coverage: float = 0.9
    calibration: bool = True
    calibration_region: str = "lesion_roi"
    calibration_margin_voxels: int = 3
    calibration_bins: int = 15
    geometry_tolerance: float = 1e-3
    max_label: int | None = None
    n_processes: int = 1
    mip_cases: int = 3
    plots: bool = True

    def __post_init__(self) -> None:
        def check(condition: bool, message: str) -> None:
            if not condition:
                raise ValueError(message)

        check(self.criterion in metrics.CRITERIA, f"criterion must be one of {metrics.CRITERIA}, got {self.criterion!r}")
        check(
            self.lesion_dsc in LESION_DSC_DEFINITIONS,
            f"lesion_dsc must be one of {LESION_DSC_DEFINITIONS}, got {self.lesion_dsc!r}",
        )
        check(0 < self.iou_threshold <= 1, f"iou_threshold must be in (0, 1], got {self.iou_threshold}")
        check(self.connectivity in metrics.CONNECTIVITIES, f"connectivity must be one of {metrics.CONNECTIVITIES}")
        check(self.label is None or self.label > 0, f"label must be > 0, got {self.label}")
        check(self.empty_policy in metrics.EMPTY_POLICIES, f"empty_policy must be one of {metrics.EMPTY_POLICIES}")
        for name in ("tmtv_quantiles", "dmax_quantiles", "lesion_volume_quantiles"):
            values = getattr(self, name)
            check(
                len(values) >= 1 and all(0 <= q <= 1 for q in values) and list(values) == sorted(values),
                f"{name} must be increasing probabilities in [0, 1], got {values}",
            )
        for name in ("dmax_quantiles", "lesion_volume_quantiles"):
            check(len(getattr(self, name)) >= 2, f"{name} needs at least two values (bin edges)")
        for name, minimum in (("tmtv_edges_ml", 1), ("dmax_edges_mm", 2), ("lesion_volume_edges_ml", 2)):
            values = getattr(self, name)
            check(
                values is None or (len(values) >= minimum and list(values) == sorted(set(values))),
                f"{name} must be strictly increasing with at least {minimum} value(s), got {values}",
            )
        unknown = [m for m in self.test_metrics if m not in METRIC_DIRECTIONS]
        check(not unknown, f"test_metrics {unknown} unknown; choose from {sorted(METRIC_DIRECTIONS)}")
        check(self.zero_method in ZERO_METHODS, f"zero_method must be one of {ZERO_METHODS}")
        check(0 < self.alpha < 1, f"alpha must be in (0, 1), got {self.alpha}")
        check(self.equivalence_margin > 0, f"equivalence_margin must be > 0, got {self.equivalence_margin}")
        check(0 < self.tdi_coverage < 1, f"tdi_coverage must be in (0, 1), got {self.tdi_coverage}")
        check(self.calibration_region in CALIBRATION_REGIONS, f"calibration_region must be one of {CALIBRATION_REGIONS}")
        check(self.calibration_margin_voxels >= 0, "calibration_margin_voxels must be >= 0")
        check(self.calibration_bins >= 1, "calibration_bins must be >= 1")
        check(self.geometry_tolerance >= 0, "geometry_tolerance must be >= 0")
        check(self.max_label is None or self.max_label >= 1, f"max_label must be >= 1, got {self.max_label}")
        check(
            self.label is None or self.max_label is None or self.label <= self.max_label,
            f"label {self.label} is above the largest label {self.max_label} that dataset.json declares",
        )
        check(self.n_processes >= 1, f"n_processes must be >= 1, got {self.n_processes}")
        check(self.mip_cases >= 0, "mip_cases must be >= 0")

    def as_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass
class CaseResult:
    """Rows of one case: one per trainer for cases.csv, one per GT lesion and trainer for
    lesions.csv, and the calibration sums per trainer (only trainers with probabilities)."""

    case_id: str
    case_rows: list[dict]
    lesion_rows: list[dict]
    calibration: dict[str, CalibrationCounts] = field(default_factory=dict)


def check_label_values(label_map: np.ndarray, max_label: int | None, source: str) -> None:
    """Raise :class:`CompareInputError` when ``label_map`` holds a value above ``max_label``."""
    if max_label is None or label_map.size == 0:
        return
    highest = int(label_map.max())
    if highest > max_label:
        above = label_map > max_label
        values = np.unique(label_map[above])
        raise CompareInputError(
            f"{source}: label value(s) {values[:5].tolist()} in {int(above.sum())} voxel(s), above the largest "
            f"label {max_label} that dataset.json declares"
        )


def _score_trainer(
    case_id: str,
    trainer: str,
    gt: metrics.GroundTruthLesions,
    gt_row: dict,
    gt_lesion_rows: list[dict],
    pred_label_map: np.ndarray,
    suv: np.ndarray,
    options: CompareOptions,
    fold: int | None = None,
) -> tuple[dict, list[dict]]:
    evaluation = metrics.evaluate_prediction(
        gt,
        metrics.foreground_mask(pred_label_map, options.label),
        suv,
        criterion=options.criterion,
        iou_threshold=options.iou_threshold,
        connectivity=options.connectivity,
        empty_policy=options.empty_policy,
        lesion_dsc=options.lesion_dsc,
    )
    case_row = {"case_id": case_id, "trainer": trainer, "fold": fold, **gt_row, **evaluation.case_metrics()}
    units = evaluation.lesion_dsc
    lesion_rows = []
    for i, pred_label, dice in zip(units.gt_index.tolist(), units.pred_label.tolist(), units.dice.tolist()):
        lesion_rows.append(
            {
                "case_id": case_id,
                "trainer": trainer,
                **gt_lesion_rows[i],
                "scenario": gt_row["scenario"],
                "detected": bool(evaluation.lesion_detected[i]),
                "dice": float(dice),
                "pred_lesion_id": None if pred_label < 0 else int(pred_label),
                "n_overlapping_pred": int(evaluation.lesion_n_overlapping[i]),
            }
        )
    return case_row, lesion_rows


def evaluate_case_arrays(
    case_id: str,
    gt_label_map: np.ndarray,
    suv: np.ndarray,
    predictions: Mapping[str, np.ndarray],
    spacing_mm: tuple[float, float, float],
    options: CompareOptions | None = None,
    probabilities: Mapping[str, np.ndarray] | None = None,
) -> CaseResult:
    """Score in-memory arrays of one case (all (z, y, x), same grid; see :func:`evaluate_case_files`)."""
    options = options or CompareOptions()
    check_label_values(gt_label_map, options.max_label, f"case {case_id} GT")
    for trainer, pred in predictions.items():
        check_label_values(pred, options.max_label, f"case {case_id} {trainer}")
    gt = metrics.analyse_ground_truth(
        metrics.foreground_mask(gt_label_map, options.label), suv, spacing_mm, options.connectivity
    )
    gt_row = metrics.ground_truth_case_metrics(gt)
    gt_lesion_rows = metrics.lesion_table(gt)
    result = CaseResult(case_id, [], [])
    for trainer, pred in predictions.items():
        case_row, lesion_rows = _score_trainer(case_id, trainer, gt, gt_row, gt_lesion_rows, pred, suv, options)
        result.case_rows.append(case_row)
        result.lesion_rows.extend(lesion_rows)
        if options.calibration and probabilities and trainer in probabilities:
            result.calibration[trainer] = _calibrate(probabilities[trainer], gt_label_map, options, case_id)
    return result


def _calibrate(
    probabilities: np.ndarray, gt_label_map: np.ndarray, options: CompareOptions, source: str
) -> CalibrationCounts:
    if options.label is not None:  # score the chosen label against everything else
        if probabilities.shape[0] > 2:
            if options.label >= probabilities.shape[0]:
                raise ValueError(f"{source}: no probability channel for label {options.label}")
            chosen = probabilities[options.label]
            probabilities = np.stack([1.0 - chosen, chosen])
        gt_label_map = (gt_label_map == options.label).astype(np.uint8)
    return case_calibration(
        probabilities,
        gt_label_map,
        region=options.calibration_region,
        margin_voxels=options.calibration_margin_voxels,
        n_bins=options.calibration_bins,
        source=source,
    )


def evaluate_case_files(case: CaseFiles, options: CompareOptions) -> CaseResult:
    """Read and score one case for every trainer.

    The GT and PET are read once and must share their geometry; the GT lesions are analysed once
    and reused for each trainer, whose prediction (and probabilities, when present and
    ``options.calibration``) is read, checked against the GT geometry and scored.
    """
    gt_label_map, gt_geometry = read_image(case.gt, "label")
    check_label_values(gt_label_map, options.max_label, str(case.gt))
    suv, pet_geometry = read_image(case.pet, "pet")
    check_geometry((case.gt, gt_geometry), (case.pet, pet_geometry), options.geometry_tolerance)
    try:
        gt = metrics.analyse_ground_truth(
            metrics.foreground_mask(gt_label_map, options.label), suv, gt_geometry.spacing_mm, options.connectivity
        )
    except ValueError as e:
        raise CompareInputError(f"case {case.case_id} ({case.gt}, {case.pet}): {e}") from e
    gt_row = metrics.ground_truth_case_metrics(gt)
    gt_lesion_rows = metrics.lesion_table(gt)
    result = CaseResult(case.case_id, [], [])
    for trainer, path in case.predictions.items():
        pred_label_map, pred_geometry = read_image(path, "label")
        check_label_values(pred_label_map, options.max_label, str(path))
        check_geometry((case.gt, gt_geometry), (path, pred_geometry), options.geometry_tolerance)
        case_row, lesion_rows = _score_trainer(
            case.case_id, trainer, gt, gt_row, gt_lesion_rows, pred_label_map, suv, options, case.folds.get(trainer)
        )
        del pred_label_map
        result.case_rows.append(case_row)
        result.lesion_rows.extend(lesion_rows)
        if options.calibration and trainer in case.probabilities:
            npz = case.probabilities[trainer]
            try:
                result.calibration[trainer] = _calibrate(load_probabilities(npz), gt_label_map, options, str(npz))
            except ValueError as e:
                raise CompareInputError(str(e)) from e
    return result


def _evaluate_case_job(job: tuple[CaseFiles, CompareOptions]) -> CaseResult:
    case, options = job
    try:
        return evaluate_case_files(case, options)
    except CompareInputError:
        raise
    except Exception as e:  # name the case: a traceback from a worker process says nothing else
        raise RuntimeError(f"case {case.case_id} failed: {type(e).__name__}: {e}") from e


def evaluate_cases(cases: list[CaseFiles], options: CompareOptions) -> list[CaseResult]:
    """Score all cases, ``options.n_processes`` at a time, with a progress bar; sorted by case ID."""
    from tqdm import tqdm

    # Headers first: a geometry mismatch should stop the run before hours of scoring, not after.
    for case in tqdm(cases, desc="compare: checking geometry", unit="case", disable=None, leave=False):
        check_case_geometry(case, options.geometry_tolerance)
    jobs = [(case, options) for case in cases]
    progress = {"total": len(jobs), "desc": "compare: cases", "unit": "case", "disable": None}
    if options.n_processes == 1 or len(jobs) <= 1:
        results = [_evaluate_case_job(job) for job in tqdm(jobs, **progress)]
    else:
        pool = ProcessPoolExecutor(max_workers=min(options.n_processes, len(jobs)), mp_context=get_context("spawn"))
        try:
            results = list(tqdm(pool.map(_evaluate_case_job, jobs), **progress))
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)  # do not score the queued cases first
            raise
        pool.shutdown()
    return sorted(results, key=lambda r: r.case_id)


def merge_calibration(results: list[CaseResult], trainers: list[str], n_cases: int) -> dict[str, dict]:
    """Per trainer, calibration summed over the cases that had probabilities (``n_cases`` of them)."""
    merged: dict[str, dict] = {}
    for trainer in trainers:
        parts = [r.calibration[trainer] for r in results if trainer in r.calibration]
        if not parts:
            continue
        total = parts[0]
        for part in parts[1:]:
            total = total + part
        if len(parts) < n_cases:
            logger.warning(
                "calibration of %s uses %d of %d cases (the others have no <case>.npz)", trainer, len(parts), n_cases
            )
        merged[trainer] = {"n_cases": len(parts), **total.summary()}
    return merged


def run_compare(
    cases: list[CaseFiles],
    trainers: list[str],
    out_dir: Path,
    options: CompareOptions,
    inputs: dict | None = None,
    overwrite: bool = False,
) -> dict:
    """Score, summarise and write everything to ``out_dir``; returns the summary dict.

    The first trainer is the reference of the statistics. Refuses to overwrite existing report
    files in ``out_dir`` unless ``overwrite``.
    """
    from nnunetv2_l1dfl.evaluation import report, summary

    out_dir = Path(out_dir)
    existing = [name for name in REPORT_FILES if (out_dir / name).exists()]
    if existing and not overwrite:
        raise CompareInputError(
            f"{out_dir} already holds {', '.join(existing)}; choose another -o folder or pass --overwrite"
        )
    if len(trainers) < 2:
        raise CompareInputError(f"need at least two trainers to compare, got {trainers}")
    out_dir.mkdir(parents=True, exist_ok=True)
    results = evaluate_cases(cases, options)
    case_rows = [row for r in results for row in r.case_rows]
    lesion_rows = [row for r in results for row in r.lesion_rows]
    calibration = merge_calibration(results, trainers, len(cases)) if options.calibration else {}
    result = summary.build_summary(case_rows, lesion_rows, calibration, trainers, options, inputs or {})
    if options.plots:
        from nnunetv2_l1dfl.evaluation import plots

        result["figures"] = plots.draw_all(case_rows, lesion_rows, result, cases, out_dir, options)
    else:
        result["figures"] = []
    report.write_outputs(out_dir, case_rows, lesion_rows, result)
    return result
