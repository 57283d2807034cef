"""The batch of ``l1dfl predict``: each study read, predicted by nnU-Net and written atomically.

Per study, everything is written into ``OUT/.partial-<case>-<random>/`` and renamed to ``OUT/<case>/``
only when complete, so ``OUT/<case>/`` either holds every requested output or does not exist (an
interrupted or failed study leaves nothing there; stale partial folders are removed on the next run).
A finished study is skipped on the next run unless ``overwrite``; with ``overwrite`` the old folder is
replaced only once the new one is complete. A failing study is recorded with its one-line reason and
the batch goes on. Logs and messages name studies by case ID only (never patient identifiers).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from nnunetv2_l1dfl.predict.inputs import LoadedStudy, Study, StudyError, headers_in_grid_order, load_study
from nnunetv2_l1dfl.predict.model import ModelSpec

if TYPE_CHECKING:
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

logger = logging.getLogger(__name__)

OUTPUT_TYPES = ("seg", "rtstruct", "nifti")
PARTIAL_PREFIX = ".partial-"
REPORT_FILE = "lesions.json"
#: Lesion connectivity: the one ``l1dfl compare`` uses by default (18-connected components).
LESION_CONNECTIVITY = 18


class OutputFolderError(RuntimeError):
    """The output folder cannot be created or written."""


@dataclass
class PredictOptions:
    output_types: tuple[str, ...] = OUTPUT_TYPES
    save_probabilities: bool = False
    overwrite: bool = False
    num_workers: int = 1
    extra_half_lives: Mapping[str, float] = field(default_factory=dict)
    rtstruct_reference: str = "pet"  # "ct": contours on the CT slices, referencing the CT series


@dataclass
class BatchSummary:
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    lesions: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def line(self, out_dir: Path) -> str:
        n_lesions = sum(self.lesions.values())
        without = sum(1 for case in self.done if self.lesions.get(case, 0) == 0)
        return (
            f"l1dfl predict: {len(self.done)} predicted ({n_lesions} lesions; {without} without lesions), "
            f"{len(self.skipped)} already done, {len(self.failed)} failed in {self.seconds:.0f} s -> {out_dir}"
        )


def prepare_output_dir(out_dir: Path) -> None:
    """Create ``out_dir`` and prove it writable (a probe file), else :class:`OutputFolderError`;
    remove partial study folders an interrupted run left."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out_dir, prefix=".write-test-"):
            pass
    except OSError as e:
        raise OutputFolderError(f"output folder {out_dir} is not writable: {e.strerror or type(e).__name__}") from e
    for stale in out_dir.glob(f"{PARTIAL_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)


def is_study_finished(out_dir: Path, case_id: str) -> bool:
    return (Path(out_dir) / case_id / REPORT_FILE).is_file()


def _label_names(labels: Mapping[str, Any]) -> dict[int, str]:
    names = {}
    for name, value in labels.items():
        if isinstance(value, int) and value > 0 and name != "ignore":
            names[value] = name
    return names


def predict_arrays(predictor: nnUNetPredictor, loaded: LoadedStudy, want_probabilities: bool):
    """nnU-Net's reader on the two channel files, then ``predict_single_npy_array`` (preprocessing,
    sliding window with the fold ensemble and mirroring, resampling back) in this process.
    Returns (segmentation in the reader's array order, probabilities or None, reader properties)."""
    reader = predictor.plans_manager.image_reader_writer_class()
    image, properties = reader.read_images([str(loaded.ct_path), str(loaded.pet_path)])
    if want_probabilities:
        segmentation, probabilities = predictor.predict_single_npy_array(image, properties, None, None, True)
    else:
        segmentation, probabilities = predictor.predict_single_npy_array(image, properties, None, None, False), None
    return reader, segmentation, probabilities, properties


def write_study(
    loaded: LoadedStudy,
    predictor: nnUNetPredictor,
    spec: ModelSpec,
    target: Path,
    options: PredictOptions,
) -> dict[str, Any]:
    """Predict one loaded study and write every output into ``target`` (a fresh folder). Returns the
    lesions.json document."""
    import SimpleITK as sitk

    from nnunetv2_l1dfl import __version__
    from nnunetv2_l1dfl.conversion.geometry import geometry_mismatch
    from nnunetv2_l1dfl.evaluation.metrics import label_lesions
    from nnunetv2_l1dfl.evaluation.quantities import lesion_quantities, patient_quantities
    from nnunetv2_l1dfl.predict import outputs

    case = loaded.study.case_id
    reader, segmentation, probabilities, properties = predict_arrays(predictor, loaded, options.save_probabilities)
    prediction_path = target / "prediction.nii.gz"
    reader.write_seg(segmentation, str(prediction_path), properties)  # as nnUNetv2_predict writes it
    prediction = sitk.ReadImage(str(prediction_path))
    problem = geometry_mismatch(prediction, loaded.suv)
    if problem:
        raise StudyError(f"case {case}: prediction is not on the PET grid ({problem})")
    label = sitk.GetArrayFromImage(prediction).astype(np.uint8)  # (z, y, x)
    suv = sitk.GetArrayFromImage(loaded.suv).astype(np.float32)
    instances, n = label_lesions(label > 0, connectivity=LESION_CONNECTIVITY)
    instances = instances.astype(np.uint16 if n < 65535 else np.uint32)
    instance_image = sitk.GetImageFromArray(instances)
    instance_image.CopyInformation(loaded.suv)
    sitk.WriteImage(instance_image, str(target / "lesions.nii.gz"), useCompression=True)
    if options.save_probabilities:
        np.savez_compressed(target / "probabilities.npz", probabilities=probabilities)

    spacing_zyx = tuple(float(s) for s in loaded.suv.GetSpacing()[::-1])
    quantities = lesion_quantities(instances, suv, spacing_zyx)
    patient = patient_quantities(instances, suv, spacing_zyx)
    # a lesion's label: the label most of its voxels carry (one label per lesion for binary models)
    lesion_labels = [int(np.bincount(label[instances == k]).argmax()) for k in range(1, n + 1)]
    headers = loaded.pet_headers
    instance_numbers = None
    if headers is not None:
        instance_numbers = [int(h.InstanceNumber) if "InstanceNumber" in h else None for h in headers]
    rows = outputs.lesion_rows(quantities, lesion_labels, loaded.suv, instance_numbers)

    written: dict[str, str] = {"prediction.nii.gz": "written", "lesions.nii.gz": "written"}
    algorithm = f"{spec.trainer}__{spec.plans}__{spec.configuration}"
    for kind, filename in (("seg", "seg.dcm"), ("rtstruct", "rtstruct.dcm")):
        if kind not in options.output_types:
            continue
        if headers is None:
            written[filename] = "not written: NIfTI input has no source PET series to reference"
            continue
        try:
            if kind == "seg":
                outputs.write_dicom_seg(label, headers, target / filename, _label_names(spec.labels), algorithm,
                                        f"nnunetv2-l1dfl {__version__}")
            elif options.rtstruct_reference == "ct":
                lost = _write_rtstruct_on_ct(instances, n, loaded, case, target / filename)
                if lost:
                    written[filename] = (f"not written: lesion(s) {', '.join(map(str, lost))} have no voxel on the "
                                         "CT grid (outside the CT); --rtstruct-reference pet writes them")
                    continue
            else:
                outputs.write_rtstruct(instances, headers, loaded.suv, target / filename)
            written[filename] = "written"
        except outputs.EmptyPredictionError:
            written[filename] = "not written: no lesion predicted"
    outputs.write_mip(suv, instances, loaded.suv, target / "mip.png", case)
    written["mip.png"] = "written"
    if options.save_probabilities:
        written["probabilities.npz"] = "written"
    extra = {
        "case_id": case,
        "model": {"folder": str(spec.folder), "trainer": spec.trainer, "plans": spec.plans,
                  "configuration": spec.configuration, "folds": list(spec.folds), "checkpoint": spec.checkpoint,
                  "mirroring": bool(predictor.use_mirroring)},
        "input": dict(loaded.details),
        "warnings": list(loaded.warnings),
        "coordinates": "patient coordinates in mm (DICOM LPS, as ImagePositionPatient); suvmax_slice is the 0-based "
                       "z index on the PET grid",
        "definitions": "docs/predict.md and docs/evaluation.md (SUVpeak: 1 ml sphere, radius 6.2 mm)",
        "lesion_connectivity": LESION_CONNECTIVITY,
        "outputs": written,
        "package_version": __version__,
    }
    outputs.write_lesion_report(rows, patient, target / "lesions.csv", target / REPORT_FILE, extra)
    if "nifti" not in options.output_types:
        prediction_path.unlink()
        (target / "lesions.nii.gz").unlink()
        written["prediction.nii.gz"] = written["lesions.nii.gz"] = "not requested"
        document = json.loads((target / REPORT_FILE).read_text(encoding="utf-8"))
        document["outputs"] = written
        (target / REPORT_FILE).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    return {"n_lesions": n, "outputs": written}


def _move_into_place(partial: Path, final: Path) -> None:
    old = None
    if final.exists():
        old = final.with_name(f"{PARTIAL_PREFIX}old-{final.name}-{os.getpid()}")
        os.replace(final, old)
    os.replace(partial, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def run_batch(
    studies: Sequence[Study],
    predictor_factory: Callable[[], nnUNetPredictor],
    spec: ModelSpec,
    out_dir: Path,
    options: PredictOptions,
    failed_before: Mapping[str, str] | None = None,
    progress: bool = True,
) -> BatchSummary:
    """Predict every study not finished yet (all with ``overwrite``); see the module docstring.
    ``predictor_factory`` is called once, and only when a study needs predicting."""
    from tqdm import tqdm

    start = time.perf_counter()
    out_dir = Path(out_dir)
    summary = BatchSummary(failed=dict(failed_before or {}))
    todo = []
    for study in studies:
        if not options.overwrite and is_study_finished(out_dir, study.case_id):
            summary.skipped.append(study.case_id)
        else:
            todo.append(study)
    predictor = predictor_factory() if todo else None  # a model that cannot load fails the run, not a study

    def load(study: Study) -> tuple[Path, LoadedStudy | None, BaseException | None]:
        partial = Path(tempfile.mkdtemp(prefix=f"{PARTIAL_PREFIX}{study.case_id}-", dir=out_dir))
        try:
            return partial, load_study(study, partial / "inputs", file_ending=spec.file_ending,
                                       extra_half_lives=options.extra_half_lives), None  # fmt: skip
        except Exception as e:  # noqa: BLE001 - reported below, with the study
            return partial, None, e

    # Up to num_workers studies are read ahead in threads while one is predicted (1: strictly in turn).
    pool = ThreadPoolExecutor(max_workers=options.num_workers) if options.num_workers > 1 and len(todo) > 1 else None
    queue: deque[tuple[Study, Future | None]] = deque()
    upcoming = iter(todo)

    def read_ahead() -> None:
        study = next(upcoming, None)
        if study is not None:
            queue.append((study, pool.submit(load, study) if pool is not None else None))

    for _ in range(options.num_workers if pool is not None else 1):
        read_ahead()
    bar = tqdm(total=len(todo), desc="predicting", unit="study", disable=not progress)
    try:
        while queue:
            study, future = queue.popleft()
            bar.set_postfix_str(study.case_id)
            partial, loaded, error = future.result() if future is not None else load(study)
            read_ahead()
            try:
                if error is not None:
                    raise error
                result = write_study(loaded, predictor, spec, partial, options)
                shutil.rmtree(partial / "inputs", ignore_errors=True)
                _move_into_place(partial, out_dir / study.case_id)
            except StudyError as e:
                summary.failed[study.case_id] = str(e)
            except Exception as e:  # noqa: BLE001 - one study's unexpected failure must not stop the batch
                logger.debug("case %s failed", study.case_id, exc_info=True)
                text = str(e).strip().splitlines()
                summary.failed[study.case_id] = f"case {study.case_id}: {type(e).__name__}: {text[-1] if text else ''}"
            else:
                summary.done.append(study.case_id)
                summary.lesions[study.case_id] = int(result["n_lesions"])
                logger.info("case %s: %d lesion(s)", study.case_id, result["n_lesions"])
            finally:
                shutil.rmtree(partial, ignore_errors=True)
                bar.update(1)
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
            for _, future in queue:  # interrupted: studies read ahead but never predicted
                if future is not None and future.done() and not future.cancelled():
                    shutil.rmtree(future.result()[0], ignore_errors=True)
    summary.seconds = time.perf_counter() - start
    return summary


def _write_rtstruct_on_ct(instances: np.ndarray, n: int, loaded: LoadedStudy, case: str, path: Path) -> list[int]:
    """The RTSTRUCT on the CT slices: the instance map taken onto the CT grid by nearest neighbour (each CT
    voxel gets the lesion whose PET voxel holds its centre) and contoured there, referencing the CT series.
    Returns the lesions that have no CT voxel (then nothing is written), else []."""
    import SimpleITK as sitk

    from nnunetv2_l1dfl.predict import outputs

    instance_image = sitk.GetImageFromArray(instances.astype(np.uint32))
    instance_image.CopyInformation(loaded.suv)
    on_ct = sitk.Resample(instance_image, loaded.ct, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt32)
    instances_ct = sitk.GetArrayFromImage(on_ct)
    present = np.bincount(instances_ct.ravel(), minlength=n + 1)
    lost = [k for k in range(1, n + 1) if present[k] == 0]
    if not lost:
        ct_headers = headers_in_grid_order(loaded.study.ct_files, loaded.ct, case, "CT")
        outputs.write_rtstruct(instances_ct, ct_headers, loaded.ct, path, series_description="Lesions on CT (l1dfl predict)")
    return lost
