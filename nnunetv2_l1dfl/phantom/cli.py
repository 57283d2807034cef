"""``l1dfl phantom OUT_DIR``: write the embedded synthetic PSMA PET/CT cohort as DICOM."""

from __future__ import annotations

import argparse
import logging

logger = logging.getLogger(__name__)


def phantom_entry(args: argparse.Namespace) -> int:
    from nnunetv2_l1dfl.phantom.generate import CohortError, generate_cohort
    from nnunetv2_l1dfl.phantom.render import PhantomError

    logging.getLogger("highdicom").setLevel(logging.WARNING)  # it logs every copied module at INFO
    try:
        summary = generate_cohort(args.out_dir, n_cases=args.cases, seed=args.seed, size=args.size,
                                  overwrite=args.overwrite, workers=args.np, heldout=args.heldout)
    except (CohortError, PhantomError, ValueError) as e:
        print(f"l1dfl phantom: error: {e}")
        return 1
    n_patients = len({s["patient_id"] for s in summary.studies})
    print(f"phantom cohort: {len(summary.studies)} studies of {n_patients} patients, {summary.n_lesions} lesions "
          f"({summary.generated} written, {summary.reused} kept) in {summary.out_dir} [{summary.seconds:.1f} s]; "
          f"convert with: l1dfl convert dicom {summary.out_dir / 'dicom'} -d ID -n NAME")
    if summary.heldout_studies:
        print(f"held-out test studies: {len(summary.heldout_studies)} of further patients in "
              f"{summary.out_dir / 'heldout_dicom'} (not part of dicom/; for 'l1dfl predict')")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from nnunetv2_l1dfl.phantom.cohort import SIZE_PRESETS

    sizes = "; ".join(f"{name}: {p.description}" for name, p in SIZE_PRESETS.items())
    parser = subparsers.add_parser(
        "phantom",
        help="write a synthetic PSMA PET/CT cohort (DICOM PET/CT + RTSTRUCT/SEG lesions + ground truth)",
        description=(
            "Write a reproducible synthetic PSMA PET/CT cohort as DICOM: per study a PET series in Bq/ml "
            "(F-18, ~120 min uptake, per-slice rescale, DecayCorrection START), a CT on a finer grid with a "
            "wider field of view, and the lesions as RTSTRUCT (ROIs 'Lesion_<n>_<site>' plus organ ROIs) or, "
            "for every fourth study, DICOM SEG. 1-5 lesions per study (prostate bed, pelvic nodes, bone) with "
            "volume and SUVmax drawn to the L1DFL paper's cohort statistics; a few patients scanned twice. "
            "DICOM goes to OUT_DIR/dicom/<patient>/<study>/{CT,PET,RTSTRUCT|SEG}; the ground truth to "
            "OUT_DIR/truth/<patient>/<study>/ (truth.json: SUV scale, timing, lesion centres, ml, SUVmax; "
            "suv_bw.nii.gz and lesion_mask.nii.gz on the PET grid); phantom_cohort.json and "
            "phantom_lesions.csv summarize the cohort. Convert with "
            "'l1dfl convert dicom OUT_DIR/dicom -d ID -n NAME'."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("out_dir", metavar="OUT_DIR", help="folder to write (new or empty, or a cohort to resume)")
    parser.add_argument("--cases", type=int, default=20, help="number of studies (PET/CT scans)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same files")
    parser.add_argument("--size", choices=sorted(SIZE_PRESETS), default="default", help=f"image sizes: {sizes}")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a phantom cohort made with other parameters in OUT_DIR")
    parser.add_argument("--heldout", type=int, default=0,
                        help="also write this many test studies of further patients (none of them in the cohort) "
                             "to OUT_DIR/heldout_dicom and OUT_DIR/heldout_truth, e.g. for 'l1dfl predict'")
    parser.add_argument("-np", type=int, default=1, help="worker processes")
    parser.set_defaults(func=phantom_entry)
