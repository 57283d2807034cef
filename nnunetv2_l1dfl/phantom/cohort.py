"""The seeded cohort: who the synthetic patients are, what was injected when, and their lesions.

Everything random is drawn here from ``numpy.random.SeedSequence([seed, patient, study, purpose])``
streams, so a study's content depends only on the seed and its own indices: asking for more cases
adds studies without changing the earlier ones.

Lesion statistics follow the L1DFL paper's cohort (684 PSMA lesions in 380 scans): lesion volume
6.68 +- 10.20 ml and SUVmax 12.65 +- 14.46. Each is drawn from a lognormal truncated to a plausible
range, with its two parameters fitted so that the *truncated* distribution has exactly those mean
and standard deviation. 1 to 5 lesions per study (mean about 1.9, as in the paper), in the
prostate bed, pelvic lymph nodes and bone.
"""

from __future__ import annotations

import datetime as dt
import functools
import math
from dataclasses import dataclass, replace

import numpy as np

from nnunetv2_l1dfl.phantom.anatomy import PSMA_UPTAKE_SUV, PatientAnatomy

#: The paper's cohort statistics (mean, standard deviation).
PAPER_LESION_VOLUME_ML = (6.68, 10.20)
PAPER_LESION_SUV_MAX = (12.65, 14.46)
LESION_VOLUME_RANGE_ML = (0.5, 100.0)
LESION_SUV_MAX_RANGE = (2.5, 100.0)

#: Probability of 1..5 lesions per study (oligometastatic recurrence; mean 1.88 lesions).
LESION_COUNT_PROBABILITIES = (0.55, 0.20, 0.12, 0.08, 0.05)
#: Lesion sites and their probabilities.
LESION_SITE_PROBABILITIES = {"prostate_bed": 0.30, "pelvic_node": 0.45, "bone": 0.25}

F18_HALF_LIFE_S = 6586.2
TRACER = "18F-DCFPyL"
#: Fraction of patients scanned twice (follow-up), at least one when the cohort has >= 4 studies.
REPEAT_PATIENT_FRACTION = 0.15


@dataclass(frozen=True)
class SizePreset:
    """Image grids of one cohort size.

    PET: ``pet_shape_zyx`` voxels of ``pet_spacing_mm`` (x, y, z), the lowest slice centred at
    ``pet_z_start_mm`` above the pubic symphysis, blurred to ``pet_fwhm_mm``. CT: a finer grid with a
    wider in-plane field of view (``ct_inplane_px`` square) and ``ct_z_margin_mm`` beyond the PET on
    both ends.
    """

    name: str
    pet_shape_zyx: tuple[int, int, int]
    pet_spacing_mm: tuple[float, float, float]
    pet_z_start_mm: float
    pet_fwhm_mm: float
    ct_spacing_mm: tuple[float, float, float]
    ct_inplane_px: int
    ct_z_margin_mm: float
    description: str

    @property
    def pet_voxel_ml(self) -> float:
        return float(np.prod(self.pet_spacing_mm)) / 1000.0

    @property
    def lesion_volume_range_ml(self) -> tuple[float, float]:
        """Lesions are at least two PET voxels, so none vanishes on the PET grid."""
        return max(LESION_VOLUME_RANGE_ML[0], 2.0 * self.pet_voxel_ml), LESION_VOLUME_RANGE_ML[1]


SIZE_PRESETS = {
    "small": SizePreset(
        "small", (36, 44, 44), (8.0, 8.0, 6.0), -60.0, 8.0, (3.5, 3.5, 4.0), 112, 8.0,
        "pelvis only, PET 44x44x36 voxels of 8x8x6 mm (tests and CI)"),
    "default": SizePreset(
        "default", (60, 64, 64), (5.5, 5.5, 5.0), -50.0, 6.5, (2.5, 2.5, 3.0), 160, 15.0,
        "pelvis to kidneys, PET 64x64x60 voxels of 5.5x5.5x5 mm (the demo; minutes on a laptop CPU)"),
    "wholebody": SizePreset(
        "wholebody", (210, 96, 96), (4.0, 4.0, 4.0), -120.0, 5.5, (2.0, 2.0, 3.0), 200, 15.0,
        "thighs to skull vertex, PET 96x96x210 voxels of 4 mm (salivary glands in view; GPU training)"),
}


@dataclass(frozen=True)
class LesionSpec:
    """A lesion as drawn: where, how big (ml on the PET grid) and how hot (SUVmax in the final PET)."""

    site: str
    target_volume_ml: float
    target_suv_max: float
    hu: float


@dataclass(frozen=True)
class StudySpec:
    """Everything needed to render and write one PET/CT study."""

    ordinal: int
    patient_index: int
    study_index: int
    patient_id: str
    patient_name: str
    birth_date: dt.date
    age_years: int
    height_m: float
    weight_kg: float
    injection_datetime: dt.datetime
    series_datetime: dt.datetime
    injected_dose_bq: float
    half_life_s: float
    tracer: str
    anatomy: PatientAnatomy
    lesions: tuple[LesionSpec, ...]
    mask_format: str  # "RTSTRUCT" or "SEG"
    render_entropy: tuple[int, ...]

    @property
    def study_date(self) -> dt.date:
        return self.series_datetime.date()

    @property
    def uptake_s(self) -> float:
        return (self.series_datetime - self.injection_datetime).total_seconds()

    @property
    def study_folder(self) -> str:
        """``<PatientID>/<YYYYMMDD>_PSMA``: where the study's DICOM goes inside the cohort folder."""
        return f"{self.patient_id}/{self.study_date:%Y%m%d}_PSMA"

    def suv_scale_g_per_bq(self) -> float:
        """SUVbw per Bq/ml: weight (g) / dose (Bq) decay-corrected to the series start (DecayCorrection START)."""
        decayed = self.injected_dose_bq * math.exp(-math.log(2.0) * self.uptake_s / self.half_life_s)
        return self.weight_kg * 1000.0 / decayed


# --------------------------------------------------------------------------------------------------
# Truncated lognormal fitted to the paper's moments
# --------------------------------------------------------------------------------------------------
def truncated_lognormal_moments(mu: float, sigma: float, lo: float, hi: float) -> tuple[float, float]:
    """Mean and standard deviation of lognormal(mu, sigma) restricted to [lo, hi]."""
    def cdf(x: float) -> float:  # standard normal
        return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))

    a, b = (math.log(lo) - mu) / sigma, (math.log(hi) - mu) / sigma
    z = cdf(b) - cdf(a)

    def raw_moment(k: int) -> float:
        return math.exp(k * mu + 0.5 * (k * sigma) ** 2) * (cdf(b - k * sigma) - cdf(a - k * sigma)) / z

    m1, m2 = raw_moment(1), raw_moment(2)
    return m1, math.sqrt(max(m2 - m1 * m1, 0.0))


@functools.lru_cache(maxsize=32)
def fit_truncated_lognormal(mean: float, sd: float, lo: float, hi: float) -> tuple[float, float]:
    """(mu, sigma) of the lognormal whose restriction to [lo, hi] has the given mean and sd.

    Raises ValueError when no such distribution exists (e.g. a mean outside [lo, hi]).
    """
    from scipy.optimize import least_squares

    if not lo < mean < hi:
        raise ValueError(f"mean {mean} must lie inside the range [{lo}, {hi}]")
    sigma0 = math.sqrt(math.log(1 + (sd / mean) ** 2))
    x0 = np.array([math.log(mean) - sigma0**2 / 2, sigma0])

    def residual(x: np.ndarray) -> np.ndarray:
        m, s = truncated_lognormal_moments(float(x[0]), float(x[1]), lo, hi)
        return np.array([(m - mean) / mean, (s - sd) / sd])

    fit = least_squares(residual, x0, bounds=([-10.0, 0.05], [10.0, 5.0]), xtol=1e-12, ftol=1e-12)
    if np.max(np.abs(fit.fun)) > 1e-4:
        raise ValueError(f"no lognormal truncated to [{lo}, {hi}] has mean {mean} and sd {sd}")
    return float(fit.x[0]), float(fit.x[1])


def sample_truncated_lognormal(rng: np.random.Generator, mean: float, sd: float, lo: float, hi: float,
                               n: int) -> np.ndarray:
    """``n`` draws with the given mean and sd on [lo, hi] (rejection of draws outside the range)."""
    mu, sigma = fit_truncated_lognormal(float(mean), float(sd), float(lo), float(hi))
    out = np.empty(0)
    while out.size < n:
        draw = rng.lognormal(mu, sigma, size=max(2 * (n - out.size), 8))
        out = np.concatenate([out, draw[(draw >= lo) & (draw <= hi)]])
    return out[:n]


def sample_lesion_volumes_ml(rng: np.random.Generator, n: int, volume_range_ml: tuple[float, float] = LESION_VOLUME_RANGE_ML) -> np.ndarray:
    return sample_truncated_lognormal(rng, *PAPER_LESION_VOLUME_ML, *volume_range_ml, n)


def sample_lesion_suv_max(rng: np.random.Generator, n: int) -> np.ndarray:
    return sample_truncated_lognormal(rng, *PAPER_LESION_SUV_MAX, *LESION_SUV_MAX_RANGE, n)


# --------------------------------------------------------------------------------------------------
# The cohort plan
# --------------------------------------------------------------------------------------------------
def _rng(seed: int, *indices: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), *(int(i) for i in indices)]))


_PURPOSE_PATIENT, _PURPOSE_STUDY, _PURPOSE_RENDER = 1, 2, 3


def study_layout(n_studies: int) -> list[tuple[int, int]]:
    """(patient index, study index) of each study: the last patients come back for a second scan.

    ``round(15 %)`` of the studies (at least one from 4 studies on) are follow-ups, each of a
    different patient; follow-ups are listed right after the patient's first study.
    """
    if n_studies < 1:
        raise ValueError(f"--cases must be >= 1, got {n_studies}")
    n_repeat = int(round(REPEAT_PATIENT_FRACTION * n_studies))
    if n_studies >= 4:
        n_repeat = max(n_repeat, 1)
    n_patients = n_studies - n_repeat
    repeaters = set(range(n_patients - n_repeat, n_patients))
    layout = []
    for p in range(n_patients):
        layout.append((p, 0))
        if p in repeaters:
            layout.append((p, 1))
    return layout


def _patient_anatomy(rng: np.random.Generator, bmi: float, height_m: float) -> PatientAnatomy:
    t = (bmi - 19.0) / (38.0 - 19.0)
    uptake = {k: float(v * rng.lognormal(0.0, 0.2)) for k, v in PSMA_UPTAKE_SUV.items()}
    uptake["bladder"] = float(PSMA_UPTAKE_SUV["bladder"] * rng.lognormal(0.0, 0.5))
    return PatientAnatomy(
        scale_lateral=float(np.clip(0.86 + 0.14 * t + rng.normal(0, 0.01), 0.85, 1.0)),
        scale_ap=float(np.clip(0.88 + 0.17 * t + rng.normal(0, 0.01), 0.86, 1.05)),
        scale_axial=float(np.clip(height_m / 1.76, 0.92, 1.08)),
        fat_mm=float(10.0 + 1.3 * (bmi - 19.0)),
        bladder_fill=float(rng.uniform(0.7, 1.25)),
        uptake=uptake,
    )


def plan_cohort(n_studies: int, seed: int, size: str = "default") -> list[StudySpec]:
    """The cohort's studies in order. Study 0 has a single lesion and study 1 three, so every
    cohort of two or more studies has both scenarios; every fourth study (ordinal 3, 7, ...) stores
    its lesions as DICOM SEG instead of RTSTRUCT."""
    if size not in SIZE_PRESETS:
        raise ValueError(f"unknown size {size!r}; choose from {sorted(SIZE_PRESETS)}")
    preset = SIZE_PRESETS[size]
    first_dates: dict[int, dt.date] = {}
    return [_study_spec(ordinal, p, k, seed, preset, first_dates)
            for ordinal, (p, k) in enumerate(study_layout(n_studies))]


def plan_heldout(n_heldout: int, n_studies: int, seed: int, size: str = "default") -> list[StudySpec]:
    """``n_heldout`` further studies of new patients, none of whom is in ``plan_cohort(n_studies, ...)``
    (first scans only, patient numbers after the cohort's): test studies a model trained on that
    cohort has never seen. Drawn exactly like the cohort's studies (same anatomy, uptake and lesion
    distributions); ordinals continue after the cohort's."""
    if n_heldout < 0:
        raise ValueError(f"the number of held-out studies must be >= 0, got {n_heldout}")
    if size not in SIZE_PRESETS:
        raise ValueError(f"unknown size {size!r}; choose from {sorted(SIZE_PRESETS)}")
    preset = SIZE_PRESETS[size]
    n_patients = len({p for p, _ in study_layout(n_studies)})
    first_dates: dict[int, dt.date] = {}
    return [_study_spec(n_studies + j, n_patients + j, 0, seed, preset, first_dates) for j in range(n_heldout)]


def _study_spec(ordinal: int, p: int, k: int, seed: int, preset: SizePreset,
                first_dates: dict[int, dt.date]) -> StudySpec:
    """Study ``k`` of patient ``p`` (the ``ordinal``-th study written)."""
    prng = _rng(seed, _PURPOSE_PATIENT, p)
    height = float(np.clip(prng.normal(1.76, 0.07), 1.60, 1.95))
    bmi = float(np.clip(prng.normal(27.0, 3.5), 19.0, 38.0))
    age = int(prng.integers(55, 81))
    anatomy = _patient_anatomy(prng, bmi, height)
    first_date = dt.date(2019, 1, 7) + dt.timedelta(days=int(prng.integers(0, 1400)))
    first_dates.setdefault(p, first_date)

    srng = _rng(seed, _PURPOSE_STUDY, p, k)
    study_date = first_date if k == 0 else first_date + dt.timedelta(days=int(srng.integers(90, 400)))
    weight = round(bmi * height**2 * (1.0 + (0.0 if k == 0 else srng.normal(0, 0.03))), 1)
    injection = dt.datetime.combine(study_date, dt.time(8, 0)) + dt.timedelta(seconds=int(srng.integers(0, 5 * 3600)))
    uptake_s = int(np.clip(srng.normal(120.0, 8.0), 100.0, 145.0) * 60)
    dose_bq = round(float(np.clip(srng.normal(330.0, 25.0), 250.0, 400.0)), 1) * 1e6
    shift = (float(srng.normal(0, 4)), float(srng.normal(0, 5)), float(srng.uniform(-900.0, -700.0)))

    if ordinal == 0:
        n_lesions = 1
    elif ordinal == 1:
        n_lesions = 3
    else:
        n_lesions = int(srng.choice(np.arange(1, 6), p=LESION_COUNT_PROBABILITIES))
    sites = list(LESION_SITE_PROBABILITIES)
    chosen = srng.choice(sites, size=n_lesions, p=list(LESION_SITE_PROBABILITIES.values()))
    volumes = sample_lesion_volumes_ml(srng, n_lesions, preset.lesion_volume_range_ml)
    suv_max = sample_lesion_suv_max(srng, n_lesions)
    lesions = []
    for site, vol, smax in zip(chosen, volumes, suv_max):
        hu = float(srng.uniform(450, 900)) if site == "bone" else float(srng.normal(38, 6))
        lesions.append(LesionSpec(str(site), round(float(vol), 3), round(float(smax), 2), round(hu, 1)))

    return StudySpec(
        ordinal=ordinal, patient_index=p, study_index=k,
        patient_id=f"PHANTOM-{p + 1:03d}", patient_name=f"Phantom^Patient{p + 1:03d}",
        birth_date=dt.date(first_date.year - age, 1 + p % 12, 1 + p % 28), age_years=age,
        height_m=round(height, 2), weight_kg=float(weight),
        injection_datetime=injection, series_datetime=injection + dt.timedelta(seconds=uptake_s),
        injected_dose_bq=dose_bq, half_life_s=F18_HALF_LIFE_S, tracer=TRACER,
        anatomy=replace(anatomy, table_shift_mm=shift), lesions=tuple(lesions),
        mask_format="SEG" if ordinal % 4 == 3 else "RTSTRUCT",
        render_entropy=(int(seed), _PURPOSE_RENDER, p, k),
    )
