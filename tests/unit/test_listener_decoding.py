"""What the C-STORE handler decodes: the File Meta Information it encodes itself must be
pynetdicom's byte for byte, and its scan of the checked elements must read what pydicom reads,
or leave the data set to pydicom (malformed data sets included: a seeded mutation run)."""

from __future__ import annotations

import random
import warnings
import zlib
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom import Dataset
from pydicom.filereader import read_dataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
)
from pynetdicom.dsutils import create_file_meta, encode_file_meta

import dicom_io.listener as listener
from tests.conftest import SAMPLES

DMS = "1.2.840.10008.5.1.4.1.1.77.1.7"
_STRUCTURAL = (
    b"\xfe\xff\x00\xe0",  # item tag
    b"\xfe\xff\x0d\xe0\x00\x00\x00\x00",  # item delimiter
    b"\xfe\xff\xdd\xe0\x00\x00\x00\x00",  # sequence delimiter
    b"\xff\xff\xff\xff",  # undefined length
)


def _pydicom_reading(stream: bytes, syntax: UID) -> tuple[dict[str, str], int, int, int]:
    """The handler's reading before the scan: pydicom's reader, the same conversions."""
    if syntax.is_deflated:
        stream = zlib.decompress(stream, -zlib.MAX_WBITS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = read_dataset(
            BytesIO(stream),
            syntax.is_implicit_VR,
            syntax.is_little_endian,
            stop_when=listener._past_checked_elements,
            specific_tags=list(listener._READ_TAGS),
        )
        uids = {k: str(ds.get(k, "") or "").strip() for k in listener._UID_KEYWORDS}
        rows, columns = (int(ds.get(k) or 0) for k in ("Rows", "Columns"))
        return uids, rows, columns, int(ds.get("NumberOfFrames") or 1)


def _stream(ds: Dataset, syntax: str) -> bytes:
    """``ds`` encoded in ``syntax`` as a C-STORE data set (no preamble or file meta)."""
    ds.file_meta.TransferSyntaxUID = syntax
    buffer = BytesIO()
    pydicom.dcmwrite(
        buffer,
        ds,
        enforce_file_format=True,
        implicit_vr=syntax == ImplicitVRLittleEndian,
        little_endian=True,
    )
    stream = BytesIO(buffer.getvalue())
    pydicom.filereader.read_preamble(stream, False)
    pydicom.filereader._read_file_meta_info(stream)
    return stream.read()


def _with_nested_sequences(path: Path, undefined_length: bool) -> Dataset:
    ds = pydicom.dcmread(path)
    inner = Dataset()
    inner.CodeValue, inner.CodingSchemeDesignator, inner.CodeMeaning = "1", "99X", "inner"
    outer = Dataset()
    outer.CodeValue, outer.CodingSchemeDesignator, outer.CodeMeaning = "2", "99X", "outer"
    outer.AnatomicRegionModifierSequence = Sequence([inner, inner])
    ds.AnatomicRegionSequence = Sequence([outer])
    for elem in (ds["AnatomicRegionSequence"], outer["AnatomicRegionModifierSequence"]):
        elem.is_undefined_length = undefined_length
    ds.NumberOfFrames = 1
    return ds


@pytest.mark.parametrize(
    ("sop_instance", "syntax"),
    [("1.2.3.45", JPEGBaseline8Bit), ("1.2.3.4", ImplicitVRLittleEndian)],
    ids=["odd-uid", "even-uid"],
)
def test_the_file_meta_is_pynetdicoms_byte_for_byte(sop_instance: str, syntax: str) -> None:
    expected = (
        b"\0" * 128
        + b"DICM"
        + encode_file_meta(
            create_file_meta(
                sop_class_uid=UID(DMS),
                sop_instance_uid=UID(sop_instance),
                transfer_syntax=UID(syntax),
            )
        )
    )
    assert listener.part10_header(DMS, sop_instance, syntax) == expected


def _cases() -> list[tuple[str, bytes, UID]]:
    cases = []
    for path in (SAMPLES / "dms_jpeg_baseline.dcm", SAMPLES / "vlp_img2dcm.dcm"):
        for undefined in (False, True):
            ds = _with_nested_sequences(path, undefined)
            del ds.PixelData  # native syntaxes below: only the header elements matter here
            for syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
                name = f"{path.stem}-{syntax.name}-{'undefined' if undefined else 'defined'}"
                cases.append((name, _stream(ds, syntax), UID(syntax)))
        ds = pydicom.dcmread(path)
        cases.append((f"{path.stem}-as-sent", _stream(ds, JPEGBaseline8Bit), UID(JPEGBaseline8Bit)))
    return cases


@pytest.mark.parametrize(("name", "stream", "syntax"), _cases(), ids=lambda v: str(v)[:40])
def test_the_scan_reads_what_pydicom_reads(name: str, stream: bytes, syntax: UID) -> None:
    assert listener._scan(stream, syntax.is_implicit_VR) is not None  # the fast path is taken
    expected = _pydicom_reading(stream, syntax)
    assert listener._checked_elements(stream, syntax, 1 << 30) == expected


def test_a_deflated_data_set_is_inflated_within_the_limit() -> None:
    ds = pydicom.dcmread(SAMPLES / "dms_jpeg_baseline.dcm")
    del ds.PixelData
    plain = _stream(ds, ExplicitVRLittleEndian)
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    deflated = deflater.compress(plain) + deflater.flush()
    syntax = UID(DeflatedExplicitVRLittleEndian)
    assert listener._checked_elements(deflated, syntax, 1 << 30) == _pydicom_reading(
        deflated, syntax
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom: end of data within an element
        uids, *_ = listener._checked_elements(deflated, syntax, 40)
    assert not any(uids.values())  # inflating stopped at the limit, before the UIDs


def test_an_undefined_length_un_element_is_left_to_pydicom() -> None:
    ds = pydicom.dcmread(SAMPLES / "dms_jpeg_baseline.dcm")
    del ds.PixelData
    stream = bytearray(_stream(ds, ExplicitVRLittleEndian))
    # an undefined-length UN (implicit VR items inside), placed before the checked elements
    item = b"\xfe\xff\x00\xe0\xff\xff\xff\xff\xfe\xff\x0d\xe0\x00\x00\x00\x00"
    un = b"\x07\x00\x10\x00UN\x00\x00\xff\xff\xff\xff" + item + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    first = stream.index(b"\x08\x00\x16\x00")  # (0008,0016) SOP Class UID
    stream[first:first] = un
    assert listener._scan(bytes(stream), False) is None


def test_mutated_data_sets_are_read_as_pydicom_reads_them_or_left_to_it() -> None:
    rng = random.Random(21)
    originals = [(stream, syntax) for _, stream, syntax in _cases()]
    scanned = 0
    for _ in range(4000):
        stream, syntax = rng.choice(originals)
        mutated = bytearray(stream)
        for _ in range(rng.randint(1, 4)):
            mutated[rng.randrange(min(len(mutated), 2500))] = rng.randrange(256)
        if rng.random() < 0.2:
            del mutated[rng.randrange(1, len(mutated)) :]
        if rng.random() < 0.2:  # an item, a delimiter or an undefined length where none was
            at = rng.randrange(len(mutated))
            mutated[at:at] = rng.choice(_STRUCTURAL)
        found = listener._scan(bytes(mutated), syntax.is_implicit_VR)
        if found is None:
            continue  # pydicom reads it, as before: same answer, same errors
        scanned += 1
        assert found == _pydicom_reading(bytes(mutated), syntax)
    assert scanned > 500  # most mutations leave the checked elements readable
