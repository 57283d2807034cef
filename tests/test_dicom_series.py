"""Series discovery in nested folders, and CT reading with per-slice rescale and geometry checks."""

import shutil

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from _dicom_factories import strip_file_format, write_ct_series, write_pet_series, write_rtstruct, write_seg

from nnunetv2_l1dfl.conversion.dicom_series import DicomSeriesError, discover_series, read_ct_hu, read_dicom

ROTATED = (0.0, 1.0, 0.0, -1.0, 0.0, 0.0)  # rows run along +y, columns along -x


@pytest.fixture(scope="module")
def dicom_tree(tmp_path_factory):
    """Two patients; patient A with PET, CT, RTSTRUCT and SEG in nested folders (one with a space),
    plus a corrupt file, a text file, a DICOM without SeriesInstanceUID and a duplicated slice."""
    root = tmp_path_factory.mktemp("dicom_tree")
    study, frame = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    pet = write_pet_series(
        root / "A" / "2024-01-01 PET CT" / "pet", np.ones((4, 8, 8)) * 1000, patient_id="A",
        study_uid=study, frame_of_reference_uid=frame,
    )  # fmt: skip
    write_ct_series(root / "A" / "2024-01-01 PET CT" / "ct", np.zeros((5, 10, 10)), patient_id="A",
                    study_uid=study, frame_of_reference_uid=frame)  # fmt: skip
    mask = np.zeros((4, 8, 8), bool)
    mask[1:3, 2:5, 2:5] = True
    write_rtstruct(root / "A" / "rs" / "rs.dcm", pet, {"lesion": mask})
    write_seg(root / "A" / "seg" / "deep" / "seg.dcm", pet, {"lesion": mask})
    write_pet_series(root / "B" / "pet", np.ones((3, 8, 8)), patient_id="B", study_date="20230101")
    (root / "A" / "corrupt.dcm").write_bytes(b"\x00" * 128 + b"DICM" + b"\xff\x13garbage" * 3)
    whole = pet[2].read_bytes()
    (root / "A" / "interrupted_copy.dcm").write_bytes(whole[: len(whole) - 40])  # cut inside the pixel data
    (root / "notes.txt").write_text("not DICOM")
    ds = pydicom.dcmread(pet[0])
    del ds.SeriesInstanceUID
    ds.save_as(root / "A" / "no_series_uid.dcm")
    shutil.copy(pet[1], root / "A" / "copy_of_pet_001.dcm")
    return root, pet


def test_discover_groups_series_and_reports_bad_files(dicom_tree):
    root, pet = dicom_tree
    series, skipped = discover_series(root)
    assert [(s.patient_id, s.modality, len(s.files)) for s in series] == [
        ("A", "CT", 5), ("A", "PT", 4), ("A", "RTSTRUCT", 1), ("A", "SEG", 1), ("B", "PT", 3),
    ]  # fmt: skip
    by_modality = {s.modality: s for s in series if s.patient_id == "A"}
    pet_uid = by_modality["PT"].series_instance_uid
    assert by_modality["RTSTRUCT"].referenced_series_uids == (pet_uid,)
    assert by_modality["SEG"].referenced_series_uids == (pet_uid,)
    assert by_modality["PT"].referenced_series_uids == ()
    assert by_modality["RTSTRUCT"].frame_of_reference_uid == by_modality["PT"].frame_of_reference_uid != ""
    assert by_modality["PT"].files == tuple(sorted(by_modality["PT"].files))
    assert set(by_modality["PT"].files) == set(pet)  # the duplicate copy is not counted twice
    reasons = {p.name: r for p, r in skipped}
    assert set(reasons) == {
        "corrupt.dcm", "interrupted_copy.dcm", "notes.txt", "no_series_uid.dcm", "copy_of_pet_001.dcm"
    }  # fmt: skip
    assert reasons["notes.txt"].startswith("not readable as DICOM")
    assert reasons["interrupted_copy.dcm"].startswith("truncated: pixel data (7FE0,0010)")
    assert "SeriesInstanceUID (0020,000E)" in reasons["no_series_uid.dcm"]
    assert "duplicate SOPInstanceUID" in reasons["copy_of_pet_001.dcm"] and "pet_001.dcm" in reasons["copy_of_pet_001.dcm"]
    assert discover_series(root)[0] == series  # deterministic


def test_discover_rejects_a_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        discover_series(tmp_path / "nowhere")


def test_read_ct_hu_applies_each_slices_rescale_in_any_file_order(tmp_path):
    rng = np.random.default_rng(0)
    hu = rng.integers(-1000, 2000, size=(6, 9, 7)).astype(np.float64)
    slopes = [1.0, 0.5, 2.0, 1.0, 1.0, 0.25]
    intercepts = [-1024.0, -1000.0, -2048.0, 0.0, -1024.0, -500.0]
    hu = np.round((hu - np.array(intercepts)[:, None, None]) / np.array(slopes)[:, None, None]) * np.array(
        slopes
    )[:, None, None] + np.array(intercepts)[:, None, None]  # representable exactly with each slice's rescale
    files = write_ct_series(tmp_path, hu, (0.8, 0.9, 2.5), (10.0, -20.0, 30.0), orientation=ROTATED,
                            rescale_slope=slopes, rescale_intercept=intercepts)  # fmt: skip
    image = read_ct_hu(list(reversed(files)))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), hu.astype(np.float32))
    assert image.GetPixelID() == sitk.sitkFloat32
    assert image.GetSpacing() == pytest.approx((0.8, 0.9, 2.5))
    assert image.GetOrigin() == pytest.approx((10.0, -20.0, 30.0))
    assert image.GetDirection() == pytest.approx((0, -1, 0, 1, 0, 0, 0, 0, 1))
    assert image.GetMetaData("0020|0052") == str(pydicom.dcmread(files[0]).FrameOfReferenceUID)
    # SimpleITK's own reader agrees on the geometry (direction and voxel positions).
    reference = sitk.ReadImage([str(f) for f in files])
    assert reference.GetDirection() == pytest.approx(image.GetDirection())
    assert reference.TransformIndexToPhysicalPoint((3, 4, 5)) == pytest.approx(image.TransformIndexToPhysicalPoint((3, 4, 5)))


def test_read_ct_hu_names_the_file_on_inconsistent_geometry(tmp_path):
    files = write_ct_series(tmp_path / "gap", np.zeros((5, 4, 4)))
    files[2].unlink()
    with pytest.raises(DicomSeriesError, match=r"ct_003\.dcm.*missing slice"):
        read_ct_hu([f for f in files if f.exists()])

    files = write_ct_series(tmp_path / "spacing", np.zeros((3, 4, 4)))
    ds = pydicom.dcmread(files[1])
    ds.PixelSpacing = [2.0, 2.0]
    ds.save_as(files[1])
    with pytest.raises(DicomSeriesError, match=r"ct_001\.dcm: PixelSpacing \(0028,0030\)"):
        read_ct_hu(files)

    files = write_ct_series(tmp_path / "duplicate", np.zeros((3, 4, 4)))
    ds = pydicom.dcmread(files[2])
    ds.ImagePositionPatient = pydicom.dcmread(files[1]).ImagePositionPatient
    ds.save_as(files[2])
    with pytest.raises(DicomSeriesError, match=r"same ImagePositionPatient \(0020,0032\)"):
        read_ct_hu(files)


def test_rescale_slope_zero_or_non_finite_is_refused_absent_or_empty_is_one(tmp_path):
    hu = np.arange(3 * 4 * 4, dtype=np.float64).reshape(3, 4, 4) - 20.0
    files = write_ct_series(tmp_path / "absent", hu, rescale_intercept=-100.0)
    for path, value in ((files[0], None), (files[1], "")):  # absent and empty both mean slope 1
        ds = pydicom.dcmread(path)
        if value is None:
            del ds.RescaleSlope
        else:
            ds.RescaleSlope = value
        ds.save_as(path)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_ct_hu(files)), hu.astype(np.float32))

    for name, value in (("zero", "0"), ("zero_float", "0.0"), ("nan", "NaN"), ("inf", "inf")):
        files = write_ct_series(tmp_path / name, hu)
        ds = pydicom.dcmread(files[1])
        with pydicom.config.disable_value_validation():
            ds.RescaleSlope = value
        ds.save_as(files[1])
        with pytest.raises(DicomSeriesError, match=r"ct_001\.dcm: RescaleSlope \(0028,1053\) is "):
            read_ct_hu(files)


@pytest.mark.parametrize("implicit_vr", [True, False])
def test_files_without_preamble_or_file_meta_are_discovered_and_read(tmp_path, implicit_vr):
    """A raw data set (no 128-byte preamble, no 'DICM', no file meta) is still DICOM: read it."""
    hu = np.arange(3 * 5 * 4, dtype=np.float64).reshape(3, 5, 4) * 3 - 100
    files = write_ct_series(tmp_path / "ct", hu)
    for path in files[1:]:
        strip_file_format(path, implicit_vr=implicit_vr)
        assert path.read_bytes()[128:132] != b"DICM"
    (tmp_path / "ct" / "looks_like_tag.bin").write_bytes(b"\x08\x00\x05\x00" + b"\xff" * 60)
    series, skipped = discover_series(tmp_path)
    assert [(s.modality, len(s.files)) for s in series] == [("CT", 3)]
    assert [(p.name, r.split(":")[0]) for p, r in skipped] == [("looks_like_tag.bin", "not readable as DICOM")]
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_ct_hu(series[0])), hu.astype(np.float32))
    ds = read_dicom(files[2], stop_before_pixels=True)
    assert ds.Modality == "CT" and "PixelData" not in ds


def test_read_dicom_refuses_non_dicom_naming_the_file(tmp_path):
    for name, data in (("text.dcm", b"hello, not DICOM at all" * 10), ("short.dcm", b"\x08\x00"),
                       ("zeros.dcm", b"\x00" * 300)):  # fmt: skip
        (tmp_path / name).write_bytes(data)
        with pytest.raises(DicomSeriesError, match=rf"{name}: not readable as DICOM"):
            read_dicom(tmp_path / name)


def test_non_orthonormal_orientation_is_refused_rounding_is_tolerated(tmp_path):
    hu = np.zeros((3, 4, 4))
    files = write_ct_series(tmp_path / "skew", hu)
    for path in files:  # columns 5 degrees off perpendicular to the rows: not a rotation
        ds = pydicom.dcmread(path)
        ds.ImageOrientationPatient = [1, 0, 0, 0.0871557, 0.9961947, 0]
        ds.save_as(path)
    with pytest.raises(DicomSeriesError, match=r"ct_000\.dcm: ImageOrientationPatient \(0020,0037\) .* not orthonormal"):
        read_ct_hu(files)
    files = write_ct_series(tmp_path / "long", hu, orientation=(1.01, 0, 0, 0, 1, 0))
    with pytest.raises(DicomSeriesError, match=r"not orthonormal \(\|row\| 1\.010000"):
        read_ct_hu(files)
    # Six-digit DS cosines of an oblique plane (rt-utils' oriented_data) are within the tolerance,
    # and the direction written is exactly orthonormal.
    oblique = (0.95417, -0.20808, 0.21511, 0.27859, 0.88013, -0.38440)
    image = read_ct_hu(write_ct_series(tmp_path / "oblique", hu, orientation=oblique))
    direction = np.array(image.GetDirection()).reshape(3, 3)
    np.testing.assert_allclose(direction.T @ direction, np.eye(3), atol=1e-12)
    np.testing.assert_allclose(direction[:, 0], oblique[:3], atol=1e-4)


def _declare_slices(files, number_of_slices):
    for k, path in enumerate(files):
        ds = pydicom.dcmread(path)
        ds.NumberOfSlices = number_of_slices
        ds.ImageIndex = k + 1
        ds.save_as(path)


@pytest.mark.parametrize("lost", [0, 4])  # the first or the last slice: the spacing stays regular
def test_pet_series_missing_an_end_slice_is_incomplete_by_number_of_slices(tmp_path, lost):
    from nnunetv2_l1dfl.conversion.dicom_series import load_slice_stack

    files = write_pet_series(tmp_path / "pet", np.ones((5, 4, 4)) * 100)
    _declare_slices(files, 5)
    assert load_slice_stack(files).array.shape == (5, 4, 4)
    files[lost].unlink()
    remaining = [f for f in files if f.exists()]
    with pytest.raises(
        DicomSeriesError, match=rf"NumberOfSlices \(0054,0081\) is 5 but the case X has 4 files; ImageIndex \(0054,1330\) {lost + 1} missing"
    ):
        load_slice_stack(remaining, what="case X")


def test_read_ct_hu_refuses_mr_and_pet_by_name(tmp_path):
    files = write_ct_series(tmp_path / "mr", np.zeros((2, 4, 4)), Modality="MR", SeriesDescription="T1 axial")
    with pytest.raises(DicomSeriesError, match=r"ct_000\.dcm: Modality \(0008,0060\) is 'MR', not CT \(series .*T1 axial\)"):
        read_ct_hu(files)
    pet = write_pet_series(tmp_path / "pet", np.ones((2, 4, 4)))
    with pytest.raises(DicomSeriesError, match=r"pet_000\.dcm: Modality \(0008,0060\) is 'PT', not CT"):
        read_ct_hu(pet)


def test_files_of_one_series_that_disagree_make_it_a_problem_series(tmp_path):
    """A PET file whose Modality reads CT (sorted first) used to turn the series into a CT series."""
    pet = write_pet_series(tmp_path / "pet", np.ones((4, 4, 4)))
    ds = pydicom.dcmread(pet[0])
    ds.Modality = "CT"
    ds.save_as(pet[0])
    other = write_pet_series(tmp_path / "other", np.ones((3, 4, 4)), patient_id="Q")
    ds = pydicom.dcmread(other[2])
    ds.PatientName = "SOMEONE^ELSE"
    ds.save_as(other[2])
    series, skipped = discover_series(tmp_path)
    assert skipped == []
    by_patient = {s.patient_id: s for s in series}
    first = by_patient["PAT001"]
    assert (first.modality, len(first.files), first.has_pet_files) == ("PT", 4, True)
    assert first.modalities == ("CT", "PT")
    assert first.problem.startswith(f"{pet[0]}: Modality (0008,0060) 'CT' differs from 'PT'")
    assert "(3 of 4 files)" in first.problem
    assert by_patient["Q"].problem.startswith(f"{other[2]}: PatientName (0010,0010) 'SOMEONE^ELSE' differs")
    with pytest.raises(DicomSeriesError, match=r"Modality \(0008,0060\) 'CT' differs"):
        read_ct_hu(first)


def test_slice_stack_refuses_files_of_another_series_or_modality(tmp_path):
    """Whoever grouped the files (``l1dfl suv`` reads a folder), one volume is one series of one modality."""
    from nnunetv2_l1dfl.conversion.dicom_series import load_slice_stack

    a = write_ct_series(tmp_path / "a", np.zeros((3, 4, 4)))
    b = write_ct_series(tmp_path / "b", np.zeros((2, 4, 4)), origin=(0.0, 0.0, 6.0))  # continues a, evenly
    with pytest.raises(DicomSeriesError, match=rf"^{b[0]}: SeriesInstanceUID \(0020,000E\) '.*' differs from '.*' of {a[0]} \(3 of 5 files\) in series CT series"):
        read_ct_hu(a + b)
    pet = write_pet_series(tmp_path / "pet", np.ones((4, 4, 4)))
    ds = pydicom.dcmread(pet[2])
    ds.Modality = "CT"
    ds.save_as(pet[2])
    with pytest.raises(DicomSeriesError, match=rf"^{pet[2]}: Modality \(0008,0060\) 'CT' differs from 'PT' .*in series case 7"):
        load_slice_stack(pet, what="case 7")
    c = write_ct_series(tmp_path / "c", np.zeros((3, 4, 4)))
    ds = pydicom.dcmread(c[1])
    ds.PatientID = "SOMEONE_ELSE"
    ds.save_as(c[1])
    with pytest.raises(DicomSeriesError, match=rf"^{c[1]}: PatientID \(0010,0020\)"):
        read_ct_hu(c)


def test_modality_contradicting_the_sop_class_is_a_problem(tmp_path):
    """A PET series whose every file says Modality CT is still found as PET (by its SOP class), and refused."""
    pet = write_pet_series(tmp_path / "pet", np.ones((3, 4, 4)))
    for path in pet:
        ds = pydicom.dcmread(path)
        ds.Modality = "CT"
        ds.save_as(path)
    (series,), _ = discover_series(tmp_path)
    assert series.modality == "CT" and series.has_pet_files and series.modalities == ("CT", "PT")
    assert series.problem == (
        f"{pet[0]}: Modality (0008,0060) 'CT' contradicts SOPClassUID (0008,0016) 1.2.840.10008.5.1.4.1.1.128 "
        "(a PT image storage class)"
    )
    with pytest.raises(DicomSeriesError, match=r"contradicts SOPClassUID \(0008,0016\)"):
        read_ct_hu(pet)


def test_file_meta_without_preamble_is_read(tmp_path):
    """Some writers drop only the 128-byte preamble and 'DICM', keeping the (0002,xxxx) file meta group."""
    hu = np.arange(2 * 3 * 4, dtype=np.float64).reshape(2, 3, 4)
    files = write_ct_series(tmp_path, hu)
    for path in files:
        path.write_bytes(path.read_bytes()[132:])
    ds = read_dicom(files[0])
    assert str(ds.file_meta.TransferSyntaxUID) == "1.2.840.10008.1.2.1"  # from the kept meta, not guessed
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_ct_hu(files)), hu.astype(np.float32))


def test_a_truncated_slice_without_an_intact_copy_makes_its_series_incomplete(tmp_path):
    """The reader skipped a cut-off file and the series converted a slice short (the last one: evenly spaced)."""
    pet = write_pet_series(tmp_path / "pet", np.ones((5, 8, 8)) * 100)
    whole = pet[4].read_bytes()
    pet[4].write_bytes(whole[: len(whole) - 40])
    (series,), skipped = discover_series(tmp_path)
    assert [p for p, _ in skipped] == [pet[4]] and len(series.files) == 4
    assert series.problem.startswith(f"{pet[4]}: truncated: pixel data (7FE0,0010) needs")
    assert series.problem.endswith("the series has 4 readable files and 1 damaged one(s) without an intact copy, so it is incomplete")


def test_an_unreadable_dicom_file_beside_one_series_makes_it_incomplete(tmp_path):
    """A slice whose header is garbled (still marked 'DICM') cannot name its series; its folder can."""
    pet = write_pet_series(tmp_path / "pet", np.ones((4, 8, 8)) * 100)
    pet[3].write_bytes(b"\x00" * 128 + b"DICM" + b"\x02\x00\x10\x00garbage" * 4)
    (tmp_path / "pet" / "notes.txt").write_text("not DICOM, no marker: no effect")
    write_ct_series(tmp_path / "ct", np.zeros((3, 4, 4)))
    (tmp_path / "ct" / "junk.bin").write_bytes(b"\x00" * 200)
    series, skipped = discover_series(tmp_path)
    assert sorted(p.name for p, _ in skipped) == ["junk.bin", "notes.txt", "pet_003.dcm"]
    by_modality = {s.modality: s for s in series}
    assert by_modality["PT"].problem.startswith(f"{pet[3]}: not readable as DICOM")
    assert "so it is incomplete" in by_modality["PT"].problem
    assert by_modality["CT"].problem == ""


def test_two_differing_copies_of_one_instance_make_the_series_a_problem(tmp_path):
    """Of two copies of one SOPInstanceUID, discovery kept the first in path order, right or wrong."""
    pet = write_pet_series(tmp_path / "pet", np.ones((3, 4, 4)) * 100)
    shutil.copy(pet[0], tmp_path / "pet" / "z_exact_copy.dcm")
    ds = pydicom.dcmread(pet[1])
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    ds.save_as(tmp_path / "pet" / "z_reencoded.dcm", implicit_vr=True, little_endian=True)  # same data set
    assert (tmp_path / "pet" / "z_reencoded.dcm").read_bytes() != pet[1].read_bytes()
    ds = pydicom.dcmread(pet[1])
    (series,), skipped = discover_series(tmp_path)
    assert series.problem == "" and len(skipped) == 2
    ds.RescaleSlope = str(float(ds.RescaleSlope) * 2)
    ds.save_as(tmp_path / "pet" / "a_copy.dcm")  # sorted first: it would have been kept
    (series,), _ = discover_series(tmp_path)
    assert series.problem == (
        f"{pet[1]}: duplicate SOPInstanceUID (0008,0018) {ds.SOPInstanceUID} of {tmp_path / 'pet' / 'a_copy.dcm'}, "
        "and the two copies differ (which one is right is not known)"
    )


def test_a_series_whose_every_file_is_damaged_is_still_found(tmp_path):
    """A PET folder copied with every file cut short must not vanish from the accounting."""
    pet = write_pet_series(tmp_path / "pet", np.ones((3, 8, 8)) * 100, patient_id="GONE")
    for path in pet:
        path.write_bytes(path.read_bytes()[:-40])
    (series,), skipped = discover_series(tmp_path)
    assert len(skipped) == 3 and (series.modality, series.patient_id, series.files) == ("PT", "GONE", tuple(pet))
    assert series.has_pet_files and series.problem.startswith(f"{pet[0]}: truncated: pixel data (7FE0,0010)")
    assert "the series has 0 readable files and 3 damaged one(s)" in series.problem
