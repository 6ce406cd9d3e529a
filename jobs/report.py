"""What a run tells its user: throttled progress lines, a contact sheet of (input | output) pairs, a summary.

Pure PIL and stdlib, so the Ray driver can use it without loading torch or the core.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont
import PIL.ImageOps

Font = PIL.ImageFont.ImageFont | PIL.ImageFont.FreeTypeFont

PAD = 8  # pixels around and between the thumbnails of a cell, and around the title
SHEET_BACKGROUND = (245, 245, 245)
THUMB_BACKGROUND = (128, 128, 128)  # neutral grey behind a thumbnail that does not fill its square box
TEXT_COLOUR = (20, 20, 20)


def format_duration(seconds: float) -> str:
    """`45s`, `32m05s`, `2h03m07s`: whole seconds, rounded."""
    total = round(max(seconds, 0.0))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def format_progress(done: int, errors: int, total: int, elapsed_s: float, prefix: str = "progress") -> str:
    """One progress line; the rate counts finished rows (one image or one error each) since the start.

    Before the last row the line ends with the ETA at that rate ("unknown" until a row is done), after it
    with the elapsed time.
    """
    percent = 100.0 * done / total if total > 0 else 100.0
    rate = done / elapsed_s if elapsed_s > 0 else 0.0
    if done >= total:
        tail = f"elapsed {format_duration(elapsed_s)}"
    elif rate > 0:
        tail = f"ETA {format_duration((total - done) / rate)}"
    else:
        tail = "ETA unknown"
    noun = "error" if errors == 1 else "errors"
    counts = f"{done:,}/{total:,} rows ({percent:.1f}%)"
    return f"{prefix}: {counts} · {rate:.2f} images/s · {errors:,} {noun} · {tail}"


class ProgressReporter:
    """Turns cumulative (done, errors) counts into at most one progress line every `every_s` seconds."""

    def __init__(
        self,
        total: int,
        every_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        log: Callable[[str], None] | None = None,
    ) -> None:
        if total < 0:
            raise ValueError(f"ProgressReporter total must be a row count >= 0; got {total}")
        if every_s < 0:
            raise ValueError(f"ProgressReporter every_s must be >= 0 seconds; got {every_s}")
        self.total = total
        self.every_s = every_s
        self._clock = clock
        self._log = log if log is not None else logging.getLogger("sdbatch").info
        self._start = clock()
        self._last_logged = self._start
        self.done = 0
        self.errors = 0

    def update(self, done: int, errors: int) -> None:
        """Record the counts so far; log a line if `every_s` has passed since the last one (or the start)."""
        self.done, self.errors = done, errors
        now = self._clock()
        if now - self._last_logged >= self.every_s:
            self._last_logged = now
            self._log(format_progress(done, errors, self.total, now - self._start))

    def finish(self) -> None:
        """Log the final line, whatever the throttle says."""
        now = self._clock()
        self._last_logged = now
        self._log(format_progress(self.done, self.errors, self.total, now - self._start, prefix="finished"))


@dataclass(frozen=True)
class SheetLayout:
    """Where things go on a contact sheet: cells of [PAD input PAD output PAD] over a label line."""

    thumb: int
    columns: int
    rows: int
    line_height: int
    has_title: bool

    @property
    def cell_width(self) -> int:
        return 2 * self.thumb + 3 * PAD

    @property
    def cell_height(self) -> int:
        return self.thumb + self.line_height + 3 * PAD

    @property
    def header_height(self) -> int:
        return self.line_height + 2 * PAD if self.has_title else 0

    @property
    def size(self) -> tuple[int, int]:
        return self.columns * self.cell_width, self.header_height + self.rows * self.cell_height

    def thumb_boxes(self, index: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """Top-left corners of the input and output thumb×thumb boxes of cell `index` (row-major)."""
        x, y = self._cell_origin(index)
        return (x + PAD, y + PAD), (x + 2 * PAD + self.thumb, y + PAD)

    def label_origin(self, index: int) -> tuple[int, int]:
        x, y = self._cell_origin(index)
        return x + PAD, y + 2 * PAD + self.thumb

    def _cell_origin(self, index: int) -> tuple[int, int]:
        row, column = divmod(index, self.columns)
        return column * self.cell_width, self.header_height + row * self.cell_height


def sheet_layout(count: int, thumb: int, columns: int, font: Font, has_title: bool = False) -> SheetLayout:
    """The layout for `count` pairs: `columns` cells a row (fewer if there are fewer pairs)."""
    if count < 1:
        raise ValueError("a contact sheet needs at least one (input, output, label) pair; got none")
    if thumb < 1 or columns < 1:
        raise ValueError(
            f"contact sheet thumb and columns must be >= 1; got thumb={thumb}, columns={columns}"
        )
    used_columns = min(columns, count)
    return SheetLayout(
        thumb=thumb,
        columns=used_columns,
        rows=math.ceil(count / used_columns),
        line_height=_line_height(font),
        has_title=has_title,
    )


def contact_sheet(
    pairs: Sequence[tuple[PIL.Image.Image, PIL.Image.Image, str]],
    thumb: int = 192,
    columns: int = 2,
    title: str | None = None,
    font: Font | None = None,
) -> PIL.Image.Image:
    """An RGB grid of (input | output) thumbnails, each pair over its one-line label; `title` heads it.

    Thumbnails keep their aspect ratio, fitted and centred in thumb×thumb grey boxes. Labels and title are
    cut to width with "…". Characters the font cannot encode (Pillow's bitmap font is Latin-1) become "?".
    """
    font = font if font is not None else PIL.ImageFont.load_default()
    layout = sheet_layout(len(pairs), thumb, columns, font, has_title=title is not None)
    sheet = PIL.Image.new("RGB", layout.size, SHEET_BACKGROUND)
    draw = PIL.ImageDraw.Draw(sheet)
    text_width = layout.cell_width - 2 * PAD
    if title is not None:
        draw.text((PAD, PAD), _fit_text(title, font, layout.size[0] - 2 * PAD), fill=TEXT_COLOUR, font=font)
    for index, (source, edited, label) in enumerate(pairs):
        for image, corner in zip((source, edited), layout.thumb_boxes(index), strict=True):
            sheet.paste(_thumbnail(image, thumb), corner)
        draw.text(layout.label_origin(index), _fit_text(label, font, text_width), fill=TEXT_COLOUR, font=font)
    return sheet


def _thumbnail(image: PIL.Image.Image, size: int) -> PIL.Image.Image:
    """`image` as RGB, scaled (up or down) to fit size×size, centred on the neutral background."""
    fitted = PIL.ImageOps.contain(image.convert("RGB"), (size, size))
    box = PIL.Image.new("RGB", (size, size), THUMB_BACKGROUND)
    box.paste(fitted, ((size - fitted.width) // 2, (size - fitted.height) // 2))
    return box


def _line_height(font: Font) -> int:
    return font.getbbox("Agy|…" if _encodable("…", font) else "Agy|")[3]


def _encodable(text: str, font: Font) -> bool:
    try:
        font.getlength(text)
    except UnicodeEncodeError:
        return False
    return True


def _fit_text(text: str, font: Font, width: int) -> str:
    """`text` on one line that `font` can draw, cut with an ellipsis to at most `width` pixels."""
    text = " ".join(text.split())
    if not _encodable(text, font):
        text = text.encode("latin-1", errors="replace").decode("latin-1")
    if font.getlength(text) <= width:
        return text
    ellipsis = "…" if _encodable("…", font) else "..."
    low, high = 0, len(text) - 1  # the longest prefix that fits with the ellipsis has a length in [low, high]
    while low < high:
        middle = (low + high + 1) // 2
        if font.getlength(text[:middle].rstrip() + ellipsis) <= width:
            low = middle
        else:
            high = middle - 1
    return text[:low].rstrip() + ellipsis


def summary_lines(summary: Mapping[str, Any]) -> list[str]:
    """A short, aligned block describing a finished run; lines whose keys are missing are left out."""
    fields: list[tuple[str, str | None]] = [
        ("rows", _rows(summary)),
        ("images", _images(summary)),
        ("batch fill", _percent(summary.get("batch_fill"))),
        ("stage time", _stages(summary.get("stage_seconds"))),
        ("actor start", _seconds(summary.get("actor_start_s"))),
        ("output", _output(summary)),
        ("contact sheet", _present(summary, "contact_sheet")),
        ("exit code", _present(summary, "exit_code")),
    ]
    width = max(len(name) for name, _ in fields) + 2
    return ["sdbatch run summary"] + [
        f"  {name:<{width}}{value}" for name, value in fields if value is not None
    ]


def _present(summary: Mapping[str, Any], key: str) -> str | None:
    if key not in summary:
        return None
    value = summary[key]
    return "none" if value is None else str(value)


def _percent(fraction: float | None) -> str | None:
    return None if fraction is None else f"{100 * fraction:.1f}%"


def _seconds(seconds: float | None) -> str | None:
    return None if seconds is None else f"{seconds:.1f}s"


def _rows(summary: Mapping[str, Any]) -> str | None:
    rows, errors, rate = summary.get("rows"), summary.get("errors"), summary.get("error_rate")
    parts = [f"{rows:,}" if rows is not None else None]
    if errors is not None:
        noun = "error" if errors == 1 else "errors"
        parts.append(f"{errors:,} {noun}" + (f" ({_percent(rate)})" if rate is not None else ""))
    return _join(parts, " · ")


def _images(summary: Mapping[str, Any]) -> str | None:
    images, elapsed, rate = summary.get("images"), summary.get("elapsed_s"), summary.get("images_per_s")
    return _join(
        [
            f"{images:,}" if images is not None else None,
            f"in {format_duration(elapsed)}" if elapsed is not None else None,
            f"{rate:.2f} images/s" if rate is not None else None,
        ],
        " · ",
    )


def _stages(stage_seconds: Mapping[str, float] | None) -> str | None:
    if not stage_seconds:
        return None
    return ", ".join(f"{stage} {seconds:.1f}s" for stage, seconds in stage_seconds.items())


def _output(summary: Mapping[str, Any]) -> str | None:
    output, committed = summary.get("output"), summary.get("committed")
    state = None if committed is None else ("committed" if committed else "NOT committed")
    if output is None:
        return state
    return f"{output} ({state})" if state else str(output)


def _join(parts: Sequence[str | None], separator: str) -> str | None:
    present = [part for part in parts if part is not None]
    return separator.join(present) if present else None
