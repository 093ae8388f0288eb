"""An overlay picture of a Finding: the radiograph with lung outlines, opacity tint and outline, boxes and the
severity text. Used by `cxrnode predict --png`, the status page and the Secondary Capture (node.writers.sc).

Burned-in text is readable on any image: every line is drawn on a dark band, in Pillow's bundled font (FreeType
Aileron since Pillow 10.1, shipped with Pillow: nothing is downloaded, the same on every machine). Aileron covers
Latin-1 but not typographic dashes, "≥" and the like: `printable` replaces what the font has no glyph for (so that no
missing-glyph box is ever burned in), and a line wider than the picture is wrapped.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from models import Finding

BOX_COLOUR = (255, 215, 0)  # yellow
OPACITY_COLOUR = (255, 64, 0)  # the SEG's opacity colour
RIGHT_LUNG_COLOUR = (0, 128, 255)
LEFT_LUNG_COLOUR = (0, 200, 83)
TEXT_COLOUR = (255, 255, 255)
BAND_COLOUR = (0, 0, 0)
"""Behind every line of text: white on black reads on a black lung and a white bone alike."""

DISCLAIMER = "cxrnode - not for diagnostic use"

SUBSTITUTES = {
    "\u2010": "-",  # hyphen
    "\u2011": "-",  # non-breaking hyphen
    "\u2012": "-",  # figure dash
    "\u2013": "-",  # en dash
    "\u2014": "-",  # em dash
    "\u2212": "-",  # minus sign
    "\u2018": "'",
    "\u2019": "'",
    "\u201c": '"',
    "\u201d": '"',
    "\u2026": "...",
    "\u2264": "<=",
    "\u2265": ">=",
    "\u2248": "~",
    "\u00d7": "x",
    "\u00b5": "u",
    "\u00b2": "2",
    "\u00b3": "3",
    "\u00a0": " ",
}
"""ASCII for characters a caption may hold and the bundled font may lack."""

_NOT_A_CHARACTER = "\uffff"  # never in any font: what the font draws for a missing glyph


def font_of(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's bundled font at `size` pixels."""
    return ImageFont.load_default(size=size)


@lru_cache(maxsize=1024)
def _bitmap(text: str) -> tuple[tuple[int, int], bytes]:
    picture = Image.new("L", (64, 64))
    ImageDraw.Draw(picture).text((8, 8), text, fill=255, font=font_of(32))
    return picture.size, picture.tobytes()


@lru_cache(maxsize=1024)
def has_glyph(char: str) -> bool:
    """Whether the bundled font draws `char` as itself, not as its missing-glyph box."""
    return char.isspace() or _bitmap(char) != _bitmap(_NOT_A_CHARACTER)


def printable(text: str) -> str:
    """`text` with every character the font cannot draw replaced: by its ASCII form (`SUBSTITUTES`) or by "?"."""
    return "".join(
        char if has_glyph(char) else "".join(c if has_glyph(c) else "?" for c in SUBSTITUTES.get(char, "?"))
        for char in text
    )


def wrap(text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, width: float) -> list[str]:
    """`text` in lines no wider than `width` pixels where it can be: broken at its double spaces first (they part
    its phrases), then at single spaces; a single word wider than `width` keeps its own line."""
    lines: list[str] = []
    for phrase in text.split("  "):
        candidate = f"{lines[-1]}  {phrase}" if lines else phrase
        if lines and font.getlength(candidate) <= width:
            lines[-1] = candidate
            continue
        current = ""
        for word in phrase.split(" "):
            joined = f"{current} {word}" if current else word
            if current and font.getlength(joined) > width:
                lines.append(current)
                current = word
            else:
                current = joined
        lines.append(current)
    return lines


def draw_text(
    draw: ImageDraw.ImageDraw,
    xy: tuple[float, float],
    text: str,
    font: ImageFont.FreeTypeFont | ImageFont.ImageFont,
    fill: tuple[int, int, int] = TEXT_COLOUR,
    padding: int = 3,
) -> tuple[float, float, float, float]:
    """One line of `printable` text with its top-left corner at `xy`, on a dark band `padding` pixels wider than its
    ink on every side; returns the band (left, top, right, bottom)."""
    text = printable(text)
    left, top, right, bottom = draw.textbbox(xy, text, font=font)
    line_bottom = xy[1] + _line_height(font)  # the band spans the whole line, descenders or not
    band = (min(left, xy[0]) - padding, xy[1] - padding, right + padding, max(bottom, line_bottom) + padding)
    draw.rectangle(band, fill=BAND_COLOUR)
    draw.text(xy, text, fill=fill, font=font)
    return band


def _line_height(font: ImageFont.FreeTypeFont | ImageFont.ImageFont) -> int:
    ascent, descent = font.getmetrics() if isinstance(font, ImageFont.FreeTypeFont) else (10, 2)
    return ascent + descent


def display_image(pixels: np.ndarray) -> np.ndarray:
    """Presentation pixels → 8-bit grayscale, 0.5th-99.5th percentile stretched (as the models see it)."""
    low, high = np.percentile(pixels[:: max(1, pixels.shape[0] // 512), :: max(1, pixels.shape[1] // 512)], [0.5, 99.5])
    scaled = (pixels.astype(np.float32) - low) / max(float(high - low), 1e-6)
    return (np.clip(scaled, 0, 1) * 255).astype(np.uint8)


def outline(mask: np.ndarray, width: int) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, iterations=max(1, width))


def render_overlay(pixels: np.ndarray, finding: Finding, max_side: int = 1024) -> Image.Image:
    """An RGB picture at most `max_side` pixels on its long side; boxes are drawn at their exact scaled positions."""
    rows, columns = pixels.shape
    scale = min(1.0, max_side / max(rows, columns))
    size = (max(1, round(columns * scale)), max(1, round(rows * scale)))
    gray = Image.fromarray(display_image(pixels)).resize(size, Image.Resampling.BILINEAR)
    rgb = np.repeat(np.asarray(gray)[..., None], 3, axis=2).astype(np.float32)

    def small(mask: np.ndarray) -> np.ndarray:
        return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.Resampling.NEAREST)) > 0

    opacity = small(finding.opacity_mask)
    rgb[opacity] = 0.6 * rgb[opacity] + 0.4 * np.array(OPACITY_COLOUR)
    width = max(1, round(2 * max(size) / 1024))
    for mask, colour in (
        (finding.right_lung, RIGHT_LUNG_COLOUR),
        (finding.left_lung, LEFT_LUNG_COLOUR),
        (finding.opacity_mask, OPACITY_COLOUR),
    ):
        rgb[outline(small(mask), width)] = colour
    picture = Image.fromarray(rgb.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    font = font_of(max(12, round(18 * max(size) / 1024)))
    padding = max(2, round(_line_height(font) / 6))
    step = _line_height(font) + 2 * padding
    boxes = [tuple(v * scale for v in opacity_item.box) for opacity_item in finding.opacities]
    for (x0, y0, _, _), opacity_item in zip(boxes, finding.opacities, strict=True):
        label = printable(box_label(opacity_item.score))
        if y0 >= step:  # on the line just above the box, as the GSPS places it
            left = min(x0, size[0] - font.getlength(label) - 2 * padding)
            corner = (max(0.0, left) + padding, y0 - step + padding)
        else:  # inside its top when the box touches the top of the picture
            corner = (x0 + width + padding, y0 + width + padding)
        draw_text(draw, corner, label, font, fill=BOX_COLOUR, padding=padding)
    for x0, y0, x1, y1 in boxes:  # after the labels: no label hides a box's edge
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=BOX_COLOUR, width=width)
    lines = wrap(caption(finding), font, size[0] - 2 * (padding + 1))
    most = max(1, size[1] // 8 // step)  # the caption covers at most the top eighth; the rest of a line is cut off
    lines = lines[: most - 1] + ["  ".join(lines[most - 1 :])]
    for number, line in enumerate(lines):
        draw_text(draw, (padding + 1, padding + number * step), line, font, padding=padding)
    draw_text(draw, (padding + 1, size[1] - step + padding), DISCLAIMER, font, padding=padding)
    return picture


def box_label(score: float) -> str:
    return f"opacity {score:.2f}"


def caption(finding: Finding) -> str:
    """The line at the top: what the models found, patient sides R and L."""
    s = finding.severity
    return (
        f"opacity {'present' if finding.opacity_present else 'absent'} (p={finding.opacity_probability:.2f})  "
        f"severity {s.total:.1f}% (R {s.right:.1f}%, L {s.left:.1f}%)  extent {finding.extent.total}/8"
    )
