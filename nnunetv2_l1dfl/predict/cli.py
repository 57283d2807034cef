"""``l1dfl predict``: PET/CT studies in (DICOM or NIfTI), DICOM SEG, RTSTRUCT and a lesion report out.

    l1dfl predict INPUT -o OUT (-d DATASET -c CONFIG -tr TRAINER [-p PLANS] [-f FOLDS ...] | -m MODEL_DIR_OR_ZIP)
                  [--device cuda|cpu|mps] [--disable-tta] [--save-probabilities] [-np N]
                  [--output-types seg rtstruct nifti] [--overwrite] [--series-uid UID] [--rtstruct-reference pet|ct]

Errors are one line (no traceback); the run ends with a one-line summary and exits 1 when any study
failed (each failure listed with its reason), 2 when nothing could start (bad model, input or output).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path

logger = logging.getLogger(__name__)


def _predict_entry(args: argparse.Namespace) -> int:
    from nnunetv2_l1dfl.predict.inputs import StudyError, discover_studies
    from nnunetv2_l1dfl.predict.model import (
        ModelError,
        build_predictor,
        resolve_model,
        temporary_extraction_dir,
    )
    from nnunetv2_l1dfl.predict.runner import (
        OUTPUT_TYPES,
        OutputFolderError,
        PredictOptions,
        prepare_output_dir,
        run_batch,
    )

    out_dir = Path(args.output)
    extracted = None
    try:
        if args.model is not None and any(v is not None for v in (args.dataset, args.trainer)):
            raise ModelError("give the model either as -m MODEL_DIR_OR_ZIP or as -d/-c/-tr, not both")
        discovery = discover_studies(args.input, series_uids=args.series_uid or (), progress=not args.no_progress)
        types = tuple(dict.fromkeys(args.output_types or OUTPUT_TYPES))
        if discovery.kind == "nifti" and args.output_types and {"seg", "rtstruct"} & set(types):
            raise StudyError(
                f"--output-types {' '.join(t for t in types if t != 'nifti')}: DICOM outputs need DICOM input (a source "
                f"PET series to reference); {args.input} holds NIfTI cases"
            )
        prepare_output_dir(out_dir)
        if args.model is not None and Path(args.model).is_file():
            extracted = temporary_extraction_dir(out_dir)
        spec = resolve_model(
            dataset=args.dataset, configuration=args.configuration, trainer=args.trainer, plans=args.plans,
            model=args.model, folds=args.folds, checkpoint=args.checkpoint, extract_into=extracted,
        )  # fmt: skip
        if args.num_processes < 1:
            raise StudyError(f"-np must be >= 1, got {args.num_processes}")
        options = PredictOptions(output_types=types, save_probabilities=args.save_probabilities,
                                 overwrite=args.overwrite, num_workers=args.num_processes,
                                 extra_half_lives=dict(args.nuclide or ()),
                                 rtstruct_reference=args.rtstruct_reference)
        if discovery.skipped_files:
            print(f"{discovery.skipped_files} file(s) under {args.input} skipped while reading DICOM headers (-v lists them)")
        summary = run_batch(
            discovery.studies, lambda: build_predictor(spec, args.device, use_mirroring=not args.disable_tta), spec,
            out_dir, options, failed_before=discovery.failed, progress=not args.no_progress,
        )  # fmt: skip
    except (ModelError, StudyError, OutputFolderError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if extracted is not None:
            shutil.rmtree(extracted, ignore_errors=True)
    for case, reason in sorted(summary.failed.items()):
        print(f"FAILED {case}: {reason}", file=sys.stderr)
    print(summary.line(out_dir))
    return 1 if summary.failed else 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from nnunetv2_l1dfl.conversion.cli import add_nuclide_argument

    parser = subparsers.add_parser(
        "predict",
        help="apply a trained model to PET/CT studies (DICOM or NIfTI): DICOM SEG, RTSTRUCT, lesion report, MIP",
        description=(
            "Apply a trained nnU-Net model to new PET/CT studies. INPUT is a DICOM folder of any nesting (one or "
            "many studies, paired and converted to SUV exactly as 'l1dfl convert dicom' does) or a folder of NIfTI "
            "cases in nnU-Net's imagesTs layout (<case>_0000 CT in HU, <case>_0001 PET in SUV on the same grid). "
            "Per study, OUT/<case>/ gets seg.dcm (DICOM SEG), rtstruct.dcm (one ROI per lesion), prediction.nii.gz, "
            "lesions.nii.gz, lesions.csv / lesions.json (volume, SUVmax, SUVmean, SUVpeak, TLG, positions; TMTV, "
            "total TLG, Dmax) and mip.png. DICOM studies are named study-<hash of the PET SeriesInstanceUID>; "
            "patient identifiers appear only inside the DICOM outputs. Finished studies are skipped on a re-run."
        ),
    )  # fmt: skip
    parser.add_argument("input", type=Path, metavar="INPUT", help="DICOM folder, or NIfTI folder (imagesTs layout)")
    parser.add_argument("-o", "--output", type=Path, required=True, metavar="OUT", help="output folder")
    model = parser.add_argument_group("model (either -d/-c/-tr in $nnUNet_results, or -m)")
    model.add_argument("-d", "--dataset", default=None, metavar="DATASET", help="dataset ID or name")
    model.add_argument("-c", "--configuration", default=None, metavar="CONFIG", help="e.g. 3d_fullres")
    model.add_argument("-tr", "--trainer", default=None, metavar="TRAINER", help="e.g. nnUNetTrainerL1DFL")
    model.add_argument("-p", "--plans", default=None, metavar="PLANS", help="plans identifier (default: nnUNetPlans)")
    model.add_argument("-f", "--folds", nargs="+", default=None, metavar="FOLD",
                       help="folds to ensemble, e.g. 0 1 2 3 4 or all (default: every fold with a checkpoint, as nnU-Net)")
    model.add_argument("-m", "--model", type=Path, default=None, metavar="MODEL_DIR_OR_ZIP",
                       help="a trained model folder, a folder holding one, or a zip from nnUNetv2_export_model_to_zip "
                       "(-c/-tr/-p choose when it holds several)")
    model.add_argument("-chk", "--checkpoint", default="checkpoint_final.pth", help="checkpoint file name (default: %(default)s)")
    parser.add_argument("--device", choices=("cuda", "cpu", "mps"), default="cuda", help="default: cuda")
    parser.add_argument("--disable-tta", action="store_true", help="no mirroring test-time augmentation (faster)")
    parser.add_argument("--save-probabilities", action="store_true", help="also write probabilities.npz (nnU-Net's format)")
    parser.add_argument("-np", "--num-processes", type=int, default=1, metavar="N",
                        help="studies read (DICOM, SUV, CT onto the PET grid) in N threads ahead of the prediction, which "
                        "runs one study at a time (default: 1, strictly in turn)")
    parser.add_argument("--output-types", nargs="+", choices=("seg", "rtstruct", "nifti"), default=None,
                        help="which image outputs to write (default: all the input allows; lesions.csv/json and mip.png "
                        "are always written)")
    parser.add_argument("--overwrite", action="store_true", help="predict finished studies again (replaced when complete)")
    parser.add_argument("--rtstruct-reference", choices=("pet", "ct"), default="pet",
                        help="the series rtstruct.dcm references and whose slices carry its contours: the PET (default; "
                        "contours on the prediction's own grid) or the CT (the lesions taken onto the CT grid by nearest "
                        "neighbour; a lesion with no CT voxel leaves no RTSTRUCT, said in lesions.json)")
    parser.add_argument("--series-uid", action="append", default=None, metavar="UID",
                        help="only the PET series with this SeriesInstanceUID (repeatable)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_nuclide_argument(parser)
    parser.set_defaults(func=_predict_entry)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="l1dfl")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["predict", *(argv if argv is not None else sys.argv[1:])])
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
