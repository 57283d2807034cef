"""Units GML with SUVType LBM / LBMJAMES128 / LBMJANMA / IBW, Units CM2ML (BSA) and Units CPS back to
SUVbw, as the IBSI SUV manual says (issue 10, SUV). The oracle below writes the factors out again,
deliberately as plain formulas in float64 (not the module's code), per sex."""

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from _dicom_factories import write_pet_series

from nnunetv2_l1dfl.conversion.suv import SUVError, read_pet_suv

SHAPE = (5, 8, 9)
W, H_M = 82.0, 1.68  # kg, m
H = H_M * 100.0  # cm
BMI = W / H_M**2

# SUVType -> {sex: factor}; kg for LBM and IBW, m2 for BSA (Du Bois).
FACTORS = {
    "LBM": {"M": 1.10 * W - 120.0 * (W / H) ** 2, "F": 1.07 * W - 148.0 * (W / H) ** 2},
    "LBMJAMES128": {"M": 1.10 * W - 128.0 * (W / H) ** 2, "F": 1.07 * W - 148.0 * (W / H) ** 2},
    "LBMJANMA": {"M": 9270.0 * W / (6680.0 + 216.0 * BMI), "F": 9270.0 * W / (8780.0 + 244.0 * BMI)},
    "IBW": {"M": 48.0 + 1.06 * (H - 152.0), "F": 45.5 + 0.91 * (H - 152.0)},
    "BSA": {s: 0.007184 * H**0.725 * W**0.425 for s in "MF"},
}


def _suv_bw(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.uniform(0.1, 9.0, SHAPE)


def _factor(suv_type: str, sex: str) -> float:
    per_sex = FACTORS[suv_type]
    return (per_sex["M"] + per_sex["F"]) / 2.0 if sex == "O" else per_sex[sex]


def _stored(suv_bw: np.ndarray, suv_type: str, sex: str) -> np.ndarray:
    """SUV_F = Ac x F / D = SUVbw x F / W; for BSA in cm2/ml (F in cm2, W in g)."""
    if suv_type == "BSA":
        return suv_bw * (_factor(suv_type, sex) * 1e4) / (W * 1000.0)
    return suv_bw * _factor(suv_type, sex) / W


def _read(folder: Path):
    result = read_pet_suv(sorted(folder.iterdir()), case_id="case_x")
    return sitk.GetArrayFromImage(result.image), result


@pytest.mark.parametrize("sex", ["M", "F", "O"])
@pytest.mark.parametrize("suv_type", ["LBM", "LBMJAMES128", "LBMJANMA", "IBW", "BSA"])
def test_normalized_suv_back_to_body_weight(tmp_path, suv_type, sex):
    suv_bw = _suv_bw()
    units = "CM2ML" if suv_type == "BSA" else "GML"
    write_pet_series(tmp_path, _stored(suv_bw, suv_type, sex), units=units, SUVType=suv_type,
                     weight_kg=W, PatientSize=f"{H_M}", PatientSex=sex)  # fmt: skip
    suv, result = _read(tmp_path)
    np.testing.assert_allclose(suv, suv_bw, rtol=2e-4, atol=2e-4)  # int16 quantization of the writer
    assert f"{units}|SUVType={suv_type}" in result.branch
    assert (f"PatientSex={sex}" in result.branch) == (suv_type != "BSA")  # Du Bois does not depend on sex
    assert result.details["normalization_factor"] == pytest.approx(_factor(suv_type, sex), rel=1e-9)


def test_cm2ml_without_suv_type_is_bsa_and_hand_value(tmp_path):
    # Hand value: W 82 kg, H 168 cm: 168**0.725 = exp(0.725 * 5.1240) = 41.07, 82**0.425 =
    # exp(0.425 * 4.4067) = 6.506, BSA = 0.007184 * 41.07 * 6.506 = 1.919 m2 (Du Bois).
    assert FACTORS["BSA"]["M"] == pytest.approx(1.919, abs=1e-3)
    suv_bw = _suv_bw(1)
    write_pet_series(tmp_path, _stored(suv_bw, "BSA", "M"), units="CM2ML", weight_kg=W, PatientSize=f"{H_M}",
                     PatientSex="M")  # fmt: skip
    suv, result = _read(tmp_path)
    np.testing.assert_allclose(suv, suv_bw, rtol=2e-4, atol=2e-4)
    assert "CM2ML|SUVType-absent-assumed-BSA" in result.branch


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"omit": ("PatientSize",)}, r"case_x: .*PatientSize \(0010,1020\)"),
        ({"PatientSize": "168"}, r"PatientSize \(0010,1020\) 168 m .*centimetres"),
        ({"omit": ("PatientSex",)}, r"case_x: .*PatientSex \(0010,0040\)"),
        ({"PatientSex": "X"}, r"PatientSex \(0010,0040\) 'X'"),
        ({"omit": ("PatientWeight",)}, r"PatientWeight \(0010,1030\)"),
        ({"SUVType": "BSA"}, r"Units \(0054,1001\) GML with SUVType \(0054,1006\) 'BSA'"),
        ({"SUVType": "WEIRD"}, r"SUVType \(0054,1006\) 'WEIRD'"),
    ],
)
def test_normalized_suv_needs_its_tags(tmp_path, kwargs, message):
    kwargs = {"units": "GML", "SUVType": "LBM", "PatientSize": "1.68", "PatientSex": "M", **kwargs}
    write_pet_series(tmp_path, _suv_bw(), **kwargs)
    with pytest.raises(SUVError, match=message):
        _read(tmp_path)


def test_cm2ml_with_another_suv_type_is_contradictory(tmp_path):
    write_pet_series(tmp_path, _suv_bw(), units="CM2ML", SUVType="LBM", PatientSize="1.68", PatientSex="M")
    with pytest.raises(SUVError, match=r"Units \(0054,1001\) CM2ML with SUVType \(0054,1006\) 'LBM'"):
        _read(tmp_path)


# -- Units CPS -------------------------------------------------------------------------------------

SPACING = (4.0, 4.0, 3.0)  # mm: a voxel is 0.048 ml
VOXEL_ML = 4.0 * 4.0 * 3.0 / 1000.0


def _bqml(seed: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).uniform(100.0, 20000.0, SHAPE)


def _expected(bqml: np.ndarray) -> np.ndarray:
    return bqml * 75000.0 / (3.5e8 * 2.0 ** (-3600.0 / 6586.2))


def _assert_quantized(actual: np.ndarray, expected: np.ndarray) -> None:
    """Equal up to the writer's int16 quantization (half a step of each slice's rescale slope)."""
    step = np.abs(expected).max(axis=(1, 2), keepdims=True) / 32767.0
    assert np.all(np.abs(actual - expected) <= 0.5 * step + 1e-5 * np.abs(expected)), np.abs(actual - expected).max()


CORRECTED = ["NORM", "DTIM", "ATTN", "SCAT", "DECY", "RAN"]


def test_cps_dose_calibrated_divides_by_the_voxel_volume(tmp_path):
    bqml = _bqml()
    write_pet_series(tmp_path, bqml * VOXEL_ML, SPACING, units="CPS", CorrectedImage=[*CORRECTED, "DCAL"],
                     SliceThickness="3")  # fmt: skip
    suv, result = _read(tmp_path)
    _assert_quantized(suv, _expected(bqml))
    assert result.branch.startswith("CPS|DCAL|voxel-volume")
    assert result.details["voxel_ml"] == pytest.approx(VOXEL_ML)


def test_cps_with_a_dose_calibration_factor(tmp_path):
    bqml = _bqml(3)
    write_pet_series(tmp_path, bqml * VOXEL_ML / 2.5, SPACING, units="CPS", CorrectedImage=CORRECTED,
                     DoseCalibrationFactor="2.5", SliceThickness="3")  # fmt: skip
    suv, result = _read(tmp_path)
    _assert_quantized(suv, _expected(bqml))
    assert result.branch.startswith("CPS|DoseCalibrationFactor(0054,1322)|voxel-volume")


@pytest.mark.parametrize(
    "corrected, extra, message",
    [
        (CORRECTED, {}, r"CPS: .*not dose calibrated .*DCAL.*CorrectedImage \(0028,0051\).*DoseCalibrationFactor \(0054,1322\)"),
        (["NORM", "DECY", "DCAL"], {}, r"CPS: CorrectedImage \(0028,0051\) .*lacks ATTN"),
        (["NORM", "ATTN", "DCAL"], {}, r"CPS: CorrectedImage \(0028,0051\) .*lacks DECY"),
        ([*CORRECTED, "DCAL"], {"SliceThickness": "6"}, r"SliceThickness \(0018,0050\) 6 mm .*slice spacing 3 mm"),
    ],
)
def test_cps_refused_precisely(tmp_path, corrected, extra, message):
    kwargs = {"SliceThickness": "3", **extra}
    write_pet_series(tmp_path, _bqml() * VOXEL_ML, SPACING, units="CPS", CorrectedImage=corrected, **kwargs)
    with pytest.raises(SUVError, match=message):
        _read(tmp_path)
