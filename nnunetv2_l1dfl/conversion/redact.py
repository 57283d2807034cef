"""Keeping identifiers off the console and out of the logs of a pseudonymized conversion.

With ``--pseudonymize`` the dataset files carry pseudonyms only, but the messages of a run name
files, series and patients: a failure reason names the file and the DICOM tag, a skipped file its
path, a warning of pydicom the UID it did not like. While a :class:`Redactor` is active every line
that reaches the console (``sys.stdout``, ``sys.stderr``: prints, tqdm bars, ``warnings``) or a
logging handler goes through :meth:`Redactor.redact` first:

- any path under the input folder becomes ``<input>/.../<file name>`` (folder names under it may
  carry patient names);
- every identifier registered with :meth:`Redactor.add` (PatientID, PatientName, study and series
  keys, source folders; :class:`~nnunetv2_l1dfl.conversion.case_ids.PseudonymKey` registers each
  key it assigns) becomes its case ID or pseudonym, matched as a whole token, case-insensitively;
- anything shaped like a DICOM UID (five or more dot-separated numbers) becomes ``<UID>``.

Log records below WARNING are dropped (their detail, e.g. the ROI names used, is what the private
reports beside the pseudonym key are for). Spawned worker processes install the same redactor
(:func:`~nnunetv2_l1dfl.conversion.runner.convert_cases` passes it to them).
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TextIO

_UID = re.compile(r"(?<![\w.])\d+(?:\.\d+){4,}(?![\w.])")
_PATH_REST = r"(?:[/\\][^\s'\"<>|,;()\[\]]*)?"
_ACTIVE: list[Redactor] = []


class Redactor:
    """Replaces identifiers in text; see the module docstring. Picklable (sent to workers)."""

    def __init__(self, input_dirs: Iterable[Path | str] = ()) -> None:
        roots: set[str] = set()
        for folder in input_dirs:
            for variant in (str(folder), str(Path(folder).expanduser().resolve())):
                variant = variant.rstrip("/\\")
                if variant and variant not in (".", ".."):
                    roots.add(variant)
        self.input_dirs = sorted(roots, key=len, reverse=True)
        self.secrets: dict[str, str] = {}
        self._pattern: re.Pattern[str] | None = None
        self._installed: dict[str, Any] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"input_dirs": self.input_dirs, "secrets": self.secrets}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.input_dirs = state["input_dirs"]
        self.secrets = state["secrets"]
        self._pattern = None
        self._installed = {}

    def add(self, secret: Any, replacement: str) -> None:
        """Replace ``secret`` (and, for a DICOM person name, each of its ``^`` parts of three or more
        characters) by ``replacement`` wherever it appears as a whole token."""
        text = str(secret or "").strip()
        if len(text) < 2 or text == replacement:
            return
        variants = {text}
        if "^" in text:
            variants |= {part.strip() for part in text.split("^") if len(part.strip()) >= 3}
            variants.add(" ".join(p for p in text.split("^") if p))
        for variant in variants:
            self.secrets.setdefault(variant, replacement)
        self._pattern = None

    def _secret_pattern(self) -> re.Pattern[str] | None:
        if self._pattern is None and self.secrets:
            alternatives = "|".join(re.escape(s) for s in sorted(self.secrets, key=len, reverse=True))
            self._pattern = re.compile(rf"(?<![A-Za-z0-9])(?:{alternatives})(?![A-Za-z0-9])", re.IGNORECASE)
        return self._pattern

    def redact(self, text: str) -> str:
        if not text:
            return text
        for root in self.input_dirs:
            if root in text:
                text = re.sub(re.escape(root) + f"({_PATH_REST})", _shorten_path, text)
        pattern = self._secret_pattern()
        if pattern is not None:
            lowered = {k.lower(): v for k, v in self.secrets.items()}
            text = pattern.sub(lambda m: lowered.get(m.group(0).lower(), "<redacted>"), text)
        return _UID.sub("<UID>", text)

    # ------------------------------------------------------------------ console and logging

    def install(self) -> None:
        """Route this process's console and logging through :meth:`redact` (idempotent). When another
        redactor is active in this process (a worker that got a fresh copy with each case), its
        identifiers are merged into that one instead of stacking a second layer."""
        if self._installed:
            return
        current = active_redactor()
        if current is not None:
            current.input_dirs = sorted(set(current.input_dirs) | set(self.input_dirs), key=len, reverse=True)
            for secret, replacement in self.secrets.items():
                current.secrets.setdefault(secret, replacement)
            current._pattern = None
            return
        log_filter = _RedactFilter(self)
        handlers = [*logging.getLogger().handlers]
        if logging.lastResort is not None:
            handlers.append(logging.lastResort)
        for handler in handlers:
            handler.addFilter(log_filter)
        self._installed = {
            "stdout": sys.stdout,
            "stderr": sys.stderr,
            "filter": log_filter,
            "handlers": handlers,
        }
        sys.stdout = _RedactingStream(sys.stdout, self)
        sys.stderr = _RedactingStream(sys.stderr, self)
        _ACTIVE.append(self)

    def uninstall(self) -> None:
        if not self._installed:
            return
        sys.stdout, sys.stderr = self._installed["stdout"], self._installed["stderr"]
        for handler in self._installed["handlers"]:
            handler.removeFilter(self._installed["filter"])
        self._installed = {}
        if self in _ACTIVE:
            _ACTIVE.remove(self)

    @contextlib.contextmanager
    def active(self) -> Iterator[Redactor]:
        self.install()
        try:
            yield self
        finally:
            self.uninstall()


def _shorten_path(match: re.Match[str]) -> str:
    """``<input>/.../<file name>`` for a path under the input folder (``<input>`` for the folder)."""
    parts = [p for p in re.split(r"[/\\]", match.group(1)) if p]
    return "<input>" + (f"/.../{parts[-1]}" if parts else "")


def active_redactor() -> Redactor | None:
    """The redactor installed in this process, if any (a pseudonymized run)."""
    return _ACTIVE[-1] if _ACTIVE else None


def register_identifier(secret: Any, replacement: str) -> None:
    """Tell the active redactor (if any) about an identifier and what to show instead."""
    redactor = active_redactor()
    if redactor is not None:
        redactor.add(secret, replacement)


class _RedactFilter(logging.Filter):
    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self.redactor = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return False
        record.msg = self.redactor.redact(record.getMessage())
        record.args = None
        if record.exc_info:
            record.exc_text = self.redactor.redact(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        if record.stack_info:
            record.stack_info = self.redactor.redact(record.stack_info)
        return True


class _RedactingStream(io.TextIOBase):
    """A text stream that redacts what is written and passes it on."""

    def __init__(self, target: TextIO, redactor: Redactor) -> None:
        self._target = target
        self._redactor = redactor

    def write(self, text: str) -> int:
        self._target.write(self._redactor.redact(text))
        return len(text)

    def flush(self) -> None:
        self._target.flush()

    def isatty(self) -> bool:
        return self._target.isatty()

    def fileno(self) -> int:
        return self._target.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self._target, "encoding", "utf-8")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._target, name)
