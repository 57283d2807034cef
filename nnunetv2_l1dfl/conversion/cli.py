"""``l1dfl convert {dicom,autopet,nifti,hecktor}``, ``l1dfl suv`` and ``l1dfl splits``.

Each converter lives in ``dataset_conversion/`` with a ``convert_...()`` function, an
``add_arguments(parser)`` for its own options and a ``run(args) -> exit code``; this module adds
the options every converter shares and turns a :class:`ConversionSummary` into the printed report
and the exit code. Heavy libraries are imported inside functions so ``l1dfl --help`` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import sys
from importlib import import_module
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nnunetv2_l1dfl.conversion.dataset_folder import DatasetSpec
    from nnunetv2_l1dfl.conversion.runner import ConversionSummary

logger = logging.getLogger(__name__)

# Kept in step with nnunetv2_l1dfl.conversion.dataset_folder (not imported here to keep --help fast;
# tests/test_conversion_dataset.py checks they agree).
PET_NORM_CHOICES = ("CT", "noNorm", "zscore", "rescale_to_0_1")
DEFAULT_PET_NORM = "CT"

PET_NORM_HELP = (
    "nnU-Net normalization of the PET channel, chosen through its channel name (default: CT). "
    "'CT': one global clip (0.5/99.5th percentile of SUV inside the labels) and one global "
    "mean/std for the whole dataset, so absolute SUV stays comparable between patients (as the "
    "autoPET III winner did); the default because SUV is quantitative and this keeps it while "
    "giving the network nnU-Net's usual input scale. 'noNorm': raw SUVbw, as in the L1DFL paper. "
    "'zscore': per-image mean/std, which throws absolute SUV away. 'rescale_to_0_1': per-image "
    "min-max to [0, 1], whose scale is each case's hottest voxel. CT is always channel 0000 (HU), "
    "PET channel 0001 (SUVbw); dataset.json records both under 'channel_modalities'."
)

def nuclide_type(text: str) -> tuple[str, float]:
    """argparse type of ``--nuclide NAME=SECONDS``."""
    from nnunetv2_l1dfl.conversion.suv import parse_nuclide_option

    try:
        return parse_nuclide_option(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_nuclide_argument(parser: argparse.ArgumentParser) -> None:
    """``--nuclide NAME=SECONDS`` (repeatable): a radionuclide the half-life check does not know."""
    parser.add_argument(
        "--nuclide", action="append", type=nuclide_type, metavar="NAME=SECONDS", default=None,
        help="declare a PET radionuclide and its half-life in seconds for the RadionuclideHalfLife (0018,1075) "
        "check, which knows the usual PET nuclides (F-18, Ga-68, C-11, Cu-64, Zr-89, ...: "
        "nnunetv2_l1dfl.conversion.suv.PET_HALF_LIVES_S) and refuses a half-life that matches none; "
        "repeatable; e.g. --nuclide Sc-44=14292",
    )  # fmt: skip


CONVERTERS = {
    # subcommand: (module, one-line help)
    "dicom": (
        "dataset_conversion.dicom_petct",
        "institutional DICOM: PET + CT series with RTSTRUCT, SEG or NIfTI lesion masks",
    ),
    "autopet": (
        "dataset_conversion.autopet_iii",
        "autoPET I/II (FDG, TCIA NIfTI) or autoPET III/IV (FDG + PSMA) release",
    ),
    "nifti": ("dataset_conversion.nifti_folders", "NIfTI folders: one folder per case with CT, PET and mask"),
    "hecktor": ("dataset_conversion.hecktor", "HECKTOR head-and-neck PET/CT (GTVp = 1, GTVn = 2)"),
}


ALLOW_IMPLAUSIBLE_SUV_HELP = (
    "convert a PET whose SUV is physiologically impossible anyway (weight, dose, uptake time or SUVmax "
    "outside the bounds in docs/suv.md, e.g. a dose entered in kBq), recording each reason as a case "
    "warning (case_metadata.csv warnings column); without it such a case fails naming the tag"
)


def add_implausible_suv_argument(parser: argparse.ArgumentParser) -> None:
    """``--allow-implausible-suv``: accept an implausible SUV and record why (docs/suv.md)."""
    parser.add_argument("--allow-implausible-suv", action="store_true", help=ALLOW_IMPLAUSIBLE_SUV_HELP)


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments every converter shares (input, dataset ID and name, output, run control)."""
    parser.add_argument("input_dir", type=Path, help="the source folder")
    parser.add_argument("-d", "--dataset-id", type=int, required=True, help="nnU-Net dataset ID (1-999)")
    parser.add_argument(
        "-n",
        "--name",
        required=True,
        help="dataset name: the output is RAW_DIR/DatasetXXX_NAME (letters, digits, _ and -)",
    )
    parser.add_argument(
        "-o",
        "--raw-dir",
        type=Path,
        default=None,
        help="nnU-Net raw folder to write into (default: $nnUNet_raw)",
    )
    parser.add_argument("-np", "--num-processes", type=int, default=1, help="worker processes (default: 1)")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="convert again cases that are already finished (default: skip them)",
    )
    parser.add_argument(
        "--allow-failures",
        action="store_true",
        help="exit 0 even when some cases failed (they are still listed)",
    )
    parser.add_argument("--pet-norm", choices=PET_NORM_CHOICES, default=DEFAULT_PET_NORM, help=PET_NORM_HELP)
    parser.add_argument(
        "--write-splits",
        action="store_true",
        help="write a patient-grouped 5-fold splits_final.json into $nnUNet_preprocessed/DatasetXXX_NAME/ "
        "(repeat studies of one patient in one fold); without it the command to do so is printed",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_implausible_suv_argument(parser)
    add_mask_arguments(parser)


def add_mask_arguments(parser: argparse.ArgumentParser, ct_coverage: bool = True) -> None:
    """Lesion accounting and CT coverage options (nnunetv2_l1dfl.conversion.masks.MaskOptions; docs/masks.md)."""
    parser.add_argument(
        "--allow-lesion-loss", action="store_true",
        help="convert a case whose selected ROI / segment / label ends empty or loses a lesion (unusable or "
        "out-of-image contours, SEG frames outside the PET, ...) and record the loss in case_metadata.csv's "
        "warnings; default: the case fails naming the file and the ROI / segment",
    )  # fmt: skip
    parser.add_argument(
        "--mask-threshold", type=float, default=None, metavar="T",
        help="binarize masks with non-integer values (probability / partial-volume NIfTI masks) at value >= T; "
        "default: such a mask fails its case (a cast would truncate 0.5 to background)",
    )  # fmt: skip
    if not ct_coverage:
        return
    parser.add_argument(
        "--allow-partial-ct", action="store_true",
        help="convert a case whose CT covers less than 80%% of the PET activity (filled with -1024 HU outside) "
        "with a recorded warning; default: the case fails naming the CT and its coverage",
    )  # fmt: skip


def add_pseudonymize_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--pseudonymize",
        action="store_true",
        help="name cases with random pseudonyms (P<10 hex>_s<n>) instead of patient IDs and dates; the key "
        "linking them to patients is written OUTSIDE the dataset (see --pseudonym-key) and its path printed",
    )
    parser.add_argument(
        "--pseudonym-key",
        type=Path,
        default=None,
        help="pseudonym key CSV (default: RAW_DIR/pseudonym_key_DatasetXXX_NAME.csv); reused on re-runs so IDs stay stable",
    )


def pseudonym_key_path(args: argparse.Namespace, spec: DatasetSpec) -> Path:
    """Where the pseudonym key goes; refuses a path inside the dataset folder."""
    from nnunetv2_l1dfl.conversion.errors import ConversionError

    path = (
        (args.pseudonym_key or spec.raw_dir / f"pseudonym_key_{spec.folder_name}.csv").expanduser().resolve()
    )
    if spec.dataset_dir.resolve() in path.parents:
        raise ConversionError(
            f"--pseudonym-key {path} lies inside the dataset folder: keep the key outside it"
        )
    return path


def spec_from_args(args: argparse.Namespace, **kwargs) -> DatasetSpec:
    from nnunetv2_l1dfl.conversion.dataset_folder import DatasetSpec, resolve_raw_dir

    return DatasetSpec(
        raw_dir=resolve_raw_dir(args.raw_dir),
        dataset_id=args.dataset_id,
        name=args.name,
        pet_norm=args.pet_norm,
        **kwargs,
    )


def report(summary: ConversionSummary, spec: DatasetSpec, args: argparse.Namespace) -> int:
    """Print failures, write or suggest the splits, print the one-line summary; the exit code."""
    from nnunetv2_l1dfl.conversion.errors import ConversionError
    from nnunetv2_l1dfl.conversion.splits import splits_for_dataset, write_splits

    exit_code = 0
    for case_id, reason in sorted(summary.failed.items()):
        print(f"FAILED {case_id}: {reason}", file=sys.stderr)
    fault = getattr(summary, "fault", None)
    if fault:
        print(
            f"error: the run stopped at a write fault: {fault}; dataset.json lists only complete cases, run again "
            "once there is space / write access",
            file=sys.stderr,
        )
    if summary.num_training and not fault:
        if getattr(args, "write_splits", False):
            try:
                summary.splits_file = write_splits(spec.folder_name, splits_for_dataset(spec.dataset_dir))
                print(f"splits_final.json (5 folds, patients kept in one fold): {summary.splits_file}")
            except ConversionError as e:
                print(f"error: splits not written: {e}", file=sys.stderr)
                exit_code = 1
            except OSError as e:
                print(f"error: splits not written: {e.strerror or e}: {e.filename}", file=sys.stderr)
                exit_code = 1
        else:
            print(
                f"patient-grouped 5-fold splits: l1dfl splits -d {spec.dataset_id} -o {spec.raw_dir} "
                f"(writes $nnUNet_preprocessed/{spec.folder_name}/splits_final.json)"
            )
    print(f"metadata table: {summary.metadata_table}")
    print(summary.line())
    if summary.failed and not getattr(args, "allow_failures", False):
        exit_code = 1
    return 2 if fault else exit_code


def _run_converter(args: argparse.Namespace) -> int:
    """Run a converter holding the dataset lock (taken before the converter reads or writes anything,
    pseudonym key included); with ``--pseudonymize`` everything printed or logged is redacted
    (:mod:`nnunetv2_l1dfl.conversion.redact`). Every error is one line; exit 2."""
    import contextlib

    from nnunetv2_l1dfl.conversion.dataset_folder import lock_dataset
    from nnunetv2_l1dfl.conversion.errors import ConversionError
    from nnunetv2_l1dfl.conversion.redact import Redactor

    redactor = Redactor([args.input_dir]) if getattr(args, "pseudonymize", False) else None
    source = getattr(args, "source", None) or args.converter_module.rsplit(".", 1)[-1]
    command = f"l1dfl convert {source} -d {args.dataset_id} -n {args.name}"
    with redactor.active() if redactor else contextlib.nullcontext():
        try:
            with lock_dataset(spec_from_args(args), command=command):
                return import_module(args.converter_module).run(args)
        except ConversionError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except OSError as e:  # the output folder: read-only, full, a file where a folder should be
            print(f"error: {e.strerror or e}: {e.filename}" if e.filename else f"error: {e}", file=sys.stderr)
            return 2


def _skipped_files_of_series(skipped: list, series_uid: str, files: tuple) -> tuple[list[tuple[Path, str]], list[str]]:
    """Files ``discover_series`` skipped, split into those that make the PET series wrong (a file of
    the series without an intact copy, or a DICOM file too broken to say which series it is of: the
    volume would silently lack them; a second copy of an instance whose content differs from the
    copy kept: which one is right is unknown) and notes for the rest (other files, exact copies)."""
    import pydicom

    def header(path: Path, **kwargs):
        try:
            return pydicom.dcmread(path, force=True, **kwargs)
        except Exception:  # noqa: BLE001 - pydicom raises many types on a damaged file
            return None

    sops = {str(ds.get("SOPInstanceUID", "")) for p in files if (ds := header(p, specific_tags=["SOPInstanceUID"]))}
    unusable, notes = [], []
    for path, reason in skipped:
        if reason.startswith("duplicate SOPInstanceUID"):
            kept = Path(reason.rsplit(" of ", 1)[-1])
            if kept.is_file() and kept.read_bytes() != Path(path).read_bytes() and header(path) != header(kept):
                unusable.append((Path(path), f"{reason}, but the two copies differ (which one is right is not known)"))
            else:
                notes.append(f"skipped {path}: {reason}")
            continue
        ds = header(path, stop_before_pixels=True)
        if ds is not None:
            uid, sop = str(ds.get("SeriesInstanceUID", "")).strip(), str(ds.get("SOPInstanceUID", "")).strip()
        else:
            try:
                with open(path, "rb") as f:
                    uid, sop = (series_uid if f.read(132)[128:132] == b"DICM" else ""), ""
            except OSError:
                uid, sop = "", ""
        if uid == series_uid and not (sop and sop in sops):
            unusable.append((Path(path), reason))
        else:
            notes.append(f"skipped {path}: {reason}" + (" (an intact copy is used)" if uid == series_uid else ""))
    return unusable, notes


def suv_entry(args: argparse.Namespace) -> int:
    """``l1dfl suv``: one PET series to a SUVbw NIfTI, with the branch taken and statistics.

    Everything that can fail (the mask, the series, the SUV) is checked before the output is
    written; the image goes to a hidden temporary name beside ``out``, is read back whole and only
    then renamed, so a failed run leaves no output that looks complete. An existing output is kept
    unless ``--overwrite``; a file of the series that discovery skipped (damaged, or a second copy
    that differs) fails the run, other skipped files are ``warning:`` lines. One-line errors, exit 1
    (SUV refused, series unusable, write failed) or 2 (bad arguments, series not found, output exists).
    """
    import os

    import numpy as np
    import SimpleITK as sitk

    from nnunetv2_l1dfl.conversion.dicom_series import discover_series
    from nnunetv2_l1dfl.conversion.errors import ConversionError
    from nnunetv2_l1dfl.conversion.geometry import geometry_mismatch
    from nnunetv2_l1dfl.conversion.image_io import read_image
    from nnunetv2_l1dfl.conversion.suv import SUVError, read_pet_suv

    out = Path(args.out)
    if out.is_dir():
        print(f"error: output {out} is a folder; give a file name such as {out / 'suv.nii.gz'}", file=sys.stderr)
        return 2
    if not out.suffix:
        print(f"error: output {out} has no file ending; give e.g. suv.nii.gz (.nii.gz, .nii, .mha, .nrrd)", file=sys.stderr)
        return 2
    if out.exists() and not args.overwrite:
        print(f"error: output {out} exists; pass --overwrite to replace it", file=sys.stderr)
        return 2
    if Path(args.pet_series_dir).is_file():
        print(
            f"error: {args.pet_series_dir} is a file; give the folder holding the PET series' slices", file=sys.stderr
        )
        return 2
    if not Path(args.pet_series_dir).is_dir():
        print(f"error: PET series folder not found: {args.pet_series_dir}", file=sys.stderr)
        return 2
    mask = None
    if args.mask is not None:
        if not Path(args.mask).is_file():
            print(f"error: --mask {args.mask} not found", file=sys.stderr)
            return 2
        try:  # whole and finite: SimpleITK zero-fills a truncated file
            mask = read_image(args.mask, "--mask")
        except ConversionError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    series, skipped = discover_series(args.pet_series_dir)
    pets = [s for s in series if s.modality == "PT"]
    if args.series_uid:
        pets = [s for s in pets if s.series_instance_uid == args.series_uid]
    if len(pets) != 1:
        found = ", ".join(
            f"{s.series_instance_uid} ({s.series_description!r}, {len(s.files)} files)" for s in pets
        )
        what = f"with SeriesInstanceUID {args.series_uid}" if args.series_uid else "(Modality PT)"
        print(
            f"error: {args.pet_series_dir} holds {len(pets)} PET series {what}"
            + (f": {found}; pick one with --series-uid" if pets else "")
            + (
                f"; {len(skipped)} files skipped, e.g. {skipped[0][0]}: {skipped[0][1]}"
                if skipped and not pets
                else ""
            ),
            file=sys.stderr,
        )
        return 2
    unusable, notes = _skipped_files_of_series(skipped, pets[0].series_instance_uid, pets[0].files)
    if unusable:
        path, reason = unusable[0]
        print(
            f"error: {path}: {reason}: a file of the PET series cannot be used"
            + (f" ({len(unusable) - 1} more)" if len(unusable) > 1 else "")
            + "; the SUV volume would be wrong",
            file=sys.stderr,
        )
        return 1
    try:
        result = read_pet_suv(
            pets[0], case_id=str(args.pet_series_dir), extra_half_lives=dict(args.nuclide or ()),
            allow_implausible_suv=args.allow_implausible_suv,
        )  # fmt: skip
    except SUVError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    values = sitk.GetArrayViewFromImage(result.image)
    where = "image"
    if mask is not None:
        problem = geometry_mismatch(mask, result.image, atol=1e-3)
        if problem:
            print(f"error: --mask {args.mask} is not on the PET grid ({problem})", file=sys.stderr)
            return 2
        values = values[sitk.GetArrayViewFromImage(mask) > 0]
        where = f"mask ({values.size} voxels)"

    image = sitk.Cast(result.image, sitk.sitkFloat32)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.partial{''.join(out.suffixes[-2:])}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(image, str(tmp), useCompression=out.name.endswith(".gz"))
        # SimpleITK does not raise on a short write (disk full): read everything back before the rename.
        if not np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp))), sitk.GetArrayViewFromImage(image)):
            raise OSError("the file read back differs from the image written (disk full?)")
        os.replace(tmp, out)
    except (OSError, RuntimeError) as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # e.g. the parent is not a folder: there is nothing to remove
            pass
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        print(f"error: cannot write {out}: {reason}", file=sys.stderr)
        return 1

    print(f"SUV branch: {result.branch}")
    for note in notes:
        print(f"warning: {note}")
    for warning in result.warnings:
        print(f"warning: {warning}")
    for key, value in result.details.items():
        print(f"  {key}: {value}")
    if values.size:
        print(
            f"SUVbw in {where}: min {values.min():.4g}, median {np.median(values):.4g}, "
            f"mean {values.mean():.4g}, max {values.max():.4g}"
        )
    size, spacing = result.image.GetSize(), result.image.GetSpacing()
    print(f"wrote {out}: size {size}, spacing {tuple(round(s, 4) for s in spacing)} mm")
    return 0


def splits_entry(args: argparse.Namespace) -> int:
    """``l1dfl splits``: patient-grouped folds of a converted dataset into nnUNet_preprocessed."""
    from nnunetv2_l1dfl.conversion.dataset_folder import resolve_raw_dir
    from nnunetv2_l1dfl.conversion.errors import ConversionError
    from nnunetv2_l1dfl.conversion.splits import splits_for_dataset, write_splits

    try:
        if args.folds < 2:
            raise ConversionError(f"--folds must be at least 2 (cross-validation), got {args.folds}")
        raw_dir = resolve_raw_dir(args.raw_dir)
        matches = sorted(p for p in raw_dir.glob(f"Dataset{args.dataset_id:03d}_*") if p.is_dir())
        if len(matches) != 1:
            raise ConversionError(
                f"expected one folder Dataset{args.dataset_id:03d}_* in {raw_dir}, found {len(matches)}"
            )
        splits = splits_for_dataset(matches[0], n_folds=args.folds)
        path = write_splits(matches[0].name, splits, args.preprocessed_dir)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # --preprocessed-dir a file, read-only, full
        print(f"error: splits_final.json not written: {e.strerror or e}: {e.filename}", file=sys.stderr)
        return 2
    sizes = ", ".join(str(len(f["val"])) for f in splits)
    print(f"wrote {path}: {args.folds} folds, validation cases per fold {sizes}")
    return 0


def detect_autopet_release(input_dir: Path) -> str:
    """``"iii"`` for the nnU-Net-like autoPET III/IV release (imagesTr + labelsTr), ``"fdg"`` for the
    autoPET I/II TCIA layout (PETCT_*/<study>/SUV.nii.gz); a ConversionError otherwise."""
    from nnunetv2_l1dfl.conversion.errors import ConversionError

    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise ConversionError(f"input folder not found: {input_dir}")
    if (input_dir / "imagesTr").is_dir() and (input_dir / "labelsTr").is_dir():
        return "iii"
    if next(input_dir.rglob("SUV.nii.gz"), None) is not None:
        return "fdg"
    raise ConversionError(
        f"{input_dir} looks like neither autoPET release: expected imagesTr/ and labelsTr/ (autoPET III/IV) "
        "or PETCT_*/<study>/SUV.nii.gz (autoPET I/II); pass the folder that holds them"
    )


AUTOPET_MODULES = {"fdg": "dataset_conversion.autopet_fdg", "iii": "dataset_conversion.autopet_iii"}


def _run_autopet(args: argparse.Namespace) -> int:
    from nnunetv2_l1dfl.conversion.errors import ConversionError

    try:
        release = detect_autopet_release(args.input_dir) if args.release == "auto" else args.release
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if release == "fdg" and args.tracer != "both" and args.tracer != "fdg":
        print(
            "error: the autoPET I/II release holds FDG studies only; --tracer psma needs autoPET III/IV",
            file=sys.stderr,
        )
        return 2
    args.converter_module = AUTOPET_MODULES[release]
    return _run_converter(args)


def _print_help_of(parser: argparse.ArgumentParser):
    def show(args: argparse.Namespace) -> int:
        parser.print_help()
        return 2

    return show


def register(subparsers: argparse._SubParsersAction) -> None:
    convert = subparsers.add_parser(
        "convert",
        help="convert PET/CT data into a two-channel nnU-Net v2 raw dataset (CT 0000 in HU, PET 0001 in SUVbw)",
        description=(
            "Convert PET/CT studies into DatasetXXX_NAME/{imagesTr,labelsTr,dataset.json} with CT and labels "
            "on the PET grid, a per-case metadata table (case_metadata.csv) and, on request, patient-grouped "
            "splits. Runs are resumable: finished cases are skipped. A failing case is listed with its reason "
            "and the others go on; the exit code is 1 when any case failed (0 with --allow-failures)."
        ),
    )
    sources = convert.add_subparsers(dest="source", metavar="SOURCE")
    for source, (module_name, help_text) in CONVERTERS.items():
        try:
            module = import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name != module_name:
                raise
            continue
        parser = sources.add_parser(
            source, help=help_text, description=(module.__doc__ or help_text).strip().split("\n\n")[0]
        )
        add_common_arguments(parser)
        module.add_arguments(parser)
        parser.set_defaults(func=_run_converter, converter_module=module_name)
        if source == "autopet":
            parser.description = (
                "Convert an autoPET download. autoPET I/II (FDG, TCIA NIfTI): PETCT_<id>/<study>/{CTres,SUV,SEG}.nii.gz, "
                "CTres already on the PET grid. autoPET III/IV (FDG + PSMA): imagesTr/{fdg,psma}_<patient>_<study>_000X "
                "and labelsTr, with fdg_metadata.csv / psma_metadata.csv. The release is detected unless --release "
                "is given. Case IDs are <tracer>_<patient>_<YYYYMMDD> in both, so one study keeps its ID across releases."
            )
            parser.add_argument(
                "--release", choices=("auto", "fdg", "iii"), default="auto",
                help="auto (detect), fdg (autoPET I/II) or iii (autoPET III/IV); default auto",
            )  # fmt: skip
            parser.set_defaults(func=_run_autopet)
    convert.set_defaults(func=_print_help_of(convert))

    suv = subparsers.add_parser(
        "suv",
        help="convert one DICOM PET series to SUVbw (NIfTI) and print the decision branch taken",
        description=(
            "Read a PET series (QIBA/IBSI decision tree: per-slice rescale, Units, DecayCorrection, reference "
            "and injection times, unit sanity checks), write SUVbw as NIfTI, print the branch taken and SUV "
            "statistics. A missing or contradictory tag is an error naming it."
        ),
    )
    suv.add_argument("pet_series_dir", type=Path, help="folder holding the PET series (any nesting)")
    suv.add_argument("out", type=Path, help="output image, e.g. suv.nii.gz")
    suv.add_argument(
        "--series-uid",
        default=None,
        help="SeriesInstanceUID to pick when the folder holds several PET series",
    )
    suv.add_argument(
        "--mask", type=Path, default=None, help="print the statistics inside this mask (on the PET grid)"
    )
    suv.add_argument("--overwrite", action="store_true", help="replace the output if it exists (default: refuse)")
    add_nuclide_argument(suv)
    add_implausible_suv_argument(suv)
    suv.set_defaults(func=suv_entry)

    splits = subparsers.add_parser(
        "splits",
        help="write patient-grouped folds (splits_final.json) for a dataset made by 'l1dfl convert'",
        description=(
            "Read DatasetXXX_*/case_metadata.csv and write nnU-Net's splits_final.json with every study of a "
            "patient in the same fold, into $nnUNet_preprocessed/DatasetXXX_NAME/."
        ),
    )
    splits.add_argument("-d", "--dataset-id", type=int, required=True, help="nnU-Net dataset ID")
    splits.add_argument(
        "-o", "--raw-dir", type=Path, default=None, help="nnU-Net raw folder (default: $nnUNet_raw)"
    )
    splits.add_argument("--folds", type=int, default=5, help="number of folds (default: 5)")
    splits.add_argument(
        "--preprocessed-dir",
        type=Path,
        default=None,
        help="nnU-Net preprocessed folder (default: $nnUNet_preprocessed)",
    )
    splits.set_defaults(func=splits_entry)


def converter_main(module_name: str, argv: list[str] | None = None) -> int:
    """``python -m dataset_conversion.<module>``: the same options as ``l1dfl convert <source>``."""
    module = import_module(module_name)
    parser = argparse.ArgumentParser(
        prog=f"python -m {module_name}", description=(module.__doc__ or "").strip()
    )
    add_common_arguments(parser)
    module.add_arguments(parser)
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    args = parser.parse_args(argv)
    args.converter_module = module_name
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    return _run_converter(args)
