"""Studies to predict: DICOM PET/CT (any nesting) or NIfTI cases in nnU-Net's ``imagesTs`` layout.

DICOM goes through the converter's own pieces, so a study is read exactly as ``l1dfl convert dicom``
reads it: series discovery (:func:`~nnunetv2_l1dfl.conversion.dicom_series.discover_series`), PET/CT
pairing (:func:`dataset_conversion.dicom_petct.pair_studies`: same StudyInstanceUID and
FrameOfReferenceUID, attenuation-corrected PET, the CT with the most slices), SUVbw through the
QIBA/IBSI decision tree (:func:`~nnunetv2_l1dfl.conversion.suv.read_pet_suv`) and the CT onto the PET
grid (:func:`~nnunetv2_l1dfl.conversion.resample.place_on_pet_grid`). RTSTRUCT/SEG series in the
input are ignored (prediction needs none).

Case IDs never contain patient identifiers (they name studies on the console and in logs):
``study-<10 hex digits of SHA-1 of the PET SeriesInstanceUID>`` for DICOM, stable between runs so a
batch can resume; the NIfTI case ID for NIfTI input.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pydicom
    import SimpleITK as sitk

logger = logging.getLogger(__name__)

CT_SUFFIX = "_0000"
PET_SUFFIX = "_0001"
NIFTI_ENDINGS = (".nii.gz", ".nii", ".mha", ".nrrd")
_CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})(?P<ending>\.nii\.gz|\.nii|\.mha|\.nrrd)$")


class StudyError(RuntimeError):
    """A study that cannot be predicted; the message names the case and the file/attribute."""


def case_id_for_uid(uid: str, prefix: str = "study") -> str:
    """``study-<10 hex>``: a stable case ID from a DICOM UID, free of patient identifiers."""
    return f"{prefix}-{hashlib.sha1(uid.encode('utf-8')).hexdigest()[:10]}"


@dataclass(frozen=True)
class Study:
    """One study to predict. kind ``"dicom"``: PET and CT file lists; ``"nifti"``: CT and PET files."""

    case_id: str
    kind: str
    pet_files: tuple[Path, ...] = ()
    ct_files: tuple[Path, ...] = ()
    pet_series_uid: str = ""
    ct_series_uid: str = ""
    ct_nifti: Path | None = None
    pet_nifti: Path | None = None
    warnings: tuple[str, ...] = ()


@dataclass
class Discovery:
    """Studies found under INPUT, studies that failed before loading (case ID -> reason), and the
    number of files skipped while reading DICOM headers."""

    kind: str
    studies: list[Study] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    skipped_files: int = 0


def _nifti_cases(folder: Path) -> dict[str, dict[str, Path]]:
    cases: dict[str, dict[str, Path]] = {}
    for path in sorted(folder.iterdir()):
        match = _CHANNEL_FILE.match(path.name)
        if path.is_file() and match:
            cases.setdefault(match["case"], {})[match["channel"]] = path
    return cases


def is_nifti_input(folder: Path) -> bool:
    """True when ``folder`` directly holds files named ``<case>_XXXX.nii.gz`` (nnU-Net's imagesTs)."""
    return Path(folder).is_dir() and bool(_nifti_cases(Path(folder)))


def discover_nifti(folder: Path) -> Discovery:
    """Cases ``<case>_0000`` (CT, HU) + ``<case>_0001`` (PET, SUV) of an imagesTs-style folder.

    A case without one of the two channels, or with more channels, fails with the reason.
    """
    found = Discovery(kind="nifti")
    for case, channels in _nifti_cases(Path(folder)).items():
        extra = sorted(set(channels) - {"0000", "0001"})
        if "0001" not in channels:
            found.failed[case] = f"case {case}: no PET channel {case}{PET_SUFFIX} (SUV) in {folder}"
        elif "0000" not in channels:
            found.failed[case] = f"case {case}: no CT channel {case}{CT_SUFFIX} (HU) in {folder}"
        elif extra:
            found.failed[case] = (
                f"case {case}: unexpected channel file(s) {[channels[c].name for c in extra]}; this command "
                "provides two channels, CT _0000 and PET _0001"
            )
        else:
            found.studies.append(Study(case_id=case, kind="nifti", ct_nifti=channels["0000"], pet_nifti=channels["0001"]))
    return found


def discover_dicom(folder: Path, series_uids: Sequence[str] = (), progress: bool = False) -> Discovery:
    """PET/CT studies under a DICOM folder, paired as ``l1dfl convert dicom`` pairs them.

    ``series_uids``: only these PET SeriesInstanceUIDs (an unknown UID is an error). A study
    (StudyInstanceUID) with image series but no PET fails as ``study-<hash of the StudyInstanceUID>``.
    """
    from dataset_conversion.dicom_petct import MASK_MODALITIES, pair_studies
    from nnunetv2_l1dfl.conversion.dicom_series import discover_series

    all_series, skipped = discover_series(Path(folder), progress=progress)
    images = [s for s in all_series if s.modality not in MASK_MODALITIES]  # RTSTRUCT/SEG play no part here
    paired = pair_studies(images, allow_missing_mask=True)
    pairs, failed_pairs = paired[0], paired[1]
    for uid, reason in (paired[2] if len(paired) > 2 else {}).items():  # e.g. a non-AC PET beside its AC twin
        logger.info("%s: skipped: %s", case_id_for_uid(uid), reason)
    found = Discovery(kind="dicom", skipped_files=len(skipped))
    wanted = set(series_uids)
    if wanted:
        pet_uids = {s.series_instance_uid for s in images if s.modality == "PT"}
        unknown = sorted(wanted - pet_uids)
        if unknown:
            raise StudyError(f"--series-uid {unknown[0]}: no PET series (Modality PT) with this SeriesInstanceUID under {folder}")
    for pair in pairs:
        pet, ct = pair["pet"], pair["ct"]
        if wanted and pet.series_instance_uid not in wanted:
            continue
        found.studies.append(
            Study(
                case_id=case_id_for_uid(pet.series_instance_uid), kind="dicom", pet_files=tuple(pet.files),
                ct_files=tuple(ct.files), pet_series_uid=pet.series_instance_uid, ct_series_uid=ct.series_instance_uid,
                warnings=tuple(pair.get("warnings") or ()),
            )  # fmt: skip
        )
    for uid, reason in failed_pairs.items():
        if not wanted or uid in wanted:
            found.failed[case_id_for_uid(uid)] = reason
    if not wanted:
        pet_studies = {s.study_instance_uid for s in images if s.modality == "PT"}
        for study_uid in sorted({s.study_instance_uid for s in images if s.modality == "CT"} - pet_studies):
            series = [s for s in images if s.study_instance_uid == study_uid]
            found.failed[case_id_for_uid(study_uid)] = (
                f"study {study_uid}: no PET series (Modality (0008,0060) PT); found "
                + ", ".join(f"{s.modality} series {s.series_instance_uid} ({len(s.files)} files)" for s in series)
            )
    if not found.studies and not found.failed:
        raise StudyError(
            f"no PET/CT study under {folder}: {len(all_series)} DICOM series, {len(skipped)} files skipped "
            f"(neither DICOM PET/CT nor NIfTI files <case>{CT_SUFFIX}/{PET_SUFFIX}.nii.gz)"
        )
    return found


def discover_studies(folder: Path | str, series_uids: Sequence[str] = (), progress: bool = False) -> Discovery:
    """NIfTI (``imagesTs`` layout) when the folder directly holds ``<case>_XXXX`` images, else DICOM."""
    folder = Path(folder)
    if not folder.is_dir():
        raise StudyError(f"input folder not found: {folder}")
    if is_nifti_input(folder):
        if series_uids:
            raise StudyError(f"--series-uid selects DICOM PET series, but {folder} holds NIfTI cases")
        return discover_nifti(folder)
    return discover_dicom(folder, series_uids, progress=progress)


# ----------------------------------------------------------------------------------------------
# Loading one study: CT (HU) and PET (SUVbw) on the PET grid
# ----------------------------------------------------------------------------------------------


@dataclass
class LoadedStudy:
    """A study ready for the predictor.

    suv: float32 SUVbw image (the PET grid: every output is on it). ct_path / pet_path: the two
    channel files handed to nnU-Net's reader (written by :func:`load_study` for DICOM input).
    pet_headers: for DICOM input, the PET slices' headers (no pixel data), ordered like the image's
    z axis (``pet_headers[k]`` is slice ``k``); ``None`` for NIfTI input. details: SUV branch, tracer,
    series UIDs (never patient identifiers).
    """

    study: Study
    suv: sitk.Image
    ct_path: Path
    pet_path: Path
    pet_headers: list[pydicom.Dataset] | None
    details: dict[str, Any]
    warnings: list[str]
    ct: sitk.Image | None = None  # DICOM input: the CT on its own grid (for an RTSTRUCT referencing the CT)


def headers_in_grid_order(files: Sequence[Path], grid: sitk.Image, case_id: str, what: str = "PET") -> list[pydicom.Dataset]:
    """Slice headers of a series ordered by their z index on ``grid`` (checked: one slice per index)."""
    import numpy as np
    import pydicom

    by_index: dict[int, pydicom.Dataset] = {}
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        position = [float(v) for v in ds.ImagePositionPatient]
        index = np.asarray(grid.TransformPhysicalPointToContinuousIndex(position))
        k = int(round(index[2]))
        if np.abs(index - [0, 0, k]).max() > 1e-2 or k in by_index or not 0 <= k < grid.GetSize()[2]:
            raise StudyError(
                f"case {case_id}: {path}: ImagePositionPatient (0020,0032) {position} is not a slice origin of the "
                f"{what} grid (or repeats one)"
            )
        by_index[k] = ds
    if len(by_index) != grid.GetSize()[2]:
        raise StudyError(f"case {case_id}: {len(by_index)} {what} slice headers for {grid.GetSize()[2]} slices")
    return [by_index[k] for k in range(len(by_index))]


def load_study(study: Study, work_dir: Path, file_ending: str = ".nii.gz",
               extra_half_lives: Mapping[str, float] | None = None) -> LoadedStudy:
    """Read one study; for DICOM write ``<case>_0000`` (CT on the PET grid) and ``<case>_0001`` (SUV)
    into ``work_dir`` with ``file_ending``. Raises :class:`StudyError` with a one-line reason."""
    import SimpleITK as sitk

    from nnunetv2_l1dfl.conversion.dicom_series import DicomSeriesError, read_ct_hu
    from nnunetv2_l1dfl.conversion.errors import ConversionError
    from nnunetv2_l1dfl.conversion.geometry import geometry_mismatch
    from nnunetv2_l1dfl.conversion.image_io import read_image
    from nnunetv2_l1dfl.conversion.resample import place_on_pet_grid
    from nnunetv2_l1dfl.conversion.suv import SUVError, read_pet_suv

    case = study.case_id
    if study.kind == "nifti":
        try:  # read whole and finite: SimpleITK zero-fills a truncated file and turns NaN into 0
            suv = sitk.Cast(read_image(study.pet_nifti, "PET (SUV)", case), sitk.sitkFloat32)
            read_image(study.ct_nifti, "CT", case)  # nnU-Net reads it again later; checked here
            ct_header = sitk.ImageFileReader()
            ct_header.SetFileName(str(study.ct_nifti))
            ct_header.ReadImageInformation()
        except ConversionError as e:
            raise StudyError(str(e)) from e
        except RuntimeError as e:
            raise StudyError(f"case {case}: cannot read {study.pet_nifti.name} / {study.ct_nifti.name}: "
                             f"{str(e).strip().splitlines()[-1]}") from e
        ct_geometry = sitk.Image([int(v) for v in ct_header.GetSize()], sitk.sitkUInt8)
        ct_geometry.SetSpacing(ct_header.GetSpacing())
        ct_geometry.SetOrigin(ct_header.GetOrigin())
        ct_geometry.SetDirection(ct_header.GetDirection())
        problem = geometry_mismatch(ct_geometry, suv)
        if problem:
            raise StudyError(f"case {case}: CT {study.ct_nifti.name} is not on the PET grid of {study.pet_nifti.name} "
                             f"({problem}); nnU-Net needs both channels on one grid")
        return LoadedStudy(study, suv, Path(study.ct_nifti), Path(study.pet_nifti), None,
                           {"input": "nifti"}, [])

    try:
        result = read_pet_suv(list(study.pet_files), case_id=case, extra_half_lives=extra_half_lives)
        ct = read_ct_hu(list(study.ct_files))
        empty = sitk.Image(result.image.GetSize(), sitk.sitkUInt8)
        empty.CopyInformation(result.image)
        ct_on_pet, _, warnings = place_on_pet_grid(ct, empty, result.image, case)
    except (SUVError, DicomSeriesError, ConversionError) as e:
        message = str(e)
        raise StudyError(message if case in message else f"case {case}: {message}") from e
    headers = headers_in_grid_order(study.pet_files, result.image, case)
    import numpy as np

    for what, image in (("PET (SUV)", result.image), ("CT", ct_on_pet)):
        if not np.all(np.isfinite(sitk.GetArrayViewFromImage(image))):
            raise StudyError(f"case {case}: {what} contains NaN or infinite values")
    ct_on_pet = sitk.Cast(ct_on_pet, sitk.sitkFloat32)
    ct_on_pet.CopyInformation(result.image)
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    ct_path = work_dir / f"{case}{CT_SUFFIX}{file_ending}"
    pet_path = work_dir / f"{case}{PET_SUFFIX}{file_ending}"
    sitk.WriteImage(ct_on_pet, str(ct_path), useCompression=file_ending.endswith(".gz"))
    sitk.WriteImage(result.image, str(pet_path), useCompression=file_ending.endswith(".gz"))
    details = {
        "input": "dicom",
        "pet_series_instance_uid": study.pet_series_uid,
        "ct_series_instance_uid": study.ct_series_uid,
        "suv_branch": result.branch,
        "tracer": result.details.get("tracer") or result.details.get("radionuclide") or "",
    }
    return LoadedStudy(study, result.image, ct_path, pet_path, headers, details, [*study.warnings, *warnings], ct)
