"""Read a dermoscopy image instance into RGB pixels, its identity and its header.

Decisions (why):
- Three SOP classes are accepted (Dermoscopic Photography, VL Photographic, Secondary Capture):
  what a PACS routes to us for a skin lesion. Anything else is refused with a one-line reason,
  so a mis-routed CT or SR is reported, not scored.
- JPEG Baseline (and 8-bit JPEG Extended) frames are decoded by Pillow, exactly as
  ``PIL.Image.open(jpg).convert("RGB")`` decodes the source ``.jpg``: pydicom's default
  plugin for these syntaxes (pylibjpeg-libjpeg, tried before Pillow) upsamples chroma and
  converts YCbCr differently; all 352 HAM10000/ISIC 2020 images tried differed from Pillow
  (by up to 6 levels, in about one pixel value in five), so a DICOM would score differently
  from the same image scored as a ``.jpg``. Pillow here matched on all of them.
- Every other syntax is decoded by pydicom (native, deflate, RLE, JPEG Lossless via
  pylibjpeg-libjpeg, JPEG-LS via pyjpegls, JPEG 2000 via pylibjpeg-openjpeg), then converted to
  RGB: MONOCHROME1/2 replicated to three channels, YBR_FULL/YBR_FULL_422 converted with
  pydicom's PS3.3 C.7.6.3.1.2 equations, PALETTE COLOR through its LUT.
- Multi-frame instances: the first frame is used (a dermoscope's burst is the same lesion; the
  first frame is the one a viewer shows first).
- Only Bits Allocated 8 is accepted. 16-bit photographs are rare and rescaling them would feed
  the model an intensity distribution it was never trained on, so they are refused, not guessed.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from enum import StrEnum
from io import BytesIO

import numpy as np
import pydicom
from PIL import Image
from pydicom import Dataset, uid
from pydicom.encaps import get_frame
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, convert_color_space, pixel_array

from plugin.domain import ImageRef

__all__ = [
    "DECODABLE_SYNTAXES",
    "DermoscopyImage",
    "SopClass",
    "UnsupportedInstanceError",
    "image_from_dataset",
    "read_image",
]


class SopClass(StrEnum):
    """The image SOP classes the plugin scores."""

    DERMOSCOPIC_PHOTOGRAPHY = "1.2.840.10008.5.1.4.1.1.77.1.7"
    VL_PHOTOGRAPHIC = "1.2.840.10008.5.1.4.1.1.77.1.4"
    SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


# Third value of ImageType on dermfusion's own saliency Secondary Captures (dicom_io/capture.py):
# a router that sends them back must not get them scored as dermoscopy.
SALIENCY_IMAGE_TYPE = "SALIENCY"


class UnsupportedInstanceError(ValueError):
    """An instance we cannot score; the message is one line: the file, then the reason."""

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self.reason = reason
        super().__init__(" ".join(f"{name}: {reason}".split()))


_PILLOW_JPEG = (uid.JPEGBaseline8Bit, uid.JPEGExtended12Bit)
DECODABLE_SYNTAXES: frozenset[str] = frozenset(
    {
        uid.ExplicitVRLittleEndian,
        uid.ImplicitVRLittleEndian,
        uid.DeflatedExplicitVRLittleEndian,
        uid.RLELossless,
        *_PILLOW_JPEG,
        uid.JPEGLossless,
        uid.JPEGLosslessSV1,
        uid.JPEGLSLossless,
        uid.JPEGLSNearLossless,
        uid.JPEG2000Lossless,
        uid.JPEG2000,
    }
)
_PIXEL_TAGS = frozenset(
    {0x7FE00010, 0x7FE00008, 0x7FE00009}  # PixelData, FloatPixelData, DoubleFloatPixelData
)
_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
# Colour photometrics and what is needed to turn the decoded frame into RGB.
_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT")


@dataclass(frozen=True)
class DermoscopyImage:
    """RGB pixels (HxWx3 uint8), the instance's identity, and its header without pixel data."""

    rgb: np.ndarray
    ref: ImageRef
    dataset: Dataset


def read_image(path: str | os.PathLike[str]) -> DermoscopyImage:
    """Read a DICOM file; any reason it cannot be scored is an UnsupportedInstanceError."""
    name = str(path)
    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError as exc:
        detail = str(exc).split(". ")[0]  # drop pydicom's "Use force=True" hint
        raise UnsupportedInstanceError(name, f"not a DICOM file ({detail})") from exc
    except (EOFError, ValueError, KeyError, OverflowError) as exc:
        # pydicom's reader raises these on truncated or garbled files.
        raise UnsupportedInstanceError(name, f"not a readable DICOM file ({exc})") from exc
    return image_from_dataset(ds, name)


def image_from_dataset(ds: Dataset, name: str) -> DermoscopyImage:
    """Pixels, identity and header of an in-memory instance (e.g. one received by C-STORE)."""
    sop_class = str(ds.get("SOPClassUID", "") or _meta(ds, "MediaStorageSOPClassUID"))
    if sop_class not in {s.value for s in SopClass}:
        known = uid.UID(sop_class).name if sop_class else ""
        label = f" ({known})" if known and known != sop_class else ""
        raise UnsupportedInstanceError(
            name, f"SOP class {sop_class or '(none)'}{label} is not a dermoscopy image class"
        )
    if SALIENCY_IMAGE_TYPE in list(ds.get("ImageType", None) or []):
        raise UnsupportedInstanceError(
            name, "a dermfusion saliency map (our own output), not a dermoscopy image"
        )
    if "PixelData" not in ds:
        raise UnsupportedInstanceError(name, "no pixel data (7FE0,0010)")
    ref = _image_ref(ds, name, sop_class)
    rgb = _rgb(ds, name)
    return DermoscopyImage(rgb=rgb, ref=ref, dataset=_header(ds))


def _shown(value: object) -> str:
    """A header value as a reason may quote it: short printable text, else said malformed (a
    garbled value would put random bytes in the log)."""
    text = str(value) if value not in (None, "") else "(none)"
    if len(text) <= 16 and text.isascii() and text.isprintable():
        return text
    return "(malformed)"


def _meta(ds: Dataset, keyword: str) -> str:
    meta = getattr(ds, "file_meta", None)
    return str(meta.get(keyword, "")) if meta is not None else ""


def _image_ref(ds: Dataset, name: str, sop_class: str) -> ImageRef:
    uids = {}
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        value = str(ds.get(keyword, "") or "")
        if not value:
            raise UnsupportedInstanceError(name, f"{keyword} is missing")
        uids[keyword] = value
    return ImageRef(
        study_instance_uid=uids["StudyInstanceUID"],
        series_instance_uid=uids["SeriesInstanceUID"],
        sop_instance_uid=uids["SOPInstanceUID"],
        sop_class_uid=sop_class,
    )


def _header(ds: Dataset) -> Dataset:
    """A deep copy of everything but the pixel data (kept for demographics and the SR)."""
    header = Dataset()
    for elem in ds:
        if elem.tag not in _PIXEL_TAGS:
            header.add(copy.deepcopy(elem))
    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        header.file_meta = copy.deepcopy(meta)
    return header


def _rgb(ds: Dataset, name: str) -> np.ndarray:
    ts = uid.UID(_meta(ds, "TransferSyntaxUID"))
    if not ts:
        # A C-STORE handler must attach pynetdicom's event.file_meta; guessing would misread.
        raise UnsupportedInstanceError(name, "no Transfer Syntax UID (0002,0010) in file meta")
    if ts not in DECODABLE_SYNTAXES:
        raise UnsupportedInstanceError(
            name, f"transfer syntax {ts} ({ts.name}) is not decodable here"
        )
    bits = ds.get("BitsAllocated")
    if bits != 8:
        raise UnsupportedInstanceError(
            name, f"Bits Allocated {_shown(bits)} is not supported (8-bit images only)"
        )
    for keyword in ("Rows", "Columns"):
        if not ds.get(keyword):
            raise UnsupportedInstanceError(name, f"{keyword} is missing")
    photometric = str(ds.get("PhotometricInterpretation", ""))
    samples = ds.get("SamplesPerPixel")
    supported = (samples == 1 and photometric in (*_MONOCHROME, "PALETTE COLOR")) or (
        samples == 3 and photometric in _COLOUR
    )
    if not supported:
        raise UnsupportedInstanceError(
            name,
            f"Photometric Interpretation {_shown(photometric)} with "
            f"{_shown(samples)} samples per pixel is not supported",
        )
    try:
        if ts in _PILLOW_JPEG:
            frame = _pillow_jpeg_frame(ds, photometric)
        else:
            frame = _pydicom_frame(ds, photometric)
    except UnsupportedInstanceError:
        raise
    except (ValueError, RuntimeError, NotImplementedError, OSError) as exc:
        reason = " ".join(str(exc).split())
        raise UnsupportedInstanceError(
            name, f"pixel data in transfer syntax {ts.name} could not be decoded: {reason}"
        ) from exc
    if frame.shape[:2] != (ds.Rows, ds.Columns):
        raise UnsupportedInstanceError(
            name,
            f"decoded frame is {frame.shape[1]}x{frame.shape[0]}, "
            f"header says {ds.Columns}x{ds.Rows}",
        )
    return np.ascontiguousarray(frame, dtype=np.uint8)


def _pillow_jpeg_frame(ds: Dataset, photometric: str) -> np.ndarray:
    """First frame decoded by Pillow, matching ``Image.open(jpg).convert("RGB")``."""
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    data = get_frame(ds.PixelData, 0, number_of_frames=frames)
    image = Image.open(BytesIO(data), formats=["JPEG"])
    if image.mode == "CMYK" or image.mode not in ("L", "RGB"):
        raise ValueError(f"JPEG colour mode {image.mode} is not an RGB or greyscale photograph")
    if photometric == "RGB" and image.mode == "RGB" and not _marks_colour_space(image):
        # No JFIF/Adobe marker and the header says RGB: the components are R, G, B as stored,
        # so keep libjpeg from applying its default YCbCr->RGB transform.
        image.draft("YCbCr", image.size)
        return np.asarray(image)
    rgb = np.asarray(image.convert("RGB"))
    if photometric == "MONOCHROME1":
        rgb = 255 - rgb
    return rgb


def _marks_colour_space(image: Image.Image) -> bool:
    return "jfif" in image.info or "adobe" in image.info


def _pydicom_frame(ds: Dataset, photometric: str) -> np.ndarray:
    """First frame decoded by pydicom, then turned into RGB per the Photometric Interpretation."""
    frame = pixel_array(ds, index=0, as_rgb=False)
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(frame, ds)
        if rgb.dtype != np.uint8:
            # 16-bit LUT entries: the top byte is the 8-bit colour.
            depth = int(ds.RedPaletteColorLookupTableDescriptor[2])
            rgb = (rgb >> (depth - 8)) if depth > 8 else rgb
        return rgb.astype(np.uint8)
    if frame.ndim == 2:
        if photometric == "MONOCHROME1":
            frame = 255 - frame
        return np.repeat(frame[:, :, None], 3, axis=2)
    if photometric in ("YBR_FULL", "YBR_FULL_422"):
        # Native and RLE YBR data arrive as stored; pydicom returns 422 upsampled already.
        return convert_color_space(frame, "YBR_FULL", "RGB")
    # RGB, and YBR_RCT/YBR_ICT which the JPEG 2000 decoder already returns as RGB.
    return frame
