"""Run reporting: progress lines and their throttle, the contact sheet's layout and labels, the summary."""

from __future__ import annotations

import logging

import PIL.Image
import PIL.ImageFont
import pytest

from jobs.report import (
    PAD,
    THUMB_BACKGROUND,
    ProgressReporter,
    _fit_text,
    contact_sheet,
    format_duration,
    format_progress,
    sheet_layout,
    summary_lines,
)

RED, BLUE, GREEN, YELLOW = (230, 20, 20), (20, 20, 230), (20, 200, 20), (240, 220, 30)
FULL_SUMMARY = {
    "rows": 10_000,
    "images": 9_993,
    "errors": 7,
    "error_rate": 0.0007,
    "elapsed_s": 2165.0,
    "images_per_s": 4.6157,
    "batch_fill": 0.923,
    "stage_seconds": {"decode": 12.34, "unet": 1800.0, "encode": 20.0},
    "actor_start_s": 45.21,
    "output": "s3://out/run",
    "contact_sheet": "s3://out/run/contact_sheet.png",
    "committed": True,
    "exit_code": 0,
}


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def solid(colour: tuple[int, int, int], size: tuple[int, int], mode: str = "RGB") -> PIL.Image.Image:
    return PIL.Image.new("RGB", size, colour).convert(mode)


def centre(corner: tuple[int, int], thumb: int) -> tuple[int, int]:
    return corner[0] + thumb // 2, corner[1] + thumb // 2


def test_progress_before_any_row_has_unknown_eta():
    assert format_progress(0, 0, 10_000, 0.0) == (
        "progress: 0/10,000 rows (0.0%) · 0.00 images/s · 0 errors · ETA unknown"
    )


def test_progress_partway_reports_rate_and_eta_at_that_rate():
    line = format_progress(2_500, 7, 10_000, 500.0)
    assert line == "progress: 2,500/10,000 rows (25.0%) · 5.00 images/s · 7 errors · ETA 25m00s"


def test_progress_says_error_in_the_singular():
    assert "· 1 error ·" in format_progress(10, 1, 100, 5.0)


def test_progress_when_done_reports_elapsed_instead_of_eta():
    line = format_progress(500, 0, 500, 125.0)
    assert line == "progress: 500/500 rows (100.0%) · 4.00 images/s · 0 errors · elapsed 2m05s"


def test_progress_with_an_empty_run_does_not_divide_by_zero():
    assert (
        format_progress(0, 0, 0, 0.0) == "progress: 0/0 rows (100.0%) · 0.00 images/s · 0 errors · elapsed 0s"
    )


def test_eta_beyond_an_hour_shows_hours():
    assert format_progress(1, 0, 10_000, 1.0).endswith("ETA 2h46m39s")


@pytest.mark.parametrize(
    ("seconds", "text"), [(0, "0s"), (44.6, "45s"), (60, "1m00s"), (3599, "59m59s"), (3600, "1h00m00s")]
)
def test_durations_are_formatted_in_whole_seconds(seconds, text):
    assert format_duration(seconds) == text


def test_reporter_logs_at_most_one_line_per_interval():
    clock, lines = FakeClock(), []
    reporter = ProgressReporter(total=100, every_s=10.0, clock=clock, log=lines.append)
    for step in range(1, 26):  # one update a second for 25 seconds
        clock.now += 1.0
        reporter.update(step, 0)
    assert lines == [
        format_progress(10, 0, 100, 10.0),
        format_progress(20, 0, 100, 20.0),
    ]


def test_reporter_finish_always_logs_the_latest_counts():
    clock, lines = FakeClock(), []
    reporter = ProgressReporter(total=100, every_s=10.0, clock=clock, log=lines.append)
    clock.now += 2.0
    reporter.update(40, 3)
    reporter.finish()
    assert lines == [format_progress(40, 3, 100, 2.0, prefix="finished")]


def test_reporter_logs_to_the_sdbatch_logger_by_default(caplog):
    clock = FakeClock()
    reporter = ProgressReporter(total=10, every_s=0.0, clock=clock)
    with caplog.at_level(logging.INFO, logger="sdbatch"):
        clock.now += 1.0
        reporter.update(5, 0)
    assert [record.name for record in caplog.records] == ["sdbatch"]
    assert caplog.records[0].getMessage().startswith("progress: 5/10 rows (50.0%)")


def test_reporter_rejects_a_negative_total():
    with pytest.raises(ValueError, match="total"):
        ProgressReporter(total=-1)


@pytest.mark.parametrize(
    ("count", "columns", "grid"), [(1, 2, (1, 1)), (2, 2, (2, 1)), (5, 2, (2, 3)), (5, 3, (3, 2))]
)
def test_contact_sheet_size_is_columns_by_rows_of_cells(count, columns, grid):
    thumb = 32
    pairs = [(solid(RED, (40, 30)), solid(BLUE, (30, 40)), f"row {i}") for i in range(count)]
    sheet = contact_sheet(pairs, thumb=thumb, columns=columns)
    layout = sheet_layout(count, thumb, columns, PIL.ImageFont.load_default())
    assert layout.cell_width == 2 * thumb + 3 * PAD
    assert sheet.mode == "RGB"
    assert sheet.size == (grid[0] * layout.cell_width, grid[1] * layout.cell_height)


def test_contact_sheet_title_adds_a_header_line():
    pairs = [(solid(RED, (8, 8)), solid(BLUE, (8, 8)), "a")]
    plain = contact_sheet(pairs, thumb=32)
    titled = contact_sheet(pairs, thumb=32, title="run 2024-06-01")
    assert titled.width == plain.width
    assert titled.height > plain.height


def test_each_thumbnail_lands_in_its_own_box():
    thumb, colours = 48, [(RED, BLUE), (GREEN, YELLOW), (BLUE, RED)]
    pairs = [
        (
            solid(source, (100, 50), mode="RGBA"),
            solid(edited, (30, 60), mode="L" if i == 2 else "RGB"),
            str(i),
        )
        for i, (source, edited) in enumerate(colours)
    ]
    sheet = contact_sheet(pairs, thumb=thumb, columns=2, title="t")
    layout = sheet_layout(len(pairs), thumb, 2, PIL.ImageFont.load_default(), has_title=True)
    for index, (source, edited) in enumerate(colours):
        source_box, edited_box = layout.thumb_boxes(index)
        assert sheet.getpixel(centre(source_box, thumb)) == source
        expected = solid(edited, (1, 1), mode="L").convert("RGB").getpixel((0, 0)) if index == 2 else edited
        assert sheet.getpixel(centre(edited_box, thumb)) == expected


def test_thumbnails_keep_their_aspect_on_the_neutral_background():
    thumb = 40
    sheet = contact_sheet([(solid(RED, (200, 100)), solid(BLUE, (50, 100)), "x")], thumb=thumb)
    (sx, sy), (ex, ey) = sheet_layout(1, thumb, 2, PIL.ImageFont.load_default()).thumb_boxes(0)
    assert sheet.getpixel((sx + thumb // 2, sy + 2)) == THUMB_BACKGROUND  # wide input: bars above and below
    assert sheet.getpixel((sx + 1, sy + thumb // 2)) == RED  # ... but full width
    assert sheet.getpixel((ex + 2, ey + thumb // 2)) == THUMB_BACKGROUND  # tall output: bars left and right
    assert sheet.getpixel((ex + thumb // 2, ey + 1)) == BLUE  # ... but full height


@pytest.mark.parametrize(
    "font", [PIL.ImageFont.load_default(), PIL.ImageFont.load_default_imagefont()], ids=["freetype", "bitmap"]
)
def test_unicode_labels_and_titles_do_not_crash(font):
    label = "猫の写真 · Ωμέγα · ✨🎉 · seed 123 · strength 0.75"
    sheet = contact_sheet(
        [(solid(RED, (8, 8)), solid(BLUE, (8, 8)), label)], thumb=64, title="タイトル", font=font
    )
    assert sheet.mode == "RGB"


def test_bitmap_font_replaces_characters_it_cannot_encode():
    font = PIL.ImageFont.load_default_imagefont()
    assert _fit_text("café 猫", font, 1000) == "café ?"


def test_long_labels_are_cut_with_an_ellipsis_to_fit():
    font = PIL.ImageFont.load_default()
    text = _fit_text("id-0042 · seed 123 · strength 0.75 · " + "a very long prompt " * 20, font, 120)
    assert text.endswith("…")
    assert text.startswith("id-0042")
    assert font.getlength(text) <= 120


def test_labels_become_one_line():
    assert _fit_text("a\nb\tc", PIL.ImageFont.load_default(), 1000) == "a b c"


def test_contact_sheet_of_nothing_is_an_error():
    with pytest.raises(ValueError, match="at least one"):
        contact_sheet([])


def test_summary_of_a_full_run():
    assert summary_lines(FULL_SUMMARY) == [
        "sdbatch run summary",
        "  rows           10,000 · 7 errors (0.1%)",
        "  images         9,993 · in 36m05s · 4.62 images/s",
        "  batch fill     92.3%",
        "  stage time     decode 12.3s, unet 1800.0s, encode 20.0s",
        "  actor start    45.2s",
        "  output         s3://out/run (committed)",
        "  contact sheet  s3://out/run/contact_sheet.png",
        "  exit code      0",
    ]


def test_summary_leaves_out_what_it_was_not_given():
    lines = summary_lines(
        {"rows": 3, "errors": 1, "output": "/tmp/out", "committed": False, "contact_sheet": None}
    )
    assert lines == [
        "sdbatch run summary",
        "  rows           3 · 1 error",
        "  output         /tmp/out (NOT committed)",
        "  contact sheet  none",
    ]


def test_summary_of_nothing_is_just_the_heading():
    assert summary_lines({}) == ["sdbatch run summary"]
