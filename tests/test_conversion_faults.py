"""Faults of the machine and of the user around the dataset folder (issue 10, "Faults").

- A crash at any rename of a case: what nnU-Net enumerates (``get_filenames_of_train_images_and_
  targets``, the function its planning, preprocessing and integrity check use) is complete and of
  one version at every instant; the next run repairs the folder. Crashes are injected by wrapping
  ``os.replace`` (every rename into the dataset counts) and raising a ``BaseException``, which
  nothing in the writer catches, as a killed process would.
- Disk full: SimpleITK does not raise on a short write. Simulated with a tiny tmpfs mounted by the
  test (root only; skipped with the reason otherwise) and, everywhere, by a hook around
  ``SimpleITK.WriteImage`` that truncates what it wrote.
- A read-only dataset (tmpfs remounted read-only; root only), ``-o`` a file, ``l1dfl splits --folds 1``.
- Two conversions into one dataset: a lock in ``.l1dfl/lock``.

Each must end in one-line errors, a non-zero exit, no traceback, and no output that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import _conversion_helpers as h
import numpy as np
import pytest
import SimpleITK as sitk

from nnunetv2_l1dfl.cli import main
from nnunetv2_l1dfl.conversion.dataset_folder import DatasetSpec, LoadedCase
from nnunetv2_l1dfl.conversion.runner import CaseJob, convert_cases

REPO = Path(__file__).resolve().parents[1]


class Crash(BaseException):
    """A process killed mid-write: not an Exception, so no except clause of the writer sees it."""


# ----------------------------------------------------------------------------- in-memory cases

LESIONS_V2 = (((-10.0, -6.0, 30.0), 7.0),)  # the second version of a case: other lesion, other PET


def load_synthetic(job: CaseJob) -> LoadedCase:
    """Module-level (picklable) loader: CT, PET and label on the PET grid from ``job.payload``."""

    def image(array):
        img = sitk.GetImageFromArray(array)
        img.SetSpacing(h.PET_SPACING)
        img.SetOrigin(h.PET_ORIGIN)
        return img

    lesions = job.payload["lesions"]
    return LoadedCase(
        ct=image(h.ct_volume(h.PET_SHAPE, h.PET_SPACING, h.PET_ORIGIN)),
        pet=image(h.pet_suv_volume(lesions)),
        label=image(h.lesion_mask(h.PET_SHAPE, h.PET_SPACING, h.PET_ORIGIN, lesions)),
        metadata={"study_date": "20240101"},
    )


def _jobs(versions: dict[str, tuple]) -> list[CaseJob]:
    return [CaseJob(c, f"patient-{c}", f"synthetic {c}", {"lesions": lesions}) for c, lesions in versions.items()]


def _nnunet_view(dataset: Path) -> dict[str, dict]:
    """What nnU-Net 2.8 would train on right now; {} when there is no dataset.json yet."""
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    if not (dataset / "dataset.json").is_file():
        return {}
    return get_filenames_of_train_images_and_targets(str(dataset))


def _assert_consistent(dataset: Path, allowed: dict[str, list[tuple]]) -> set[str]:
    """Every case nnU-Net lists is complete, reads back whole, and its PET and label are of one version."""
    from nnunetv2_l1dfl.conversion.image_io import nifti_problem

    view = _nnunet_view(dataset)
    if view:
        assert json.loads((dataset / "dataset.json").read_text())["numTraining"] == len(view)
    for case_id, files in view.items():
        paths = [*files["images"], files["label"]]
        assert len(files["images"]) == 2, (case_id, files)
        for path in paths:
            assert os.path.isfile(path), f"nnU-Net lists {case_id} but {path} is missing"
            assert nifti_problem(path) == "", path
        pet = sitk.GetArrayFromImage(sitk.ReadImage(files["images"][1]))
        label = sitk.GetArrayFromImage(sitk.ReadImage(files["label"]))
        versions = [
            (np.array_equal(pet, h.pet_suv_volume(v)), np.array_equal(label, h.lesion_mask(h.PET_SHAPE, h.PET_SPACING, h.PET_ORIGIN, v)))
            for v in allowed[case_id]
        ]  # fmt: skip
        assert (True, True) in versions, f"{case_id}: PET and label of different versions {versions}"
    return set(view)


def _count_renames(dataset: Path, run) -> int:
    real_replace = os.replace
    count = 0

    def counting(src, dst, *args, **kwargs):
        nonlocal count
        if str(dst).startswith(str(dataset)):
            count += 1
        return real_replace(src, dst, *args, **kwargs)

    os.replace = counting
    try:
        run()
    finally:
        os.replace = real_replace
    return count


def _crash_at(dataset: Path, step: int, run) -> None:
    real_replace = os.replace
    count = 0

    def crashing(src, dst, *args, **kwargs):
        nonlocal count
        if str(dst).startswith(str(dataset)):
            if count == step:
                raise Crash(f"killed before rename {step}: {src} -> {dst}")
            count += 1
        return real_replace(src, dst, *args, **kwargs)

    os.replace = crashing
    try:
        with pytest.raises(Crash):
            run()
    finally:
        os.replace = real_replace


FIRST = {"a": h.LESIONS_MM, "b": h.LESIONS_MM}
SECOND = {"a": LESIONS_V2, "b": h.LESIONS_MM, "c": LESIONS_V2}  # a rewritten with new content, c new
ALLOWED = {"a": [h.LESIONS_MM, LESIONS_V2], "b": [h.LESIONS_MM], "c": [LESIONS_V2]}


def _two_runs(tmp_path: Path):
    spec = DatasetSpec(raw_dir=tmp_path / "raw", dataset_id=931, name="Crash")
    convert_cases(_jobs(FIRST), load_synthetic, spec, progress=False)
    return spec, lambda: convert_cases(_jobs(SECOND), load_synthetic, spec, overwrite=True, progress=False)


def test_crash_at_every_rename_leaves_nnunet_a_consistent_dataset(tmp_path):
    spec, second = _two_runs(tmp_path / "count")
    n_steps = _count_renames(spec.dataset_dir, second)
    assert n_steps >= 10  # CT, PET, record, label of two cases, the JSON files
    assert _assert_consistent(spec.dataset_dir, ALLOWED) == {"a", "b", "c"}
    for step in range(n_steps):
        spec, second = _two_runs(tmp_path / f"step{step}")
        _crash_at(spec.dataset_dir, step, second)
        listed = _assert_consistent(spec.dataset_dir, ALLOWED)
        assert listed <= {"a", "b", "c"}, step
        # The next run repairs: every case complete, nothing left in staging.
        summary = second()
        assert not summary.failed, (step, summary.failed)
        assert _assert_consistent(spec.dataset_dir, ALLOWED) == {"a", "b", "c"}, step
        staging = spec.dataset_dir / ".l1dfl" / "staging"
        assert not staging.exists() or not any(staging.iterdir()), step


def test_nnunet_integrity_check_accepts_the_dataset(tmp_path):
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    spec, second = _two_runs(tmp_path)
    second()
    (spec.dataset_dir / "imagesTr" / "stray_0000.nii.gz").write_bytes(b"")  # a CT without label, not listed
    verify_dataset_integrity(str(spec.dataset_dir), num_processes=1)


def test_case_that_fails_while_being_placed_is_rolled_back_at_once(tmp_path, monkeypatch):
    """An OSError at the label rename (not a crash): the case's files moved so far are removed again."""
    spec = DatasetSpec(raw_dir=tmp_path / "raw", dataset_id=932, name="Rollback")
    real_replace = os.replace

    def failing(src, dst, *args, **kwargs):
        if str(dst).endswith(os.path.join("labelsTr", "b.nii.gz")):
            raise OSError(5, "Input/output error", str(dst))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", failing)
    summary = convert_cases(_jobs(FIRST), load_synthetic, spec, progress=False)
    monkeypatch.setattr(os, "replace", real_replace)
    assert "b" in summary.failed and "Input/output error" in summary.failed["b"]
    assert not list((spec.dataset_dir / "imagesTr").glob("b_*"))
    assert _assert_consistent(spec.dataset_dir, ALLOWED) == {"a"}


# ----------------------------------------------------------------------------- disk full

def _truncating_writer(monkeypatch, after: int) -> list[str]:
    """SimpleITK.WriteImage that, from call ``after`` on, leaves a short file and does not raise,
    as SimpleITK does on a full disk."""
    real_write = sitk.WriteImage
    calls: list[str] = []

    def short_write(image, path, *args, **kwargs):
        calls.append(str(path))
        real_write(image, path, *args, **kwargs)
        if len(calls) > after:
            data = Path(path).read_bytes()
            Path(path).write_bytes(data[: len(data) // 2])

    monkeypatch.setattr(sitk, "WriteImage", short_write)
    return calls


def _convert_fdg(source: Path, raw: Path, *extra: str) -> list[str]:
    return ["convert", "autopet", str(source), "-d", "933", "-n", "Full", "-o", str(raw), "--no-progress", *extra]


def _assert_fault_report(code: int, err: str, *needles: str) -> None:
    assert code != 0
    assert "Traceback" not in err
    error_lines = [line for line in err.splitlines() if line.startswith(("error:", "FAILED"))]
    assert error_lines, err
    for needle in needles:
        assert any(needle in line for line in error_lines), (needle, err)


def test_short_write_is_caught_by_reading_back(tmp_path, capsys, monkeypatch):
    source = h.make_autopet_fdg(tmp_path / "download")
    calls = _truncating_writer(monkeypatch, after=3)  # the first case is written whole, then the disk is "full"
    code = main(_convert_fdg(source, tmp_path / "raw"))
    err = capsys.readouterr().err
    _assert_fault_report(code, err, "did not read back whole")
    assert len(calls) == 4, "the run stops at the first write fault instead of failing every later case"
    dataset = tmp_path / "raw" / "Dataset933_Full"
    listed = _assert_consistent_files(dataset)
    assert len(listed) == 1
    staging = dataset / ".l1dfl" / "staging"
    assert not staging.exists() or not any(staging.iterdir())
    assert "not attempted" in err


def _assert_consistent_files(dataset: Path) -> set[str]:
    from nnunetv2_l1dfl.conversion.image_io import nifti_problem

    view = _nnunet_view(dataset)
    for case_id, files in view.items():
        for path in [*files["images"], files["label"]]:
            assert os.path.isfile(path) and nifti_problem(path) == "", (case_id, path)
    return set(view)


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A small tmpfs mounted at tmp_path/mnt (needs root and mount rights; skipped otherwise)."""
    mount_point = tmp_path / "mnt"
    mount_point.mkdir()
    mounted = []

    def mount(size: str, options: str = "") -> Path:
        opts = f"size={size}" + (f",{options}" if options else "")
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(mount_point)], capture_output=True, text=True
        )
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip() or 'not root'}): the hook-based test covers it")
        mounted.append(mount_point)
        return mount_point

    def remount(options: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{options}", str(mount_point)], check=True)

    mount.remount = remount
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root: the hook-based short-write test covers disk full")
    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], check=False)


def test_disk_full_on_a_real_tmpfs(tmp_path, capsys, tiny_tmpfs):
    source = h.make_autopet_fdg(tmp_path / "download")
    raw = tiny_tmpfs("96k") / "raw"
    code = main(_convert_fdg(source, raw))
    err = capsys.readouterr().err
    _assert_fault_report(code, err)
    assert any(w in err for w in ("No space left on device", "did not read back whole")), err
    dataset = raw / "Dataset933_Full"
    if dataset.is_dir():
        listed = _assert_consistent_files(dataset)
        assert len(listed) < len(h.AUTOPET_FDG_STUDIES)
        staging = dataset / ".l1dfl" / "staging"
        assert not staging.exists() or not any(staging.iterdir())


def test_read_only_dataset_is_one_line_and_left_intact(tmp_path, capsys, tiny_tmpfs):
    source = h.make_autopet_fdg(tmp_path / "download")
    raw = tiny_tmpfs("8m") / "raw"
    assert main(_convert_fdg(source, raw)) == 0
    dataset = raw / "Dataset933_Full"
    before = (dataset / "dataset.json").read_text()
    tiny_tmpfs.remount("ro")
    capsys.readouterr()
    code = main(_convert_fdg(source, raw, "--overwrite"))
    err = capsys.readouterr().err
    _assert_fault_report(code, err, "Read-only file system")
    assert len(err.strip().splitlines()) <= 3, err
    assert (dataset / "dataset.json").read_text() == before
    assert len(_assert_consistent_files(dataset)) == len(h.AUTOPET_FDG_STUDIES)


# ----------------------------------------------------------------------------- user faults

def test_output_that_is_a_file(tmp_path, capsys):
    source = h.make_autopet_fdg(tmp_path / "download")
    out_file = tmp_path / "raw.txt"
    out_file.write_text("keep me")
    code = main(_convert_fdg(source, out_file))
    err = capsys.readouterr().err
    _assert_fault_report(code, err, str(out_file), "not a folder")
    assert out_file.read_text() == "keep me"


def test_splits_with_one_fold_and_into_a_file(tmp_path, capsys, nnunet_env):
    source = h.make_autopet_fdg(tmp_path / "download")
    assert main(["convert", "autopet", str(source), "-d", "934", "-n", "Folds", "--no-progress"]) == 0
    capsys.readouterr()
    code = main(["splits", "-d", "934", "--folds", "1"])
    err = capsys.readouterr().err
    _assert_fault_report(code, err, "--folds", "at least 2")
    blocker = tmp_path / "prep_file"
    blocker.write_text("")
    code = main(["splits", "-d", "934", "--preprocessed-dir", str(blocker)])
    err = capsys.readouterr().err
    _assert_fault_report(code, err, str(blocker))
    assert blocker.read_text() == ""


# ----------------------------------------------------------------------------- lock

_HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from nnunetv2_l1dfl.conversion.dataset_folder import DatasetSpec, lock_dataset
    spec = DatasetSpec(raw_dir=Path(sys.argv[1]), dataset_id=935, name="Lock")
    with lock_dataset(spec, command="first conversion"):
        staging = spec.dataset_dir / ".l1dfl" / "staging" / "case1"
        staging.mkdir(parents=True)
        (staging / "half.nii.gz").write_bytes(b"x")
        print("locked", flush=True)
        time.sleep(float(sys.argv[2]))
    """
)


def _start_holder(raw: Path, seconds: float) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(raw), str(seconds)], stdout=subprocess.PIPE, text=True, env=env
    )
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_second_conversion_refuses_and_names_the_first(tmp_path, capsys):
    source = h.make_autopet_fdg(tmp_path / "download")
    raw = tmp_path / "raw"
    holder = _start_holder(raw, 60)
    try:
        code = main(["convert", "autopet", str(source), "-d", "935", "-n", "Lock", "-o", str(raw), "--no-progress"])
        err = capsys.readouterr().err
        _assert_fault_report(code, err, f"PID {holder.pid}", "first conversion")
        assert (raw / "Dataset935_Lock" / ".l1dfl" / "staging" / "case1" / "half.nii.gz").is_file()
        assert not list((raw / "Dataset935_Lock" / "imagesTr").glob("*")) if (raw / "Dataset935_Lock" / "imagesTr").exists() else True
    finally:
        holder.kill()
        holder.wait()


def test_lock_of_a_killed_run_is_taken_over_with_a_warning(tmp_path, capsys, caplog):
    source = h.make_autopet_fdg(tmp_path / "download")
    raw = tmp_path / "raw"
    holder = _start_holder(raw, 60)
    holder.kill()  # killed: the kernel drops its flock, the lock file keeps its PID
    holder.wait()
    lock = raw / "Dataset935_Lock" / ".l1dfl" / "lock"
    assert str(holder.pid) in lock.read_text()
    code = main(["convert", "autopet", str(source), "-d", "935", "-n", "Lock", "-o", str(raw), "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    warned = captured.err + caplog.text
    assert f"PID {holder.pid}" in warned and "not running" in warned and "first conversion" in warned
    assert not (raw / "Dataset935_Lock" / ".l1dfl" / "staging" / "case1").exists()  # its staging rolled back
    assert lock.read_text() == ""  # released


def test_without_flock_a_stale_lock_is_reported_with_how_to_clear_it(tmp_path, capsys, monkeypatch):
    import errno
    import fcntl

    source = h.make_autopet_fdg(tmp_path / "download")
    raw = tmp_path / "raw"
    lock = raw / "Dataset935_Lock" / ".l1dfl" / "lock"
    lock.parent.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename, "started": "earlier", "command": "old run"}))

    def no_flock(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    code = main(["convert", "autopet", str(source), "-d", "935", "-n", "Lock", "-o", str(raw), "--no-progress"])
    err = capsys.readouterr().err
    _assert_fault_report(code, err, f"PID {dead.pid}", str(lock), "delete")
    time.sleep(0)


# ----------------------------------------------------------------------------- pseudonymized console

PATIENT_NAME, PATIENT_ID = "DOE^JOHNATHAN", "MRN-8675309"
OTHER_NAME, OTHER_ID = "ROE^RICHARDINE", "MRN-5551234"


def _phantom_study(folder: Path, patient_id: str, patient_name: str, *, omit=(), rois=None) -> dict[str, str]:
    from _dicom_factories import write_ct_series, write_pet_series, write_rtstruct
    from pydicom.uid import generate_uid

    uids = {"study": generate_uid(), "frame": generate_uid(), "pet": generate_uid(), "ct": generate_uid()}
    common = dict(patient_id=patient_id, patient_name=patient_name, study_uid=uids["study"],
                  frame_of_reference_uid=uids["frame"], study_date="20240101")  # fmt: skip
    weight, dose, half_life = 75.0, 3.5e8, 6586.2
    bqml_per_suv = dose * 2.0 ** (-3600.0 / half_life) / (weight * 1000.0)
    pet_files = write_pet_series(
        folder / "pet", h.pet_suv_volume() * bqml_per_suv, h.PET_SPACING, h.PET_ORIGIN, weight_kg=weight,
        dose_bq=dose, half_life=half_life, series_uid=uids["pet"], omit=omit, **common,
    )  # fmt: skip
    write_ct_series(folder / "ct", h.ct_volume(h.PET_SHAPE, h.PET_SPACING, h.PET_ORIGIN), h.PET_SPACING,
                    h.PET_ORIGIN, series_uid=uids["ct"], **common)  # fmt: skip
    if rois is None:
        rois = {f"lesion {patient_name.split('^')[1].title()}": h.lesion_mask(h.PET_SHAPE, h.PET_SPACING, h.PET_ORIGIN)}
    write_rtstruct(folder / "rt" / "rs.dcm", pet_files, rois)
    return uids


def test_pseudonymized_run_prints_and_logs_no_identifier(tmp_path, capsys, caplog):
    """A pseudonymized conversion of phantom DICOM whose identifiers are known: one patient converts,
    one fails (no PatientWeight, so its reason names a file and a tag), a corrupt file is skipped.
    Nothing printed, logged or written into the dataset may hold a name, ID, UID or input path."""
    import logging

    caplog.set_level(logging.DEBUG)
    root = tmp_path / "export" / f"{PATIENT_NAME.replace('^', '_')}_{PATIENT_ID}"
    ok = _phantom_study(root / "study1", PATIENT_ID, PATIENT_NAME)
    bad = _phantom_study(root.parent / f"{OTHER_ID}" / "s", OTHER_ID, OTHER_NAME, omit=["PatientWeight"])
    (root / "junk.dcm").write_bytes(b"\x00" * 128 + b"DICM" + b"\x02\x00\x10\x00garbage")
    raw = tmp_path / "raw"
    code = main(["convert", "dicom", str(root.parent), "-d", "936", "-n", "Pseudo", "-o", str(raw),
                 "--pseudonymize", "-np", "2"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 1, captured.err  # the patient without weight fails
    dataset = raw / "Dataset936_Pseudo"
    assert len(list((dataset / "labelsTr").glob("*.nii.gz"))) == 1
    texts = {"stdout": captured.out, "stderr": captured.err, "log": caplog.text}
    texts |= {str(p): p.read_text(errors="replace") for p in dataset.rglob("*") if p.suffix in (".json", ".csv", ".log", "")
              and p.is_file() and p.name != "lock"}  # fmt: skip
    texts |= {str(p): p.read_text(errors="replace") for p in raw.rglob("*.log")}
    identifiers = [PATIENT_NAME, "JOHNATHAN", "Johnathan", PATIENT_ID, OTHER_NAME, "RICHARDINE", OTHER_ID,
                   str(tmp_path / "export"), *ok.values(), *bad.values()]  # fmt: skip
    for where, text in texts.items():
        for identifier in identifiers:
            assert identifier.lower() not in text.lower(), f"{identifier!r} in {where}:\n{text}"
    assert "PatientWeight" in captured.err  # the reason itself is still there, with the case ID


def test_pseudonymized_failure_reason_names_the_roi_by_number_not_by_name(tmp_path, capsys, caplog):
    """ROI names are free text (they can hold a patient's or a reader's name): a pseudonymized run that
    fails a case for an empty ROI says which ROI by its number, never by its name."""
    import logging

    caplog.set_level(logging.DEBUG)
    empty = np.zeros(h.PET_SHAPE, dtype=bool)
    secret = "lesion drawn by Dr Quimbleworth"
    _phantom_study(tmp_path / "export" / "a", PATIENT_ID, PATIENT_NAME, rois={secret: empty})
    raw = tmp_path / "raw"
    code = main(["convert", "dicom", str(tmp_path / "export"), "-d", "937", "-n", "Pseudo", "-o", str(raw),
                 "--pseudonymize", "--no-progress"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 1, captured.err
    for where, text in {"stdout": captured.out, "stderr": captured.err, "log": caplog.text}.items():
        assert "quimbleworth" not in text.lower(), f"ROI name in {where}:\n{text}"
    assert "ROI#1" in captured.err  # the reason still says which ROI


def test_redactor_unit(tmp_path, capsys):
    import logging
    import pickle

    from nnunetv2_l1dfl.conversion.redact import Redactor, active_redactor, register_identifier

    redactor = Redactor([tmp_path / "in"])
    text = f"cannot read {tmp_path / 'in' / 'DOE_JOHN' / 'pet' / 'x.dcm'}: series 1.2.826.0.1.3680043.8.498.12345, v2.8.1"
    assert redactor.redact(text) == "cannot read <input>/.../x.dcm: series <UID>, v2.8.1"
    with redactor.active():
        assert active_redactor() is redactor
        register_identifier("DOE^JOHN", "P0123456789")
        print("patient Doe^John (john) at", tmp_path / "in")
        logging.getLogger("some.module").warning("PatientID DOE^JOHN in %s", tmp_path / "in" / "a.dcm")
        copy = pickle.loads(pickle.dumps(redactor))  # what a worker gets
        copy.install()  # merged into the active one, not stacked
        assert active_redactor() is redactor
    assert active_redactor() is None
    out = capsys.readouterr()
    assert out.out == "patient P0123456789 (P0123456789) at <input>\n", out.out
    assert "DOE" not in out.err.upper() and "JOHN" not in out.err.upper()
