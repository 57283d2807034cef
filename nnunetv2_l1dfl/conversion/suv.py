"""PET DICOM to SUVbw, following the QIBA / IBSI SUV decision tree.

    SUVbw = activity concentration (Bq/ml) * body weight (g) / injected dose decay-corrected (Bq)

The steps (``read_pet_suv``), each recorded in ``SUVResult.branch``:

1. Per-slice RescaleSlope / RescaleIntercept in float32 (``dicom_series.load_slice_stack``).
2. Units (0054,1001): ``BQML`` continue; ``CNTS`` (Philips) uses the private SUV scale factor
   (7053,1000) (gives SUV directly) or the activity concentration scale factor (7053,1009) (gives
   Bq/ml, then as BQML); ``GML`` is already SUV, accepted when SUV Type (0054,1006) is ``BW`` (absent
   SUV Type is taken as BW with a warning and says so in the branch; LBM/BSA/IBW are refused);
   ``CM2ML`` is SUVbsa and refused (see below); anything else is refused.
3. Decay correction (0054,1102): ``ADMIN`` (already corrected to injection, no decay factor);
   ``START`` (decay the dose to the reference time); ``NONE`` (correct every slice from its own
   AcquisitionDate/Time to injection, times the frame-duration factor lambda*T/(1-exp(-lambda*T))).
4. Reference time for START: SeriesDate/Time unless it is after the earliest AcquisitionDate/Time;
   then the GE private scan start (0009,100D); then back-computed per slice as
   AcquisitionDateTime - (FrameReferenceTime - average-count-rate time within the frame).
5. Injection: RadiopharmaceuticalStartDateTime (0018,1078), else RadiopharmaceuticalStartTime
   (0018,1072) on the series date, one day earlier if that falls after the reference (midnight).
6. A dose below 1e4 was entered in MBq (times 1e6); a weight above 1000 was entered in grams.
7. Half-life from RadionuclideHalfLife (0018,1075), checked against the nuclide: the one named by
   RadionuclideCodeSequence (0054,0300) (code value or meaning) or Radionuclide (0018,0030) must
   have that half-life within 2 %; with no nuclide named, the value must be within 2 % of some PET
   nuclide's (:data:`PET_HALF_LIVES_S`, extended per call by ``extra_half_lives`` / ``--nuclide``).
   Minutes typed for seconds (109.77 for F-18) would otherwise give SUVs of 1e10 without complaint.

CM2ML (SUVbsa, cm2/ml) is an error rather than a conversion: SUVbw = SUVbsa * weight / BSA needs
the body-surface-area formula the scanner used (Du Bois, Mosteller, Haycock...), which the header does
not record, so any choice could be silently wrong by several per cent. Export the series in BQML.

Every missing or contradictory attribute that the chosen branch needs raises ``SUVError`` with the
case, the attribute and its tag; nothing falls back silently.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from nnunetv2_l1dfl.conversion.dicom_series import DicomSeries, DicomSeriesError, load_slice_stack

if TYPE_CHECKING:
    import pydicom
    import SimpleITK as sitk

logger = logging.getLogger(__name__)

DOSE_MBQ_BELOW = 1e4  # a RadionuclideTotalDose below this was entered in MBq
WEIGHT_GRAMS_ABOVE = 1000.0  # a PatientWeight above this was entered in grams
BACK_COMPUTED_SPREAD_S = 5.0  # back-computed scan starts of all slices must agree within this
PHILIPS_CREATOR = "Philips PET Private Group"
GE_CREATOR = "GEMS_PETD_01"

TAGS = {
    "Units": "(0054,1001)",
    "DecayCorrection": "(0054,1102)",
    "SUVType": "(0054,1006)",
    "PatientWeight": "(0010,1030)",
    "SeriesDate": "(0008,0021)",
    "SeriesTime": "(0008,0031)",
    "AcquisitionDate": "(0008,0022)",
    "AcquisitionTime": "(0008,0032)",
    "ActualFrameDuration": "(0018,1242)",
    "FrameReferenceTime": "(0054,1300)",
    "RadiopharmaceuticalInformationSequence": "(0054,0016)",
    "RadionuclideTotalDose": "(0018,1074)",
    "RadionuclideHalfLife": "(0018,1075)",
    "RadiopharmaceuticalStartTime": "(0018,1072)",
    "RadiopharmaceuticalStartDateTime": "(0018,1078)",
}

# Physical half-lives (s) of the radionuclides PET images are made with (NNDC / DDEP values).
# Vendors write slightly different values (F-18 6586 or 6588, Ga-68 4063 or 4080, C-11 1220 or
# 1223), hence the tolerance; a unit slip (minutes, hours) is off by a factor of 60 or more.
PET_HALF_LIVES_S: dict[str, float] = {
    "Rb-82": 75.45,
    "O-15": 122.24,
    "Cu-62": 580.4,
    "N-13": 597.9,
    "C-11": 1221.8,
    "Ga-68": 4062.6,
    "F-18": 6586.2,
    "Cu-61": 12020.0,
    "Cu-64": 45720.0,
    "Y-86": 53064.0,
    "Br-76": 58320.0,
    "Y-90": 230580.0,
    "Zr-89": 282276.0,
    "I-124": 360806.0,
    "Ge-68": 23410080.0,
}
HALF_LIFE_REL_TOL = 0.02
# DICOM CID 4020 (PET Radionuclide) codes, in their SNOMED RT (SRT) and SNOMED CT (SCT) forms.
RADIONUCLIDE_CODES: dict[str, str] = {
    "C-B1038": "O-15", "129504001": "O-15",
    "C-159A2": "Rb-82", "79197006": "Rb-82",
    "C-107A1": "N-13", "21576001": "N-13",
    "C-127A5": "Cu-62", "422934004": "Cu-62",
    "C-105A1": "C-11", "40565003": "C-11",
    "C-131A3": "Ga-68", "35337001": "Ga-68",
    "C-111A1": "F-18", "77004003": "F-18",
    "C-127A1": "Cu-61", "71425003": "Cu-61",
    "C-127A2": "Cu-64", "3932008": "Cu-64",
    "C-162A3": "Y-86", "10738001": "Y-86",
    "C-113A2": "Br-76", "79523006": "Br-76",
    "C-162A7": "Y-90", "14691008": "Y-90",
    "C-168A4": "Zr-89", "63360001": "Zr-89",
    "C-114A5": "I-124", "40937006": "I-124",
    "C-128A2": "Ge-68", "53315004": "Ge-68",
}  # fmt: skip
# Element names and symbols as written in CodeMeaning / Radionuclide text ("^18^Fluorine", "Ga-68").
_ELEMENTS = {
    "O": "O", "OXYGEN": "O", "RB": "Rb", "RUBIDIUM": "Rb", "N": "N", "NITROGEN": "N", "CU": "Cu",
    "COPPER": "Cu", "C": "C", "CARBON": "C", "GA": "Ga", "GALLIUM": "Ga", "F": "F", "FLUORINE": "F",
    "Y": "Y", "YTTRIUM": "Y", "BR": "Br", "BROMINE": "Br", "ZR": "Zr", "ZIRCONIUM": "Zr", "I": "I",
    "IODINE": "I", "GE": "Ge", "GERMANIUM": "Ge",
}  # fmt: skip
_TIME_UNITS_S = {"minutes": 60.0, "hours": 3600.0, "days": 86400.0, "milliseconds": 1e-3}


class SUVError(ValueError):
    """SUV cannot be computed correctly; the message names the case, the attribute and its tag."""


@dataclass
class SUVResult:
    """SUVbw of one PET series.

    image: float32 SUVbw on the PET grid (carries the FrameOfReferenceUID as metadata ``0020|0052``).
    branch: the decision-tree path, ``|``-separated, e.g.
        ``"BQML|START|SeriesTime|RadiopharmaceuticalStartDateTime|dose_MBq_fixed"``.
    details: the values used: weight_kg, injected_dose_bq, half_life_s, decay_factor (dose at the
        reference / dose at injection; a [min, max] pair for DC NONE), reference_time and
        injection_time (ISO strings), seconds_injection_to_reference, units, decay_correction,
        suv_type, tracer, radionuclide (CodeMeaning as written), nuclide (e.g. ``"F-18"``, the one
        the half-life was checked against; decay-corrected branches only), scanner (manufacturer
        and model), suv_max.
    """

    image: sitk.Image
    branch: str
    details: dict = field(default_factory=dict)


def suv_bw_scale(
    weight_kg: float, injected_dose_bq: float, half_life_s: float, seconds_injection_to_reference: float
) -> float:
    """Factor that turns Bq/ml into SUVbw: ``SUVbw = Bq/ml * scale``.

    scale = weight (g) / (dose (Bq) * 2 ** (-t / half_life)), with t the seconds from injection to
    the time the activity is decay-corrected to (0 for images corrected to injection). Also used for
    NIfTI PET in Bq/ml with the values from a manifest. Raises ``ValueError`` on non-positive
    weight, dose or half-life, or a negative t.
    """
    for name, value in (("weight_kg", weight_kg), ("injected_dose_bq", injected_dose_bq), ("half_life_s", half_life_s)):
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    if not (seconds_injection_to_reference >= 0 and math.isfinite(seconds_injection_to_reference)):
        raise ValueError(f"seconds_injection_to_reference must be >= 0, got {seconds_injection_to_reference!r}")
    decayed_dose = injected_dose_bq * 2.0 ** (-seconds_injection_to_reference / half_life_s)
    return weight_kg * 1000.0 / decayed_dose


# ---------------------------------------------------------------------------------------------
# DICOM value parsing


def _parse_date(text: str) -> dt.date:
    text = text.strip().replace(".", "").replace("-", "")  # ACR-NEMA wrote YYYY.MM.DD
    return dt.datetime.strptime(text[:8], "%Y%m%d").date()


def _parse_time(text: str) -> dt.time:
    """TM: HH, HHMM, HHMMSS, HHMMSS.FFFFFF, or the old HH:MM:SS."""
    text = text.strip().replace(":", "")
    match = re.fullmatch(r"(\d{2})(\d{2})?(\d{2})?(?:\.(\d{1,6}))?", text)
    if not match:
        raise ValueError(f"not a DICOM time: {text!r}")
    hours, minutes, seconds, fraction = match.groups()
    micro = int((fraction or "0").ljust(6, "0"))
    return dt.time(int(hours), int(minutes or 0), int(seconds or 0), micro)


def _parse_datetime(text: str) -> dt.datetime:
    """DT: YYYYMMDDHHMMSS.FFFFFF with optional components and UTC offset (the offset is dropped:
    every other time in the header is local time)."""
    text = re.sub(r"[+-]\d{4}$", "", text.strip())
    if len(text) < 8:
        raise ValueError(f"not a DICOM date-time: {text!r}")
    date = _parse_date(text[:8])
    time = _parse_time(text[8:]) if len(text) > 8 else dt.time(0)
    return dt.datetime.combine(date, time)


def _private_number(element: Any) -> float:
    """A private numeric element, whether pydicom knows its VR (DS/FD) or reads it as UN bytes."""
    value = element.value
    if isinstance(value, bytes):
        try:
            return float(value.decode("ascii").strip("\x00 "))
        except (UnicodeDecodeError, ValueError):
            if len(value) == 8:
                return struct.unpack("<d", value)[0]
            if len(value) == 4:
                return struct.unpack("<f", value)[0]
            raise
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0]
    return float(value)


# ---------------------------------------------------------------------------------------------
# Decision tree


class _Header:
    """Header access for one case: first-slice values, checked for agreement across slices."""

    def __init__(self, datasets: list[pydicom.Dataset], files: list[Path], case: str):
        self.datasets, self.files, self.case = datasets, files, case
        self.first = datasets[0]
        rp = self.first.get("RadiopharmaceuticalInformationSequence")
        self.rp = rp[0] if rp else None

    def error(self, message: str) -> SUVError:
        return SUVError(f"{self.case}: {message}")

    def _source(self, ds: pydicom.Dataset, keyword: str) -> Any:
        if keyword.startswith("Radio"):
            rp = ds.get("RadiopharmaceuticalInformationSequence")
            return rp[0].get(keyword) if rp else None
        return ds.get(keyword)

    def text(self, keyword: str, required: bool = False, consistent: bool = True) -> str:
        """The attribute as stripped text ('' when absent); checks that all slices agree."""
        value = self._source(self.first, keyword)
        value = "" if value is None else str(value).strip()
        if consistent:
            for ds, path in zip(self.datasets[1:], self.files[1:]):
                other = self._source(ds, keyword)
                other = "" if other is None else str(other).strip()
                if other != value:
                    raise self.error(
                        f"contradictory {keyword} {TAGS.get(keyword, '')}: {value!r} in {self.files[0].name}, "
                        f"{other!r} in {path.name}"
                    )
        if required and not value:
            where = " in RadiopharmaceuticalInformationSequence (0054,0016)" if keyword.startswith("Radio") else ""
            raise self.error(f"missing {keyword} {TAGS.get(keyword, '')}{where}")
        return value

    def number(self, keyword: str, required: bool = True) -> float | None:
        value = self.text(keyword, required=required)
        if not value:
            return None
        try:
            number = float(value)
        except ValueError:
            raise self.error(f"{keyword} {TAGS.get(keyword, '')} is not a number: {value!r}") from None
        if not math.isfinite(number):
            raise self.error(f"{keyword} {TAGS.get(keyword, '')} is not finite: {value!r}")
        return number

    def per_slice_datetime(self, ds: pydicom.Dataset, path: Path) -> dt.datetime | None:
        """AcquisitionDate (else SeriesDate) + AcquisitionTime of one slice; None without the time."""
        time = str(ds.get("AcquisitionTime") or "").strip()
        if not time:
            return None
        date = str(ds.get("AcquisitionDate") or ds.get("SeriesDate") or "").strip()
        if not date:
            raise self.error(f"{path.name}: AcquisitionTime (0008,0032) without AcquisitionDate (0008,0022) or SeriesDate")
        try:
            return dt.datetime.combine(_parse_date(date), _parse_time(time))
        except ValueError as e:
            raise self.error(f"{path.name}: unreadable AcquisitionDate/AcquisitionTime (0008,0022/0032): {e}") from None

    def private(self, group: int, element: int, creator: str, manufacturer_word: str) -> Any:
        """A private element, or None. Accepted when its block's creator is ``creator``, or the block
        has no creator and the Manufacturer names the vendor (anonymizers often drop creators)."""
        item = self.first.get((group, element))
        if item is None:
            return None
        owner = self.first.get((group, 0x0010))
        owner = str(owner.value).strip() if owner is not None else ""
        manufacturer = str(self.first.get("Manufacturer", "")).upper()
        if owner == creator or (not owner and manufacturer_word in manufacturer):
            return item
        logger.warning(
            "%s: private (%04X,%04X) ignored: block owned by %r, Manufacturer %r (expected %r)",
            self.case, group, element, owner, manufacturer, creator,
        )  # fmt: skip
        return None


def _average_count_time_s(frame_duration_s: float, decay_constant: float) -> float:
    """Time after frame start at which the activity equals its mean over the frame (QIBA)."""
    x = decay_constant * frame_duration_s
    if x < 1e-9:
        return frame_duration_s / 2.0
    return math.log(x / (1.0 - math.exp(-x))) / decay_constant


def _case_name(series: DicomSeries | Sequence[Path] | Path, files: list[Path], case_id: str) -> str:
    if case_id:
        return f"case {case_id}"
    if isinstance(series, DicomSeries):
        return f"PET series {series.series_instance_uid}"
    return f"PET series in {files[0].parent}" if files else "PET series"


def read_pet_suv(
    series: DicomSeries | Sequence[Path] | Path,
    case_id: str = "",
    extra_half_lives: Mapping[str, float] | None = None,
) -> SUVResult:
    """Read a PET series and convert it to SUVbw (see the module docstring for the decision tree).

    series: a discovered ``DicomSeries``, its files, or a folder holding only that series' slices.
    case_id: named in errors and logs. extra_half_lives: nuclide name -> half-life (s) added to
    :data:`PET_HALF_LIVES_S` for the half-life check, for a tracer labelled with a nuclide the table
    lacks (``--nuclide Sc-44=14292``); a name already there replaces its value. Returns the float32 SUV image on the PET grid, the branch taken
    and the values used. Raises ``SUVError`` naming the case and the DICOM attribute and tag when a
    value the branch needs is missing, unreadable or differs between slices, or when the series is
    not one regular volume.
    """
    if isinstance(series, DicomSeries):
        files = list(series.files)
    elif isinstance(series, (str, Path)):
        folder = Path(series)
        if not folder.exists():
            raise FileNotFoundError(f"PET series not found: {folder}")
        files = sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else [folder]
    else:
        files = [Path(p) for p in series]
    case = _case_name(series, files, case_id)
    if not files:
        raise SUVError(f"{case}: no files")
    try:
        stack = load_slice_stack(files, what=case)
    except DicomSeriesError as e:
        raise SUVError(f"{case}: {e}") from e
    header = _Header(stack.datasets, stack.files, case)
    uids = {str(ds.get("SeriesInstanceUID", "")) for ds in stack.datasets}
    if len(uids) > 1:
        raise header.error(f"files of {len(uids)} series given (SeriesInstanceUID (0020,000E) differs)")
    modality = header.text("Modality")
    if modality != "PT":
        raise header.error(f"Modality (0008,0060) is {modality!r}, not 'PT'")

    activity = stack.array.astype(np.float32, copy=True)  # (z, y, x)
    units = header.text("Units", required=True).upper()
    details: dict[str, Any] = {
        "units": units,
        "decay_correction": header.text("DecayCorrection").upper(),
        "suv_type": header.text("SUVType").upper(),
        "tracer": header.text("Radiopharmaceutical"),
        "radionuclide": _radionuclide(header),
        "scanner": " ".join(v for v in (header.text("Manufacturer"), header.text("ManufacturerModelName")) if v),
    }
    branch: list[str] = []

    if units == "GML":
        suv_type = details["suv_type"]
        if suv_type == "BW":
            branch.append("GML|SUVType=BW")
        elif not suv_type:
            branch.append("GML|SUVType-absent-assumed-BW")
            logger.warning("%s: Units GML without SUVType (0054,1006); taken as SUVbw", case)
        else:
            raise header.error(
                f"Units (0054,1001) GML with SUVType (0054,1006) {suv_type!r}: SUV{suv_type.lower()} "
                "cannot be turned into SUVbw without the vendor's formula; export the series in BQML"
            )
        _record_optional(header, details)
        return _result(stack, activity, branch, details, case)
    if units == "CM2ML":
        raise header.error(
            "Units (0054,1001) CM2ML: the pixels are SUVbsa (body-surface-area SUV, cm2/ml). Converting "
            "to SUVbw needs the BSA formula the scanner used, which DICOM does not record; refused rather "
            "than guessed. Export the series with Units BQML"
        )
    if units == "CNTS":
        suv_factor = header.private(0x7053, 0x1000, PHILIPS_CREATOR, "PHILIPS")
        activity_factor = header.private(0x7053, 0x1009, PHILIPS_CREATOR, "PHILIPS")
        if suv_factor is not None:
            factors = _per_slice_private(header, 0x7053, 0x1000, "Philips SUV scale factor")
            activity *= factors[:, None, None]
            branch.append("CNTS|Philips-SUV-scale-factor(7053,1000)")
            _record_optional(header, details)
            details["philips_suv_scale_factor"] = float(factors[0])
            return _result(stack, activity, branch, details, case)
        if activity_factor is None:
            raise header.error(
                "Units (0054,1001) CNTS without the Philips SUV scale factor (7053,1000) or activity "
                "concentration scale factor (7053,1009): counts cannot be turned into Bq/ml"
            )
        factors = _per_slice_private(header, 0x7053, 0x1009, "Philips activity concentration scale factor")
        activity *= factors[:, None, None]
        details["philips_activity_scale_factor"] = float(factors[0])
        branch.append("CNTS|Philips-activity-scale-factor(7053,1009)")
    elif units == "BQML":
        branch.append("BQML")
    else:
        raise header.error(f"Units (0054,1001) {units!r} is not one of BQML, CNTS, GML, CM2ML")

    # From here on the activity is in Bq/ml.
    fixes: list[str] = []
    half_lives = {**PET_HALF_LIVES_S, **check_half_lives(extra_half_lives or {})}
    weight_kg, dose_bq, half_life_s = _weight_dose_half_life(header, details, fixes, half_lives)
    decay_correction = details["decay_correction"]
    decay_constant = math.log(2.0) / half_life_s
    if decay_correction == "ADMIN":
        branch.append("ADMIN")
        injection = _injection_time(header, reference=None, branch=None)
        details["injection_time"] = injection.isoformat() if injection else ""
        scale = suv_bw_scale(weight_kg, dose_bq, half_life_s, 0.0)
        details["decay_factor"] = 1.0
        activity *= np.float32(scale)
    elif decay_correction == "START":
        branch.append("START")
        reference, how = _reference_time(header, decay_constant)
        branch.append(how)
        injection = _injection_time(header, reference, branch)
        seconds = (reference - injection).total_seconds()
        _check_interval(header, seconds, "reference")
        scale = suv_bw_scale(weight_kg, dose_bq, half_life_s, seconds)
        details.update(
            reference_time=reference.isoformat(), injection_time=injection.isoformat(),
            seconds_injection_to_reference=seconds, decay_factor=2.0 ** (-seconds / half_life_s),
        )  # fmt: skip
        activity *= np.float32(scale)
    elif decay_correction == "NONE":
        branch.append("NONE")
        branch.append("per-frame-AcquisitionTime")
        times, durations = [], []
        for ds, path in zip(stack.datasets, stack.files):
            when = header.per_slice_datetime(ds, path)
            if when is None:
                raise header.error(f"{path.name}: DecayCorrection NONE needs AcquisitionTime (0008,0032) per slice")
            duration = ds.get("ActualFrameDuration")
            if duration in (None, ""):
                raise header.error(f"{path.name}: DecayCorrection NONE needs ActualFrameDuration (0018,1242)")
            times.append(when)
            durations.append(float(duration) / 1000.0)
        injection = _injection_time(header, min(times), branch)
        factors = np.empty(len(times), dtype=np.float64)
        for k, (when, duration_s) in enumerate(zip(times, durations)):
            seconds = (when - injection).total_seconds()
            _check_interval(header, seconds, f"{stack.files[k].name} AcquisitionTime")
            x = decay_constant * duration_s
            frame_factor = x / -math.expm1(-x) if x > 0 else 1.0  # frame mean -> activity at frame start
            # Activity at frame start decay-corrected back to injection, then SUV against the full dose.
            factors[k] = frame_factor * math.exp(decay_constant * seconds) * weight_kg * 1000.0 / dose_bq
        activity *= factors.astype(np.float32)[:, None, None]
        decay = [math.exp(-decay_constant * (t - injection).total_seconds()) for t in times]
        details.update(
            injection_time=injection.isoformat(), reference_time="per slice (AcquisitionTime)",
            seconds_injection_to_reference=[(min(times) - injection).total_seconds(), (max(times) - injection).total_seconds()],
            decay_factor=[min(decay), max(decay)],
        )  # fmt: skip
    elif not decay_correction:
        raise header.error("missing DecayCorrection (0054,1102)")
    else:
        raise header.error(f"DecayCorrection (0054,1102) {decay_correction!r} is not one of START, ADMIN, NONE")
    branch.extend(fixes)
    return _result(stack, activity, branch, details, case)


def _result(stack: Any, suv: np.ndarray, branch: list[str], details: dict, case: str) -> SUVResult:
    details["suv_max"] = float(suv.max()) if suv.size else 0.0
    result = SUVResult(image=stack.to_image(suv.astype(np.float32, copy=False)), branch="|".join(branch), details=details)
    logger.debug("%s: SUV branch %s", case, result.branch)
    return result


def _radionuclide(header: _Header) -> str:
    if header.rp is None:
        return ""
    codes = header.rp.get("RadionuclideCodeSequence")
    return str(codes[0].get("CodeMeaning", "")).strip() if codes else ""


def _per_slice_private(header: _Header, group: int, element: int, name: str) -> np.ndarray:
    values = []
    for ds, path in zip(header.datasets, header.files):
        item = ds.get((group, element))
        if item is None:
            raise header.error(f"{path.name}: missing {name} ({group:04X},{element:04X}) (present on other slices)")
        try:
            value = _private_number(item)
        except (ValueError, struct.error):
            raise header.error(f"{path.name}: unreadable {name} ({group:04X},{element:04X}): {item.value!r}") from None
        if not (value > 0 and math.isfinite(value)):
            raise header.error(f"{path.name}: {name} ({group:04X},{element:04X}) is {value!r}")
        values.append(value)
    return np.asarray(values, dtype=np.float64)


def _weight_dose_half_life(
    header: _Header, details: dict, fixes: list[str], half_lives: Mapping[str, float]
) -> tuple[float, float, float]:
    weight = header.number("PatientWeight")
    if weight is None or weight <= 0:
        raise header.error(f"PatientWeight (0010,1030) is {weight!r}; SUVbw needs the body weight")
    if weight > WEIGHT_GRAMS_ABOVE:
        logger.warning("%s: PatientWeight (0010,1030) %s taken as grams", header.case, weight)
        weight /= 1000.0
        fixes.append("weight_g_fixed")
    if header.rp is None:
        raise header.error("missing RadiopharmaceuticalInformationSequence (0054,0016): no dose, half-life or injection time")
    dose = header.number("RadionuclideTotalDose")
    if dose is None or dose <= 0:
        raise header.error(f"RadionuclideTotalDose (0018,1074) is {dose!r}")
    if dose < DOSE_MBQ_BELOW:
        logger.warning("%s: RadionuclideTotalDose (0018,1074) %s taken as MBq", header.case, dose)
        dose *= 1e6
        fixes.append("dose_MBq_fixed")
    half_life = header.number("RadionuclideHalfLife")
    if half_life is None or half_life <= 0:
        raise header.error(f"RadionuclideHalfLife (0018,1075) is {half_life!r}")
    details["nuclide"] = _check_half_life(header, half_life, half_lives)
    details.update(weight_kg=weight, injected_dose_bq=dose, half_life_s=half_life)
    return weight, dose, half_life


def check_half_lives(half_lives: Mapping[str, float]) -> dict[str, float]:
    """Validated extra half-lives: non-empty names, finite positive seconds; ValueError otherwise."""
    checked = {}
    for name, seconds in half_lives.items():
        name = str(name).strip()
        if not name:
            raise ValueError(f"nuclide name must not be empty (half-life {seconds!r})")
        try:
            value = float(seconds)
        except (TypeError, ValueError):
            raise ValueError(f"half-life of {name} must be a number of seconds, got {seconds!r}") from None
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"half-life of {name} must be a positive number of seconds, got {seconds!r}")
        checked[name] = value
    return checked


def parse_nuclide_option(text: str) -> tuple[str, float]:
    """``"Sc-44=14292"`` -> ``("Sc-44", 14292.0)`` (the ``--nuclide NAME=SECONDS`` option)."""
    name, sep, seconds = text.partition("=")
    if not sep:
        raise ValueError(f"expected NAME=SECONDS, e.g. Sc-44=14292, got {text!r}")
    ((name, value),) = check_half_lives({name: seconds.strip()}).items()
    return name, value


def _nuclide_from_text(text: str) -> str | None:
    """The PET nuclide (a :data:`PET_HALF_LIVES_S` key) a free text names, or None.

    Reads an element name or symbol next to a mass number in either order, whatever the separators:
    ``"^18^Fluorine"``, ``"Fluorine^18^"``, ``"18F"``, ``"F-18"``, ``"Ga68 PSMA-11"``. None when
    no nuclide or more than one different nuclide is named.
    """
    tokens = re.findall(r"[A-Z]+|\d+", text.upper())
    found = set()
    for a, b in zip(tokens, tokens[1:]):
        name, mass = (a, b) if b.isdigit() else (b, a)
        if mass.isdigit() and name in _ELEMENTS:
            nuclide = f"{_ELEMENTS[name]}-{int(mass)}"
            if nuclide in PET_HALF_LIVES_S:
                found.add(nuclide)
    return found.pop() if len(found) == 1 else None


def _identify_nuclide(header: _Header) -> tuple[str, str] | None:
    """(nuclide, where it was read) from RadionuclideCodeSequence (0054,0300), else Radionuclide (0018,0030)."""
    items = header.rp.get("RadionuclideCodeSequence") if header.rp is not None else None
    for item in items or []:
        code = str(item.get("CodeValue", "")).strip().upper()
        if code in RADIONUCLIDE_CODES:
            return RADIONUCLIDE_CODES[code], f"RadionuclideCodeSequence (0054,0300) code {code}"
        meaning = str(item.get("CodeMeaning", "")).strip()
        nuclide = _nuclide_from_text(meaning)
        if nuclide:
            return nuclide, f"RadionuclideCodeSequence (0054,0300) meaning {meaning!r}"
    for source in (header.rp, header.first):  # (0018,0030) is retired; exports put it in either place
        text = str(source.get("Radionuclide", "") or "").strip() if source is not None else ""
        nuclide = _nuclide_from_text(text)
        if nuclide:
            return nuclide, f"Radionuclide (0018,0030) {text!r}"
    return None


def _unit_hint(half_life_s: float, candidates: dict[str, float]) -> str:
    """'; it looks like F-18's half-life in minutes' when a unit slip explains the value."""
    for unit, factor in _TIME_UNITS_S.items():
        for nuclide, known in candidates.items():
            if abs(half_life_s * factor / known - 1.0) <= HALF_LIFE_REL_TOL:
                return f"; it looks like {nuclide}'s half-life in {unit} ({known:g} s)"
    return "; the tag must hold seconds"


def _check_half_life(header: _Header, half_life_s: float, half_lives: Mapping[str, float]) -> str:
    """The nuclide the half-life belongs to; ``SUVError`` when it contradicts the named nuclide or
    matches none (a unit slip in (0018,1075) scales every SUV by 2**(t/T) silently otherwise)."""
    identified = _identify_nuclide(header)
    if identified is not None:
        nuclide, where = identified
        known = half_lives[nuclide]
        if abs(half_life_s / known - 1.0) <= HALF_LIFE_REL_TOL:
            return nuclide
        raise header.error(
            f"RadionuclideHalfLife (0018,1075) is {half_life_s:g} s, but {where} names {nuclide}, whose "
            f"half-life is {known:g} s (more than {100 * HALF_LIFE_REL_TOL:g} % apart)"
            f"{_unit_hint(half_life_s, {nuclide: known})}"
        )
    closest = min(half_lives, key=lambda n: abs(half_life_s / half_lives[n] - 1.0))
    if abs(half_life_s / half_lives[closest] - 1.0) <= HALF_LIFE_REL_TOL:
        return closest
    listed = ", ".join(f"{n} {t:.8g} s" for n, t in half_lives.items())
    raise header.error(
        f"RadionuclideHalfLife (0018,1075) is {half_life_s:g} s, which matches no known PET radionuclide "
        f"within {100 * HALF_LIFE_REL_TOL:g} % and neither RadionuclideCodeSequence (0054,0300) nor "
        f"Radionuclide (0018,0030) names one{_unit_hint(half_life_s, half_lives)}; known: {listed}. A tracer "
        "labelled with another nuclide: declare it, e.g. --nuclide Sc-44=14292 (seconds)"
    )


def _record_optional(header: _Header, details: dict) -> None:
    """Weight, dose and half-life for the metadata table when present (not needed for GML/SUV)."""
    for key, keyword in (("weight_kg", "PatientWeight"), ("injected_dose_bq", "RadionuclideTotalDose"),
                         ("half_life_s", "RadionuclideHalfLife")):  # fmt: skip
        try:
            details[key] = header.number(keyword, required=False)
        except SUVError:
            details[key] = None


def _reference_time(header: _Header, decay_constant: float) -> tuple[dt.datetime, str]:
    """Scan start for DecayCorrection START, and the rule that gave it (for the branch)."""
    acquisitions = [header.per_slice_datetime(ds, p) for ds, p in zip(header.datasets, header.files)]
    acquisitions = [a for a in acquisitions if a is not None]
    earliest = min(acquisitions) if acquisitions else None
    series_time = header.text("SeriesTime")
    if series_time:
        date = header.text("SeriesDate") or header.text("AcquisitionDate", consistent=False) or header.text("StudyDate")
        if not date:
            raise header.error("SeriesTime (0008,0031) without SeriesDate (0008,0021)")
        try:
            series = dt.datetime.combine(_parse_date(date), _parse_time(series_time))
        except ValueError as e:
            raise header.error(f"unreadable SeriesDate/SeriesTime (0008,0021/0031): {e}") from None
        if earliest is None or series <= earliest:
            return series, "SeriesTime"
        logger.info("%s: SeriesTime %s after the earliest AcquisitionTime %s", header.case, series, earliest)
    ge_start = header.private(0x0009, 0x100D, GE_CREATOR, "GE")
    if ge_start is not None:
        try:
            value = ge_start.value.decode("ascii") if isinstance(ge_start.value, bytes) else str(ge_start.value)
            return _parse_datetime(value.strip("\x00 ")), "GE-private(0009,100D)"
        except ValueError as e:
            raise header.error(f"unreadable GE private scan start (0009,100D): {ge_start.value!r} ({e})") from None
    if not acquisitions:
        raise header.error("DecayCorrection START without SeriesTime (0008,0031) or AcquisitionTime (0008,0032)")
    starts = []
    for ds, path in zip(header.datasets, header.files):
        when = header.per_slice_datetime(ds, path)
        duration, frame_reference = ds.get("ActualFrameDuration"), ds.get("FrameReferenceTime")
        if duration in (None, "") or frame_reference in (None, ""):
            raise header.error(
                f"{path.name}: SeriesTime (0008,0031) is after AcquisitionTime and there is no GE scan start "
                "(0009,100D); back-computing the scan start needs ActualFrameDuration (0018,1242) and "
                "FrameReferenceTime (0054,1300)"
            )
        offset_s = float(frame_reference) / 1000.0 - _average_count_time_s(float(duration) / 1000.0, decay_constant)
        starts.append(when - dt.timedelta(seconds=offset_s))
    spread = (max(starts) - min(starts)).total_seconds()
    if spread > BACK_COMPUTED_SPREAD_S:
        raise header.error(
            f"back-computed scan starts differ by {spread:.1f} s between slices (AcquisitionTime (0008,0032), "
            "ActualFrameDuration (0018,1242), FrameReferenceTime (0054,1300) contradict each other)"
        )
    return min(starts) + (max(starts) - min(starts)) / 2, "back-computed(AcquisitionTime,FrameReferenceTime)"


def _injection_time(header: _Header, reference: dt.datetime | None, branch: list[str] | None) -> dt.datetime | None:
    """Injection date-time; for ADMIN (``branch`` None) only recorded, so absent is not an error."""
    start_datetime = header.text("RadiopharmaceuticalStartDateTime")
    if start_datetime:
        try:
            injection = _parse_datetime(start_datetime)
        except ValueError as e:
            raise header.error(f"unreadable RadiopharmaceuticalStartDateTime (0018,1078): {e}") from None
        if branch is not None:
            branch.append("RadiopharmaceuticalStartDateTime")
        return injection
    start_time = header.text("RadiopharmaceuticalStartTime")
    if not start_time:
        if branch is None:
            return None
        raise header.error(
            "no injection time: RadiopharmaceuticalStartDateTime (0018,1078) and RadiopharmaceuticalStartTime "
            "(0018,1072) both missing in RadiopharmaceuticalInformationSequence (0054,0016)"
        )
    date = header.text("SeriesDate") or header.text("StudyDate")
    if not date and reference is not None:
        date = reference.strftime("%Y%m%d")
    if not date:
        raise header.error("RadiopharmaceuticalStartTime (0018,1072) without SeriesDate (0008,0021) to place it on")
    try:
        injection = dt.datetime.combine(_parse_date(date), _parse_time(start_time))
    except ValueError as e:
        raise header.error(f"unreadable RadiopharmaceuticalStartTime (0018,1072): {e}") from None
    if branch is not None:
        branch.append("RadiopharmaceuticalStartTime")
    if reference is not None and injection > reference:
        injection -= dt.timedelta(days=1)  # the scan crossed midnight after the injection
        if branch is not None:
            branch.append("midnight-crossing")
    return injection


def _check_interval(header: _Header, seconds: float, what: str) -> None:
    if seconds < 0:
        raise header.error(
            f"injection ({TAGS['RadiopharmaceuticalStartDateTime']}/{TAGS['RadiopharmaceuticalStartTime']}) is "
            f"{-seconds:.0f} s after the {what} time: contradictory times"
        )
    if seconds > 24 * 3600:
        logger.warning("%s: %.1f h between injection and %s time", header.case, seconds / 3600, what)
