"""Tiny synthetic PET/CT volumes and miniature copies of public dataset layouts for the conversion tests.

Arrays are (z, y, x) like ``SimpleITK.GetArrayFromImage``; spacing and origin (x, y, z) in mm.
The PET grid is 16 x 16 x 12 voxels of 4 mm; the CT grid 2 mm, and by default smaller than the
PET field of view in z (it starts 8 mm later), like a CT that does not cover the whole PET.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import SimpleITK as sitk

PET_SHAPE = (12, 16, 16)
PET_SPACING = (4.0, 4.0, 4.0)
PET_ORIGIN = (-30.0, -30.0, 0.0)
CT_SHAPE = (20, 32, 32)
CT_SPACING = (2.0, 2.0, 2.0)
CT_ORIGIN = (-31.0, -31.0, 8.0)
BACKGROUND_SUV = 1.0
LESION_SUV = 8.0
BODY_HU = 40.0


def _grid_points(shape, spacing, origin):
    z, y, x = np.indices(shape, dtype=np.float64)
    return origin[0] + x * spacing[0], origin[1] + y * spacing[1], origin[2] + z * spacing[2]


def sphere(shape, spacing, origin, centre_mm, radius_mm) -> np.ndarray:
    """Boolean (z, y, x) ball of ``radius_mm`` around ``centre_mm`` (x, y, z) on the given grid."""
    x, y, z = _grid_points(shape, spacing, origin)
    return (x - centre_mm[0]) ** 2 + (y - centre_mm[1]) ** 2 + (z - centre_mm[2]) ** 2 <= radius_mm**2


LESIONS_MM = (((2.0, 2.0, 26.0), 6.0), ((-14.0, 10.0, 34.0), 5.0))


def pet_suv_volume(lesions=LESIONS_MM) -> np.ndarray:
    """PET in SUV on the PET grid: body (a cylinder) at 1, lesions at 8."""
    x, y, _ = _grid_points(PET_SHAPE, PET_SPACING, PET_ORIGIN)
    suv = np.where(x**2 + y**2 <= 26.0**2, BACKGROUND_SUV, 0.05)
    for centre, radius in lesions:
        suv[sphere(PET_SHAPE, PET_SPACING, PET_ORIGIN, centre, radius)] = LESION_SUV
    return suv.astype(np.float32)


def lesion_mask(shape, spacing, origin, lesions=LESIONS_MM, values=None) -> np.ndarray:
    """uint8 mask of the lesions on any grid (each lesion's value from ``values``, default 1)."""
    mask = np.zeros(shape, dtype=np.uint8)
    for n, (centre, radius) in enumerate(lesions):
        mask[sphere(shape, spacing, origin, centre, radius)] = 1 if values is None else values[n]
    return mask


def ct_volume(shape=CT_SHAPE, spacing=CT_SPACING, origin=CT_ORIGIN) -> np.ndarray:
    """CT in HU: a water-like cylinder in air."""
    x, y, _ = _grid_points(shape, spacing, origin)
    return np.where(x**2 + y**2 <= 26.0**2, BODY_HU, -1000.0).astype(np.float32)


def write_image(array: np.ndarray, path: Path, spacing, origin) -> Path:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetOrigin(tuple(float(o) for o in origin))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), useCompression=True)
    return path


def write_pet_grid_case(folder: Path, names: dict[str, str], lesions=LESIONS_MM) -> None:
    """CT, SUV and mask all on the PET grid (autoPET style), file names from ``names`` (ct, pet, label)."""
    ct = ct_volume(PET_SHAPE, PET_SPACING, PET_ORIGIN)
    write_image(ct, folder / names["ct"], PET_SPACING, PET_ORIGIN)
    write_image(pet_suv_volume(lesions), folder / names["pet"], PET_SPACING, PET_ORIGIN)
    write_image(
        lesion_mask(PET_SHAPE, PET_SPACING, PET_ORIGIN, lesions),
        folder / names["label"],
        PET_SPACING,
        PET_ORIGIN,
    )


# autoPET I/II: PETCT_<hex>/<TCIA study folder with spaces>/{CTres,SUV,SEG}.nii.gz
AUTOPET_FDG_STUDIES = (
    ("PETCT_0a1b2c3d4e", "08-12-2002-NA-PET-CT Ganzkoerper  primaer mit KM-10445"),
    ("PETCT_0a1b2c3d4e", "03-23-2003-NA-PET-CT Ganzkoerper  primaer mit KM-20771"),
    ("PETCT_11aa22bb33", "01-05-2004-NA-PET-CT Ganzkoerper nativ-55001"),
    ("PETCT_22bb33cc44", "02-06-2005-NA-Unknown-10001"),
    ("PETCT_33cc44dd55", "03-07-2006-NA-PET-CT Ganzkoerper  primaer mit KM-30303"),
    ("PETCT_44dd55ee66", "04-08-2007-NA-PET-CT Ganzkoerper  primaer mit KM-40404"),
)


def make_autopet_fdg(root: Path) -> Path:
    """Miniature autoPET I/II release (5 patients, one with two studies) with fdg_metadata.csv."""
    base = root / "FDG-PET-CT-Lesions"
    for patient, study in AUTOPET_FDG_STUDIES:
        write_pet_grid_case(
            base / patient / study, {"ct": "CTres.nii.gz", "pet": "SUV.nii.gz", "label": "SEG.nii.gz"}
        )
    with (base / "fdg_metadata.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            ["Subject ID", "Study UID", "Study Date", "Modality", "Manufacturer Model Name", "diagnosis"]
        )
        for patient, study in AUTOPET_FDG_STUDIES:
            writer.writerow([patient, "1.2.3", study[:10], "PT", "Biograph 128", "MELANOMA"])
    return base


AUTOPET_III_CASES = (
    "fdg_0a1b2c3d4e_08-12-2002-NA-PET-CT Ganzkoerper  primaer mit KM-10445",
    "psma_95b833d46f153cd2_2018-04-16",
    "psma_95b833d46f153cd2_2019-02-01",
    "psma_a1b2c3d4e5f60718_2017-11-30",
)


def make_autopet_iii(root: Path) -> Path:
    """Miniature autoPET III/IV release: nnU-Net-like folders plus the two metadata CSVs."""
    base = root / "PSMA-FDG-PET-CT-Lesions"
    for case in AUTOPET_III_CASES:
        write_pet_grid_case(
            base,
            {
                "ct": f"imagesTr/{case}_0000.nii.gz",
                "pet": f"imagesTr/{case}_0001.nii.gz",
                "label": f"labelsTr/{case}.nii.gz",
            },
        )
    with (base / "psma_metadata.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["Subject ID", "Study Date", "age", "manufacturer_model_name", "pet_radionuclide"])
        writer.writerow(["PSMA_95b833d46f153cd2", "2018-04-16", "71", "Biograph 64-4R TruePoint", "68Ga"])
        writer.writerow(["PSMA_95b833d46f153cd2", "2019-02-01", "72", "Discovery 690", "18F"])
        writer.writerow(["PSMA_a1b2c3d4e5f60718", "2017-11-30", "65", "Biograph mCT Flow 20", "18F"])
    with (base / "fdg_metadata.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["Subject ID", "Study Date", "Manufacturer Model Name"])
        writer.writerow(["PETCT_0a1b2c3d4e", "08-12-2002", "Biograph 128"])
    return base
