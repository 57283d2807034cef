"""``l1dfl mask``: what a conversion makes of a lesion mask, on a reference of the user's choice.

Reads an RTSTRUCT, a DICOM SEG or a NIfTI (MHA, NRRD) mask onto a reference image (a PET or CT
DICOM series folder, or a NIfTI image) with the converters' own functions
(:func:`~nnunetv2_l1dfl.conversion.masks.read_rtstruct`, :func:`~nnunetv2_l1dfl.conversion.masks.read_seg`,
:func:`~nnunetv2_l1dfl.conversion.masks.labels_from_image` + :func:`~nnunetv2_l1dfl.conversion.masks.place_mask_on`,
:func:`~nnunetv2_l1dfl.conversion.masks.check_structures`), prints per ROI / segment / label value the
voxels, ml and lesions at each stage and anything lost, and writes the label map. The output is
written to a temporary file next to ``-o``, read back whole and renamed, so a failed run leaves
nothing behind. Exit codes: 0 written, 1 a lesion loss (nothing written unless
``--allow-lesion-loss``), 2 bad input (a one-line error).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import SimpleITK as sitk

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mha", ".nrrd")


def _is_image_file(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(IMAGE_SUFFIXES)


def read_reference(path: Path, series_uid: str | None = None) -> tuple[sitk.Image, str]:
    """The reference grid and a description: a NIfTI-like image, or the one PET / CT series in a folder."""
    from nnunetv2_l1dfl.conversion.dicom_series import discover_series, load_slice_stack, read_ct_hu
    from nnunetv2_l1dfl.conversion.errors import ConversionError
    from nnunetv2_l1dfl.conversion.image_io import read_image

    path = Path(path)
    if _is_image_file(path):
        return read_image(path, "reference"), f"image {path}"
    if not path.is_dir():
        raise ConversionError(f"--reference {path}: neither a DICOM series folder nor an image file ({', '.join(IMAGE_SUFFIXES)})")
    series, skipped = discover_series(path)
    candidates = [s for s in series if s.modality in ("PT", "CT")]
    if series_uid:
        candidates = [s for s in candidates if s.series_instance_uid == series_uid]
    if len(candidates) != 1:
        found = "; ".join(f"{s.modality} {s.series_instance_uid} ({len(s.files)} files)" for s in candidates) or "none"
        raise ConversionError(
            f"--reference {path} holds {len(candidates)} PET/CT series"
            + (f" with SeriesInstanceUID {series_uid}" if series_uid else "")
            + f": {found}"
            + ("; pick one with --series-uid" if len(candidates) > 1 else "")
            + (f" ({len(skipped)} files skipped, e.g. {skipped[0][0]}: {skipped[0][1]})" if skipped and not candidates else "")
        )
    chosen = candidates[0]
    if chosen.modality == "CT":
        image = read_ct_hu(chosen)
    else:
        image = load_slice_stack(chosen.files, what=f"PET series {chosen.series_instance_uid}", modality="PT").to_image()
    return image, f"{chosen.modality} series {chosen.series_instance_uid} ({len(chosen.files)} files)"


def rasterize_mask(mask: Path, reference: sitk.Image, options) -> tuple[object, str]:
    """(MaskResult on ``reference``, kind) for an RTSTRUCT, SEG or image mask file."""
    from nnunetv2_l1dfl.conversion.dicom_series import DicomSeriesError, read_dicom
    from nnunetv2_l1dfl.conversion.errors import ConversionError
    from nnunetv2_l1dfl.conversion.image_io import read_image
    from nnunetv2_l1dfl.conversion.masks import labels_from_image, place_mask_on, read_rtstruct, read_seg

    mask = Path(mask)
    if not mask.is_file():
        raise ConversionError(f"mask file not found: {mask}")
    if _is_image_file(mask):
        result = labels_from_image(read_image(mask, "mask"), mask, options)
        return place_mask_on(result, reference, "reference"), "label image"
    try:
        modality = str(read_dicom(mask, stop_before_pixels=True).get("Modality", "")).strip()
    except DicomSeriesError as e:
        raise ConversionError(str(e)) from e
    if modality == "RTSTRUCT":
        return read_rtstruct(mask, reference, options), "RTSTRUCT"
    if modality == "SEG":
        return read_seg(mask, reference, options), "SEG"
    raise ConversionError(f"{mask}: Modality (0008,0060) is {modality!r}: expected RTSTRUCT, SEG or an image file")


def write_label_atomically(label: sitk.Image, out: Path) -> None:
    """Write ``label`` to a temporary file beside ``out``, read it back whole, then rename it."""
    import numpy as np
    import SimpleITK as sitk

    from nnunetv2_l1dfl.conversion.errors import ConversionError

    out = Path(out)
    tmp = out.parent / f".tmp-{os.getpid()}-{out.name}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(sitk.Cast(label, sitk.sitkUInt8), str(tmp), useCompression=out.name.lower().endswith(".gz"))
        back = sitk.ReadImage(str(tmp))
        if not np.array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(label)):
            raise ConversionError(f"cannot write {out}: the file read back differs from the label map written (disk full?)")
        os.replace(tmp, out)
    except (OSError, RuntimeError) as e:
        raise ConversionError(f"cannot write {out}: {str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__}") from e
    finally:
        if tmp.exists():
            tmp.unlink()


def mask_entry(args: argparse.Namespace) -> int:
    """``l1dfl mask``: see the module docstring."""
    from nnunetv2_l1dfl.conversion.errors import ConversionError
    from nnunetv2_l1dfl.conversion.masks import MaskError, MaskOptions, check_structures, structure_table

    out = Path(args.out)
    if not out.name.lower().endswith(IMAGE_SUFFIXES) or out.is_dir():
        print(f"error: -o {out} must be an image file ending in {', '.join(IMAGE_SUFFIXES)}", file=sys.stderr)
        return 2
    try:
        roi_labels = None
        if args.roi_labels:
            from dataset_conversion.dicom_petct import parse_roi_labels

            roi_labels = parse_roi_labels(args.roi_labels)[1]
        options = MaskOptions.from_args(args, roi_labels=roi_labels)
        reference, described = read_reference(args.reference, args.series_uid)
        result, kind = rasterize_mask(args.mask, reference, options)
    except (ConversionError, FileNotFoundError, NotADirectoryError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{kind} {args.mask} onto {described}: size {reference.GetSize()}, "
          f"spacing {tuple(round(s, 4) for s in reference.GetSpacing())} mm")  # fmt: skip
    for line in structure_table(result.structures):
        print(line)
    try:
        warnings = check_structures(result.structures, options.allow_lesion_loss)
    except MaskError as e:
        print(f"error: {e}; nothing written", file=sys.stderr)
        return 1
    try:
        write_label_atomically(result.label, out)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import numpy as np
    import SimpleITK as sitk

    values = sitk.GetArrayViewFromImage(result.label)
    labels = {int(v): int((values == v).sum()) for v in np.unique(values) if v}
    print(f"wrote {out}: {sum(labels.values())} labelled voxels {labels or '(empty)'}"
          + (f"; {len(warnings)} warning(s)" if warnings else ""))  # fmt: skip
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from nnunetv2_l1dfl.conversion.cli import add_mask_arguments

    parser = subparsers.add_parser(
        "mask",
        help="rasterize an RTSTRUCT, DICOM SEG or NIfTI mask onto a reference exactly as 'l1dfl convert' does, "
        "and show what became of every ROI / segment",
        description=(
            "Read an RTSTRUCT, DICOM SEG or NIfTI mask onto a reference (a folder holding one PET or CT DICOM "
            "series, or a NIfTI image) with the same functions 'l1dfl convert' uses, print per ROI / segment / "
            "label value the voxels, ml and lesions as drawn and on the reference, and anything lost, and write "
            "the label map (atomically). Exit 0 written; 1 a lesion loss, nothing written unless "
            "--allow-lesion-loss; 2 bad input. See docs/masks.md."
        ),
    )
    parser.add_argument("mask", type=Path, help="RTSTRUCT or SEG file, or a NIfTI / MHA / NRRD label image")
    parser.add_argument(
        "--reference", type=Path, required=True,
        help="the grid: a folder holding one PET or CT DICOM series (see --series-uid), or a NIfTI image",
    )  # fmt: skip
    parser.add_argument("-o", "--out", type=Path, required=True, help="output label map, e.g. mask.nii.gz")
    parser.add_argument("--series-uid", default=None, help="SeriesInstanceUID when the folder holds several series")
    parser.add_argument(
        "--roi-pattern", default="lesion",
        help="regex searched case-insensitively in RTSTRUCT ROI names (default: 'lesion'), as 'convert dicom'",
    )  # fmt: skip
    parser.add_argument(
        "--roi-labels", action="append", metavar="NAME=REGEX", default=None,
        help="map ROIs / SEG segment labels to labels 1, 2, ... in the order given, as 'convert dicom'",
    )  # fmt: skip
    parser.add_argument(
        "--seg-pattern", default=None, help="regex for the SEG SegmentLabels to use (default: every non-background segment)"
    )
    add_mask_arguments(parser, ct_coverage=False)
    parser.set_defaults(func=mask_entry)
