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

Every PET series found ends as converted, already done, failed or skipped, with the reason, in
``DatasetXXX/.l1dfl/dicom_series_report.csv`` and a console line. Failed before loading: a series
whose files disagree (:attr:`DicomSeries.problem`), a PatientID shared by different patients, a CT or
mask of another patient, a PET split over two SeriesInstanceUIDs, a PET without ATTN in
CorrectedImage (``--allow-non-attenuation-corrected``), no CT, no or several masks, a blank manifest
mask cell (``--allow-missing-mask``). Skipped: a non-attenuation-corrected PET beside its corrected
twin, a PET the manifest does not name.

    python -m dataset_conversion.dicom_petct /data/dicom -d 501 -n InstitutionPSMA --pseudonymize
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import logging
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nnunetv2_l1dfl.conversion.case_ids import CaseKey, PseudonymKey, assign_case_ids
from nnunetv2_l1dfl.conversion.dataset_folder import DEFAULT_LABELS, DatasetSpec, LoadedCase, resolve_raw_dir
from nnunetv2_l1dfl.conversion.errors import ConversionError
from nnunetv2_l1dfl.conversion.image_io import read_image
from nnunetv2_l1dfl.conversion.masks import MaskOptions
from nnunetv2_l1dfl.conversion.redact import register_identifier
from nnunetv2_l1dfl.conversion.resample import place_on_pet_grid
from nnunetv2_l1dfl.conversion.runner import CaseJob, ConversionSummary, convert_cases

if TYPE_CHECKING:
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


def attenuation_problem(pet: DicomSeries) -> str:
    """'' when the PET's CorrectedImage (0028,0051) lists ATTN, else the reason naming file and tag.

    A PET without attenuation correction has no quantitative activity: its SUV would be wrong.
    """
    if pet.corrected_image is not None and "ATTN" in pet.corrected_image:
        return ""
    values = "absent" if pet.corrected_image is None else "\\".join(pet.corrected_image) or "empty"
    return f"{pet.files[0]}: CorrectedImage (0028,0051) is {values}, without ATTN: not attenuation-corrected"


def _describe(series: DicomSeries) -> str:
    return f"{series.modality} series {series.series_instance_uid} ({series.series_description or 'no description'}, {len(series.files)} files)"


def _person_name(name: str) -> str:
    """PatientName compared the way people write it: case, spaces and empty trailing components ignored."""
    alphabetic = name.split("=")[0]
    return "^".join(part.strip().upper() for part in alphabetic.split("^")).rstrip("^")


def identity_conflict(a: DicomSeries, b: DicomSeries) -> str:
    """'' when two series may belong to one person, else the tag they contradict each other on.

    An empty value contradicts nothing; names are compared ignoring case and trailing '^'. The
    values themselves are not put in the message (they identify the patient).
    """
    for keyword, tag, x, y in (
        ("PatientID", "(0010,0020)", a.patient_id, b.patient_id),
        ("PatientName", "(0010,0010)", _person_name(a.patient_name), _person_name(b.patient_name)),
        ("PatientBirthDate", "(0010,0030)", a.patient_birth_date, b.patient_birth_date),
    ):
        if x and y and x != y:
            return (
                f"{keyword} {tag} differs between {a.modality} series {a.series_instance_uid} ({a.files[0]}) and "
                f"{b.modality} series {b.series_instance_uid} ({b.files[0]})"
            )
    return ""


def patient_id_conflicts(all_series: Sequence[DicomSeries]) -> dict[str, str]:
    """PatientIDs that name more than one person (PatientName / PatientBirthDate contradict): the reason.

    Such studies must not be merged into one patient (one split group) by their ID. An empty
    PatientID counts as one ID too (such studies would all fall into one patient group).
    """
    by_id: dict[str, list[DicomSeries]] = {}
    for series in all_series:
        by_id.setdefault(series.patient_id, []).append(series)
    conflicts = {}
    for patient_id, members in by_id.items():
        for i, a in enumerate(members):
            reason = next((r for b in members[i + 1 :] if (r := identity_conflict(a, b))), "")
            if reason:
                which = "one PatientID (0010,0020)" if patient_id else "an empty PatientID (0010,0020)"
                conflicts[patient_id] = (
                    f"{which} for different patients: {reason}; not merged into one patient "
                    "(fix the headers, or name each study's patient in the patient column of --manifest)"
                )
                break
    return conflicts


def split_series_problems(pets: Sequence[DicomSeries]) -> dict[str, str]:
    """PET series whose files share a folder, study, frame of reference and SeriesNumber (0020,0011)
    with another PET series: one series whose files disagree on SeriesInstanceUID (0020,000E).

    A stray file with a corrupt UID would otherwise become a one-slice case and leave its series a
    slice short. Keyed by SeriesInstanceUID, the reason names both UIDs and a file of each.
    """
    groups: dict[tuple[str, str, str, Path], list[DicomSeries]] = {}
    for pet in pets:
        if not pet.series_number:
            continue
        for folder in sorted({f.parent for f in pet.files}):
            key = (pet.study_instance_uid, pet.frame_of_reference_uid, pet.series_number, folder)
            groups.setdefault(key, []).append(pet)
    problems: dict[str, str] = {}
    for (_, _, number, folder), members in groups.items():
        if len(members) < 2:
            continue
        listed = "; ".join(
            f"{m.series_instance_uid} ({len(m.files)} files, e.g. {m.files[0].name})" for m in members
        )
        for m in members:
            problems.setdefault(
                m.series_instance_uid,
                f"{folder}: PET files of one series (SeriesNumber (0020,0011) {number}) carry "
                f"{len(members)} SeriesInstanceUIDs (0020,000E): {listed}",
            )
    return problems


def _pet_problem(
    pet: DicomSeries, conflicts: Mapping[str, str], split: Mapping[str, str], allow_nac: bool
) -> tuple[str, list[str]]:
    """Why this PET series cannot be converted ('' if it can), and the warnings to record if it is."""
    if pet.problem:
        return pet.problem, []
    if pet.series_instance_uid in split:
        return split[pet.series_instance_uid], []
    if pet.patient_id in conflicts:
        return conflicts[pet.patient_id], []
    nac = attenuation_problem(pet)
    if nac and not allow_nac:
        return f"{nac} (--allow-non-attenuation-corrected converts it anyway, recorded as a warning)", []
    return "", [f"{nac}; converted with --allow-non-attenuation-corrected"] if nac else []


def _partner_problem(pet: DicomSeries, other: DicomSeries, role: str) -> str:
    """Why the CT or mask series chosen for ``pet`` cannot be used with it ('' if it can)."""
    if other.problem:
        return f"{role} {_describe(other)}: {other.problem}"
    conflict = identity_conflict(pet, other)
    return f"PET and {role} are not of one patient: {conflict}" if conflict else ""


def pair_studies(
    all_series: Sequence[DicomSeries],
    allow_missing_mask: bool = False,
    allow_non_attenuation_corrected: bool = False,
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """:func:`pair_pet_series` without the skipped series (logged): ``(entries, failed)``."""
    pairs, failed, skipped = pair_pet_series(all_series, allow_missing_mask, allow_non_attenuation_corrected)
    for uid, reason in skipped.items():
        logger.info("skipped PET series %s: %s", uid, reason)
    return pairs, failed


def pair_pet_series(
    all_series: Sequence[DicomSeries],
    allow_missing_mask: bool = False,
    allow_non_attenuation_corrected: bool = False,
) -> tuple[list[dict[str, Any]], dict[str, str], dict[str, str]]:
    """Pair each PET series with its CT and mask: ``(entries, failed, skipped)``.

    entries: ``{"pet", "ct", "mask", "warnings"}`` (mask None only with ``allow_missing_mask``);
    failed and skipped: reasons keyed by PET SeriesInstanceUID. Every series with a PET file ends
    in exactly one of the three. Skipped: a PET without ATTN in CorrectedImage (0028,0051) next to an
    attenuation-corrected PET of the same study and frame of reference (scanners export both).
    Failed: a series whose files disagree, a PatientID shared by different patients, a lone
    non-attenuation-corrected PET (unless ``allow_non_attenuation_corrected``), no CT in the frame of
    reference, a CT or mask of another patient or with inconsistent files, several masks, no mask.
    """
    pets = [s for s in all_series if s.has_pet_files]
    cts = [s for s in all_series if s.modality == "CT"]
    masks = [s for s in all_series if s.modality in MASK_MODALITIES]
    conflicts = patient_id_conflicts(all_series)
    split = split_series_problems(pets)
    pairs: list[dict[str, Any]] = []
    failed: dict[str, str] = {}
    skipped: dict[str, str] = {}
    for pet in pets:
        uid = pet.series_instance_uid
        same_frame = [
            s for s in pets
            if s is not pet and s.study_instance_uid == pet.study_instance_uid
            and s.frame_of_reference_uid == pet.frame_of_reference_uid and not s.problem
            and not attenuation_problem(s)
        ]  # fmt: skip
        if not pet.problem and attenuation_problem(pet) and same_frame:
            skipped[uid] = (
                f"{attenuation_problem(pet)}; the attenuation-corrected PET series "
                f"{same_frame[0].series_instance_uid} of the same study and frame of reference is used instead"
            )
            continue
        problem, warnings = _pet_problem(pet, conflicts, split, allow_non_attenuation_corrected)
        if problem:
            failed[uid] = problem
            continue
        candidates = [
            c for c in cts
            if c.study_instance_uid == pet.study_instance_uid and c.frame_of_reference_uid == pet.frame_of_reference_uid
        ]  # fmt: skip
        if not candidates:
            in_study = [c for c in cts if c.study_instance_uid == pet.study_instance_uid]
            failed[uid] = (
                f"no CT with StudyInstanceUID {pet.study_instance_uid} and FrameOfReferenceUID (0020,0052) "
                f"{pet.frame_of_reference_uid or '(missing)'} for PET {uid}"
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
            logger.info("PET %s: %d CT candidates, using the largest, %s", uid, len(candidates), _describe(ct))
        in_study = [m for m in masks if m.study_instance_uid == pet.study_instance_uid]
        direct = [m for m in in_study if {uid, ct.series_instance_uid} & set(m.referenced_series_uids)]
        # A mask that references another PET/CT of the study belongs to that one, not to this PET.
        others = {s.series_instance_uid for s in pets + cts} - {uid, ct.series_instance_uid}
        loose = [
            m for m in in_study
            if m.frame_of_reference_uid in ("", pet.frame_of_reference_uid) and not set(m.referenced_series_uids) & others
        ]  # fmt: skip
        chosen = direct or loose
        if len(chosen) > 1:
            failed[uid] = (
                f"{len(chosen)} mask series for PET {uid}: "
                + "; ".join(_describe(m) for m in chosen)
                + "; pick one with --manifest"
            )
            continue
        if not chosen and not allow_missing_mask:
            failed[uid] = (
                f"no RTSTRUCT or SEG referencing PET {uid} or CT {ct.series_instance_uid} "
                f"in study {pet.study_instance_uid} (use --manifest for NIfTI masks, or --allow-missing-mask "
                "for lesion-free studies)"
            )
            continue
        partner = next(
            (r for other, role in [(ct, "CT"), *((m, "mask") for m in chosen)] if (r := _partner_problem(pet, other, role))),
            "",
        )
        if partner:
            failed[uid] = partner
            continue
        pairs.append({"pet": pet, "ct": ct, "mask": chosen[0] if chosen else None, "warnings": warnings})
    return pairs, failed, skipped


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
    manifest: Path,
    input_dir: Path,
    all_series: Sequence[DicomSeries],
    allow_missing_mask: bool = False,
    allow_non_attenuation_corrected: bool = False,
) -> tuple[list[dict[str, Any]], dict[str, str], dict[str, str]]:
    """Entries like :func:`pair_pet_series` from a CSV (case, patient, pet, ct, mask); a bad row fails its case.

    Returns ``(entries, failed, resolved)``: failures keyed by the row's case name, and the PET
    SeriesInstanceUID of every row whose PET cell resolved (for the per-series report).

    A blank (or absent) mask cell fails the case unless ``allow_missing_mask`` (then it is written
    lesion-free, with a warning). The PET, CT and mask a row names get the checks of automatic pairing
    (consistent files, attenuation correction, one patient).
    """
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
    pets = [s for s in all_series if s.has_pet_files]
    split = split_series_problems(pets)
    pairs: list[dict[str, Any]] = []
    failed: dict[str, str] = {}
    resolved: dict[str, str] = {}
    for n, row in enumerate(rows, start=2):  # line numbers as an editor shows them (header = line 1)
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
        resolved[case] = pet.series_instance_uid
        if mask is None and not allow_missing_mask:
            failed[case] = (
                f"manifest {manifest} line {n}, case {case}: the mask cell is blank (give an RTSTRUCT, SEG or "
                "NIfTI mask, or --allow-missing-mask to write the case as lesion-free)"
            )
            continue
        problem, warnings = _pet_problem(pet, {}, split, allow_non_attenuation_corrected)
        partners = [(ct, "CT")] + ([(mask, "mask")] if mask is not None and not isinstance(mask, Path) else [])
        problem = problem or next((r for other, role in partners if (r := _partner_problem(pet, other, role))), "")
        if problem:
            failed[case] = f"manifest case {case}: {problem}"
            continue
        pairs.append(
            {"pet": pet, "ct": ct, "mask": mask, "case": case, "patient": row.get("patient") or "", "warnings": warnings}
        )
    return pairs, failed, resolved


# ----------------------------------------------------------------------------------------------
# Loading one case (runs in a worker)
# ----------------------------------------------------------------------------------------------


def load_dicom_case(job: CaseJob) -> LoadedCase:
    """Worker: SUV from the PET series, CT in HU, the mask on its own series' grid, all onto the PET grid.

    payload: ``pet_files``, ``ct_files``, ``mask`` (None, ``("nifti", path)`` or
    ``(modality, path, referenced_series_uids)``), ``pet_uid``, ``ct_uid``, ``roi_pattern``,
    ``roi_labels``, ``seg_pattern``, ``half_lives`` (extra nuclide half-lives, s), ``metadata``,
    ``warnings`` (compromises accepted during pairing, recorded with the case).
    """
    import SimpleITK as sitk

    from nnunetv2_l1dfl.conversion.dicom_series import read_ct_hu
    from nnunetv2_l1dfl.conversion.masks import labels_from_image, read_rtstruct, read_seg

    p = job.payload
    options = p.get("mask_options") or MaskOptions(
        roi_pattern=p["roi_pattern"], roi_labels=p["roi_labels"], seg_pattern=p["seg_pattern"]
    )
    suv = _read_suv(p["pet_files"], job.case_id, p.get("half_lives"), p.get("allow_implausible_suv", False))
    pet = suv.image
    ct = read_ct_hu(p["ct_files"])
    mask = p["mask"]
    if mask is None:
        native = sitk.Image(pet.GetSize(), sitk.sitkUInt8)
        native.CopyInformation(pet)
        structures = []
    elif mask[0] == "nifti":
        placed = labels_from_image(read_image(mask[1], "mask", job.case_id), mask[1], options)
        native, structures = placed.label, placed.structures
    else:
        modality, path, referenced = mask
        # Rasterize on the series the contours were drawn on (exact), then resample onto the PET grid.
        reference = ct if p["ct_uid"] in referenced and p["pet_uid"] not in referenced else pet
        read = read_rtstruct if modality == "RTSTRUCT" else read_seg
        placed = read(Path(path), reference, options)
        native, structures = placed.label, placed.structures
        logger.info("case %s: %s used: %s", job.case_id, modality, ", ".join(s.name for s in structures if s.label))
    ct, label, warnings = place_on_pet_grid(
        ct, native, pet, job.case_id, options, structures=structures, ct_name=f"CT series {p['ct_uid']}"
    )
    details = suv.details
    metadata = dict(p["metadata"])
    metadata.update(
        tracer=details.get("tracer") or details.get("radionuclide") or "",
        scanner=details.get("scanner", ""),
        suv_branch=suv.branch,
    )
    warnings = [*p.get("warnings", ()), *warnings]
    warnings.extend(suv.warnings)  # implausible SUV accepted with --allow-implausible-suv
    if mask is None:
        warnings.append("no mask series: written as lesion-free (--allow-missing-mask)")
    return LoadedCase(ct=ct, pet=pet, label=label, metadata=metadata, warnings=warnings)


def _read_suv(
    files: Sequence[str], case_id: str, half_lives: Mapping[str, float] | None = None, allow_implausible_suv: bool = False
):
    from nnunetv2_l1dfl.conversion.suv import SUVError, read_pet_suv

    try:
        return read_pet_suv(
            [Path(f) for f in files], case_id=case_id, extra_half_lives=half_lives,
            allow_implausible_suv=allow_implausible_suv,
        )  # fmt: skip
    except SUVError as e:
        raise ConversionError(str(e)) from e


# ----------------------------------------------------------------------------------------------
# The converter
# ----------------------------------------------------------------------------------------------


SERIES_REPORT_NAME = "dicom_series_report.csv"
SERIES_REPORT_COLUMNS = ("pet_series_uid", "files", "status", "case_id", "reason")


def write_series_report(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """The per-run report, one row per PET series found (and per manifest row without one): CSV."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=SERIES_REPORT_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({c: row.get(c, "") for c in SERIES_REPORT_COLUMNS})
    tmp.replace(path)
    return path


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
    allow_non_attenuation_corrected: bool = False,
    pseudonym_key: Path | str | None = None,
    pet_norm: str = "CT",
    extra_half_lives: Mapping[str, float] | None = None,
    allow_implausible_suv: bool = False,
    num_processes: int = 1,
    overwrite: bool = False,
    progress: bool = True,
    mask_options: MaskOptions | None = None,
) -> tuple[ConversionSummary, DatasetSpec, list[tuple[Path, str]]]:
    """Convert a DICOM folder; returns the summary, the spec and the files skipped during discovery.

    ``mask_options``: lesion accounting, ``--mask-threshold`` and CT coverage (:class:`MaskOptions`;
    its ROI / SEG selection is taken from ``roi_pattern``, ``roi_labels`` and ``seg_pattern``).

    ``pseudonym_key`` set = pseudonymize, with the key CSV at that path (outside the dataset).
    Failures before loading (no CT in the frame of reference, several masks, a bad manifest row)
    are reported like loading failures, keyed by the case ID they would have had. Every PET series
    found ends as converted, already done, failed or skipped (with the reason) in
    ``DatasetXXX/.l1dfl/dicom_series_report.csv`` (``summary.series_report``); pseudonymized, the full
    report goes beside the pseudonym key and the dataset's copy has no UIDs or reasons.
    """
    from nnunetv2_l1dfl.conversion.dataset_folder import BOOKKEEPING_DIR
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
    pet_series = [s for s in all_series if s.has_pet_files]
    manifest_pets: dict[str, str] = {}
    if manifest:
        pairs, failed_pairs, manifest_pets = pairs_from_manifest(
            Path(manifest), input_dir, all_series, allow_missing_mask, allow_non_attenuation_corrected
        )
        named = {e["pet"].series_instance_uid for e in pairs} | set(manifest_pets.values())
        skipped_pairs = {
            s.series_instance_uid: f"not named in the pet column of --manifest {manifest}"
            for s in pet_series if s.series_instance_uid not in named
        }  # fmt: skip
    else:
        pairs, failed_pairs, skipped_pairs = pair_pet_series(
            all_series, allow_missing_mask, allow_non_attenuation_corrected
        )
    if not pet_series and not failed_pairs:
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
        for key, entry in zip(keys, pairs):  # no message of the run may show a patient's name
            register_identifier(entry["pet"].patient_name, case_ids[key])
    else:
        case_ids = assign_case_ids([*keys, *failed_keys.values()])
        patients = [patient_of(e) for e in pairs]
    failed = {
        case_ids[failed_keys[uid]] if uid in failed_keys else uid: reason
        for uid, reason in failed_pairs.items()
    }
    n_files = {s.series_instance_uid: len(s.files) for s in all_series}
    report_rows: list[dict[str, Any]] = []
    for uid in failed_pairs:
        pet_uid = uid if not manifest else manifest_pets.get(uid, "")
        case_id = case_ids[failed_keys[uid]] if uid in failed_keys else uid
        report_rows.append({"pet_series_uid": pet_uid, "files": n_files.get(pet_uid, ""), "status": "failed",
                            "case_id": case_id, "reason": failed[case_id]})  # fmt: skip
    for uid, reason in skipped_pairs.items():
        report_rows.append({"pet_series_uid": uid, "files": n_files[uid], "status": "skipped", "reason": reason})

    jobs = []
    for entry, key, patient in zip(pairs, keys, patients):
        pet, ct, mask = entry["pet"], entry["ct"], entry["mask"]
        row = {"pet_series_uid": pet.series_instance_uid, "files": len(pet.files), "case_id": case_ids[key]}
        report_rows.append(row)
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
                    "mask_options": dataclasses.replace(
                        mask_options or MaskOptions(), roi_pattern=roi_pattern, roi_labels=roi_label_patterns,
                        seg_pattern=seg_pattern,
                    ),  # fmt: skip
                    "half_lives": dict(extra_half_lives or {}),
                    "allow_implausible_suv": allow_implausible_suv,
                    "warnings": list(entry.get("warnings", ())),
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
    skipped_before = {
        (f"PET series {n}" if pseudonym_key else f"PET {uid}"): reason
        for n, (uid, reason) in enumerate(skipped_pairs.items(), start=1)
    }
    summary = convert_cases(
        jobs, load_dicom_case, spec, num_processes=num_processes, overwrite=overwrite, failed_before=failed,
        progress=progress, skipped_before=skipped_before,
    )  # fmt: skip
    for row in report_rows:
        case_id = row.get("case_id", "")
        if row.get("status"):
            continue
        if case_id in summary.converted:
            row["status"] = "converted"
        elif case_id in summary.skipped:
            row["status"] = "already done"
        else:
            row.update(status="failed", reason=summary.failed.get(case_id, "not converted (no reason recorded)"))
    report_rows.sort(key=lambda r: (str(r.get("case_id", "")), str(r["pet_series_uid"])))
    in_dataset = summary.dataset_dir / BOOKKEEPING_DIR / SERIES_REPORT_NAME
    if pseudonym_key:
        write_series_report(report_rows, series_report_path(summary.dataset_dir, pseudonym_key))
        report_rows = [{"status": r["status"], "case_id": r.get("case_id", ""), "files": r["files"]} for r in report_rows]
    write_series_report(report_rows, in_dataset)
    return summary, spec, skipped


def series_report_path(dataset_dir: Path, pseudonym_key: Path | str | None = None) -> Path:
    """Where the full per-run PET series report is: the bookkeeping folder, or beside the pseudonym key."""
    from nnunetv2_l1dfl.conversion.dataset_folder import BOOKKEEPING_DIR

    if pseudonym_key:
        key_path = Path(pseudonym_key)
        return key_path.with_name(f"{key_path.stem}_{SERIES_REPORT_NAME}")
    return Path(dataset_dir) / BOOKKEEPING_DIR / SERIES_REPORT_NAME


def read_series_report(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


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
        help="write PETs without any RTSTRUCT/SEG (or with a blank mask cell in --manifest) as lesion-free cases "
        "(negative controls) instead of failing them; recorded as a case warning",
    )  # fmt: skip
    parser.add_argument(
        "--allow-non-attenuation-corrected", action="store_true",
        help="convert a PET whose CorrectedImage (0028,0051) lacks ATTN when no attenuation-corrected PET of the "
        "same study exists, instead of failing it (its SUV is not quantitative); recorded as a case warning",
    )  # fmt: skip
    add_pseudonymize_arguments(parser)
    add_nuclide_argument(parser)


def run(args: argparse.Namespace) -> int:
    from nnunetv2_l1dfl.conversion.cli import pseudonym_key_path, report, spec_from_args

    key_path = pseudonym_key_path(args, spec_from_args(args)) if args.pseudonymize else None
    summary, spec, skipped = convert_dicom_petct(
        args.input_dir, args.dataset_id, args.name, args.raw_dir, roi_pattern=args.roi_pattern,
        roi_labels=args.roi_labels, seg_pattern=args.seg_pattern, manifest=args.manifest,
        mask_options=MaskOptions.from_args(args),
        allow_missing_mask=args.allow_missing_mask, pseudonym_key=key_path, pet_norm=args.pet_norm,
        allow_non_attenuation_corrected=args.allow_non_attenuation_corrected,
        extra_half_lives=dict(args.nuclide or ()), allow_implausible_suv=args.allow_implausible_suv,
        num_processes=args.num_processes, overwrite=args.overwrite, progress=not args.no_progress,
    )  # fmt: skip
    if skipped:
        print(
            f"{len(skipped)} file(s) skipped while reading DICOM headers, e.g. {skipped[0][0]}: {skipped[0][1]}"
        )
    if key_path:
        print(f"pseudonym key (keep it private, outside the dataset): {key_path}")
    report_path = series_report_path(summary.dataset_dir, key_path)
    rows = read_series_report(report_path)
    for row in rows:
        if row["status"] == "skipped" and not key_path:
            print(f"SKIPPED PET {row['pet_series_uid']}: {row['reason']}")
    counts = Counter(row["status"] for row in rows)
    print(
        f"PET series: {sum(1 for r in rows if r['pet_series_uid'])} found; "
        + ", ".join(f"{counts[s]} {s}" for s in ("converted", "already done", "failed", "skipped"))
        + f" (per-series report: {report_path})"
    )
    return report(summary, spec, args)


if __name__ == "__main__":
    from nnunetv2_l1dfl.conversion.cli import converter_main

    sys.exit(converter_main("dataset_conversion.dicom_petct"))
