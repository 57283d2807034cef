"""``l1dfl compare`` end to end on a miniature nnU-Net results tree built by the test, and its errors."""

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from _evaluation_helpers import (
    CANDIDATE,
    CANDIDATE_CONFIDENCE,
    CANDIDATE_DICE,
    CASE_LESIONS,
    REFERENCE,
    REFERENCE_DICE,
    build_nnunet_tree,
    write_image,
)
from scipy.stats import wilcoxon

from nnunetv2_l1dfl.cli import main
from nnunetv2_l1dfl.evaluation.report import headline_table


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def run(args: list[str], capsys) -> tuple[int, str]:
    code = main(["compare", *args])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_compare_nnunet_results_end_to_end(nnunet_env, tmp_path, capsys):
    build_nnunet_tree(nnunet_env)
    out = tmp_path / "out"
    code, printed = run(
        ["-d", "987", "-c", "3d_fullres", "-tr", REFERENCE, CANDIDATE, "-o", str(out), "-np", "2", "--mip-cases", "2"],
        capsys,
    )
    assert code == 0, printed
    assert "10 cases x 2 trainers, median DSC nnUNetTrainer 1.000" in printed

    summary = json.loads((out / "summary.json").read_text())
    assert summary["inputs"]["dataset"] == "Dataset987_MiniPET" and summary["reference"] == REFERENCE
    assert summary["cases"] == {"n": 10, "negative": 1, "single": 5, "multiple": 4, "n_lesions_gt": 14}

    # cases.csv: one row per case and trainer with the known DSC, counts and folds
    cases = read_csv(out / "cases.csv")
    assert len(cases) == 20
    required = "case_id trainer dice tp fp fn f1 fpv_ml fnv_ml tmtv_gt_ml tmtv_pred_ml n_lesions_gt scenario dmax_mm"
    assert set(required.split()) <= set(cases[0])
    for row in cases:
        expected = (REFERENCE_DICE if row["trainer"] == REFERENCE else CANDIDATE_DICE)[row["case_id"]]
        assert float(row["dice"]) == pytest.approx(expected, nan_ok=True), row
        assert int(row["fold"]) == sorted(CASE_LESIONS).index(row["case_id"]) // 2
        assert int(row["n_lesions_gt"]) == len(CASE_LESIONS[row["case_id"]])
    by_key = {(r["case_id"], r["trainer"]): r for r in cases}
    missed = by_key[("case_01", REFERENCE)]
    assert (missed["tp"], missed["fp"], missed["fn"]) == ("1", "0", "1")
    assert float(missed["fnv_ml"]) == pytest.approx(0.036) and float(missed["f1"]) == pytest.approx(2 / 3)
    assert float(missed["dmax_mm"]) == pytest.approx(math.sqrt(10**2 + 11**2 + 11**2))
    assert missed["dmax_group"].startswith("G") and by_key[("case_00", REFERENCE)]["dmax_group"] == ""
    negative = by_key[("case_03", REFERENCE)]
    assert (negative["fp"], negative["scenario"], float(negative["fpv_ml"])) == ("1", "negative", 0.002)
    assert by_key[("case_03", CANDIDATE)]["dice"] == "nan"

    # lesions.csv: one row per GT lesion and trainer
    lesions = read_csv(out / "lesions.csv")
    assert len(lesions) == 2 * 14
    lost = [r for r in lesions if r["case_id"] == "case_01" and r["trainer"] == REFERENCE and r["lesion_id"] == "2"]
    assert lost[0]["detected"] == "False" and float(lost[0]["dice"]) == 0.0
    assert all(float(r["suv_max"]) == 5.0 and float(r["volume_ml"]) == pytest.approx(0.036) for r in lesions)
    assert all(float(r["suv_mean"]) == pytest.approx((17 * 3 + 5) / 18) for r in lesions)

    # Table 1 and statistics
    rows = {r["trainer"]: r for r in summary["table1"]["all"]}
    reference_dice = np.array([REFERENCE_DICE[c] for c in sorted(CASE_LESIONS)])
    assert rows[REFERENCE]["dice"]["mean"] == pytest.approx(reference_dice.mean())
    assert rows[REFERENCE]["dice"]["sd"] == pytest.approx(reference_dice.std(ddof=1))
    assert rows[CANDIDATE]["dice"]["n"] == 9 and rows[CANDIDATE]["dice"]["n_nan"] == 1
    assert rows[CANDIDATE]["dice"]["median"] == 1.0
    assert rows[REFERENCE]["fp"]["mean"] == pytest.approx(0.2) and rows[REFERENCE]["fn"]["mean"] == pytest.approx(0.1)
    keep = ~np.isnan([CANDIDATE_DICE[c] for c in sorted(CASE_LESIONS)])
    candidate_dice = np.array([CANDIDATE_DICE[c] for c in sorted(CASE_LESIONS)])
    p = wilcoxon(candidate_dice[keep], reference_dice[keep], alternative="greater").pvalue
    dice_test = next(r for r in summary["statistics"] if r["metric"] == "dice")
    assert dice_test["n_pairs"] == 9 and dice_test["n_dropped"] == 1
    assert dice_test["p_value"] == pytest.approx(p)
    assert dice_test["p_bonferroni"] == pytest.approx(min(1.0, 5 * p)) and dice_test["family_size"] == 5
    assert rows[CANDIDATE]["p_dice"] == pytest.approx(dice_test["p_bonferroni"])
    assert summary["table1"]["single"][0]["n_cases"] == 5

    detection = summary["patient_detection"]
    assert (detection[REFERENCE]["fp"], detection[REFERENCE]["tn"], detection[REFERENCE]["accuracy"]) == (1, 0, 0.9)
    assert detection[CANDIDATE]["specificity"] == 1.0 and detection[CANDIDATE]["sensitivity"] == 1.0

    # strata: thresholds start at the smallest positive GT TMTV, which keeps all 9 positive cases
    thresholds = summary["strata"]["tmtv_thresholds"]["groups"]["all"]["thresholds"]
    assert thresholds[0]["threshold_ml"] == pytest.approx(0.036) and thresholds[0]["n_cases"] == 9
    assert len(thresholds) == 5
    assert sum(g["n"] for g in summary["strata"]["dmax_groups"]["groups"]) == 4
    assert sum(b["n_lesions"] for b in summary["strata"]["lesion_volume_bins"]["bins"]) == 14

    # calibration only for the trainer with .npz files: every voxel right with confidence 0.8
    calibration = summary["calibration"]
    assert list(calibration) == [CANDIDATE] and calibration[CANDIDATE]["n_cases"] == 10
    c = CANDIDATE_CONFIDENCE
    assert calibration[CANDIDATE]["n_incorrect"] == 0
    assert calibration[CANDIDATE]["confidence_correct"] == pytest.approx(c, rel=1e-6)
    assert calibration[CANDIDATE]["entropy_correct"] == pytest.approx(-(c * math.log(c) + (1 - c) * math.log(1 - c)), rel=1e-5)

    # report and figures
    report = (out / "report.md").read_text()
    assert headline_table(summary) in report
    for section in ("## Table 1", "## Statistics", "## Calibration", "## Options and edge-case policies", "Dmax"):
        assert section in report
    figures = summary["figures"]
    assert {"dice_by_scenario.png", "metrics_by_trainer.png", "reliability.png", "dice_by_dmax_group.png"} <= set(figures)
    # the two cases where the trainers differ most: case_03 (NaN counts as 1 vs 0) and case_01
    assert [f for f in figures if f.startswith("mip_")] == ["mip_case_03.png", "mip_case_01.png"]
    for name in figures:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name

    # quantification agreement (per patient, prediction - GT). The candidate equals the GT: every
    # difference 0, equivalent; SUVmax is undefined on case_03 (no GT lesion) and left out.
    agreement = summary["agreement"]["biomarkers"]
    same = agreement["suv_max"]["trainers"][CANDIDATE]
    assert (same["n"], same["n_excluded_no_gt"], same["n_excluded_no_pred"]) == (9, 1, 0)
    assert same["bland_altman"]["bias"] == 0.0 and same["tost"]["equivalent"] and same["tost"]["p_value"] == 0.0
    assert agreement["tmtv"]["trainers"][CANDIDATE]["ccc"]["ccc"] == 1.0
    # the reference misses LESION_B on case_01 (-0.036 ml, -1 lesion) and adds one voxel on case_02
    # and case_03 (+0.002 ml, +1 lesion each); its SUVmean on case_02 drops from 56/18 to 57/19
    ref = {name: agreement[name]["trainers"][REFERENCE] for name in agreement}
    assert ref["tmtv"]["n"] == 10 and ref["tmtv"]["bland_altman"]["bias"] == pytest.approx(-0.032 / 10)
    assert ref["lesion_count"]["bland_altman"]["bias"] == pytest.approx(0.1)
    assert ref["suv_mean"]["bland_altman"]["bias"] == pytest.approx((57 / 19 - 56 / 18) / 9)
    assert ref["tmtv"]["delta"] == pytest.approx(0.2 * np.mean([len(CASE_LESIONS[c]) * 0.036 for c in CASE_LESIONS]))
    assert ref["dmax"]["n"] == 9 and ref["suv_max"]["bland_altman"]["bias"] == 0.0
    error_test = ref["tmtv"]  # reference row: no test of its own
    assert "absolute_error_test" not in error_test
    tmtv_test = agreement["tmtv"]["trainers"][CANDIDATE]["absolute_error_test"]
    p_tmtv = wilcoxon(np.zeros(3), [0.036, 0.002, 0.002], alternative="less").pvalue
    assert tmtv_test["p_value"] == pytest.approx(p_tmtv) and tmtv_test["family_size"] == 6
    assert tmtv_test["p_bonferroni"] == pytest.approx(min(1.0, 6 * p_tmtv))
    for title in ("## Quantification agreement", "### SUVmax", "### TLA (= TLG)", "### Lesion spread Dmax", "TOST"):
        assert title in report, title
    assert {f"bland_altman_{name}.png" for name in agreement} <= set(figures)
    cases_header = read_csv(out / "cases.csv")[0]
    assert {"suv_max_gt", "suv_max_pred", "suv_mean_pred", "dmax_pred_mm"} <= set(cases_header)
    assert {"suv_peak", "suv_peak_at_max", "tlg", "pred_lesion_id", "n_overlapping_pred"} <= set(lesions[0])
    assert summary["options"]["lesion_dsc"] == "paper" and summary["options"]["equivalence_margin"] == 0.2

    # nothing is silently overwritten
    code, printed = run(["-d", "987", "-tr", REFERENCE, CANDIDATE, "-o", str(out)], capsys)
    assert code == 2 and "--overwrite" in printed


@pytest.fixture
def tree(nnunet_env):
    return build_nnunet_tree(nnunet_env, with_npz=False)


def test_missing_fold_is_named(tree, tmp_path, capsys):
    shutil.rmtree(tree["trainer_folders"][CANDIDATE] / "fold_4")
    code, printed = run(["-d", "Dataset987_MiniPET", "-tr", REFERENCE, CANDIDATE, "-o", str(tmp_path / "o")], capsys)
    assert code == 2
    assert "fold 4 missing" in printed and str(tree["trainer_folders"][CANDIDATE] / "fold_4") in printed


def test_validation_case_missing_against_splits(tree, tmp_path, capsys):
    (tree["trainer_folders"][REFERENCE] / "fold_2" / "validation" / "case_05.nii.gz").unlink()
    code, printed = run(["-d", "987", "-tr", REFERENCE, CANDIDATE, "-o", str(tmp_path / "o")], capsys)
    assert code == 2 and f"{REFERENCE} lacks" in printed and "case_05 (fold 2)" in printed


def _folders(tree, tmp_path) -> dict:
    folders = {}
    for trainer, folder in tree["trainer_folders"].items():
        folders[trainer] = tmp_path / trainer
        folders[trainer].mkdir()
        for prediction in folder.glob("fold_*/validation/*.nii.gz"):
            shutil.copy(prediction, folders[trainer])
    return folders


def _folder_args(tree, folders, out) -> list[str]:
    args = []
    for name, folder in folders.items():
        args += ["--pred", f"{name}={folder}"]
    return [*args, "--gt", str(tree["raw"] / "labelsTr"), "--pet", str(tree["raw"] / "imagesTr"), "-o", str(out)]


def test_prediction_folders_mode_and_case_set_errors(tree, tmp_path, capsys):
    folders = _folders(tree, tmp_path)
    args = [*_folder_args(tree, folders, tmp_path / "ok"), "--no-plots", "--criterion", "overlap", "-np", "1",
            "--lesion-dsc", "criterion", "--equivalence-margin", "0.1", "--tdi-coverage", "0.8"]  # fmt: skip
    code, printed = run(args, capsys)
    assert code == 0, printed
    summary = json.loads((tmp_path / "ok" / "summary.json").read_text())
    assert summary["inputs"]["mode"] == "folders" and summary["options"]["criterion"] == "overlap"
    assert summary["options"]["lesion_dsc"] == "criterion" and summary["agreement"]["margin"] == 0.1
    assert summary["agreement"]["biomarkers"]["tmtv"]["trainers"][REFERENCE]["tdi"]["coverage"] == 0.8
    lesions = read_csv(tmp_path / "ok" / "lesions.csv")
    assert all(r["pred_lesion_id"] == "" for r in lesions)  # criterion: the union, no single component
    assert summary["figures"] == [] and not list((tmp_path / "ok").glob("*.png"))

    (folders[CANDIDATE] / "case_04.nii.gz").unlink()
    (folders[REFERENCE] / "case_07.nii.gz").unlink()
    code, printed = run(_folder_args(tree, folders, tmp_path / "o"), capsys)
    assert code == 2
    assert f"{CANDIDATE} lacks 1 case(s): case_04" in printed and f"{REFERENCE} lacks 1 case(s): case_07" in printed


def test_geometry_mismatch_names_files_and_difference(tree, tmp_path, capsys):
    folders = _folders(tree, tmp_path)
    bad = folders[CANDIDATE] / "case_02.nii.gz"
    write_image(bad, np.zeros((8, 16, 16), np.uint8), spacing=(3.0, 1.0, 1.0))
    code, printed = run([*_folder_args(tree, folders, tmp_path / "o"), "--no-plots"], capsys)
    assert code == 2
    assert "geometry mismatch" in printed and str(bad) in printed and "case_02.nii.gz" in printed
    assert "spacing (z, y, x) mm (2.0, 1.0, 1.0) vs (3.0, 1.0, 1.0)" in printed


def test_missing_pet_channel_is_listed(tree, tmp_path, capsys):
    folders = _folders(tree, tmp_path)
    code, printed = run([*_folder_args(tree, folders, tmp_path / "o"), "--pet-channel", "2"], capsys)
    assert code == 2 and "PET channel 2" in printed and "case_00_0002.nii.gz" in printed


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--criterion", "--pet-channel", "--empty-policy", "--dmax-edges", "-np", "--pred", "--lesion-dsc",
                   "--equivalence-margin", "--tdi-coverage"):  # fmt: skip
        assert option in text


def test_evaluate_case_arrays_scores_one_label_and_its_probability_channel():
    """Label 2 (8 voxels) is scored alone; label 1 elsewhere is background. Three-class
    probabilities give 0.7 to the true class: collapsed to label 2 vs rest, the lesion voxels have
    confidence 0.7 and the 56 voxels around them (margin 1) 0.85, all correct."""
    from nnunetv2_l1dfl.evaluation.compare import CompareOptions, evaluate_case_arrays

    labels = np.zeros((8, 12, 12), dtype=np.uint8)
    labels[2:4, 2:4, 2:4] = 2
    labels[5:7, 8:10, 8:10] = 1
    suv = np.ones(labels.shape, dtype=np.float32)
    probabilities = np.full((3, *labels.shape), 0.15, dtype=np.float32)
    for c in range(3):
        probabilities[c][labels == c] = 0.7
    options = CompareOptions(label=2, calibration_margin_voxels=1, plots=False)
    result = evaluate_case_arrays("c", labels, suv, {"a": labels, "b": labels}, (1.0, 1.0, 1.0), options, {"b": probabilities})
    assert [row["n_lesions_gt"] for row in result.case_rows] == [1, 1]
    assert [row["dice"] for row in result.case_rows] == [1.0, 1.0]
    assert list(result.calibration) == ["b"]
    calibration = result.calibration["b"].summary()
    assert calibration["n_voxels"] == 64 and calibration["n_incorrect"] == 0
    assert calibration["confidence_correct"] == pytest.approx((8 * 0.7 + 56 * 0.85) / 64, rel=1e-6)


def test_paper_lesion_dsc_rows_per_matched_pair_and_lesions_counted_once():
    """GT lesion 1 (z 1-2, y 1-6, x 1-2: 24 voxels) split by trainer "a" into two 8-voxel
    components, GT lesion 2 (8 voxels) predicted exactly. Paper: lesions.csv has a row per matched
    pair (DSC 2*8/32 twice, 1.0), the detection rate still counts 2 lesions; criterion: one row per GT
    lesion (the union, 2*16/40)."""
    from nnunetv2_l1dfl.evaluation.compare import CompareOptions, evaluate_case_arrays
    from nnunetv2_l1dfl.evaluation.summary import build_summary

    gt = np.zeros((6, 12, 12), dtype=np.uint8)
    gt[1:3, 1:7, 1:3] = 1
    gt[1:3, 9:11, 8:10] = 1
    suv = np.ones(gt.shape, dtype=np.float32)
    suv[1, 1, 1] = 9.0
    suv[1, 9, 8] = 7.0
    split = gt.copy()
    split[1:3, 3:5, 1:3] = 0
    for lesion_dsc, expected in (("paper", [(1, 1, 0.5), (1, 2, 0.5), (2, 3, 1.0)]), ("criterion", [(1, None, 0.8), (2, None, 1.0)])):
        options = CompareOptions(plots=False, lesion_dsc=lesion_dsc)
        result = evaluate_case_arrays("c", gt, suv, {"a": split, "b": gt}, (2.0, 1.0, 1.0), options)
        rows = [r for r in result.lesion_rows if r["trainer"] == "a"]
        assert [(r["lesion_id"], r["pred_lesion_id"], pytest.approx(r["dice"])) for r in rows] == expected
        assert [r["n_overlapping_pred"] for r in rows][0] == 2
        summary = build_summary(result.case_rows, result.lesion_rows, {}, ["a", "b"], options, {})
        assert summary["lesions"]["a"]["n_lesions"] == 2 and summary["lesions"]["a"]["n_detected"] == 2
        assert summary["lesions"]["a"]["n_dice_units"] == len(expected)
        assert summary["lesions"]["a"]["dice"]["median"] == pytest.approx(np.median([d for *_, d in expected]))
        assert sum(b["n_lesions"] for b in summary["strata"]["lesion_volume_bins"]["bins"]) == 2
