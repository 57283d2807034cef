"""Finding and reading what ``l1dfl compare`` scores: nnU-Net fold validation folders or any
prediction folders, the GT and the PET channel; case pairing and geometry checks.

Two ways in:

- :func:`discover_nnunet_cases`: ``nnUNet_results/DatasetXXX_Name/{Trainer}__{Plans}__{Config}/
  fold_N/validation/<case><file_ending>`` for every requested fold (cross-validation: each case is
  predicted once, by the fold that held it out), GT from ``nnUNet_raw/DatasetXXX/labelsTr`` (else
  ``nnUNet_preprocessed/DatasetXXX/gt_segmentations``), PET from ``nnUNet_raw/DatasetXXX/imagesTr/
  <case>_{pet_channel:04d}<file_ending>``.
- :func:`discover_folder_cases`: any ``<case><file_ending>`` folders (e.g. a test set predicted
  with ``nnUNetv2_predict``), a GT folder and an nnU-Net images folder.

Probabilities for calibration are ``<case>.npz`` (key ``probabilities``) beside the predictions,
used when present. Every problem is raised as :class:`CompareInputError` naming the folder, file,
case or what differs.
"""

from __future__ import annotations

import json
import logging
import os
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

DEFAULT_FILE_ENDING = ".nii.gz"
DEFAULT_FOLDS = (0, 1, 2, 3, 4)
_MAX_LISTED = 20


class CompareInputError(ValueError):
    """The inputs cannot be compared as given; the message says which file, folder or case."""


def _listing(names: list[str]) -> str:
    names = sorted(names)
    shown = ", ".join(names[:_MAX_LISTED])
    return shown + (f", ... and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else "")


# ----------------------------------------------------------------------------- images


@dataclass(frozen=True)
class Geometry:
    """Image grid: ``shape`` and ``spacing_mm`` in array order (z, y, x); ``origin_mm`` and
    ``direction`` (row-major 3x3) in SimpleITK's physical (x, y, z) order."""

    shape: tuple[int, ...]
    spacing_mm: tuple[float, ...]
    origin_mm: tuple[float, ...]
    direction: tuple[float, ...]

    @classmethod
    def from_sitk(cls, image) -> Geometry:
        """From a SimpleITK image, or an ImageFileReader after ReadImageInformation()."""
        return cls(
            shape=tuple(int(s) for s in reversed(image.GetSize())),
            spacing_mm=tuple(float(s) for s in reversed(image.GetSpacing())),
            origin_mm=tuple(float(o) for o in image.GetOrigin()),
            direction=tuple(float(d) for d in image.GetDirection()),
        )

    def differences(self, other: Geometry, tolerance: float = 1e-3) -> list[str]:
        """What differs from ``other``: shape exactly; spacing and origin (mm) and direction
        cosines within an absolute ``tolerance``."""
        found = []
        if self.shape != other.shape:
            found.append(f"shape (z, y, x) {self.shape} vs {other.shape}")
        for name, mine, theirs in (
            ("spacing (z, y, x) mm", self.spacing_mm, other.spacing_mm),
            ("origin (x, y, z) mm", self.origin_mm, other.origin_mm),
            ("direction", self.direction, other.direction),
        ):
            if len(mine) != len(theirs) or not np.allclose(mine, theirs, rtol=0.0, atol=tolerance):
                found.append(f"{name} {_round(mine)} vs {_round(theirs)}")
        return found


def _round(values: tuple[float, ...]) -> tuple[float, ...]:
    return tuple(round(v, 6) for v in values)


def read_image(path: Path, kind: str = "label") -> tuple[np.ndarray, Geometry]:
    """Read a 3D image with SimpleITK as a (z, y, x) array and its geometry.

    ``kind="label"`` returns an integer array (a float file must hold whole numbers, none
    negative); ``kind="pet"`` returns float32. The file is read whole and finite by the converters'
    reader (:func:`nnunetv2_l1dfl.conversion.image_io.read_image`): a truncated or corrupt file and
    NaN / inf voxels are refused naming the file, not zero-filled as SimpleITK alone would.
    """
    import SimpleITK as sitk

    from nnunetv2_l1dfl.conversion.errors import ConversionError
    from nnunetv2_l1dfl.conversion.image_io import read_image as read_whole_image

    path = Path(path)
    try:
        image = read_whole_image(path, "PET" if kind == "pet" else "label image")
    except ConversionError as e:
        raise CompareInputError(str(e)) from e
    if kind == "pet":
        image = sitk.Cast(image, sitk.sitkFloat32)
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise CompareInputError(
            f"{path}: expected a 3D single-component image, got {image.GetDimension()}D with "
            f"{image.GetNumberOfComponentsPerPixel()} component(s)"
        )
    array = sitk.GetArrayFromImage(image)
    if kind == "label" and not np.issubdtype(array.dtype, np.integer):
        rounded = np.rint(array)
        if not np.array_equal(rounded, array):
            raise CompareInputError(f"{path}: label image holds non-integer values")
        array = rounded.astype(np.int32)
    if kind == "label" and array.size and array.min() < 0:
        negative = np.unique(array[array < 0])
        raise CompareInputError(
            f"{path}: label image holds negative values {negative[:5].tolist()} in {int((array < 0).sum())} "
            "voxel(s); labels are 0 (background) or positive"
        )
    return np.ascontiguousarray(array), Geometry.from_sitk(image)


def read_geometry(path: Path) -> Geometry:
    """Geometry from the image header only (no voxel data read)."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise CompareInputError(f"cannot read {path}: {str(e).strip().splitlines()[-1]}") from e
    return Geometry.from_sitk(reader)


def check_case_geometry(case: CaseFiles, tolerance: float = 1e-3) -> None:
    """Compare the headers of a case's PET and predictions with its GT; raises
    :class:`CompareInputError` naming the files and what differs."""
    reference = (case.gt, read_geometry(case.gt))
    for path in (case.pet, *case.predictions.values()):
        check_geometry(reference, (path, read_geometry(path)), tolerance)


def check_geometry(reference: tuple[Path, Geometry], other: tuple[Path, Geometry], tolerance: float = 1e-3) -> None:
    """Raise :class:`CompareInputError` naming both files and what differs, if anything does."""
    differences = reference[1].differences(other[1], tolerance)
    if differences:
        raise CompareInputError(
            f"geometry mismatch between {reference[0]} and {other[0]}: " + "; ".join(differences)
        )


def load_probabilities(path: Path) -> np.ndarray:
    """``probabilities`` (C, z, y, x) from an nnU-Net ``<case>.npz``, as float32; refuses NaN, infinite
    values and values outside [0, 1], naming the file."""
    try:
        with np.load(path) as npz:
            if "probabilities" not in npz:
                raise CompareInputError(f"{path} has no 'probabilities' array (keys: {sorted(npz.files)})")
            probabilities = np.asarray(npz["probabilities"], dtype=np.float32)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        if isinstance(e, CompareInputError):
            raise
        raise CompareInputError(f"cannot read probabilities from {path}: {e}") from e
    finite = np.isfinite(probabilities)
    if not finite.all():
        n_nan = int(np.isnan(probabilities).sum())
        first = tuple(int(i) for i in np.argwhere(~finite)[0])
        raise CompareInputError(
            f"{path}: probabilities hold {n_nan} NaN and {int((~finite).sum()) - n_nan} infinite value(s), "
            f"the first at (channel, z, y, x) {first}"
        )
    if probabilities.size and (probabilities.min() < 0 or probabilities.max() > 1):
        raise CompareInputError(
            f"{path}: probabilities outside [0, 1] (min {probabilities.min():.4g}, max {probabilities.max():.4g})"
        )
    return probabilities


# ----------------------------------------------------------------------------- channels

# A description names the PET when it starts with PET, PT or SUV ("PET in SUVbw", "PET_SUV", "SUV").
# Only the start counts: the CT's description "CT in Hounsfield units, resampled onto the PET grid"
# mentions the PET too.
_PET_DESCRIPTION = re.compile(r"^\s*(pet(?![a-z])|pt(?![a-z])|suv)", re.IGNORECASE)


def check_pet_channel(dataset_json: Path | None, pet_channel: int) -> None:
    """Refuse a ``--pet-channel`` that ``dataset_json`` says is not the PET.

    ``channel_modalities`` (the physical modality of each channel, written by ``l1dfl convert``)
    decides when present; else ``channel_names`` when one of them names the PET. Channel names
    alone cannot tell when none does: ``l1dfl convert`` names its PET channel ``CT`` (or ``noNorm``,
    ...) to choose nnU-Net's normalization, so such a dataset.json is checked only for the channel
    existing. No dataset.json: nothing to check against.
    """
    if dataset_json is None or not Path(dataset_json).is_file():
        return
    try:
        info = json.loads(Path(dataset_json).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CompareInputError(f"cannot read {dataset_json}: {e}") from e
    key = str(pet_channel)
    names = {str(k): str(v) for k, v in (info.get("channel_names") or info.get("modality") or {}).items()}
    modalities = {str(k): str(v) for k, v in (info.get("channel_modalities") or {}).items()}
    channels = sorted(set(names) | set(modalities), key=lambda k: (len(k), k))
    if channels and key not in channels:
        raise CompareInputError(
            f"--pet-channel {pet_channel}: {dataset_json} has no channel {pet_channel} (channels {', '.join(channels)})"
        )
    for what, table in (("channel_modalities", modalities), ("channel_names", names)):
        pet_keys = [k for k in sorted(table, key=lambda k: (len(k), k)) if _PET_DESCRIPTION.match(table[k])]
        if not pet_keys:
            continue
        if key not in pet_keys:
            raise CompareInputError(
                f"--pet-channel {pet_channel} is {table.get(key, '')!r} in {dataset_json} ({what}); the PET is "
                f"channel {' or '.join(pet_keys)}: pass --pet-channel {pet_keys[0]}"
            )
        return
    logger.debug("%s names no channel PET; --pet-channel %d taken as given", dataset_json, pet_channel)


def dataset_max_label(dataset_jsons: list[Path]) -> int | None:
    """The largest label value the first existing dataset.json declares in ``labels`` (nnU-Net's
    ``{"background": 0, "lesion": 1}``, or region lists ``{"lesion": [1, 2]}``); None without one.

    nnU-Net's ``"ignore"`` label marks unannotated voxels, not lesions; ``l1dfl compare`` does not
    mask them, so a dataset.json that declares one is an error here (name it with ``--label``, see
    the CLI)."""
    for path in dataset_jsons:
        path = Path(path)
        if not path.is_file():
            continue
        try:
            labels = json.loads(path.read_text(encoding="utf-8")).get("labels")
        except (OSError, ValueError, AttributeError) as e:
            raise CompareInputError(f"cannot read {path}: {e}") from e
        if not labels:
            return None
        if "ignore" in labels:
            raise CompareInputError(
                f"{path} declares an 'ignore' label ({labels['ignore']}); l1dfl compare would score its voxels "
                "as lesion: pass --label L to score one label (ignore voxels then count as background)"
            )
        values = []
        for value in labels.values():
            values += list(value) if isinstance(value, (list, tuple)) else [value]
        try:
            return max(int(v) for v in values) if values else None
        except (TypeError, ValueError) as e:
            raise CompareInputError(f"{path}: labels must be integers, got {labels}") from e
    return None


# ----------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class CaseFiles:
    """All files of one case: GT, PET and each trainer's prediction (and probabilities if any)."""

    case_id: str
    gt: Path
    pet: Path
    predictions: dict[str, Path]
    probabilities: dict[str, Path] = field(default_factory=dict)
    folds: dict[str, int] = field(default_factory=dict)


def check_output_folder(folder: Path) -> None:
    """Refuse an output path that exists and is not a folder (before anything is read or written)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise CompareInputError(f"-o {folder} is not a folder (a file of that name exists); pass a folder")


REPORT_FILES = ("cases.csv", "lesions.csv", "summary.json", "report.md")


def remove_report_files(folder: Path) -> list[Path]:
    """Delete the report files of a run that failed while writing them (a full or read-only disk),
    so that no half-written report is taken for a finished one; returns what was removed."""
    removed = []
    for name in REPORT_FILES:
        path = Path(folder) / name
        try:
            if path.is_file():
                path.unlink()
                removed.append(path)
        except OSError as e:
            logger.warning("could not remove the partial report file %s: %s", path, e)
    return removed


def list_cases(folder: Path, file_ending: str = DEFAULT_FILE_ENDING) -> dict[str, Path]:
    """``{case_id: path}`` of the ``<case_id><file_ending>`` files in a folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CompareInputError(f"folder not found: {folder}")
    return {
        entry.name[: -len(file_ending)]: entry
        for entry in sorted(folder.iterdir())
        if entry.name.endswith(file_ending) and entry.is_file()
    }


def assemble_cases(
    predictions: dict[str, dict[str, Path]],
    gt_folder: Path,
    pet_folder: Path,
    pet_channel: int = 1,
    file_ending: str = DEFAULT_FILE_ENDING,
    folds: dict[str, dict[str, int]] | None = None,
) -> list[CaseFiles]:
    """Pair predictions by case ID and attach GT, PET and probabilities.

    Raises :class:`CompareInputError` when fewer than two trainers are given, when a trainer has no
    predictions, when the case sets differ between trainers (listing, per trainer, the cases it
    lacks), or when GT or PET files are missing (listing the cases).
    """
    if len(predictions) < 2:
        raise CompareInputError(f"need at least two trainers to compare, got {list(predictions)}")
    for trainer, cases in predictions.items():
        if not cases:
            raise CompareInputError(f"no predictions (*{file_ending}) found for {trainer}")
    all_cases = set().union(*(set(cases) for cases in predictions.values()))
    lacking = {t: sorted(all_cases - set(cases)) for t, cases in predictions.items()}
    if any(lacking.values()):
        raise CompareInputError(
            "case sets differ between trainers: "
            + "; ".join(f"{t} lacks {len(m)} case(s): {_listing(m)}" for t, m in lacking.items() if m)
        )
    gt_folder, pet_folder = Path(gt_folder), Path(pet_folder)
    for folder, what in ((gt_folder, "GT"), (pet_folder, "PET")):
        if not folder.is_dir():
            raise CompareInputError(f"{what} folder not found: {folder}")
    gt_files = {c: gt_folder / f"{c}{file_ending}" for c in all_cases}
    pet_files = {c: pet_folder / f"{c}_{pet_channel:04d}{file_ending}" for c in all_cases}
    for files, what in ((gt_files, f"GT in {gt_folder}"), (pet_files, f"PET channel {pet_channel} in {pet_folder}")):
        missing = [c for c, p in files.items() if not p.is_file()]
        if missing:
            example = files[sorted(missing)[0]].name
            raise CompareInputError(f"{what} missing for {len(missing)} case(s) (e.g. {example}): {_listing(missing)}")
    cases = []
    for case_id in sorted(all_cases):
        case_predictions = {t: predictions[t][case_id] for t in predictions}
        probabilities = {}
        for trainer, path in case_predictions.items():
            npz = path.with_name(path.name[: -len(file_ending)] + ".npz")
            if npz.is_file():
                probabilities[trainer] = npz
        cases.append(
            CaseFiles(
                case_id=case_id,
                gt=gt_files[case_id],
                pet=pet_files[case_id],
                predictions=case_predictions,
                probabilities=probabilities,
                folds={t: folds[t][case_id] for t in predictions} if folds else {},
            )
        )
    return cases


def discover_folder_cases(
    prediction_folders: dict[str, Path],
    gt_folder: Path,
    pet_folder: Path,
    pet_channel: int = 1,
    file_ending: str = DEFAULT_FILE_ENDING,
) -> tuple[list[CaseFiles], dict]:
    """Cases from ``--pred NAME=FOLDER`` folders; returns the cases and a description of the inputs."""
    predictions = {name: list_cases(folder, file_ending) for name, folder in prediction_folders.items()}
    cases = assemble_cases(predictions, gt_folder, pet_folder, pet_channel, file_ending)
    check_pet_channel(Path(pet_folder).parent / "dataset.json", pet_channel)
    inputs = {
        "mode": "folders",
        "predictions": {name: str(Path(folder).resolve()) for name, folder in prediction_folders.items()},
        "gt_folder": str(Path(gt_folder).resolve()),
        "pet_folder": str(Path(pet_folder).resolve()),
        "pet_channel": pet_channel,
        "file_ending": file_ending,
    }
    return cases, inputs


# ----------------------------------------------------------------------------- nnU-Net layout


def _nnunet_folder(variable: str) -> Path | None:
    value = os.environ.get(variable)
    return Path(value) if value else None


def resolve_dataset_name(dataset: str) -> str:
    """``DatasetXXX_Name`` from an ID ("5", "005") or a name, via nnU-Net's own lookup."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    try:
        return maybe_convert_to_dataset_name(dataset)
    except (RuntimeError, ValueError) as e:
        raise CompareInputError(f"dataset {dataset!r}: {e}") from e


def trainer_output_folder(dataset_name: str, trainer: str, plans: str, configuration: str) -> Path:
    """``nnUNet_results/<dataset>/<trainer>__<plans>__<configuration>``, which must exist."""
    results = _nnunet_folder("nnUNet_results")
    if results is None:
        raise CompareInputError("nnUNet_results is not set; export it or use --pred NAME=FOLDER")
    folder = results / dataset_name / f"{trainer}__{plans}__{configuration}"
    if not folder.is_dir():
        raise CompareInputError(f"trainer output folder not found: {folder}")
    return folder


def collect_cross_validation(
    trainer_folder: Path, folds: tuple[int, ...] = DEFAULT_FOLDS, file_ending: str = DEFAULT_FILE_ENDING
) -> tuple[dict[str, Path], dict[str, int]]:
    """Predictions of every fold's ``validation/`` folder: ``({case: path}, {case: fold})``.

    Raises :class:`CompareInputError` naming the folder when a fold or its ``validation/`` is
    missing or empty, and naming the cases predicted by more than one fold.
    """
    paths: dict[str, Path] = {}
    fold_of: dict[str, int] = {}
    duplicates = []
    for fold in folds:
        validation = Path(trainer_folder) / f"fold_{fold}" / "validation"
        if not validation.parent.is_dir():
            raise CompareInputError(f"fold {fold} missing: {validation.parent} not found")
        if not validation.is_dir():
            raise CompareInputError(
                f"fold {fold} has no validation predictions: {validation} not found "
                "(did training finish? run nnUNetv2_train ... --val to predict it)"
            )
        cases = list_cases(validation, file_ending)
        if not cases:
            raise CompareInputError(f"no *{file_ending} predictions in {validation}")
        for case_id, path in cases.items():
            if case_id in paths:
                duplicates.append(f"{case_id} (folds {fold_of[case_id]} and {fold})")
            paths[case_id] = path
            fold_of[case_id] = fold
    if duplicates:
        raise CompareInputError(f"cases predicted by more than one fold in {trainer_folder}: {_listing(duplicates)}")
    return paths, fold_of


def _check_against_splits(
    dataset_name: str, trainer: str, fold_of: dict[str, int], folds: tuple[int, ...]
) -> None:
    """With ``splits_final.json`` available, every validation case of every fold must be predicted."""
    preprocessed = _nnunet_folder("nnUNet_preprocessed")
    splits_file = preprocessed / dataset_name / "splits_final.json" if preprocessed else None
    if splits_file is None or not splits_file.is_file():
        logger.debug("no splits_final.json found; the validation folders define the case set")
        return
    splits = json.loads(splits_file.read_text())
    missing = []
    for fold in folds:
        if fold >= len(splits):
            continue
        missing += [f"{c} (fold {fold})" for c in splits[fold]["val"] if fold_of.get(c) != fold]
    if missing:
        raise CompareInputError(
            f"{trainer} lacks validation predictions listed in {splits_file}: {_listing(missing)}"
        )


def _dataset_file_ending(dataset_name: str, trainer_folders: list[Path]) -> str:
    raw = _nnunet_folder("nnUNet_raw")
    candidates = ([raw / dataset_name / "dataset.json"] if raw else []) + [f / "dataset.json" for f in trainer_folders]
    for candidate in candidates:
        if candidate.is_file():
            return json.loads(candidate.read_text()).get("file_ending", DEFAULT_FILE_ENDING)
    return DEFAULT_FILE_ENDING


def discover_nnunet_cases(
    dataset: str,
    configuration: str,
    trainers: list[str],
    plans: str = "nnUNetPlans",
    folds: tuple[int, ...] = DEFAULT_FOLDS,
    pet_channel: int = 1,
    gt_folder: Path | None = None,
    pet_folder: Path | None = None,
    file_ending: str | None = None,
) -> tuple[list[CaseFiles], dict]:
    """Cases from nnU-Net cross-validation results; returns the cases and a description of the inputs.

    ``file_ending`` defaults to dataset.json's (nnUNet_raw, else the trainer folder's copy).
    """
    if len(set(trainers)) != len(trainers):
        raise CompareInputError(f"trainers must be distinct, got {trainers}")
    dataset_name = resolve_dataset_name(dataset)
    folders = {t: trainer_output_folder(dataset_name, t, plans, configuration) for t in trainers}
    file_ending = file_ending or _dataset_file_ending(dataset_name, list(folders.values()))
    predictions, fold_maps = {}, {}
    for trainer, folder in folders.items():
        predictions[trainer], fold_maps[trainer] = collect_cross_validation(folder, tuple(folds), file_ending)
        _check_against_splits(dataset_name, trainer, fold_maps[trainer], tuple(folds))
    raw = _nnunet_folder("nnUNet_raw")
    if gt_folder is None:
        preprocessed = _nnunet_folder("nnUNet_preprocessed")
        options = ([raw / dataset_name / "labelsTr"] if raw else []) + (
            [preprocessed / dataset_name / "gt_segmentations"] if preprocessed else []
        )
        gt_folder = next((o for o in options if o.is_dir()), None)
        if gt_folder is None:
            raise CompareInputError(
                f"no GT folder for {dataset_name}: looked for {', '.join(map(str, options)) or 'nothing'} "
                "(set nnUNet_raw or nnUNet_preprocessed, or pass --gt)"
            )
    if pet_folder is None:
        if raw is None:
            raise CompareInputError("nnUNet_raw is not set; export it or pass --pet FOLDER")
        pet_folder = raw / dataset_name / "imagesTr"
    cases = assemble_cases(predictions, gt_folder, pet_folder, pet_channel, file_ending, fold_maps)
    dataset_jsons = [Path(pet_folder).parent / "dataset.json"] + [f / "dataset.json" for f in folders.values()]
    check_pet_channel(next((p for p in dataset_jsons if p.is_file()), None), pet_channel)
    inputs = {
        "mode": "nnunet",
        "dataset": dataset_name,
        "configuration": configuration,
        "plans": plans,
        "folds": list(folds),
        "predictions": {t: str(f.resolve()) for t, f in folders.items()},
        "gt_folder": str(Path(gt_folder).resolve()),
        "pet_folder": str(Path(pet_folder).resolve()),
        "pet_channel": pet_channel,
        "file_ending": file_ending,
    }
    return cases, inputs
