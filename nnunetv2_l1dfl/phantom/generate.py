"""Generate the embedded synthetic PSMA PET/CT cohort on disk, with its ground truth.

Layout of ``OUT_DIR``::

    phantom_cohort.json          parameters, studies, cohort statistics
    phantom_lesions.csv          one row per lesion (all studies)
    dicom/<PatientID>/<YYYYMMDD>_PSMA/CT/CT_*.dcm
                                     /PET/PT_*.dcm
                                     /RTSTRUCT/RTSTRUCT.dcm   (or SEG/SEG.dcm)
    truth/<PatientID>/<YYYYMMDD>_PSMA/truth.json              SUV scale, timing, lesions (centre, ml, SUVmax...)
                                     /suv_bw.nii.gz           SUVbw on the PET grid as a reader decodes it
                                     /lesion_mask.nii.gz      lesion i has value i (PET grid, uint8)
    heldout_dicom/..., heldout_truth/...                      with --heldout N: test studies of N further
                                                              patients, laid out as dicom/ and truth/

``OUT_DIR/dicom`` holds nothing but DICOM: point the converter there
(``l1dfl convert dicom OUT_DIR/dicom -d ID -n NAME``). Each study is built in a hidden staging
folder and moved into place when complete (its truth.json last), so an interrupted run leaves no
half-written study; re-running with the same parameters keeps finished studies.
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nnunetv2_l1dfl import __version__
from nnunetv2_l1dfl.phantom.anatomy import Grid
from nnunetv2_l1dfl.phantom.cohort import SIZE_PRESETS, StudySpec, plan_cohort, plan_heldout
from nnunetv2_l1dfl.phantom.render import PlacedLesion

logger = logging.getLogger(__name__)

COHORT_INDEX = "phantom_cohort.json"
LESION_TABLE = "phantom_lesions.csv"
DICOM_DIR = "dicom"
TRUTH_DIR = "truth"
HELDOUT_DICOM_DIR = "heldout_dicom"
"""Held-out test studies (``--heldout N``): new patients, outside ``dicom/``, so never converted with it."""
HELDOUT_TRUTH_DIR = "heldout_truth"
TRUTH_JSON = "truth.json"
STAGING = ".phantom_staging"
GENERATOR_VERSION = 1  # bump when the same seed would give different images


class CohortError(RuntimeError):
    """The output folder cannot take this cohort (not empty, other parameters); says what to do."""


@dataclass(frozen=True)
class CohortSummary:
    out_dir: Path
    studies: list[dict[str, Any]]
    generated: int
    reused: int
    seconds: float
    heldout_studies: list[dict[str, Any]] = field(default_factory=list)

    @property
    def n_lesions(self) -> int:
        return sum(s["n_lesions"] for s in self.studies)


def _parameters(n_cases: int, seed: int, size: str, n_heldout: int = 0) -> dict[str, Any]:
    parameters = {"n_cases": int(n_cases), "seed": int(seed), "size": size, "generator_version": GENERATOR_VERSION}
    if n_heldout:  # absent when 0, so cohorts written before held-out studies existed still match
        parameters["n_heldout"] = int(n_heldout)
    return parameters


def _lesion_truth(index: int, placed: PlacedLesion, spec: StudySpec, suv: np.ndarray, grid: Grid,
                  roi_name: str) -> dict[str, Any]:
    """Truth of one lesion, measured on the decoded SUV (``suv``, [z, y, x]) and its PET-grid mask."""
    mask = placed.mask
    values = suv[mask]
    flat = np.flatnonzero(np.where(mask, suv, -np.inf).ravel() == values.max())[0]  # first in array order
    peak = np.unravel_index(flat, suv.shape)
    coords = np.argwhere(mask)
    centroid_zyx = coords.mean(axis=0)
    centroid_mm = [grid.origin_mm[i] + grid.spacing_mm[i] * centroid_zyx[2 - i] for i in range(3)]
    drawn = spec.lesions[placed.spec_index]
    return {
        "label": index,
        "roi_name": roi_name,
        "site": placed.site,
        "site_drawn": drawn.site,
        "location": placed.location,
        "center_mm_xyz": [round(float(v), 2) for v in centroid_mm],
        "center_index_zyx": [round(float(v), 2) for v in centroid_zyx],
        "voxels": int(mask.sum()),
        "volume_ml": round(float(mask.sum() * grid.voxel_volume_ml), 4),
        "target_volume_ml": drawn.target_volume_ml,
        "suv_max": round(float(values.max()), 4),
        "suv_max_index_zyx": [int(v) for v in peak],
        "suv_mean": round(float(values.mean()), 4),
        "tla_ml": round(float(values.sum() * grid.voxel_volume_ml), 4),
        "target_suv_max": drawn.target_suv_max,
        "ct_hu": drawn.hu,
        "semi_axes_mm": [round(a, 2) for a in placed.solid.semi_axes_mm],
    }


def _write_nifti(array: np.ndarray, grid: Grid, path: Path) -> None:
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(float(s) for s in grid.spacing_mm))
    image.SetOrigin(tuple(float(o) for o in grid.origin_mm))
    sitk.WriteImage(image, str(path), useCompression=True)


def build_study(spec: StudySpec, size: str, dicom_dir: Path, truth_dir: Path) -> dict[str, Any]:
    """Render and write one study: DICOM into ``dicom_dir``, ground truth into ``truth_dir``; returns the truth."""
    from nnunetv2_l1dfl.phantom import dicom_writer as dw
    from nnunetv2_l1dfl.phantom.render import render_study

    preset = SIZE_PRESETS[size]
    rendered = render_study(spec, preset)
    uids = dw.StudyUIDs(spec)
    pet_datasets, suv = dw.write_pet_series(spec, rendered, uids, dicom_dir / "PET")
    dw.write_ct_series(spec, rendered, uids, dicom_dir / "CT")
    if spec.mask_format == "SEG":
        rois = dw.write_seg(spec, rendered, uids, pet_datasets, dicom_dir / "SEG" / "SEG.dcm")
        lesion_names = [r["segment_label"] for r in rois]
    else:
        rois = dw.write_rtstruct(spec, rendered, uids, pet_datasets, dicom_dir / "RTSTRUCT" / "RTSTRUCT.dcm")
        lesion_names = [r["roi_name"] for r in rois if r["type"] == "GTV"]

    grid = rendered.pet_grid
    lesions = [_lesion_truth(i, placed, spec, suv, grid, lesion_names[i - 1])
               for i, placed in enumerate(rendered.lesions, start=1)]
    truth = {
        "patient_id": spec.patient_id,
        "patient_index": spec.patient_index,
        "study_index": spec.study_index,
        "study_folder": spec.study_folder,
        "dicom_folder": f"{DICOM_DIR}/{spec.study_folder}",
        "study_date": spec.study_date.isoformat(),
        "study_instance_uid": uids.study,
        "pet_series_instance_uid": uids.pet_series,
        "ct_series_instance_uid": uids.ct_series,
        "mask_series_instance_uid": uids.mask_series,
        "frame_of_reference_uid": uids.frame_of_reference,
        "mask_format": spec.mask_format,
        "mask_rois": rois,
        "tracer": spec.tracer,
        "radionuclide_half_life_s": spec.half_life_s,
        "injected_dose_bq": spec.injected_dose_bq,
        "weight_kg": spec.weight_kg,
        "injection_datetime": spec.injection_datetime.isoformat(),
        "series_datetime": spec.series_datetime.isoformat(),
        "uptake_min": round(spec.uptake_s / 60.0, 3),
        "units": "BQML",
        "decay_correction": "START",
        "suv_scale_g_per_bq": spec.suv_scale_g_per_bq(),
        "suv_definition": "SUVbw = Bq/ml x suv_scale_g_per_bq = Bq/ml x weight_g / (dose_bq x 2^(-uptake_s / half_life_s))",
        "pet_grid": grid.to_dict(),
        "ct_grid": rendered.ct_grid.to_dict(),
        "pet_fwhm_mm": SIZE_PRESETS[size].pet_fwhm_mm,
        "n_lesions": len(lesions),
        "tmtv_ml": round(sum(les["volume_ml"] for les in lesions), 4),
        "lesions": lesions,
        "files": {"suv_bw": "suv_bw.nii.gz", "lesion_mask": "lesion_mask.nii.gz"},
    }
    truth_dir.mkdir(parents=True, exist_ok=True)
    _write_nifti(suv.astype(np.float32), grid, truth_dir / "suv_bw.nii.gz")
    _write_nifti(rendered.lesion_labels, grid, truth_dir / "lesion_mask.nii.gz")
    (truth_dir / TRUTH_JSON).write_text(json.dumps(truth, indent=1), encoding="utf-8")
    return truth


def _build_into_place(spec: StudySpec, size: str, out_dir: Path, parts: tuple[str, str] = (DICOM_DIR, TRUTH_DIR)
                      ) -> dict[str, Any]:
    staging = out_dir / STAGING / f"{spec.ordinal:04d}"
    if staging.exists():
        shutil.rmtree(staging)
    truth = build_study(spec, size, staging / DICOM_DIR, staging / TRUTH_DIR)
    for part, final_part in zip((DICOM_DIR, TRUTH_DIR), parts):  # truth last: a study is finished when its truth.json is in place
        final = out_dir / final_part / spec.study_folder
        if final.exists():
            shutil.rmtree(final)
        final.parent.mkdir(parents=True, exist_ok=True)
        (staging / part).replace(final)
    staging.rmdir()
    return truth


def _study_row(truth: dict[str, Any], parts: tuple[str, str] = (DICOM_DIR, TRUTH_DIR)) -> dict[str, Any]:
    return {"patient_id": truth["patient_id"], "study_folder": truth["study_folder"],
            "study_date": truth["study_date"], "mask_format": truth["mask_format"],
            "n_lesions": truth["n_lesions"], "tmtv_ml": truth["tmtv_ml"],
            "dicom": f"{parts[0]}/{truth['study_folder']}", "truth": f"{parts[1]}/{truth['study_folder']}"}


def load_truth(out_dir: str | Path, study_folder: str) -> dict[str, Any]:
    """The ground truth of one study (``OUT_DIR/truth/<study_folder>/truth.json``)."""
    path = Path(out_dir) / TRUTH_DIR / study_folder / TRUTH_JSON
    if not path.is_file():
        raise FileNotFoundError(f"no phantom ground truth at {path}")
    return json.loads(path.read_text(encoding="utf-8"))


def load_cohort(out_dir: str | Path) -> dict[str, Any]:
    """The cohort index ``phantom_cohort.json`` of a generated cohort folder."""
    path = Path(out_dir) / COHORT_INDEX
    if not path.is_file():
        raise FileNotFoundError(f"no phantom cohort index at {path}")
    return json.loads(path.read_text(encoding="utf-8"))


def _check_out_dir(out_dir: Path, parameters: dict[str, Any], overwrite: bool) -> None:
    index = out_dir / COHORT_INDEX
    if not out_dir.exists() or not any(out_dir.iterdir()):
        return
    if not index.is_file():
        raise CohortError(f"{out_dir} is not empty and holds no phantom cohort ({COHORT_INDEX} missing); "
                          "choose an empty or new folder")
    existing = json.loads(index.read_text(encoding="utf-8"))
    if existing.get("parameters") == parameters:
        return
    if not overwrite:
        raise CohortError(f"{out_dir} holds a phantom cohort made with {existing.get('parameters')}, not {parameters}; "
                          "use another folder or --overwrite to replace it")
    logger.info("removing the previous cohort in %s (--overwrite)", out_dir)
    for name in (DICOM_DIR, TRUTH_DIR, HELDOUT_DICOM_DIR, HELDOUT_TRUTH_DIR, COHORT_INDEX, LESION_TABLE, STAGING):
        target = out_dir / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


def generate_cohort(out_dir: str | Path, n_cases: int = 20, seed: int = 0, size: str = "default",
                    overwrite: bool = False, workers: int = 1, progress: bool = True,
                    heldout: int = 0) -> CohortSummary:
    """Write ``n_cases`` studies (DICOM + truth) into ``out_dir``; returns what was written.

    ``heldout`` > 0 adds that many test studies of further patients (:func:`~.cohort.plan_heldout`)
    under ``heldout_dicom/`` and ``heldout_truth/``, outside ``dicom/``: a model trained on the
    converted ``dicom/`` has never seen them. They are listed under ``heldout_studies`` in the
    index (not in ``studies``, the statistics or ``phantom_lesions.csv``).

    Reproducible: the same (n_cases, seed, size) gives the same files. Finished studies of an
    interrupted run with the same parameters are kept; a folder holding anything else is refused
    (CohortError) unless it is a phantom cohort and ``overwrite`` is set. ``workers`` > 1 renders
    studies in parallel processes.
    """
    from tqdm import tqdm

    if size not in SIZE_PRESETS:
        raise ValueError(f"unknown size {size!r}; choose from {sorted(SIZE_PRESETS)}")
    out_dir = Path(out_dir)
    parameters = _parameters(n_cases, seed, size, heldout)
    _check_out_dir(out_dir, parameters, overwrite)
    specs = plan_cohort(n_cases, seed, size)
    held = plan_heldout(heldout, n_cases, seed, size)
    held_parts = (HELDOUT_DICOM_DIR, HELDOUT_TRUTH_DIR)
    parts_of = {spec.ordinal: (DICOM_DIR, TRUTH_DIR) for spec in specs} | {spec.ordinal: held_parts for spec in held}
    out_dir.mkdir(parents=True, exist_ok=True)
    index_path = out_dir / COHORT_INDEX
    _write_json(index_path, {"generator": "nnunetv2_l1dfl.phantom", "package_version": __version__,
                             "parameters": parameters, "complete": False, "studies": []})

    start = time.perf_counter()
    truths: dict[int, dict[str, Any]] = {}
    todo = []
    for spec in specs + held:
        dicom_part, truth_part = parts_of[spec.ordinal]
        truth_path = out_dir / truth_part / spec.study_folder / TRUTH_JSON
        if truth_path.is_file() and (out_dir / dicom_part / spec.study_folder).is_dir():
            truths[spec.ordinal] = json.loads(truth_path.read_text(encoding="utf-8"))
        else:
            todo.append(spec)  # _build_into_place replaces any incomplete leftovers
    bar = tqdm(total=len(specs) + len(held), initial=len(truths), desc="phantom studies", unit="study",
               disable=not progress)
    if workers > 1 and len(todo) > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures = {pool.submit(_build_into_place, spec, size, out_dir, parts_of[spec.ordinal]): spec
                       for spec in todo}
            for future, spec in futures.items():
                truths[spec.ordinal] = future.result()
                bar.update(1)
    else:
        for spec in todo:
            truths[spec.ordinal] = _build_into_place(spec, size, out_dir, parts_of[spec.ordinal])
            bar.update(1)
    bar.close()
    staging = out_dir / STAGING
    if staging.is_dir() and not any(staging.iterdir()):
        staging.rmdir()

    ordered = [truths[spec.ordinal] for spec in specs]
    studies = [_study_row(t) for t in ordered]
    heldout_studies = [_study_row(truths[spec.ordinal], held_parts) for spec in held]
    _write_lesion_table(out_dir / LESION_TABLE, ordered)
    index = {
        "generator": "nnunetv2_l1dfl.phantom", "package_version": __version__, "parameters": parameters,
        "complete": True, "size_description": SIZE_PRESETS[size].description,
        "statistics": cohort_statistics(ordered), "studies": studies,
    }
    if held:
        index["heldout_studies"] = heldout_studies
    _write_json(index_path, index)
    return CohortSummary(out_dir, studies, generated=len(todo), reused=len(specs) + len(held) - len(todo),
                         seconds=time.perf_counter() - start, heldout_studies=heldout_studies)


def cohort_statistics(truths: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts and lesion statistics of a cohort (what the paper's Methods section reports)."""
    volumes = np.array([les["volume_ml"] for t in truths for les in t["lesions"]])
    suv_max = np.array([les["suv_max"] for t in truths for les in t["lesions"]])
    counts = Counter(t["n_lesions"] for t in truths)
    return {
        "n_studies": len(truths),
        "n_patients": len({t["patient_id"] for t in truths}),
        "n_lesions": int(volumes.size),
        "studies_by_lesion_count": {str(k): counts[k] for k in sorted(counts)},
        "lesion_volume_ml_mean_sd": [round(float(volumes.mean()), 3), round(float(volumes.std(ddof=1)), 3)] if volumes.size > 1 else None,
        "lesion_suv_max_mean_sd": [round(float(suv_max.mean()), 3), round(float(suv_max.std(ddof=1)), 3)] if suv_max.size > 1 else None,
        "sites": dict(Counter(les["site"] for t in truths for les in t["lesions"])),
    }


def _write_lesion_table(path: Path, truths: list[dict[str, Any]]) -> None:
    fields = ["patient_id", "study_folder", "label", "roi_name", "site", "location", "volume_ml", "suv_max",
              "suv_mean", "tla_ml", "target_volume_ml", "target_suv_max", "center_mm_xyz"]
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for t in truths:
            for les in t["lesions"]:
                row = {k: les.get(k) for k in fields}
                row.update(patient_id=t["patient_id"], study_folder=t["study_folder"],
                           center_mm_xyz=" ".join(str(v) for v in les["center_mm_xyz"]))
                writer.writerow(row)
    tmp.replace(path)


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
    tmp.replace(path)
