"""Figures of ``l1dfl compare`` (matplotlib, Agg backend, PNG).

- box plots with every case (or lesion) as a point, per stratum and trainer: DSC by scenario, by
  GT TMTV threshold, by Dmax group (multiple-lesion cases), lesion DSC by lesion volume bin, and
  the patient-level metrics per trainer;
- reliability diagrams from the calibration bins;
- coronal maximum-intensity projections of PET with the GT (green) and one trainer's prediction
  (red) outlined, for the cases where the trainers' DSC differ most.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

_GT_COLOUR = "#00c000"
_PRED_COLOUR = "#e00000"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colours(n: int) -> list:
    plt = _pyplot()
    cmap = plt.get_cmap("tab10")
    return [cmap(i % 10) for i in range(n)]


def grouped_boxplot(ax, groups: list[str], trainers: list[str], data: dict, ylabel: str, ylim=None) -> None:
    """Side-by-side boxes per group, one per trainer, with the jittered points on top.

    ``data[(group, trainer)]`` holds the values; NaN are left out, empty boxes are skipped.
    """
    rng = np.random.default_rng(0)  # fixed jitter: the same figure every run
    width = 0.8 / max(len(trainers), 1)
    colours = _colours(len(trainers))
    for t_index, trainer in enumerate(trainers):
        for g_index, group in enumerate(groups):
            values = np.asarray(data.get((group, trainer), []), dtype=np.float64)
            values = values[np.isfinite(values)]
            if len(values) == 0:
                continue
            x = g_index - 0.4 + width * (t_index + 0.5)
            box = ax.boxplot(
                values, positions=[x], widths=width * 0.8, patch_artist=True, showfliers=False, manage_ticks=False
            )
            for patch in box["boxes"]:
                patch.set_facecolor(colours[t_index])
                patch.set_alpha(0.35)
            jitter = rng.uniform(-width * 0.25, width * 0.25, len(values))
            ax.scatter(x + jitter, values, s=8, color=colours[t_index], alpha=0.8, zorder=3)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, fontsize=8)
    ax.set_xlim(-0.6, len(groups) - 0.4)
    ax.set_ylabel(ylabel)
    if ylim:
        ax.set_ylim(*ylim)
    handles = [ax.scatter([], [], color=c, label=t) for c, t in zip(colours, trainers)]
    ax.legend(handles=handles, fontsize=8, loc="best")
    ax.grid(axis="y", alpha=0.3)


def _save(fig, out_dir: Path, name: str, names: list[str]) -> None:
    fig.savefig(out_dir / name, dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    names.append(name)


def _case_values(case_rows: list[dict], metric: str, keep=lambda row: True) -> dict:
    values: dict = {}
    for row in case_rows:
        if keep(row):
            values.setdefault(row["trainer"], []).append(row[metric])
    return values


def draw_boxplots(case_rows: list[dict], lesion_rows: list[dict], summary: dict, out_dir: Path) -> list[str]:
    """All box plots; returns the file names written."""
    plt = _pyplot()
    trainers = summary["trainers"]
    names: list[str] = []

    fig, axes = plt.subplots(1, 4, figsize=(4 * 3.2, 3.6))
    for ax, (metric, label) in zip(
        axes, (("dice", "DSC"), ("f1", "F1"), ("fp", "FP lesions"), ("fpv_ml", "FPV (ml)"))
    ):
        values = _case_values(case_rows, metric)
        grouped_boxplot(ax, ["all cases"], trainers, {("all cases", t): values.get(t, []) for t in trainers}, label)
    fig.suptitle("Patient-level metrics per trainer")
    fig.tight_layout()
    _save(fig, out_dir, "metrics_by_trainer.png", names)

    groups = ["all", "single", "multiple"]
    data = {}
    for group in groups:
        values = _case_values(case_rows, "dice", lambda r, g=group: g == "all" or r["scenario"] == g)
        for t in trainers:
            data[(group, t)] = values.get(t, [])
    fig, ax = plt.subplots(figsize=(6.5, 4))
    grouped_boxplot(ax, groups, trainers, data, "DSC", (-0.02, 1.02))
    ax.set_title("DSC by lesion scenario")
    _save(fig, out_dir, "dice_by_scenario.png", names)

    thresholds = summary["strata"]["tmtv_thresholds"]["groups"]["all"]["thresholds"]
    if thresholds:
        data, labels = {}, []
        for row in thresholds:
            q = f" (q{row['quantile']:.2f})" if row["quantile"] is not None else ""
            label = f">= {row['threshold_ml']:.3g} ml\n{q.strip()}"
            labels.append(label)
            values = _case_values(
                case_rows, "dice", lambda r, th=row["threshold_ml"]: r["tmtv_gt_ml"] > 0 and r["tmtv_gt_ml"] >= th
            )
            for t in trainers:
                data[(label, t)] = values.get(t, [])
        fig, ax = plt.subplots(figsize=(max(6.5, 1.6 * len(labels)), 4))
        grouped_boxplot(ax, labels, trainers, data, "DSC", (-0.02, 1.02))
        ax.set_title("DSC of cases with GT TMTV >= threshold")
        _save(fig, out_dir, "dice_by_tmtv_threshold.png", names)

    dmax_groups = summary["strata"]["dmax_groups"]["groups"]
    if dmax_groups:
        labels = [f"{g['name']}\n{g['label']}" for g in dmax_groups]
        data = {}
        for label, group in zip(labels, dmax_groups):
            values = _case_values(case_rows, "dice", lambda r, n=group["name"]: r["dmax_group"] == n)
            for t in trainers:
                data[(label, t)] = values.get(t, [])
        fig, ax = plt.subplots(figsize=(max(6.5, 1.8 * len(labels)), 4))
        grouped_boxplot(ax, labels, trainers, data, "DSC", (-0.02, 1.02))
        ax.set_title("DSC by Dmax group (multiple-lesion cases)")
        _save(fig, out_dir, "dice_by_dmax_group.png", names)

    volume_bins = summary["strata"]["lesion_volume_bins"]["bins"]
    if volume_bins:
        labels = [f"{b['name']}\n{b['label']}" for b in volume_bins]
        data = {}
        for label, volume_bin in zip(labels, volume_bins):
            for t in trainers:
                data[(label, t)] = [
                    r["dice"] for r in lesion_rows if r["trainer"] == t and r["volume_bin"] == volume_bin["name"]
                ]
        fig, ax = plt.subplots(figsize=(max(6.5, 1.8 * len(labels)), 4))
        grouped_boxplot(ax, labels, trainers, data, "lesion DSC", (-0.02, 1.02))
        ax.set_title("Lesion DSC by lesion volume")
        _save(fig, out_dir, "lesion_dice_by_volume_bin.png", names)
    return names


def draw_reliability(calibration: dict, out_dir: Path) -> list[str]:
    """Reliability diagram (accuracy vs confidence per bin) and the voxel share per bin."""
    if not calibration:
        return []
    plt = _pyplot()
    names: list[str] = []
    colours = _colours(len(calibration))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(5.5, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    width = 1.0 / (len(next(iter(calibration.values()))["bins"]) * (len(calibration) + 1))
    for i, (trainer, c) in enumerate(calibration.items()):
        bins = [b for b in c["bins"] if b["n_voxels"] > 0]
        top.plot(
            [b["mean_confidence"] for b in bins],
            [b["accuracy"] for b in bins],
            "o-",
            color=colours[i],
            label=f"{trainer} (ECE {c['ece']:.3f}, gap {c['calibration_gap']:.3f})",
        )
        total = max(c["n_voxels"], 1)
        bottom.bar(
            [b["lower"] + width * (i + 0.5) for b in c["bins"]],
            [b["n_voxels"] / total for b in c["bins"]],
            width=width,
            color=colours[i],
        )
    top.set_ylabel("accuracy")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1.02)
    top.legend(fontsize=7)
    top.set_title("Reliability diagram (calibration region voxels)")
    bottom.set_yscale("log")
    bottom.set_xlabel("confidence (max class probability)")
    bottom.set_ylabel("voxel share")
    fig.tight_layout()
    _save(fig, out_dir, "reliability.png", names)
    return names


def draw_bland_altman(case_rows: list[dict], summary: dict, out_dir: Path) -> list[str]:
    """One Bland-Altman figure per biomarker (``bland_altman_<biomarker>.png``), one panel per
    trainer: prediction - GT against the mean of the two, with the bias and the 95 % limits of
    agreement of ``summary["agreement"]``; cases where the biomarker is undefined are not drawn."""
    from nnunetv2_l1dfl.evaluation.agreement import BIOMARKER_TITLES, BIOMARKERS

    if not summary.get("agreement"):
        return []
    plt = _pyplot()
    trainers = summary["trainers"]
    names: list[str] = []
    colours = _colours(len(trainers))
    for name, (gt_column, pred_column, unit) in BIOMARKERS.items():
        fig, axes = plt.subplots(1, len(trainers), figsize=(4.2 * len(trainers), 3.8), sharey=True, squeeze=False)
        for i, trainer in enumerate(trainers):
            ax = axes[0, i]
            rows = [r for r in case_rows if r["trainer"] == trainer]
            gt = np.array([r[gt_column] for r in rows], dtype=np.float64)
            pred = np.array([r[pred_column] for r in rows], dtype=np.float64)
            keep = np.isfinite(gt) & np.isfinite(pred)
            ax.axhline(0, color="lightgray", lw=1, zorder=0)
            ax.scatter((gt[keep] + pred[keep]) / 2, pred[keep] - gt[keep], s=14, color=colours[i], alpha=0.8)
            ba = summary["agreement"]["biomarkers"][name]["trainers"][trainer]["bland_altman"]
            for level, style in ((ba["bias"], "-"), (ba["loa_low"], "--"), (ba["loa_high"], "--")):
                if level is not None and math.isfinite(level):
                    ax.axhline(level, color="k", linestyle=style, lw=1.2)
            ax.set_title(f"{trainer} (n = {int(keep.sum())})", fontsize=9)
            ax.set_xlabel(f"mean of prediction and GT ({unit})")
            if i == 0:
                ax.set_ylabel(f"prediction - GT ({unit})")
        fig.suptitle(f"Bland-Altman: {BIOMARKER_TITLES[name]} (bias solid, 95 % limits of agreement dashed)", fontsize=10)
        fig.tight_layout()
        _save(fig, out_dir, f"bland_altman_{name}.png", names)
    return names


def cases_with_largest_disagreement(case_rows: list[dict], trainers: list[str], n: int) -> list[str]:
    """Case IDs ranked by the spread (max - min) of DSC between trainers, largest first; only cases
    where the trainers differ. A NaN DSC (empty GT and prediction) counts as 1 for the ranking."""
    dice: dict[str, list[float]] = {}
    for row in case_rows:
        value = row["dice"]
        dice.setdefault(row["case_id"], []).append(1.0 if math.isnan(value) else value)
    spread = {c: max(v) - min(v) for c, v in dice.items() if len(v) == len(trainers)}
    ranked = sorted((c for c, s in spread.items() if s > 0), key=lambda c: (-spread[c], c))
    return ranked[:n]


def draw_mip(case, case_rows: list[dict], trainers: list[str], out_dir: Path, label: int | None = None) -> str:
    """Coronal PET MIP with GT (green) and each trainer's prediction (red) outlined, one panel per
    trainer; returns the file name."""
    from nnunetv2_l1dfl.evaluation.io import read_image
    from nnunetv2_l1dfl.evaluation.metrics import foreground_mask

    plt = _pyplot()
    suv, geometry = read_image(case.pet, "pet")
    gt_map, _ = read_image(case.gt, "label")
    spacing_z, _, spacing_x = geometry.spacing_mm
    mip = suv.max(axis=1)  # (z, x): projection along y (anterior-posterior)
    vmax = float(np.percentile(mip, 99.5)) or float(mip.max()) or 1.0
    origin = "lower" if geometry.direction[8] > 0 else "upper"  # head at the top
    gt_projection = foreground_mask(gt_map, label).any(axis=1)
    rows = {r["trainer"]: r for r in case_rows if r["case_id"] == case.case_id}
    fig, axes = plt.subplots(1, len(trainers), figsize=(3.2 * len(trainers), 4.2), squeeze=False)
    for ax, trainer in zip(axes[0], trainers):
        pred_map, _ = read_image(case.predictions[trainer], "label")
        pred_projection = foreground_mask(pred_map, label).any(axis=1)
        ax.imshow(mip, cmap="gray_r", vmin=0, vmax=vmax, origin=origin, aspect=spacing_z / spacing_x)
        for projection, colour in ((gt_projection, _GT_COLOUR), (pred_projection, _PRED_COLOUR)):
            if projection.any() and min(projection.shape) > 1:
                ax.contour(projection.astype(np.uint8), levels=[0.5], colors=[colour], linewidths=0.9, origin=origin)
        r = rows[trainer]
        dice = "n/a" if math.isnan(r["dice"]) else f"{r['dice']:.2f}"
        ax.set_title(f"{trainer}\nDSC {dice}  TP {r['tp']} FP {r['fp']} FN {r['fn']}", fontsize=8)
        ax.set_axis_off()
    fig.suptitle(f"{case.case_id}: coronal PET MIP, GT green, prediction red", fontsize=9)
    fig.tight_layout()
    name = f"mip_{case.case_id}.png"
    fig.savefig(out_dir / name, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return name


def draw_all(case_rows, lesion_rows, summary, cases, out_dir: Path, options) -> list[str]:
    """Every figure; returns the PNG file names (relative to ``out_dir``)."""
    out_dir = Path(out_dir)
    names = draw_boxplots(case_rows, lesion_rows, summary, out_dir)
    names += draw_reliability(summary["calibration"], out_dir)
    names += draw_bland_altman(case_rows, summary, out_dir)
    by_id = {case.case_id: case for case in cases}
    for case_id in cases_with_largest_disagreement(case_rows, summary["trainers"], options.mip_cases):
        names.append(draw_mip(by_id[case_id], case_rows, summary["trainers"], out_dir, options.label))
    logger.info("wrote %d figures to %s", len(names), out_dir)
    return names
