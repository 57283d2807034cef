"""SUVbw from PET DICOM: the IBSI DROs and synthetic series for every branch of the decision tree."""

import csv
import math
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from _dicom_factories import write_pet_series

from nnunetv2_l1dfl.cli import main
from nnunetv2_l1dfl.conversion.suv import SUVError, parse_nuclide_option, read_pet_suv, suv_bw_scale

# DRO ID -> a part of the branch that proves the DRO went down the path it tests (DRO_list.csv).
DRO_BRANCH = {
    "DRO_0_0": "BQML|START|SeriesTime",
    "DRO_1_0": "BQML|START|SeriesTime",
    "DRO_2_0": "GML|SUVType=BW",
    "DRO_2_4": "CNTS|Philips-SUV-scale-factor(7053,1000)",
    "DRO_2_5": "CNTS|Philips-activity-scale-factor(7053,1009)|START",
    "DRO_3_0": "dose_MBq_fixed",
    "DRO_3_1": "BQML|ADMIN",
    "DRO_3_2": "START|back-computed",
    "DRO_3_3": "START|SeriesTime",  # SeriesTime precedes AcquisitionTime there, so the GE tag is not needed
    "DRO_3_4": "BQML|NONE|per-frame-AcquisitionTime",
    "DRO_4_0": "RadiopharmaceuticalStartDateTime",
    "DRO_4_2": "RadiopharmaceuticalStartTime|midnight-crossing",
}
LN2 = math.log(2.0)


def _dro_rows(ibsi_dro_dir: Path) -> list[dict]:
    with open(ibsi_dro_dir / "DRO_list.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_dro_list_matches_the_folders(ibsi_dro_dir):
    listed = {row["ID"] for row in _dro_rows(ibsi_dro_dir)}
    assert listed == {p.name for p in ibsi_dro_dir.glob("DRO_*") if p.is_dir()} == set(DRO_BRANCH)


@pytest.mark.parametrize("dro", sorted(DRO_BRANCH))
def test_every_ibsi_dro_gives_the_expected_suv(ibsi_dro_dir, dro):
    row = next(r for r in _dro_rows(ibsi_dro_dir) if r["ID"] == dro)
    expected = [float(row[k]) for k in ("SUVmin_expected", "SUVmed_expected", "SUVmax_expected")]
    result = read_pet_suv(ibsi_dro_dir / dro / "PT", case_id=dro)
    mask = sitk.ReadImage(str(ibsi_dro_dir / dro / "mask" / "DRO_mask.nii.gz"))
    assert mask.GetSize() == result.image.GetSize()
    assert np.allclose(mask.GetOrigin(), result.image.GetOrigin()) and np.allclose(mask.GetSpacing(), result.image.GetSpacing())
    suv = sitk.GetArrayFromImage(result.image)[sitk.GetArrayFromImage(mask) > 0]
    measured = [suv.min(), np.median(suv), suv.max()]
    assert measured == pytest.approx(expected, rel=0.005), (dro, row["Description"], result.branch)
    assert DRO_BRANCH[dro] in result.branch
    assert result.image.GetPixelID() == sitk.sitkFloat32


def test_suv_bw_scale_matches_the_hand_computation():
    # 70 kg, 370 MBq, one half-life after injection: dose halves, so SUV = Bq/ml * 70000 / 185e6.
    assert suv_bw_scale(70.0, 370e6, 6586.2, 6586.2) == pytest.approx(70000 / 185e6, rel=1e-12)
    assert suv_bw_scale(70.0, 370e6, 6586.2, 0.0) == pytest.approx(70000 / 370e6, rel=1e-12)
    with pytest.raises(ValueError, match="weight_kg"):
        suv_bw_scale(0.0, 370e6, 6586.2, 10.0)
    with pytest.raises(ValueError, match="seconds_injection_to_reference"):
        suv_bw_scale(70.0, 370e6, 6586.2, -1.0)


# -- synthetic series ------------------------------------------------------------------------

SHAPE = (6, 12, 10)


def _activity(seed: int = 0) -> np.ndarray:
    """Bq/ml with a different maximum per slice, so per-slice rescale slopes differ."""
    rng = np.random.default_rng(seed)
    return rng.uniform(100.0, 20000.0, SHAPE) * np.linspace(0.3, 1.0, SHAPE[0])[:, None, None]


def _expected_suv(activity, weight_kg=75.0, dose_bq=3.5e8, half_life=6586.2, seconds=3600.0):
    """Independent oracle: SUV = A * weight[g] / (dose * exp(-ln2 t / T)) in float64."""
    return activity * weight_kg * 1000.0 / (dose_bq * math.exp(-LN2 * seconds / half_life))


def _assert_suv(actual: np.ndarray, expected: np.ndarray) -> None:
    """Equal up to the int16 quantization of the writer (half a rescale step per slice)."""
    step = np.abs(expected).max(axis=(1, 2), keepdims=True) / 32767.0
    assert np.all(np.abs(actual - expected) <= 0.5 * step + 1e-5 * np.abs(expected)), np.abs(actual - expected).max()


def _suv(folder: Path, case_id: str = "case_x") -> tuple[np.ndarray, str, dict]:
    result = read_pet_suv(sorted(folder.iterdir()), case_id=case_id)
    return sitk.GetArrayFromImage(result.image), result.branch, result.details


def test_bqml_start_per_slice_rescale(tmp_path):
    activity = _activity()
    files = write_pet_series(tmp_path, activity, (2.0, 3.0, 4.0), (-10.0, 5.0, 20.0))
    slopes = {float(pydicom.dcmread(p, stop_before_pixels=True).RescaleSlope) for p in files}
    assert len(slopes) == SHAPE[0]  # the reader must apply each slice's own slope
    suv, branch, details = _suv(tmp_path)
    _assert_suv(suv, _expected_suv(activity))
    assert branch == "BQML|START|SeriesTime|RadiopharmaceuticalStartDateTime"
    assert details["seconds_injection_to_reference"] == 3600.0
    assert details["weight_kg"] == 75.0 and details["tracer"] == "FDG"


def test_weight_in_grams_and_dose_in_mbq_are_fixed(tmp_path):
    activity = _activity(1)
    write_pet_series(tmp_path, activity, weight_kg=75000.0, dose_bq=350.0)
    suv, branch, details = _suv(tmp_path)
    _assert_suv(suv, _expected_suv(activity))
    assert branch.endswith("weight_g_fixed|dose_MBq_fixed")
    assert details["weight_kg"] == 75.0 and details["injected_dose_bq"] == 3.5e8


def test_ge_private_scan_start_when_series_time_is_after_acquisition(tmp_path):
    # Series re-saved at 12:00; acquisition 11:10; GE's scan start 11:00 is the reference.
    activity = _activity(2)
    write_pet_series(
        tmp_path, activity, series_time="120000", acquisition_times=["111000"] * SHAPE[0],
        Manufacturer="GE MEDICAL SYSTEMS", private={(0x0009, 0x100D): ("DT", "20240101110000.00")},
    )  # fmt: skip
    suv, branch, _ = _suv(tmp_path)
    _assert_suv(suv, _expected_suv(activity, seconds=3600.0))
    assert "START|GE-private(0009,100D)" in branch


def test_back_computed_scan_start_and_its_consistency_check(tmp_path):
    # Scan start 11:00; beds start 150 s apart; FrameReferenceTime = bed offset + mean-count time.
    activity = _activity(3)
    duration, lam = 120.0, LN2 / 6586.2
    t_avg = math.log(lam * duration / (1 - math.exp(-lam * duration))) / lam
    offsets = [0, 0, 0, 150, 150, 150]
    acquisition = [f"11{o // 60:02d}{o % 60:02d}" for o in offsets]
    frame_reference = [(o + t_avg) * 1000.0 for o in offsets]
    write_pet_series(
        tmp_path / "ok", activity, series_time="113000", acquisition_times=acquisition,
        frame_duration_ms=int(duration * 1000), frame_reference_times_ms=frame_reference,
    )  # fmt: skip
    suv, branch, details = _suv(tmp_path / "ok")
    _assert_suv(suv, _expected_suv(activity, seconds=3600.0))
    assert "START|back-computed" in branch
    assert details["reference_time"].startswith("2024-01-01T11:00:00")

    frame_reference[-1] += 60_000.0  # one slice now implies a scan start a minute earlier
    write_pet_series(
        tmp_path / "bad", activity, series_time="113000", acquisition_times=acquisition,
        frame_duration_ms=int(duration * 1000), frame_reference_times_ms=frame_reference,
    )  # fmt: skip
    with pytest.raises(SUVError, match=r"case_x.*FrameReferenceTime \(0054,1300\)"):
        _suv(tmp_path / "bad")


def test_private_ge_tag_of_another_vendor_is_not_used(tmp_path):
    write_pet_series(
        tmp_path, _activity(), series_time="120000", acquisition_times=["111000"] * SHAPE[0],
        omit=("FrameReferenceTime",), private={(0x0009, 0x100D): ("DT", "20240101110000.00")},
    )  # fmt: skip
    with pytest.raises(SUVError, match=r"FrameReferenceTime \(0054,1300\)"):
        _suv(tmp_path)


def test_injection_time_only_and_midnight_crossing(tmp_path):
    activity = _activity(4)
    write_pet_series(
        tmp_path, activity, study_date="20240102", series_time="003000", injection_time="233000",
        omit=("RadiopharmaceuticalStartDateTime",),
    )  # fmt: skip
    suv, branch, details = _suv(tmp_path)
    _assert_suv(suv, _expected_suv(activity, seconds=3600.0))
    assert branch.endswith("RadiopharmaceuticalStartTime|midnight-crossing")
    assert details["injection_time"] == "2024-01-01T23:30:00"


def test_decay_correction_none_corrects_each_frame(tmp_path):
    # Uncorrected images: each slice shows the frame mean of a decaying source, frames at
    # 11:00 and 11:10 with 300 s duration; SUV must come out as if corrected to injection.
    lam, duration = LN2 / 6586.2, 300.0
    suv_true = _activity(5) * 1e-4
    acquisition = ["110000"] * 3 + ["111000"] * 3
    measured = np.empty(SHAPE)
    for k, t in enumerate(acquisition):
        seconds = 3600.0 + (600.0 if t == "111000" else 0.0)
        frame_mean = math.exp(-lam * seconds) * (1 - math.exp(-lam * duration)) / (lam * duration)
        measured[k] = suv_true[k] * 3.5e8 / 75000.0 * frame_mean
    write_pet_series(
        tmp_path, measured, decay_correction="NONE", acquisition_times=acquisition, frame_duration_ms=300000
    )
    suv, branch, _ = _suv(tmp_path)
    _assert_suv(suv, suv_true)
    assert branch.startswith("BQML|NONE|per-frame-AcquisitionTime")


def test_admin_decay_correction_has_no_decay_factor(tmp_path):
    activity = _activity(6)
    write_pet_series(tmp_path, activity, decay_correction="ADMIN")
    suv, branch, details = _suv(tmp_path)
    _assert_suv(suv, _expected_suv(activity, seconds=0.0))
    assert branch == "BQML|ADMIN" and details["decay_factor"] == 1.0


def test_gml_is_taken_as_suv_and_philips_counts(tmp_path):
    suv_true = _activity(7) * 1e-4
    write_pet_series(tmp_path / "gml", suv_true, units="GML", SUVType="BW")
    suv, branch, _ = _suv(tmp_path / "gml")
    _assert_suv(suv, suv_true)
    assert branch == "GML|SUVType=BW"
    write_pet_series(tmp_path / "gml_no_type", suv_true, units="GML")
    assert _suv(tmp_path / "gml_no_type")[1] == "GML|SUVType-absent-assumed-BW"

    counts = _activity(8)
    write_pet_series(
        tmp_path / "cnts", counts, units="CNTS", private={(0x7053, 0x1009): ("DS", "0.25")},
        private_creator="Philips PET Private Group",
    )  # fmt: skip
    suv, branch, _ = _suv(tmp_path / "cnts")
    _assert_suv(suv, _expected_suv(counts * 0.25))
    assert branch.startswith("CNTS|Philips-activity-scale-factor(7053,1009)|START")
    write_pet_series(  # the same element in a block another vendor owns means something else
        tmp_path / "not_philips", counts, units="CNTS", private={(0x7053, 0x1009): ("DS", "0.25")},
        private_creator="SOME OTHER VENDOR",
    )  # fmt: skip
    with pytest.raises(SUVError, match=r"CNTS without the Philips SUV scale factor"):
        _suv(tmp_path / "not_philips")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"omit": ("PatientWeight",)}, r"case_x: .*PatientWeight \(0010,1030\)"),
        ({"weight_kg": "0"}, r"case_x: PatientWeight \(0010,1030\) is 0"),
        ({"omit": ("RadionuclideTotalDose",)}, r"case_x: missing RadionuclideTotalDose \(0018,1074\)"),
        ({"omit": ("RadionuclideHalfLife",)}, r"case_x: missing RadionuclideHalfLife \(0018,1075\)"),
        (
            {"omit": ("RadiopharmaceuticalStartTime", "RadiopharmaceuticalStartDateTime")},
            r"case_x: no injection time: RadiopharmaceuticalStartDateTime \(0018,1078\)",
        ),
        ({"omit": ("RadiopharmaceuticalInformationSequence",)}, r"RadiopharmaceuticalInformationSequence \(0054,0016\)"),
        ({"omit": ("Units",)}, r"case_x: missing Units \(0054,1001\)"),
        ({"units": "PROPCNTS"}, r"Units \(0054,1001\) 'PROPCNTS'"),
        ({"units": "CPS"}, r"CPS: the image is not dose calibrated"),
        ({"units": "GML", "SUVType": "LBM", "omit": ("PatientSize",)}, r"missing PatientSize \(0010,1020\)"),
        ({"units": "CM2ML", "omit": ("PatientWeight",)}, r"PatientWeight \(0010,1030\)"),
        ({"units": "CNTS"}, r"\(7053,1000\) or activity concentration scale factor \(7053,1009\)"),
        ({"decay_correction": "WEIRD"}, r"DecayCorrection \(0054,1102\) 'WEIRD'"),
        ({"injection_time": "113000"}, r"after the reference time"),  # full date-time after the scan
    ],
)
def test_unresolvable_headers_raise_suv_error_naming_tag_and_case(tmp_path, kwargs, message):
    write_pet_series(tmp_path, _activity(), **kwargs)
    with pytest.raises(SUVError, match=message):
        _suv(tmp_path)


def test_contradictory_slices_raise(tmp_path):
    files = write_pet_series(tmp_path, _activity())
    ds = pydicom.dcmread(files[3])
    ds.PatientWeight = "80"
    ds.save_as(files[3])
    with pytest.raises(SUVError, match=r"contradictory PatientWeight \(0010,1030\).*pet_003.dcm"):
        _suv(tmp_path)


# -- half-life against the nuclide -----------------------------------------------------------


def _name_nuclide(files: list[Path], code: tuple[str, str, str] | None = None, radionuclide: str | None = None) -> None:
    """Add RadionuclideCodeSequence (0054,0300) (value, scheme, meaning) and/or Radionuclide (0018,0030)."""
    for path in files:
        ds = pydicom.dcmread(path)
        item = ds.RadiopharmaceuticalInformationSequence[0]
        if code is not None:
            entry = pydicom.Dataset()
            entry.CodeValue, entry.CodingSchemeDesignator, entry.CodeMeaning = code
            item.RadionuclideCodeSequence = pydicom.Sequence([entry])
        if radionuclide is not None:
            item.Radionuclide = radionuclide
        ds.save_as(path)


F18_CODE = ("C-111A1", "SRT", "^18^Fluorine")
GA68_CODE = ("C-131A3", "SRT", "^68^Gallium")


@pytest.mark.parametrize(
    "code, radionuclide",
    [(F18_CODE, None), (None, None), (("77004003", "SCT", "Fluorine-18"), None), (("99XYZ", "99LOCAL", "Fluorine^18^"), None),
     (None, "18F")],
)  # fmt: skip
def test_half_life_in_minutes_is_refused_naming_the_tag(tmp_path, code, radionuclide):
    files = write_pet_series(tmp_path, _activity(), half_life=109.77)  # F-18 in minutes
    _name_nuclide(files, code, radionuclide)
    with pytest.raises(SUVError, match=r"case_x: RadionuclideHalfLife \(0018,1075\) is 109\.77 s") as info:
        _suv(tmp_path)
    assert "F-18's half-life in minutes" in str(info.value)
    if code is None and radionuclide is None:
        assert "matches no known PET radionuclide" in str(info.value)
    else:
        assert "names F-18, whose half-life is 6586.2 s" in str(info.value)


@pytest.mark.parametrize("half_life", [4062.6, 4080.0, 4063.0])
def test_ga68_with_its_own_half_life_converts(tmp_path, half_life):
    activity = _activity(3)
    files = write_pet_series(tmp_path, activity, half_life=half_life, tracer="PSMA-11")
    _name_nuclide(files, GA68_CODE)
    suv, branch, details = _suv(tmp_path)
    _assert_suv(suv, _expected_suv(activity, half_life=half_life))
    assert details["nuclide"] == "Ga-68" and details["half_life_s"] == half_life
    # The same series without any nuclide named is accepted by its half-life alone.
    files = write_pet_series(tmp_path / "unnamed", activity, half_life=half_life)
    assert _suv(tmp_path / "unnamed")[2]["nuclide"] == "Ga-68"


@pytest.mark.parametrize(
    "half_life, code, radionuclide, named",
    [
        (4062.6, F18_CODE, None, "RadionuclideCodeSequence (0054,0300) code C-111A1 names F-18"),
        (6586.2, GA68_CODE, None, "RadionuclideCodeSequence (0054,0300) code C-131A3 names Ga-68"),
        (6586.2, ("C-105A1", "SRT", "^11^Carbon"), None, "names C-11, whose half-life is 1221.8 s"),
        (6586.2, None, "Ga-68", "Radionuclide (0018,0030) 'Ga-68' names Ga-68"),
        (1221.8, ("35337001", "SCT", "^68^Gallium"), None, "code 35337001 names Ga-68"),
    ],
)
def test_nuclide_and_half_life_that_disagree_raise(tmp_path, half_life, code, radionuclide, named):
    files = write_pet_series(tmp_path, _activity(), half_life=half_life)
    _name_nuclide(files, code, radionuclide)
    with pytest.raises(SUVError, match=r"case_x: RadionuclideHalfLife \(0018,1075\) is ") as info:
        _suv(tmp_path)
    assert named in str(info.value)


def test_half_life_of_no_pet_nuclide_is_refused_and_vendor_variants_pass(tmp_path):
    write_pet_series(tmp_path / "odd", _activity(), half_life=5000.0)
    with pytest.raises(SUVError, match=r"\(0018,1075\) is 5000 s, which matches no known PET radionuclide"):
        _suv(tmp_path / "odd")
    for half_life, nuclide in ((6588.0, "F-18"), (1223.0, "C-11"), (45720.0, "Cu-64"), (282240.0, "Zr-89")):
        folder = tmp_path / f"ok_{half_life:g}"
        write_pet_series(folder, _activity(), half_life=half_life)
        assert _suv(folder)[2]["nuclide"] == nuclide


SC44_HALF_LIFE_S = 14292.0  # Sc-44, 3.97 h: a PET nuclide the built-in table does not list


def test_unlisted_nuclide_is_refused_until_declared(tmp_path):
    activity = _activity()
    files = write_pet_series(tmp_path, activity, half_life=SC44_HALF_LIFE_S)
    with pytest.raises(SUVError, match=r"matches no known PET radionuclide") as info:
        _suv(tmp_path)
    assert "--nuclide Sc-44=14292" in str(info.value)  # the error says how to declare one
    result = read_pet_suv(files, case_id="case_x", extra_half_lives={"Sc-44": SC44_HALF_LIFE_S})
    _assert_suv(sitk.GetArrayFromImage(result.image), _expected_suv(activity, half_life=SC44_HALF_LIFE_S))
    assert result.details["nuclide"] == "Sc-44"
    # Declaring a nuclide does not switch the check off: minutes for seconds still fail.
    write_pet_series(tmp_path / "minutes", activity, half_life=SC44_HALF_LIFE_S / 60)
    with pytest.raises(SUVError, match=r"half-life in minutes"):
        read_pet_suv(sorted((tmp_path / "minutes").iterdir()), extra_half_lives={"Sc-44": SC44_HALF_LIFE_S})


@pytest.mark.parametrize(
    "text, message",
    [("Sc-44", "expected NAME=SECONDS"), ("=100", "must not be empty"), ("Sc-44=abc", "number of seconds"),
     ("Sc-44=-5", "positive"), ("Sc-44=nan", "positive")],
)  # fmt: skip
def test_nuclide_option_is_validated(text, message):
    with pytest.raises(ValueError, match=message):
        parse_nuclide_option(text)
    assert parse_nuclide_option(" Sc-44 = 14292 ") == ("Sc-44", 14292.0)


def test_suv_command_takes_declared_nuclides(tmp_path, capsys):
    write_pet_series(tmp_path / "pet", _activity(), half_life=SC44_HALF_LIFE_S)
    out = tmp_path / "suv.nii.gz"
    assert main(["suv", str(tmp_path / "pet"), str(out)]) == 1
    assert "RadionuclideHalfLife (0018,1075)" in capsys.readouterr().err and not out.exists()
    assert main(["suv", str(tmp_path / "pet"), str(out), "--nuclide", "Sc-44=14292"]) == 0
    assert out.exists()
    with pytest.raises(SystemExit) as exit_info:
        main(["suv", str(tmp_path / "pet"), str(out), "--nuclide", "Sc-44"])
    assert exit_info.value.code == 2 and "expected NAME=SECONDS" in capsys.readouterr().err
