"""``l1dfl suv`` faults (issue 10): every failure is one ``error:`` line and a non-zero exit, found before
anything is written, and no output that looks complete is left behind."""

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from _dicom_factories import write_pet_series

from nnunetv2_l1dfl.cli import main

SHAPE = (4, 6, 5)


@pytest.fixture
def pet_dir(tmp_path) -> Path:
    activity = np.random.default_rng(0).uniform(100.0, 20000.0, SHAPE)  # SUVmax about 6
    write_pet_series(tmp_path / "pet", activity)
    return tmp_path / "pet"


def _error_lines(capsys) -> list[str]:
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    return [line for line in captured.err.splitlines() if line.startswith("error:")]


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != "pet")


def test_missing_mask_fails_before_any_output(tmp_path, pet_dir, capsys):
    out = tmp_path / "suv.nii.gz"
    assert main(["suv", str(pet_dir), str(out), "--mask", str(tmp_path / "nope.nii.gz")]) == 2
    errors = _error_lines(capsys)
    assert len(errors) == 1 and "--mask" in errors[0] and "nope.nii.gz" in errors[0]
    assert _leftovers(tmp_path) == []  # the old command had written suv.nii.gz already


def test_unreadable_mask_fails_before_any_output(tmp_path, pet_dir, capsys):
    bad = tmp_path / "mask.nii.gz"
    bad.write_bytes(b"not an image at all")
    out = tmp_path / "suv.nii.gz"
    assert main(["suv", str(pet_dir), str(out), "--mask", str(bad)]) == 2
    errors = _error_lines(capsys)
    assert len(errors) == 1 and "--mask" in errors[0] and "mask.nii.gz" in errors[0], errors
    assert _leftovers(tmp_path) == ["mask.nii.gz"]


def test_truncated_mask_fails_before_any_output(tmp_path, pet_dir, capsys):
    """SimpleITK reads a truncated .nii.gz as if complete (zero-filled): the mask is read whole."""
    reference = tmp_path / "grid" / "suv.nii.gz"
    assert main(["suv", str(pet_dir), str(reference)]) == 0
    mask = sitk.GetImageFromArray(np.random.default_rng(1).integers(0, 2, SHAPE).astype(np.uint8))
    mask.CopyInformation(sitk.ReadImage(str(reference)))  # on the PET grid: only the truncation is wrong
    sitk.WriteImage(mask, str(tmp_path / "mask.nii"))  # uncompressed: cut into the voxel data
    data = (tmp_path / "mask.nii").read_bytes()
    (tmp_path / "mask.nii.gz").write_bytes(__import__("gzip").compress(data[: len(data) - 40]))
    (tmp_path / "mask.nii").unlink()
    capsys.readouterr()
    out = tmp_path / "suv.nii.gz"
    assert main(["suv", str(pet_dir), str(out), "--mask", str(tmp_path / "mask.nii.gz")]) == 2
    errors = _error_lines(capsys)
    assert len(errors) == 1 and "mask.nii.gz" in errors[0], errors
    assert _leftovers(tmp_path) == ["grid", "mask.nii.gz"]


def test_mask_on_another_grid_fails_before_any_output(tmp_path, pet_dir, capsys):
    mask = sitk.Image([3, 3, 3], sitk.sitkUInt8)
    sitk.WriteImage(mask, str(tmp_path / "mask.nii.gz"))
    out = tmp_path / "suv.nii.gz"
    assert main(["suv", str(pet_dir), str(out), "--mask", str(tmp_path / "mask.nii.gz")]) == 2
    errors = _error_lines(capsys)
    assert len(errors) == 1 and "not on the PET grid" in errors[0]
    assert _leftovers(tmp_path) == ["mask.nii.gz"]


def test_unwritable_output_is_one_line_and_leaves_nothing(tmp_path, pet_dir, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert main(["suv", str(pet_dir), str(blocker / "suv.nii.gz")]) == 1  # parent is a file
    errors = _error_lines(capsys)
    assert len(errors) == 1 and "cannot write" in errors[0]
    assert main(["suv", str(pet_dir), str(tmp_path)]) == 2  # a folder
    assert "is a folder" in _error_lines(capsys)[0]
    assert main(["suv", str(pet_dir), str(tmp_path / "suv")]) == 2  # no file ending
    assert "no file ending" in _error_lines(capsys)[0]
    assert main(["suv", str(tmp_path / "missing"), str(tmp_path / "suv.nii.gz")]) == 2
    assert "not found" in _error_lines(capsys)[0]
    assert _leftovers(tmp_path) == ["a_file"]


def test_success_leaves_only_the_output_and_mask_statistics(tmp_path, pet_dir, capsys):
    out = tmp_path / "out" / "suv.nii.gz"
    assert main(["suv", str(pet_dir), str(out)]) == 0
    written = sitk.ReadImage(str(out))
    mask = sitk.Cast(written > 3.0, sitk.sitkUInt8)
    sitk.WriteImage(mask, str(tmp_path / "mask.nii.gz"))
    capsys.readouterr()
    assert main(["suv", str(pet_dir), str(out), "--mask", str(tmp_path / "mask.nii.gz"), "--overwrite"]) == 0
    printed = capsys.readouterr().out
    assert f"mask ({int(sitk.GetArrayFromImage(mask).sum())} voxels)" in printed
    assert sorted(p.name for p in out.parent.iterdir()) == ["suv.nii.gz"]  # no temporary file left
