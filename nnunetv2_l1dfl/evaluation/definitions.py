"""Names of the choices ``l1dfl compare`` offers, kept free of heavy imports so that the command
line can list them without loading scipy or cc3d."""

#: lesion detection criteria; the first is the default (the paper's)
CRITERIA = ("suvmax", "overlap", "iou", "lymphoma_crit3")
#: lesion-level DSC definitions; the first is the default: "paper" (Appendix B.0.2, per matched
#: pair, 0 only for a GT lesion with no overlapping component) and "criterion" (per GT lesion
#: against the union of overlapping components, 0 when the detection criterion calls it missed)
LESION_DSC_DEFINITIONS = ("paper", "criterion")
#: connected-component connectivities of 3D lesions
CONNECTIVITIES = (6, 18, 26)
#: DSC / F1 of an empty GT with an empty prediction: NaN (excluded and counted) or 1
EMPTY_POLICIES = ("nan", "one")
#: lesion-burden scenarios of a case, by number of GT lesions 0, 1, >= 2
SCENARIOS = ("negative", "single", "multiple")
#: voxels whose calibration is scored
CALIBRATION_REGIONS = ("lesion_roi", "whole_volume")
#: the direction in which a metric is better; "greater" means higher values are better
METRIC_DIRECTIONS = {
    "dice": "greater",
    "f1": "greater",
    "tp": "greater",
    "fp": "less",
    "fn": "less",
    "fpv_ml": "less",
    "fnv_ml": "less",
}
#: the default declared family of Wilcoxon tests
DEFAULT_TEST_METRICS = ("dice", "f1", "fp", "fpv_ml", "fnv_ml")
#: scipy.stats.wilcoxon's treatments of zero differences
ZERO_METHODS = ("wilcox", "pratt", "zsplit")
#: GT TMTV quantiles used as thresholds (paper, Appendix B: 0 to the 85th percentile)
DEFAULT_TMTV_QUANTILES = (0.0, 0.25, 0.5, 0.75, 0.85)
