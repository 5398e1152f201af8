"""What pydicom and highdicom say about a malformed header value reaches the log without it."""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Iterator

import pytest
from pydicom import Dataset, config

from dicom_io.redaction import RedactQuotedValues, keep_values_out_of_logs

MARKER = "Zqmarker"


@pytest.fixture
def root_stream() -> Iterator[io.StringIO]:
    """A root handler like `dermfusion`'s (basicConfig), removed afterwards with every setting
    keep_values_out_of_logs changes."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    before = config.settings.reading_validation_mode
    root.addHandler(handler)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        logging.captureWarnings(False)
        config.settings.reading_validation_mode = before


def test_a_library_record_keeps_its_words_not_the_value_it_quotes() -> None:
    record = logging.LogRecord(
        "pydicom.valuerep",
        logging.WARNING,
        __file__,
        1,
        "Invalid value for VR %s: %r.",
        ("DA", f"19{MARKER}01"),
        None,
    )
    assert RedactQuotedValues().filter(record)
    assert record.getMessage() == "Invalid value for VR DA: '…'."
    ours = logging.LogRecord(
        "dicom_io.sr", logging.WARNING, __file__, 1, "kept %r", ("as is",), None
    )
    RedactQuotedValues().filter(ours)
    assert ours.getMessage() == "kept 'as is'"


def test_a_malformed_value_read_leaves_no_trace_of_itself(root_stream: io.StringIO) -> None:
    keep_values_out_of_logs()
    ds = Dataset()
    ds.PatientName = "x"
    with config.disable_value_validation():
        ds.PatientBirthDate = f"{MARKER}"
    assert str(ds.PatientBirthDate) == MARKER  # read without complaint: validated where used
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn(f"copied PatientName '{MARKER}^Name' as is", UserWarning, stacklevel=1)
        logging.getLogger("highdicom.base").warning("value %r is unusual", MARKER)
    text = root_stream.getvalue()
    assert "copied PatientName '…' as is" in text
    assert "highdicom.base: value '…' is unusual" in text
    assert MARKER not in text


def test_a_library_record_that_cannot_be_formatted_is_still_logged_without_its_arguments() -> None:
    record = logging.LogRecord(
        "pydicom", logging.WARNING, __file__, 1, "value %s and %s", (f"'{MARKER}'",), None
    )
    assert RedactQuotedValues().filter(record)
    assert record.getMessage() == "value %s and %s (arguments not shown)"
