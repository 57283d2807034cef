"""Statistics against scipy on known samples, calibration on hand-computed voxels, summary helpers."""

import math

import numpy as np
import pytest
from scipy.stats import wilcoxon

from nnunetv2_l1dfl.evaluation import calibration as C
from nnunetv2_l1dfl.evaluation import stats as S
from nnunetv2_l1dfl.evaluation import summary as U

CANDIDATE = [0.71, 0.55, 0.80, 0.62, 0.90, 0.47, 0.66, 0.58, 0.75, 0.69]
REFERENCE = [0.65, 0.50, 0.81, 0.55, 0.70, 0.40, 0.66, 0.52, 0.60, 0.61]


# ----------------------------------------------------------------------------- Wilcoxon


@pytest.mark.parametrize("better", ["greater", "less"])
def test_paired_wilcoxon_matches_scipy(better):
    result = S.paired_wilcoxon(CANDIDATE, REFERENCE, better)
    expected = wilcoxon(CANDIDATE, REFERENCE, alternative=better)
    assert result["p_value"] == pytest.approx(expected.pvalue)
    assert result["statistic"] == pytest.approx(expected.statistic)
    assert result["n_pairs"] == 10 and result["n_dropped"] == 0
    assert result["median_difference"] == pytest.approx(np.median(np.subtract(CANDIDATE, REFERENCE)))
    # the candidate is mostly higher: significant for "greater", not for "less"
    assert (result["p_value"] < 0.05) == (better == "greater")


def test_paired_wilcoxon_drops_nan_pairs():
    candidate = [*CANDIDATE, float("nan"), 0.3]
    reference = [*REFERENCE, 0.2, float("nan")]
    result = S.paired_wilcoxon(candidate, reference, "greater")
    assert result["n_pairs"] == 10 and result["n_dropped"] == 2
    assert result["p_value"] == pytest.approx(wilcoxon(CANDIDATE, REFERENCE, alternative="greater").pvalue)


def test_paired_wilcoxon_degenerate_samples():
    same = S.paired_wilcoxon([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    assert same["p_value"] == 1.0 and same["median_difference"] == 0.0
    none = S.paired_wilcoxon([float("nan")], [1.0])
    assert none["n_pairs"] == 0 and math.isnan(none["p_value"])
    with pytest.raises(ValueError, match="better"):
        S.paired_wilcoxon([1.0], [2.0], "higher")


def test_bonferroni():
    np.testing.assert_allclose(S.bonferroni([0.01, 0.2, float("nan")], 4), [0.04, 0.8, float("nan")])
    np.testing.assert_allclose(S.bonferroni([0.3, 0.6]), [0.6, 1.0])
    with pytest.raises(ValueError, match="family_size"):
        S.bonferroni([0.1, 0.2], 1)


def test_compare_to_reference_family_and_directions():
    values = {
        "ref": {"dice": REFERENCE, "fp": [3, 2, 4, 5, 3, 2, 4, 3, 5, 4]},
        "new": {"dice": CANDIDATE, "fp": [1, 2, 2, 3, 1, 0, 2, 1, 2, 3]},
        "other": {"dice": REFERENCE, "fp": [3, 2, 4, 5, 3, 2, 4, 3, 5, 4]},
    }
    rows = S.compare_to_reference(values, "ref", ("dice", "fp"))
    assert [(r["trainer"], r["metric"]) for r in rows] == [
        ("new", "dice"), ("new", "fp"), ("other", "dice"), ("other", "fp")
    ]  # fmt: skip
    assert all(r["family_size"] == 4 for r in rows)
    fp_row = rows[1]
    assert fp_row["better"] == "less"
    expected = wilcoxon(values["new"]["fp"], values["ref"]["fp"], alternative="less").pvalue
    assert fp_row["p_value"] == pytest.approx(expected)
    assert fp_row["p_bonferroni"] == pytest.approx(min(1.0, 4 * expected))
    assert fp_row["significant"] is True
    assert rows[2]["p_value"] == 1.0 and rows[2]["significant"] is False  # identical samples
    with pytest.raises(ValueError, match="direction"):
        S.compare_to_reference(values, "ref", ("volume",))


# ----------------------------------------------------------------------------- calibration


def test_voxel_calibration_hand_computed():
    """Four voxels, two classes: p(fg) = 0.9, 0.6, 0.2, 0.7 with GT 1, 0, 0, 1."""
    foreground = np.array([0.9, 0.6, 0.2, 0.7])
    probabilities = np.stack([1 - foreground, foreground])
    gt = np.array([1, 0, 0, 1])
    counts = C.voxel_calibration(probabilities, gt, n_bins=5)
    summary = counts.summary()

    def entropy(p):
        return -(p * math.log(p) + (1 - p) * math.log(1 - p))

    # correct: voxels 0 (conf 0.9), 2 (conf 0.8), 3 (conf 0.7); incorrect: voxel 1 (conf 0.6)
    assert summary["n_correct"] == 3 and summary["n_incorrect"] == 1
    assert summary["confidence_correct"] == pytest.approx((0.9 + 0.8 + 0.7) / 3)
    assert summary["confidence_incorrect"] == pytest.approx(0.6)
    assert summary["calibration_gap"] == pytest.approx(0.8 - 0.6)
    assert summary["entropy_correct"] == pytest.approx((entropy(0.9) + entropy(0.8) + entropy(0.7)) / 3)
    assert summary["entropy_incorrect"] == pytest.approx(entropy(0.6))
    # bins of width 0.2: [0.6, 0.8) holds 0.6 (wrong) and 0.7 (right); [0.8, 1] holds 0.9 and 0.8
    ece = (2 / 4) * abs(0.5 - 0.65) + (2 / 4) * abs(1.0 - 0.85)
    assert summary["ece"] == pytest.approx(ece)
    assert [b["n_voxels"] for b in summary["bins"]] == [0, 0, 0, 2, 2]
    # a single sigmoid channel gives the same numbers
    single = C.voxel_calibration(foreground[None], gt, n_bins=5).summary()
    assert single["ece"] == pytest.approx(ece) and single["n_correct"] == 3
    # counts add up across cases
    doubled = (counts + counts).summary()
    assert doubled["n_voxels"] == 8 and doubled["ece"] == pytest.approx(ece)


def test_calibration_region_and_case_calibration():
    gt = np.zeros((5, 9, 9), dtype=np.uint8)
    gt[2, 4, 4] = 1
    region = C.calibration_region(gt > 0, np.zeros(gt.shape, bool), "lesion_roi", margin_voxels=1)
    assert region.sum() == 27 and region[1:4, 3:6, 3:6].all()
    assert C.calibration_region(gt > 0, gt > 0, "whole_volume").all()
    assert C.dilate_cube(np.zeros((3, 3, 3), bool), 2).sum() == 0

    foreground = np.where(gt > 0, 0.9, 0.2).astype(np.float32)
    probabilities = np.stack([1 - foreground, foreground])
    counts = C.case_calibration(probabilities, gt, margin_voxels=1).summary()
    assert counts["n_voxels"] == 27 and counts["n_incorrect"] == 0
    assert counts["confidence_correct"] == pytest.approx((0.9 + 26 * 0.8) / 27)
    with pytest.raises(ValueError, match="do not match"):
        C.case_calibration(probabilities[:, :4], gt)
    with pytest.raises(ValueError, match="sum to 1"):
        C.case_calibration(np.stack([foreground, foreground]), gt)


# ----------------------------------------------------------------------------- summary helpers


def test_describe_ignores_and_counts_nan():
    d = U.describe([1.0, 2.0, float("nan"), 4.0])
    assert d["n"] == 3 and d["n_nan"] == 1
    assert d["mean"] == pytest.approx(7 / 3) and d["sd"] == pytest.approx(np.std([1, 2, 4], ddof=1))
    assert (d["q1"], d["median"], d["q3"]) == pytest.approx((1.5, 2.0, 3.0))
    assert U.describe([])["n"] == 0 and math.isnan(U.describe([float("nan")])["mean"])


def test_bins_are_half_open_with_a_closed_last_bin():
    edges = [0.0, 10.0, 20.0]
    np.testing.assert_array_equal(U.assign_bins([0, 5, 10, 19.9, 20, 25, -1, float("nan")], edges),
                                  [0, 0, 1, 1, 1, -1, -1, -1])  # fmt: skip
    assert U.bin_edges([4.0, 4.0, 4.0], (0, 0.5, 1), None) == [4.0, 4.0]
    np.testing.assert_array_equal(U.assign_bins([4.0, 5.0], [4.0, 4.0]), [0, -1])
    assert U.bin_edges([1.0, 2.0, 3.0, 4.0, 5.0], (0, 0.5, 1), None) == [1.0, 3.0, 5.0]
    assert U.bin_edges([1.0], (0, 1), [0, 90, 110]) == [0.0, 90.0, 110.0]
