"""Red team of ``read_pet_suv``, ``l1dfl suv`` and the SUV path of ``l1dfl convert dicom`` (issue 10:
"never a silently wrong case"): headers a careless user, a strange vendor or a faulty disk gives.

Each input ends in one of: the SUV its header says (checked against an independent computation),
or ``SUVError`` naming the case, the attribute and its tag. Never a raw exception, never a number
that silently differs. The first part holds findings that were wrong before (each test failed on
the old code); the second documents behaviour that was already right and must stay so.
"""

import copy
import math
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from _dicom_factories import write_pet_series
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag

from nnunetv2_l1dfl.cli import main
from nnunetv2_l1dfl.conversion.suv import SUVError, parse_nuclide_option, read_pet_suv

SHAPE = (6, 12, 10)
LN2 = math.log(2.0)
F18 = 6586.2


def _activity(seed: int = 0) -> np.ndarray:
    """Bq/ml giving SUVmax about 6 with the factory's 75 kg, 350 MBq, 1 h uptake (F-18)."""
    rng = np.random.default_rng(seed)
    return rng.uniform(100.0, 20000.0, SHAPE) * np.linspace(0.3, 1.0, SHAPE[0])[:, None, None]


def _expected_suv(activity, weight_kg=75.0, dose_bq=3.5e8, seconds=3600.0):
    return activity * weight_kg * 1000.0 / (dose_bq * math.exp(-LN2 * seconds / F18))


def _assert_suv(actual: np.ndarray, expected: np.ndarray) -> None:
    step = np.abs(expected).max(axis=(1, 2), keepdims=True) / 32767.0
    assert np.all(np.abs(actual - expected) <= 0.5 * step + 1e-5 * np.abs(expected)), np.abs(actual - expected).max()


def _read(folder: Path, **kwargs):
    return read_pet_suv(sorted(folder.iterdir()), case_id="case_x", **kwargs)


def _suv(folder: Path, **kwargs) -> np.ndarray:
    return sitk.GetArrayFromImage(_read(folder, **kwargs).image)


def _put(target: pydicom.Dataset, keyword: str, value) -> None:
    """Set an attribute, also to a value pydicom refuses to encode ("70kg" in a DS), as raw bytes."""
    try:
        setattr(target, keyword, value)
    except (ValueError, TypeError, OverflowError):
        tag = tag_for_keyword(keyword)
        raw = value.encode() if isinstance(value, str) else bytes(value)
        raw += b" " * (len(raw) % 2)
        target[tag] = RawDataElement(Tag(tag), dictionary_VR(tag), len(raw), raw, 0, False, True)


def _mutate(files, change) -> None:
    """change(dataset, rp_item, slice_index) on every slice, saved in place."""
    for k, path in enumerate(files):
        ds = pydicom.dcmread(path)
        items = ds.get("RadiopharmaceuticalInformationSequence")
        change(ds, items[0] if items else None, k)
        ds.save_as(path)


def _error_lines(capsys) -> list[str]:
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    return [line for line in captured.err.splitlines() if line.startswith("error:")]


# =============================================================================================
# Findings: wrong before, fixed (each of these failed on the code before this file)
# =============================================================================================

# -- injection date-time (0018,1078) against time (0018,1072) --------------------------------


def test_injection_date_time_with_a_date_only_takes_the_time_of_day_from_the_start_time(tmp_path):
    # "20240101" in (0018,1078) is midnight as a DT: 11 h of uptake instead of 1 h, SUV x 44 silently
    # (SUVmax 272, inside the plausibility bound). The time of day is in (0018,1072).
    files = write_pet_series(tmp_path, _activity(), RadiopharmaceuticalStartDateTime="20240101")
    result = _read(tmp_path)
    _assert_suv(sitk.GetArrayFromImage(result.image), _expected_suv(_activity()))
    assert "RadiopharmaceuticalStartDateTime(date)+RadiopharmaceuticalStartTime" in result.branch
    _mutate(files, lambda ds, rp, k: delattr(rp, "RadiopharmaceuticalStartTime"))
    with pytest.raises(SUVError, match=r"case_x: RadiopharmaceuticalStartDateTime \(0018,1078\) '20240101' has a date but no time"):
        _read(tmp_path)


def test_ibsi_dro_with_a_date_only_injection_date_time_is_refused(ibsi_dro_dir, tmp_path):
    # DRO_4_0 holds only RadiopharmaceuticalStartDateTime; cut to its date, nothing says the time.
    shutil.copytree(ibsi_dro_dir / "DRO_4_0" / "PT", tmp_path / "PT")
    _mutate(sorted((tmp_path / "PT").iterdir()), lambda ds, rp, k: _put(rp, "RadiopharmaceuticalStartDateTime", "20250101"))
    with pytest.raises(SUVError, match=r"has a date but no time of day"):
        read_pet_suv(tmp_path / "PT", case_id="DRO_4_0")


@pytest.mark.parametrize("start_time", ["103000", "0930", "11"])
def test_injection_date_time_and_start_time_that_contradict_are_refused(tmp_path, start_time):
    # Before: (0018,1078) was used and (0018,1072) ignored, whichever was wrong.
    write_pet_series(tmp_path, _activity(), RadiopharmaceuticalStartTime=start_time)
    with pytest.raises(SUVError, match=r"case_x: RadiopharmaceuticalStartDateTime \(0018,1078\) '20240101100000' and "
                       r"RadiopharmaceuticalStartTime \(0018,1072\) .* apart: contradictory injection times"):  # fmt: skip
        _read(tmp_path)


@pytest.mark.parametrize("start_time", ["100000", "100000.000000", "1000", "10"])
def test_injection_date_time_and_start_time_that_agree_at_their_precision_convert(tmp_path, start_time):
    write_pet_series(tmp_path, _activity(), RadiopharmaceuticalStartTime=start_time)
    _assert_suv(_suv(tmp_path), _expected_suv(_activity()))


def test_the_more_precise_of_injection_date_time_and_start_time_is_used(tmp_path):
    # DT to the hour, TM to the second: before, the DT's 10:00 was used (1 h uptake instead of 30 min).
    write_pet_series(tmp_path, _activity(), RadiopharmaceuticalStartDateTime="2024010110", RadiopharmaceuticalStartTime="103000")
    result = _read(tmp_path)
    assert result.details["seconds_injection_to_reference"] == 1800.0
    assert "RadiopharmaceuticalStartTime(more-precise)" in result.branch
    _assert_suv(sitk.GetArrayFromImage(result.image), _expected_suv(_activity(), seconds=1800.0))


@pytest.mark.parametrize("kwargs", [
    {"RadiopharmaceuticalStartDateTime": "2024010110", "omit": ("RadiopharmaceuticalStartTime",)},
    {"RadiopharmaceuticalStartTime": "10", "omit": ("RadiopharmaceuticalStartDateTime",)},
])  # fmt: skip
def test_an_injection_time_to_the_hour_only_is_refused(tmp_path, kwargs):
    # Before: read as hh:00:00, up to an hour off (SUV up to x 1.46 for F-18), nothing recorded.
    write_pet_series(tmp_path, _activity(), **kwargs)
    with pytest.raises(SUVError, match=r"case_x: RadiopharmaceuticalStart(Date)?Time \(0018,10(78|72)\) '\d+' gives the injection to the hour only"):
        _read(tmp_path)


def test_a_series_time_to_the_hour_only_is_not_the_reference(tmp_path):
    # Before: SeriesTime '11' was taken as 11:00:00 exactly; now the start is back-computed.
    write_pet_series(tmp_path, _activity(), SeriesTime="11")
    result = _read(tmp_path)
    assert "SeriesTime-rejected(hour only)|back-computed" in result.branch
    # the factory's FrameReferenceTime is half the frame, not the mean-count time: 0.1 s apart
    np.testing.assert_allclose(sitk.GetArrayFromImage(result.image), _expected_suv(_activity()), rtol=1e-4, atol=1e-3)


def test_ibsi_dro_start_time_contradicting_its_date_time_is_refused(ibsi_dro_dir, tmp_path):
    shutil.copytree(ibsi_dro_dir / "DRO_0_0" / "PT", tmp_path / "PT")
    _mutate(sorted((tmp_path / "PT").iterdir()), lambda ds, rp, k: _put(rp, "RadiopharmaceuticalStartTime", "101500.000000"))
    with pytest.raises(SUVError, match=r"15.0 min apart: contradictory injection times"):
        read_pet_suv(tmp_path / "PT", case_id="DRO_0_0")


# -- UTC offsets in DT values ------------------------------------------------------------------


def test_injection_date_time_in_utc_is_moved_to_the_local_time_zone(tmp_path):
    # 09:00 UTC is 10:00 at +0100, the zone of the TM values: before, the offset was dropped and
    # the injection read as 09:00 local (2 h uptake, SUV x 1.46, nothing recorded).
    write_pet_series(
        tmp_path, _activity(), RadiopharmaceuticalStartDateTime="20240101090000+0000", TimezoneOffsetFromUTC="+0100",
        omit=("RadiopharmaceuticalStartTime",),
    )  # fmt: skip
    result = _read(tmp_path)
    _assert_suv(sitk.GetArrayFromImage(result.image), _expected_suv(_activity()))
    assert "utc-offset(+0000->+0100)" in result.branch
    assert result.details["injection_time"] == "2024-01-01T10:00:00"


def test_utc_date_time_whose_clock_time_matches_a_local_start_time_is_ambiguous(tmp_path):
    write_pet_series(
        tmp_path, _activity(), RadiopharmaceuticalStartDateTime="20240101100000+0000", TimezoneOffsetFromUTC="+0100",
    )  # fmt: skip  (RadiopharmaceuticalStartTime 100000: the clock as written, not the instant)
    with pytest.raises(SUVError, match=r"60.0 min apart \(the time as written, before the UTC offset, agrees\)"):
        _read(tmp_path)


def test_date_time_offset_without_a_local_zone_is_kept_as_local_and_recorded(tmp_path):
    write_pet_series(
        tmp_path, _activity(), RadiopharmaceuticalStartDateTime="20240101100000-0500", omit=("RadiopharmaceuticalStartTime",)
    )  # fmt: skip
    result = _read(tmp_path)
    _assert_suv(sitk.GetArrayFromImage(result.image), _expected_suv(_activity()))
    assert "utc-offset-taken-as-local(-0500)" in result.branch  # the compromise is recorded
    assert len(result.warnings) == 1 and "TimezoneOffsetFromUTC (0008,0201)" in result.warnings[0]


def test_date_time_offset_confirmed_by_the_local_start_time_needs_no_warning(tmp_path):
    write_pet_series(tmp_path, _activity(), RadiopharmaceuticalStartDateTime="20240101100000-0500")  # TM 100000
    result = _read(tmp_path)
    _assert_suv(sitk.GetArrayFromImage(result.image), _expected_suv(_activity()))
    assert "utc-offset" not in result.branch and result.warnings == []


def test_bad_timezone_offset_is_refused_naming_the_tag(tmp_path):
    write_pet_series(
        tmp_path, _activity(), RadiopharmaceuticalStartDateTime="20240101090000+0000", TimezoneOffsetFromUTC="CET",
    )  # fmt: skip
    with pytest.raises(SUVError, match=r"unreadable TimezoneOffsetFromUTC \(0008,0201\)"):
        _read(tmp_path)


def test_time_zone_that_differs_between_slices_is_refused(tmp_path):
    # Before: the first slice's TimezoneOffsetFromUTC moved the injection time, whatever the others said.
    files = write_pet_series(
        tmp_path, _activity(), RadiopharmaceuticalStartDateTime="20240101090000+0000", omit=("RadiopharmaceuticalStartTime",),
    )  # fmt: skip
    _mutate(files, lambda ds, rp, k: setattr(ds, "TimezoneOffsetFromUTC", "+0200" if k == 0 else "+0100"))
    with pytest.raises(SUVError, match=r"contradictory TimezoneOffsetFromUTC \(0008,0201\): '\+0200' in pet_000.dcm"):
        _read(tmp_path)


def test_ge_private_scan_start_in_utc_is_moved_to_the_local_time_zone(tmp_path):
    # SeriesTime after the acquisition (as in DRO_3_3-like GE headers), the GE scan start in UTC.
    write_pet_series(
        tmp_path, _activity(), SeriesTime="120000", TimezoneOffsetFromUTC="+0100", private_creator="GEMS_PETD_01",
        private={(0x0009, 0x100D): ("DT", "20240101100000+0000")},
    )  # fmt: skip
    result = _read(tmp_path)
    assert "GE-private(0009,100D)|utc-offset(+0000->+0100)" in result.branch
    _assert_suv(sitk.GetArrayFromImage(result.image), _expected_suv(_activity()))


# -- RadiopharmaceuticalInformationSequence with several items ---------------------------------


def _add_item(files, **changes) -> None:
    def change(ds, rp, k):
        item = copy.deepcopy(rp)
        for keyword, value in changes.items():
            setattr(item, keyword, value)
        ds.RadiopharmaceuticalInformationSequence.append(item)

    _mutate(files, change)


def test_two_radiopharmaceutical_items_that_disagree_are_refused(tmp_path):
    # Before: the first item's dose was used, silently.
    files = write_pet_series(tmp_path, _activity())
    _add_item(files, RadionuclideTotalDose="150000000")
    with pytest.raises(SUVError, match=r"case_x: pet_000.dcm: RadiopharmaceuticalInformationSequence \(0054,0016\) has 2 "
                       r"items that disagree: RadionuclideTotalDose \(0018,1074\) '350000000(\.0)?' in item 1, '150000000' in item 2"):  # fmt: skip
        _read(tmp_path)


def test_two_identical_radiopharmaceutical_items_convert(tmp_path):
    files = write_pet_series(tmp_path, _activity())
    _add_item(files, RadionuclideTotalDose="3.5e8")  # the same dose, written differently
    _assert_suv(_suv(tmp_path), _expected_suv(_activity()))


# -- frame durations and reference times ------------------------------------------------------


@pytest.mark.parametrize("decay_correction", ["NONE", "START"])
@pytest.mark.parametrize("duration", ["0", "-300000", "abc"])
def test_non_positive_or_unreadable_frame_duration_is_an_error_naming_the_tag(tmp_path, decay_correction, duration):
    # Before: 0 and negative durations converted (NONE: frame factor dropped, -1.6 %; START
    # back-computed: -1.6 % / -3.1 %); "abc" was a raw ValueError.
    files = write_pet_series(tmp_path, _activity(), decay_correction=decay_correction)
    omit_series_time = decay_correction == "START"  # make the back-computation use the duration

    def change(ds, rp, k):
        _put(ds, "ActualFrameDuration", duration)
        if omit_series_time:
            del ds.SeriesTime

    _mutate(files, change)
    with pytest.raises(SUVError, match=r"case_x: pet_000.dcm: ActualFrameDuration \(0018,1242\) (is '-?\w+'; it must be a "
                       r"positive number of ms|is not a number of ms: 'abc')"):  # fmt: skip
        _read(tmp_path)


@pytest.mark.parametrize("value", ["abc", "-5"])
def test_unreadable_or_negative_frame_reference_time_is_an_error_naming_the_tag(tmp_path, value):
    files = write_pet_series(tmp_path, _activity())

    def change(ds, rp, k):
        _put(ds, "FrameReferenceTime", value)
        del ds.SeriesTime

    _mutate(files, change)
    with pytest.raises(SUVError, match=r"FrameReferenceTime \(0054,1300\)"):
        _read(tmp_path)


def test_unreadable_frame_duration_in_the_decay_factor_cross_check_is_an_error(tmp_path):
    # START from SeriesTime with a recorded DecayFactor: the cross-check reads the duration too.
    files = write_pet_series(tmp_path, _activity())
    _mutate(files, lambda ds, rp, k: (_put(ds, "ActualFrameDuration", "5min"), _put(ds, "DecayFactor", "1.01")))
    with pytest.raises(SUVError, match=r"ActualFrameDuration \(0018,1242\) is not a number of ms: '5min'"):
        _read(tmp_path)


def test_decay_correction_none_reads_acquisition_datetime_when_acquisition_time_is_absent(tmp_path):
    # Before: refused ("needs AcquisitionTime") although AcquisitionDateTime (0008,002A) says it.
    plain = write_pet_series(tmp_path / "plain", _activity(), decay_correction="NONE")
    expected = _suv(tmp_path / "plain")
    files = [shutil.copy(p, tmp_path / p.name) for p in plain]
    shutil.rmtree(tmp_path / "plain")

    def change(ds, rp, k):
        ds.AcquisitionDateTime = ds.AcquisitionDate + ds.AcquisitionTime
        del ds.AcquisitionTime

    _mutate([Path(f) for f in files], change)
    np.testing.assert_allclose(_suv(tmp_path), expected, rtol=1e-6)


# -- DecayCorrection against CorrectedImage -------------------------------------------------------


@pytest.mark.parametrize("decay_correction, corrected, message", [
    ("START", ["NORM", "DTIM", "ATTN", "SCAT", "RAN"], r"DecayCorrection \(0054,1102\) START but CorrectedImage \(0028,0051\) .* lacks DECY"),
    ("ADMIN", ["ATTN"], r"DecayCorrection \(0054,1102\) ADMIN but CorrectedImage \(0028,0051\) \['ATTN'\] lacks DECY"),
    ("NONE", ["ATTN", "DECY"], r"DecayCorrection \(0054,1102\) NONE but CorrectedImage \(0028,0051\) lists DECY"),
])  # fmt: skip
def test_decay_correction_contradicting_corrected_image_is_refused(tmp_path, decay_correction, corrected, message):
    # Before: DecayCorrection was believed whatever CorrectedImage said (a NONE series taken as
    # START is off by the decay factor between the scan start and each frame).
    write_pet_series(tmp_path, _activity(), decay_correction=decay_correction, CorrectedImage=corrected)
    with pytest.raises(SUVError, match=rf"case_x: {message}: contradictory"):
        _read(tmp_path)


@pytest.mark.parametrize("dro, change", [
    ("DRO_0_0", lambda ds, rp, k: setattr(ds, "CorrectedImage", [c for c in ds.CorrectedImage if c != "DECY"])),
    ("DRO_3_4", lambda ds, rp, k: setattr(ds, "CorrectedImage", [*ds.CorrectedImage, "DECY"])),  # DC NONE
])  # fmt: skip
def test_ibsi_dro_with_decy_contradicting_decay_correction_is_refused(ibsi_dro_dir, tmp_path, dro, change):
    shutil.copytree(ibsi_dro_dir / dro / "PT", tmp_path / "PT")
    _mutate(sorted((tmp_path / "PT").iterdir()), change)
    with pytest.raises(SUVError, match=r"DECY: contradictory|lists DECY: contradictory"):
        read_pet_suv(tmp_path / "PT", case_id=dro)


def test_absent_corrected_image_is_not_checked_against_decay_correction(tmp_path):
    write_pet_series(tmp_path, _activity(), omit=("CorrectedImage",))
    _assert_suv(_suv(tmp_path), _expected_suv(_activity()))


# -- numbers that agree, dates that are not dates ---------------------------------------------


def test_the_same_number_written_differently_on_two_slices_is_not_a_contradiction(tmp_path):
    # Before: '75.0' and '75' (or '3.5e8' and '350000000') were "contradictory" and the case refused.
    files = write_pet_series(tmp_path, _activity())

    def change(ds, rp, k):
        ds.PatientWeight = "75" if k % 2 else "75.0"
        rp.RadionuclideTotalDose = "350000000" if k % 2 else "3.5e8"

    _mutate(files, change)
    _assert_suv(_suv(tmp_path), _expected_suv(_activity()))
    _mutate(files[:1], lambda ds, rp, k: setattr(ds, "PatientWeight", "75.5"))
    with pytest.raises(SUVError, match=r"contradictory PatientWeight \(0010,1030\): '75.5' in pet_000.dcm, '75' in pet_001.dcm"):
        _read(tmp_path)


@pytest.mark.parametrize("keyword", ["SeriesDate", "AcquisitionDate"])
@pytest.mark.parametrize("date", ["2024011", "202401011", "20240101120000"])
def test_a_date_that_is_not_yyyymmdd_is_refused(tmp_path, keyword, date):
    # Before: strptime read "2024011" as 2024-01-01 and the first 8 characters of anything longer.
    write_pet_series(tmp_path, _activity(), **{keyword: date})
    with pytest.raises(SUVError, match=rf"unreadable .*not a DICOM date \(YYYYMMDD\): '{date}'"):
        _read(tmp_path)


@pytest.mark.parametrize("date", ["2024.01.01", "2024-01-01"])
def test_acr_nema_and_iso_dates_are_read(tmp_path, date):
    write_pet_series(tmp_path, _activity(), SeriesDate=date)
    _assert_suv(_suv(tmp_path), _expected_suv(_activity()))


# -- Philips private factor, --nuclide --------------------------------------------------------


def test_multi_valued_philips_factor_is_refused(tmp_path):
    # Before: the first of two different values scaled the image.
    write_pet_series(
        tmp_path, _activity(), units="CNTS", private_creator="Philips PET Private Group",
        private={(0x7053, 0x1000): ("DS", ["0.0003", "0.5"])},
    )  # fmt: skip
    with pytest.raises(SUVError, match=r"unreadable Philips SUV scale factor \(7053,1000\).*2 different values"):
        _read(tmp_path)


@pytest.mark.parametrize("text", ["F-18=110", "f18=109.8", "68Ga=67.7"])
def test_nuclide_option_cannot_redefine_a_known_half_life(text):
    # Before: --nuclide F-18=110 replaced F-18's half-life, so a header with the half-life in
    # minutes (SUV scaled by 2**(t/T)) passed the check.
    with pytest.raises(ValueError, match=r"whose half-life is \d+(\.\d+)? s"):
        parse_nuclide_option(text)
    assert parse_nuclide_option("F-18=6588") == ("F-18", 6588.0)  # a vendor variant within 2 %


def test_extra_half_life_redefining_f18_cannot_pass_a_half_life_in_minutes(tmp_path):
    write_pet_series(tmp_path, _activity(), half_life=109.77)
    with pytest.raises(ValueError, match=r"F-18 is F-18, whose half-life is 6586.2 s, not 109.77 s"):
        _read(tmp_path, extra_half_lives={"F-18": 109.77}, allow_implausible_suv=True)


# -- l1dfl suv ---------------------------------------------------------------------------------


@pytest.fixture
def pet_dir(tmp_path) -> Path:
    write_pet_series(tmp_path / "pet", _activity())
    return tmp_path / "pet"


def test_suv_command_refuses_a_series_with_a_truncated_slice(tmp_path, pet_dir, capsys):
    # A faulty disk cut the last slice: before, it was skipped with an INFO log and a volume of 5
    # slices written with rc 0.
    last = sorted(pet_dir.iterdir())[-1]
    last.write_bytes(last.read_bytes()[:-40])
    out = tmp_path / "suv.nii.gz"
    assert main(["suv", str(pet_dir), str(out)]) == 1
    errors = _error_lines(capsys)
    assert len(errors) == 1 and last.name in errors[0] and "truncated" in errors[0]
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["pet"]


def test_a_discovered_series_with_a_problem_is_not_read(tmp_path, pet_dir):
    # discover_series marks a series with a damaged slice incomplete; read_pet_suv (used by l1dfl suv
    # and l1dfl predict) read the remaining files into a volume one slice short.
    from nnunetv2_l1dfl.conversion.dicom_series import discover_series

    last = sorted(pet_dir.iterdir())[-1]
    last.write_bytes(last.read_bytes()[:-40])
    (series,), _ = discover_series(pet_dir)
    assert series.problem and len(series.files) == SHAPE[0] - 1
    with pytest.raises(SUVError, match=rf"case_x: .*{last.name}: truncated"):
        read_pet_suv(series, case_id="case_x")


def _differing_copy(pet_dir: Path) -> Path:
    """A second copy of slice 3 (same SOPInstanceUID) with another RescaleSlope, sorted before it."""
    original = sorted(pet_dir.iterdir())[3]
    ds = pydicom.dcmread(original)
    ds.RescaleSlope = str(float(ds.RescaleSlope) * 2)
    ds.save_as(pet_dir / "a_copy.dcm")
    return original


def test_suv_command_refuses_two_differing_copies_of_one_slice(tmp_path, pet_dir, capsys):
    # Before: discovery kept the first copy in path order (here the changed one), slice 3 had SUV x 2,
    # rc 0, and the other copy was an INFO log line.
    _differing_copy(pet_dir)
    out = tmp_path / "suv.nii.gz"
    assert main(["suv", str(pet_dir), str(out)]) == 1
    errors = _error_lines(capsys)
    assert len(errors) == 1 and "duplicate SOPInstanceUID" in errors[0] and "the two copies differ" in errors[0]
    assert not out.exists()


def test_suv_command_uses_an_intact_or_exact_copy(tmp_path, pet_dir, capsys):
    files = sorted(pet_dir.iterdir())
    shutil.copy(files[1], pet_dir / "z_exact_copy.dcm")
    shutil.copy(files[2], pet_dir / "a_intact_copy.dcm")
    files[2].write_bytes(files[2].read_bytes()[:-40])  # damaged, but an intact copy is there
    out = tmp_path / "suv.nii.gz"
    assert main(["suv", str(pet_dir), str(out)]) == 0
    printed = capsys.readouterr().out
    assert "z_exact_copy.dcm: duplicate SOPInstanceUID" in printed and "(an intact copy is used)" in printed
    _assert_suv(sitk.GetArrayFromImage(sitk.ReadImage(str(out))), _expected_suv(_activity()))


def test_convert_dicom_fails_a_series_with_two_differing_copies_of_one_slice(tmp_path, capsys):
    from _dicom_factories import write_ct_series, write_rtstruct
    from pydicom.uid import generate_uid

    common = dict(study_uid=generate_uid(), frame_of_reference_uid=generate_uid())
    study = tmp_path / "src" / "P1"
    pet = write_pet_series(study / "pet", _activity(), **common)
    write_ct_series(study / "ct", np.zeros(SHAPE), (4.0, 4.0, 4.0), **common)
    lesion = np.zeros(SHAPE, dtype=np.uint8)
    lesion[2:4, 4:8, 3:7] = 1
    write_rtstruct(study / "rt" / "rs.dcm", pet, {"lesion": lesion})
    _differing_copy(study / "pet")
    raw = tmp_path / "raw"
    code = main(["convert", "dicom", str(tmp_path / "src"), "-d", "234", "-n", "Dup", "-o", str(raw), "--no-progress"])
    assert code != 0 and "SOPInstanceUID" in capsys.readouterr().err
    assert not list((raw / "Dataset234_Dup" / "imagesTr").glob("*.nii.gz"))


def test_suv_command_notes_other_skipped_files_and_converts(tmp_path, pet_dir, capsys):
    (pet_dir / "notes.txt").write_text("not a slice")
    out = tmp_path / "suv.nii.gz"
    assert main(["suv", str(pet_dir), str(out)]) == 0
    printed = capsys.readouterr().out
    assert "warning: skipped" in printed and "notes.txt" in printed
    assert sitk.ReadImage(str(out)).GetSize() == (SHAPE[2], SHAPE[1], SHAPE[0])


def test_suv_command_does_not_overwrite_an_existing_output_silently(tmp_path, pet_dir, capsys):
    # Before: an existing file was replaced without a word. A demanding user who ran the command
    # with other flags (or on another series) by mistake loses the earlier result: refuse, and
    # replace it only with --overwrite.
    out = tmp_path / "suv.nii.gz"
    out.write_bytes(b"an earlier result")
    assert main(["suv", str(pet_dir), str(out)]) == 2
    errors = _error_lines(capsys)
    assert len(errors) == 1 and "exists" in errors[0] and "--overwrite" in errors[0]
    assert out.read_bytes() == b"an earlier result"
    assert main(["suv", str(pet_dir), str(out), "--overwrite"]) == 0
    assert sitk.ReadImage(str(out)).GetSize() == (SHAPE[2], SHAPE[1], SHAPE[0])


def test_suv_command_with_a_file_instead_of_a_folder_says_so(tmp_path, pet_dir, capsys):
    first = sorted(pet_dir.iterdir())[0]
    assert main(["suv", str(first), str(tmp_path / "suv.nii.gz")]) == 2
    errors = _error_lines(capsys)
    assert len(errors) == 1 and "is a file" in errors[0] and "folder" in errors[0]


def test_suv_command_on_a_read_only_file_system_is_one_line_and_leaves_nothing(tmp_path, pet_dir, capsys):
    # /proc accepts no new files even for root (a chmod'ed folder does not stop root).
    out = Path("/proc/l1dfl_suv_test.nii.gz")
    if not Path("/proc").is_dir():
        pytest.skip("no /proc to stand for a read-only file system")
    assert main(["suv", str(pet_dir), str(out)]) == 1
    errors = _error_lines(capsys)
    assert len(errors) == 1 and errors[0].startswith(f"error: cannot write {out}")
    assert not out.exists() and not list(Path("/proc").glob(".l1dfl_suv_test*"))


def test_suv_command_refuses_a_malformed_nuclide_option(tmp_path, pet_dir, capsys):
    with pytest.raises(SystemExit) as info:
        main(["suv", str(pet_dir), str(tmp_path / "suv.nii.gz"), "--nuclide", "F-18=110"])
    assert info.value.code == 2
    assert "F-18" in capsys.readouterr().err and not (tmp_path / "suv.nii.gz").exists()


# =============================================================================================
# Already right: documented so it stays right
# =============================================================================================

REFUSED = {
    # name: (factory kwargs or a change(ds, rp, k), the message)
    "weight empty": (lambda ds, rp, k: _put(ds, "PatientWeight", ""), r"missing PatientWeight \(0010,1030\)"),
    "weight 0": ({"weight_kg": "0"}, r"PatientWeight \(0010,1030\) is 0"),
    "weight -1": ({"weight_kg": "-1"}, r"PatientWeight \(0010,1030\) is -1"),
    "weight NaN": ({"weight_kg": "NaN"}, r"PatientWeight \(0010,1030\) is not finite"),
    "weight inf": ({"weight_kg": "inf"}, r"PatientWeight \(0010,1030\) is not finite"),
    "weight 70kg": (lambda ds, rp, k: _put(ds, "PatientWeight", "70kg"), r"PatientWeight \(0010,1030\) is not a number: '70kg'"),
    "weight 1e3": ({"weight_kg": "1e3"}, r"implausible SUV: PatientWeight \(0010,1030\) 1000 kg"),
    "weight two values": (lambda ds, rp, k: _put(ds, "PatientWeight", ["75", "80"]), r"PatientWeight \(0010,1030\) is not a number"),
    "dose empty": (lambda ds, rp, k: _put(rp, "RadionuclideTotalDose", ""), r"missing RadionuclideTotalDose \(0018,1074\)"),
    "dose 0": ({"dose_bq": "0"}, r"RadionuclideTotalDose \(0018,1074\) is 0"),
    "dose -1": ({"dose_bq": "-1"}, r"RadionuclideTotalDose \(0018,1074\) is -1"),
    "dose NaN": ({"dose_bq": "NaN"}, r"RadionuclideTotalDose \(0018,1074\) is not finite"),
    "dose 350MBq": (lambda ds, rp, k: _put(rp, "RadionuclideTotalDose", "350MBq"), r"RadionuclideTotalDose \(0018,1074\) is not a number"),
    "dose per slice": (lambda ds, rp, k: setattr(rp, "RadionuclideTotalDose", "3.5e8" if k else "3.6e8"), r"contradictory RadionuclideTotalDose"),
    "half-life 0": (lambda ds, rp, k: _put(rp, "RadionuclideHalfLife", "0"), r"RadionuclideHalfLife \(0018,1075\) is 0"),
    "half-life minutes": ({"half_life": 109.77}, r"RadionuclideHalfLife \(0018,1075\) is 109.77 s"),
    "half-life per slice": (lambda ds, rp, k: _put(rp, "RadionuclideHalfLife", "6586.2" if k else "6588"), r"contradictory RadionuclideHalfLife"),
    "units per slice": (lambda ds, rp, k: _put(ds, "Units", "BQML" if k else "GML"), r"contradictory Units \(0054,1001\)"),
    "decay correction unknown": ({"decay_correction": "DECAY"}, r"DecayCorrection \(0054,1102\) 'DECAY' is not one of"),
    "decay correction per slice": (lambda ds, rp, k: _put(ds, "DecayCorrection", "START" if k else "NONE"), r"contradictory DecayCorrection"),
    "series time 24:00": ({"SeriesTime": "24:00"}, r"unreadable SeriesDate/SeriesTime \(0008,0021/0031\)"),
    "series time 7 fraction digits": ({"SeriesTime": "110000.1234567"}, r"not a DICOM time"),
    "series time with offset": ({"SeriesTime": "110000+0100"}, r"not a DICOM time"),
    "series date d/m/y": ({"SeriesDate": "01/01/2024"}, r"unreadable SeriesDate/SeriesTime \(0008,0021/0031\)"),
    "injection 24:00": ({"RadiopharmaceuticalStartDateTime": "20240101240000"}, r"RadiopharmaceuticalStartDateTime \(0018,1078\)"),
    "rp sequence empty": (lambda ds, rp, k: setattr(ds, "RadiopharmaceuticalInformationSequence", []), r"missing RadiopharmaceuticalInformationSequence"),
    "rp item empty": (lambda ds, rp, k: setattr(ds, "RadiopharmaceuticalInformationSequence", [pydicom.Dataset()]), r"missing RadionuclideTotalDose"),
    "rescale slope text": (lambda ds, rp, k: _put(ds, "RescaleSlope", "abc"), r"RescaleSlope \(0028,1053\) is not a number"),
    "rescale slope two values": (lambda ds, rp, k: _put(ds, "RescaleSlope", ["1", "2"]), r"RescaleSlope \(0028,1053\) is not a number"),
    "acquisition time missing on a slice (NONE)": (
        {"decay_correction": "NONE", "_change": lambda ds, rp, k: delattr(ds, "AcquisitionTime") if k == 2 else None},
        r"pet_002.dcm: DecayCorrection NONE needs AcquisitionTime",
    ),
    "patient size in cm (LBM)": ({"units": "GML", "SUVType": "LBM", "PatientSex": "M", "PatientSize": "175"}, r"looks like centimetres"),
    "GE scan start unreadable": (
        {"SeriesTime": "120000", "private_creator": "GEMS_PETD_01", "private": {(0x0009, 0x100D): ("LO", "garbage")}},
        r"unreadable GE private scan start \(0009,100D\)",
    ),
    "Philips factor text": (
        {"units": "CNTS", "private_creator": "Philips PET Private Group", "private": {(0x7053, 0x1000): ("LO", "abc")}},
        r"unreadable Philips SUV scale factor \(7053,1000\)",
    ),
    "two slices at one position": (
        lambda ds, rp, k: setattr(ds, "ImagePositionPatient", ["0", "0", "8"]) if k == 3 else None,
        r"pet_003.dcm: same ImagePositionPatient \(0020,0032\)",
    ),
    "a slice of another series": (
        lambda ds, rp, k: setattr(ds, "SeriesInstanceUID", "1.2.3.4") if k == 2 else None,
        r"pet_002.dcm: SeriesInstanceUID \(0020,000E\) '1.2.3.4' differs",
    ),
    "Philips factor missing on a slice": (
        {"units": "CNTS", "private_creator": "Philips PET Private Group", "private": {(0x7053, 0x1000): ("DS", "0.0003")},
         "_change": lambda ds, rp, k: ds.__delitem__((0x7053, 0x1000)) if k == 3 else None},
        r"pet_003.dcm: missing Philips SUV scale factor \(7053,1000\)",
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_bad_header_values_are_refused_naming_the_tag(tmp_path, name):
    spec, message = REFUSED[name]
    if callable(spec):
        kwargs, change = {}, spec
    else:
        kwargs = dict(spec)
        change = kwargs.pop("_change", None)
    files = write_pet_series(tmp_path, _activity(), **kwargs)
    if change is not None:
        _mutate(files, change)
    with pytest.raises(SUVError, match=rf"^case case_x: .*{message}"):
        _read(tmp_path)


ACCEPTED = {
    # name: (factory kwargs, what the SUV must equal: the default header's)
    "units lowercase": {"units": "bqml"},
    "units with spaces": {"Units": " BQML "},
    "decay correction lowercase": {"decay_correction": "start"},
    "series time HHMM": {"SeriesTime": "1100"},
    "series time HH:MM:SS": {"SeriesTime": "11:00:00"},
    "series time with an empty fraction": {"SeriesTime": "110000."},
    "injection date-time HHMM": {"RadiopharmaceuticalStartDateTime": "202401011000"},
    "frames out of order": {"_shuffle": True},
    "multi-bed acquisition times": {"acquisition_times": ["110000", "110000", "110500", "110500", "111000", "111000"]},
    "patient size 0, not needed for BQML": {"PatientSize": "0"},
}


@pytest.mark.parametrize("name", sorted(ACCEPTED))
def test_valid_but_unusual_headers_give_the_same_suv(tmp_path, name):
    kwargs = dict(ACCEPTED[name])
    shuffle = kwargs.pop("_shuffle", False)
    files = write_pet_series(tmp_path, _activity(), **kwargs)
    if shuffle:  # file names no longer in slice order: the stack is sorted by position
        for k, path in enumerate(files):
            path.rename(tmp_path / f"x{(k * 7) % len(files)}.dcm")
    _assert_suv(_suv(tmp_path), _expected_suv(_activity()))


def test_decay_correction_none_frames_in_any_file_order_give_the_same_suv(tmp_path):
    times = ["110000", "110000", "110500", "110500", "111000", "111000"]  # three beds
    write_pet_series(tmp_path / "a", _activity(), decay_correction="NONE", acquisition_times=times)
    expected = _suv(tmp_path / "a")
    files = write_pet_series(tmp_path / "b", _activity(), decay_correction="NONE", acquisition_times=times)
    for k, path in enumerate(files):
        path.rename(path.with_name(f"x{(k * 5) % len(files)}.dcm"))
    np.testing.assert_array_equal(_suv(tmp_path / "b"), expected)
    # and the per-frame decay is applied: the last bed (10 min later) is corrected by 2**(600 / T)
    flat = _suv(tmp_path / "a") / _activity()
    assert flat[5].mean() / flat[0].mean() == pytest.approx(2 ** (600 / F18), rel=1e-3)


@pytest.mark.parametrize("change, reason", [
    (lambda ds, rp, k: _put(ds, "ActualFrameDuration", "abc"), "ActualFrameDuration (0018,1242) is not a number of ms: 'abc'"),
    (lambda ds, rp, k: _put(rp, "RadiopharmaceuticalStartDateTime", "20240101"),
     "RadiopharmaceuticalStartDateTime (0018,1078) '20240101' has a date but no time of day"),
])  # fmt: skip
def test_convert_dicom_fails_the_case_naming_the_tag(tmp_path, capsys, change, reason):
    """The SUV path of ``l1dfl convert dicom``: an ActualFrameDuration 'abc' was a raw ValueError reason
    ("ValueError: could not convert string to float"), a date-only injection DT a case with SUV x 44."""
    from _dicom_factories import write_ct_series, write_rtstruct
    from pydicom.uid import generate_uid

    common = dict(study_uid=generate_uid(), frame_of_reference_uid=generate_uid())
    study = tmp_path / "src" / "P1"
    pet = write_pet_series(study / "pet", _activity(), decay_correction="NONE", omit=("RadiopharmaceuticalStartTime",), **common)
    write_ct_series(study / "ct", np.zeros(SHAPE), (4.0, 4.0, 4.0), **common)
    lesion = np.zeros(SHAPE, dtype=np.uint8)
    lesion[2:4, 4:8, 3:7] = 1
    write_rtstruct(study / "rt" / "rs.dcm", pet, {"lesion": lesion})
    _mutate(pet, change)
    raw = tmp_path / "raw"
    code = main(["convert", "dicom", str(tmp_path / "src"), "-d", "231", "-n", "RT", "-o", str(raw), "--no-progress"])
    captured = capsys.readouterr()
    assert code != 0 and "Traceback" not in captured.err + captured.out
    assert reason in captured.err and "ValueError" not in captured.err
    assert not list((raw / "Dataset231_RT" / "imagesTr").glob("*.nii.gz"))
