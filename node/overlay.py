"""An overlay picture of a Finding: the radiograph with lung outlines, opacity tint and outline, boxes and the
severity text. Used by `cxrnode predict --png` (and the status page)."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from models import Finding

BOX_COLOUR = (255, 215, 0)  # yellow
OPACITY_COLOUR = (255, 64, 0)  # the SEG's opacity colour
RIGHT_LUNG_COLOUR = (0, 128, 255)
LEFT_LUNG_COLOUR = (0, 200, 83)


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
    font = ImageFont.load_default(size=max(12, round(18 * max(size) / 1024)))
    for opacity_item in finding.opacities:
        x0, y0, x1, y1 = (v * scale for v in opacity_item.box)
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=BOX_COLOUR, width=width)
        draw.text((x0 + 3, y0 + 2), f"opacity {opacity_item.score:.2f}", fill=BOX_COLOUR, font=font)
    s = finding.severity
    parts = [
        f"opacity {'present' if finding.opacity_present else 'absent'} (p={finding.opacity_probability:.2f})",
        f"severity {s.total:.1f}% (R {s.right:.1f}%, L {s.left:.1f}%)",
        f"extent {finding.extent.total}/8",
    ]
    lines = [parts[0]]  # as many parts on a line as fit the width, so that none is cut off
    for part in parts[1:]:
        if draw.textlength(f"{lines[-1]}  {part}", font=font) <= size[0] - 8:
            lines[-1] += f"  {part}"
        else:
            lines.append(part)
    draw.rectangle((0, 0, size[0], len(lines) * (font.size + 4) + 4), fill=(0, 0, 0))
    draw.multiline_text((4, 3), "\n".join(lines), fill=(255, 255, 255), font=font, spacing=4)
    draw.text((4, size[1] - font.size - 6), "cxrnode — not for diagnostic use", fill=(200, 200, 200), font=font)
    return picture
