"""A corpus of hostile DICOM files, generated from one valid synthetic radiograph, each with the outcome the node must
give it: a failure status (nothing kept), or acknowledged and recorded `skipped` / `failed` / `done`.

    python tests/hostile.py OUT      # writes the corpus and prints the table
"""

from __future__ import annotations

import io
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import dcmwrite
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models.synth import make_dataset, make_radiograph  # noqa: E402

REFUSED_CANNOT_UNDERSTAND = "0xC000"
REFUSED_OUT_OF_RESOURCES = "0xA700"


@dataclass(frozen=True)
class Case:
    name: str
    data: bytes  # the whole file (preamble, file meta, data set)
    sop_class_uid: str
    sop_instance_uid: str
    expected: str  # a status ("0xC000", "0xA700") or a job state after acknowledgement ("failed", "done", ...)
    why: str


def base(seed: int, size: tuple[int, int] = (160, 144), bits: int = 12) -> Dataset:
    rng = np.random.default_rng(seed)
    radiograph = make_radiograph(rng, *size, positive=True, bits_stored=bits)
    ds = make_dataset(radiograph, patient_id=f"hostile-{seed}", modality="DX", rng=rng)
    uid = generate_uid(entropy_srcs=[f"hostile-{seed}"])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
    return ds


def encode(ds: Dataset) -> bytes:
    """The file bytes, in the transfer syntax its file meta names."""
    buffer = io.BytesIO()
    syntax = ds.file_meta.TransferSyntaxUID
    if syntax.is_little_endian:
        dcmwrite(buffer, ds, enforce_file_format=True)
    else:  # pydicom converts to big endian only when told so explicitly
        dcmwrite(buffer, ds, enforce_file_format=True, implicit_vr=False, little_endian=False)
    return buffer.getvalue()


def case(name: str, ds: Dataset, expected: str, why: str, data: bytes | None = None) -> Case:
    return Case(
        name,
        data if data is not None else encode(ds),
        str(ds.file_meta.MediaStorageSOPClassUID),
        str(ds.SOPInstanceUID),
        expected,
        why,
    )


def pixel_offset(data: bytes) -> int:
    """Byte offset of the Pixel Data element's value in an Explicit VR Little Endian file."""
    tag = struct.pack("<HH", 0x7FE0, 0x0010)
    index = data.rfind(tag)
    assert index > 0
    return index + 12  # tag (4) + VR (2) + reserved (2) + length (4)


def corpus() -> list[Case]:
    cases: list[Case] = []
    seed = iter(range(50_000, 51_000))

    def add(builder: Callable[[Dataset], Case]) -> None:
        cases.append(builder(base(next(seed))))

    # -- broken files --------------------------------------------------------------------------------------------
    def truncated_in_pixels(ds: Dataset) -> Case:
        data = encode(ds)
        return case(
            "truncated in Pixel Data",
            ds,
            REFUSED_CANNOT_UNDERSTAND,
            "100 of 46080 bytes arrived",
            data[: pixel_offset(data) + 100],
        )

    add(truncated_in_pixels)

    def truncated_in_header(ds: Dataset) -> Case:
        data = encode(ds)
        return case(
            "truncated in the header",
            ds,
            REFUSED_CANNOT_UNDERSTAND,
            "an element runs past the end",
            data[: 128 + 4 + 300],
        )

    add(truncated_in_header)

    def garbage(ds: Dataset) -> Case:
        data = encode(ds)
        meta_end = data.find(struct.pack("<HH", 0x0008, 0x0005))
        meta_end = meta_end if meta_end > 0 else data.find(struct.pack("<HH", 0x0008, 0x0008))
        junk = np.random.default_rng(1).integers(0, 256, 4000, dtype=np.uint8).tobytes()
        return case(
            "random bytes after the file meta", ds, REFUSED_CANNOT_UNDERSTAND, "not a data set", data[:meta_end] + junk
        )

    add(garbage)

    def wrong_vr(ds: Dataset) -> Case:
        ds["Rows"].VR = "SS"
        ds.Rows = -7
        return case("Rows with a wrong VR and negative", ds, "failed", "nonsense geometry")

    add(wrong_vr)

    def missing_pixels(ds: Dataset) -> Case:
        del ds.PixelData
        return case("no Pixel Data", ds, "failed", "nothing to analyse")

    add(missing_pixels)

    def short_pixels(ds: Dataset) -> Case:
        ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3]
        return case("short Pixel Data", ds, REFUSED_CANNOT_UNDERSTAND, "a third of the pixels")

    add(short_pixels)

    def zero_size(ds: Dataset) -> Case:
        ds.Rows, ds.Columns, ds.PixelData = 0, 0, b""
        return case("0 x 0 image", ds, "failed", "no pixels to analyse")

    add(zero_size)

    def huge_claim(ds: Dataset) -> Case:
        ds.Rows, ds.Columns = 65535, 65535
        return case("65535 x 65535 claimed", ds, REFUSED_OUT_OF_RESOURCES, "would decode to 8.6 GB")

    add(huge_claim)

    def mismatched_uid(ds: Dataset) -> Case:
        inside = str(ds.SOPInstanceUID)
        requested = inside[:-1] + ("1" if inside[-1] != "1" else "2")  # same length: patch the file meta only
        data = encode(ds).replace(inside.encode(), requested.encode(), 1)  # the first occurrence is in the meta
        return Case(
            "SOP Instance UID differs from the request",
            data,
            str(ds.SOPClassUID),
            requested,
            REFUSED_CANNOT_UNDERSTAND,
            "two identities for one object",
        )

    add(mismatched_uid)

    # -- broken compressed streams --------------------------------------------------------------------------------
    for syntax, label in ((JPEGLSLossless, "JPEG-LS"), (JPEG2000Lossless, "JPEG 2000"), (RLELossless, "RLE")):

        def broken(ds: Dataset, syntax: str = syntax, label: str = label) -> Case:
            ds.compress(syntax)
            frame = bytearray(ds.PixelData)
            middle = len(frame) // 2
            frame[middle : middle + 64] = bytes(64)
            frame[40:48] = b"\xff\xff\xff\xff\x00\x00\x00\x00"
            ds.PixelData = bytes(frame)
            if label == "RLE":  # RLE has no integrity check: a damaged stream decodes to wrong pixels, as it is
                return case("broken RLE stream", ds, "done", "RLE carries no checksum; analysed as decoded")
            return case(f"broken {label} stream", ds, "failed", "the decoder rejects it")

        add(broken)

    def broken_jpeg(ds: Dataset) -> Case:
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit = 7
        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.50"  # JPEG Baseline, with a stream that is not one
        ds.PixelData = encapsulate([b"\xff\xd8\xff\xdb" + bytes(200) + b"\xff\xd9"])
        ds["PixelData"].VR = "OB"
        return case("broken JPEG Baseline stream", ds, "failed", "not a JPEG image")

    add(broken_jpeg)

    # -- unsupported but well-formed ---------------------------------------------------------------------------------
    def wrong_photometric(ds: Dataset) -> Case:
        ds.PhotometricInterpretation = "PALETTE COLOR"
        return case("PALETTE COLOR on grayscale pixels", ds, "failed", "not a grayscale radiograph")

    add(wrong_photometric)

    def colour(ds: Dataset) -> Case:
        gray = ds.pixel_array.astype(np.uint8)
        rgb = np.stack([gray] * 3, axis=-1)
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit = 7
        ds.PixelData = rgb.tobytes()
        return case("colour (RGB) image", ds, "failed", "only grayscale is analysed")

    add(colour)

    def multi_frame(ds: Dataset) -> Case:
        ds.NumberOfFrames = 2
        ds.PixelData = ds.PixelData * 2  # whole: two complete frames
        return case("two frames", ds, "failed", "only single-frame radiographs are analysed")

    add(multi_frame)

    def big_endian(ds: Dataset) -> Case:
        ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
        return case("Explicit VR Big Endian", ds, "done", "retired, still valid")

    add(big_endian)

    def implicit_undefined_lengths(ds: Dataset) -> Case:
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "X", "99TEST", "nested"
        ds.ProcedureCodeSequence = [item]
        ds["ProcedureCodeSequence"].is_undefined_length = True
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        return case("sequence of undefined length, Implicit VR", ds, "done", "legal and common")

    add(implicit_undefined_lengths)

    def private_garbage(ds: Dataset) -> Case:
        block = ds.private_block(0x0099, "HOSTILE TEST", create=True)
        block.add_new(0x01, "OB", np.random.default_rng(2).integers(0, 256, 3001, dtype=np.uint8).tobytes())
        block.add_new(0x02, "UN", b"\x00\xff" * 777)
        block.add_new(0x03, "LO", "x" * 300)
        return case("garbage private elements", ds, "done", "private tags are ignored")

    add(private_garbage)

    for charset, name in (
        ("ISO_IR 100", "Müller^Jürgen"),
        ("ISO_IR 192", "Ñandú^Zoë=山田^太郎"),
        ("ISO_IR 144", "Иванов^Иван"),
        ("ISO 2022 IR 87", "Yamada^Tarou=山田^太郎"),
        ("GB18030", "王^小明"),
    ):

        def named(ds: Dataset, charset: str = charset, name: str = name) -> Case:
            ds.SpecificCharacterSet = charset if charset != "ISO 2022 IR 87" else ["", "ISO 2022 IR 87"]
            ds.PatientName = name
            return case(f"patient name in {charset}", ds, "done", "the name is copied, never logged")

        add(named)

    def laterals(ds: Dataset) -> Case:
        ds.ViewPosition = "LL"
        return case("lateral view", ds, "skipped", "outside the filters")

    add(laterals)

    def explicit_plain(ds: Dataset) -> Case:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        return case("a valid image (control)", ds, "done", "baseline")

    add(explicit_plain)
    return cases


if __name__ == "__main__":
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    for index, item in enumerate(corpus()):
        (out / f"{index:02d}.dcm").write_bytes(item.data)
        print(f"{index:02d}  {item.expected:<8}  {item.name}  ({item.why})")
