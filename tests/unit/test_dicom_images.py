"""dicom_io.images and dicom_io.encapsulate on real images: every transfer syntax round-trips,
JPEG Baseline decodes exactly as Pillow decodes the source .jpg, third-party (DCMTK) files
read back, anything we cannot score is refused with a one-line reason, and what we write
passes dciodvfy."""

from __future__ import annotations

import subprocess
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom import Dataset, uid
from pydicom.encaps import encapsulate, generate_frames
from pydicom.pixels import convert_color_space

from dicom_io.demographics import demographics_from_dataset
from dicom_io.encapsulate import (
    ENCODABLE_SYNTAXES,
    dermoscopy_dataset,
    jpeg_frame_info,
    jpeg_lossless,
    write_dataset,
)
from dicom_io.images import (
    DermoscopyImage,
    SopClass,
    UnsupportedInstanceError,
    image_from_dataset,
    read_image,
)
from plugin.domain import BODY_PART_SITES, SNOMED_SITES, SiteCode
from tests.conftest import dciodvfy_errors, require_tool

SAMPLES = Path(__file__).resolve().parents[1] / "data"
SHARED_DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
HAM_MEL = SAMPLES / "ISIC_0024525.jpg"  # 224 px
HAM_NV = SAMPLES / "ISIC_0024307.jpg"
ISIC_MEL = SAMPLES / "ISIC_0337631.jpg"  # 512 px
ISIC_BENIGN = SAMPLES / "ISIC_0162627.jpg"
LOSSLESS = [ts for ts in ENCODABLE_SYNTAXES if ts not in (uid.JPEGBaseline8Bit, uid.JPEG2000)]
BACK = SiteCode("77568009", "Back")


def pillow_rgb(path: Path | bytes) -> np.ndarray:
    source = BytesIO(path) if isinstance(path, bytes) else path
    return np.asarray(Image.open(source).convert("RGB"))


def round_trip(tmp_path: Path, source: Path | np.ndarray, **kwargs: object) -> DermoscopyImage:
    ds = dermoscopy_dataset(source, study_date="20250102", **kwargs)  # type: ignore[arg-type]
    return read_image(write_dataset(ds, tmp_path / "image.dcm"))


# --- round trips through our own writer ---------------------------------------------------


@pytest.mark.parametrize("ts", LOSSLESS, ids=lambda t: uid.UID(t).keyword)
def test_lossless_syntaxes_round_trip_the_pixels_exactly(tmp_path: Path, ts: str) -> None:
    image = round_trip(tmp_path, HAM_MEL, transfer_syntax=ts, patient_id="P1")
    written = pydicom.dcmread(tmp_path / "image.dcm", stop_before_pixels=True)
    assert written.file_meta.TransferSyntaxUID == ts
    assert image.rgb.dtype == np.uint8
    assert image.rgb.shape == (224, 224, 3)
    np.testing.assert_array_equal(image.rgb, pillow_rgb(HAM_MEL))
    # the pixels came from a JPEG: once lossy, always marked lossy
    assert written.LossyImageCompression == "01"


@pytest.mark.parametrize("source", [HAM_MEL, ISIC_MEL, ISIC_BENIGN], ids=lambda p: p.stem)
def test_jpeg_baseline_keeps_the_jpeg_bytes_and_decodes_like_pillow(
    tmp_path: Path, source: Path
) -> None:
    image = round_trip(tmp_path, source, transfer_syntax=uid.JPEGBaseline8Bit)
    written = pydicom.dcmread(tmp_path / "image.dcm")
    frame = next(generate_frames(written.PixelData, number_of_frames=1))
    assert frame.rstrip(b"\x00") == source.read_bytes().rstrip(b"\x00")
    assert written.PhotometricInterpretation == "YBR_FULL_422"  # 4:2:0 source
    assert written.LossyImageCompression == "01"
    assert written.LossyImageCompressionMethod == "ISO_10918_1"
    np.testing.assert_array_equal(image.rgb, pillow_rgb(source))


def test_jpeg_2000_lossy_is_close_and_marked_lossy(tmp_path: Path) -> None:
    image = round_trip(tmp_path, HAM_MEL, transfer_syntax=uid.JPEG2000, j2k_compression_ratio=5)
    written = pydicom.dcmread(tmp_path / "image.dcm", stop_before_pixels=True)
    assert written.PhotometricInterpretation == "YBR_ICT"
    assert list(written.LossyImageCompressionMethod) == ["ISO_10918_1", "ISO_15444_1"]
    diff = np.abs(image.rgb.astype(int) - pillow_rgb(HAM_MEL))
    assert diff.mean() < 2.0


def test_array_sources_are_marked_lossless_and_jpeg_encoded_with_pillow(tmp_path: Path) -> None:
    rgb = pillow_rgb(HAM_NV)
    native = round_trip(tmp_path, rgb, transfer_syntax=uid.ExplicitVRLittleEndian)
    np.testing.assert_array_equal(native.rgb, rgb)
    assert native.dataset.LossyImageCompression == "00"
    jpeg = round_trip(tmp_path, rgb, transfer_syntax=uid.JPEGBaseline8Bit, jpeg_quality=90)
    buffer = BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=90)
    np.testing.assert_array_equal(jpeg.rgb, pillow_rgb(buffer.getvalue()))


def test_ref_and_header(tmp_path: Path) -> None:
    image = round_trip(
        tmp_path,
        HAM_MEL,
        patient_id="P7",
        study_uid="1.2.3.4",
        series_uid="1.2.3.4.5",
        sop_instance_uid="1.2.3.4.5.6",
    )
    assert image.ref.study_instance_uid == "1.2.3.4"
    assert image.ref.series_instance_uid == "1.2.3.4.5"
    assert image.ref.sop_instance_uid == "1.2.3.4.5.6"
    assert image.ref.sop_class_uid == SopClass.DERMOSCOPIC_PHOTOGRAPHY
    assert "PixelData" not in image.dataset
    assert image.dataset.PatientID == "P7"
    assert image.dataset.Modality == "DMS"
    assert image.dataset.file_meta.TransferSyntaxUID == uid.JPEGBaseline8Bit


# --- photometric interpretations, frames, bit depth -----------------------------------------


def test_jpeg_444_is_ybr_full_and_greyscale_jpeg_is_monochrome2(tmp_path: Path) -> None:
    image = Image.open(HAM_MEL)
    full = tmp_path / "444.jpg"
    image.save(full, quality=95, subsampling=0)
    grey = tmp_path / "grey.jpg"
    image.convert("L").save(grey, quality=95)
    colour = round_trip(tmp_path, full)
    assert colour.dataset.PhotometricInterpretation == "YBR_FULL"
    np.testing.assert_array_equal(colour.rgb, pillow_rgb(full))
    mono = round_trip(tmp_path, grey)
    assert mono.dataset.PhotometricInterpretation == "MONOCHROME2"
    assert mono.dataset.SamplesPerPixel == 1
    np.testing.assert_array_equal(mono.rgb, pillow_rgb(grey))


def test_progressive_jpeg_is_not_encapsulated_as_baseline(tmp_path: Path) -> None:
    progressive = tmp_path / "p.jpg"
    Image.open(HAM_MEL).save(progressive, quality=95, progressive=True)
    assert jpeg_frame_info(progressive.read_bytes()).process == 0xC2
    with pytest.raises(ValueError, match="not a baseline 8-bit JPEG"):
        dermoscopy_dataset(progressive)


def test_jpeg_labelled_rgb_without_colour_markers_is_not_colour_converted() -> None:
    """PS3.5 8.2.1: Photometric RGB on a JPEG without JFIF/Adobe markers means the components
    are R, G, B as stored; libjpeg would otherwise assume YCbCr and convert them."""
    rgb = pillow_rgb(HAM_NV)
    buffer = BytesIO()
    # A "YCbCr" image is stored without colour conversion: R, G, B go in as they are.
    Image.fromarray(rgb, mode="YCbCr").save(buffer, format="JPEG", quality=100, subsampling=0)
    stored = without_app_segments(buffer.getvalue())
    assert "jfif" not in Image.open(BytesIO(stored)).info
    ds = dermoscopy_dataset(HAM_NV)
    ds.PhotometricInterpretation = "RGB"
    ds.PixelData = encapsulate([stored])
    decoded = image_from_dataset(ds, "rgb-jpeg.dcm").rgb
    assert np.abs(decoded.astype(int) - rgb).mean() < 1.0
    assert np.abs(pillow_rgb(stored).astype(int) - rgb).mean() > 20  # what converting would do


def test_a_dataset_without_transfer_syntax_is_refused() -> None:
    ds = dermoscopy_dataset(HAM_MEL)
    del ds.file_meta
    assert "no Transfer Syntax UID" in refusal(ds)


def test_monochrome2_native_is_replicated_to_three_channels(tmp_path: Path) -> None:
    grey = pillow_rgb(HAM_NV)[:, :, 1].copy()
    image = round_trip(tmp_path, grey, transfer_syntax=uid.RLELossless)
    assert image.dataset.PhotometricInterpretation == "MONOCHROME2"
    np.testing.assert_array_equal(image.rgb, np.repeat(grey[:, :, None], 3, axis=2))


def native(rgb: np.ndarray, **attrs: object) -> Dataset:
    ds = dermoscopy_dataset(rgb, transfer_syntax=uid.ExplicitVRLittleEndian, study_date="20250102")
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    return ds


def test_ybr_full_native_is_converted_to_rgb() -> None:
    rgb = pillow_rgb(HAM_NV)
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    ds = native(rgb, PhotometricInterpretation="YBR_FULL", PixelData=ybr.tobytes())
    image = image_from_dataset(ds, "ybr.dcm")
    np.testing.assert_array_equal(image.rgb, convert_color_space(ybr, "YBR_FULL", "RGB"))
    assert np.abs(image.rgb.astype(int) - rgb).max() <= 2  # the round trip only rounds


def test_palette_colour_goes_through_its_lut() -> None:
    paletted = Image.open(HAM_NV).convert("P", palette=Image.Palette.ADAPTIVE, colors=256)
    indices = np.asarray(paletted)
    palette = np.array(paletted.getpalette()[: 3 * 256], dtype=np.uint16).reshape(-1, 3)
    palette = np.pad(palette, ((0, 256 - len(palette)), (0, 0)))
    ds = native(indices, PhotometricInterpretation="PALETTE COLOR")
    for channel, colour in enumerate(("Red", "Green", "Blue")):
        setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [256, 0, 16])
        lut = (palette[:, channel] * 257).astype("<u2").tobytes()
        setattr(ds, f"{colour}PaletteColorLookupTableData", lut)
    image = image_from_dataset(ds, "palette.dcm")
    np.testing.assert_array_equal(image.rgb, palette[indices].astype(np.uint8))


def test_multi_frame_takes_the_first_frame() -> None:
    first, second = pillow_rgb(HAM_MEL), pillow_rgb(HAM_NV)
    ds = native(first, NumberOfFrames=2, PixelData=first.tobytes() + second.tobytes())
    np.testing.assert_array_equal(image_from_dataset(ds, "two.dcm").rgb, first)
    jpeg = dermoscopy_dataset(HAM_MEL)
    jpeg.NumberOfFrames = 2
    jpeg.PixelData = encapsulate([HAM_MEL.read_bytes(), HAM_NV.read_bytes()])
    np.testing.assert_array_equal(image_from_dataset(jpeg, "two.dcm").rgb, first)


# --- refusals -------------------------------------------------------------------------------


def refusal(ds: Dataset) -> str:
    with pytest.raises(UnsupportedInstanceError) as caught:
        image_from_dataset(ds, "x.dcm")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("x.dcm: ")
    return message


def test_sixteen_bit_is_refused() -> None:
    ds = native(pillow_rgb(HAM_NV)[:, :, 0].copy())
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelData = np.zeros((224, 224), "<u2").tobytes()
    assert "Bits Allocated 16 is not supported" in refusal(ds)


def test_wrong_photometric_is_refused() -> None:
    ds = native(pillow_rgb(HAM_NV), PhotometricInterpretation="YBR_PARTIAL_420")
    assert "Photometric Interpretation YBR_PARTIAL_420" in refusal(ds)


def test_undecodable_transfer_syntax_is_refused() -> None:
    ds = dermoscopy_dataset(HAM_MEL)
    ds.file_meta.TransferSyntaxUID = uid.HTJ2KLossless
    message = refusal(ds)
    assert f"transfer syntax {uid.HTJ2KLossless}" in message
    assert "not decodable" in message


def test_corrupt_jpeg_frame_is_refused() -> None:
    ds = dermoscopy_dataset(HAM_MEL)
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xd9"])
    assert "could not be decoded" in refusal(ds)


def test_no_pixel_data_is_refused() -> None:
    ds = dermoscopy_dataset(HAM_MEL)
    del ds.PixelData
    assert "no pixel data" in refusal(ds)


@pytest.mark.parametrize(
    ("sop_class", "name"),
    [
        (uid.CTImageStorage, "CT Image Storage"),
        (uid.Comprehensive3DSRStorage, "Comprehensive 3D SR"),
    ],
)
def test_wrong_sop_class_is_refused_with_its_uid_and_name(
    tmp_path: Path, sop_class: str, name: str
) -> None:
    ds = dermoscopy_dataset(HAM_MEL)
    ds.SOPClassUID = sop_class
    path = write_dataset(ds, tmp_path / "other.dcm")
    with pytest.raises(UnsupportedInstanceError) as caught:
        read_image(path)
    assert str(caught.value).startswith(f"{path}: SOP class {sop_class} ({name}")
    assert "not a dermoscopy image class" in str(caught.value)


def test_non_dicom_files_are_refused(tmp_path: Path) -> None:
    notes = tmp_path / "notes.dcm"
    notes.write_text("this is not a DICOM file\n")
    with pytest.raises(UnsupportedInstanceError, match=r"notes\.dcm: not a DICOM file"):
        read_image(notes)
    with pytest.raises(UnsupportedInstanceError, match="not a DICOM file"):
        read_image(HAM_MEL)  # a JPEG is not a DICOM file either


@pytest.mark.filterwarnings("ignore:End of file reached before delimiter")
def test_truncated_dicom_is_refused(tmp_path: Path) -> None:
    whole = (SAMPLES / "dms_jpeg_baseline.dcm").read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(whole[: len(whole) // 2])  # pydicom drops the cut-off pixel data
    with pytest.raises(UnsupportedInstanceError, match=r"cut\.dcm: no pixel data"):
        read_image(cut)
    cut.write_bytes(whole[:100])  # inside the file meta header
    with pytest.raises(UnsupportedInstanceError, match=r"cut\.dcm: not a DICOM file"):
        read_image(cut)


# --- committed samples and DCMTK-made files ----------------------------------------------


def test_committed_dermoscopy_sample() -> None:
    image = read_image(SAMPLES / "dms_jpeg_baseline.dcm")
    np.testing.assert_array_equal(image.rgb, pillow_rgb(HAM_MEL))
    assert image.ref.sop_class_uid == SopClass.DERMOSCOPIC_PHOTOGRAPHY
    demo = demographics_from_dataset(image.dataset)
    assert (demo.age.value, demo.sex.value, demo.site.value) == (65.0, "male", "upper extremity")
    assert demo.site_code == SiteCode("53120007", "Upper limb")


def test_committed_img2dcm_vl_photographic_sample() -> None:
    image = read_image(SAMPLES / "vlp_img2dcm.dcm")
    np.testing.assert_array_equal(image.rgb, pillow_rgb(HAM_NV))
    assert image.ref.sop_class_uid == SopClass.VL_PHOTOGRAPHIC
    demo = demographics_from_dataset(image.dataset)
    assert (demo.age.value, demo.sex.value, demo.site.value) == (None, None, None)


def img2dcm(source: Path, out: Path, *args: str) -> Path:
    subprocess.run([require_tool("img2dcm"), *args, str(source), str(out)], check=True)
    return out


def test_img2dcm_vl_photographic_with_tags(tmp_path: Path) -> None:
    out = img2dcm(
        ISIC_MEL,
        tmp_path / "vlp.dcm",
        "-vlp",
        "-k",
        "PatientAge=045Y",
        "-k",
        "PatientSex=F",
        "-k",
        "(0008,2218)[0].(0008,0100)=22943007",
        "-k",
        "(0008,2218)[0].(0008,0102)=SCT",
        "-k",
        "(0008,2218)[0].(0008,0104)=Trunk",
    )
    image = read_image(out)
    assert image.ref.sop_class_uid == SopClass.VL_PHOTOGRAPHIC
    np.testing.assert_array_equal(image.rgb, pillow_rgb(ISIC_MEL))
    demo = demographics_from_dataset(image.dataset)
    assert (demo.age.value, demo.sex.value, demo.site.value) == (45.0, "female", "torso")
    assert demo.site_code == SiteCode("22943007", "Trunk")


def test_img2dcm_secondary_capture_with_body_part(tmp_path: Path) -> None:
    out = img2dcm(
        ISIC_BENIGN,
        tmp_path / "sc.dcm",
        "-k",
        "PatientAge=070Y",
        "-k",
        "PatientSex=M",
        "-k",
        "BodyPartExamined=LEG",
    )
    image = read_image(out)
    assert image.ref.sop_class_uid == SopClass.SECONDARY_CAPTURE
    np.testing.assert_array_equal(image.rgb, pillow_rgb(ISIC_BENIGN))
    demo = demographics_from_dataset(image.dataset)
    assert (demo.age.value, demo.sex.value, demo.site.value) == (70.0, "male", "lower extremity")
    assert demo.site.detail == "BodyPartExamined"


def without_app_segments(jpeg: bytes) -> bytes:
    """The codestream without its APPn segments (JFIF, Exif, Adobe...)."""
    out, pos = bytearray(jpeg[:2]), 2
    while jpeg[pos + 1] != 0xDA:  # up to the start of scan
        end = pos + 2 + int.from_bytes(jpeg[pos + 2 : pos + 4], "big")
        if not 0xE0 <= jpeg[pos + 1] <= 0xEF:
            out += jpeg[pos:end]
        pos = end
    return bytes(out + jpeg[pos:])


def test_our_jpeg_baseline_matches_img2dcm(tmp_path: Path) -> None:
    theirs = pydicom.dcmread(img2dcm(ISIC_MEL, tmp_path / "theirs.dcm", "-vlp"))
    ours = dermoscopy_dataset(ISIC_MEL, sop_class=SopClass.VL_PHOTOGRAPHIC)
    assert ours.PhotometricInterpretation == theirs.PhotometricInterpretation == "YBR_FULL_422"
    for keyword in ("Rows", "Columns", "SamplesPerPixel", "PlanarConfiguration", "BitsStored"):
        assert ours[keyword].value == theirs[keyword].value
    our_frame = next(generate_frames(ours.PixelData, number_of_frames=1))
    their_frame = next(generate_frames(theirs.PixelData, number_of_frames=1))
    # img2dcm drops the JFIF APP0 segment; we keep the file's bytes as they are.
    assert our_frame[:4] == b"\xff\xd8\xff\xe0" and their_frame[:4] == b"\xff\xd8\xff\xdb"
    assert without_app_segments(our_frame) == their_frame


@pytest.mark.parametrize("predictor", range(1, 8))
def test_jpeg_lossless_encoder_is_read_back_by_dcmtk(tmp_path: Path, predictor: int) -> None:
    rgb = pillow_rgb(HAM_MEL)
    ts = uid.JPEGLosslessSV1 if predictor == 1 else uid.JPEGLossless
    ds = dermoscopy_dataset(
        rgb, transfer_syntax=ts, jpeg_lossless_predictor=predictor, study_date="20250102"
    )
    src = write_dataset(ds, tmp_path / "lossless.dcm")
    out = tmp_path / "decoded.dcm"
    subprocess.run([require_tool("dcmdjpeg"), str(src), str(out)], check=True)
    np.testing.assert_array_equal(pydicom.dcmread(out).pixel_array, rgb)


def test_jpeg_lossless_codestream_header() -> None:
    code = jpeg_lossless(np.zeros((3, 5), np.uint8), predictor=1)
    info = jpeg_frame_info(code)
    assert (info.process, info.rows, info.columns, info.components) == (0xC3, 3, 5, 1)
    assert code.endswith(b"\xff\xd9")


# --- dciodvfy ---------------------------------------------------------------------------


@pytest.mark.parametrize("sop_class", list(SopClass), ids=lambda s: s.name)
@pytest.mark.parametrize(
    "ts",
    [
        uid.JPEGBaseline8Bit,
        uid.ExplicitVRLittleEndian,
        uid.JPEG2000Lossless,
        uid.JPEG2000,
        uid.RLELossless,
        uid.JPEGLosslessSV1,
    ],
    ids=lambda t: uid.UID(t).keyword,
)
def test_written_instances_pass_dciodvfy(tmp_path: Path, sop_class: SopClass, ts: str) -> None:
    ds = dermoscopy_dataset(
        HAM_MEL,
        sop_class=sop_class,
        transfer_syntax=ts,
        patient_id="P1",
        patient_name="Test^Patient",
        patient_age="045Y",
        patient_sex="F",
        birth_date="19800101",
        study_date="20250102",
        site=BACK,
        body_part="BACK",
    )
    assert dciodvfy_errors(write_dataset(ds, tmp_path / "x.dcm")) == []


def test_minimal_and_lateral_instances_pass_dciodvfy(tmp_path: Path) -> None:
    bare = dermoscopy_dataset(pillow_rgb(HAM_NV)[:, :, 0].copy(), study_date="20250102")
    assert dciodvfy_errors(write_dataset(bare, tmp_path / "bare.dcm")) == []
    lateral = dermoscopy_dataset(HAM_NV, laterality="L", site=SiteCode("14975008", "Forearm"))
    assert dciodvfy_errors(write_dataset(lateral, tmp_path / "lateral.dcm")) == []
    assert dciodvfy_errors(SAMPLES / "dms_jpeg_baseline.dcm") == []


SITES = [SiteCode(code, meaning) for code, (meaning, _) in SNOMED_SITES.items()]


@pytest.mark.parametrize("site", SITES, ids=lambda s: s.value)
def test_every_site_code_passes_dciodvfy(tmp_path: Path, site: SiteCode) -> None:
    """Laterality is type 2C: empty for paired/unknown structures, absent for unpaired."""
    ds = dermoscopy_dataset(HAM_NV, site=site, study_date="20250102")
    assert dciodvfy_errors(write_dataset(ds, tmp_path / "x.dcm")) == []


@pytest.mark.parametrize("body_part", sorted(BODY_PART_SITES))
def test_every_body_part_passes_dciodvfy(tmp_path: Path, body_part: str) -> None:
    ds = dermoscopy_dataset(HAM_NV, body_part=body_part, study_date="20250102")
    assert dciodvfy_errors(write_dataset(ds, tmp_path / "x.dcm")) == []


# --- the full data sets, where present ---------------------------------------------------


def shared_images(dataset: str, count: int) -> list[Path]:
    folder = SHARED_DATA / dataset / "images"
    if not folder.is_dir():
        pytest.skip(f"needs the training data at {SHARED_DATA.resolve()} (not in the repo)")
    return sorted(folder.glob("*.jpg"))[::97][:count]


@pytest.mark.parametrize("dataset", ["ham10000", "isic2020"])
def test_real_images_through_our_writer_decode_like_pillow(tmp_path: Path, dataset: str) -> None:
    for source in shared_images(dataset, 6):
        ours = round_trip(tmp_path, source, transfer_syntax=uid.JPEGBaseline8Bit)
        np.testing.assert_array_equal(ours.rgb, pillow_rgb(source), err_msg=source.name)


@pytest.mark.parametrize("dataset", ["ham10000", "isic2020"])
def test_real_images_through_img2dcm_decode_like_pillow(tmp_path: Path, dataset: str) -> None:
    for source in shared_images(dataset, 6):
        theirs = read_image(img2dcm(source, tmp_path / "theirs.dcm", "-vlp"))
        np.testing.assert_array_equal(theirs.rgb, pillow_rgb(source), err_msg=source.name)
