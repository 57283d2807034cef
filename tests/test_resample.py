"""CT onto the PET grid (different grid, smaller field of view) and label maps that keep lesions."""

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from _dicom_factories import write_ct_series, write_pet_series

from nnunetv2_l1dfl.conversion.dicom_series import load_slice_stack, read_ct_hu
from nnunetv2_l1dfl.conversion.resample import (
    MaskResampleReport,
    ct_coverage_fraction,
    resample_ct_to,
    resample_mask_to,
)


def _grid(size, spacing, origin) -> sitk.Image:
    image = sitk.Image(list(size), sitk.sitkUInt8)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    return image


def _centres(image: sitk.Image) -> np.ndarray:
    """Physical voxel centres (z, y, x, 3) of an axis-aligned image, computed by hand."""
    axes = [image.GetOrigin()[d] + image.GetSpacing()[d] * np.arange(image.GetSize()[d]) for d in range(3)]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    return np.stack([x, y, z], axis=-1).transpose(2, 1, 0, 3)


def test_ct_with_another_grid_and_smaller_field_of_view(tmp_path):
    # PET: 4 mm voxels covering x, y in [-64, 60], z in [0, 60]. CT: 1.5 x 1.5 x 2.5 mm, a smaller box.
    pet_files = write_pet_series(tmp_path / "pet", np.ones((16, 32, 32)), (4.0, 4.0, 4.0), (-64.0, -64.0, 0.0))
    pet = load_slice_stack(pet_files).to_image()
    ct_origin, ct_spacing, ct_shape = np.array([-30.0, -45.0, 10.0]), np.array([1.5, 1.5, 2.5]), (12, 50, 40)
    z, y, x = np.meshgrid(*(ct_origin[d] + ct_spacing[d] * np.arange(ct_shape[2 - d]) for d in (2, 1, 0)), indexing="ij")
    hu = np.round(-500.0 + 10.0 * x - 4.0 * y + 2.0 * z)  # a linear field: linear interpolation is exact
    frame = pydicom.dcmread(pet_files[0]).FrameOfReferenceUID
    ct = read_ct_hu(write_ct_series(tmp_path / "ct", hu, tuple(ct_spacing), tuple(ct_origin), frame_of_reference_uid=frame))

    on_pet = sitk.GetArrayFromImage(resample_ct_to(ct, pet))
    centres = _centres(pet)
    lo, hi = ct_origin, ct_origin + ct_spacing * (np.array(ct_shape[::-1]) - 1)
    inside = np.all((centres >= lo) & (centres <= hi), axis=-1)  # strictly within the outer voxel centres
    expected = -500.0 + 10.0 * centres[..., 0] - 4.0 * centres[..., 1] + 2.0 * centres[..., 2]
    assert on_pet.shape == (16, 32, 32) and on_pet.dtype == np.float32
    np.testing.assert_allclose(on_pet[inside], expected[inside], atol=0.01)
    fov = np.all((centres >= lo - ct_spacing / 2) & (centres <= hi + ct_spacing / 2), axis=-1)
    assert np.all(on_pet[~fov] == -1024.0)

    assert ct_coverage_fraction(ct, pet) == pytest.approx(fov.mean(), abs=1e-12)
    assert 0.05 < fov.mean() < 0.5  # the CT really is smaller than the PET field of view
    assert ct_coverage_fraction(pet, pet) == 1.0


def test_tiny_lesion_is_kept_and_counted(caplog):
    fine = _grid((40, 40, 40), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    labels = np.zeros((40, 40, 40), np.uint8)
    labels[8:24, 8:24, 8:24] = 1  # 16 mm cube: survives any 4 mm grid
    labels[30, 30, 33] = 1  # one 1 mm voxel: its largest fraction on the 4 mm grid is far below 0.5
    labels[4:8, 28:32, 4:8] = 2  # a second label, exactly one coarse voxel
    mask = sitk.GetImageFromArray(labels)
    mask.CopyInformation(fine)
    coarse = _grid((10, 10, 10), (4.0, 4.0, 4.0), (1.5, 1.5, 1.5))

    out, report = resample_mask_to(mask, coarse)
    result = sitk.GetArrayFromImage(out)
    assert out.GetSpacing() == coarse.GetSpacing() and out.GetOrigin() == coarse.GetOrigin()
    assert (report.lesions_before, report.lesions_after, report.lost_lesions, report.rescued_lesions) == (3, 3, 0, 1)
    assert "would vanish" in report.messages[0] and "would vanish" in caplog.text
    # The kept voxel is the coarse voxel whose centre is nearest the 1 mm lesion at (x, y, z) = (33, 30, 30).
    assert result[7, 7, 8] == 1
    np.testing.assert_array_equal(np.unique(result), [0, 1, 2])
    assert (result == 1).sum() == 4 * 4 * 4 + 1 and (result == 2).sum() == 1

    # Without the rescue a plain fraction threshold would lose it: check the premise.
    tiny = sitk.GetImageFromArray((labels == 1).astype(np.float32) * (np.arange(40)[None, None, :] > 28))
    tiny.CopyInformation(fine)
    assert sitk.GetArrayFromImage(sitk.Resample(tiny, coarse, sitk.Transform(), sitk.sitkLinear, 0.0)).max() < 0.5


def test_lesion_outside_the_reference_is_reported_lost_and_same_grid_is_untouched():
    fine = _grid((20, 20, 20), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0))
    labels = np.zeros((20, 20, 20), np.uint8)
    labels[2:6, 2:6, 2:6] = 1
    labels[15:19, 15:19, 15:19] = 1  # beyond the reference's extent below
    mask = sitk.GetImageFromArray(labels)
    mask.CopyInformation(fine)
    small = _grid((12, 12, 12), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0))
    out, report = resample_mask_to(mask, small)
    assert (report.lesions_before, report.lesions_after, report.lost_lesions) == (2, 1, 1)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(out), labels[:12, :12, :12])

    same, report = resample_mask_to(mask, fine)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(same), labels)
    assert report == MaskResampleReport(2, 2, 0)
