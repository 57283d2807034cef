"""Institutional DICOM PET/CT studies (lesions as RTSTRUCT, DICOM SEG or NIfTI) into a two-channel nnU-Net dataset.

INPUT_DIR is a folder of any nesting. Series are discovered by SeriesInstanceUID; each
attenuation-corrected PET series (Modality PT) is one case, paired with the CT of the same study
and FrameOfReferenceUID (the one with the most slices when there are several). Its lesions come
from the RTSTRUCT or SEG of that study that references the PET or the CT (or, failing that, the
only one in the study and frame of reference). RTSTRUCT ROIs are chosen by name: by default every
ROI whose name contains "lesion" (case-insensitive), merged into label 1; ``--roi-pattern`` changes
the pattern, ``--roi-labels NAME=REGEX ...`` maps ROIs to labels 1, 2, ... in the order given. SEG
segments are all merged into label 1 unless ``--seg-pattern`` or ``--roi-labels`` says otherwise.

The PET becomes SUVbw through the QIBA/IBSI decision tree (:mod:`nnunetv2_l1dfl.conversion.suv`,
the branch taken goes into the metadata table); CT (HU) and label are resampled onto the PET grid.
Case IDs are ``<PatientID>_<StudyDate>`` made file-system safe (``-1``, ``-2`` for several PET
series of one patient on one day), or random pseudonyms with ``--pseudonymize`` (key written
outside the dataset). ``--manifest CSV`` with columns ``case, patient, pet, ct, mask`` takes over
the pairing: each of pet/ct/mask is a SeriesInstanceUID, a folder holding that one series, or a
file (a DICOM file of the series, an RTSTRUCT/SEG file, or a NIfTI mask), relative paths resolved
against the CSV's folder, then INPUT_DIR.

    python -m dataset_conversion.dicom_petct /data/dicom -d 501 -n InstitutionPSMA --pseudonymize
"""

from __future__ import annotations

import argparse
import csv
import logging
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nnunetv2_l1dfl.conversion.case_ids import CaseKey, PseudonymKey, assign_case_ids
from nnunetv2_l1dfl.conversion.dataset_folder import DEFAULT_LABELS, DatasetSpec, LoadedCase, resolve_raw_dir
from nnunetv2_l1dfl.conversion.errors import ConversionError
from nnunetv2_l1dfl.conversion.image_io import read_image
from nnunetv2_l1dfl.conversion.resample import place_on_pet_grid
from nnunetv2_l1dfl.conversion.runner import CaseJob, ConversionSummary, convert_cases

if TYPE_CHECKING:
    import SimpleITK as sitk

    from nnunetv2_l1dfl.conversion.dicom_series import DicomSeries

logger = logging.getLogger(__name__)

MASK_MODALITIES = ("RTSTRUCT", "SEG")
NIFTI_SUFFIXES = (".nii.gz", ".nii", ".mha", ".nrrd")


# ----------------------------------------------------------------------------------------------
# Options
# ----------------------------------------------------------------------------------------------


def parse_roi_labels(items: Sequence[str] | None) -> tuple[dict[str, int], dict[str, int] | None]:
    """``["tumor=GTVp|primary", "nodes=GTVn"]`` -> (dataset labels, {regex: label}) with labels 1, 2, ...

    Without items: the default (``{"background": 0, "lesion": 1}``, ``None``).
    """
    if not items:
        return dict(DEFAULT_LABELS), None
    labels = {"background": 0}
    patterns = {}
    for n, item in enumerate(items, start=1):
        name, sep, pattern = item.partition("=")
        name, pattern = name.strip(), pattern.strip()
        if not sep or not name or not pattern:
            raise ConversionError(f"--roi-labels entries are NAME=REGEX (e.g. tumor=GTVp), got {item!r}")
        if name in labels:
            raise ConversionError(f"--roi-labels: label name {name!r} given twice")
        labels[name] = n
        patterns[pattern] = n
    return labels, patterns


# ----------------------------------------------------------------------------------------------
# Pairing PET, CT and masks
# ----------------------------------------------------------------------------------------------


def _is_attenuation_corrected(series: DicomSeries) -> bool:
    """CorrectedImage (0028,0051) contains ATTN; series without the attribute count as corrected."""
    import pydicom

    try:
        ds = pydicom.dcmread(series.files[0], stop_before_pixels=True, specific_tags=["CorrectedImage"])
    except Exception:  # unreadable here means unreadable later: the case fails then, with the reason
        return True
    corrected = ds.get("CorrectedImage")
    if corrected is None:
        return True
    values = [corrected] if isinstance(corrected, str) else list(corrected)
    return "ATTN" in {str(v).strip().upper() for v in values}


def _describe(series: DicomSeries) -> str:
    return f"{series.modality} series {series.series_instance_uid} ({series.series_description or 'no description'}, {len(series.files)} files)"


def pair_studies(
    all_series: Sequence[DicomSeries], allow_missing_mask: bool = False
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """One entry per attenuation-corrected PET: ``{"pet", "ct", "mask"}`` (mask None only with
    ``allow_missing_mask``), plus failures keyed by PET SeriesInstanceUID with their reason."""
    pets = [s for s in all_series if s.modality == "PT"]
    cts = [s for s in all_series if s.modality == "CT"]
    masks = [s for s in all_series if s.modality in MASK_MODALITIES]
    corrected = {s.series_instance_uid: _is_attenuation_corrected(s) for s in pets}
    pairs, failed = [], {}
    for pet in pets:
        same_frame = [
            s for s in pets
            if s.study_instance_uid == pet.study_instance_uid and s.frame_of_reference_uid == pet.frame_of_reference_uid
        ]  # fmt: skip
        if not corrected[pet.series_instance_uid] and any(
            corrected[s.series_instance_uid] for s in same_frame
        ):
            logger.info("skipping %s: not attenuation-corrected (CorrectedImage lacks ATTN)", _describe(pet))
            continue
        candidates = [
            c for c in cts
            if c.study_instance_uid == pet.study_instance_uid and c.frame_of_reference_uid == pet.frame_of_reference_uid
        ]  # fmt: skip
        if not candidates:
            in_study = [c for c in cts if c.study_instance_uid == pet.study_instance_uid]
            failed[pet.series_instance_uid] = (
                f"no CT with StudyInstanceUID {pet.study_instance_uid} and FrameOfReferenceUID (0020,0052) "
                f"{pet.frame_of_reference_uid or '(missing)'} for PET {pet.series_instance_uid}"
                + (
                    "; CTs of this study are in other frames of reference: "
                    + ", ".join(f"{c.series_instance_uid} (FoR {c.frame_of_reference_uid})" for c in in_study)
                    if in_study
                    else ""
                )
            )
            continue
        ct = max(candidates, key=lambda c: (len(c.files), c.series_instance_uid))
        if len(candidates) > 1:
            logger.info(
                "PET %s: %d CT candidates, using the largest, %s",
                pet.series_instance_uid,
                len(candidates),
                _describe(ct),
            )
        in_study = [m for m in masks if m.study_instance_uid == pet.study_instance_uid]
        direct = [
            m
            for m in in_study
            if {pet.series_instance_uid, ct.series_instance_uid} & set(m.referenced_series_uids)
        ]
        # A mask that references another PET/CT of the study belongs to that one, not to this PET.
        others = {s.series_instance_uid for s in pets + cts} - {
            pet.series_instance_uid,
            ct.series_instance_uid,
        }
        loose = [
            m for m in in_study
            if m.frame_of_reference_uid in ("", pet.frame_of_reference_uid) and not set(m.referenced_series_uids) & others
        ]  # fmt: skip
        chosen = direct or loose
        if len(chosen) > 1:
            failed[pet.series_instance_uid] = (
                f"{len(chosen)} mask series for PET {pet.series_instance_uid}: "
                + "; ".join(_describe(m) for m in chosen)
                + "; pick one with --manifest"
            )
            continue
        if not chosen and not allow_missing_mask:
            failed[pet.series_instance_uid] = (
                f"no RTSTRUCT or SEG referencing PET {pet.series_instance_uid} or CT {ct.series_instance_uid} "
                f"in study {pet.study_instance_uid} (use --manifest for NIfTI masks, or --allow-missing-mask "
                "for lesion-free studies)"
            )
            continue
        pairs.append({"pet": pet, "ct": ct, "mask": chosen[0] if chosen else None})
    return pairs, failed


def _resolve(
    value: str,
    bases: Sequence[Path],
    all_series: Sequence[DicomSeries],
    modalities: Sequence[str],
    what: str,
    case: str,
) -> Any:
    """A manifest cell -> a DicomSeries (by UID, folder or member file) or a NIfTI mask Path."""
    value = value.strip()
    by_uid = {s.series_instance_uid: s for s in all_series}
    if value in by_uid:
        series = by_uid[value]
    else:
        path = next((b / value for b in bases if (b / value).exists()), Path(value))
        if not path.exists():
            raise ConversionError(
                f"manifest case {case}: {what} {value!r} is neither a SeriesInstanceUID nor an existing path"
            )
        path = path.resolve()
        if path.is_file() and path.name.lower().endswith(NIFTI_SUFFIXES):
            if what != "mask":
                raise ConversionError(f"manifest case {case}: {what} must be DICOM, got NIfTI {path}")
            return path
        if path.is_file():
            matches = [s for s in all_series if path in {f.resolve() for f in s.files}]
        else:
            matches = [
                s
                for s in all_series
                if s.modality in modalities and all(path in f.resolve().parents for f in s.files)
            ]
        if len(matches) != 1:
            raise ConversionError(
                f"manifest case {case}: {what} {path} holds {len(matches)} {'/'.join(modalities)} series, expected one"
            )
        series = matches[0]
    if series.modality not in modalities:
        raise ConversionError(
            f"manifest case {case}: {what} {value} is a {series.modality} series, expected {'/'.join(modalities)}"
        )
    return series


def pairs_from_manifest(
    manifest: Path, input_dir: Path, all_series: Sequence[DicomSeries]
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Entries like :func:`pair_studies` from a CSV (case, patient, pet, ct, mask); a bad row fails its case."""
    with open(manifest, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = {c.strip().lower(): c for c in reader.fieldnames or ()}
        missing = {"case", "pet", "ct"} - set(columns)
        if missing:
            raise ConversionError(
                f"manifest {manifest}: missing column(s) {sorted(missing)} (need case, patient, pet, ct, mask)"
            )
        rows = [{k.strip().lower(): (v or "").strip() for k, v in row.items() if k} for row in reader]
    bases = [Path(manifest).resolve().parent, Path(input_dir).resolve()]
    pairs, failed = [], {}
    for row in rows:
        case = row["case"]
        try:
            pet = _resolve(row["pet"], bases, all_series, ("PT",), "pet", case)
            ct = _resolve(row["ct"], bases, all_series, ("CT",), "ct", case)
            mask = (
                _resolve(row["mask"], bases, all_series, MASK_MODALITIES, "mask", case)
                if row.get("mask")
                else None
            )
        except ConversionError as e:
            failed[case] = str(e)
            continue
        pairs.append({"pet": pet, "ct": ct, "mask": mask, "case": case, "patient": row.get("patient") or ""})
    return pairs, failed


# ----------------------------------------------------------------------------------------------
# Loading one case (runs in a worker)
# ----------------------------------------------------------------------------------------------


def _seg_labels(
    path: Path, reference: sitk.Image, seg_pattern: str | None, roi_labels: dict[str, int] | None
) -> sitk.Image:
    """SEG as a label map on ``reference``'s grid: merged into 1, or one read per ``roi_labels`` pattern."""
    import numpy as np
    import SimpleITK as sitk

    from nnunetv2_l1dfl.conversion.masks import MaskError, read_dicom_seg

    if not roi_labels:
        return read_dicom_seg(path, reference, segment_pattern=seg_pattern)
    out = None
    for pattern, value in roi_labels.items():  # first pattern wins on overlap, as for RTSTRUCT
        try:
            part = sitk.GetArrayFromImage(read_dicom_seg(path, reference, segment_pattern=pattern))
        except MaskError as e:
            logger.warning("%s", e)
            continue
        out = np.zeros_like(part) if out is None else out
        out[(part > 0) & (out == 0)] = value
    if out is None:
        raise ConversionError(
            f"{path}: no SegmentLabel (0062,0005) matches any --roi-labels pattern {list(roi_labels)}"
        )
    image = sitk.GetImageFromArray(out)
    image.CopyInformation(reference)
    return image


def load_dicom_case(job: CaseJob) -> LoadedCase:
    """Worker: SUV from the PET series, CT in HU, the mask on its own series' grid, all onto the PET grid.

    payload: ``pet_files``, ``ct_files``, ``mask`` (None, ``("nifti", path)`` or
    ``(modality, path, referenced_series_uids)``), ``pet_uid``, ``ct_uid``, ``roi_pattern``,
    ``roi_labels``, ``seg_pattern``, ``half_lives`` (extra nuclide half-lives, s), ``metadata``.
    """
    import SimpleITK as sitk

    from nnunetv2_l1dfl.conversion.dicom_series import read_ct_hu
    from nnunetv2_l1dfl.conversion.masks import rasterize_rtstruct

    p = job.payload
    suv = _read_suv(p["pet_files"], job.case_id, p.get("half_lives"))
    pet = suv.image
    ct = read_ct_hu(p["ct_files"])
    mask = p["mask"]
    if mask is None:
        native = sitk.Image(pet.GetSize(), sitk.sitkUInt8)
        native.CopyInformation(pet)
    elif mask[0] == "nifti":
        native = read_image(mask[1], "mask", job.case_id)
    else:
        modality, path, referenced = mask
        # Rasterize on the series the contours were drawn on (exact), then resample onto the PET grid.
        reference = ct if p["ct_uid"] in referenced and p["pet_uid"] not in referenced else pet
        if modality == "RTSTRUCT":
            native, rois = rasterize_rtstruct(
                path, reference, roi_pattern=p["roi_pattern"], roi_labels=p["roi_labels"]
            )
            logger.info("case %s: ROIs used: %s", job.case_id, ", ".join(rois))
        else:
            native = _seg_labels(Path(path), reference, p["seg_pattern"], p["roi_labels"])
    ct, label, warnings = place_on_pet_grid(ct, native, pet, job.case_id)
    details = suv.details
    metadata = dict(p["metadata"])
    metadata.update(
        tracer=details.get("tracer") or details.get("radionuclide") or "",
        scanner=details.get("scanner", ""),
        suv_branch=suv.branch,
    )
    if mask is None:
        warnings.append("no mask series: written as lesion-free (--allow-missing-mask)")
    return LoadedCase(ct=ct, pet=pet, label=label, metadata=metadata, warnings=warnings)


def _read_suv(files: Sequence[str], case_id: str, half_lives: Mapping[str, float] | None = None):
    from nnunetv2_l1dfl.conversion.suv import SUVError, read_pet_suv

    try:
        return read_pet_suv([Path(f) for f in files], case_id=case_id, extra_half_lives=half_lives)
    except SUVError as e:
        raise ConversionError(str(e)) from e


# ----------------------------------------------------------------------------------------------
# The converter
# ----------------------------------------------------------------------------------------------


def convert_dicom_petct(
    input_dir: Path | str,
    dataset_id: int,
    name: str,
    raw_dir: Path | str | None = None,
    *,
    roi_pattern: str = "lesion",
    roi_labels: Sequence[str] | None = None,
    seg_pattern: str | None = None,
    manifest: Path | str | None = None,
    allow_missing_mask: bool = False,
    pseudonym_key: Path | str | None = None,
    pet_norm: str = "CT",
    extra_half_lives: Mapping[str, float] | None = None,
    num_processes: int = 1,
    overwrite: bool = False,
    progress: bool = True,
) -> tuple[ConversionSummary, DatasetSpec, list[tuple[Path, str]]]:
    """Convert a DICOM folder; returns the summary, the spec and the files skipped during discovery.

    ``pseudonym_key`` set = pseudonymize, with the key CSV at that path (outside the dataset).
    Failures before loading (no CT in the frame of reference, several masks, a bad manifest row)
    are reported like loading failures, keyed by the case ID they would have had.
    """
    from nnunetv2_l1dfl.conversion.dicom_series import discover_series

    input_dir = Path(input_dir)
    labels, roi_label_patterns = parse_roi_labels(roi_labels)
    spec = DatasetSpec(
        raw_dir=resolve_raw_dir(raw_dir), dataset_id=dataset_id, name=name, labels=labels, pet_norm=pet_norm,
        description=f"PET/CT lesions converted from DICOM ({'pseudonymized' if pseudonym_key else input_dir.name})",
        extra_json={"roi_selection": dict(roi_label_patterns) if roi_label_patterns else {roi_pattern: 1}},
    )  # fmt: skip
    all_series, skipped = discover_series(input_dir, progress=progress)
    for path, reason in skipped:
        logger.warning("skipped %s: %s", path, reason)
    if manifest:
        pairs, failed_pairs = pairs_from_manifest(Path(manifest), input_dir, all_series)
    else:
        pairs, failed_pairs = pair_studies(all_series, allow_missing_mask=allow_missing_mask)
    if not pairs and not failed_pairs:
        raise ConversionError(
            f"no PET series (Modality PT) under {input_dir} ({len(all_series)} series, {len(skipped)} files skipped)"
        )

    def patient_of(entry: dict[str, Any]) -> str:
        return entry.get("patient") or entry.get("case") or entry["pet"].patient_id or "nopatientid"

    def key_of(entry: dict[str, Any]) -> CaseKey:
        pet = entry["pet"]
        if "case" in entry and not pseudonym_key:  # manifest: the user's case name, made safe
            return CaseKey(patient_id=entry["case"], discriminator=pet.series_instance_uid)
        return CaseKey(
            patient_of(entry), pet.study_date, f"{pet.study_instance_uid}/{pet.series_instance_uid}"
        )

    keys = [key_of(e) for e in pairs]
    # Automatic pairing failures are keyed by PET UID; give them the case ID they would have had.
    by_uid = {s.series_instance_uid: s for s in all_series}
    failed_keys = {
        uid: key_of({"pet": by_uid[uid]}) for uid in failed_pairs if uid in by_uid and not manifest
    }
    if pseudonym_key:
        key_file = PseudonymKey(pseudonym_key)
        case_ids = key_file.assign([*keys, *failed_keys.values()])
        key_file.save()
        patients = [key_file.pseudonym_of_case(case_ids[k]) for k in keys]
    else:
        case_ids = assign_case_ids([*keys, *failed_keys.values()])
        patients = [patient_of(e) for e in pairs]
    failed = {
        case_ids[failed_keys[uid]] if uid in failed_keys else uid: reason
        for uid, reason in failed_pairs.items()
    }

    jobs = []
    for entry, key, patient in zip(pairs, keys, patients):
        pet, ct, mask = entry["pet"], entry["ct"], entry["mask"]
        if isinstance(mask, Path):
            mask_payload = ("nifti", str(mask))
        elif mask is not None:
            if len(mask.files) != 1:
                failed[case_ids[key]] = f"{_describe(mask)}: expected one file"
                continue
            mask_payload = (mask.modality, str(mask.files[0]), tuple(mask.referenced_series_uids))
        else:
            mask_payload = None
        jobs.append(
            CaseJob(
                case_id=case_ids[key],
                patient=patient,
                source="pseudonymized" if pseudonym_key else f"PET {pet.series_instance_uid}",
                payload={
                    "pet_files": [str(f) for f in pet.files],
                    "ct_files": [str(f) for f in ct.files],
                    "mask": mask_payload,
                    "pet_uid": pet.series_instance_uid,
                    "ct_uid": ct.series_instance_uid,
                    "roi_pattern": roi_pattern,
                    "roi_labels": roi_label_patterns,
                    "seg_pattern": seg_pattern,
                    "half_lives": dict(extra_half_lives or {}),
                    "metadata": {
                        "patient": patient,
                        "study_date": "" if pseudonym_key else pet.study_date,
                        "source": ""
                        if pseudonym_key
                        else f"PET {pet.series_instance_uid} / CT {ct.series_instance_uid}"
                        + (f" / {mask_payload[0]} {mask_payload[1]}" if mask_payload else ""),
                    },
                },
            )  # fmt: skip
        )
    summary = convert_cases(
        jobs, load_dicom_case, spec, num_processes=num_processes, overwrite=overwrite, failed_before=failed,
        progress=progress,
    )  # fmt: skip
    return summary, spec, skipped


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from nnunetv2_l1dfl.conversion.cli import add_nuclide_argument, add_pseudonymize_arguments

    parser.add_argument(
        "--roi-pattern", default="lesion",
        help="regex searched case-insensitively in RTSTRUCT ROI names; matching ROIs are merged into label 1 "
        "(default: 'lesion', i.e. names containing 'lesion')",
    )  # fmt: skip
    parser.add_argument(
        "--roi-labels", action="append", metavar="NAME=REGEX", default=None,
        help="map ROIs (and SEG segment labels) to several labels instead, one option per label: labels 1, 2, ... "
        "in the order given, e.g. --roi-labels tumor=GTVp --roi-labels nodes='GTVn|node'; an ROI takes the first "
        "label it matches",
    )  # fmt: skip
    parser.add_argument(
        "--seg-pattern", default=None,
        help="regex for the SEG SegmentLabel (0062,0005) of the segments to use (default: every segment)",
    )  # fmt: skip
    parser.add_argument(
        "--manifest", type=Path, default=None,
        help="CSV with columns case, patient, pet, ct, mask: each of pet/ct/mask a SeriesInstanceUID, a folder holding "
        "that series, or a file (DICOM of the series, RTSTRUCT/SEG, or a NIfTI mask); replaces automatic pairing",
    )  # fmt: skip
    parser.add_argument(
        "--allow-missing-mask", action="store_true",
        help="write PETs without any RTSTRUCT/SEG as lesion-free cases (negative controls) instead of failing them",
    )  # fmt: skip
    add_pseudonymize_arguments(parser)
    add_nuclide_argument(parser)


def run(args: argparse.Namespace) -> int:
    from nnunetv2_l1dfl.conversion.cli import pseudonym_key_path, report, spec_from_args

    key_path = pseudonym_key_path(args, spec_from_args(args)) if args.pseudonymize else None
    summary, spec, skipped = convert_dicom_petct(
        args.input_dir, args.dataset_id, args.name, args.raw_dir, roi_pattern=args.roi_pattern,
        roi_labels=args.roi_labels, seg_pattern=args.seg_pattern, manifest=args.manifest,
        allow_missing_mask=args.allow_missing_mask, pseudonym_key=key_path, pet_norm=args.pet_norm,
        extra_half_lives=dict(args.nuclide or ()), num_processes=args.num_processes, overwrite=args.overwrite, progress=not args.no_progress,
    )  # fmt: skip
    if skipped:
        print(
            f"{len(skipped)} file(s) skipped while reading DICOM headers, e.g. {skipped[0][0]}: {skipped[0][1]}"
        )
    if key_path:
        print(f"pseudonym key (keep it private, outside the dataset): {key_path}")
    return report(summary, spec, args)


if __name__ == "__main__":
    from nnunetv2_l1dfl.conversion.cli import converter_main

    sys.exit(converter_main("dataset_conversion.dicom_petct"))
