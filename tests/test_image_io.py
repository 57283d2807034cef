"""Reading source images whole and finite: truncated NIfTI and NaN/inf voxels are refused by name."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from nnunetv2_l1dfl.conversion.errors import ConversionError
from nnunetv2_l1dfl.conversion.image_io import image_file_problem, nifti_problem, read_image


def _image(array: np.ndarray) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.8, 0.9, 2.5))
    image.SetOrigin((10.0, -20.0, 30.0))
    image.SetDirection((0, -1, 0, 1, 0, 0, 0, 0, 1))
    return image


@pytest.fixture
def pet_volume() -> np.ndarray:
    rng = np.random.default_rng(3)
    return (rng.random((12, 20, 16)) * 10 + 0.5).astype(np.float32)  # no zero voxel anywhere


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".mha"])
def test_complete_images_read_with_values_and_geometry(tmp_path, pet_volume, suffix):
    path = tmp_path / f"pet{suffix}"
    sitk.WriteImage(_image(pet_volume), str(path))
    assert image_file_problem(path) == ""
    image = read_image(path, "PET", "case_1")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), pet_volume)
    assert image.GetSpacing() == pytest.approx((0.8, 0.9, 2.5))
    assert image.GetOrigin() == pytest.approx((10.0, -20.0, 30.0))
    assert image.GetDirection() == pytest.approx((0, -1, 0, 1, 0, 0, 0, 0, 1))


@pytest.mark.parametrize("keep", [0.5, 0.95, "no_trailer"])
def test_truncated_nii_gz_is_refused_not_zero_filled(tmp_path, pet_volume, keep):
    """SimpleITK reads a cut-off .nii.gz as complete with zeros at the end; that must be an error."""
    path = tmp_path / "pet.nii.gz"
    sitk.WriteImage(_image(pet_volume), str(path))
    data = path.read_bytes()
    cut = len(data) - 8 if keep == "no_trailer" else int(len(data) * keep)  # the trailer: CRC32 + size
    path.write_bytes(data[:cut])
    zero_filled = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))  # what the old code converted
    assert zero_filled.shape == pet_volume.shape
    with pytest.raises(ConversionError, match=rf"case case_7: PET {path}: truncated or corrupt gzip stream"):
        read_image(path, "PET", "case_7")


def test_corrupt_gzip_crc_is_refused(tmp_path, pet_volume):
    path = tmp_path / "mask.nii.gz"
    raw = tmp_path / "mask.nii"
    sitk.WriteImage(_image(pet_volume), str(raw))
    payload = bytearray(gzip.compress(raw.read_bytes()))
    payload[-6] ^= 0xFF  # a byte of the CRC32
    path.write_bytes(bytes(payload))
    with pytest.raises(ConversionError, match=rf"mask {path}: truncated or corrupt gzip stream .*CRC"):
        read_image(path, "mask", "c")


def test_truncated_uncompressed_nifti_and_a_gzip_of_a_cut_file(tmp_path, pet_volume):
    raw = tmp_path / "pet.nii"
    sitk.WriteImage(_image(pet_volume), str(raw))
    data = raw.read_bytes()
    raw.write_bytes(data[:-100])
    needed = len(data)
    with pytest.raises(ConversionError, match=rf"PET {raw}: truncated: the header \(dim \(16, 20, 12\), float32, data at byte 352\) needs {needed} bytes, the file has {needed - 100}"):  # noqa: E501
        read_image(raw, "PET", "c")
    # A complete gzip stream of an incomplete NIfTI (cut before compressing): the size check catches it.
    gz = tmp_path / "cut_then_zipped.nii.gz"
    gz.write_bytes(gzip.compress(data[: len(data) // 2]))
    assert nifti_problem(gz).startswith("truncated: the header (dim (16, 20, 12), float32")
    # Cut inside the header.
    (tmp_path / "header.nii").write_bytes(data[:200])
    assert nifti_problem(tmp_path / "header.nii").startswith("not a readable NIfTI header")


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("writer", ["sitk", "nibabel"])
def test_non_finite_nifti_voxels_are_refused(tmp_path, pet_volume, bad_value, writer):
    """SimpleITK's NIfTI reader returns NaN and inf as 0, so the check must read the stored values."""
    pet_volume[5, 7, 3] = bad_value
    path = tmp_path / "pet.nii.gz"
    if writer == "sitk":
        sitk.WriteImage(_image(pet_volume), str(path))
    else:
        nib.save(nib.Nifti1Image(pet_volume.transpose(2, 1, 0), np.diag([0.8, 0.9, 2.5, 1.0])), str(path))
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(path)))[5, 7, 3] == 0  # SimpleITK hides it
    kind = "1 NaN, 0 inf" if np.isnan(bad_value) else "0 NaN, 1 inf"
    with pytest.raises(ConversionError, match=rf"PET {path}: 1 non-finite voxel\(s\) \({kind}\), the first at voxel \(3, 7, 5\)"):
        read_image(path, "PET", "c")


def test_non_finite_voxels_in_other_formats_and_messages_without_a_case(tmp_path, pet_volume):
    pet_volume[0, 0, 1] = np.nan
    pet_volume[2, 3, 4] = np.inf
    path = tmp_path / "pet.mha"
    sitk.WriteImage(_image(pet_volume), str(path))
    with pytest.raises(ConversionError, match=rf"^prediction {path}: 2 non-finite voxel\(s\) \(NaN or inf\), the first at voxel \(1, 0, 0\)$"):
        read_image(path, "prediction")
    with pytest.raises(ConversionError, match=rf"^case x: label file not found: {tmp_path / 'none.nii.gz'}$"):
        read_image(tmp_path / "none.nii.gz", "label", "x")


def test_integer_nifti_with_scaling_and_nifti2_are_read(tmp_path):
    labels = np.zeros((6, 5, 4), np.uint8)
    labels[2:4, 1:3, 1:3] = 2
    path = tmp_path / "label.nii.gz"
    nib.save(nib.Nifti1Image(labels.transpose(2, 1, 0), np.eye(4)), str(path))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_image(path, "label", "c")), labels)
    scaled = nib.Nifti1Image(labels.transpose(2, 1, 0).astype(np.int16), np.eye(4))
    scaled.header.set_slope_inter(0.5, 1.0)
    nib.save(scaled, str(tmp_path / "scaled.nii.gz"))
    assert nifti_problem(tmp_path / "scaled.nii.gz") == ""
    two = tmp_path / "two.nii"
    nib.save(nib.Nifti2Image(np.full((4, 5, 6), np.nan, np.float32), np.eye(4)), str(two))
    assert nifti_problem(two).startswith("120 non-finite voxel(s) (120 NaN, 0 inf)")
    data = two.read_bytes()
    two.write_bytes(data[:-10])
    assert nifti_problem(two).startswith("truncated: the header (dim (4, 5, 6), float32, data at byte 544)")


def test_uncompressed_file_named_nii_gz_is_checked_as_nifti(tmp_path, pet_volume):
    raw = tmp_path / "pet.nii"
    sitk.WriteImage(_image(pet_volume), str(raw))
    misnamed = tmp_path / "pet.nii.gz"
    misnamed.write_bytes(raw.read_bytes())
    assert nifti_problem(misnamed) == ""
    misnamed.write_bytes(raw.read_bytes()[:-4])
    assert nifti_problem(misnamed).startswith("truncated: the header (dim (16, 20, 12), float32")
