"""Header values stay out of the log, whatever the DICOM libraries say about them.

pydicom warns (and logs) when a value read does not fit its VR, quoting it (``Invalid value for
VR DA: '1970XX01'``); highdicom warns with the values it copies; Python prints warnings on
stderr. A malformed PatientName or birth date would end up in the log, once per read. So
pydicom does not validate on read (dermfusion checks the values it uses where it uses them:
dicom_io.demographics, dicom_io.sr.copyable_header, naming the attribute, never the value),
warnings go through logging, and every record from these libraries has its quoted text and its
traceback removed.
"""

from __future__ import annotations

import logging
import re

from pydicom import config

# Loggers whose messages may quote a header value (py.warnings: warnings.warn from any of them).
LIBRARY_LOGGERS = frozenset({"pydicom", "highdicom", "pynetdicom", "py.warnings"})
_QUOTED = re.compile(r"'[^'\n]*'|\"[^\"\n]*\"")


class RedactQuotedValues(logging.Filter):
    """On a handler: a library's record keeps its words, not what it quotes."""

    def filter(self, record: logging.LogRecord) -> bool:
        if any(record.name == n or record.name.startswith(f"{n}.") for n in LIBRARY_LOGGERS):
            try:
                text = record.getMessage()
            except Exception:  # noqa: BLE001 - a filter that raises would break the caller
                text = f"{record.msg!s:.80} (arguments not shown)"
            record.msg = _QUOTED.sub("'…'", text)
            record.args = None
            record.exc_info = None  # a traceback's last line quotes the exception's text
            record.exc_text = None
        return True


def keep_values_out_of_logs() -> None:
    """For a process that logs: no validation on read, warnings logged, library records
    redacted on every handler of the root logger (call after logging is configured)."""
    config.settings.reading_validation_mode = config.IGNORE
    # Off, then on: captureWarnings(True) does nothing when an earlier call left it on, even if
    # warnings.showwarning has since been replaced (by a test harness, say).
    logging.captureWarnings(False)
    logging.captureWarnings(True)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactQuotedValues) for f in handler.filters):
            handler.addFilter(RedactQuotedValues())
