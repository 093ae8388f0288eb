"""Burned-in text (the overlay PNG and the Secondary Capture): every character has a glyph in the font, and every line
sits on a dark band, so it reads on a white image as on a black one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from models.finding import Finding, Opacity, Thresholds
from models.severity import lung_involvement
from node.overlay import BOX_COLOUR, DISCLAIMER, printable, render_overlay
from node.writers.sc import burned_in_capture
from test_writers import CONTENT_DATETIME, CR, make_source


def glyph(char: str, size: int = 24) -> bytes:
    """`char` as Pillow's bundled font draws it (written here, apart from node.overlay's own check)."""
    picture = Image.new("L", (3 * size, 2 * size))
    ImageDraw.Draw(picture).text((size // 2, size // 4), char, fill=255, font=ImageFont.load_default(size=size))
    return picture.tobytes()


MISSING = glyph("\uffff")  # a non-character: the font's missing-glyph box


def missing_glyphs(text: str) -> set[str]:
    return {char for char in text if not char.isspace() and glyph(char) == MISSING}


def test_the_glyph_check_sees_a_missing_glyph() -> None:
    assert missing_glyphs("\u2014\u2265") == {"\u2014", "\u2265"}  # em dash, ≥: not in the bundled font
    assert missing_glyphs("opacity 12.5% (R 3.0%, L 0.0%) p=0.87 extent 2/8 - not for diagnostic use") == set()


def test_printable_replaces_what_the_font_cannot_draw() -> None:
    assert printable("R \u2013 L \u2265 5 \u2014 x") == "R - L >= 5 - x"
    assert printable("\u2603 snowman") == "? snowman"
    text = "severity \u2264 25 %, 3\u00d74 \u00b5m\u00b2 \u201cquoted\u201d"
    assert missing_glyphs(printable(text)) == set()
    assert printable("plain ASCII (p=0.87)") == "plain ASCII (p=0.87)"


def finding(shape: tuple[int, int], box: tuple[int, int, int, int]) -> Finding:
    rows, columns = shape
    right = np.zeros(shape, bool)
    left = np.zeros(shape, bool)
    right[rows // 8 : rows * 7 // 8, columns // 16 : columns * 7 // 16] = True
    left[rows // 8 : rows * 7 // 8, columns * 9 // 16 : columns * 15 // 16] = True
    mask = np.zeros(shape, bool)
    x0, y0, x1, y1 = box
    mask[y0:y1, x0:x1] = True
    severity, extent = lung_involvement(mask, right, left)
    return Finding(
        shape,
        (Opacity(tuple(float(v) for v in box), 0.87, mask),),  # type: ignore[arg-type]
        right,
        left,
        severity,
        extent,
        0.87,
        True,
        Thresholds(0.5, 0.5, 0.5),
        "test",
    )


def bright(shape: tuple[int, int]) -> np.ndarray:
    """A white picture (a few dark rows so that the percentile stretch has a range), dark rows away from the text."""
    pixels = np.ones(shape, np.float32)
    pixels[shape[0] // 2 : shape[0] // 2 + shape[0] // 50] = 0.0
    return pixels


def test_every_string_drawn_has_its_glyphs(monkeypatch: pytest.MonkeyPatch) -> None:
    drawn: list[str] = []
    original = ImageDraw.ImageDraw.text

    def spy(self: ImageDraw.ImageDraw, xy: object, text: str, *args: object, **kwargs: object) -> None:
        if self.mode == "RGB":  # the picture, not a glyph check's grayscale scratch image
            drawn.append(text)
        original(self, xy, text, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(ImageDraw.ImageDraw, "text", spy)
    shape = (600, 500)
    render_overlay(bright(shape), finding(shape, (100, 200, 200, 300)))
    assert any("not for diagnostic use" in text for text in drawn) and any("severity" in text for text in drawn)
    assert any("opacity 0.87" in text for text in drawn)
    for text in drawn:
        assert missing_glyphs(text) == set(), text
    assert missing_glyphs(DISCLAIMER) == set()


def dark(region: np.ndarray) -> float:
    return float(np.mean(region.max(axis=-1) < 60))


def ink(region: np.ndarray, colour: tuple[int, int, int]) -> int:
    """Pixels of `region` near `colour` (the text colour)."""
    return int(np.sum(np.all(np.abs(region.astype(int) - np.array(colour)) < 60, axis=-1)))


def check_bands(picture: np.ndarray, box: tuple[float, float, float, float]) -> None:
    """On a white picture: the caption (top left), the disclaimer (bottom left) and the box's label (just above the
    box) each lie on a dark band with bright glyphs in it; the picture beside them stays white."""
    rows, columns = picture.shape[:2]
    line = max(16, round(rows * 0.02))  # a band is at least this tall at these sizes
    white = (255, 255, 255)
    for name, region in (
        ("caption", picture[2 : 2 + line, 4 : columns // 4]),
        ("disclaimer", picture[rows - line : rows - 2, 4 : columns // 5]),
    ):
        assert dark(region) > 0.5, name
        assert ink(region, white) > 30, name
    beside = picture[rows - line : rows - 2, columns * 3 // 4 :]
    assert dark(beside) == 0.0 and ink(beside, white) == beside.shape[0] * beside.shape[1]
    x0, y0 = int(box[0]), int(box[1])
    label = picture[y0 - line : y0 - 2, x0 + 2 : x0 + 50]
    assert dark(label) > 0.4 and ink(label, BOX_COLOUR) > 20


def test_overlay_text_reads_on_a_white_image(tmp_path: Path) -> None:
    shape = (900, 800)
    box = (200, 300, 350, 450)
    path = tmp_path / "overlay.png"
    render_overlay(bright(shape), finding(shape, box)).save(path)
    check_bands(np.asarray(Image.open(path).convert("RGB")), box)


def test_secondary_capture_text_reads_on_a_white_image() -> None:
    source = make_source(CR, rows=1200, columns=1000, number=31)
    shape = (1200, 1000)
    box = (300, 400, 500, 600)
    sc = burned_in_capture(source, bright(shape), finding(shape, box), content_datetime=CONTENT_DATETIME)
    check_bands(sc.pixel_array, box)
