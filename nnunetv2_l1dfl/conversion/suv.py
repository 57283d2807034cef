"""PET DICOM to SUVbw, following the QIBA / IBSI SUV decision tree (every branch, bound and why: docs/suv.md).

    SUVbw = activity concentration (Bq/ml) * body weight (g) / injected dose decay-corrected (Bq)

The steps (``read_pet_suv``), each recorded in ``SUVResult.branch``:

1. Per-slice RescaleSlope / RescaleIntercept in float32 (``dicom_series.load_slice_stack``).
2. Units (0054,1001): ``BQML`` continue; ``CNTS`` (Philips) uses the private SUV scale factor
   (7053,1000) (gives SUV directly) or the activity concentration scale factor (7053,1009) (gives
   Bq/ml, then as BQML); ``CPS`` is divided by the voxel volume when dose calibrated (DCAL in
   CorrectedImage (0028,0051)), else multiplied by DoseCalibrationFactor (0054,1322) first, and needs
   ATTN (and DECY) among the corrections; ``GML`` is SUV of the SUVType (0054,1006): BW (or absent) as
   is, LBM / LBMJAMES128 / LBMJANMA / IBW back to SUVbw by W / F (PatientSize, PatientSex; sex O: the
   mean of the male and female factors); ``CM2ML`` is SUVbsa, back to SUVbw by W / BSA (Du Bois).
3. Decay correction (0054,1102): ``ADMIN`` (already corrected to injection, no decay factor);
   ``START`` (decay the dose to the reference time); ``NONE`` (correct every slice from its own
   AcquisitionDate/Time to injection, times the frame-duration factor lambda*T/(1-exp(-lambda*T))).
4. Reference time for START: SeriesDate/Time unless it is after the earliest AcquisitionDate/Time or
   more than an hour before it; then the GE private scan start (0009,100D); then back-computed per
   slice as AcquisitionDateTime - (FrameReferenceTime - average-count-rate time within the frame), or
   AcquisitionDateTime - FrameReferenceTime in a series whose FrameReferenceTime 0 says it is measured
   to the frame start. DecayFactor (0054,1321), when recorded (not 1), must agree with the reference.
5. Injection: RadiopharmaceuticalStartDateTime (0018,1078), else RadiopharmaceuticalStartTime
   (0018,1072) on the reference date, one day earlier if that falls after the reference (midnight)
   only when the resulting uptake is plausible.
6. A dose below 1e4 was entered in MBq (times 1e6); a weight above 1000 was entered in grams.
7. Half-life from RadionuclideHalfLife (0018,1075), checked against the nuclide: the one named by
   RadionuclideCodeSequence (0054,0300) (code value or meaning), Radionuclide (0018,0030), the tracer
   name Radiopharmaceutical (0018,0031) ("18F-DCFPyL") or RadiopharmaceuticalCodeSequence (0054,0304)
   must have that half-life within 2 % (fields naming different nuclides are an error); with no
   nuclide named, the value must be within 2 % of some PET nuclide's (:data:`PET_HALF_LIVES_S`,
   extended per call by ``extra_half_lives`` / ``--nuclide``).
8. Plausibility (:func:`suv_plausibility_problems`): weight, dose, uptake time and SUVmax outside
   physiological bounds are an error naming the likely tag, unless ``allow_implausible_suv``
   (``--allow-implausible-suv``) accepts them as recorded warnings.

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

# Plausibility bounds (docs/suv.md says why each is where it is). Outside them the SUV is an error
# naming the likely tag, unless the user accepts it with --allow-implausible-suv (recorded).
PLAUSIBLE_SUV_MAX = (1.0, 500.0)  # SUVmax of a whole image: blood pool ~1.5, PSMA kidneys/lesions < ~300
PLAUSIBLE_WEIGHT_KG = (20.0, 350.0)  # adults and older children; 7.36 (for 73.6) is refused
PLAUSIBLE_DOSE_MBQ = (30.0, 5000.0)  # Zr-89 immuno-PET ~37 MBq .. Rb-82 / O-15 water ~2.2 GBq
MAX_UPTAKE_HALF_LIVES = 10.0  # injection to reference: 2**-10 of the dose left is no longer imaged
PLAUSIBLE_HEIGHT_M = (0.5, 2.5)  # PatientSize (0010,1020), for LBM / IBW / BSA
# SeriesDate/Time more than this before the earliest AcquisitionDate/Time is not this scan's start.
MAX_SERIES_BEFORE_ACQUISITION_S = 3600.0
# DecayFactor (0054,1321) cross-check: the time it implies may differ from (acquisition - reference)
# by this plus the frame's mean-count time (vendors include the frame-duration factor or not).
DECAY_FACTOR_TOLERANCE_S = 120.0
MCI_IN_MBQ = 37.0
# Injection and scan-start times must be written at least to the minute (an "HH" time leaves up to an
# hour open: SUV x 1.46 for F-18).
MAX_TIME_PRECISION_S = 60.0
IMPLAUSIBLE_SUV_ACCEPTED = "implausible SUV accepted (--allow-implausible-suv)"  # starts each such warning
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
    "Radiopharmaceutical": "(0018,0031)",
    "PatientSize": "(0010,1020)",
    "PatientSex": "(0010,0040)",
    "CorrectedImage": "(0028,0051)",
    "DoseCalibrationFactor": "(0054,1322)",
    "SliceThickness": "(0018,0050)",
    "DecayFactor": "(0054,1321)",
    "TimezoneOffsetFromUTC": "(0008,0201)",
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
        and model), suv_max; for GML/CM2ML other than BW, normalization_factor (kg, or m2 for BSA)
        and height_m; for CPS, voxel_ml.
    warnings: for the case's warnings column: each implausible value accepted (only with
        ``allow_implausible_suv``), and a date-time whose UTC offset was taken as the local zone.
    """

    image: sitk.Image
    branch: str
    details: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


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


def _duration(seconds: float) -> str:
    """'20.0 days', '23.0 h', '3.5 min', '12 s'."""
    magnitude = abs(seconds)
    if magnitude >= 2 * 86400:
        return f"{seconds / 86400:.1f} days"
    if magnitude >= 2 * 3600:
        return f"{seconds / 3600:.1f} h"
    if magnitude >= 120:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.0f} s"


def suv_plausibility_problems(
    suv_max: float,
    *,
    weight_kg: float | None = None,
    dose_bq: float | None = None,
    dose_as_written: float | None = None,
    uptake_s: float | None = None,
    half_life_s: float | None = None,
    nuclide: str = "",
    units: str = "",
    reference: str = "the reference time",
) -> list[str]:
    """What makes an SUV physiologically impossible, each naming the likely tag; [] when plausible.

    suv_max: the largest SUVbw of the image. The other values are checked when given (those the
    SUV was computed from): weight_kg (after the grams fix), dose_bq (after the MBq fix;
    dose_as_written is the value before it, for the mCi hint), uptake_s (injection to the time the
    images are decay-corrected to) with half_life_s and nuclide, units (Units (0054,1001), '' for
    a source already in SUV) to say what a bad SUVmax most likely means. Bounds:
    :data:`PLAUSIBLE_SUV_MAX`, :data:`PLAUSIBLE_WEIGHT_KG`, :data:`PLAUSIBLE_DOSE_MBQ`,
    :data:`MAX_UPTAKE_HALF_LIVES`; why each is where it is: docs/suv.md.
    """
    problems = []
    if weight_kg is not None:
        low, high = PLAUSIBLE_WEIGHT_KG
        if not low <= weight_kg <= high:
            hint = ""
            if low <= weight_kg * 10 <= high:
                hint = f" (a decimal slip for {weight_kg * 10:g} kg?)"
            elif weight_kg > high and low <= weight_kg / 2.20462 <= high:
                hint = " (pounds?)"
            problems.append(f"PatientWeight (0010,1030) {weight_kg:g} kg is outside {low:g}-{high:g} kg{hint}")
    if dose_bq is not None:
        low, high = PLAUSIBLE_DOSE_MBQ
        mbq = dose_bq / 1e6
        if not low <= mbq <= high:
            hint = ""
            if dose_as_written is not None and dose_as_written < DOSE_MBQ_BELOW and low <= dose_as_written * MCI_IN_MBQ <= high:
                hint = f" (entered in mCi? {dose_as_written:g} mCi = {dose_as_written * MCI_IN_MBQ:.4g} MBq)"
            elif low <= mbq * 1000 <= high:
                hint = f" (entered in kBq? {dose_bq:g} kBq = {mbq * 1000:.4g} MBq)"
            problems.append(
                f"RadionuclideTotalDose (0018,1074) {mbq:.4g} MBq (as written: {dose_as_written if dose_as_written is not None else dose_bq:g}) "
                f"is outside {low:g}-{high:g} MBq{hint}"
            )
    if uptake_s is not None and half_life_s:
        limit = MAX_UPTAKE_HALF_LIVES * half_life_s
        if uptake_s > limit:
            problems.append(
                f"{_duration(uptake_s)} from injection (RadiopharmaceuticalStartDateTime (0018,1078) / "
                f"RadiopharmaceuticalStartTime (0018,1072)) to {reference} is more than "
                f"{MAX_UPTAKE_HALF_LIVES:g} half-lives of {nuclide or 'the radionuclide'} ({_duration(limit)}): "
                "check the injection date and time"
            )
    low, high = PLAUSIBLE_SUV_MAX
    if not (low <= suv_max <= high):  # also catches NaN
        if units in ("GML", "CM2ML"):
            cause = f"Units (0054,1001) {units}: are the pixels Bq/ml rather than SUV?"
        elif not units:
            cause = "is the PET in SUVbw (not Bq/ml), and were weight and dose right when it was made?"
        elif suv_max > high:
            cause = "check RadionuclideTotalDose (0018,1074) (kBq? mCi?), PatientWeight (0010,1030) and the injection time"
        else:
            cause = "check PatientWeight (0010,1030) (a decimal slip?) and RadionuclideTotalDose (0018,1074)"
        problems.append(f"SUVmax {suv_max:.4g} is outside {low:g}-{high:g} ({cause})")
    return problems


# ---------------------------------------------------------------------------------------------
# DICOM value parsing


def _parse_date(text: str) -> dt.date:
    """DA: YYYYMMDD, or the ACR-NEMA YYYY.MM.DD (and YYYY-MM-DD); anything else is refused, so a
    truncated "2024011" or a date-time in a DA is not read as some other day."""
    stripped = text.strip()
    if re.fullmatch(r"\d{4}([.-])\d{2}\1\d{2}", stripped):
        stripped = stripped[:4] + stripped[5:7] + stripped[8:]
    if not re.fullmatch(r"\d{8}", stripped):
        raise ValueError(f"not a DICOM date (YYYYMMDD): {text.strip()!r}")
    return dt.datetime.strptime(stripped, "%Y%m%d").date()


def _parse_time(text: str) -> dt.time:
    """TM: HH, HHMM, HHMMSS, HHMMSS.FFFFFF (also with an empty fraction, "HHMMSS."), or the old HH:MM:SS."""
    text = text.strip().replace(":", "")
    match = re.fullmatch(r"(\d{2})(\d{2})?(\d{2})?(?:\.(\d{0,6}))?", text)
    if not match:
        raise ValueError(f"not a DICOM time: {text!r}")
    hours, minutes, seconds, fraction = match.groups()
    micro = int((fraction or "0").ljust(6, "0"))
    return dt.time(int(hours), int(minutes or 0), int(seconds or 0), micro)


def _time_precision_s(text: str) -> float:
    """The resolution a TM (or the time part of a DT) is written to: HH 3600 s, HHMM 60 s, else 1 s."""
    digits = text.strip().replace(":", "").split(".")[0]
    return {0: 86400.0, 2: 3600.0, 4: 60.0}.get(len(digits), 1.0)


def _parse_utc_offset(text: str) -> dt.timedelta:
    """&ZZXX / +HHMM / -HHMM (DT suffix, TimezoneOffsetFromUTC (0008,0201))."""
    match = re.fullmatch(r"([+-])(\d{2})(\d{2})", text.strip())
    if not match or int(match.group(2)) > 14 or int(match.group(3)) > 59:
        raise ValueError(f"not a UTC offset (+HHMM / -HHMM): {text.strip()!r}")
    sign = -1 if match.group(1) == "-" else 1
    return sign * dt.timedelta(hours=int(match.group(2)), minutes=int(match.group(3)))


def _split_datetime(text: str) -> tuple[dt.datetime, dt.timedelta | None, float]:
    """DT: YYYYMMDDHHMMSS.FFFFFF with optional components and UTC offset. Returns the clock date-time
    as written, the offset (None without one) and the precision of the time part in seconds
    (86400 when the DT holds a date only: it then says nothing about the time of day)."""
    text = text.strip()
    offset = None
    match = re.search(r"[+-]\d{4}$", text)
    if match:
        offset = _parse_utc_offset(match.group(0))
        text = text[: match.start()]
    if len(text) < 8:
        raise ValueError(f"not a DICOM date-time: {text!r}")
    date = _parse_date(text[:8])
    time = _parse_time(text[8:]) if len(text) > 8 else dt.time(0)
    return dt.datetime.combine(date, time), offset, _time_precision_s(text[8:])


def _parse_datetime(text: str) -> dt.datetime:
    """DT as clock time, the UTC offset dropped (see ``_Header.local_datetime`` for the offset)."""
    return _split_datetime(text)[0]


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
        numbers = {float(v) for v in value}
        if len(numbers) != 1:  # which one scales the image? not a guess to make
            raise ValueError(f"{len(value)} different values {list(value)}")
        return numbers.pop()
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
        """The attribute as a finite float (None when absent and not required); all slices must hold
        the same number (``75`` and ``75.0`` agree, ``75`` and ``80`` do not)."""
        value = self.text(keyword, required=required, consistent=False)
        number = self._as_number(keyword, value)
        for ds, path in zip(self.datasets[1:], self.files[1:]):
            other = self._source(ds, keyword)
            other = "" if other is None else str(other).strip()
            if other == value:
                continue
            if not other or not value or self._as_number(keyword, other, path) != number:
                raise self.error(
                    f"contradictory {keyword} {TAGS.get(keyword, '')}: {value!r} in {self.files[0].name}, "
                    f"{other!r} in {path.name}"
                )
        return number

    def _as_number(self, keyword: str, value: str, path: Path | None = None) -> float | None:
        if not value:
            return None
        where = f"{path.name}: " if path is not None else ""
        try:
            number = float(value)
        except ValueError:
            raise self.error(f"{where}{keyword} {TAGS.get(keyword, '')} is not a number: {value!r}") from None
        if not math.isfinite(number):
            raise self.error(f"{where}{keyword} {TAGS.get(keyword, '')} is not finite: {value!r}")
        return number

    def frame_seconds(self, ds: pydicom.Dataset, path: Path, keyword: str) -> float | None:
        """ActualFrameDuration (0018,1242) (> 0) or FrameReferenceTime (0054,1300) (>= 0) of one
        slice in seconds; None when absent. Not a number, or out of range: ``SUVError``."""
        raw = ds.get(keyword)
        if raw is None or str(raw).strip() == "":
            return None
        tag = TAGS[keyword]
        try:
            ms = float(str(raw).strip())
        except ValueError:
            raise self.error(f"{path.name}: {keyword} {tag} is not a number of ms: {str(raw).strip()!r}") from None
        if not math.isfinite(ms) or ms < 0 or (keyword == "ActualFrameDuration" and ms == 0):
            bound = "a positive" if keyword == "ActualFrameDuration" else "a non-negative"
            raise self.error(f"{path.name}: {keyword} {tag} is {str(raw).strip()!r}; it must be {bound} number of ms")
        return ms / 1000.0

    def local_datetime(self, text: str, what: str, ds: pydicom.Dataset | None = None) -> tuple[dt.datetime, float, str]:
        """A DT as the local clock time that TM values (AcquisitionTime, SeriesTime) are written in.

        Returns (date-time, precision of its time part in s, note for the branch). A DT with a UTC
        offset is moved to TimezoneOffsetFromUTC (0008,0201) when the header has one; without it
        the clock time is kept (the offset taken as local) and the note says so.
        """
        try:
            clock, offset, precision = _split_datetime(text)
        except ValueError as e:
            raise self.error(f"unreadable {what}: {text!r} ({e})") from None
        if offset is None:
            return clock, precision, ""
        if ds is None:  # a series-level time: every slice must state the same zone
            local_text = self.text("TimezoneOffsetFromUTC")
        else:
            local_text = str(ds.get("TimezoneOffsetFromUTC", "") or "").strip()
        if not local_text:
            return clock, precision, f"utc-offset-taken-as-local({text.strip()[-5:]})"
        try:
            local = _parse_utc_offset(local_text)
        except ValueError as e:
            raise self.error(f"unreadable TimezoneOffsetFromUTC (0008,0201): {e}") from None
        if local == offset:
            return clock, precision, ""
        return clock - offset + local, precision, f"utc-offset({text.strip()[-5:]}->{local_text})"

    def per_slice_datetime(self, ds: pydicom.Dataset, path: Path) -> dt.datetime | None:
        """AcquisitionDate (else SeriesDate) + AcquisitionTime of one slice, else its
        AcquisitionDateTime (0008,002A); None without either."""
        time = str(ds.get("AcquisitionTime") or "").strip()
        if not time:
            date_time = str(ds.get("AcquisitionDateTime") or "").strip()
            if date_time:
                when, precision, _ = self.local_datetime(date_time, f"{path.name}: AcquisitionDateTime (0008,002A)", ds)
                if precision >= 86400.0:
                    raise self.error(f"{path.name}: AcquisitionDateTime (0008,002A) {date_time!r} has no time of day")
                return when
            return None
        date = str(ds.get("AcquisitionDate") or ds.get("SeriesDate") or "").strip()
        if not date:
            raise self.error(f"{path.name}: AcquisitionTime (0008,0032) without AcquisitionDate (0008,0022) or SeriesDate")
        try:
            return dt.datetime.combine(_parse_date(date), _parse_time(time))
        except ValueError as e:
            raise self.error(f"{path.name}: unreadable AcquisitionDate/AcquisitionTime (0008,0022/0032): {e}") from None

    def check_single_radiopharmaceutical(self) -> None:
        """Every slice's RadiopharmaceuticalInformationSequence (0054,0016) items must agree on what
        the SUV uses (only the first item is read): two tracers, or two doses, are no one SUV."""
        keywords = ("Radiopharmaceutical", "RadionuclideTotalDose", "RadionuclideHalfLife",
                    "RadiopharmaceuticalStartTime", "RadiopharmaceuticalStartDateTime")  # fmt: skip
        for ds, path in zip(self.datasets, self.files):
            items = list(ds.get("RadiopharmaceuticalInformationSequence") or [])
            for k, item in enumerate(items[1:], start=2):
                for keyword in keywords:
                    first = str(items[0].get(keyword, "") or "").strip()
                    other = str(item.get(keyword, "") or "").strip()
                    if first != other and not _same_number(first, other):
                        raise self.error(
                            f"{path.name}: RadiopharmaceuticalInformationSequence (0054,0016) has {len(items)} items "
                            f"that disagree: {keyword} {TAGS.get(keyword, '')} {first!r} in item 1, {other!r} in item {k} "
                            "(two radiopharmaceuticals or doses: which one the SUV is of is not in the header)"
                        )

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


def _same_number(a: str, b: str) -> bool:
    """'350000000' and '3.5e8' are one dose; False when either is not a number."""
    try:
        return float(a) == float(b)
    except ValueError:
        return False


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
    allow_implausible_suv: bool = False,
) -> SUVResult:
    """Read a PET series and convert it to SUVbw (see the module docstring for the decision tree).

    series: a discovered ``DicomSeries``, its files, or a folder holding only that series' slices.
    case_id: named in errors and logs. extra_half_lives: nuclide name -> half-life (s) added to
    :data:`PET_HALF_LIVES_S` for the half-life check, for a tracer labelled with a nuclide the table
    lacks (``--nuclide Sc-44=14292``); a name already there replaces its value.
    allow_implausible_suv: convert even when :func:`suv_plausibility_problems` finds the weight,
    dose, uptake time or SUVmax impossible (``--allow-implausible-suv``); each problem is then in
    ``SUVResult.warnings`` and the branch ends ``implausible-accepted``. Without it they raise.
    Returns the float32 SUV image on the PET grid, the branch taken and the values used. Raises
    ``SUVError`` naming the case and the DICOM attribute and tag when a value the branch needs is
    missing, unreadable, implausible or differs between slices, or when the series is not one
    regular volume.
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
    if isinstance(series, DicomSeries) and series.problem:  # e.g. a damaged slice: the volume would lack it
        raise SUVError(f"{case}: {series.problem}")
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
    half_lives = {**PET_HALF_LIVES_S, **check_half_lives(extra_half_lives or {})}
    result, used = _convert(stack, header, half_lives)
    problems = suv_plausibility_problems(result.details["suv_max"], **used)
    if problems:
        if not allow_implausible_suv:
            raise header.error(
                f"implausible SUV: {'; '.join(problems)}. If the header is right after all, convert anyway "
                "with --allow-implausible-suv (recorded as a case warning)"
            )
        result.warnings = [f"{IMPLAUSIBLE_SUV_ACCEPTED}: {p}" for p in problems]
        result.branch += "|implausible-accepted"
    for step in result.branch.split("|"):
        if step.startswith("utc-offset-taken-as-local"):
            result.warnings.append(
                f"a date-time with a UTC offset {step.removeprefix('utc-offset-taken-as-local')} (injection or scan "
                "start) was read as local time: the header has no TimezoneOffsetFromUTC (0008,0201) to say the zone of its times"
            )
        for warning in result.warnings:
            logger.warning("%s: %s", case, warning)
    return result


def _convert(stack: Any, header: _Header, half_lives: Mapping[str, float]) -> tuple[SUVResult, dict[str, Any]]:
    """The decision tree; returns the result and the values to check for plausibility."""
    case = header.case
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
    used: dict[str, Any] = {"units": units}

    if units in ("GML", "CM2ML"):
        _record_optional(header, details)
        weight_kg = _normalized_to_body_weight(header, activity, units, details, branch)
        if weight_kg is not None:
            used["weight_kg"] = weight_kg
        return _result(stack, activity, branch, details, case), used
    if units == "CNTS":
        suv_factor = header.private(0x7053, 0x1000, PHILIPS_CREATOR, "PHILIPS")
        activity_factor = header.private(0x7053, 0x1009, PHILIPS_CREATOR, "PHILIPS")
        if suv_factor is not None:
            factors = _per_slice_private(header, 0x7053, 0x1000, "Philips SUV scale factor")
            activity *= factors[:, None, None]
            branch.append("CNTS|Philips-SUV-scale-factor(7053,1000)")
            _record_optional(header, details)
            details["philips_suv_scale_factor"] = float(factors[0])
            return _result(stack, activity, branch, details, case), used
        if activity_factor is None:
            raise header.error(
                "Units (0054,1001) CNTS without the Philips SUV scale factor (7053,1000) or activity "
                "concentration scale factor (7053,1009): counts cannot be turned into Bq/ml"
            )
        factors = _per_slice_private(header, 0x7053, 0x1009, "Philips activity concentration scale factor")
        activity *= factors[:, None, None]
        details["philips_activity_scale_factor"] = float(factors[0])
        branch.append("CNTS|Philips-activity-scale-factor(7053,1009)")
    elif units == "CPS":
        _cps_to_bqml(header, stack, activity, details, branch)
    elif units == "BQML":
        branch.append("BQML")
    else:
        raise header.error(f"Units (0054,1001) {units!r} is not one of BQML, CNTS, CPS, GML, CM2ML")

    # From here on the activity is in Bq/ml.
    fixes: list[str] = []
    weight_kg, dose_bq, half_life_s = _weight_dose_half_life(header, details, fixes, half_lives)
    used.update(
        weight_kg=weight_kg, dose_bq=dose_bq, dose_as_written=dose_bq / 1e6 if "dose_MBq_fixed" in fixes else dose_bq,
        half_life_s=half_life_s, nuclide=details["nuclide"],
    )  # fmt: skip
    decay_correction = details["decay_correction"]
    decay_constant = math.log(2.0) / half_life_s
    _check_decy(header, decay_correction)
    if decay_correction == "ADMIN":
        branch.append("ADMIN")
        injection = _injection_time(header, None, None, half_life_s)
        details["injection_time"] = injection.isoformat() if injection else ""
        scale = suv_bw_scale(weight_kg, dose_bq, half_life_s, 0.0)
        details["decay_factor"] = 1.0
        activity *= np.float32(scale)
    elif decay_correction == "START":
        branch.append("START")
        reference, how, tags = _reference_time(header, decay_constant)
        branch.append(how)
        _check_decay_factor(header, reference, decay_constant, tags)
        injection = _injection_time(header, reference, branch, half_life_s)
        seconds = (reference - injection).total_seconds()
        _check_interval(header, seconds, "reference")
        used.update(uptake_s=seconds, reference=f"the reference time {reference.isoformat()} ({tags})")
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
            duration_s = header.frame_seconds(ds, path, "ActualFrameDuration")
            if duration_s is None:
                raise header.error(f"{path.name}: DecayCorrection NONE needs ActualFrameDuration (0018,1242)")
            times.append(when)
            durations.append(duration_s)
        injection = _injection_time(header, min(times), branch, half_life_s)
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
        used.update(
            uptake_s=(max(times) - injection).total_seconds(),
            reference="the last AcquisitionDate/AcquisitionTime (0008,0022/0032)",
        )  # fmt: skip
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
    return _result(stack, activity, branch, details, case), used


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
        except (ValueError, TypeError, struct.error) as e:
            raise header.error(f"{path.name}: unreadable {name} ({group:04X},{element:04X}): {item.value!r} ({e})") from None
        if not (value > 0 and math.isfinite(value)):
            raise header.error(f"{path.name}: {name} ({group:04X},{element:04X}) is {value!r}")
        values.append(value)
    return np.asarray(values, dtype=np.float64)


def _weight_kg(header: _Header, fixes: list[str]) -> float:
    """PatientWeight (0010,1030) in kg (a value above 1000 was entered in grams)."""
    weight = header.number("PatientWeight")
    if weight is None or weight <= 0:
        raise header.error(f"PatientWeight (0010,1030) is {weight!r}; SUVbw needs the body weight")
    if weight > WEIGHT_GRAMS_ABOVE:
        logger.warning("%s: PatientWeight (0010,1030) %s taken as grams", header.case, weight)
        weight /= 1000.0
        fixes.append("weight_g_fixed")
    return weight


# SUVType (0054,1006) -> (male, female) factor in kg; W kg, H cm, BMI kg/m2 (IBSI SUV manual, Sugawara).
_LBM_IBW_KG = {
    "LBM": (lambda w, h: 1.10 * w - 120.0 * (w / h) ** 2, lambda w, h: 1.07 * w - 148.0 * (w / h) ** 2),
    "LBMJAMES128": (lambda w, h: 1.10 * w - 128.0 * (w / h) ** 2, lambda w, h: 1.07 * w - 148.0 * (w / h) ** 2),
    "LBMJANMA": (
        lambda w, h: 9270.0 * w / (6680.0 + 216.0 * w / (h / 100.0) ** 2),
        lambda w, h: 9270.0 * w / (8780.0 + 244.0 * w / (h / 100.0) ** 2),
    ),
    "IBW": (lambda w, h: 48.0 + 1.06 * (h - 152.0), lambda w, h: 45.5 + 0.91 * (h - 152.0)),
}


def body_surface_area_m2(weight_kg: float, height_cm: float) -> float:
    """Du Bois: BSA (m2) = 0.007184 * H(cm)**0.725 * W(kg)**0.425 (the formula DICOM CM2ML uses)."""
    return 0.007184 * height_cm**0.725 * weight_kg**0.425


def normalization_factor(suv_type: str, weight_kg: float, height_cm: float, sex: str = "") -> float:
    """The factor F of SUV_F = Ac x F / D: kg for LBM, LBMJAMES128, LBMJANMA, IBW (sex M, F, or O:
    the mean of the two), m2 for BSA (Du Bois, no sex). ValueError for another SUVType or sex."""
    if suv_type == "BSA":
        return body_surface_area_m2(weight_kg, height_cm)
    male, female = _LBM_IBW_KG[suv_type]
    if sex == "M":
        return male(weight_kg, height_cm)
    if sex == "F":
        return female(weight_kg, height_cm)
    if sex == "O":  # IBSI: no consensus; the mean of the sex-specific factors
        return (male(weight_kg, height_cm) + female(weight_kg, height_cm)) / 2.0
    raise ValueError(f"sex must be M, F or O, got {sex!r}")


def _normalized_to_body_weight(
    header: _Header, activity: np.ndarray, units: str, details: dict, branch: list[str]
) -> float | None:
    """Units GML / CM2ML to SUVbw in place: SUVbw = SUV_F x W / F; the weight used (None for BW)."""
    suv_type = details["suv_type"]
    if units == "GML":
        if suv_type == "BW":
            branch.append("GML|SUVType=BW")
            return None
        if not suv_type:
            branch.append("GML|SUVType-absent-assumed-BW")
            logger.warning("%s: Units GML without SUVType (0054,1006); taken as SUVbw", header.case)
            return None
        if suv_type == "BSA":
            raise header.error(
                "Units (0054,1001) GML with SUVType (0054,1006) 'BSA': body-surface-area SUV is in cm2/ml "
                "(Units CM2ML), so the two contradict each other"
            )
        if suv_type not in _LBM_IBW_KG:
            raise header.error(
                f"Units (0054,1001) GML with SUVType (0054,1006) {suv_type!r}: not one of BW, LBM, LBMJAMES128, "
                "LBMJANMA, IBW (the DICOM GML types)"
            )
        branch.append(f"GML|SUVType={suv_type}")
    else:
        if suv_type and suv_type != "BSA":
            raise header.error(
                f"Units (0054,1001) CM2ML with SUVType (0054,1006) {suv_type!r}: CM2ML is SUVbsa (cm2/ml), "
                "so the two contradict each other"
            )
        branch.append("CM2ML|SUVType=BSA" if suv_type else "CM2ML|SUVType-absent-assumed-BSA")
        suv_type = "BSA"
    fixes: list[str] = []
    weight_kg = _weight_kg(header, fixes)
    height_m = header.number("PatientSize", required=False)
    if height_m is None:
        raise header.error(f"missing PatientSize (0010,1020) (height in m): SUVType {suv_type} needs it for SUVbw")
    low, high = PLAUSIBLE_HEIGHT_M
    if not low <= height_m <= high:
        hint = " (it looks like centimetres; the tag holds metres)" if 50 <= height_m <= 250 else ""
        raise header.error(f"PatientSize (0010,1020) {height_m:g} m is outside {low:g}-{high:g} m{hint}")
    sex = ""
    if suv_type != "BSA":
        sex = header.text("PatientSex").upper()
        if not sex:
            raise header.error(f"missing PatientSex (0010,0040): SUVType {suv_type} differs between M and F")
        if sex not in ("M", "F", "O"):
            raise header.error(f"PatientSex (0010,0040) {sex!r} is not M, F or O (needed by SUVType {suv_type})")
        branch.append(f"PatientSex={sex}")
    factor = normalization_factor(suv_type, weight_kg, height_m * 100.0, sex)
    if not (factor > 0 and math.isfinite(factor)):
        raise header.error(
            f"SUVType (0054,1006) {suv_type} gives a factor of {factor:.4g} for PatientWeight (0010,1030) "
            f"{weight_kg:g} kg and PatientSize (0010,1020) {height_m:g} m: not a body"
        )
    # SUV_F = Ac * F / D with F in g (LBM, IBW) or cm2 (BSA); SUVbw = Ac * W(g) / D.
    factor_consistent = factor * 1e4 if suv_type == "BSA" else factor * 1000.0
    activity *= np.float32(weight_kg * 1000.0 / factor_consistent)
    branch.extend(fixes)
    details.update(weight_kg=weight_kg, height_m=height_m, normalization_factor=factor)
    return weight_kg


def _check_decy(header: _Header, decay_correction: str) -> None:
    """CorrectedImage (0028,0051), when written, must agree with DecayCorrection (0054,1102): DECY
    listed for START / ADMIN, not for NONE. Otherwise the header says both that the pixels are and are
    not decay-corrected, and which is true moves SUV by the decay factor (x 1.46 after 1 h of F-18)."""
    header.text("CorrectedImage")  # all slices must agree
    raw = header.first.get("CorrectedImage")
    if raw is None or str(raw).strip() in ("", "[]"):
        return
    names = {str(raw).strip().upper()} if isinstance(raw, str) else {str(c).strip().upper() for c in raw}
    if decay_correction in ("START", "ADMIN") and "DECY" not in names:
        raise header.error(
            f"DecayCorrection (0054,1102) {decay_correction} but CorrectedImage (0028,0051) {sorted(names)} lacks DECY: "
            "contradictory (are the pixels decay-corrected?)"
        )
    if decay_correction == "NONE" and "DECY" in names:
        raise header.error(
            "DecayCorrection (0054,1102) NONE but CorrectedImage (0028,0051) lists DECY: contradictory "
            "(are the pixels decay-corrected?)"
        )


def _cps_to_bqml(header: _Header, stack: Any, activity: np.ndarray, details: dict, branch: list[str]) -> None:
    """Units CPS to Bq/ml in place (IBSI SUV manual): dose calibrated (DCAL in CorrectedImage) /
    voxel volume (ml); else x DoseCalibrationFactor (0054,1322) / voxel volume. The corrections an
    activity image needs (ATTN; DECY unless DecayCorrection NONE) must be listed in CorrectedImage."""
    header.text("CorrectedImage")  # all slices must agree
    corrected = header.first.get("CorrectedImage") or []
    corrected = [str(corrected)] if isinstance(corrected, str) else [str(c) for c in corrected]
    names = {c.strip().upper() for c in corrected}
    needed = ["ATTN"] + (["DECY"] if details["decay_correction"] in ("START", "ADMIN") else [])
    missing = [c for c in needed if c not in names]
    if missing:
        raise header.error(
            f"Units (0054,1001) CPS: CorrectedImage (0028,0051) {corrected} lacks {', '.join(missing)}: counts "
            "per second without these corrections are not an activity concentration"
        )
    if "DCAL" in names:
        factor, how = 1.0, "DCAL"
    else:
        factor = header.number("DoseCalibrationFactor", required=False)
        if factor is None:
            raise header.error(
                "Units (0054,1001) CPS: the image is not dose calibrated (no DCAL in CorrectedImage (0028,0051)) "
                "and has no DoseCalibrationFactor (0054,1322): counts per second cannot be turned into Bq/ml"
            )
        if not factor > 0:
            raise header.error(f"DoseCalibrationFactor (0054,1322) is {factor:g}")
        how = "DoseCalibrationFactor(0054,1322)"
        details["dose_calibration_factor"] = factor
    slice_spacing = float(stack.spacing[2])
    thickness = header.number("SliceThickness", required=False)
    if thickness is not None and len(stack.files) > 1 and abs(thickness / slice_spacing - 1.0) > 0.01:
        raise header.error(
            f"Units (0054,1001) CPS: SliceThickness (0018,0050) {thickness:g} mm differs from the slice spacing "
            f"{slice_spacing:g} mm (ImagePositionPatient): the voxel volume that turns counts into Bq/ml is ambiguous"
        )
    voxel_ml = float(stack.spacing[0]) * float(stack.spacing[1]) * (thickness or slice_spacing) / 1000.0
    activity *= np.float32(factor / voxel_ml)
    details["voxel_ml"] = voxel_ml
    branch.append(f"CPS|{how}|voxel-volume({voxel_ml:.4g}ml)")


def _weight_dose_half_life(
    header: _Header, details: dict, fixes: list[str], half_lives: Mapping[str, float]
) -> tuple[float, float, float]:
    weight = _weight_kg(header, fixes)
    if header.rp is None:
        raise header.error("missing RadiopharmaceuticalInformationSequence (0054,0016): no dose, half-life or injection time")
    header.check_single_radiopharmaceutical()
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
        known = _nuclide_from_text(name)
        if known is not None and abs(value / PET_HALF_LIVES_S[known] - 1.0) > HALF_LIFE_REL_TOL:
            # A physical constant: redeclaring F-18 as 110 (minutes) would pass a half-life unit slip.
            raise ValueError(
                f"{name} is {known}, whose half-life is {PET_HALF_LIVES_S[known]:g} s, not {value:g} s "
                f"(more than {100 * HALF_LIFE_REL_TOL:g} % apart; the value must be in seconds)"
            )
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


def _named_nuclides(header: _Header) -> list[tuple[str, str]]:
    """Every (nuclide, where it was read) the header names, in order of trust: the code or meaning
    of RadionuclideCodeSequence (0054,0300), Radionuclide (0018,0030), the tracer name
    Radiopharmaceutical (0018,0031) ("18F-DCFPyL", "[68Ga]Ga-PSMA-11"), and the meaning of
    RadiopharmaceuticalCodeSequence (0054,0304)."""
    found = []
    items = header.rp.get("RadionuclideCodeSequence") if header.rp is not None else None
    for item in items or []:
        code = str(item.get("CodeValue", "")).strip().upper()
        if code in RADIONUCLIDE_CODES:
            found.append((RADIONUCLIDE_CODES[code], f"RadionuclideCodeSequence (0054,0300) code {code}"))
            continue
        meaning = str(item.get("CodeMeaning", "")).strip()
        nuclide = _nuclide_from_text(meaning)
        if nuclide:
            found.append((nuclide, f"RadionuclideCodeSequence (0054,0300) meaning {meaning!r}"))
    for source in (header.rp, header.first):  # (0018,0030) is retired; exports put it in either place
        text = str(source.get("Radionuclide", "") or "").strip() if source is not None else ""
        nuclide = _nuclide_from_text(text)
        if nuclide:
            found.append((nuclide, f"Radionuclide (0018,0030) {text!r}"))
            break
    if header.rp is not None:
        text = str(header.rp.get("Radiopharmaceutical", "") or "").strip()
        nuclide = _nuclide_from_text(text)
        if nuclide:
            found.append((nuclide, f"Radiopharmaceutical (0018,0031) {text!r}"))
        for item in header.rp.get("RadiopharmaceuticalCodeSequence") or []:
            meaning = str(item.get("CodeMeaning", "")).strip()
            nuclide = _nuclide_from_text(meaning)
            if nuclide:
                found.append((nuclide, f"RadiopharmaceuticalCodeSequence (0054,0304) meaning {meaning!r}"))
    return found


def _identify_nuclide(header: _Header) -> tuple[str, str] | None:
    """(nuclide, where it was read), the first of :func:`_named_nuclides`; ``SUVError`` when the
    fields name different nuclides (one of them is wrong, and so may be the half-life)."""
    found = _named_nuclides(header)
    if len({nuclide for nuclide, _ in found}) > 1:
        listed = "; ".join(f"{where} names {nuclide}" for nuclide, where in found)
        raise header.error(f"contradictory radionuclide in RadiopharmaceuticalInformationSequence (0054,0016): {listed}")
    return found[0] if found else None


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
        f"within {100 * HALF_LIFE_REL_TOL:g} % and no nuclide is named in RadionuclideCodeSequence (0054,0300), "
        f"Radionuclide (0018,0030) or Radiopharmaceutical (0018,0031){_unit_hint(half_life_s, half_lives)}; "
        f"known: {listed}. A tracer "
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


def _reference_time(header: _Header, decay_constant: float) -> tuple[dt.datetime, str, str]:
    """Scan start for DecayCorrection START, the rule that gave it (for the branch) and its tags.

    SeriesDate/Time is used when it is not after the earliest AcquisitionDate/Time and at most
    :data:`MAX_SERIES_BEFORE_ACQUISITION_S` before it (further before, it is not this scan's start:
    a real header had it 20 days early); else the GE scan start (0009,100D); else back-computed.
    """
    acquisitions = [header.per_slice_datetime(ds, p) for ds, p in zip(header.datasets, header.files)]
    acquisitions = [a for a in acquisitions if a is not None]
    earliest = min(acquisitions) if acquisitions else None
    series_time = header.text("SeriesTime")
    rejected, why_not_series = "", "there is no SeriesTime (0008,0031)"
    if series_time:
        date = header.text("SeriesDate") or header.text("AcquisitionDate", consistent=False) or header.text("StudyDate")
        if not date:
            raise header.error("SeriesTime (0008,0031) without SeriesDate (0008,0021)")
        try:
            series = dt.datetime.combine(_parse_date(date), _parse_time(series_time))
        except ValueError as e:
            raise header.error(f"unreadable SeriesDate/SeriesTime (0008,0021/0031): {e}") from None
        gap_s = (earliest - series).total_seconds() if earliest is not None else 0.0
        coarse = _time_precision_s(series_time) > MAX_TIME_PRECISION_S
        if 0 <= gap_s <= MAX_SERIES_BEFORE_ACQUISITION_S and not coarse:
            return series, "SeriesTime", "SeriesDate/SeriesTime (0008,0021/0031)"
        if coarse:
            why_not_series = f"SeriesTime (0008,0031) {series_time!r} gives the hour only"
            rejected = "SeriesTime-rejected(hour only)|"
        elif gap_s < 0:
            why_not_series = "SeriesDate/SeriesTime (0008,0021/0031) is after the earliest AcquisitionTime (0008,0032)"
        else:
            why_not_series = (
                f"SeriesDate/SeriesTime (0008,0021/0031) {series.isoformat()} is {_duration(gap_s)} before the earliest "
                f"AcquisitionDate/AcquisitionTime (0008,0022/0032) {earliest.isoformat()}, so it is not this scan's start"
            )
            rejected = f"SeriesTime-rejected({_duration(gap_s)} before AcquisitionTime)|"
        logger.info("%s: %s", header.case, why_not_series)
    ge_start = header.private(0x0009, 0x100D, GE_CREATOR, "GE")
    if ge_start is not None:
        try:
            value = ge_start.value.decode("ascii") if isinstance(ge_start.value, bytes) else str(ge_start.value)
            when, _, offset_note = header.local_datetime(value.strip("\x00 "), "GE private scan start (0009,100D)")
        except (ValueError, SUVError) as e:
            raise header.error(f"unreadable GE private scan start (0009,100D): {ge_start.value!r} ({e})") from None
        gap_s = (earliest - when).total_seconds() if earliest is not None else 0.0
        if 0 <= gap_s <= MAX_SERIES_BEFORE_ACQUISITION_S:
            note = f"|{offset_note}" if offset_note else ""
            return when, f"{rejected}GE-private(0009,100D){note}", "GE private scan start (0009,100D)"
        # Held to the same window as SeriesTime: a scan start after the acquisition, or hours before it, is not this scan's.
        why_not_series += (
            f", and the GE private scan start (0009,100D) {when.isoformat()} is {_duration(abs(gap_s))} "
            f"{'after' if gap_s < 0 else 'before'} it"
        )
        rejected += "GE-private-rejected|"
        logger.info("%s: %s", header.case, why_not_series)
    if not acquisitions:
        raise header.error(f"DecayCorrection START: {why_not_series} and there is no AcquisitionTime (0008,0032)")
    frames = []
    for ds, path in zip(header.datasets, header.files):
        duration = header.frame_seconds(ds, path, "ActualFrameDuration")
        frame_reference = header.frame_seconds(ds, path, "FrameReferenceTime")
        if duration is None or frame_reference is None:
            raise header.error(
                f"{path.name}: {why_not_series}{'' if ge_start is not None else ' and there is no GE scan start (0009,100D)'}; "
                "back-computing the scan start needs ActualFrameDuration (0018,1242) and FrameReferenceTime (0054,1300)"
            )
        when = header.per_slice_datetime(ds, path)
        if when is None:
            raise header.error(f"{path.name}: back-computing the scan start needs AcquisitionTime (0008,0032) on every slice")
        frames.append((when, duration, frame_reference, path))
    # FrameReferenceTime is the offset from the reference to the time the pixel values occurred:
    # usually the frame's mean-count time (QIBA: reference = acquisition + T_ave - FrameReferenceTime),
    # but a series with a FrameReferenceTime of 0 measures it to the frame start (0 cannot be a
    # mean-count time, which is > 0): then reference = acquisition - FrameReferenceTime.
    to_frame_start = any(reference == 0 for _, _, reference, _ in frames)
    starts = []
    for when, duration_s, reference_s, path in frames:
        offset_s = reference_s if to_frame_start else reference_s - _average_count_time_s(duration_s, decay_constant)
        if offset_s < -1e-3:
            raise header.error(
                f"{path.name}: FrameReferenceTime (0054,1300) {reference_s * 1000:g} ms is shorter than the mean-count "
                f"time of its {duration_s:g} s frame (ActualFrameDuration (0018,1242)): the scan start would be after "
                "the frame start"
            )
        starts.append(when - dt.timedelta(seconds=offset_s))
    spread = (max(starts) - min(starts)).total_seconds()
    if spread > BACK_COMPUTED_SPREAD_S:
        raise header.error(
            f"back-computed scan starts differ by {spread:.1f} s between slices (AcquisitionTime (0008,0032), "
            "ActualFrameDuration (0018,1242), FrameReferenceTime (0054,1300) contradict each other)"
        )
    how = "back-computed(AcquisitionTime,FrameReferenceTime" + ("=frame-start)" if to_frame_start else ")")
    tags = "back-computed from AcquisitionTime (0008,0032) and FrameReferenceTime (0054,1300)"
    return min(starts) + (max(starts) - min(starts)) / 2, rejected + how, tags


def _check_decay_factor(header: _Header, reference: dt.datetime, decay_constant: float, tags: str) -> None:
    """DecayFactor (0054,1321) of each slice against the reference (DecayCorrection START).

    A slice decay-corrected to ``reference`` has DecayFactor exp(lambda (acquisition - reference)),
    times the frame-duration factor on most scanners; the time it implies must lie in
    [acquisition - reference, + mean-count time] within :data:`DECAY_FACTOR_TOLERANCE_S`. A factor
    of exactly 1 is what writers put when they do not record it (all 12 IBSI DROs): not checked.
    """
    for ds, path in zip(header.datasets, header.files):
        raw = ds.get("DecayFactor")
        when = header.per_slice_datetime(ds, path)
        if raw in (None, "") or when is None:
            continue
        try:
            factor = float(raw)
        except (TypeError, ValueError):
            raise header.error(f"{path.name}: DecayFactor (0054,1321) is not a number: {raw!r}") from None
        if factor == 1.0 or not (factor > 0 and math.isfinite(factor)):
            continue
        duration_s = header.frame_seconds(ds, path, "ActualFrameDuration")
        mean_count_s = _average_count_time_s(duration_s, decay_constant) if duration_s is not None else 0.0
        implied_s = math.log(factor) / decay_constant
        expected_s = (when - reference).total_seconds()
        if not expected_s - DECAY_FACTOR_TOLERANCE_S <= implied_s <= expected_s + mean_count_s + DECAY_FACTOR_TOLERANCE_S:
            raise header.error(
                f"{path.name}: DecayFactor (0054,1321) {factor:g} means the image was decay-corrected to "
                f"{_duration(implied_s)} before its AcquisitionTime (0008,0032), but the reference time from {tags} "
                f"({reference.isoformat()}) is {_duration(expected_s)} before it: contradictory reference times"
            )


def _injection_time(
    header: _Header, reference: dt.datetime | None, branch: list[str] | None, half_life_s: float
) -> dt.datetime | None:
    """Injection date-time; for ADMIN (``branch`` None) only recorded, so absent is not an error.

    A RadiopharmaceuticalStartTime (0018,1072) without date goes on the reference date; if that is
    after the reference, the day before (midnight crossing) only when the uptake this gives is one
    the plausibility check accepts (else it is an error: the times contradict each other), and only
    for nuclides whose plausible uptake is shorter than a day (else the date is needed).
    """
    start_datetime = header.text("RadiopharmaceuticalStartDateTime")
    start_time = header.text("RadiopharmaceuticalStartTime")
    if start_datetime:
        injection, precision, offset_note = header.local_datetime(
            start_datetime, "RadiopharmaceuticalStartDateTime (0018,1078)"
        )
        if branch is None:  # ADMIN: recorded only
            return injection
        if precision >= 86400.0:  # a date without a time of day: midnight would be a guess
            if not start_time:
                raise header.error(
                    f"RadiopharmaceuticalStartDateTime (0018,1078) {start_datetime!r} has a date but no time of day, "
                    "and there is no RadiopharmaceuticalStartTime (0018,1072): the injection time is unknown"
                )
            try:
                injection = dt.datetime.combine(injection.date(), _parse_time(start_time))
            except ValueError as e:
                raise header.error(f"unreadable RadiopharmaceuticalStartTime (0018,1072): {e}") from None
            branch.append("RadiopharmaceuticalStartDateTime(date)+RadiopharmaceuticalStartTime")
            return injection
        if start_time:
            # Both written: they must be the same moment (the DT's local clock time against the TM).
            try:
                clock = _parse_time(start_time)
            except ValueError as e:
                raise header.error(f"unreadable RadiopharmaceuticalStartTime (0018,1072): {e}") from None
            as_written = _parse_datetime(start_datetime)
            gaps = []
            for candidate in (injection, as_written):
                seconds = (candidate - dt.datetime.combine(candidate.date(), clock)).total_seconds() % 86400.0
                gaps.append(min(seconds, 86400.0 - seconds))
            tolerance = max(1.0, precision, _time_precision_s(start_time))
            if gaps[0] >= tolerance:
                hint = " (the time as written, before the UTC offset, agrees)" if gaps[1] < tolerance else ""
                raise header.error(
                    f"RadiopharmaceuticalStartDateTime (0018,1078) {start_datetime!r} and RadiopharmaceuticalStartTime "
                    f"(0018,1072) {start_time!r} are {_duration(gaps[0])} apart{hint}: contradictory injection times"
                )
            if offset_note.startswith("utc-offset-taken-as-local"):
                offset_note = ""  # the local TM agrees with the DT's clock time: that is the local zone
            if _time_precision_s(start_time) < precision:  # the TM is the more precise of the two
                candidates = [dt.datetime.combine(injection.date() + dt.timedelta(days=d), clock) for d in (-1, 0, 1)]
                injection = min(candidates, key=lambda c: abs((c - injection).total_seconds()))
                precision = _time_precision_s(start_time)
                branch.append("RadiopharmaceuticalStartTime(more-precise)")
        if precision > MAX_TIME_PRECISION_S:
            raise header.error(
                f"RadiopharmaceuticalStartDateTime (0018,1078) {start_datetime!r} gives the injection to the hour only "
                "(SUV uncertain by up to 2**(1 h / half-life)) and no RadiopharmaceuticalStartTime (0018,1072) says the minutes"
            )
        branch.append("RadiopharmaceuticalStartDateTime")
        if offset_note:
            branch.append(offset_note)
        return injection
    if not start_time:
        if branch is None:
            return None
        raise header.error(
            "no injection time: RadiopharmaceuticalStartDateTime (0018,1078) and RadiopharmaceuticalStartTime "
            "(0018,1072) both missing in RadiopharmaceuticalInformationSequence (0054,0016)"
        )
    limit_s = MAX_UPTAKE_HALF_LIVES * half_life_s
    if branch is not None and limit_s > 86400.0:
        raise header.error(
            f"RadiopharmaceuticalStartTime (0018,1072) {start_time} has no date, and with a half-life of "
            f"{_duration(half_life_s)} the scan may be days after the injection: RadiopharmaceuticalStartDateTime "
            "(0018,1078) is needed"
        )
    date = reference.strftime("%Y%m%d") if reference is not None else ""
    date = date or header.text("SeriesDate") or header.text("StudyDate")
    if not date:
        raise header.error("RadiopharmaceuticalStartTime (0018,1072) without SeriesDate (0008,0021) to place it on")
    try:
        injection = dt.datetime.combine(_parse_date(date), _parse_time(start_time))
    except ValueError as e:
        raise header.error(f"unreadable RadiopharmaceuticalStartTime (0018,1072): {e}") from None
    if branch is not None and _time_precision_s(start_time) > MAX_TIME_PRECISION_S:
        raise header.error(
            f"RadiopharmaceuticalStartTime (0018,1072) {start_time!r} gives the injection to the hour only "
            "(SUV uncertain by up to 2**(1 h / half-life))"
        )
    if branch is not None:
        branch.append("RadiopharmaceuticalStartTime")
    if reference is not None and injection > reference:
        crossed = injection - dt.timedelta(days=1)
        uptake_s = (reference - crossed).total_seconds()
        if branch is not None and uptake_s > limit_s:
            raise header.error(
                f"RadiopharmaceuticalStartTime (0018,1072) {injection.time().isoformat()} is "
                f"{_duration((injection - reference).total_seconds())} after the reference time "
                f"{reference.isoformat()}; reading it as the day before (a midnight crossing) would mean "
                f"{_duration(uptake_s)} of uptake, more than {MAX_UPTAKE_HALF_LIVES:g} half-lives "
                f"({_duration(limit_s)}): contradictory times (RadiopharmaceuticalStartDateTime (0018,1078) would say)"
            )
        injection = crossed  # the scan crossed midnight after the injection
        if branch is not None:
            branch.append("midnight-crossing")
    return injection


def _check_interval(header: _Header, seconds: float, what: str) -> None:
    if seconds < 0:
        raise header.error(
            f"injection ({TAGS['RadiopharmaceuticalStartDateTime']}/{TAGS['RadiopharmaceuticalStartTime']}) is "
            f"{-seconds:.0f} s after the {what} time: contradictory times"
        )
