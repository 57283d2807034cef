"""RTSTRUCT rasterization (IBSI DROs and synthetic contours), DICOM SEG and NIfTI masks."""

import logging
import re
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from _dicom_factories import write_pet_series, write_rtstruct, write_seg
from scipy import ndimage

from nnunetv2_l1dfl.conversion.dicom_series import load_slice_stack
from nnunetv2_l1dfl.conversion.masks import (
    MaskError,
    MaskOptions,
    check_structures,
    labels_from_image,
    list_rtstruct_rois,
    rasterize_rtstruct,
    read_dicom_seg,
    read_nifti_mask,
    read_rtstruct,
    read_seg,
)
from nnunetv2_l1dfl.conversion.suv import read_pet_suv

DROS = ["DRO_0_0", "DRO_1_0", "DRO_2_0", "DRO_2_4", "DRO_2_5", "DRO_3_0",
        "DRO_3_1", "DRO_3_2", "DRO_3_3", "DRO_3_4", "DRO_4_0", "DRO_4_2"]  # fmt: skip
ROTATED = (0.0, 1.0, 0.0, -1.0, 0.0, 0.0)


@pytest.mark.parametrize("dro", DROS)
def test_dro_rtstruct_rasterizes_to_the_dro_mask(ibsi_dro_dir, dro):
    """The DRO's contours lie about one voxel inside its mask and cover its slices 2..17, while
    DRO_mask.nii.gz also holds slices 1 and 18 and the outer voxel ring: no planar rasterization of
    these contours can give the mask exactly. What is asserted, exactly, per DRO:
    - nothing outside the mask; the two end slices of the mask (no contours there) are empty;
    - on every contoured slice, mask voxels >= 2 voxels from the mask's edge (2D Euclidean distance
      transform) are all inside, the edge voxels (distance 1) all outside, and only the voxels at
      sqrt(2), through whose centres the contour runs, may go either way;
    - SUV min / median / max inside the rasterized ROI equal those inside the mask (0.5 %).
    """
    pet = read_pet_suv(ibsi_dro_dir / dro / "PT", case_id=dro)
    rs_path = next((ibsi_dro_dir / dro / "RS").glob("*.dcm"))
    assert list_rtstruct_rois(rs_path) == ["region_1"]
    with pytest.raises(MaskError, match="ROIs available: 'region_1'"):
        rasterize_rtstruct(rs_path, pet.image)  # the default pattern looks for "lesion"
    image, used = rasterize_rtstruct(rs_path, pet.image, roi_pattern="region")
    assert used == ["region_1"]
    rasterized = sitk.GetArrayFromImage(image).astype(bool)
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(ibsi_dro_dir / dro / "mask" / "DRO_mask.nii.gz"))) > 0

    assert not np.any(rasterized & ~mask)
    mask_slices = np.flatnonzero(mask.any(axis=(1, 2)))
    assert not rasterized[mask_slices[[0, -1]]].any()
    contoured = np.flatnonzero(rasterized.any(axis=(1, 2)))
    np.testing.assert_array_equal(contoured, mask_slices[1:-1])
    for z in contoured:
        distance = ndimage.distance_transform_edt(mask[z])
        assert rasterized[z][distance >= 2].all(), z
        assert not rasterized[z][(distance > 0) & (distance < 1.2)].any(), z
        assert set(np.unique(distance[mask[z] != rasterized[z]])) <= {1.0, np.sqrt(2.0)}, z

    suv = sitk.GetArrayFromImage(pet.image)
    inside_rs, inside_mask = suv[rasterized], suv[mask]
    for statistic in (np.min, np.median, np.max):
        assert statistic(inside_rs) == pytest.approx(statistic(inside_mask), rel=0.005)


@pytest.fixture
def pet_grid(tmp_path):
    """A small rotated PET series and its SimpleITK image (with the FrameOfReferenceUID)."""
    files = write_pet_series(tmp_path / "pet", np.full((8, 20, 18), 1000.0), (2.0, 2.5, 3.0),
                             (-7.0, 11.0, -30.0), orientation=ROTATED)  # fmt: skip
    return files, load_slice_stack(files).to_image()


def _shapes():
    lesion = np.zeros((8, 20, 18), bool)
    lesion[2:6, 4:14, 3:12] = True
    lesion[3:5, 7:10, 6:9] = False  # a hole: an inner contour
    small = np.zeros_like(lesion)
    small[6, 16:18, 14:16] = True
    small[7, 17, 15] = True
    organ = np.zeros_like(lesion)
    organ[:, :3, :] = True
    return lesion, small, organ


def test_rtstruct_round_trip_is_exact_with_holes_and_selection(tmp_path, pet_grid):
    files, reference = pet_grid
    lesion, small, organ = _shapes()
    rs = write_rtstruct(tmp_path / "rs.dcm", files, {"Lesion 1": lesion, "GTV_lesion_2": small, "Liver": organ})
    assert list_rtstruct_rois(rs) == ["Lesion 1", "GTV_lesion_2", "Liver"]

    image, used = rasterize_rtstruct(rs, reference)
    assert used == ["Lesion 1", "GTV_lesion_2"]
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), (lesion | small).astype(np.uint8))
    assert image.GetPixelID() == sitk.sitkUInt8
    assert image.GetDirection() == reference.GetDirection() and image.GetOrigin() == reference.GetOrigin()

    image, used = rasterize_rtstruct(rs, reference, roi_labels={"liver": 3, r"lesion 1$": 1, "lesion": 2})
    expected = np.where(organ, 3, 0) + np.where(lesion, 1, 0) + np.where(small, 2, 0)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), expected)
    assert used == ["Lesion 1", "GTV_lesion_2", "Liver"]

    with pytest.raises(MaskError, match=r"no ROI name matches 'tumou\?r'.*'Lesion 1', 'GTV_lesion_2', 'Liver'"):
        rasterize_rtstruct(rs, reference, roi_pattern="tumou?r")


def test_rtstruct_of_another_frame_of_reference_is_refused(tmp_path, pet_grid, caplog):
    files, reference = pet_grid
    lesion, _, _ = _shapes()
    other = pydicom.uid.generate_uid()
    rs = write_rtstruct(tmp_path / "rs.dcm", files, {"lesion": lesion}, frame_of_reference_uid=other)
    expected = reference.GetMetaData("0020|0052")
    with pytest.raises(MaskError, match=rf"FrameOfReferenceUID \(0020,0052\) {other} differs .*{expected}"):
        rasterize_rtstruct(rs, reference)
    bare = sitk.Image(reference)  # no FrameOfReferenceUID to compare with: rasterized, with a warning
    for key in bare.GetMetaDataKeys():
        bare.EraseMetaData(key)
    with caplog.at_level(logging.WARNING):
        image, _ = rasterize_rtstruct(rs, bare)
    assert "not checked" in caplog.text
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), lesion.astype(np.uint8))


def test_dicom_seg_round_trip_selection_and_other_grid(tmp_path, pet_grid):
    files, reference = pet_grid
    lesion, small, _ = _shapes()
    seg = write_seg(tmp_path / "seg.dcm", files, {"primary lesion": lesion, "node": small})
    assert pydicom.dcmread(seg).NumberOfFrames < 2 * 8  # empty frames were left out of the file

    merged = read_dicom_seg(seg, reference)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(merged), (lesion | small).astype(np.uint8))
    assert merged.GetOrigin() == reference.GetOrigin() and merged.GetDirection() == reference.GetDirection()
    numbered = read_dicom_seg(seg, reference, keep_segment_numbers=True)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(numbered), np.where(small, 2, 0) + np.where(lesion, 1, 0))
    only_node = read_dicom_seg(seg, reference, segment_pattern="NODE")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(only_node), small.astype(np.uint8))
    with pytest.raises(MaskError, match=r"1: 'primary lesion', 2: 'node'"):
        read_dicom_seg(seg, reference, segment_pattern="liver")

    # Onto a grid twice as fine in-plane: every fine voxel centre inside a coarse lesion voxel is set.
    fine = sitk.Image([36, 40, 8], sitk.sitkFloat32)
    fine.SetSpacing((1.0, 1.25, 3.0))
    fine.SetDirection(reference.GetDirection())
    fine.SetOrigin(reference.TransformContinuousIndexToPhysicalPoint((-0.25, -0.25, 0.0)))
    fine.SetMetaData("0020|0052", reference.GetMetaData("0020|0052"))
    on_fine = sitk.GetArrayFromImage(read_dicom_seg(seg, fine))
    np.testing.assert_array_equal(on_fine, np.repeat(np.repeat(lesion | small, 2, axis=1), 2, axis=2).astype(np.uint8))


def test_nifti_mask_same_grid_other_grid_and_bad_values(tmp_path, pet_grid):
    _, reference = pet_grid
    lesion, _, _ = _shapes()
    as_float = sitk.GetImageFromArray(lesion.astype(np.float32))
    as_float.CopyInformation(reference)
    as_float.SetOrigin(tuple(np.add(reference.GetOrigin(), 1e-5)))  # NIfTI float round-off
    sitk.WriteImage(as_float, str(tmp_path / "mask.nii.gz"))
    mask = read_nifti_mask(tmp_path / "mask.nii.gz", reference)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(mask), lesion.astype(np.uint8))
    assert mask.GetOrigin() == reference.GetOrigin() and mask.GetPixelID() == sitk.sitkUInt8

    shifted = sitk.GetImageFromArray(lesion.astype(np.uint8))
    shifted.CopyInformation(reference)
    shifted.SetOrigin(reference.TransformIndexToPhysicalPoint((1, 0, 0)))  # one voxel along x
    sitk.WriteImage(shifted, str(tmp_path / "shifted.nii.gz"))
    moved = sitk.GetArrayFromImage(read_nifti_mask(tmp_path / "shifted.nii.gz", reference))
    expected = np.zeros_like(lesion)
    expected[:, :, 1:] = lesion[:, :, :-1]
    np.testing.assert_array_equal(moved, expected.astype(np.uint8))

    as_float.SetOrigin(reference.GetOrigin())
    sitk.WriteImage(as_float * 0.5, str(tmp_path / "soft.nii.gz"))
    with pytest.raises(MaskError, match=r"soft.nii.gz: mask values are not integers \(0.5; 342 voxels\).*--mask-threshold"):
        read_nifti_mask(tmp_path / "soft.nii.gz", reference)


def test_nifti_mask_whose_lesions_merge_on_the_reference_warns(tmp_path, caplog):
    # Two 1 mm lesions 1 mm apart fill two neighbouring 4 mm voxels: one lesion on the reference.
    labels = np.zeros((12, 12, 16), np.uint8)
    labels[4:8, 4:8, 4:7] = 1
    labels[4:8, 4:8, 8:12] = 1
    fine = sitk.GetImageFromArray(labels)
    fine.SetOrigin((0.0, 0.0, 0.0))
    sitk.WriteImage(fine, str(tmp_path / "fine.nii.gz"))
    reference = sitk.Image([4, 3, 3], sitk.sitkFloat32)
    reference.SetSpacing((4.0, 4.0, 4.0))
    reference.SetOrigin((1.5, 1.5, 1.5))
    with caplog.at_level(logging.INFO, logger="nnunetv2_l1dfl"):
        on_reference = sitk.GetArrayFromImage(read_nifti_mask(tmp_path / "fine.nii.gz", reference))
    np.testing.assert_array_equal(np.flatnonzero(on_reference), np.ravel_multi_index([[1, 1], [1, 1], [1, 2]], (3, 3, 4)))
    record = next(r for r in caplog.records if "resampled onto the reference" in r.getMessage())
    assert record.levelno == logging.WARNING and "fine.nii.gz" in record.getMessage()
    assert "2 lesions before, 1 after, 0 rescued, 0 lost, 1 merged" in record.getMessage()

    labels[4:8, 4:8, 8:12] = 0  # a single lesion: bookkeeping only, at info level
    sitk.WriteImage(sitk.GetImageFromArray(labels), str(tmp_path / "single.nii.gz"))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="nnunetv2_l1dfl"):
        read_nifti_mask(tmp_path / "single.nii.gz", reference)
    record = next(r for r in caplog.records if "resampled onto the reference" in r.getMessage())
    assert record.levelno == logging.INFO and "1 lesions before, 1 after, 0 rescued, 0 lost, 0 merged" in record.getMessage()


# ---- SEG types and lesion accounting (issue 10) ------------------------------------------------


def test_seg_of_every_type_binary_fractional_labelmap(tmp_path, pet_grid):
    """LABELMAP: pixel value = segment number and segment 0 'Background' is never a lesion (it made
    the whole volume lesion); FRACTIONAL: a voxel is in at >= 0.5 of MaximumFractionalValue."""
    files, reference = pet_grid
    lesion, small, _ = _shapes()
    labelmap = write_seg(tmp_path / "labelmap.dcm", files, {"lesion": lesion, "node": small}, segmentation_type="LABELMAP")
    header = pydicom.dcmread(labelmap)
    assert header.SegmentationType == "LABELMAP"
    assert [(int(s.SegmentNumber), s.SegmentLabel) for s in header.SegmentSequence][0] == (0, "Background")
    merged = sitk.GetArrayFromImage(read_dicom_seg(labelmap, reference))
    np.testing.assert_array_equal(merged, (lesion | small).astype(np.uint8))
    numbered = sitk.GetArrayFromImage(read_dicom_seg(labelmap, reference, keep_segment_numbers=True))
    np.testing.assert_array_equal(numbered, np.where(small, 2, 0) + np.where(lesion, 1, 0))
    with pytest.raises(MaskError, match=r"no SegmentLabel .* matches 'background'; segments: 0: 'Background', 1: 'lesion'"):
        read_dicom_seg(labelmap, reference, segment_pattern="background")

    probability = np.where(lesion, 0.6, 0.0) + np.where(small, 0.4, 0.0)  # 153/255 and 102/255
    fractional = write_seg(tmp_path / "fractional.dcm", files, {"lesion": probability}, segmentation_type="FRACTIONAL")
    assert pydicom.dcmread(fractional).SegmentationType == "FRACTIONAL"
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_dicom_seg(fractional, reference)), lesion.astype(np.uint8))

    # A BINARY segment labelled 'Background' is not taken by default, only when a pattern asks for it.
    with_background = write_seg(tmp_path / "bg.dcm", files, {"Background": ~lesion, "lesion": lesion})
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_dicom_seg(with_background, reference)), lesion.astype(np.uint8))
    everything = sitk.GetArrayFromImage(read_dicom_seg(with_background, reference, segment_pattern="."))
    assert everything.all()


def _rtstruct(tmp_path, files, rois) -> pydicom.Dataset:
    path = write_rtstruct(tmp_path / "rs.dcm", files, rois)
    return pydicom.dcmread(path)


def _contours_of(ds: pydicom.Dataset, name: str):
    number = next(int(r.ROINumber) for r in ds.StructureSetROISequence if r.ROIName == name)
    return next(item for item in ds.ROIContourSequence if int(item.ReferencedROINumber) == number)


def _shift(contour, dx=0.0, dz=0.0) -> None:
    points = np.asarray(contour.ContourData, float).reshape(-1, 3) + [dx, 0.0, dz]
    contour.ContourData = [f"{v:.6f}" for v in points.ravel()]


def _mutated(tmp_path, files, mutate) -> Path:
    lesion, small, _ = _shapes()
    ds = _rtstruct(tmp_path, files, {"lesion 1": lesion, "lesion 2": small, "lesion 3": np.zeros_like(lesion)})
    mutate(ds)
    path = tmp_path / "mutated.dcm"
    ds.save_as(path)
    return path


def _open_planar(ds):
    for contour in _contours_of(ds, "lesion 2").ContourSequence:
        contour.ContourGeometricType = "OPEN_PLANAR"


def _two_points(ds):
    for contour in _contours_of(ds, "lesion 2").ContourSequence:
        contour.ContourData = contour.ContourData[:6]
        contour.NumberOfContourPoints = 2


def _outside_z(ds):
    for contour in _contours_of(ds, "lesion 2").ContourSequence:
        _shift(contour, dz=30.0)  # the grid spans 8 slices of 3 mm


def _outside_in_plane(ds):
    for contour in _contours_of(ds, "lesion 2").ContourSequence:
        _shift(contour, dx=300.0)


def _dangling(ds):
    _contours_of(ds, "lesion 2").ReferencedROINumber = 77


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (_open_planar, r"ROI 'lesion 2': 2 contours OPEN_PLANAR \(only CLOSED_PLANAR contours enclose a volume\) cannot be rasterized"),
        (_two_points, r"ROI 'lesion 2': 2 contours with 2 point\(s\) \(a closed contour needs 3\) cannot be rasterized"),
        (_outside_z, r"ROI 'lesion 2': 1 lesion drawn entirely outside the reference image"),
        (_outside_in_plane, r"ROI 'lesion 2': 1 lesion drawn entirely outside the reference image"),
        (_dangling, r"ReferencedROINumber \(3006,0084\) 77: no ROI of that number .* 2 contours cannot be selected"),
    ],
    ids=["open_planar", "two_points", "outside_z", "outside_in_plane", "dangling_roi_number"],
)
def test_rtstruct_lesion_loss_fails_naming_file_and_roi(tmp_path, pet_grid, caplog, mutate, reason):
    """Each of these lost a lesion silently; now the loss names the file and the ROI, once per ROI
    with a count, and ``allow_lesion_loss`` records it as a warning instead."""
    files, reference = pet_grid
    lesion, _, _ = _shapes()
    path = _mutated(tmp_path, files, mutate)
    with caplog.at_level(logging.WARNING, logger="nnunetv2_l1dfl"):
        result = read_rtstruct(path, reference)
    with pytest.raises(MaskError, match=rf"mutated.dcm: .*{reason}") as error:
        check_structures(result.structures)
    # 'lesion 3' has no contours at all: it ends empty, in the same message.
    assert "ROI 'lesion 3': no contours" in str(error.value) and "--allow-lesion-loss" in str(error.value)
    assert sum("lesion 2" in r.getMessage() for r in caplog.records) == 1  # once per ROI, not per plane
    np.testing.assert_array_equal(sitk.GetArrayFromImage(result.label), lesion.astype(np.uint8))
    warnings = check_structures(result.structures, allow_lesion_loss=True)
    assert any(w.startswith("lesion loss accepted (--allow-lesion-loss): ") and re.search(reason, w) for w in warnings)


def test_rtstruct_accounting_counts_each_roi_and_partial_cuts(tmp_path, pet_grid):
    files, reference = pet_grid
    lesion, small, _ = _shapes()
    top = np.zeros_like(lesion)
    top[5:8, 2:5, 2:5] = True  # 27 voxels on the last three slices
    ds = _rtstruct(tmp_path, files, {"lesion 1": lesion, "lesion 2": small, "lesion top": top})
    for contour in _contours_of(ds, "lesion top").ContourSequence:
        _shift(contour, dz=3.0)  # one slice up: its top slice now lies above the grid
    path = tmp_path / "shifted.dcm"
    ds.save_as(path)
    result = read_rtstruct(path, reference)
    by_name = {s.name: s for s in result.structures}
    assert [(st.name, st.voxels, st.lesions) for st in by_name["lesion 1"].stages] == [
        ("drawn", int(lesion.sum()), 1), ("reference", int(lesion.sum()), 1)
    ]
    assert [(st.voxels, st.lesions) for st in by_name["lesion 2"].stages] == [(4 + 1, 1), (5, 1)]
    assert [st.voxels for st in by_name["lesion top"].stages] == [27, 18]
    assert by_name["lesion top"].stages[0].ml == pytest.approx(27 * 2.0 * 2.5 * 3.0 / 1000)
    assert check_structures(result.structures) == [
        f"{path}: ROI 'lesion top': 9 of 27 voxels (33.3%) drawn outside the reference image are cut off"
    ]


def test_seg_frames_outside_the_reference_and_empty_seg_fail(tmp_path, pet_grid):
    files, reference = pet_grid
    lesion, small, _ = _shapes()
    seg = write_seg(tmp_path / "seg.dcm", files, {"primary lesion": lesion, "node": small})
    lower = reference[:, :, :5]  # slices 0..4: the node (slices 6, 7) lies above it
    result = read_seg(seg, lower)
    node = result.structures[1]
    assert [(st.name, st.voxels, st.lesions) for st in node.stages] == [("drawn", 5, 1), ("reference", 0, 0)]
    with pytest.raises(MaskError, match=r"seg.dcm: segment '2 node': 1 of 1 lesion\(s\) lie outside the reference grid"):
        check_structures(result.structures)
    assert [st.voxels for st in result.structures[0].stages] == [342, 90 + 81 + 81]  # its slice 5 is cut off

    empty = write_seg(tmp_path / "empty.dcm", files, {"lesion": np.zeros_like(lesion)}, omit_empty_frames=False)
    result = read_seg(empty, reference)
    with pytest.raises(MaskError, match=r"empty.dcm: segment '1 lesion': empty in the SEG \(BINARY: no voxel in any frame\)"):
        check_structures(result.structures)
    assert check_structures(result.structures, allow_lesion_loss=True)[0].startswith("lesion loss accepted")


def test_nifti_mask_threshold_only_when_asked(tmp_path, pet_grid):
    _, reference = pet_grid
    lesion, _, _ = _shapes()
    soft = sitk.GetImageFromArray(np.where(lesion, 0.5, 0.0).astype(np.float32))
    soft.CopyInformation(reference)
    with pytest.raises(MaskError, match=r"soft.nii.gz: mask values are not integers \(0.5; 342 voxels\)"):
        labels_from_image(soft, "soft.nii.gz")
    result = labels_from_image(soft, "soft.nii.gz", MaskOptions(mask_threshold=0.5))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(result.label), lesion.astype(np.uint8))
    assert "thresholded at 0.5" in check_structures(result.structures)[0]
    with pytest.raises(MaskError, match="positive"):
        MaskOptions(mask_threshold=0.0)


# ---- l1dfl mask ---------------------------------------------------------------------------------


def test_mask_command_rtstruct_seg_and_nifti_onto_a_reference(tmp_path, pet_grid, capsys):
    from nnunetv2_l1dfl.cli import main

    files, reference = pet_grid
    lesion, small, _ = _shapes()
    rs = write_rtstruct(tmp_path / "rs.dcm", files, {"Lesion 1": lesion, "lesion 2": small})
    out = tmp_path / "out" / "rs.nii.gz"
    assert main(["mask", str(rs), "--reference", str(tmp_path / "pet"), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(out))), (lesion | small).astype(np.uint8))
    assert sitk.ReadImage(str(out)).GetOrigin() == pytest.approx(reference.GetOrigin())
    ml = int(lesion.sum()) * 2.0 * 2.5 * 3.0 / 1000
    assert f"ROI 'Lesion 1' -> label 1: drawn: {int(lesion.sum())} voxels, {ml:.3f} ml, 1 lesion(s); reference: " in printed
    assert "ROI 'lesion 2' -> label 1: drawn: 5 voxels" in printed and f"wrote {out}: {int((lesion | small).sum())}" in printed
    assert sorted(p.name for p in out.parent.iterdir()) == ["rs.nii.gz"]  # no temporary file left

    # The same SEG onto a NIfTI reference, and a fractional NIfTI mask onto the DICOM folder.
    seg = write_seg(tmp_path / "seg.dcm", files, {"lesion": lesion})
    sitk.WriteImage(reference, str(tmp_path / "reference.nii.gz"))
    assert main(["mask", str(seg), "--reference", str(tmp_path / "reference.nii.gz"), "-o", str(tmp_path / "s.nii.gz")]) == 0
    assert "segment '1 lesion' -> label 1" in capsys.readouterr().out
    soft = sitk.GetImageFromArray(np.where(lesion, 0.7, 0.0).astype(np.float32))
    soft.CopyInformation(reference)
    sitk.WriteImage(soft, str(tmp_path / "soft.nii.gz"))
    assert main(["mask", str(tmp_path / "soft.nii.gz"), "--reference", str(tmp_path / "pet"), "-o", str(tmp_path / "t.nii.gz")]) == 2
    assert "mask values are not integers (0.7" in capsys.readouterr().err and not (tmp_path / "t.nii.gz").exists()
    assert main(["mask", str(tmp_path / "soft.nii.gz"), "--reference", str(tmp_path / "pet"), "-o", str(tmp_path / "t.nii.gz"),
                 "--mask-threshold", "0.5"]) == 0  # fmt: skip
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "t.nii.gz"))), lesion.astype(np.uint8))


def test_mask_command_lesion_loss_and_bad_input_write_nothing(tmp_path, pet_grid, capsys):
    from nnunetv2_l1dfl.cli import main

    files, _ = pet_grid
    path = _mutated(tmp_path, files, _outside_z)
    out = tmp_path / "out" / "m.nii.gz"
    assert main(["mask", str(path), "--reference", str(tmp_path / "pet"), "-o", str(out)]) == 1
    captured = capsys.readouterr()
    assert "  LOST: 1 lesion drawn entirely outside the reference image" in captured.out
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: lesion loss: ") and err[0].endswith("nothing written")
    assert not out.parent.exists()
    assert main(["mask", str(path), "--reference", str(tmp_path / "pet"), "-o", str(out), "--allow-lesion-loss"]) == 0
    assert out.is_file() and sorted(p.name for p in out.parent.iterdir()) == ["m.nii.gz"]

    for argv, message in [
        ([str(tmp_path / "none.dcm"), "--reference", str(tmp_path / "pet"), "-o", str(out)], "mask file not found"),
        ([str(path), "--reference", str(tmp_path / "out"), "-o", str(out)], "holds 0 PET/CT series"),
        ([str(path), "--reference", str(tmp_path / "pet"), "-o", str(tmp_path)], "must be an image file"),
        ([str(files[0]), "--reference", str(tmp_path / "pet"), "-o", str(tmp_path / "x.nii.gz")], "Modality (0008,0060) is 'PT'"),
    ]:
        assert main(["mask", *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "x.nii.gz").exists()


# ---- through the DICOM converter ------------------------------------------------------------------


def _dicom_study(root: Path, mask_writer) -> np.ndarray:
    """A PET (Bq/ml, SUV tags of the factory), a CT on the PET grid and a mask written by ``mask_writer``."""
    import _conversion_helpers as h
    from _dicom_factories import write_ct_series
    from pydicom.uid import generate_uid

    common = dict(study_uid=generate_uid(), frame_of_reference_uid=generate_uid())
    bqml_per_suv = 3.5e8 * 2.0 ** (-3600.0 / 6586.2) / 75e3
    pet = write_pet_series(root / "pet", h.pet_suv_volume() * bqml_per_suv, h.PET_SPACING, h.PET_ORIGIN, **common)
    write_ct_series(root / "ct", h.ct_volume(h.PET_SHAPE, h.PET_SPACING, h.PET_ORIGIN), h.PET_SPACING, h.PET_ORIGIN,
                    **common)  # fmt: skip
    lesions = h.lesion_mask(h.PET_SHAPE, h.PET_SPACING, h.PET_ORIGIN).astype(bool)
    mask_writer(root, pet, lesions)
    return lesions


def _metadata_rows(dataset: Path) -> dict[str, dict[str, str]]:
    import csv

    with (dataset / "case_metadata.csv").open(newline="") as f:
        return {row["case_id"]: row for row in csv.DictReader(f)}


def test_dicom_converter_labelmap_seg_and_lost_rtstruct_roi(tmp_path, capsys):
    from nnunetv2_l1dfl.cli import main

    def labelmap(root, pet, lesions):
        write_seg(root / "seg.dcm", pet, {"lesions": lesions}, segmentation_type="LABELMAP")

    lesions = _dicom_study(tmp_path / "a", labelmap)
    raw = tmp_path / "raw"
    convert = ["convert", "dicom", "-n", "M", "-o", str(raw), "--no-progress"]
    assert main([*convert[:2], str(tmp_path / "a"), "-d", "521", *convert[2:]]) == 0, capsys.readouterr().err
    labels = sorted((raw / "Dataset521_M" / "labelsTr").iterdir())
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(labels[0]))), lesions.astype(np.uint8))

    def with_open_planar(root, pet, lesions):
        second = np.zeros_like(lesions)
        second[2, 2:4, 2:4] = True
        path = write_rtstruct(root / "rs.dcm", pet, {"lesion A": lesions, "lesion B": second})
        ds = pydicom.dcmread(path)
        for contour in _contours_of(ds, "lesion B").ContourSequence:
            contour.ContourGeometricType = "OPEN_PLANAR"
        ds.save_as(path)

    _dicom_study(tmp_path / "b", with_open_planar)
    assert main([*convert[:2], str(tmp_path / "b"), "-d", "522", *convert[2:]]) == 1
    assert re.search(r"FAILED \S+: lesion loss: \S+rs.dcm: ROI 'lesion B': 1 contour OPEN_PLANAR .*cannot be rasterized",
                     capsys.readouterr().err)  # fmt: skip
    assert main([*convert[:2], str(tmp_path / "b"), "-d", "523", *convert[2:], "--allow-lesion-loss"]) == 0
    (row,) = _metadata_rows(raw / "Dataset523_M").values()
    assert "lesion loss accepted (--allow-lesion-loss): " in row["warnings"] and "ROI 'lesion B'" in row["warnings"]
    assert row["n_lesions"] == "2"


def test_mask_threshold_leaves_integer_label_maps_alone(pet_grid):
    _, reference = pet_grid
    lesion, small, _ = _shapes()
    labels = sitk.GetImageFromArray((np.where(lesion, 1, 0) + np.where(small, 2, 0)).astype(np.uint8))
    labels.CopyInformation(reference)
    result = labels_from_image(labels, "gtv.nii.gz", MaskOptions(mask_threshold=0.5), allowed=[1, 2])
    np.testing.assert_array_equal(sitk.GetArrayFromImage(result.label), sitk.GetArrayFromImage(labels))
    assert [s.name for s in result.structures] == ["value 1", "value 2"] and check_structures(result.structures) == []
    with pytest.raises(MaskError, match=r"gtv.nii.gz: label values \[2\] are not among the dataset's labels \[1\]"):
        labels_from_image(labels, "gtv.nii.gz", allowed=[1])
