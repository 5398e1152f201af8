"""Build DICOM image instances from plain images (JPEG files or RGB arrays).

Used by the tests and the demo to make the studies a PACS would route to us. A JPEG file sent
as JPEG Baseline is encapsulated byte for byte, the way DCMTK ``img2dcm`` does, so the decoded
DICOM and the decoded ``.jpg`` are the same pixels; every other transfer syntax encodes the
decoded pixels with pydicom's encoders (RLE, JPEG 2000 via pylibjpeg-openjpeg, JPEG-LS via
pyjpegls), or with the small lossless JPEG encoder below, which pydicom lacks.
"""

from __future__ import annotations

import datetime as dt
import os
from io import BytesIO
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom import Dataset, uid
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence

from dicom_io.images import SopClass
from plugin.domain import SNOMED, SiteCode

__all__ = [
    "ENCODABLE_SYNTAXES",
    "MANUFACTURER",
    "dermoscopy_dataset",
    "jpeg_lossless",
    "write_dataset",
]

MANUFACTURER = "dermfusion"
_MODEL_NAME = "dermfusion encapsulate"
_SOFTWARE_VERSION = "1"

# What ``dermoscopy_dataset`` can write, and how.
_NATIVE = (
    uid.ExplicitVRLittleEndian,
    uid.ImplicitVRLittleEndian,
    uid.DeflatedExplicitVRLittleEndian,
)
_PYDICOM_ENCODED = (
    uid.RLELossless,
    uid.JPEG2000Lossless,
    uid.JPEG2000,
    uid.JPEGLSLossless,
)
_JPEG_LOSSLESS = (uid.JPEGLosslessSV1, uid.JPEGLossless)
ENCODABLE_SYNTAXES: tuple[str, ...] = (
    uid.JPEGBaseline8Bit,
    *_NATIVE,
    *_PYDICOM_ENCODED,
    *_JPEG_LOSSLESS,
)

_MODALITY = {
    SopClass.DERMOSCOPIC_PHOTOGRAPHY: "DMS",
    SopClass.VL_PHOTOGRAPHIC: "XC",
    SopClass.SECONDARY_CAPTURE: "OT",
}


def dermoscopy_dataset(
    source: str | os.PathLike[str] | np.ndarray,
    *,
    sop_class: SopClass = SopClass.DERMOSCOPIC_PHOTOGRAPHY,
    transfer_syntax: str = uid.JPEGBaseline8Bit,
    patient_id: str = "",
    patient_name: str = "",
    patient_age: str | None = None,
    patient_sex: str | None = None,
    birth_date: str | dt.date | None = None,
    study_date: str | dt.date | None = None,
    site: SiteCode | None = None,
    body_part: str | None = None,
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_instance_uid: str | None = None,
    accession_number: str = "",
    laterality: str | None = None,
    jpeg_quality: int = 95,
    j2k_compression_ratio: float = 10.0,
    jpeg_lossless_predictor: int = 6,
) -> Dataset:
    """One image as a DICOM instance of ``sop_class`` (a valid IOD: passes dciodvfy).

    ``source`` is a JPEG file (sent as JPEG Baseline its bytes are kept unchanged) or an
    HxWx3 / HxW uint8 array. ``transfer_syntax`` is one of ``ENCODABLE_SYNTAXES``;
    ``jpeg_lossless_predictor`` applies to JPEG Lossless process 14 (not SV1, which is 1).
    ``laterality`` is R or L where known. ``study_date`` defaults to today. Nothing
    identifying is invented: the patient attributes are empty unless given.
    """
    if transfer_syntax not in ENCODABLE_SYNTAXES:
        raise ValueError(f"cannot write transfer syntax {transfer_syntax}")
    sop_class = SopClass(sop_class)
    ts = uid.UID(transfer_syntax)
    jpeg_bytes: bytes | None = None
    if isinstance(source, np.ndarray):
        pixels = _check_pixels(source)
        source_lossy = False
    else:
        jpeg_bytes = Path(source).read_bytes()
        decoded = Image.open(BytesIO(jpeg_bytes), formats=["JPEG"])
        pixels = np.asarray(decoded.convert("L" if decoded.mode == "L" else "RGB"))
        source_lossy = True

    today = dt.date.today()
    study = _da(study_date) if study_date is not None else today.strftime("%Y%m%d")
    ds = Dataset()
    # SOP Common
    ds.SOPClassUID = str(sop_class)
    ds.SOPInstanceUID = sop_instance_uid or uid.generate_uid()
    ds.SpecificCharacterSet = "ISO_IR 192"
    # Patient
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = _da(birth_date) if birth_date is not None else ""
    ds.PatientSex = patient_sex or ""
    # General Study / Patient Study
    ds.StudyInstanceUID = study_uid or uid.generate_uid()
    ds.StudyDate = study
    ds.StudyTime = "000000"
    ds.ReferringPhysicianName = ""
    ds.StudyID = ""
    ds.AccessionNumber = accession_number
    if patient_age is not None:
        ds.PatientAge = patient_age
    # General Series
    ds.Modality = _MODALITY[sop_class]
    ds.SeriesInstanceUID = series_uid or uid.generate_uid()
    ds.SeriesNumber = 1
    if body_part:
        ds.BodyPartExamined = body_part
    if not laterality and not _unpaired(site, body_part):
        # Type 2C for paired (or unknown) structures unless Image Laterality is sent; empty
        # says "not known". It must be absent for an unpaired structure such as the back.
        ds.Laterality = ""
    # General Equipment (+ Enhanced General Equipment, type 1 for Dermoscopic Photography)
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = _MODEL_NAME
    ds.DeviceSerialNumber = "0"
    ds.SoftwareVersions = _SOFTWARE_VERSION
    # General Image / General Acquisition
    ds.InstanceNumber = 1
    ds.ContentDate = study
    ds.ContentTime = "000000"
    ds.AcquisitionDateTime = study + "000000"
    ds.PatientOrientation = ""
    ds.BurnedInAnnotation = "NO"
    if laterality:
        ds.ImageLaterality = laterality
    if site is not None:
        ds.AnatomicRegionSequence = Sequence([_code_item(site)])
    if sop_class is SopClass.SECONDARY_CAPTURE:
        ds.ConversionType = "WSD"
        ds.ImageType = ["DERIVED", "SECONDARY"]
    else:
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.AcquisitionContextSequence = Sequence()
    if sop_class is SopClass.DERMOSCOPIC_PHOTOGRAPHY:
        # Frame of Reference: dciodvfy (dicom3tools 2022) requires it for this IOD, and an
        # unrelated frame per image is what a handheld dermoscope has.
        ds.FrameOfReferenceUID = uid.generate_uid()
        ds.PositionReferenceIndicator = ""
        # Dermoscopic Image module: type 2 (empty = not known) except the one type 1 flag.
        ds.LightSourcePolarization = ""
        ds.EmitterColorTemperature = None
        ds.ContactMethod = ""
        ds.OpticalMagnificationFactor = None
        ds.RecognizableVisualFeatures = "NO"

    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ts
    if ts == uid.JPEGBaseline8Bit:
        if jpeg_bytes is None:
            buffer = BytesIO()
            Image.fromarray(pixels).save(buffer, format="JPEG", quality=jpeg_quality)
            jpeg_bytes = buffer.getvalue()
        _set_jpeg_baseline(ds, jpeg_bytes)
        return ds

    _set_native_pixels(ds, pixels)
    ds.file_meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian  # compress() starts from native
    lossy_method = "ISO_10918_1" if source_lossy else None
    if ts in _NATIVE:
        pass
    elif ts in _JPEG_LOSSLESS:
        predictor = 1 if ts == uid.JPEGLosslessSV1 else jpeg_lossless_predictor
        ds.PixelData = encapsulate([jpeg_lossless(pixels, predictor)])
        ds["PixelData"].VR = "OB"
    elif ts == uid.JPEG2000:
        if ds.SamplesPerPixel == 3:
            ds.PhotometricInterpretation = "YBR_ICT"  # PS3.5 8.2.4: colour J2K uses the MCT
        ds.compress(ts, j2k_cr=[j2k_compression_ratio], generate_instance_uid=False)
        lossy_method = "ISO_10918_1\\ISO_15444_1" if source_lossy else "ISO_15444_1"
        ds.LossyImageCompressionRatio = f"{j2k_compression_ratio:.1f}"
    else:
        if ts == uid.JPEG2000Lossless and ds.SamplesPerPixel == 3:
            ds.PhotometricInterpretation = "YBR_RCT"
        ds.compress(ts, generate_instance_uid=False)
    _set_lossy(ds, lossy_method)
    ds.file_meta.TransferSyntaxUID = ts
    return ds


def write_dataset(ds: Dataset, path: str | os.PathLike[str]) -> Path:
    """Write ``ds`` as a DICOM file (preamble, file meta made consistent with the dataset).

    pydicom 3's ``enforce_file_format=True`` is what ``write_like_original=False`` was.
    """
    out = Path(path)
    ds.save_as(out, enforce_file_format=True)
    return out


def jpeg_lossless(pixels: np.ndarray, predictor: int = 1) -> bytes:
    """Encode 8-bit pixels (HxW or HxWx3) as a JPEG Lossless process 14 codestream.

    pydicom has no encoder for JPEG Lossless; this is the whole of ITU T.81 Annex H that an
    8-bit, non-interleaved-sampling image needs: one scan, predictor ``predictor`` (1-7;
    1 is the SV1 transfer syntax), Huffman table K.3 (categories 0-11 cover 8-bit differences).
    """
    if pixels.dtype != np.uint8 or pixels.ndim not in (2, 3):
        raise ValueError("jpeg_lossless takes HxW or HxWxC uint8 arrays")
    if not 1 <= predictor <= 7:
        raise ValueError(f"predictor must be 1..7, not {predictor}")
    img = pixels if pixels.ndim == 3 else pixels[:, :, None]
    rows, cols, ncomp = img.shape
    x = img.astype(np.int32)
    ra = np.zeros_like(x)
    rb = np.zeros_like(x)
    rc = np.zeros_like(x)
    ra[:, 1:] = x[:, :-1]
    rb[1:, :] = x[:-1, :]
    rc[1:, 1:] = x[:-1, :-1]
    pred = {
        1: ra,
        2: rb,
        3: rc,
        4: ra + rb - rc,
        5: ra + ((rb - rc) >> 1),
        6: rb + ((ra - rc) >> 1),
        7: (ra + rb) >> 1,
    }[predictor].copy()
    pred[0, 1:] = x[0, :-1]  # first line: left neighbour
    pred[1:, 0] = x[:-1, 0]  # first column: the sample above
    pred[0, 0] = 1 << 7  # 2**(P-1)
    diff = (x - pred).ravel()  # within ±510 for 8-bit samples: no modulo needed
    magnitude = np.abs(diff)
    ssss = np.frexp(magnitude.astype(np.float64))[1].astype(np.int64)
    extra = np.where(diff < 0, diff + (1 << ssss) - 1, diff) & ((1 << ssss) - 1)
    lengths, codes = _huffman_codes(_K3_BITS)
    total_len = lengths[ssss] + ssss
    values = (codes[ssss] << ssss) | extra
    payload = _pack_bits(values.astype(np.uint64), total_len)

    header = bytearray(b"\xff\xd8")
    sof = bytes([8]) + rows.to_bytes(2, "big") + cols.to_bytes(2, "big") + bytes([ncomp])
    sof += b"".join(bytes([c + 1, 0x11, 0]) for c in range(ncomp))
    header += _segment(0xC3, sof)
    header += _segment(0xC4, bytes([0x00, *_K3_BITS, *range(12)]))
    sos = bytes([ncomp]) + b"".join(bytes([c + 1, 0x00]) for c in range(ncomp))
    sos += bytes([predictor, 0, 0])
    header += _segment(0xDA, sos)
    return bytes(header) + payload + b"\xff\xd9"


# ITU T.81 Table K.3 (luminance DC): number of codes of each length 1..16, symbols 0..11.
_K3_BITS = (0, 1, 5, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0)


def _huffman_codes(bits: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Canonical Huffman code lengths and codes for symbols 0..n-1 (T.81 Annex C)."""
    lengths: list[int] = []
    codes: list[int] = []
    code = 0
    for length, count in enumerate(bits, start=1):
        for _ in range(count):
            lengths.append(length)
            codes.append(code)
            code += 1
        code <<= 1
    return np.array(lengths, dtype=np.int64), np.array(codes, dtype=np.int64)


def _pack_bits(values: np.ndarray, lengths: np.ndarray) -> bytes:
    """Concatenate variable-length codes MSB first, pad with 1s, stuff 0x00 after each 0xFF."""
    ends = np.cumsum(lengths)
    total = int(ends[-1])
    owner = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
    shift = (ends[owner] - 1 - np.arange(total, dtype=np.int64)).astype(np.uint64)
    bits = ((values[owner] >> shift) & np.uint64(1)).astype(np.uint8)
    pad = (-total) % 8
    bits = np.concatenate([bits, np.ones(pad, dtype=np.uint8)])
    packed = np.packbits(bits)
    stuffed = np.insert(packed, np.flatnonzero(packed == 0xFF) + 1, 0)
    return stuffed.tobytes()


def _segment(marker: int, payload: bytes) -> bytes:
    return bytes([0xFF, marker]) + (len(payload) + 2).to_bytes(2, "big") + payload


# Unpaired structures, as SNOMED CT codes and BodyPartExamined terms: those that PS3.16 (and
# dciodvfy) know as unpaired. Others (e.g. Trunk) get an empty Laterality: valid, one warning.
_UNPAIRED_CODES = frozenset(
    {"77568009", "51185008", "113345001", "774007", "69536005", "45048000", "41695006"}
)
_UNPAIRED_BODY_PARTS = frozenset(
    {
        "BACK",
        "CHEST",
        "ABDOMEN",
        "CHESTABDOMEN",
        "HEAD",
        "HEADNECK",
        "NECK",
        "FACE",
        "SCALP",
        "SKULL",
        "NOSE",
        "MOUTH",
        "PENIS",
        "VULVA",
    }
)


def _unpaired(site: SiteCode | None, body_part: str | None) -> bool:
    known = []
    if site is not None:
        known.append(site.value in _UNPAIRED_CODES)
    if body_part:
        known.append(body_part.upper() in _UNPAIRED_BODY_PARTS)
    return bool(known) and all(known)


def _check_pixels(arr: np.ndarray) -> np.ndarray:
    if arr.dtype != np.uint8 or not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 3)):
        raise ValueError(f"expected HxWx3 or HxW uint8 pixels, got {arr.dtype} {arr.shape}")
    return np.ascontiguousarray(arr)


def _da(value: str | dt.date) -> str:
    return value.strftime("%Y%m%d") if isinstance(value, dt.date) else value


def _code_item(site: SiteCode) -> Dataset:
    item = Dataset()
    item.CodeValue = site.value
    item.CodingSchemeDesignator = site.scheme or SNOMED
    item.CodeMeaning = site.meaning
    return item


def _set_image_pixel(ds: Dataset, rows: int, cols: int, samples: int, photometric: str) -> None:
    ds.Rows = rows
    ds.Columns = cols
    ds.SamplesPerPixel = samples
    ds.PhotometricInterpretation = photometric
    if samples > 1:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0


def _set_native_pixels(ds: Dataset, pixels: np.ndarray) -> None:
    samples = 1 if pixels.ndim == 2 else 3
    _set_image_pixel(
        ds, pixels.shape[0], pixels.shape[1], samples, "RGB" if samples == 3 else "MONOCHROME2"
    )
    ds.PixelData = pixels.tobytes()
    ds["PixelData"].VR = "OB"


def _set_lossy(ds: Dataset, method: str | None) -> None:
    """Lossy Image Compression must say "01" once any lossy step touched the pixels."""
    if method is None:
        ds.LossyImageCompression = "00"
        return
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionMethod = method.split("\\")


def _set_jpeg_baseline(ds: Dataset, jpeg: bytes) -> None:
    """Encapsulate a baseline JPEG unchanged; Photometric Interpretation as the JPEG says."""
    info = jpeg_frame_info(jpeg)
    if info.process != 0xC0 or info.precision != 8:
        raise ValueError(
            f"not a baseline 8-bit JPEG (SOF{info.process - 0xC0}, {info.precision}-bit): "
            "pass the decoded pixels or pick a lossless transfer syntax"
        )
    if info.components == 1:
        photometric = "MONOCHROME2"
    elif info.components == 3 and info.adobe_transform == 0:
        photometric = "RGB"  # Adobe APP14 says the components are not colour transformed
    elif info.components == 3:
        # PS3.5 8.2.1: YBR_FULL_422 when chroma is subsampled (what img2dcm writes for
        # 4:2:0 and 4:2:2), YBR_FULL when it is not.
        photometric = "YBR_FULL_422" if info.subsampled else "YBR_FULL"
    else:
        raise ValueError(f"a JPEG with {info.components} components is not an image we write")
    _set_image_pixel(ds, info.rows, info.columns, info.components, photometric)
    ds.PixelData = encapsulate([jpeg])
    ds["PixelData"].VR = "OB"
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionMethod = "ISO_10918_1"
    ratio = info.rows * info.columns * info.components / len(jpeg)
    ds.LossyImageCompressionRatio = f"{ratio:.4g}"


class JpegFrameInfo:
    """What the JPEG markers say about a codestream (SOF type, size, sampling, APP14)."""

    def __init__(
        self,
        process: int,
        precision: int,
        rows: int,
        columns: int,
        components: int,
        subsampled: bool,
        adobe_transform: int | None,
    ) -> None:
        self.process = process
        self.precision = precision
        self.rows = rows
        self.columns = columns
        self.components = components
        self.subsampled = subsampled
        self.adobe_transform = adobe_transform


def jpeg_frame_info(data: bytes) -> JpegFrameInfo:
    """Walk the marker segments up to the first SOF (no decoding)."""
    if data[:2] != b"\xff\xd8":
        raise ValueError("not a JPEG codestream (no SOI marker)")
    pos = 2
    adobe: int | None = None
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            raise ValueError(f"corrupt JPEG: expected a marker at byte {pos}")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        body = data[pos + 4 : pos + 2 + length]
        if marker == 0xEE and body[:5] == b"Adobe" and len(body) >= 12:
            adobe = body[11]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            ncomp = body[5]
            factors = {body[6 + 3 * i + 1] for i in range(ncomp)}
            return JpegFrameInfo(
                process=marker,
                precision=body[0],
                rows=int.from_bytes(body[1:3], "big"),
                columns=int.from_bytes(body[3:5], "big"),
                components=ncomp,
                subsampled=len(factors) > 1,
                adobe_transform=adobe,
            )
        pos += 2 + length
    raise ValueError("corrupt JPEG: no SOF marker")
