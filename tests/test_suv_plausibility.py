"""SUV that no patient can have is an error naming the likely tag (issue 10, SUV), unless the user
opts in with ``allow_implausible_suv`` / ``--allow-implausible-suv``, which records the reason.

Also: the midnight-crossing rule, reference times far from the acquisition, FrameReferenceTime 0,
and the tracer named in Radiopharmaceutical (0018,0031) against the half-life.
"""

import math
import re
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from _dicom_factories import write_pet_series

from nnunetv2_l1dfl.cli import main
from nnunetv2_l1dfl.conversion.suv import (
    PLAUSIBLE_SUV_MAX,
    SUVError,
    read_pet_suv,
    suv_plausibility_problems,
)

SHAPE = (6, 12, 10)
LN2 = math.log(2.0)
F18 = 6586.2


def _activity(seed: int = 0) -> np.ndarray:
    """Bq/ml giving SUVmax about 6 with the factory's 75 kg, 350 MBq, 1 h uptake (F-18)."""
    rng = np.random.default_rng(seed)
    return rng.uniform(100.0, 20000.0, SHAPE) * np.linspace(0.3, 1.0, SHAPE[0])[:, None, None]


def _expected_suv(activity, weight_kg=75.0, dose_bq=3.5e8, half_life=F18, seconds=3600.0):
    return activity * weight_kg * 1000.0 / (dose_bq * math.exp(-LN2 * seconds / half_life))


def _assert_suv(actual: np.ndarray, expected: np.ndarray) -> None:
    step = np.abs(expected).max(axis=(1, 2), keepdims=True) / 32767.0
    assert np.all(np.abs(actual - expected) <= 0.5 * step + 1e-5 * np.abs(expected)), np.abs(actual - expected).max()


def _read(folder: Path, **kwargs):
    return read_pet_suv(sorted(folder.iterdir()), case_id="case_x", **kwargs)


# -- implausible values are errors naming the tag; the opt-in records them -------------------------

IMPLAUSIBLE = {
    # name: (factory kwargs, the tag the error must name, a phrase of the hint)
    "dose_in_kBq": ({"dose_bq": 3.5e5}, r"RadionuclideTotalDose \(0018,1074\)", "kBq"),
    "dose_in_mCi": ({"dose_bq": 9.46}, r"RadionuclideTotalDose \(0018,1074\)", "mCi"),
    "injection_three_days_before": (
        {"RadiopharmaceuticalStartDateTime": "20231229100000"},
        r"RadiopharmaceuticalStartDateTime \(0018,1078\)",
        "half-lives",
    ),
    "weight_decimal_slip": ({"weight_kg": 7.36}, r"PatientWeight \(0010,1030\) 7.36 kg", "73.6"),
}


@pytest.mark.parametrize("name", sorted(IMPLAUSIBLE))
def test_implausible_headers_are_errors_naming_the_tag_and_the_opt_in_records_them(tmp_path, name):
    kwargs, tag, hint = IMPLAUSIBLE[name]
    write_pet_series(tmp_path, _activity(), **kwargs)
    with pytest.raises(SUVError, match=rf"case_x: implausible SUV.*{tag}") as info:
        _read(tmp_path)
    assert hint in str(info.value) and "--allow-implausible-suv" in str(info.value)
    result = _read(tmp_path, allow_implausible_suv=True)
    assert result.warnings and all("--allow-implausible-suv" in w for w in result.warnings)
    assert re.search(tag, " ".join(result.warnings))
    assert result.branch.endswith("implausible-accepted")


def test_gml_on_bqml_pixels_is_refused_naming_units(tmp_path):
    write_pet_series(tmp_path, _activity(), units="GML", SUVType="BW")  # Bq/ml values labelled SUV
    with pytest.raises(SUVError, match=r"implausible SUV: SUVmax 1\.\d+e\+04 .*Units \(0054,1001\) GML"):
        _read(tmp_path)


def test_plausible_low_uptake_study_and_bounds_are_documented(tmp_path):
    # A real low-uptake study (SUVmax 2.1: liver-level uptake only) converts with no warning.
    activity = _activity() / 3.0
    write_pet_series(tmp_path, activity)
    result = _read(tmp_path)
    assert 1.5 < result.details["suv_max"] < 2.5 and result.warnings == []
    low, high = PLAUSIBLE_SUV_MAX
    assert suv_plausibility_problems(low) == [] and suv_plausibility_problems(high) == []
    assert suv_plausibility_problems(high * 1.01) and suv_plausibility_problems(low * 0.99)
    assert suv_plausibility_problems(5.0, weight_kg=75.0, dose_bq=3.5e8, uptake_s=3600.0, half_life_s=F18) == []


def test_suv_command_refuses_implausible_suv_and_writes_nothing(tmp_path, capsys):
    write_pet_series(tmp_path / "pet", _activity(), dose_bq=3.5e5)  # kBq: SUVmax ~ 6000
    out = tmp_path / "suv.nii.gz"
    assert main(["suv", str(tmp_path / "pet"), str(out)]) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "RadionuclideTotalDose (0018,1074)" in errors[0] and "Traceback" not in err
    assert not out.exists() and list(tmp_path.glob("suv*")) == []
    assert main(["suv", str(tmp_path / "pet"), str(out), "--allow-implausible-suv"]) == 0
    captured = capsys.readouterr()
    assert out.exists() and "warning:" in captured.out and "RadionuclideTotalDose" in captured.out


# -- midnight crossing must not invent intervals --------------------------------------------------


def test_injection_time_after_the_scan_on_the_same_day_is_not_a_midnight_crossing(tmp_path):
    # Injection (time only) at 12:00, scan at 11:00: the day before would be 23 h of F-18 uptake.
    write_pet_series(tmp_path, _activity(), injection_time="120000", omit=("RadiopharmaceuticalStartDateTime",))
    with pytest.raises(SUVError, match=r"RadiopharmaceuticalStartTime \(0018,1072\) .* after") as info:
        _read(tmp_path, allow_implausible_suv=True)  # contradictory, not merely implausible
    assert "midnight" in str(info.value)


def test_injection_time_only_is_refused_for_a_long_lived_nuclide(tmp_path):
    # Zr-89 scans are days after injection: a time of day without a date cannot be placed.
    write_pet_series(
        tmp_path, _activity(), half_life=282276.0, tracer="89Zr-girentuximab", omit=("RadiopharmaceuticalStartDateTime",)
    )
    with pytest.raises(SUVError, match=r"RadiopharmaceuticalStartDateTime \(0018,1078\)"):
        _read(tmp_path)


# -- reference time -------------------------------------------------------------------------------


def test_series_date_weeks_before_the_acquisition_is_not_the_reference(tmp_path):
    # A real header: SeriesDate/SeriesTime 20 days before AcquisitionDate; injection as time only.
    # Frames start at 11:20 (FrameReferenceTime = mean-count time: the scan start is 11:20).
    lam, duration = LN2 / F18, 180.0
    t_avg = math.log(lam * duration / (1 - math.exp(-lam * duration))) / lam
    activity = _activity(1)
    write_pet_series(
        tmp_path, activity, study_date="20240121", series_time="093000", injection_time="090000",
        acquisition_times=["112000"] * SHAPE[0], frame_duration_ms=int(duration * 1000),
        frame_reference_times_ms=[t_avg * 1000.0] * SHAPE[0], omit=("RadiopharmaceuticalStartDateTime",),
        SeriesDate="20240101",
    )  # fmt: skip
    result = _read(tmp_path)
    assert "SeriesTime-rejected" in result.branch and "back-computed" in result.branch
    _assert_suv(sitk.GetArrayFromImage(result.image), _expected_suv(activity, seconds=8400.0))
    assert result.details["reference_time"].startswith("2024-01-21T11:20:00")


def test_decay_factor_contradicting_the_reference_is_an_error(tmp_path):
    # SeriesTime 10:40, acquisition 11:00 (within the window), but DecayFactor 1.0159 says the
    # images were corrected to the start of this very frame: the reference is 20 min off.
    lam, duration = LN2 / F18, 300.0
    frame_factor = lam * duration / (1 - math.exp(-lam * duration))
    write_pet_series(
        tmp_path, _activity(), series_time="104000", acquisition_times=["110000"] * SHAPE[0],
        DecayFactor=f"{frame_factor:.6f}",
    )  # fmt: skip
    with pytest.raises(SUVError, match=r"DecayFactor \(0054,1321\)"):
        _read(tmp_path)
    # The same factor agrees with a reference at 11:00 and converts.
    write_pet_series(
        tmp_path / "ok", _activity(), series_time="110000", acquisition_times=["110000"] * SHAPE[0],
        DecayFactor=f"{frame_factor:.6f}",
    )  # fmt: skip
    assert _read(tmp_path / "ok").details["reference_time"].startswith("2024-01-01T11:00:00")


def test_frame_reference_time_zero_means_the_frame_start(tmp_path):
    # SeriesTime re-saved at 12:00 (after the acquisition): back-computation. FrameReferenceTime 0:
    # the frame is its own reference, so the scan start is the AcquisitionTime 11:00 itself (an
    # independent calculator's answer); reading 0 as the mean-count time put it 90 s later (+0.95 %).
    activity = _activity(2)
    write_pet_series(
        tmp_path, activity, series_time="120000", acquisition_times=["110000"] * SHAPE[0],
        frame_duration_ms=180000, frame_reference_times_ms=[0.0] * SHAPE[0],
    )  # fmt: skip
    result = _read(tmp_path)
    _assert_suv(sitk.GetArrayFromImage(result.image), _expected_suv(activity, seconds=3600.0))
    assert result.details["reference_time"].startswith("2024-01-01T11:00:00")


# -- the tracer name against the half-life --------------------------------------------------------


@pytest.mark.parametrize(
    "tracer, half_life, nuclide",
    [
        ("18F-DCFPyL", 4062.6, "F-18"),
        ("68Ga-PSMA-11", F18, "Ga-68"),
        ("[18F]FDG", 4062.6, "F-18"),
        ("F-18 FDG", 1221.8, "F-18"),
        ("Ga68 DOTATATE", F18, "Ga-68"),
        ("64Cu-DOTATATE", F18, "Cu-64"),
        ("89Zr", 45720.0, "Zr-89"),
    ],
)
def test_half_life_is_checked_against_the_tracer_name(tmp_path, tracer, half_life, nuclide):
    write_pet_series(tmp_path / "bad", _activity(), tracer=tracer, half_life=half_life)
    with pytest.raises(SUVError, match=r"RadionuclideHalfLife \(0018,1075\)") as info:
        _read(tmp_path / "bad")
    assert f"Radiopharmaceutical (0018,0031) {tracer!r} names {nuclide}" in str(info.value)
    from nnunetv2_l1dfl.conversion.suv import PET_HALF_LIVES_S

    files = write_pet_series(tmp_path / "ok", _activity(), tracer=tracer, half_life=PET_HALF_LIVES_S[nuclide])
    assert read_pet_suv(files, case_id="ok", allow_implausible_suv=True).details["nuclide"] == nuclide


def test_fields_that_name_different_nuclides_are_an_error(tmp_path):
    files = write_pet_series(tmp_path, _activity(), tracer="68Ga-PSMA-11", half_life=F18)
    for path in files:
        ds = pydicom.dcmread(path)
        entry = pydicom.Dataset()
        entry.CodeValue, entry.CodingSchemeDesignator, entry.CodeMeaning = "C-111A1", "SRT", "^18^Fluorine"
        ds.RadiopharmaceuticalInformationSequence[0].RadionuclideCodeSequence = pydicom.Sequence([entry])
        ds.save_as(path)
    with pytest.raises(SUVError, match=r"contradictory radionuclide") as info:
        _read(tmp_path)
    message = str(info.value)
    assert "RadionuclideCodeSequence (0054,0300)" in message and "Radiopharmaceutical (0018,0031)" in message


# -- the same check where a case is written (PET given in SUV, e.g. NIfTI) -----------------------


def _nifti_case(pet_scale: float, allow: bool | None = None):
    import _conversion_helpers as h

    from nnunetv2_l1dfl.conversion.dataset_folder import LoadedCase

    def image(array):
        img = sitk.GetImageFromArray(array)
        img.SetSpacing(h.PET_SPACING)
        img.SetOrigin(h.PET_ORIGIN)
        return img

    metadata = {"study_date": "2024-01-31"}
    if allow is not None:
        metadata["allow_implausible_suv"] = allow
    return LoadedCase(
        ct=image(h.ct_volume(h.PET_SHAPE, h.PET_SPACING, h.PET_ORIGIN)),
        pet=image(h.pet_suv_volume() * pet_scale),
        label=image(h.lesion_mask(h.PET_SHAPE, h.PET_SPACING, h.PET_ORIGIN)),
        metadata=metadata,
    )


def test_write_case_refuses_implausible_suv_unless_the_loader_passes_the_opt_in(tmp_path):
    from nnunetv2_l1dfl.conversion.dataset_folder import DatasetSpec, prepare_dataset_dir, write_case
    from nnunetv2_l1dfl.conversion.errors import ConversionError

    spec = DatasetSpec(raw_dir=tmp_path, dataset_id=9, name="Unit")
    dataset = prepare_dataset_dir(spec)
    bqml_per_suv = 3.5e8 * 0.685 / 75000.0  # Bq/ml read as SUV: SUVmax 8 becomes ~2.6e4
    with pytest.raises(ConversionError, match=r"case bq: implausible SUV: SUVmax 2\.\d+e\+04 .*--allow-implausible-suv"):
        write_case(dataset, "bq", _nifti_case(bqml_per_suv), spec.labels, patient="p")
    assert not (dataset / "imagesTr" / "bq_0001.nii.gz").exists()
    record = write_case(dataset, "bq", _nifti_case(bqml_per_suv, allow=True), spec.labels, patient="p")
    assert len(record["warnings"]) == 1 and record["warnings"][0].startswith("implausible SUV accepted")
    assert "allow_implausible_suv" not in record  # the opt-in is not a metadata column
    assert write_case(dataset, "ok", _nifti_case(1.0), spec.labels, patient="p")["warnings"] == []


def test_convert_dicom_fails_the_case_and_the_opt_in_records_the_reason(tmp_path, capsys):
    import csv

    import _conversion_helpers as h
    from _dicom_factories import write_ct_series, write_rtstruct
    from pydicom.uid import generate_uid

    root = tmp_path / "dicom"
    common = dict(patient_id="KBQ", study_uid=generate_uid(), frame_of_reference_uid=generate_uid())
    bqml_per_suv = 3.5e8 * 2.0 ** (-3600.0 / F18) / 75000.0
    pet = write_pet_series(root / "pet", h.pet_suv_volume() * bqml_per_suv, h.PET_SPACING, h.PET_ORIGIN,
                           dose_bq=3.5e5, **common)  # fmt: skip  # the dose typed in kBq
    write_ct_series(root / "ct", h.ct_volume(h.PET_SHAPE, h.PET_SPACING, h.PET_ORIGIN), h.PET_SPACING, h.PET_ORIGIN, **common)
    write_rtstruct(root / "rt" / "rs.dcm", pet, {"Lesions": h.lesion_mask(h.PET_SHAPE, h.PET_SPACING, h.PET_ORIGIN)})
    raw = tmp_path / "raw"
    argv = ["convert", "dicom", str(root), "-d", "611", "-n", "Kbq", "-o", str(raw), "--no-progress"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert re.search(r"FAILED KBQ_20240101: .*implausible SUV: RadionuclideTotalDose \(0018,1074\).*kBq", err)
    assert main([*argv, "--allow-implausible-suv"]) == 0
    with (raw / "Dataset611_Kbq" / "case_metadata.csv").open(newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert "implausible SUV accepted (--allow-implausible-suv): RadionuclideTotalDose (0018,1074)" in row["warnings"]
    assert row["suv_branch"].endswith("implausible-accepted") and float(row["suv_max"]) > 1000


def test_ge_private_scan_start_far_from_the_acquisition_is_not_the_reference(tmp_path):
    import datetime as dt

    # SeriesTime re-saved after the scan; the GE scan start (0009,100D) 20 days earlier: both rejected,
    # the reference is back-computed from AcquisitionTime 11:10 and FrameReferenceTime.
    write_pet_series(
        tmp_path, _activity(3), series_time="120000", acquisition_times=["111000"] * SHAPE[0],
        Manufacturer="GE MEDICAL SYSTEMS", private={(0x0009, 0x100D): ("DT", "20231212110000.00")},
    )  # fmt: skip
    result = _read(tmp_path)
    assert "START|GE-private-rejected|back-computed" in result.branch
    reference = dt.datetime.fromisoformat(result.details["reference_time"])
    assert abs((reference - dt.datetime(2024, 1, 1, 11, 10)).total_seconds()) < 1.0
