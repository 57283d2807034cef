"""Every DICOM SEG and RTSTRUCT in ../shared/data/real_dicom read onto its CT with the converters' readers.

The expected voxel counts are the independently measured ones of ``../shared/data/real_dicom/README.md``
(highdicom 0.28.2 ``get_volume`` per segment, > 0 for BINARY, >= 0.5 of the maximum for FRACTIONAL;
matplotlib ``Path.contains_points`` on the CT's voxel centres for RTSTRUCT, contours to the nearest
slice, dropped beyond half a slice, XOR per slice); they are copied here, not computed by the code
under test. Where the README gives a number of voxel centres lying on a contour edge, a correct
rasterizer may differ by up to that many voxels. The CTs are read with the project's CT reader
(``read_ct_hu``). The folder ships beside the checkout: every test skips with the reason when absent.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import SHARED_DIR

from nnunetv2_l1dfl.conversion.dicom_series import DicomSeriesError, read_ct_hu
from nnunetv2_l1dfl.conversion.masks import (
    MaskError,
    MaskOptions,
    check_structures,
    list_rtstruct_rois,
    read_rtstruct,
    read_seg,
)

REAL = SHARED_DIR / "data" / "real_dicom"
CT2 = "pydicom/dicomdirtests_77654033_CT2"
CT_3SLICE = "dcmqi/ct-3slice"


@pytest.fixture(scope="module")
def real_dicom() -> Path:
    if not REAL.is_dir():
        pytest.skip(
            f"real-world DICOM not found at {REAL}: it ships beside the project checkout in "
            "../shared/data/real_dicom (set L1DFL_SHARED_DIR to the folder holding data/)"
        )
    return REAL


def _ct(root: Path, folder: str) -> sitk.Image:
    path = root / folder
    return read_ct_hu(sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path])


def _voxels(image: sitk.Image) -> int:
    return int(np.count_nonzero(sitk.GetArrayViewFromImage(image)))


# mask: (CT, voxels of the merged label map) from the README's table
SEG_FACTS = {
    "highdicom/seg_image_ct_binary.dcm": (CT2, 638),
    "highdicom/seg_image_ct_binary_fractional.dcm": (CT2, 638),
    "highdicom/seg_image_ct_true_fractional.dcm": (CT2, 638),  # >= 0.5 of 255; 661 voxels are > 0
    "highdicom/seg_image_ct_binary_single_frame.dcm": ("highdicom/ct_image.dcm", 1832),
    "dcmqi/liver.dcm": (CT_3SLICE, 107098),
    "dcmqi/23x38x3/seg/label.seg": ("dcmqi/23x38x3/image", 322),
    "pydicom/liver_1frame.dcm": (CT_3SLICE, 36233),
    "pydicom-data/liver_j2k.dcm": (CT_3SLICE, 107098),  # JPEG 2000 lossless
    "pydicom-data/liver_nonbyte_aligned.dcm": (CT_3SLICE, 107098),  # 510 x 510 1-bit frames
    "pydicom-data/liver_nonbyte_aligned_j2k.dcm": (CT_3SLICE, 107098),
}


@pytest.mark.parametrize("seg", sorted(SEG_FACTS))
def test_real_seg_voxel_counts_on_its_ct(real_dicom, seg):
    folder, voxels = SEG_FACTS[seg]
    ct = _ct(real_dicom, folder)
    result = read_seg(real_dicom / seg, ct)
    assert _voxels(result.label) == voxels
    assert result.label.GetSize() == ct.GetSize() and result.label.GetOrigin() == ct.GetOrigin()
    assert check_structures(result.structures) == []  # nothing lost, nothing to warn about
    assert [st.voxels for st in result.structures[0].stages] == [voxels, voxels]


def test_real_single_frame_seg_on_both_copies_of_its_ct(real_dicom):
    seg = real_dicom / "highdicom/seg_image_ct_binary_single_frame.dcm"
    for folder in ("highdicom/ct_image.dcm", "pydicom/CT_small.dcm"):  # same image, same frame of reference
        assert _voxels(read_seg(seg, _ct(real_dicom, folder)).label) == 1832


def test_real_partially_overlapping_segments(real_dicom):
    ct = _ct(real_dicom, CT_3SLICE)
    result = read_seg(real_dicom / "dcmqi/partial_overlaps.dcm", ct)
    drawn = {s.name: s.stages[0].voxels for s in result.structures}
    assert drawn == {"1 GREEN": 9602, "2 ORANGE": 11888, "3 PURPLE": 10743, "4 LIGHT_BLUE": 6693, "5 DARK_BLUE": 4713}
    assert sum(drawn.values()) == 43639 and _voxels(result.label) == 40505  # union: the overlaps count once
    numbered = read_seg(real_dicom / "dcmqi/partial_overlaps.dcm", ct, keep_segment_numbers=True)
    values = sitk.GetArrayViewFromImage(numbered.label)
    assert _voxels(numbered.label) == 40505 and int((values == 1).sum()) == 9602  # segment 1 wins its overlaps
    assert set(np.unique(values)) == {0, 1, 2, 3, 4, 5}


def test_real_nested_segments_across_a_gap(real_dicom):
    """seg_image_ct_binary_overlap: two nested segments on four slices of one CT series with a
    202.5 mm gap; the series itself is not one volume, the three contiguous slices are."""
    seg = real_dicom / "highdicom/seg_image_ct_binary_overlap.dcm"
    gap_files = sorted((real_dicom / CT2).iterdir()) + [real_dicom / f"{CT2}_slice17106" / "17106"]
    with pytest.raises(DicomSeriesError, match="17136"):
        read_ct_hu(gap_files)
    ct = _ct(real_dicom, CT2)
    result = read_seg(seg, ct)
    assert [(s.name, s.stages[0].voxels, s.stages[-1].voxels) for s in result.structures] == [
        ("1 first segment", 64, 48), ("2 second segment", 16, 12)
    ]
    assert _voxels(result.label) == 48  # union on the three contiguous slices
    with pytest.raises(MaskError, match=r"seg_image_ct_binary_overlap.dcm: segment '1 first segment': 1 of 2 lesion\(s\) "
                       r"lie outside the reference grid"):  # fmt: skip
        check_structures(result.structures)  # the frame at z -99.48 has no slice in this CT
    assert len(check_structures(result.structures, allow_lesion_loss=True)) == 2
    single = read_seg(seg, _ct(real_dicom, f"{CT2}_slice17106"))  # the slice across the gap alone
    assert [s.stages[-1].voxels for s in single.structures] == [16, 4]
    # Labelled by segment number, segment 2 lies wholly inside segment 1, which wins: segment 2 ends empty.
    numbered = read_seg(seg, ct, keep_segment_numbers=True)
    with pytest.raises(MaskError, match=r"segment '2 second segment': entirely under segments of another label"):
        check_structures(numbered.structures)


RT_UTILS_ROIS = {"ROI-1": (4976, 0), "ROI-2": (3697, 0), "ROI-3": (4519, 0), "ROI-4": (6954, 40)}


@pytest.mark.parametrize("rtstruct", ["invalid_reference_rt.dcm", "non_existent_reference_rt.dcm"])
def test_real_rtstruct_rt_utils(real_dicom, rtstruct):
    ct = _ct(real_dicom, "rt-utils/mock_data/ct")
    path = real_dicom / "rt-utils" / "mock_data" / rtstruct
    labels = {f"^{name}$": n for n, name in enumerate(RT_UTILS_ROIS, start=1)}
    result = read_rtstruct(path, ct, MaskOptions(roi_labels=labels))
    values = sitk.GetArrayViewFromImage(result.label)
    for n, (name, (voxels, on_edges)) in enumerate(RT_UTILS_ROIS.items(), start=1):
        assert abs(int((values == n).sum()) - voxels) <= on_edges, name
    merged = read_rtstruct(path, ct, MaskOptions(roi_pattern="ROI"))
    assert abs(_voxels(merged.label) - 20146) <= 40
    # Their third contour plane (z 70) lies outside the two-slice CT: cut off and recorded, not lost.
    warnings = check_structures(merged.structures)
    assert len(warnings) == 4 and all("drawn outside the reference image are cut off" in w for w in warnings)


def test_real_rtstruct_of_another_frame_of_reference(real_dicom):
    """rt-utils' rt.dcm references ct_1.dcm but carries another FrameOfReferenceUID: an error naming
    both UIDs. On a reference without a FrameOfReferenceUID it is read (with a warning): the ring."""
    ct = _ct(real_dicom, "rt-utils/mock_data/ct")
    path = real_dicom / "rt-utils/mock_data/rt.dcm"
    with pytest.raises(MaskError, match=r"rt.dcm: ROI 'ROI-1' FrameOfReferenceUID \(0020,0052\) "
                       r"1.2.826.0.1.3680043.8.498.41321784967516118556817630335498661397 differs from the reference "
                       r"image's 1.2.840.113619.2.405.3.84541899.902.1605198123.912.6060.1"):  # fmt: skip
        read_rtstruct(path, ct, MaskOptions(roi_pattern="ROI"))
    ct.EraseMetaData("0020|0052")
    assert _voxels(read_rtstruct(path, ct, MaskOptions(roi_pattern="ROI")).label) == 1443


def test_real_rtstruct_dicompyler_body_and_empty_rois(real_dicom):
    ct = _ct(real_dicom, "dicompyler-core/example_data/ct")
    path = real_dicom / "dicompyler-core/example_data/rtss.dcm"
    assert "BODY" in list_rtstruct_rois(path)
    with pytest.raises(MaskError, match=r"no ROI name matches 'lesion'.*'BODY'"):
        read_rtstruct(path, ct)  # no ROI name contains 'lesion'
    body = read_rtstruct(path, ct, MaskOptions(roi_pattern="^BODY$"))
    assert abs(_voxels(body.label) - 40396) <= 7
    assert body.structures[0].stages[0].voxels > body.structures[0].stages[1].voxels  # 97 of 98 planes cut off
    every = read_rtstruct(path, ct, MaskOptions(roi_pattern="."))
    assert abs(_voxels(every.label) - 40396) <= 7  # every other ROI is empty on this one slice
    with pytest.raises(MaskError) as error:
        check_structures(every.structures)
    message = str(error.value)
    assert "rtss.dcm: ROI 'Areola': no contours" in message  # Areola has no contours at all
    assert "rtss.dcm: ROI 'Heart': ends empty on the reference grid" in message
    # BODY also has islands (arms, ...) on the 97 planes outside this one-slice CT: lesions lost too.
    assert re.search(r"rtss.dcm: ROI 'BODY': \d+ lesions drawn entirely outside the reference image", message)


def test_real_preamble_less_rtstruct(real_dicom):
    """pydicom's rtstruct.dcm has no preamble and no file meta; its CT is not included, so it is read
    onto a 10 mm grid built here in its frame of reference: each 400 x 300 mm rectangle covers
    40 x 30 voxel centres (the grid's centres lie 5 mm inside the edges), on three slices."""
    path = real_dicom / "pydicom/rtstruct.dcm"
    assert list_rtstruct_rois(path) == ["patient", "Isocenter 1", "Isocenter 2"]
    grid = sitk.Image([44, 34, 5], sitk.sitkFloat32)
    grid.SetSpacing((10.0, 10.0, 10.0))
    grid.SetOrigin((-215.0, -165.0, -210.0))
    grid.SetMetaData("0020|0052", "1.2.826.0.1.3680043.8.498.2010020400001.2")
    result = read_rtstruct(path, grid, MaskOptions(roi_pattern="patient"))
    array = sitk.GetArrayViewFromImage(result.label)
    assert _voxels(result.label) == 3 * 40 * 30
    assert [int(array[k].sum()) for k in range(5)] == [0, 1200, 1200, 1200, 0]
    isocentre = read_rtstruct(path, grid, MaskOptions(roi_pattern="isocenter"))
    with pytest.raises(MaskError, match=r"ROI 'Isocenter 1': 1 contour POINT \(only CLOSED_PLANAR"):
        check_structures(isocentre.structures)


def test_real_files_through_l1dfl_mask(real_dicom, tmp_path, capsys):
    from nnunetv2_l1dfl.cli import main

    out = tmp_path / "liver.nii.gz"
    assert main(["mask", str(real_dicom / "pydicom-data/liver_j2k.dcm"), "--reference", str(real_dicom / CT_3SLICE),
                 "-o", str(out)]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "segment '1 Liver' -> label 1: drawn: 107098 voxels" in printed and "reference: 107098 voxels" in printed
    assert _voxels(sitk.ReadImage(str(out))) == 107098
    assert main(["mask", str(real_dicom / "rt-utils/mock_data/rt.dcm"), "--reference",
                 str(real_dicom / "rt-utils/mock_data/ct"), "-o", str(tmp_path / "rt.nii.gz"), "--roi-pattern", "ROI"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "1.2.826.0.1.3680043.8.498.41321784967516118556817630335498661397 differs" in err[0]
    assert not (tmp_path / "rt.nii.gz").exists()
