"""``l1dfl compare``: paper-style comparison of nnU-Net trainers on PET lesions.

Registered by ``nnunetv2_l1dfl.cli``; heavy imports happen inside :func:`compare_entry`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

_DESCRIPTION = """\
Compare two or more trainers on PET lesions the way the L1DFL paper does (Table 1, scenarios,
TMTV thresholds, Dmax groups, lesion volumes, Wilcoxon tests, calibration), from the folders
nnU-Net already wrote. Either

  l1dfl compare -d DATASET -c 3d_fullres -tr nnUNetTrainer nnUNetTrainerL1DFL -o OUT

which reads every fold's validation/ predictions (each case once), labelsTr and the PET channel of
imagesTr, or

  l1dfl compare --pred A=FOLDER --pred B=FOLDER --gt LABELS --pet IMAGES -o OUT

for any prediction folders (e.g. a test set). The first trainer is the reference of the statistics.
Writes cases.csv, lesions.csv, summary.json, report.md and PNG figures to OUT.
"""


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.replace(",", " ").split())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from e


def _prediction(text: str) -> tuple[str, Path]:
    name, sep, folder = text.partition("=")
    if not sep or not name or not folder:
        raise argparse.ArgumentTypeError(f"expected NAME=FOLDER, got {text!r}")
    return name, Path(folder)


def register(subparsers: argparse._SubParsersAction) -> None:
    from nnunetv2_l1dfl.evaluation.definitions import (
        CALIBRATION_REGIONS,
        CONNECTIVITIES,
        CRITERIA,
        DEFAULT_TEST_METRICS,
        DEFAULT_TMTV_QUANTILES,
        EMPTY_POLICIES,
        LESION_DSC_DEFINITIONS,
        METRIC_DIRECTIONS,
        ZERO_METHODS,
    )

    p = subparsers.add_parser(
        "compare",
        help="compare nnU-Net trainers on PET lesions (paper Table 1, strata, statistics, calibration)",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_argument_group("inputs: nnU-Net results")
    src.add_argument("-d", "--dataset", help="dataset ID or name (DatasetXXX_Name)")
    src.add_argument("-c", "--configuration", default="3d_fullres", help="configuration (default: 3d_fullres)")
    src.add_argument("-tr", "--trainers", nargs="+", metavar="TRAINER", help="two or more trainer classes; first = reference")
    src.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (default: nnUNetPlans)")
    src.add_argument(
        "-f", "--folds", nargs="+", type=int, default=[0, 1, 2, 3, 4], help="folds to read (default: 0 1 2 3 4)"
    )
    fol = p.add_argument_group("inputs: any prediction folders")
    fol.add_argument(
        "--pred", action="append", type=_prediction, metavar="NAME=FOLDER",
        help="a trainer's predictions <case><ending>; repeat for each trainer, first = reference",
    )  # fmt: skip
    fol.add_argument("--gt", type=Path, metavar="FOLDER", help="GT folder <case><ending> (default with -d: nnUNet_raw labelsTr)")
    fol.add_argument("--pet", type=Path, metavar="FOLDER", help="nnU-Net images folder <case>_XXXX<ending> (default with -d: imagesTr)")
    fol.add_argument(
        "--pet-channel", type=int, default=1,
        help="channel index XXXX of the PET file (default: 1); refused when dataset.json's channel_modalities "
        "(or a channel named PET) says another channel is the PET",
    )  # fmt: skip
    fol.add_argument("--file-ending", default=None, help="file ending (default: dataset.json's, else .nii.gz)")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="OUT", help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace report files already in the output folder")

    m = p.add_argument_group("metrics")
    m.add_argument("--criterion", choices=CRITERIA, default="suvmax", help="lesion detection criterion (default: suvmax)")
    m.add_argument(
        "--lesion-dsc", choices=LESION_DSC_DEFINITIONS, default="paper",
        help="lesion DSC: paper (per matched pair, 0 only for a GT lesion no component overlaps; default) or "
        "criterion (per GT lesion, 0 when the detection criterion calls it missed)",
    )  # fmt: skip
    m.add_argument("--iou-threshold", type=float, default=0.1, help="IoU needed by --criterion iou (default: 0.1)")
    m.add_argument("--connectivity", type=int, choices=CONNECTIVITIES, default=18, help="lesion connectivity (default: 18)")
    m.add_argument("--label", type=int, default=None, help="score only this label (default: every label > 0)")
    m.add_argument(
        "--empty-policy", choices=EMPTY_POLICIES, default="nan",
        help="DSC/F1 of an empty GT with an empty prediction (default: nan, excluded from means and counted)",
    )  # fmt: skip
    s = p.add_argument_group("strata")
    s.add_argument(
        "--tmtv-quantiles", type=_floats, default=DEFAULT_TMTV_QUANTILES,
        help="GT TMTV quantiles used as thresholds (default: 0,0.25,0.5,0.75,0.85)",
    )  # fmt: skip
    s.add_argument("--tmtv-edges", type=_floats, default=None, help="explicit TMTV thresholds in ml (replace quantiles)")
    s.add_argument(
        "--dmax-edges", type=_floats, default=None,
        help="Dmax group edges in mm, e.g. 0,90,110,140,600 as in the paper (default: quartiles)",
    )  # fmt: skip
    s.add_argument("--lesion-volume-edges", type=_floats, default=None, help="lesion volume bin edges in ml (default: quartiles)")
    st = p.add_argument_group("statistics")
    st.add_argument(
        "--test-metrics", nargs="+", choices=sorted(METRIC_DIRECTIONS), default=list(DEFAULT_TEST_METRICS),
        help=f"declared family of Wilcoxon tests (default: {' '.join(DEFAULT_TEST_METRICS)})",
    )  # fmt: skip
    st.add_argument("--zero-method", choices=ZERO_METHODS, default="wilcox", help="Wilcoxon zero differences (default: wilcox)")
    st.add_argument(
        "--alpha", type=float, default=0.05, help="significance level after Bonferroni and of TOST (default: 0.05)"
    )
    st.add_argument(
        "--equivalence-margin", type=float, default=0.2,
        help="TOST bound and coverage-probability limit as a fraction of each biomarker's mean GT (default: 0.2)",
    )  # fmt: skip
    st.add_argument("--tdi-coverage", type=float, default=0.9, help="coverage of the total deviation index (default: 0.9)")
    c = p.add_argument_group("calibration (from <case>.npz written by nnU-Net --npz)")
    c.add_argument("--no-calibration", action="store_true", help="ignore probability files")
    c.add_argument(
        "--calibration-region", choices=CALIBRATION_REGIONS, default="lesion_roi",
        help="voxels scored (default: lesion_roi = dilated GT plus predicted foreground)",
    )  # fmt: skip
    c.add_argument("--calibration-margin", type=int, default=3, help="GT dilation in voxels for lesion_roi (default: 3)")
    c.add_argument("--calibration-bins", type=int, default=15, help="reliability-diagram bins (default: 15)")
    o = p.add_argument_group("run")
    o.add_argument(
        "-np", "--num-processes", type=int, default=min(4, os.cpu_count() or 1),
        help="cases scored in parallel; each worker holds one case (about 3 GB for 600 x 512 x 512) "
        "(default: min(4, CPU count))",
    )  # fmt: skip
    o.add_argument("--geometry-tolerance", type=float, default=1e-3, help="mm / direction tolerance (default: 1e-3)")
    o.add_argument("--mip-cases", type=int, default=3, help="PET MIPs of the most disputed cases (default: 3)")
    o.add_argument("--no-plots", action="store_true", help="write no figures")
    p.set_defaults(func=compare_entry)


def _with_dataset_labels(options, inputs: dict):
    """``options`` with ``max_label`` from the dataset.json beside the PET or GT folder, or in a
    prediction folder (nnU-Net copies it there), so that a label value the dataset does not declare
    fails the case instead of counting as lesion."""
    import dataclasses

    from nnunetv2_l1dfl.evaluation.io import dataset_max_label

    folders = [inputs.get("pet_folder"), inputs.get("gt_folder")]
    candidates = [Path(f).parent / "dataset.json" for f in folders if f]
    candidates += [Path(f) / "dataset.json" for f in inputs.get("predictions", {}).values()]
    if options.label is not None:  # one label scored: other values, an ignore label too, are background
        return options
    return dataclasses.replace(options, max_label=dataset_max_label(candidates))


def compare_entry(args: argparse.Namespace) -> int:
    """Run ``l1dfl compare``; returns 0, or 2 with a one-line error for unusable inputs."""
    from nnunetv2_l1dfl.evaluation.compare import CompareOptions, run_compare
    from nnunetv2_l1dfl.evaluation.io import (
        DEFAULT_FILE_ENDING,
        CompareInputError,
        check_output_folder,
        discover_folder_cases,
        discover_nnunet_cases,
        remove_report_files,
    )

    def fail(message: str) -> int:
        print(f"l1dfl compare: error: {message}", file=sys.stderr)
        return 2

    if (args.dataset is None) == (args.pred is None):
        return fail("give either -d DATASET -tr TRAINER ... or --pred NAME=FOLDER ... (not both)")
    try:
        options = CompareOptions(
            criterion=args.criterion,
            lesion_dsc=args.lesion_dsc,
            iou_threshold=args.iou_threshold,
            connectivity=args.connectivity,
            label=args.label,
            empty_policy=args.empty_policy,
            tmtv_quantiles=tuple(args.tmtv_quantiles),
            tmtv_edges_ml=args.tmtv_edges,
            dmax_edges_mm=args.dmax_edges,
            lesion_volume_edges_ml=args.lesion_volume_edges,
            test_metrics=tuple(args.test_metrics),
            zero_method=args.zero_method,
            alpha=args.alpha,
            equivalence_margin=args.equivalence_margin,
            tdi_coverage=args.tdi_coverage,
            calibration=not args.no_calibration,
            calibration_region=args.calibration_region,
            calibration_margin_voxels=args.calibration_margin,
            calibration_bins=args.calibration_bins,
            geometry_tolerance=args.geometry_tolerance,
            n_processes=args.num_processes,
            mip_cases=args.mip_cases,
            plots=not args.no_plots,
        )
    except ValueError as e:
        return fail(str(e))
    try:
        check_output_folder(args.output)
        if args.dataset is not None:
            if not args.trainers or len(args.trainers) < 2:
                return fail("-tr needs two or more trainers")
            cases, inputs = discover_nnunet_cases(
                args.dataset, args.configuration, args.trainers, args.plans, tuple(args.folds),
                args.pet_channel, args.gt, args.pet, args.file_ending,
            )  # fmt: skip
            trainers = list(args.trainers)
        else:
            names = [name for name, _ in args.pred]
            if len(set(names)) != len(names):
                return fail(f"--pred names must be distinct, got {names}")
            if args.gt is None or args.pet is None:
                return fail("--pred needs --gt FOLDER and --pet FOLDER")
            cases, inputs = discover_folder_cases(
                dict(args.pred), args.gt, args.pet, args.pet_channel, args.file_ending or DEFAULT_FILE_ENDING
            )
            trainers = names
        try:
            options = _with_dataset_labels(options, inputs)
        except ValueError as e:  # --label above what dataset.json declares
            return fail(str(e))
        summary = run_compare(cases, trainers, args.output, options, inputs, overwrite=args.overwrite)
    except CompareInputError as e:
        return fail(str(e))
    except OSError as e:  # read-only or full disk: no report files left that look complete
        remove_report_files(args.output)
        where = f": {e.filename}" if e.filename else ""
        return fail(f"{e.strerror or e}{where}; no report left in {args.output}")
    medians = ", ".join(f"{row['trainer']} {row['dice']['median']:.3f}" for row in summary["table1"]["all"])
    print(
        f"l1dfl compare: {summary['cases']['n']} cases x {len(trainers)} trainers, median DSC {medians}; "
        f"report: {args.output / 'report.md'}"
    )
    return 0
