"""``l1dfl compare`` refuses inputs it cannot score truthfully, with one line naming the file.

Issue 10: negative labels were counted as background, a ``--pet-channel`` at the CT channel was
accepted, NaN probabilities gave a cryptic error, truncated images changed the metrics silently and
``-o FILE`` ended in a traceback. Each test builds the miniature results tree of
``_evaluation_helpers`` (whose metrics are known) and breaks one input.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from _evaluation_helpers import CANDIDATE, REFERENCE, SHAPE, build_nnunet_tree, gt_and_pet, write_image

from nnunetv2_l1dfl.cli import main


def run(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(["compare", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, out: str, err: str, *needles: str) -> None:
    assert code == 2, (out, err)
    lines = [line for line in err.splitlines() if line.strip() and "compare:" in line]
    assert len(lines) == 1, err
    assert "Traceback" not in err + out
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.fixture
def tree(nnunet_env):
    return build_nnunet_tree(nnunet_env, with_npz=False)


def _folders(tree, tmp_path) -> dict[str, Path]:
    folders = {}
    for trainer, folder in tree["trainer_folders"].items():
        folders[trainer] = tmp_path / trainer
        folders[trainer].mkdir()
        for prediction in folder.glob("fold_*/validation/*.nii.gz"):
            shutil.copy(prediction, folders[trainer])
    return folders


def _folder_args(tree, folders, out) -> list[str]:
    args = []
    for name, folder in folders.items():
        args += ["--pred", f"{name}={folder}"]
    return [*args, "--gt", str(tree["raw"] / "labelsTr"), "--pet", str(tree["raw"] / "imagesTr"), "-o", str(out),
            "--no-plots", "-np", "1"]  # fmt: skip


def _nnunet_args(out) -> list[str]:
    return ["-d", "987", "-tr", REFERENCE, CANDIDATE, "-o", str(out), "--no-plots", "-np", "1"]


def _truncate(path: Path, fraction: float = 0.8) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


def test_negative_label_in_gt_is_refused(tree, tmp_path, capsys):
    gt, _ = gt_and_pet([((1, 3), (1, 4), (1, 4))])
    negative = gt.astype(np.int16)
    negative[6, 12, 12] = -1  # was counted as background
    bad = write_image(tree["raw"] / "labelsTr" / "case_02.nii.gz", negative)
    code, out, err = run(_nnunet_args(tmp_path / "o"), capsys)
    assert_one_line_error(code, out, err, str(bad), "negative")
    assert not (tmp_path / "o" / "summary.json").exists()


def test_negative_label_in_prediction_is_refused(tree, tmp_path, capsys):
    folders = _folders(tree, tmp_path)
    pred = np.zeros(SHAPE, np.int16)
    pred[2, 2, 2] = -3
    bad = write_image(folders[CANDIDATE] / "case_04.nii.gz", pred)
    code, out, err = run(_folder_args(tree, folders, tmp_path / "o"), capsys)
    assert_one_line_error(code, out, err, str(bad), "-3")


def _name_channels(tree, **keys) -> None:
    path = tree["raw"] / "dataset.json"
    dataset_json = json.loads(path.read_text())
    dataset_json.update(keys)
    path.write_text(json.dumps(dataset_json))


def test_pet_channel_at_the_ct_channel_is_refused_by_modality(tree, tmp_path, capsys):
    """What ``l1dfl convert`` writes: both channels named CT (CT normalization), modalities say which is PET."""
    _name_channels(tree, channel_modalities={"0": "CT in Hounsfield units", "1": "PET in SUVbw"})
    code, out, err = run([*_nnunet_args(tmp_path / "o"), "--pet-channel", "0"], capsys)
    assert_one_line_error(code, out, err, "--pet-channel 0", "CT in Hounsfield units", "dataset.json", "channel 1")
    folders = _folders(tree, tmp_path)
    code, out, err = run([*_folder_args(tree, folders, tmp_path / "o2"), "--pet-channel", "0"], capsys)
    assert_one_line_error(code, out, err, "--pet-channel 0", str(tree["raw"] / "dataset.json"))
    # the right channel still works
    code, out, err = run([*_folder_args(tree, folders, tmp_path / "o3"), "--pet-channel", "1"], capsys)
    assert code == 0, err


def test_pet_channel_at_the_ct_channel_is_refused_by_name(tree, tmp_path, capsys):
    _name_channels(tree, channel_names={"0": "CT", "1": "PET"})
    code, out, err = run([*_nnunet_args(tmp_path / "o"), "--pet-channel", "0"], capsys)
    assert_one_line_error(code, out, err, "--pet-channel 0", "'CT'", "channel 1")


def test_pet_channel_not_in_dataset_json_is_refused(tree, tmp_path, capsys):
    _name_channels(tree, channel_modalities={"0": "CT in Hounsfield units", "1": "PET in SUVbw"})
    for pet in list((tree["raw"] / "imagesTr").glob("*_0001.nii.gz")):  # the files exist; dataset.json has no channel 2
        shutil.copy(pet, pet.with_name(pet.name.replace("_0001", "_0002")))
    code, out, err = run([*_nnunet_args(tmp_path / "o"), "--pet-channel", "2"], capsys)
    assert_one_line_error(code, out, err, "--pet-channel 2", "dataset.json")


def test_nan_in_npz_probabilities_names_the_file(tree, tmp_path, capsys):
    folders = _folders(tree, tmp_path)
    gt, _ = gt_and_pet([((1, 3), (1, 4), (1, 4))])
    foreground = np.where(gt > 0, 0.8, 0.2).astype(np.float32)
    probabilities = np.stack([1 - foreground, foreground])
    probabilities[:, 4, 4, 4] = np.nan
    bad = folders[CANDIDATE] / "case_00.npz"
    np.savez_compressed(bad, probabilities=probabilities)
    code, out, err = run(_folder_args(tree, folders, tmp_path / "o"), capsys)
    assert_one_line_error(code, out, err, str(bad), "NaN")


@pytest.mark.parametrize("which", ["gt", "prediction", "pet"])
def test_truncated_image_is_refused(tree, tmp_path, capsys, which):
    folders = _folders(tree, tmp_path)
    bad = {
        "gt": tree["raw"] / "labelsTr" / "case_05.nii.gz",
        "prediction": folders[REFERENCE] / "case_05.nii.gz",
        "pet": tree["raw"] / "imagesTr" / "case_05_0001.nii.gz",
    }[which]
    _truncate(bad)
    code, out, err = run(_folder_args(tree, folders, tmp_path / "o"), capsys)
    assert_one_line_error(code, out, err, str(bad))
    assert not (tmp_path / "o" / "summary.json").exists()


def test_nan_in_pet_is_refused(tree, tmp_path, capsys):
    """SimpleITK's NIfTI reader turns NaN into 0; the PET must be read by a reader that keeps it."""
    folders = _folders(tree, tmp_path)
    _, pet = gt_and_pet([((1, 3), (1, 4), (1, 4))])
    pet[3, 3, 3] = np.nan
    import nibabel as nib

    bad = tree["raw"] / "imagesTr" / "case_00_0001.nii.gz"
    reference = nib.load(str(bad))
    nib.save(nib.Nifti1Image(np.asarray(pet).transpose(2, 1, 0), reference.affine, reference.header), str(bad))
    code, out, err = run(_folder_args(tree, folders, tmp_path / "o"), capsys)
    assert_one_line_error(code, out, err, str(bad), "NaN")


def test_output_that_is_a_file_is_refused(tree, tmp_path, capsys):
    out_file = tmp_path / "report.txt"
    out_file.write_text("keep me")
    code, out, err = run(_nnunet_args(out_file), capsys)
    assert_one_line_error(code, out, err, str(out_file), "not a folder")
    assert out_file.read_text() == "keep me"


def test_unwritable_output_is_one_line(tree, tmp_path, capsys, monkeypatch):
    """A write that fails half-way (disk full) leaves no report files behind that look complete."""
    from nnunetv2_l1dfl.evaluation import report

    real_write_csv = report.write_csv
    calls = []

    def full_disk_after_one_file(path, *args, **kwargs):
        calls.append(path)
        if len(calls) > 1:
            raise OSError(28, "No space left on device", str(path))
        return real_write_csv(path, *args, **kwargs)

    monkeypatch.setattr(report, "write_csv", full_disk_after_one_file)
    out_dir = tmp_path / "o"
    code, out, err = run(_nnunet_args(out_dir), capsys)
    assert_one_line_error(code, out, err, "No space left on device")
    assert len(calls) == 2
    assert not [p.name for p in out_dir.iterdir() if p.name in ("cases.csv", "lesions.csv", "summary.json", "report.md")]
