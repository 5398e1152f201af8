"""Hostile and broken dermoscopy instances for the fuzzing test and its benchmark.

Each case starts from a good instance (a shipped sample JPEG, fresh UIDs) and breaks it one way,
drawn from a seeded generator: header values of the wrong kind or random bytes, absurd or zero
image sizes, the wrong photometric interpretation, multi-frame and 16-bit claims, truncated or
missing pixel data, a giant private element. Sent through a real association; what the service
must do is answer each with a clear status and bring every instance it accepted to an end.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pydicom import Dataset
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag
from pydicom.uid import JPEGBaseline8Bit, generate_uid

from dicom_io.encapsulate import dermoscopy_dataset
from plugin.domain import SiteCode

# Elements whose raw bytes a mutation may replace (never the UIDs the listener keys on: those
# have their own cases and statuses).
_HEADER_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "PatientAge",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "Modality",
    "Manufacturer",
    "ImageType",
    "BodyPartExamined",
    "SpecificCharacterSet",
    "BurnedInAnnotation",
    "PhotometricInterpretation",
    "SamplesPerPixel",
    "PlanarConfiguration",
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "LossyImageCompression",
)


@dataclass(frozen=True)
class FuzzCase:
    name: str
    dataset: Dataset


def _raw(ds: Dataset, keyword: str, value: bytes, vr: str | None = None) -> None:
    tag = Tag(keyword)
    element = ds[keyword] if keyword in ds else None  # noqa: SIM401 - the element, not its value
    chosen_vr = vr or (element.VR if element is not None else "UN")
    ds[tag] = RawDataElement(tag, chosen_vr, len(value), value, 0, False, True)  # type: ignore[assignment]


def _random_bytes(rng: random.Random, low: int = 1, high: int = 40) -> bytes:
    length = rng.randint(low, high)
    return bytes(rng.getrandbits(8) for _ in range(length + length % 2))


def _garbage_value(ds: Dataset, rng: random.Random) -> str:
    keyword = rng.choice(_HEADER_KEYWORDS)
    _raw(ds, keyword, _random_bytes(rng))
    return f"random bytes in {keyword}"


def _wrong_vr(ds: Dataset, rng: random.Random) -> str:
    keyword = rng.choice(_HEADER_KEYWORDS)
    vr = rng.choice(["US", "FD", "SQ", "OB", "DA", "PN", "UN"])
    _raw(ds, keyword, _random_bytes(rng, 2, 16), vr)
    return f"{keyword} as {vr}"


def _absurd_size(ds: Dataset, rng: random.Random) -> str:
    ds.Rows = rng.choice([0, 1, 3, 65535])
    ds.Columns = rng.choice([0, 1, 5, 65535])
    return f"Rows x Columns {ds.Rows} x {ds.Columns}"


def _wrong_photometric(ds: Dataset, rng: random.Random) -> str:
    ds.PhotometricInterpretation = rng.choice(
        ["MONOCHROME2", "PALETTE COLOR", "YBR_FULL_422", "CMYK", "HSV", ""]
    )
    ds.SamplesPerPixel = rng.choice([1, 3, 4])
    return f"{ds.PhotometricInterpretation or 'empty'} with {ds.SamplesPerPixel} samples"


def _multi_frame(ds: Dataset, rng: random.Random) -> str:
    ds.NumberOfFrames = rng.choice([0, 2, 7, 1000])
    return f"NumberOfFrames {ds.NumberOfFrames} with one frame"


def _sixteen_bit(ds: Dataset, rng: random.Random) -> str:
    ds.BitsAllocated = 16
    ds.BitsStored = rng.choice([12, 16])
    ds.HighBit = ds.BitsStored - 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.SamplesPerPixel = 1
    return "16-bit grey claimed"


def _truncated_pixels(ds: Dataset, rng: random.Random) -> str:
    if "PixelData" not in ds:
        return "no pixel data to cut"
    data = bytes(ds.PixelData)
    cut = rng.randint(1, max(1, len(data) - 1))
    ds.PixelData = data[: cut + cut % 2]
    return f"pixel data cut at {cut} of {len(data)} bytes"


def _no_pixels(ds: Dataset, rng: random.Random) -> str:
    if "PixelData" in ds:
        del ds.PixelData
    return "no pixel data"


def _giant_private(ds: Dataset, rng: random.Random) -> str:
    size = rng.choice([1, 4, 16]) * 1024 * 1024
    ds.add_new(0x00090010, "LO", "DERMFUZZ")  # private creator of block 0x10
    ds.add_new(0x00091001, "OB", b"\x00" * size)
    return f"private element of {size // 1024 // 1024} MiB"


def _bad_dates_and_names(ds: Dataset, rng: random.Random) -> str:
    ds.PatientBirthDate = rng.choice(["19700230", "1970XX01", "0", "99999999"])
    ds.StudyDate = rng.choice(["2024XX16", "20241340", ""])
    ds.PatientName = rng.choice(["Fuzz\r\nName", "Single", "A^B^C^D^E^F", "\x00\x01"])
    ds.PatientSex = rng.choice(["X", "male", "?", ""])
    return "malformed dates, name and sex"


MUTATIONS: tuple[Callable[[Dataset, random.Random], str], ...] = (
    _garbage_value,
    _garbage_value,
    _wrong_vr,
    _absurd_size,
    _wrong_photometric,
    _multi_frame,
    _sixteen_bit,
    _truncated_pixels,
    _no_pixels,
    _giant_private,
    _bad_dates_and_names,
)


def _good(samples: Path, rng: random.Random) -> Dataset:
    jpeg = rng.choice(sorted(samples.glob("ISIC_*.jpg")))
    return dermoscopy_dataset(
        jpeg,
        transfer_syntax=JPEGBaseline8Bit,
        patient_id="FUZZ-1",
        patient_name="Fuzz^Case",
        patient_age="040Y",
        patient_sex="M",
        study_date="20240116",
        site=SiteCode("22943007", "Trunk"),
        study_uid=generate_uid(),
    )


def fuzz_cases(samples: Path, count: int, seed: int) -> Iterator[FuzzCase]:
    """``count`` broken instances, each its own study, one or two mutations each."""
    rng = random.Random(seed)
    for index in range(count):
        ds = _good(samples, rng)
        said = []
        for _ in range(rng.choice([1, 1, 2])):
            mutation = rng.choice(MUTATIONS)
            try:
                said.append(mutation(ds, rng))
            except Exception:  # noqa: BLE001 - an earlier mutation broke what this one sets
                said.append(f"{mutation.__name__.strip('_')} not applicable")
        yield FuzzCase(f"{index}: {'; '.join(said)}", ds)


# Below DIMSE: what a broken or hostile peer sends on the TCP connection itself.
_PDU_TYPES = (0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x00, 0x08, 0xFF)


@dataclass(frozen=True)
class StreamCase:
    """Bytes written on a fresh connection (``after_association``: on an established one)."""

    name: str
    payload: bytes
    after_association: bool = False


def stream_cases(count: int, seed: int) -> Iterator[StreamCase]:
    """Random bytes, PDU headers whose length lies (up to 4 GiB claimed), truncated PDUs and
    PDUs of the wrong type for the state, before and inside an association."""
    rng = random.Random(seed)
    for index in range(count):
        kind = index % 5
        pdu_type = rng.choice(_PDU_TYPES)
        if kind == 0:
            yield StreamCase(f"{index}-random", _random_bytes(rng, 1, 4096))
        elif kind == 1:
            claimed = rng.choice((0xFFFFFFFF, 0x7FFFFFFF, 1 << 24, rng.randrange(1, 1 << 16)))
            header = bytes([pdu_type, 0]) + claimed.to_bytes(4, "big")
            yield StreamCase(f"{index}-lying-length-{pdu_type:02x}", header + _random_bytes(rng))
        elif kind == 2:
            # An A-ASSOCIATE-RQ cut short: protocol version, AE titles, then nothing.
            body = b"\x00\x01\x00\x00" + b"DERMFUSION".ljust(16) + b"FUZZER".ljust(16)
            header = b"\x01\x00" + (len(body) + 200).to_bytes(4, "big")
            yield StreamCase(f"{index}-truncated-rq", header + body[: rng.randrange(1, len(body))])
        elif kind == 3:
            payload = bytes([pdu_type, 0]) + rng.randrange(0, 1 << 16).to_bytes(4, "big")
            name = f"{index}-inside-{pdu_type:02x}"
            yield StreamCase(name, payload + _random_bytes(rng), after_association=True)
        else:
            # A P-DATA-TF claiming a large PDV that never comes: the peer then hangs up.
            body = (1 << 20).to_bytes(4, "big") + b"\x01\x00" + _random_bytes(rng, 1, 64)
            header = b"\x04\x00" + (len(body) + (1 << 20)).to_bytes(4, "big")
            yield StreamCase(f"{index}-truncated-pdata", header + body, after_association=True)
