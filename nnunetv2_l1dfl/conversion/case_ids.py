"""Case IDs for nnU-Net: sanitized patient IDs with study dates, or random pseudonyms with a key file.

:func:`assign_case_ids` turns :class:`CaseKey` (patient, study date, discriminator) into unique,
deterministic, nnU-Net-safe IDs; :class:`PseudonymKey` replaces patient IDs by random pseudonyms and
keeps the link in a CSV outside the dataset.
"""

from __future__ import annotations

import csv
import datetime as _dt
import hashlib
import os
import re
import secrets
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from nnunetv2_l1dfl.conversion.errors import ConversionError

_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9-]+")
_MAX_PART_LENGTH = 48


def short_hash(text: str, n: int = 6) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:n]


def sanitize_id_part(text: str, fallback: str = "x") -> str:
    """One part of a case ID, made safe for nnU-Net and every file system.

    Keeps ASCII letters, digits and ``-``; every other run of characters (path separators, spaces,
    underscores, dots, accents stripped to ASCII first) becomes one ``-``. Underscores are reserved
    for joining parts, so no part can fake nnU-Net's ``_XXXX`` channel suffix. Parts longer than 48
    characters are cut and get a 6-character hash of the full text, so two long IDs stay distinct.
    Empty results become ``fallback``.
    """
    ascii_text = unicodedata.normalize("NFKD", str(text)).encode("ascii", "ignore").decode("ascii")
    part = _UNSAFE_CHARS.sub("-", ascii_text).strip("-")
    if len(part) > _MAX_PART_LENGTH:
        part = part[: _MAX_PART_LENGTH - 7].rstrip("-") + "-" + short_hash(str(text))
    return part or fallback


_DATE_FORMATS = ("%Y%m%d", "%Y-%m-%d", "%m-%d-%Y", "%Y.%m.%d", "%d.%m.%Y")


def normalize_study_date(text: str | None) -> str:
    """``YYYYMMDD`` from a DICOM date, ISO date or TCIA's ``MM-DD-YYYY``; ``""`` if unparsable.

    Only the leading date is read, so TCIA study folder names such as
    ``"08-12-2002-NA-PET-CT Ganzkoerper  primaer mit KM-10445"`` work.
    """
    if not text:
        return ""
    text = str(text).strip()
    for fmt in _DATE_FORMATS:
        width = len(_dt.datetime(2000, 1, 1).strftime(fmt))
        try:
            return _dt.datetime.strptime(text[:width], fmt).strftime("%Y%m%d")
        except ValueError:
            continue
    return ""


@dataclass(frozen=True)
class CaseKey:
    """What identifies one case before it has a case ID.

    patient_id: the raw patient identifier (any characters).
    study_date: a date :func:`normalize_study_date` understands, or ``None`` for sources without
        dates (the case ID then has no date part).
    discriminator: tells apart studies of one patient on one day (a StudyInstanceUID, PET series
        UID or folder name); also used to order such studies deterministically.
    prefix: an optional leading part, e.g. the tracer (``fdg``/``psma``) of autoPET.
    """

    patient_id: str
    study_date: str | None = None
    discriminator: str = ""
    prefix: str = ""


def _join_id(parts: Sequence[str]) -> str:
    case_id = "_".join(p for p in parts if p)
    # A last part of exactly four digits would read as a channel suffix: join it with "-".
    return re.sub(r"_(\d{4})$", r"-\1", case_id)


def assign_case_ids(keys: Iterable[CaseKey]) -> dict[CaseKey, str]:
    """Deterministic, unique, nnU-Net-safe case IDs: ``[prefix_]patient[_YYYYMMDD][-n]``.

    - Each part goes through :func:`sanitize_id_part`.
    - Two different raw patient IDs that sanitize alike (``"A/B"`` and ``"A B"``) both get a
      6-character hash of their raw ID appended, so neither depends on the other's presence order.
    - Every dated study carries its date (``nodate`` when unreadable), so a patient's IDs do not
      change when a later study is added; studies of one patient on one day get ``-1``, ``-2``, ...
      in the order of their discriminator.
    """
    keys = list(dict.fromkeys(keys))
    raw_by_part: dict[tuple[str, str], set[str]] = {}
    for key in keys:
        raw_by_part.setdefault((key.prefix, sanitize_id_part(key.patient_id, "patient")), set()).add(
            key.patient_id
        )

    def patient_part(key: CaseKey) -> str:
        part = sanitize_id_part(key.patient_id, "patient")
        if len(raw_by_part[(key.prefix, part)]) > 1:
            part = f"{part}-{short_hash(key.patient_id)}"
        return part

    bases: dict[CaseKey, str] = {}
    for key in keys:
        parts = [sanitize_id_part(key.prefix) if key.prefix else "", patient_part(key)]
        if key.study_date is not None:
            parts.append(normalize_study_date(key.study_date) or "nodate")
        bases[key] = _join_id(parts)
    by_base: dict[str, list[CaseKey]] = {}
    for key, base in bases.items():
        by_base.setdefault(base, []).append(key)
    case_ids = {}
    for base, group in by_base.items():
        if len(group) == 1:
            case_ids[group[0]] = base
            continue
        for n, key in enumerate(sorted(group, key=lambda k: (k.discriminator, k.patient_id)), start=1):
            case_ids[key] = f"{base}-{n}"
    return case_ids


class PseudonymKey:
    """Pseudonymous case IDs with their key kept in a CSV outside the dataset.

    Patient IDs are protected health information. Each patient gets a random pseudonym
    (``P`` + 10 hex digits; random rather than a hash of the ID, because a plain hash of a short
    medical record number is reversed by hashing every candidate number) and each of their studies
    an ordinal: ``P3f9a0c21de_s1``, ``_s2``, ... in study-date order. Dates are left out of the IDs.

    The key CSV (columns ``case_id, pseudonym, patient_id, study_date, discriminator, source``)
    is the only link back to the patient: keep it out of the dataset and away from whoever receives
    the dataset. Re-runs read it and reuse every pseudonym, so resuming a conversion keeps its IDs.
    """

    COLUMNS = ("case_id", "pseudonym", "patient_id", "study_date", "discriminator", "source")

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.rows: list[dict[str, str]] = []
        if self.path.is_file():
            with self.path.open(newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                missing = set(self.COLUMNS) - set(reader.fieldnames or ())
                if missing:
                    raise ConversionError(f"pseudonym key {self.path}: missing columns {sorted(missing)}")
                self.rows = [dict(row) for row in reader]

    def assign(
        self, keys: Iterable[CaseKey], sources: Mapping[CaseKey, str] | None = None
    ) -> dict[CaseKey, str]:
        """Case IDs for ``keys``, reusing the key file's entries and adding new ones."""
        sources = sources or {}
        existing = {(r["patient_id"], r["discriminator"]): r["case_id"] for r in self.rows}
        pseudonyms = {r["patient_id"]: r["pseudonym"] for r in self.rows}
        used = {r["pseudonym"] for r in self.rows}
        n_studies: dict[str, int] = {}
        for r in self.rows:
            match = re.search(r"_s(\d+)$", r["case_id"])
            n_studies[r["patient_id"]] = max(
                n_studies.get(r["patient_id"], 0), int(match.group(1)) if match else 0
            )
        result = {}
        new_keys = sorted(
            dict.fromkeys(keys),
            key=lambda k: (k.patient_id, normalize_study_date(k.study_date), k.discriminator),
        )
        for key in new_keys:
            if (key.patient_id, key.discriminator) in existing:
                result[key] = existing[(key.patient_id, key.discriminator)]
                continue
            if key.patient_id not in pseudonyms:
                pseudonym = "P" + secrets.token_hex(5)
                while pseudonym in used:
                    pseudonym = "P" + secrets.token_hex(5)
                pseudonyms[key.patient_id] = pseudonym
                used.add(pseudonym)
            n_studies[key.patient_id] = n_studies.get(key.patient_id, 0) + 1
            case_id = f"{pseudonyms[key.patient_id]}_s{n_studies[key.patient_id]}"
            result[key] = case_id
            existing[(key.patient_id, key.discriminator)] = case_id
            self.rows.append(
                {
                    "case_id": case_id,
                    "pseudonym": pseudonyms[key.patient_id],
                    "patient_id": key.patient_id,
                    "study_date": normalize_study_date(key.study_date),
                    "discriminator": key.discriminator,
                    "source": sources.get(key, ""),
                }
            )
        self._register_identifiers()
        return result

    def _register_identifiers(self) -> None:
        """In a pseudonymized run, tell the console redactor (:mod:`.redact`) which identifiers to hide:
        each patient ID (shown as its pseudonym), the parts of each discriminator (UIDs, folder
        names) and source (shown as the case ID)."""
        from nnunetv2_l1dfl.conversion.redact import register_identifier

        for row in self.rows:
            register_identifier(row["patient_id"], row["pseudonym"])
            for part in re.split(r"[/\\]", row.get("discriminator", "")) + [row.get("source", "")]:
                register_identifier(part, row["case_id"])

    def pseudonym_of_case(self, case_id: str) -> str:
        for r in self.rows:
            if r["case_id"] == case_id:
                return r["pseudonym"]
        raise KeyError(case_id)

    def save(self) -> None:
        """Write the key atomically (flushed to disk, then renamed), readable by its owner only. On
        failure (a full disk) the temporary file is removed and the old key is left as it was."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            with open(
                os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w", newline="", encoding="utf-8"
            ) as f:
                writer = csv.DictWriter(f, fieldnames=self.COLUMNS)
                writer.writeheader()
                writer.writerows(self.rows)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
            raise

