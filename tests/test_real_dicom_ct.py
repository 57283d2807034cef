"""Every CT (and the MR) in ../shared/data/real_dicom read with the project's CT reader.

The expected figures are the independently measured ones of ``../shared/data/real_dicom/README.md``
(SimpleITK 2.5.7 ImageSeriesReader on the slices sorted along the normal, pydicom 3.0.2 headers);
they are copied here, not computed by the code under test. The folder ships beside the checkout and
is never copied into the repository: every test here skips with the reason when it is absent.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import SHARED_DIR

from nnunetv2_l1dfl.conversion.dicom_series import DicomSeriesError, discover_series, read_ct_hu, read_dicom

REAL = SHARED_DIR / "data" / "real_dicom"


@pytest.fixture(scope="module")
def real_dicom() -> Path:
    if not REAL.is_dir():
        pytest.skip(
            f"real-world DICOM not found at {REAL}: it ships beside the project checkout in "
            "../shared/data/real_dicom (set L1DFL_SHARED_DIR to the folder holding data/)"
        )
    return REAL


def _files(root: Path, folder: str, pattern: str = "*") -> list[Path]:
    return sorted(p for p in (root / folder).glob(pattern) if p.is_file())


# name: (files under REAL, size, spacing (z None = single slice, not meaningful), origin, HU min, max, sum)
CT_FACTS = {
    "pydicom CT2": (
        ("pydicom/dicomdirtests_77654033_CT2", "*"), (16, 16, 3), (0.488281, 0.488281, 1.25),
        (-125.0, -128.1, 103.02), 77, 1489, 729630,
    ),
    "pydicom CT5N": (
        ("pydicom/dicomdirtests_98892001_CT5N", "*"), (16, 16, 5), (0.488281, 0.488281, 2.5),
        (-72.2, -143.0, -1.2375), -888, 85, -177320,
    ),
    "pydicom CT_small": (
        ("pydicom", "CT_small.dcm"), (128, 128, 1), (0.661468, 0.661468, None),
        (-158.1358, -179.0358, -75.7), -896, 1167, None,
    ),
    "highdicom ct_image": (
        ("highdicom", "ct_image.dcm"), (128, 128, 1), (0.661468, 0.661468, None),
        (-158.1358, -179.0358, -75.7), -896, 1167, None,
    ),
    # SliceThickness says 1.25, the slices are 1.0 mm apart: the positions decide.
    "dcmqi ct-3slice": (
        ("dcmqi/ct-3slice", "*.dcm"), (512, 512, 3), (0.810547, 0.810547, 1.0),
        (-235.2, -226.8, -128.69), -3024, 1381, -750951030,
    ),
    "dcmqi 23x38x3": (
        ("dcmqi/23x38x3/image", "*.dcm"), (23, 38, 3), (0.7, 0.7, 2.5), (46.4649, 5.0188, -177.75), 0, 1, 310,
    ),
    "rt-utils mock ct": (
        ("rt-utils/mock_data/ct", "*.dcm"), (512, 512, 2), (0.488281, 0.488281, 5.0), (-125.0, -125.0, 60.0),
        -3024, 125, -438048169,
    ),
    "dicompyler ct.0": (
        ("dicompyler-core/example_data/ct", "*.dcm"), (512, 512, 1), (1.074219, 1.074219, None),
        (-275.0, -524.0, 168.5593), -1000, 1457, None,
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(CT_FACTS))
def test_real_ct_geometry_and_hounsfield_units(real_dicom, name):
    (folder, pattern), size, spacing, origin, hu_min, hu_max, hu_sum = CT_FACTS[name]
    files = _files(real_dicom, folder, pattern)
    image = read_ct_hu(list(reversed(files)))  # file order must not matter
    assert image.GetSize() == size
    assert image.GetSpacing()[:2] == pytest.approx(spacing[:2], abs=1e-6)
    if spacing[2] is not None:
        assert image.GetSpacing()[2] == pytest.approx(spacing[2], abs=1e-4)
    assert image.GetOrigin() == pytest.approx(origin, abs=1e-4)
    assert image.GetDirection() == pytest.approx((1, 0, 0, 0, 1, 0, 0, 0, 1), abs=1e-9)
    hu = sitk.GetArrayFromImage(image).astype(np.float64)
    assert (hu.min(), hu.max()) == (hu_min, hu_max)
    if hu_sum is not None:
        assert hu.sum() == hu_sum


def test_real_oblique_ct_direction_spacing_and_values(real_dicom):
    """rt-utils' oriented_data: oblique, no FrameOfReferenceUID, PixelSpacing [3.5, 2.5]."""
    image = read_ct_hu(_files(real_dicom, "rt-utils/oriented_data", "*.dcm"))
    direction = np.array(image.GetDirection()).reshape(3, 3)  # columns: row, column, normal
    np.testing.assert_allclose(direction[:, 0], (0.95417, -0.20808, 0.21511), atol=1e-5)
    np.testing.assert_allclose(direction[:, 1], (0.27859, 0.88013, -0.38440), atol=1e-5)
    np.testing.assert_allclose(direction[:, 2], (-0.10934, 0.42671, 0.89776), atol=1e-5)
    np.testing.assert_allclose(direction.T @ direction, np.eye(3), atol=1e-12)
    assert image.GetSize() == (100, 50, 3)
    assert image.GetSpacing() == pytest.approx((2.5, 3.5, 4.5), abs=1e-5)
    assert image.GetOrigin() == pytest.approx((123.0, -432.0, 30.0), abs=1e-6)
    values = sitk.GetArrayFromImage(image).astype(np.float64)
    assert values.min() == pytest.approx(-10.0, abs=1e-3) and values.max() == pytest.approx(9.999, abs=1e-3)
    assert values.sum() == pytest.approx(365.254, abs=1e-3)
    assert not image.HasMetaDataKey("0020|0052")  # no FrameOfReferenceUID to carry


def test_real_ct_carries_its_frame_of_reference(real_dicom):
    image = read_ct_hu(_files(real_dicom, "pydicom/dicomdirtests_77654033_CT2"))
    assert image.GetMetaData("0020|0052") == "1.3.6.1.4.1.5962.1.1.0.0.0.1196530851.28319.0.4"


def test_real_gap_series_fails_naming_the_files_and_positions(real_dicom):
    """CT2 plus its fourth slice 17106: one SeriesInstanceUID with a 202.5 mm gap, not one volume."""
    files = _files(real_dicom, "pydicom/dicomdirtests_77654033_CT2") + [
        real_dicom / "pydicom/dicomdirtests_77654033_CT2_slice17106/17106"
    ]
    with pytest.raises(DicomSeriesError) as error:
        read_ct_hu(files)
    message = str(error.value)
    assert message.startswith(str(files[0]) + ": at 103.020 mm along the slice normal")
    assert "202.500 mm from the previous slice" in message and str(files[-1]) in message
    assert "at -99.480 mm" in message and "1.250 mm spacing" in message


def test_real_two_orientation_series_fails_naming_the_tag(real_dicom):
    files = _files(real_dicom, "pydicom/dicomdirtests_98892001_CT2N")
    assert [f.name for f in files] == ["6293", "6924"]
    with pytest.raises(DicomSeriesError, match=r"6924: ImageOrientationPatient \(0020,0037\) differs from .*6293"):
        read_ct_hu(files)


def test_real_mr_is_refused_by_modality_and_series(real_dicom):
    with pytest.raises(
        DicomSeriesError,
        match=r"MR_small\.dcm: Modality \(0008,0060\) is 'MR', not CT \(series 1\.3\.6\.1\.4\.1\.5962\.1\.3\.4\.1\.20040826185059\.5457",
    ):
        read_ct_hu([real_dicom / "pydicom" / "MR_small.dcm"])


def test_real_preamble_less_rtstruct_is_read(real_dicom):
    path = real_dicom / "pydicom" / "rtstruct.dcm"
    assert path.read_bytes()[128:132] != b"DICM"
    ds = read_dicom(path)
    assert ds.Modality == "RTSTRUCT" and ds.StructureSetLabel == "sep30"
    assert [(r.ROINumber, r.ROIName) for r in ds.StructureSetROISequence] == [
        (1, "patient"), (2, "Isocenter 1"), (3, "Isocenter 2"),
    ]  # fmt: skip
    assert ds.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID == "1.2.826.0.1.3680043.8.498.2010020400001.2"
    contours = ds.ROIContourSequence[0].ContourSequence
    assert [float(c.ContourData[2]) for c in contours] == [-200.0, -190.0, -180.0]


def test_real_dicom_discovery_finds_every_series(real_dicom):
    """Discovery over the whole folder: every DICOM file found (the preamble-less RTSTRUCT too),
    only the licence/readme texts and second copies of an SOPInstanceUID skipped, and as problem
    series: the oblique series (three StudyInstanceUIDs in one series) and the three instances whose
    two copies here differ (CT_small has an OtherPatientIDsSequence that highdicom's ct_image lacks;
    liver_1frame is liver.dcm cut to one frame; non_existent_reference_rt lacks the referenced study)."""
    series, skipped = discover_series(real_dicom)
    by_first_file = {s.files[0].relative_to(real_dicom).as_posix(): s for s in series}
    assert by_first_file["pydicom/rtstruct.dcm"].modality == "RTSTRUCT"
    assert by_first_file["pydicom/MR_small.dcm"].modality == "MR"
    assert len(by_first_file["pydicom/dicomdirtests_77654033_CT2/17136"].files) == 4  # the gap series
    oblique = by_first_file["rt-utils/oriented_data/0.dcm"]
    assert oblique.problem.startswith(str(real_dicom / "rt-utils/oriented_data/1.dcm") + ": StudyInstanceUID (0020,000D)")
    skipped_names = sorted(p.name for p, _ in skipped)
    texts = [n for n in skipped_names if n in ("LICENSE", "LICENSE.txt", "README.md", "info.txt")]
    duplicates = sorted(p.name for p, r in skipped if r.startswith("duplicate SOPInstanceUID (0008,0018)"))
    assert sorted(texts + duplicates) == skipped_names
    assert "CT_small.dcm" in duplicates  # the same SOP instance as highdicom/ct_image.dcm
    differing = {
        "highdicom/ct_image.dcm": "pydicom/CT_small.dcm",
        "dcmqi/liver.dcm": "pydicom/liver_1frame.dcm",
        "rt-utils/mock_data/invalid_reference_rt.dcm": "rt-utils/mock_data/non_existent_reference_rt.dcm",
    }
    for kept, copy in differing.items():
        assert by_first_file[kept].problem.startswith(
            f"{real_dicom / copy}: duplicate SOPInstanceUID (0008,0018) "
        ) and by_first_file[kept].problem.endswith("and the two copies differ (which one is right is not known)")
    problems = {name for name, s in by_first_file.items() if s.problem}
    assert problems == {"rt-utils/oriented_data/0.dcm", *differing}
