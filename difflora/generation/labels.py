"""Labels that are whole and readable on contact sheets, sweep grids, training sample grids and comparison
grids, at any image size: a font size that never drops below legibility, text wrapped at word boundaries
(a word wider than its column is broken between characters, never cut), and columns at least wide enough
for a few words. The room a label takes is measured before the sheet is drawn, so nothing is truncated.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from PIL import Image, ImageDraw, ImageFont

MIN_FONT = 12  # pixels: below this the default font's digits blur together
MAX_FONT = 22
MIN_LABEL_WIDTH = 128  # a labelled column is at least this wide, so a 16-px image still gets readable text
LINE_GAP = 2


def font_for(cell_width: int) -> Any:
    """The default font at a size that grows with the images (1/20 of their width) within readable bounds."""
    size = max(MIN_FONT, min(MAX_FONT, cell_width // 20))
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no sized default font
        return ImageFont.load_default()


def line_height(font: Any) -> int:
    _, top, _, bottom = font.getbbox("Ag|")
    return bottom - min(top, 0) + LINE_GAP


def _measure(text: str, font: Any) -> float:
    return ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(text, font=font)


def wrap(text: str, font: Any, width: int) -> list[str]:
    """`text` as lines no wider than `width` pixels: words kept whole where they fit, long words broken."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        current = ""
        for word in paragraph.split(" "):
            candidate = f"{current} {word}" if current else word
            if _measure(candidate, font) <= width:
                current = candidate
                continue
            if current:
                lines.append(current)
            current = ""
            for char in word:  # a word wider than the column: break it where it must
                if current and _measure(current + char, font) > width:
                    lines.append(current)
                    current = ""
                current += char
        lines.append(current)
    return lines


def text_height(lines: Sequence[str], font: Any) -> int:
    return len(lines) * line_height(font)


def draw_lines(draw: ImageDraw.ImageDraw, xy: tuple[int, int], lines: Sequence[str], font: Any) -> None:
    x, y = xy
    for line in lines:
        draw.text((x, y), line, fill="black", font=font)
        y += line_height(font)


def labelled_table(
    cells: Sequence[Sequence[Image.Image]],
    row_labels: Sequence[str],
    column_labels: Sequence[str],
    *,
    title: str = "",
    padding: int = 4,
) -> Image.Image:
    """A grid of `cells` (rows of images) with a header over each column, a label left of each row and a
    title on top, every label wrapped whole within the room measured for it."""
    cell_w = max(image.width for row in cells for image in row)
    cell_h = max(image.height for row in cells for image in row)
    font = font_for(cell_w)
    column_w = max(cell_w, MIN_LABEL_WIDTH)
    headers = [wrap(label, font, column_w) for label in column_labels]
    longest_word = max((int(_measure(w, font)) + 1 for label in row_labels for w in label.split()), default=1)
    longest = max((int(_measure(label, font)) + 1 for label in row_labels), default=1)
    row_w = max(longest_word, min(longest, MIN_LABEL_WIDTH))
    rows = [wrap(label, font, row_w) for label in row_labels]
    width = row_w + padding + len(column_labels) * (column_w + padding) + padding
    title_lines = wrap(title, font, width - 2 * padding) if title else []
    top = padding + text_height(title_lines, font) + max(text_height(h, font) for h in headers) + padding
    row_h = [max(cell_h, text_height(lines, font)) for lines in rows]
    sheet = Image.new("RGB", (width, top + sum(h + padding for h in row_h)), "white")
    draw = ImageDraw.Draw(sheet)
    draw_lines(draw, (padding, padding), title_lines, font)
    header_y = padding + text_height(title_lines, font)
    for col, lines in enumerate(headers):
        draw_lines(draw, (row_w + padding + col * (column_w + padding), header_y), lines, font)
    y = top
    for row_index, row in enumerate(cells):
        draw_lines(draw, (padding, y), rows[row_index], font)
        for col, image in enumerate(row):
            x = row_w + padding + col * (column_w + padding) + (column_w - image.width) // 2
            sheet.paste(image.convert("RGB"), (x, y))
        y += row_h[row_index] + padding
    return sheet
