"""Writing two-channel PET/CT nnU-Net v2 raw datasets: the part every converter shares.

A converter (``dataset_conversion/*.py``) turns its source into a list of :class:`CaseJob` and a
picklable ``load_case(job) -> LoadedCase`` function that returns CT, PET and label as SimpleITK
images on the PET grid. :func:`convert_cases` does the rest:

- ``DatasetXXX_Name/imagesTr/<case>_0000.nii.gz`` CT in HU, ``<case>_0001.nii.gz`` PET in SUVbw
  (both float32), ``labelsTr/<case>.nii.gz`` (uint8), ``dataset.json`` with the channel names
  (PET normalization is a choice, see :data:`PET_NORMALIZATIONS`) and the physical modality of each
  channel under ``"channel_modalities"``;
- atomic, resumable writes: each case is written to a staging folder, its geometry read back and
  checked, then renamed into place with the label last. A case counts as finished when its label
  and its record exist and no in-progress marker is left; an interrupted case is rolled back on
  the next run, so nnU-Net never sees a half-written case;
- a per-case metadata table ``case_metadata.csv`` next to ``dataset.json`` (nnU-Net reads only
  ``imagesTr``/``labelsTr``/``dataset.json``, so extra files in the dataset folder are ignored by
  ``nnUNetv2_plan_and_preprocess --verify_dataset_integrity``), with lesion count, TMTV and warnings;
- failures are collected per case with their reason; the run goes on.

Also here: case-ID sanitizing and pseudonymizing (:func:`assign_case_ids`, :class:`PseudonymKey`)
and patient-grouped 5-fold splits (:func:`make_patient_splits`, :func:`write_splits`).

Book-keeping lives in ``DatasetXXX_Name/.l1dfl/`` (per-case records as JSON, in-progress markers,
staging); nnU-Net never looks there.
"""

from __future__ import annotations

import csv
import datetime as _dt
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import SimpleITK as sitk

logger = logging.getLogger(__name__)

FILE_ENDING = ".nii.gz"
CT_CHANNEL = 0  # order of the autoPET III/IV baselines and of the autoPET III winner
PET_CHANNEL = 1
DEFAULT_LABELS: dict[str, int] = {"background": 0, "lesion": 1}
METADATA_FILE = "case_metadata.csv"
BOOKKEEPING_DIR = ".l1dfl"

# nnU-Net picks the normalization from the channel name (case-insensitive).
PET_NORMALIZATIONS: dict[str, str] = {
    "CT": (
        "global: clip to the 0.5/99.5th percentiles of the SUV inside the labels over the whole "
        "dataset, then subtract the global mean and divide by the global std. One affine map for "
        "every case, so absolute SUV stays comparable between patients (the autoPET III winner's "
        "choice)"
    ),
    "noNorm": "none: the network sees raw SUVbw, as in the L1DFL paper",
    "zscore": (
        "per image: subtract the image's mean SUV and divide by its std (nnU-Net's default for "
        "non-CT channels); throws away absolute SUV, so a hot lesion in a cold patient and a "
        "cold lesion in a hot one look alike"
    ),
    "rescale_to_0_1": (
        "per image: min-max rescaling to [0, 1]; keeps SUV ratios within a case, but each case's "
        "hottest voxel sets its scale, so absolute SUV is lost between patients"
    ),
}
DEFAULT_PET_NORM = "CT"
CHANNEL_MODALITIES = {
    str(
        CT_CHANNEL
    ): "CT in Hounsfield units, resampled onto the PET grid (linear; -1024 HU outside the CT field of view)",
    str(PET_CHANNEL): "PET in SUVbw (body-weight standardized uptake value, g/ml)",
}

# Whole-body PET with a maximum SUV outside this range almost always means a unit error in the
# dose (MBq vs Bq) or the weight (g vs kg), or a PET that is not in SUV at all.
PLAUSIBLE_SUV_MAX = (1.0, 150.0)

METADATA_COLUMNS = (
    "case_id",
    "patient",
    "study_date",
    "tracer",
    "scanner",
    "suv_branch",
    "spacing_mm",
    "shape",
    "n_lesions",
    "tmtv_ml",
    "suv_max",
    "warnings",
    "source",
)


class ConversionError(RuntimeError):
    """A case (or the whole run) cannot be converted; the message says which and why."""


# ----------------------------------------------------------------------------------------------
# Case IDs
# ----------------------------------------------------------------------------------------------

_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9-]+")
_MAX_PART_LENGTH = 48


def _short_hash(text: str, n: int = 6) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:n]


def sanitize_id_part(text: str, fallback: str = "x") -> str:
    """One part of a case ID, made safe for nnU-Net and every file system.

    Keeps ASCII letters, digits and ``-``; every other run of characters (path separators, spaces,
    underscores, dots, accents stripped to ASCII first) becomes one ``-``. Underscores are reserved
    for joining parts, so no part can fake nnU-Net's ``_XXXX`` channel suffix. Parts longer than 48
    characters are cut and get a 6-character hash of the full text, so two long IDs stay distinct.
    Empty results become ``fallback``.
    """
    ascii_text = unicodedata.normalize("NFKD", str(text)).encode("ascii", "ignore").decode("ascii")
    part = _UNSAFE_CHARS.sub("-", ascii_text).strip("-")
    if len(part) > _MAX_PART_LENGTH:
        part = part[: _MAX_PART_LENGTH - 7].rstrip("-") + "-" + _short_hash(str(text))
    return part or fallback


_DATE_FORMATS = ("%Y%m%d", "%Y-%m-%d", "%m-%d-%Y", "%Y.%m.%d", "%d.%m.%Y")


def normalize_study_date(text: str | None) -> str:
    """``YYYYMMDD`` from a DICOM date, ISO date or TCIA's ``MM-DD-YYYY``; ``""`` if unparsable.

    Only the leading date is read, so TCIA study folder names such as
    ``"08-12-2002-NA-PET-CT Ganzkoerper  primaer mit KM-10445"`` work.
    """
    if not text:
        return ""
    text = str(text).strip()
    for fmt in _DATE_FORMATS:
        width = len(_dt.datetime(2000, 1, 1).strftime(fmt))
        try:
            return _dt.datetime.strptime(text[:width], fmt).strftime("%Y%m%d")
        except ValueError:
            continue
    return ""


@dataclass(frozen=True)
class CaseKey:
    """What identifies one case before it has a case ID.

    patient_id: the raw patient identifier (any characters).
    study_date: a date :func:`normalize_study_date` understands, or ``None`` for sources without
        dates (the case ID then has no date part).
    discriminator: tells apart studies of one patient on one day (a StudyInstanceUID, PET series
        UID or folder name); also used to order such studies deterministically.
    prefix: an optional leading part, e.g. the tracer (``fdg``/``psma``) of autoPET.
    """

    patient_id: str
    study_date: str | None = None
    discriminator: str = ""
    prefix: str = ""


def _join_id(parts: Sequence[str]) -> str:
    case_id = "_".join(p for p in parts if p)
    # A last part of exactly four digits would read as a channel suffix: join it with "-".
    return re.sub(r"_(\d{4})$", r"-\1", case_id)


def assign_case_ids(keys: Iterable[CaseKey]) -> dict[CaseKey, str]:
    """Deterministic, unique, nnU-Net-safe case IDs: ``[prefix_]patient[_YYYYMMDD][-n]``.

    - Each part goes through :func:`sanitize_id_part`.
    - Two different raw patient IDs that sanitize alike (``"A/B"`` and ``"A B"``) both get a
      6-character hash of their raw ID appended, so neither depends on the other's presence order.
    - Every dated study carries its date (``nodate`` when unreadable), so a patient's IDs do not
      change when a later study is added; studies of one patient on one day get ``-1``, ``-2``, ...
      in the order of their discriminator.
    """
    keys = list(dict.fromkeys(keys))
    raw_by_part: dict[tuple[str, str], set[str]] = {}
    for key in keys:
        raw_by_part.setdefault((key.prefix, sanitize_id_part(key.patient_id, "patient")), set()).add(
            key.patient_id
        )

    def patient_part(key: CaseKey) -> str:
        part = sanitize_id_part(key.patient_id, "patient")
        if len(raw_by_part[(key.prefix, part)]) > 1:
            part = f"{part}-{_short_hash(key.patient_id)}"
        return part

    bases: dict[CaseKey, str] = {}
    for key in keys:
        parts = [sanitize_id_part(key.prefix) if key.prefix else "", patient_part(key)]
        if key.study_date is not None:
            parts.append(normalize_study_date(key.study_date) or "nodate")
        bases[key] = _join_id(parts)
    by_base: dict[str, list[CaseKey]] = {}
    for key, base in bases.items():
        by_base.setdefault(base, []).append(key)
    case_ids = {}
    for base, group in by_base.items():
        if len(group) == 1:
            case_ids[group[0]] = base
            continue
        for n, key in enumerate(sorted(group, key=lambda k: (k.discriminator, k.patient_id)), start=1):
            case_ids[key] = f"{base}-{n}"
    return case_ids


class PseudonymKey:
    """Pseudonymous case IDs with their key kept in a CSV outside the dataset.

    Patient IDs are protected health information. Each patient gets a random pseudonym
    (``P`` + 10 hex digits; random rather than a hash of the ID, because a plain hash of a short
    medical record number is reversed by hashing every candidate number) and each of their studies
    an ordinal: ``P3f9a0c21de_s1``, ``_s2``, ... in study-date order. Dates are left out of the IDs.

    The key CSV (columns ``case_id, pseudonym, patient_id, study_date, discriminator, source``)
    is the only link back to the patient: keep it out of the dataset and away from whoever receives
    the dataset. Re-runs read it and reuse every pseudonym, so resuming a conversion keeps its IDs.
    """

    COLUMNS = ("case_id", "pseudonym", "patient_id", "study_date", "discriminator", "source")

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.rows: list[dict[str, str]] = []
        if self.path.is_file():
            with self.path.open(newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                missing = set(self.COLUMNS) - set(reader.fieldnames or ())
                if missing:
                    raise ConversionError(f"pseudonym key {self.path}: missing columns {sorted(missing)}")
                self.rows = [dict(row) for row in reader]

    def assign(
        self, keys: Iterable[CaseKey], sources: Mapping[CaseKey, str] | None = None
    ) -> dict[CaseKey, str]:
        """Case IDs for ``keys``, reusing the key file's entries and adding new ones."""
        sources = sources or {}
        existing = {(r["patient_id"], r["discriminator"]): r["case_id"] for r in self.rows}
        pseudonyms = {r["patient_id"]: r["pseudonym"] for r in self.rows}
        used = {r["pseudonym"] for r in self.rows}
        n_studies: dict[str, int] = {}
        for r in self.rows:
            match = re.search(r"_s(\d+)$", r["case_id"])
            n_studies[r["patient_id"]] = max(
                n_studies.get(r["patient_id"], 0), int(match.group(1)) if match else 0
            )
        result = {}
        new_keys = sorted(
            dict.fromkeys(keys),
            key=lambda k: (k.patient_id, normalize_study_date(k.study_date), k.discriminator),
        )
        for key in new_keys:
            if (key.patient_id, key.discriminator) in existing:
                result[key] = existing[(key.patient_id, key.discriminator)]
                continue
            if key.patient_id not in pseudonyms:
                pseudonym = "P" + secrets.token_hex(5)
                while pseudonym in used:
                    pseudonym = "P" + secrets.token_hex(5)
                pseudonyms[key.patient_id] = pseudonym
                used.add(pseudonym)
            n_studies[key.patient_id] = n_studies.get(key.patient_id, 0) + 1
            case_id = f"{pseudonyms[key.patient_id]}_s{n_studies[key.patient_id]}"
            result[key] = case_id
            existing[(key.patient_id, key.discriminator)] = case_id
            self.rows.append(
                {
                    "case_id": case_id,
                    "pseudonym": pseudonyms[key.patient_id],
                    "patient_id": key.patient_id,
                    "study_date": normalize_study_date(key.study_date),
                    "discriminator": key.discriminator,
                    "source": sources.get(key, ""),
                }
            )
        return result

    def pseudonym_of_case(self, case_id: str) -> str:
        for r in self.rows:
            if r["case_id"] == case_id:
                return r["pseudonym"]
        raise KeyError(case_id)

    def save(self) -> None:
        """Write the key atomically, readable by its owner only."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(
            os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w", newline="", encoding="utf-8"
        ) as f:
            writer = csv.DictWriter(f, fieldnames=self.COLUMNS)
            writer.writeheader()
            writer.writerows(self.rows)
        os.replace(tmp, self.path)


# ----------------------------------------------------------------------------------------------
# Dataset folder
# ----------------------------------------------------------------------------------------------

_DATASET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


def resolve_raw_dir(raw_dir: str | Path | None) -> Path:
    """``raw_dir`` if given, else ``$nnUNet_raw``; an error that names ``-o`` when neither is set."""
    if raw_dir:
        return Path(raw_dir).expanduser().resolve()
    env = os.environ.get("nnUNet_raw")
    if env:
        return Path(env).expanduser().resolve()
    raise ConversionError("no output folder: pass -o RAW_DIR or set the environment variable nnUNet_raw")


def dataset_folder_name(dataset_id: int, name: str) -> str:
    """``DatasetXXX_Name``; checks the ID (1-999) and that the name is a plain identifier."""
    if not isinstance(dataset_id, int) or not 1 <= dataset_id <= 999:
        raise ConversionError(f"dataset ID must be an integer from 1 to 999 (-d), got {dataset_id!r}")
    if not _DATASET_NAME.match(name or ""):
        raise ConversionError(
            f"dataset name (-n) {name!r} must start with a letter or digit and contain only letters, "
            "digits, '_' and '-'"
        )
    return f"Dataset{dataset_id:03d}_{name}"


def _folders_with_id(dataset_id: int) -> list[Path]:
    """Folders named DatasetXXX_* in nnU-Net's raw, preprocessed and results folders (those set)."""
    found = []
    for env in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        root = os.environ.get(env)
        if root and Path(root).is_dir():
            found += [
                p
                for p in Path(root).iterdir()
                if p.is_dir() and p.name.startswith(f"Dataset{dataset_id:03d}_")
            ]
    return found


def check_dataset_id_free(raw_dir: Path, dataset_id: int, name: str) -> None:
    """Refuse a dataset ID that nnU-Net already knows under another name.

    Looks in ``raw_dir`` and in ``$nnUNet_raw``/``$nnUNet_preprocessed``/``$nnUNet_results``, the
    folders nnU-Net searches when it turns ``-d ID`` into a dataset name.
    """
    wanted = dataset_folder_name(dataset_id, name)
    candidates = [p for p in raw_dir.iterdir() if p.is_dir()] if raw_dir.is_dir() else []
    candidates = [p for p in candidates if p.name.startswith(f"Dataset{dataset_id:03d}_")] + _folders_with_id(
        dataset_id
    )
    clashes = sorted({str(p) for p in candidates if p.name != wanted})
    if clashes:
        raise ConversionError(
            f"dataset ID {dataset_id} is already used by {', '.join(clashes)}; refusing to create {wanted} "
            "(nnU-Net needs one name per ID): pick another -d or remove the old dataset"
        )


@dataclass
class DatasetSpec:
    """Where a dataset goes and what its dataset.json says.

    labels: nnU-Net's ``labels`` (name -> consecutive ints, background 0).
    pet_norm: the PET channel name, one of :data:`PET_NORMALIZATIONS`.
    extra_json: more keys for dataset.json (source, tracer, licence, ...).
    """

    raw_dir: Path
    dataset_id: int
    name: str
    labels: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_LABELS))
    pet_norm: str = DEFAULT_PET_NORM
    description: str = ""
    extra_json: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.raw_dir = Path(self.raw_dir)
        if self.pet_norm not in PET_NORMALIZATIONS:
            raise ConversionError(
                f"--pet-norm must be one of {sorted(PET_NORMALIZATIONS)}, got {self.pet_norm!r}"
            )
        values = sorted(self.labels.values())
        if values != list(range(len(values))) or self.labels.get("background") != 0:
            raise ConversionError(
                f"labels must map names to consecutive integers with background 0, got {self.labels}"
            )

    @property
    def folder_name(self) -> str:
        return dataset_folder_name(self.dataset_id, self.name)

    @property
    def dataset_dir(self) -> Path:
        return self.raw_dir / self.folder_name


def _images_path(dataset_dir: Path, case_id: str, channel: int) -> Path:
    return dataset_dir / "imagesTr" / f"{case_id}_{channel:04d}{FILE_ENDING}"


def _label_path(dataset_dir: Path, case_id: str) -> Path:
    return dataset_dir / "labelsTr" / f"{case_id}{FILE_ENDING}"


def _record_path(dataset_dir: Path, case_id: str) -> Path:
    return dataset_dir / BOOKKEEPING_DIR / "cases" / f"{case_id}.json"


def _marker_path(dataset_dir: Path, case_id: str) -> Path:
    return dataset_dir / BOOKKEEPING_DIR / "in_progress" / case_id


def _staging_dir(dataset_dir: Path) -> Path:
    return dataset_dir / BOOKKEEPING_DIR / "staging"


def _case_files(dataset_dir: Path, case_id: str) -> list[Path]:
    return [
        _images_path(dataset_dir, case_id, CT_CHANNEL),
        _images_path(dataset_dir, case_id, PET_CHANNEL),
        _label_path(dataset_dir, case_id),
    ]


def is_case_finished(dataset_dir: Path, case_id: str) -> bool:
    """All three files and the record present, no in-progress marker left."""
    return (
        all(p.is_file() for p in _case_files(dataset_dir, case_id))
        and _record_path(dataset_dir, case_id).is_file()
        and not _marker_path(dataset_dir, case_id).exists()
    )


def prepare_dataset_dir(spec: DatasetSpec) -> Path:
    """Create (or reopen) the dataset folder and roll back what an interrupted run left.

    Refuses a dataset ID used under another name. Cases with an in-progress marker lose every file
    the marker's run had moved into place; the staging folder is emptied. Files this package did
    not write are never touched.
    """
    check_dataset_id_free(spec.raw_dir, spec.dataset_id, spec.name)
    dataset_dir = spec.dataset_dir
    for sub in ("imagesTr", "labelsTr", f"{BOOKKEEPING_DIR}/cases", f"{BOOKKEEPING_DIR}/in_progress"):
        (dataset_dir / sub).mkdir(parents=True, exist_ok=True)
    shutil.rmtree(_staging_dir(dataset_dir), ignore_errors=True)
    for marker in sorted((dataset_dir / BOOKKEEPING_DIR / "in_progress").iterdir()):
        case_id = marker.name
        logger.warning("case %s was interrupted during writing: removing its partial files", case_id)
        for path in [*_case_files(dataset_dir, case_id), _record_path(dataset_dir, case_id)]:
            path.unlink(missing_ok=True)
        marker.unlink()
    return dataset_dir


def finished_case_ids(dataset_dir: Path) -> list[str]:
    """Case IDs in labelsTr with both image channels (whoever wrote them), sorted."""
    labels = sorted(p.name[: -len(FILE_ENDING)] for p in (dataset_dir / "labelsTr").glob(f"*{FILE_ENDING}"))
    return [
        c
        for c in labels
        if all(_images_path(dataset_dir, c, ch).is_file() for ch in (CT_CHANNEL, PET_CHANNEL))
    ]


# ----------------------------------------------------------------------------------------------
# Geometry, statistics
# ----------------------------------------------------------------------------------------------

# NIfTI stores geometry as float32, so headers agree to ~1e-5 mm when they agree at all.
GEOMETRY_ATOL = 1e-4


def describe_geometry(image: sitk.Image) -> str:
    return (
        f"size {tuple(image.GetSize())}, spacing {tuple(round(s, 5) for s in image.GetSpacing())} mm, "
        f"origin {tuple(round(o, 4) for o in image.GetOrigin())} mm, "
        f"direction {tuple(round(d, 4) for d in image.GetDirection())}"
    )


def geometry_mismatch(image: sitk.Image, reference: sitk.Image, atol: float = GEOMETRY_ATOL) -> str | None:
    """``None`` when both share size, spacing, origin and direction (within ``atol``), else what differs."""
    if tuple(image.GetSize()) != tuple(reference.GetSize()):
        return f"size {tuple(image.GetSize())} != {tuple(reference.GetSize())}"
    for what, a, b in (
        ("spacing", image.GetSpacing(), reference.GetSpacing()),
        ("origin", image.GetOrigin(), reference.GetOrigin()),
        ("direction", image.GetDirection(), reference.GetDirection()),
    ):
        if not np.allclose(a, b, rtol=0, atol=atol):
            return f"{what} {tuple(round(v, 5) for v in a)} != {tuple(round(v, 5) for v in b)}"
    return None


def snap_to_grid(
    image: sitk.Image, reference: sitk.Image, what: str, case_id: str, atol_mm: float = 1e-2
) -> sitk.Image:
    """``image`` with ``reference``'s geometry copied over, when the two grids are the same up to
    ``atol_mm`` of rounding (files written by different tools); else a :class:`ConversionError`.

    Use this for inputs that are meant to be on the PET grid already (autoPET ``CTres``); resample
    everything else.
    """
    problem = geometry_mismatch(image, reference, atol=atol_mm)
    if problem:
        raise ConversionError(f"case {case_id}: {what} is not on the PET grid ({problem})")
    import SimpleITK as sitk

    snapped = sitk.Image(image)
    snapped.CopyInformation(reference)
    return snapped


def read_image(path: Path, what: str, case_id: str) -> sitk.Image:
    """Read a 3D image (NIfTI, MHA, NRRD...) or raise a :class:`ConversionError` naming the case and file."""
    import SimpleITK as sitk

    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"case {case_id}: {what} file not found: {path}")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise ConversionError(
            f"case {case_id}: cannot read {what} {path}: {str(e).strip().splitlines()[-1]}"
        ) from e
    if image.GetDimension() == 4 and image.GetSize()[3] == 1:  # some writers add a singleton time axis
        image = image[:, :, :, 0]
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise ConversionError(
            f"case {case_id}: {what} {path} is not a 3D scalar image (size {image.GetSize()})"
        )
    return image


def lesion_statistics(label: np.ndarray, spacing_mm: Sequence[float]) -> tuple[int, float]:
    """(number of lesions, total lesion volume in ml) of a label map (any value > 0 is lesion).

    Lesions are 18-connected components of the foreground, as in the autoPET evaluation and in
    :mod:`nnunetv2_l1dfl.conversion.resample`; ``spacing_mm`` in any axis order (only its product
    is used).
    """
    import cc3d

    from nnunetv2_l1dfl.conversion.resample import LESION_CONNECTIVITY

    foreground = np.ascontiguousarray(label > 0)
    n_lesions = (
        int(cc3d.connected_components(foreground, connectivity=LESION_CONNECTIVITY, return_N=True)[1])
        if foreground.any()
        else 0
    )
    tmtv_ml = float(foreground.sum()) * float(np.prod(spacing_mm)) / 1000.0
    return n_lesions, tmtv_ml


# Below this fraction of the PET field of view covered by the CT, the case gets a warning.
MIN_CT_COVERAGE = 0.98


def place_on_pet_grid(
    ct: sitk.Image, label: sitk.Image, pet: sitk.Image, case_id: str
) -> tuple[sitk.Image, sitk.Image, list[str]]:
    """CT and label on the PET grid, with the warnings the metadata table should carry.

    CT: copied through when already on the PET grid (within 0.01 mm of rounding), else resampled
    linearly with -1024 HU outside its field of view; a warning when it covers less than
    :data:`MIN_CT_COVERAGE` of the PET. Label: resampled per label as a fraction map thresholded at
    0.5 (:func:`~nnunetv2_l1dfl.conversion.resample.resample_mask_to`); warnings for lesions lost
    or kept only as one voxel, and when lesions merged (fewer after than before, beyond those lost).
    Returns (ct float32, label uint8, warnings).
    """
    from nnunetv2_l1dfl.conversion.resample import ct_coverage_fraction, resample_ct_to, resample_mask_to

    warnings = []
    if geometry_mismatch(ct, pet, atol=1e-2) is None:
        ct_on_pet = snap_to_grid(ct, pet, "CT", case_id)
    else:
        coverage = ct_coverage_fraction(ct, pet)
        if coverage < MIN_CT_COVERAGE:
            warnings.append(
                f"CT not covering PET: the CT covers {100 * coverage:.1f}% of the PET field of view "
                "(filled with -1024 HU outside)"
            )
        ct_on_pet = resample_ct_to(ct, pet)
    if geometry_mismatch(label, pet, atol=1e-2) is None:
        label = snap_to_grid(label, pet, "label", case_id)
    label_on_pet, report = resample_mask_to(label, pet)
    if report.lost_lesions:
        warnings.append(
            f"lesion lost in resampling: {report.lost_lesions} of {report.lesions_before} lesions have no voxel on the PET grid"
        )
    if report.rescued_lesions:
        warnings.append(
            f"{report.rescued_lesions} lesion(s) smaller than a PET voxel kept as a single voxel on the PET grid"
        )
    if report.merged_lesions:
        warnings.append(
            f"lesions merged in resampling: {report.lesions_before} lesions before, {report.lesions_after} after "
            f"on the PET grid ({report.merged_lesions} merged with a neighbour, {report.lost_lesions} lost)"
        )
    return ct_on_pet, label_on_pet, warnings


def suv_warnings(suv_max: float) -> list[str]:
    low, high = PLAUSIBLE_SUV_MAX
    if not low <= suv_max <= high:
        return [
            f"SUV out of plausible range: max SUV {suv_max:.3g} outside [{low:g}, {high:g}] "
            "(check dose and weight units, and that the PET is in SUV)"
        ]
    return []


# ----------------------------------------------------------------------------------------------
# One case
# ----------------------------------------------------------------------------------------------


@dataclass
class LoadedCase:
    """A case ready to write: three images on one grid plus what the metadata table needs.

    ct: CT in HU on the PET grid; pet: SUVbw; label: integer label map on the PET grid (values from
    the dataset's ``labels``). metadata: ``patient``, ``study_date``, ``tracer``, ``scanner``,
    ``suv_branch``, ``source`` (missing keys are left blank). warnings: what the loader noticed
    (lesion lost in resampling, CT not covering the PET, ...).
    """

    ct: sitk.Image
    pet: sitk.Image
    label: sitk.Image
    metadata: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class CaseJob:
    """One case to convert: its ID, the patient key used for splits, and the loader's input.

    source: a short human-readable description of the input (folder, series UID) for messages.
    payload: whatever the converter's ``load_case`` needs; must be picklable for ``-np`` > 1.
    """

    case_id: str
    patient: str
    source: str
    payload: Any = None


def _write_json_atomic(data: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False), encoding="utf-8")
    os.replace(tmp, path)


def _read_geometry(path: Path) -> sitk.ImageFileReader:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return reader


def check_written_geometry(paths: Sequence[Path], case_id: str) -> None:
    """Read the headers of a case's files back and require one geometry for all of them.

    nnU-Net errors on shape or spacing mismatches but only warns about origin and direction, so
    this is the check that catches a label shifted against its images.
    """
    readers = [_read_geometry(p) for p in paths]
    ref = readers[0]
    for path, r in zip(paths[1:], readers[1:]):
        for what, a, b in (
            ("size", r.GetSize(), ref.GetSize()),
            ("spacing", r.GetSpacing(), ref.GetSpacing()),
            ("origin", r.GetOrigin(), ref.GetOrigin()),
            ("direction", r.GetDirection(), ref.GetDirection()),
        ):
            if not np.allclose(a, b, rtol=0, atol=GEOMETRY_ATOL):
                raise ConversionError(
                    f"case {case_id}: {path.name} {what} {tuple(a)} differs from {paths[0].name} {tuple(b)}"
                )


def write_case(
    dataset_dir: Path, case_id: str, case: LoadedCase, labels: Mapping[str, int], patient: str
) -> dict[str, Any]:
    """Write one case atomically and return its metadata record (a row of the metadata table).

    CT and PET are written as float32, the label as uint8; all three must already share the PET
    geometry (within :data:`GEOMETRY_ATOL`; tiny differences are snapped to the PET header).
    Raises :class:`ConversionError` naming the case for NaNs, labels outside ``labels`` or a
    geometry mismatch, before anything is moved into the dataset.
    """
    import SimpleITK as sitk

    pet = case.pet
    if pet.GetDimension() != 3 or pet.GetNumberOfComponentsPerPixel() != 1:
        raise ConversionError(f"case {case_id}: PET must be a 3D scalar image, got {pet.GetDimension()}D")
    for what, image in (("CT", case.ct), ("label", case.label)):
        problem = geometry_mismatch(image, pet)
        if problem:
            raise ConversionError(f"case {case_id}: {what} is not on the PET grid ({problem})")
    ct = sitk.Cast(case.ct, sitk.sitkFloat32)
    ct.CopyInformation(pet)
    pet32 = sitk.Cast(pet, sitk.sitkFloat32)
    label_array = sitk.GetArrayViewFromImage(case.label)
    if np.issubdtype(label_array.dtype, np.floating) and not np.all(np.mod(label_array, 1) == 0):
        raise ConversionError(f"case {case_id}: label has non-integer values")
    allowed = set(int(v) for v in labels.values())
    found = set(int(v) for v in np.unique(label_array))
    if not found <= allowed:
        raise ConversionError(
            f"case {case_id}: label values {sorted(found - allowed)} are not in the dataset labels {dict(labels)}"
        )
    label = sitk.Cast(case.label, sitk.sitkUInt8)
    label.CopyInformation(pet)

    pet_array = sitk.GetArrayViewFromImage(pet32)
    for what, array in (("PET", pet_array), ("CT", sitk.GetArrayViewFromImage(ct))):
        if not np.all(np.isfinite(array)):
            raise ConversionError(f"case {case_id}: {what} contains NaN or infinite values")

    spacing = pet.GetSpacing()
    n_lesions, tmtv_ml = lesion_statistics(label_array, spacing)
    suv_max = float(pet_array.max())
    metadata = dict(case.metadata)
    record = {
        "case_id": case_id,
        "patient": patient,
        "study_date": normalize_study_date(metadata.get("study_date")) or "",
        "tracer": metadata.get("tracer", ""),
        "scanner": metadata.get("scanner", ""),
        "suv_branch": metadata.get("suv_branch", ""),
        "spacing_mm": "x".join(f"{s:.4g}" for s in spacing),
        "shape": "x".join(str(s) for s in pet.GetSize()),
        "n_lesions": n_lesions,
        "tmtv_ml": round(tmtv_ml, 3),
        "suv_max": round(suv_max, 3),
        "warnings": [*case.warnings, *suv_warnings(suv_max)],
        "source": metadata.get("source", ""),
    }

    staging = _staging_dir(dataset_dir) / case_id
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    targets = _case_files(dataset_dir, case_id)
    staged = [staging / p.name for p in targets]
    for image, path in zip((ct, pet32, label), staged):
        sitk.WriteImage(image, str(path), useCompression=True)
    check_written_geometry(staged, case_id)
    _write_json_atomic(record, staging / "record.json")

    # Into place: marker first, label last, marker removed; an interruption is rolled back on resume.
    marker = _marker_path(dataset_dir, case_id)
    marker.write_text("", encoding="utf-8")
    os.replace(staged[0], targets[0])
    os.replace(staged[1], targets[1])
    os.replace(staging / "record.json", _record_path(dataset_dir, case_id))
    os.replace(staged[2], targets[2])
    marker.unlink()
    shutil.rmtree(staging, ignore_errors=True)
    return record


# ----------------------------------------------------------------------------------------------
# dataset.json, metadata table
# ----------------------------------------------------------------------------------------------


def write_dataset_json(spec: DatasetSpec) -> dict[str, Any]:
    """dataset.json for the cases on disk (``numTraining`` counts finished cases)."""
    from nnunetv2_l1dfl import __version__

    dataset_dir = spec.dataset_dir
    dataset_json = {
        "channel_names": {str(CT_CHANNEL): "CT", str(PET_CHANNEL): spec.pet_norm},
        "labels": dict(spec.labels),
        "numTraining": len(finished_case_ids(dataset_dir)),
        "file_ending": FILE_ENDING,
        "name": spec.name,
        "description": spec.description,
        "channel_modalities": dict(CHANNEL_MODALITIES),
        "pet_normalization": f"{spec.pet_norm}: {PET_NORMALIZATIONS[spec.pet_norm]}",
        "converted_by": f"nnunetv2-l1dfl {__version__}",
        "case_metadata": METADATA_FILE,
        **spec.extra_json,
    }
    _write_json_atomic(dataset_json, dataset_dir / "dataset.json")
    return dataset_json


def read_records(dataset_dir: Path) -> list[dict[str, Any]]:
    """The per-case records of the finished cases, sorted by case ID."""
    records = []
    for case_id in finished_case_ids(dataset_dir):
        path = _record_path(dataset_dir, case_id)
        if path.is_file():
            records.append(json.loads(path.read_text(encoding="utf-8")))
    return records


def write_metadata_table(dataset_dir: Path) -> Path:
    """``case_metadata.csv``: one row per finished case, warnings joined by ``" | "``."""
    path = dataset_dir / METADATA_FILE
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=METADATA_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for record in read_records(dataset_dir):
            row = dict(record)
            row["warnings"] = " | ".join(record.get("warnings", []))
            writer.writerow(row)
    os.replace(tmp, path)
    return path


def read_metadata_table(dataset_dir: Path) -> list[dict[str, str]]:
    path = Path(dataset_dir) / METADATA_FILE
    if not path.is_file():
        raise ConversionError(
            f"no {METADATA_FILE} in {dataset_dir}: was this dataset written by l1dfl convert?"
        )
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------------------------
# Splits
# ----------------------------------------------------------------------------------------------


def make_patient_splits(case_patients: Mapping[str, str], n_folds: int = 5) -> list[dict[str, list[str]]]:
    """nnU-Net's ``splits_final.json`` content with all studies of a patient in one fold.

    case_patients: case ID -> patient key. Patients go, largest first (ties by a hash of the key,
    so the order does not follow the IDs' alphabet), to the fold with the fewest cases so far;
    the result depends only on the mapping. Raises when there are fewer patients than folds.
    """
    if n_folds < 2:
        raise ValueError(f"n_folds must be >= 2, got {n_folds}")
    by_patient: dict[str, list[str]] = {}
    for case_id, patient in case_patients.items():
        by_patient.setdefault(patient, []).append(case_id)
    if len(by_patient) < n_folds:
        raise ConversionError(
            f"{len(by_patient)} patients cannot fill {n_folds} folds with one patient's studies in one fold"
        )
    folds: list[list[str]] = [[] for _ in range(n_folds)]
    order = sorted(by_patient, key=lambda p: (-len(by_patient[p]), _short_hash(p, 16), p))
    for patient in order:
        target = min(range(n_folds), key=lambda i: (len(folds[i]), i))
        folds[target].extend(by_patient[patient])
    all_cases = sorted(case_patients)
    return [{"train": [c for c in all_cases if c not in set(f)], "val": sorted(f)} for f in folds]


def write_splits(
    dataset_folder_name: str, splits: list[dict[str, list[str]]], preprocessed_dir: str | Path | None = None
) -> Path:
    """Write ``splits_final.json`` into ``<nnUNet_preprocessed>/<DatasetXXX_Name>/``."""
    root = preprocessed_dir or os.environ.get("nnUNet_preprocessed")
    if not root:
        raise ConversionError(
            "cannot write splits_final.json: set nnUNet_preprocessed (or pass --preprocessed-dir)"
        )
    folder = Path(root) / dataset_folder_name
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "splits_final.json"
    _write_json_atomic(splits, path)
    return path


def splits_for_dataset(dataset_dir: Path, n_folds: int = 5) -> list[dict[str, list[str]]]:
    """Patient-grouped splits of a converted dataset, from its metadata table."""
    rows = read_metadata_table(dataset_dir)
    finished = set(finished_case_ids(dataset_dir))
    case_patients = {r["case_id"]: r["patient"] or r["case_id"] for r in rows if r["case_id"] in finished}
    missing = finished - set(case_patients)
    for case_id in missing:  # cases not written by us: each its own patient
        case_patients[case_id] = case_id
    return make_patient_splits(case_patients, n_folds)


# ----------------------------------------------------------------------------------------------
# Running a conversion
# ----------------------------------------------------------------------------------------------


@dataclass
class ConversionSummary:
    dataset_dir: Path
    converted: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    n_warnings: int = 0
    num_training: int = 0
    metadata_table: Path | None = None
    splits_file: Path | None = None

    def line(self) -> str:
        return (
            f"{self.dataset_dir}: {len(self.converted)} converted, {len(self.skipped)} already done, "
            f"{len(self.failed)} failed, {self.n_warnings} with warnings; numTraining {self.num_training}"
        )


def _convert_one(
    load_case: Callable[[CaseJob], LoadedCase], job: CaseJob, dataset_dir: str, labels: dict[str, int]
) -> tuple[str, Any]:
    """Worker: load and write one case; never raises, returns ("ok", record) or ("failed", reason)."""
    try:
        case = load_case(job)
        return "ok", write_case(Path(dataset_dir), job.case_id, case, labels, job.patient)
    except Exception as e:  # a failing case must not stop the run: report it with its reason
        logger.debug("case %s failed", job.case_id, exc_info=True)
        reason = str(e) if isinstance(e, ConversionError) else f"{type(e).__name__}: {e}"
        return "failed", reason


def convert_cases(
    jobs: Sequence[CaseJob],
    load_case: Callable[[CaseJob], LoadedCase],
    spec: DatasetSpec,
    *,
    num_processes: int = 1,
    overwrite: bool = False,
    failed_before: Mapping[str, str] | None = None,
    progress: bool = True,
) -> ConversionSummary:
    """Convert every job into ``spec``'s dataset; write dataset.json and the metadata table.

    Finished cases are skipped unless ``overwrite``; ``num_processes`` > 1 uses that many worker
    processes (spawned: ``load_case`` must be a module-level function). ``failed_before`` holds
    cases the converter already could not turn into a job (reported alongside). Never raises for
    a single case; see ``summary.failed``.
    """
    from tqdm import tqdm

    case_ids = [j.case_id for j in jobs]
    duplicates = sorted({c for c in case_ids if case_ids.count(c) > 1})
    if duplicates:
        raise ConversionError(f"duplicate case IDs {duplicates}: the converter produced the same ID twice")
    dataset_dir = prepare_dataset_dir(spec)
    summary = ConversionSummary(dataset_dir=dataset_dir, failed=dict(failed_before or {}))
    todo = []
    for job in jobs:
        if not overwrite and is_case_finished(dataset_dir, job.case_id):
            summary.skipped.append(job.case_id)
        else:
            todo.append(job)
    foreign = sorted(set(finished_case_ids(dataset_dir)) - set(case_ids) - set(summary.failed))
    if foreign:
        logger.warning(
            "%d case(s) in %s are not produced by this run and stay in the dataset (delete them by hand if "
            "they are stale): %s",
            len(foreign), dataset_dir, ", ".join(foreign[:10]) + (" ..." if len(foreign) > 10 else ""),
        )  # fmt: skip

    def handle(job: CaseJob, status: str, result: Any) -> None:
        if status == "ok":
            summary.converted.append(job.case_id)
            for warning in result["warnings"]:
                logger.warning("case %s: %s", job.case_id, warning)
        else:
            summary.failed[job.case_id] = result
            logger.error("case %s (%s) failed: %s", job.case_id, job.source, result)

    bar = tqdm(
        total=len(todo),
        desc=f"converting into {spec.folder_name}",
        unit="case",
        disable=not progress or not todo,
    )
    labels = dict(spec.labels)
    if num_processes <= 1 or len(todo) <= 1:
        for job in todo:
            handle(job, *_convert_one(load_case, job, str(dataset_dir), labels))
            bar.update()
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        # spawn, not fork: SimpleITK's and ITK's thread pools do not survive a fork reliably.
        with ProcessPoolExecutor(
            max_workers=num_processes, mp_context=multiprocessing.get_context("spawn")
        ) as pool:
            futures = {
                pool.submit(_convert_one, load_case, job, str(dataset_dir), labels): job for job in todo
            }
            for future in as_completed(futures):
                handle(futures[future], *future.result())
                bar.update()
    bar.close()

    summary.converted.sort()
    summary.metadata_table = write_metadata_table(dataset_dir)
    records = read_records(dataset_dir)
    summary.n_warnings = sum(1 for r in records if r.get("warnings"))
    summary.num_training = write_dataset_json(spec)["numTraining"]
    return summary
