"""Writing the results of ``l1dfl compare``: cases.csv, lesions.csv, summary.json and report.md.

``headline_table(summary)`` gives the paper's Table 1 for all cases as markdown, for callers (the
demo) that want to print the headline numbers.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np

CASE_COLUMNS = (
    "case_id", "trainer", "fold", "dice", "tp", "fp", "fn", "f1", "fpv_ml", "fnv_ml", "tmtv_gt_ml",
    "tmtv_pred_ml", "tla_gt", "tla_pred", "suv_max_gt", "suv_max_pred", "suv_mean_gt", "suv_mean_pred",
    "n_lesions_gt", "n_lesions_pred", "scenario", "dmax_mm", "dmax_pred_mm", "dmax_group", "disease_gt",
    "disease_pred",
)  # fmt: skip
LESION_COLUMNS = (
    "case_id", "trainer", "lesion_id", "volume_ml", "n_voxels", "suv_max", "suv_mean", "suv_peak",
    "suv_peak_at_max", "tla", "tlg", "detected", "dice", "pred_lesion_id", "n_overlapping_pred", "scenario",
    "volume_bin", "suvmax_z", "suvmax_y", "suvmax_x", "centroid_z", "centroid_y", "centroid_x",
)  # fmt: skip

_TABLE1_HEADER = (
    "| Trainer | n | DSC mean ± sd | DSC median [Q1, Q3] | TP mean ± sd | FP mean ± sd | FN mean ± sd "
    "| F1 mean ± sd | p (DSC) |\n|---|---|---|---|---|---|---|---|---|"
)


# ----------------------------------------------------------------------------- formatting


def _is_missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def fmt(value, digits: int = 3) -> str:
    """A number for the report; NaN / None as 'n/a'."""
    if _is_missing(value):
        return "n/a"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return f"{value:.{digits}f}"


def fmt_p(p) -> str:
    if _is_missing(p):
        return "n/a"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _mean_sd(stats: dict, digits: int) -> str:
    if stats["n"] == 0:
        return "n/a"
    return f"{fmt(stats['mean'], digits)} ± {fmt(stats['sd'], digits)}"


def _median_iqr(stats: dict, digits: int) -> str:
    if stats["n"] == 0:
        return "n/a"
    return f"{fmt(stats['median'], digits)} [{fmt(stats['q1'], digits)}, {fmt(stats['q3'], digits)}]"


def _table1_markdown(rows: list[dict]) -> str:
    lines = [_TABLE1_HEADER]
    for row in rows:
        if row["is_reference"]:
            p = "ref"
        elif not row.get("tested"):
            p = ""  # scenario tables: the tests run on all cases only
        else:
            p = fmt_p(row["p_dice"]) + (" *" if row["significant"] else "")
        dsc = row["dice"]
        dsc_note = f" ({dsc['n_nan']} NaN)" if dsc["n_nan"] else ""
        lines.append(
            f"| {row['trainer']} | {row['n_cases']} | {_mean_sd(dsc, 2)}{dsc_note} | {_median_iqr(dsc, 2)} "
            f"| {_mean_sd(row['tp'], 2)} | {_mean_sd(row['fp'], 2)} | {_mean_sd(row['fn'], 2)} "
            f"| {_mean_sd(row['f1'], 2)} | {p} |"
        )
    return "\n".join(lines)


def headline_table(summary: dict) -> str:
    """The paper's Table 1 over all cases, as a markdown table (one row per trainer).

    p is the Bonferroni-adjusted one-sided paired Wilcoxon p-value of DSC against the reference
    (first) trainer, '*' when below alpha.
    """
    return _table1_markdown(summary["table1"]["all"])


# ----------------------------------------------------------------------------- report.md


def _markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _describe_cell(stats: dict) -> str:
    if stats["n"] == 0:
        return "n/a (n = 0)"
    return f"{_median_iqr(stats, 2)} (n = {stats['n']})"


def render_report(summary: dict) -> str:
    """report.md: Table 1 (all, single, multiple), detection, volumes, strata, statistics,
    calibration, figures, options and edge-case policies."""
    trainers = summary["trainers"]
    options = summary["options"]
    cases = summary["cases"]
    inputs = summary.get("inputs", {})
    out = []
    title = inputs.get("dataset") or "prediction folders"
    out.append(f"# Trainer comparison: {title}\n")
    out.append(
        f"{cases['n']} cases ({cases['single']} single-lesion, {cases['multiple']} multiple-lesion, "
        f"{cases['negative']} without GT lesions), {cases['n_lesions_gt']} GT lesions. "
        f"Trainers: {', '.join(trainers)}; reference of the statistics: **{summary['reference']}**. "
        f"Detection criterion: `{options['criterion']}`; {summary['policies']['lesions']}.\n"
    )
    if inputs:
        out.append("Inputs: " + "; ".join(f"{k} = `{v}`" for k, v in inputs.items() if k != "predictions"))
        out.append("\n" + "\n".join(f"- {t}: `{p}`" for t, p in inputs.get("predictions", {}).items()) + "\n")

    out.append("## Table 1: patient level, all cases\n")
    out.append(headline_table(summary))
    out.append(
        "\np: one-sided paired Wilcoxon signed-rank test of DSC, H1: the trainer is better than the "
        f"reference, Bonferroni-adjusted over the declared family{_statistics_family(summary)}; "
        f"* p < {options['alpha']}. "
        "TP / FP / FN are lesion counts per case.\n"
    )
    for name in ("single", "multiple"):
        out.append(f"### {name.capitalize()}-lesion cases\n")
        out.append(_table1_markdown(summary["table1"][name]) + "\n")

    out.append("## Patient-level disease detection\n")
    out.append("Any GT lesion vs any predicted lesion, per case.\n")
    rows = []
    for t in trainers:
        d = summary["patient_detection"][t]
        rows.append(
            [t, str(d["tp"]), str(d["fp"]), str(d["tn"]), str(d["fn"]), fmt(d["accuracy"]),
             fmt(d["sensitivity"]), fmt(d["specificity"])]
        )  # fmt: skip
    out.append(_markdown_table(["Trainer", "TP", "FP", "TN", "FN", "Accuracy", "Sensitivity", "Specificity"], rows))

    out.append("\n## Volumes and lesions\n")
    rows = []
    for t in trainers:
        v = summary["volumes"][t]
        les = summary["lesions"][t]
        neg = summary["negative_cases"][t]
        rows.append(
            [t, _mean_sd(v["fpv_ml"], 2), _mean_sd(v["fnv_ml"], 2), _mean_sd(v["tmtv_pred_ml"], 2),
             f"{les['n_detected']}/{les['n_lesions']} ({fmt(les['detection_rate'])})",
             _median_iqr(les["dice"], 2), f"{neg['n_with_fp']}/{neg['n']}"]
        )  # fmt: skip
    out.append(
        _markdown_table(
            ["Trainer", "FPV ml", "FNV ml", "TMTV pred ml", "Lesions detected", "Lesion DSC median [Q1, Q3]",
             "Negative cases with FP"],
            rows,
        )  # fmt: skip
    )
    out.append(f"\nGT TMTV (ml): {_mean_sd(summary['tmtv_gt_ml'], 2)}, median {_median_iqr(summary['tmtv_gt_ml'], 2)}.\n")

    strata = summary["strata"]
    out.append("## Strata (defined from the GT)\n")
    out.append("### DSC by scenario: median [Q1, Q3] (n)\n")
    out.append(
        _markdown_table(
            ["Scenario", *trainers],
            [[name, *(_describe_cell(strata["scenario"][name][t]) for t in trainers)] for name in strata["scenario"]],
        )
    )
    tm = strata["tmtv_thresholds"]
    source = "given thresholds" if tm["source"] == "edges" else "thresholds at GT TMTV quantiles"
    out.append(f"\n### Median DSC of cases with GT TMTV >= threshold ({source})\n")
    for name, group in tm["groups"].items():
        out.append(f"**{name}** ({group['n_cases']} cases with GT lesions)\n")
        if not group["thresholds"]:
            out.append("no cases\n")
            continue
        rows = [
            [fmt(r["quantile"], 2) if r["quantile"] is not None else "given", fmt(r["threshold_ml"], 2),
             str(r["n_cases"]), *(fmt(r["median_dice"][t]) for t in trainers)]
            for r in group["thresholds"]
        ]  # fmt: skip
        out.append(_markdown_table(["Quantile", "TMTV >= ml", "n", *trainers], rows) + "\n")
    dm = strata["dmax_groups"]
    out.append(
        f"### DSC by Dmax group, multiple-lesion cases ({'given' if dm['source'] == 'edges' else 'quantile'} edges: "
        f"{', '.join(fmt(e, 1) for e in dm['edges_mm']) or 'none'} mm)\n"
    )
    if dm["groups"]:
        rows = [[g["name"], g["label"], str(g["n"]), *(_describe_cell(g["dice"][t]) for t in trainers)] for g in dm["groups"]]
        out.append(_markdown_table(["Group", "Dmax", "n", *trainers], rows))
        if dm["n_outside"]:
            out.append(f"\n{dm['n_outside']} multiple-lesion case(s) fall outside the edges.")
    else:
        out.append("no multiple-lesion cases")
    lv = strata["lesion_volume_bins"]
    out.append(
        f"\n\n### Lesions by volume ({'given' if lv['source'] == 'edges' else 'quantile'} edges: "
        f"{', '.join(fmt(e, 3) for e in lv['edges_ml']) or 'none'} ml)\n"
    )
    if lv["bins"]:
        rows = [
            [b["name"], b["label"], str(b["n_lesions"]),
             *(f"{fmt(b['trainers'][t]['detection_rate'], 2)} / {_median_iqr(b['trainers'][t]['dice'], 2)}" for t in trainers)]
            for b in lv["bins"]
        ]  # fmt: skip
        out.append("Cells: detection rate / lesion DSC median [Q1, Q3].\n")
        out.append(_markdown_table(["Bin", "Volume", "n", *trainers], rows))
    else:
        out.append("no GT lesions")

    out.append("\n\n## Statistics\n")
    if summary["statistics"]:
        family = summary["statistics"][0]["family_size"]
        out.append(
            f"One-sided paired Wilcoxon signed-rank tests against **{summary['reference']}**; Bonferroni "
            f"over a family of {family} tests ({len(trainers) - 1} trainer(s) x {len(options['test_metrics'])} "
            "metrics). Median difference = trainer - reference.\n"
        )
        rows = [
            [r["trainer"], r["metric"], r["better"], str(r["n_pairs"]), str(r["n_dropped"]),
             fmt(r["median_difference"], 4), fmt(r["statistic"], 1), fmt_p(r["p_value"]), fmt_p(r["p_bonferroni"]),
             "yes" if r["significant"] else "no"]
            for r in summary["statistics"]
        ]  # fmt: skip
        out.append(
            _markdown_table(
                ["Trainer", "Metric", "Better", "n pairs", "dropped (NaN)", "Median diff", "W", "p", "p Bonferroni",
                 "Significant"],
                rows,
            )  # fmt: skip
        )

    if summary.get("agreement"):
        out.append("\n\n" + agreement_markdown(summary))

    out.append("\n\n## Calibration\n")
    calibration = summary["calibration"]
    if calibration:
        out.append(f"Region: {summary['policies']['calibration_region']}. Entropy in nats.\n")
        rows = [
            [t, str(c["n_cases"]), str(c["n_voxels"]), fmt(c["entropy_correct"], 4), fmt(c["entropy_incorrect"], 4),
             fmt(c["calibration_gap"], 4), fmt(c["confidence_correct"], 4), fmt(c["confidence_incorrect"], 4),
             fmt(c["ece"], 4)]
            for t, c in calibration.items()
        ]  # fmt: skip
        out.append(
            _markdown_table(
                ["Trainer", "Cases", "Voxels", "Entropy (correct)", "Entropy (incorrect)", "Calibration gap",
                 "Confidence (correct)", "Confidence (incorrect)", "ECE"],
                rows,
            )  # fmt: skip
        )
    else:
        out.append("No probabilities (`<case>.npz`, written by nnU-Net's `--npz`) were found or calibration was off.")

    if summary.get("figures"):
        out.append("\n\n## Figures\n")
        out += [f"- [{name}]({name})" for name in summary["figures"]]

    out.append("\n\n## Options and edge-case policies\n")
    out.append(_markdown_table(["Option", "Value"], [[k, f"`{v}`"] for k, v in options.items()]))
    out.append("\n")
    out.append(_markdown_table(["Policy", "In force"], [[k, v] for k, v in summary["policies"].items()]))
    out.append(f"\n\nWritten by {summary['tool']} {summary['version']}.\n")
    return "\n".join(out)


def _interval(value, low, high, digits: int) -> str:
    if _is_missing(value):
        return "n/a"
    if _is_missing(low) or _is_missing(high):
        return fmt(value, digits)
    return f"{fmt(value, digits)} [{fmt(low, digits)}, {fmt(high, digits)}]"


def _statistics_family(summary: dict) -> str:
    tests = summary.get("statistics") or []
    return f" of {tests[0]['family_size']} tests (see Statistics)" if tests else ""


def _family_size(agreement: dict) -> str:
    """The Bonferroni family of the absolute-error tests in words, from the tests themselves."""
    tests = agreement.get("absolute_error_tests") or []
    if not tests:
        return "0 tests (no trainer besides the reference)"
    n_trainers = len({t["trainer"] for t in tests})
    n_biomarkers = len({t["biomarker"] for t in tests})
    return f"{tests[0]['family_size']} tests ({n_trainers} trainer(s) x {n_biomarkers} biomarkers)"


def agreement_markdown(summary: dict) -> str:
    """The quantification-agreement section of report.md: one table per biomarker."""
    from nnunetv2_l1dfl.evaluation.agreement import BIOMARKER_TITLES

    agreement = summary["agreement"]
    margin, alpha = agreement["margin"], agreement["alpha"]
    coverage = agreement["tdi_coverage"]
    out = ["## Quantification agreement with the GT (per patient)\n"]
    out.append(
        "Differences are prediction - GT. CCC: Lin's concordance correlation coefficient [95 % CI, Fisher z]. "
        "Bias [95 % limits of agreement] (Bland-Altman), absolute and in % of the pair's mean. "
        f"TDI: total deviation index at {coverage:g} coverage (95 % upper bound); CP: coverage probability "
        f"of +-Delta; TOST: equivalence within +-Delta, Delta = {margin:g} x |mean GT| of the trainer's "
        f"included cases (its own column: cases left out differ between trainers), alpha = {alpha} "
        f"(p and verdict). p abs err: one-sided Wilcoxon that the trainer's absolute errors are smaller "
        f"than the reference's, Bonferroni over a family of {_family_size(agreement)}; * p < {alpha}; "
        "(k pairs) when cases were dropped because either trainer left the biomarker undefined. "
        "Cases where the biomarker is undefined (no GT / no predicted lesion) are left out and counted; "
        "Bias % is over the pairs whose mean is not 0, (n = k) when that leaves fewer.\n"
    )
    header = ["Trainer", "n (no GT / no pred)", "CCC [95 % CI]", "Bias [LoA]", "Bias % [LoA]", "TDI (upper)",
              "Delta", "CP(±Delta)", "TOST p", "Equivalent", "p abs err"]  # fmt: skip
    for name, entry in agreement["biomarkers"].items():
        unit = entry["unit"]
        rows = []
        for trainer, a in entry["trainers"].items():
            ba, pct, tdi, tost = a["bland_altman"], a["bland_altman"]["percent"], a["tdi"], a["tost"]
            test = a.get("absolute_error_test")
            if trainer == summary["reference"]:
                p = "ref"
            elif test is None:
                p = ""
            else:
                p = fmt_p(test["p_bonferroni"]) + (" *" if test["significant"] else "")
                if test["n_dropped"]:  # a case either trainer left undefined is not compared
                    p += f" ({test['n_pairs']} pairs)"
            rows.append(
                [trainer, f"{a['n']} ({a['n_excluded_no_gt']} / {a['n_excluded_no_pred']})",
                 _interval(a["ccc"]["ccc"], a["ccc"]["ci_low"], a["ccc"]["ci_high"], 3),
                 _interval(ba["bias"], ba["loa_low"], ba["loa_high"], 3),
                 _interval(pct["bias"], pct["loa_low"], pct["loa_high"], 1)
                 + (f" (n = {pct['n']})" if pct["n"] != a["n"] else ""),
                 f"{fmt(tdi['tdi'], 3)} ({fmt(tdi['tdi_upper'], 3)})", fmt(a["delta"], 3),
                 fmt(a["coverage_probability"]["cp"], 3), fmt_p(tost["p_value"]),
                 ("yes" if tost["equivalent"] else "no") if not _is_missing(tost["p_value"]) else "n/a", p]
            )  # fmt: skip
        title = BIOMARKER_TITLES.get(name, name)
        out.append(f"### {title} ({unit})\n")
        out.append(_markdown_table(header, rows) + "\n")
    return "\n".join(out)


# ----------------------------------------------------------------------------- files


def _json_ready(value):
    """NaN/inf -> None, numpy scalars and arrays -> Python, tuples -> lists, recursively."""
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_json_ready(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    return value


def _csv_value(value):
    if value is None:
        return ""
    if isinstance(value, (float, np.floating)):
        return "nan" if math.isnan(value) else repr(float(value))
    return value


def write_csv(path: Path, rows: list[dict], columns: tuple[str, ...]) -> None:
    """Rows to CSV with the given columns first, then any extra keys in order of appearance."""
    extra = []
    for row in rows:
        extra += [k for k in row if k not in columns and k not in extra]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=[*columns, *extra], extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_value(row.get(k)) for k in (*columns, *extra)})


def write_outputs(out_dir: Path, case_rows: list[dict], lesion_rows: list[dict], summary: dict) -> None:
    """cases.csv, lesions.csv, summary.json and report.md in ``out_dir``."""
    out_dir = Path(out_dir)
    write_csv(out_dir / "cases.csv", case_rows, CASE_COLUMNS)
    write_csv(out_dir / "lesions.csv", lesion_rows, LESION_COLUMNS)
    (out_dir / "summary.json").write_text(json.dumps(_json_ready(summary), indent=2, allow_nan=False) + "\n")
    (out_dir / "report.md").write_text(render_report(summary), encoding="utf-8")
