"""The dataset folder of a two-channel PET/CT nnU-Net v2 raw dataset, and writing one case into it.

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
  ``nnUNetv2_plan_and_preprocess --verify_dataset_integrity``), with lesion count, TMTV and warnings.

Book-keeping lives in ``DatasetXXX_Name/.l1dfl/`` (per-case records as JSON, in-progress markers,
staging); nnU-Net never looks there. The run loop over many cases is :mod:`.runner`.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import errno
import json
import logging
import os
import re
import shutil
import socket
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from nnunetv2_l1dfl.conversion.case_ids import normalize_study_date
from nnunetv2_l1dfl.conversion.errors import ConversionError, OutputError
from nnunetv2_l1dfl.conversion.geometry import GEOMETRY_ATOL, geometry_mismatch

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

# The SUVmax bounds a written case must respect live with the SUV conversion:
# nnunetv2_l1dfl.conversion.suv.PLAUSIBLE_SUV_MAX (why: docs/suv.md).

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


# ----------------------------------------------------------------------------------------------
# Dataset folder
# ----------------------------------------------------------------------------------------------

_DATASET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


def resolve_raw_dir(raw_dir: str | Path | None) -> Path:
    """``raw_dir`` if given, else ``$nnUNet_raw``; an error that names ``-o`` when neither is set."""
    if raw_dir:
        path, what = Path(raw_dir).expanduser().resolve(), "-o"
    elif os.environ.get("nnUNet_raw"):
        path, what = Path(os.environ["nnUNet_raw"]).expanduser().resolve(), "nnUNet_raw"
    else:
        raise ConversionError("no output folder: pass -o RAW_DIR or set the environment variable nnUNet_raw")
    if path.exists() and not path.is_dir():
        raise ConversionError(f"{what} {path} is not a folder (a file of that name exists): pass the nnU-Net raw folder")
    return path


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


# ----------------------------------------------------------------------------------------------
# Lock: one conversion at a time per dataset folder
# ----------------------------------------------------------------------------------------------

LOCK_FILE = "lock"
# Locks this process holds: dataset folder -> [file descriptor, depth] (re-entrant per process, so
# the CLI can take the lock before the converter runs and convert_cases can take it again).
_HELD_LOCKS: dict[Path, list[int]] = {}


def lock_path(dataset_dir: Path) -> Path:
    return Path(dataset_dir) / BOOKKEEPING_DIR / LOCK_FILE


def _read_lock_info(fd: int) -> dict[str, Any]:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 65536).decode("utf-8", "replace").strip()
    if not text:
        return {}
    try:
        info = json.loads(text)
    except ValueError:
        return {"command": text[:200]}
    return info if isinstance(info, dict) else {}


def _describe_holder(info: Mapping[str, Any]) -> str:
    return (
        f"PID {info.get('pid', '?')} on {info.get('host', '?')} since {info.get('started', '?')} "
        f"({info.get('command', '?')})"
    )


def _pid_running(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except (TypeError, ValueError, OverflowError):
        return False
    return True


def _folder_holds_only_the_lock(dataset_dir: Path) -> bool:
    for root, _, files in os.walk(dataset_dir):
        if any(Path(root, f) != lock_path(dataset_dir) for f in files):
            return False
    return True


@contextlib.contextmanager
def lock_dataset(spec: DatasetSpec, command: str | None = None) -> Iterator[Path]:
    """Hold the dataset folder for one conversion; refuse, naming the holder, when another has it.

    The lock is an exclusive ``flock`` on ``DatasetXXX_Name/.l1dfl/lock``, whose content names the
    holder (PID, host, start time, command; no input paths, which may carry patient names). The
    kernel drops a flock when its process dies, however it dies, so a lock file that still names a
    holder while the flock is free belongs to a killed run: it is taken over with a warning, and
    :func:`prepare_dataset_dir` then rolls back what that run left. On a file system without flock
    (some network file systems) the PID is checked instead: a holder still running, or on another
    host, refuses; a dead one on this host is reported with how to clear the lock.

    Checks the dataset ID first (:func:`check_dataset_id_free`), so a refused ID creates nothing;
    a dataset folder this call created and nothing else filled is removed again on release.
    Re-entrant within one process. Yields the dataset folder.
    """
    check_dataset_id_free(spec.raw_dir, spec.dataset_id, spec.name)
    dataset_dir = spec.dataset_dir
    key = dataset_dir.resolve()
    if key in _HELD_LOCKS:
        _HELD_LOCKS[key][1] += 1
        try:
            yield dataset_dir
        finally:
            _HELD_LOCKS[key][1] -= 1
        return
    import fcntl

    created = not dataset_dir.exists()
    path = lock_path(dataset_dir)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise ConversionError(f"cannot lock {dataset_dir}: {e.strerror or e}: {e.filename or path}") from e
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            have_flock = True
        except BlockingIOError:
            raise ConversionError(
                f"{dataset_dir} is being written by another conversion: {_describe_holder(_read_lock_info(fd))}; "
                "wait until it has finished (two runs into one dataset delete each other's files)"
            ) from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            have_flock = False
        previous = _read_lock_info(fd)
        if previous and have_flock:
            logger.warning(
                "the conversion %s that held %s is not running any more but did not release it (killed?): "
                "taking the lock over; what it left half-written is removed",
                _describe_holder(previous), path,
            )  # fmt: skip
        elif previous:
            here = previous.get("host") == socket.gethostname()
            if here and not _pid_running(previous.get("pid")):
                raise ConversionError(
                    f"{path}: stale lock of {_describe_holder(previous)}, which is not running any more; this file "
                    f"system has no flock, so the lock is not taken over automatically: if no conversion into "
                    f"{dataset_dir} is running, delete {path} and run again"
                )
            raise ConversionError(
                f"{dataset_dir} is being written by another conversion: {_describe_holder(previous)}; wait until "
                f"it has finished (if it is gone, delete {path})"
            )
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": command or Path(sys.argv[0]).name,
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode("utf-8"), 0)
    except OSError as e:
        os.close(fd)
        raise ConversionError(f"cannot lock {dataset_dir}: {e.strerror or e}: {path}") from e
    except BaseException:
        os.close(fd)
        raise
    _HELD_LOCKS[key] = [fd, 1]
    try:
        yield dataset_dir
    finally:
        del _HELD_LOCKS[key]
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)  # released: the file no longer names a holder
        os.close(fd)
        if created and _folder_holds_only_the_lock(dataset_dir):
            shutil.rmtree(dataset_dir, ignore_errors=True)


def prepare_dataset_dir(spec: DatasetSpec) -> Path:
    """Create (or reopen) the dataset folder and roll back what an interrupted run left.

    Refuses a dataset ID used under another name. Cases with an in-progress marker lose every file
    the marker's run had moved into place; the staging folder is emptied. Files this package did
    not write are never touched. Call it holding :func:`lock_dataset` (it empties the staging
    folder, which a running conversion writes into).
    """
    check_dataset_id_free(spec.raw_dir, spec.dataset_id, spec.name)
    dataset_dir = spec.dataset_dir
    if dataset_dir.resolve() not in _HELD_LOCKS:
        logger.debug("prepare_dataset_dir(%s) without the dataset lock", dataset_dir)
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
    """Case IDs in labelsTr with both image channels (whoever wrote them) and no in-progress
    marker (a case being moved into place, or interrupted while it was), sorted."""
    labels = sorted(p.name[: -len(FILE_ENDING)] for p in (dataset_dir / "labelsTr").glob(f"*{FILE_ENDING}"))
    return [
        c
        for c in labels
        if all(_images_path(dataset_dir, c, ch).is_file() for ch in (CT_CHANNEL, PET_CHANNEL))
        and not _marker_path(dataset_dir, c).exists()
    ]


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



def suv_warnings(suv_max: float, case_id: str = "", allow_implausible_suv: bool = False) -> list[str]:
    """SUVmax of a case about to be written against the SUV conversion's bounds
    (:func:`nnunetv2_l1dfl.conversion.suv.suv_plausibility_problems`, docs/suv.md), so PET given in
    SUV (NIfTI sources) gets the check DICOM gets: [] when plausible; the problems as case warnings
    with ``allow_implausible_suv`` (``--allow-implausible-suv``); else :class:`ConversionError`."""
    from nnunetv2_l1dfl.conversion.suv import IMPLAUSIBLE_SUV_ACCEPTED, suv_plausibility_problems

    problems = suv_plausibility_problems(suv_max)
    if problems and not allow_implausible_suv:
        raise ConversionError(
            f"case {case_id}: implausible SUV: {'; '.join(problems)}. If it is right after all, convert anyway "
            "with --allow-implausible-suv (recorded as a case warning)"
        )
    return [f"{IMPLAUSIBLE_SUV_ACCEPTED}: {p}" for p in problems]


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


def write_atomic(path: Path, write: Callable[[Any], None], newline: str | None = None) -> None:
    """Write a text file by ``write(file)`` into ``<path>.tmp``, flushed to disk, then renamed over
    ``path``: readers see the old file or the new one, never a part. On failure (a full disk) the
    temporary file is removed and the old file is left as it was."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with tmp.open("w", encoding="utf-8", newline=newline) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(data: Any, path: Path) -> None:
    write_atomic(path, lambda f: f.write(json.dumps(data, indent=2, sort_keys=False)))


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
    geometry mismatch, before anything is moved into the dataset; :class:`OutputError` when the
    files cannot be written or do not read back as written (see :func:`_place_case`).
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
    # The loader passes --allow-implausible-suv as metadata; a DICOM PET was checked when read.
    checked = any(w.startswith("implausible SUV accepted") for w in case.warnings)
    suv_checks = [] if checked else suv_warnings(suv_max, case_id, bool(metadata.get("allow_implausible_suv")))
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
        "warnings": [*case.warnings, *suv_checks],
        "source": metadata.get("source", ""),
    }

    _place_case(dataset_dir, case_id, (ct, pet32, label), record)
    return record


def verify_written_image(path: Path, image: sitk.Image, case_id: str) -> None:
    """Read a written file back whole and require the voxels and geometry that were meant.

    SimpleITK does not raise when a write comes up short (a full disk, a quota): the file is then
    truncated and reads back zero-filled. The whole gzip stream is decompressed and checked against
    the header (:func:`~nnunetv2_l1dfl.conversion.image_io.nifti_problem`), then the voxels are
    compared with the image in memory; any difference is an :class:`OutputError`.
    """
    import SimpleITK as sitk

    from nnunetv2_l1dfl.conversion.image_io import nifti_problem

    problem = nifti_problem(path)
    if problem:
        raise OutputError(
            f"case {case_id}: {path.name} did not read back whole after writing ({problem}): disk full or "
            f"failing storage under {path.parent}"
        )
    back = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    meant = sitk.GetArrayViewFromImage(image)
    if back.dtype != meant.dtype or back.shape != meant.shape or not np.array_equal(back, meant):
        raise OutputError(
            f"case {case_id}: {path.name} reads back other voxels than were written "
            f"({back.dtype} {back.shape} vs {meant.dtype} {meant.shape}): failing storage under {path.parent}"
        )


def _output_error(case_id: str, e: OSError) -> OutputError:
    where = f" {e.filename}" if e.filename else ""
    return OutputError(f"case {case_id}: cannot write{where}: {e.strerror or e}")


def _place_case(dataset_dir: Path, case_id: str, images: Sequence[sitk.Image], record: dict[str, Any]) -> None:
    """Stage, verify and move one case's CT, PET and label (and its record) into the dataset.

    1. Write the three files into ``.l1dfl/staging/<case>/``, read each back whole and compare it
       with what was meant (:func:`verify_written_image`), check one geometry for all three.
    2. Marker ``.l1dfl/in_progress/<case>`` first; CT, PET, record, label renamed into place;
       marker removed. nnU-Net does not see the case before the next dataset.json lists it, and
       :func:`finished_case_ids` (hence dataset.json) skips a case with a marker.
    3. A failure in step 2 (an OSError) removes what was moved; a crash leaves the marker, and the
       next run's :func:`prepare_dataset_dir` removes the case's files.

    Every OSError and every file that does not read back is an :class:`OutputError`.
    """
    import SimpleITK as sitk

    staging = _staging_dir(dataset_dir) / case_id
    targets = _case_files(dataset_dir, case_id)
    staged = [staging / p.name for p in targets]
    try:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        for image, path in zip(images, staged):
            sitk.WriteImage(image, str(path), useCompression=True)
            verify_written_image(path, image, case_id)
        check_written_geometry(staged, case_id)
        write_json_atomic(record, staging / "record.json")
    except OSError as e:
        shutil.rmtree(staging, ignore_errors=True)
        raise _output_error(case_id, e) from e
    except Exception:
        shutil.rmtree(staging, ignore_errors=True)
        raise

    marker = _marker_path(dataset_dir, case_id)
    moves = [
        (staged[0], targets[0]),
        (staged[1], targets[1]),
        (staging / "record.json", _record_path(dataset_dir, case_id)),
        (staged[2], targets[2]),
    ]
    moved: list[Path] = []
    try:
        marker.write_text("", encoding="utf-8")
        for source, target in moves:
            os.replace(source, target)
            moved.append(target)
        marker.unlink()
    except OSError as e:
        try:  # take the case out again; the marker stays if that fails too, for the next run
            for target in moved:
                target.unlink(missing_ok=True)
            marker.unlink(missing_ok=True)
        except OSError:
            logger.warning("case %s: could not remove its partial files; the next run removes them", case_id)
        shutil.rmtree(staging, ignore_errors=True)
        raise _output_error(case_id, e) from e
    shutil.rmtree(staging, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# dataset.json, metadata table
# ----------------------------------------------------------------------------------------------


def dataset_listing(dataset_dir: Path, case_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
    """dataset.json's ``"dataset"`` entry: per case its image and label files, relative to the
    dataset folder. nnU-Net (2.x) enumerates exactly these cases when the key is present
    (``nnunetv2.utilities.utils.get_filenames_of_train_images_and_targets``) and ignores any other
    file in imagesTr/labelsTr, so a case is visible to it only once all its files are in place."""
    return {
        c: {
            "images": [f"imagesTr/{_images_path(dataset_dir, c, ch).name}" for ch in (CT_CHANNEL, PET_CHANNEL)],
            "label": f"labelsTr/{_label_path(dataset_dir, c).name}",
        }
        for c in case_ids
    }


def write_dataset_json(spec: DatasetSpec, exclude: Sequence[str] = ()) -> dict[str, Any]:
    """dataset.json listing the finished cases on disk except ``exclude`` (cases about to be
    rewritten), under ``"dataset"``; ``numTraining`` counts them. Written atomically."""
    from nnunetv2_l1dfl import __version__

    dataset_dir = spec.dataset_dir
    excluded = set(exclude)
    cases = [c for c in finished_case_ids(dataset_dir) if c not in excluded]
    dataset_json = {
        "channel_names": {str(CT_CHANNEL): "CT", str(PET_CHANNEL): spec.pet_norm},
        "labels": dict(spec.labels),
        "numTraining": len(cases),
        "file_ending": FILE_ENDING,
        "name": spec.name,
        "description": spec.description,
        "channel_modalities": dict(CHANNEL_MODALITIES),
        "pet_normalization": f"{spec.pet_norm}: {PET_NORMALIZATIONS[spec.pet_norm]}",
        "converted_by": f"nnunetv2-l1dfl {__version__}",
        "case_metadata": METADATA_FILE,
        **spec.extra_json,
        "dataset": dataset_listing(dataset_dir, cases),
    }
    write_json_atomic(dataset_json, dataset_dir / "dataset.json")
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
    records = read_records(dataset_dir)

    def write(f) -> None:
        writer = csv.DictWriter(f, fieldnames=METADATA_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for record in records:
            row = dict(record)
            row["warnings"] = " | ".join(record.get("warnings", []))
            writer.writerow(row)

    write_atomic(path, write, newline="")
    return path


def read_metadata_table(dataset_dir: Path) -> list[dict[str, str]]:
    path = Path(dataset_dir) / METADATA_FILE
    if not path.is_file():
        raise ConversionError(
            f"no {METADATA_FILE} in {dataset_dir}: was this dataset written by l1dfl convert?"
        )
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))

