"""The run's contact sheet: input | output pairs for a sample of committed rows, one PNG in the output."""

from __future__ import annotations

import logging
from typing import Any

import PIL.Image

from connectors.image_decode import decode_image
from connectors.image_encode import encode_image
from connectors.output import OutputSink
from connectors.storage import join_uri
from jobs.report import contact_sheet

log = logging.getLogger("sdbatch")

SHEET_NAME = "contact_sheet.png"


def write_contact_sheet(sink: OutputSink, plan: Any, rows: int) -> str | None:
    """Write `{output}/contact_sheet.png` for the first `rows` committed rows (by id); None if none.

    Its heading is the run's `contact_sheet_title` (default `sdbatch · {output}`), drawn at the top and kept
    in the PNG's `Title` text chunk. A report, not a result: any failure here is logged and the run goes on.
    """
    if rows <= 0:
        return None
    try:
        sample = sink.read_metadata(["id", "variant", "input", "output", "seed", "strength"])
        if sample.num_rows == 0:
            return None
        sample = sample.sort_by([("id", "ascending"), ("variant", "ascending")]).slice(0, rows)
        pairs = [_pair(sink, row) for row in sample.to_pylist()]
        title = plan.config.contact_sheet_title or f"sdbatch · {sink.layout.root}"
        sheet = contact_sheet(pairs, title=title)
        uri = join_uri(sink.layout.root, SHEET_NAME)
        sink.storage.write_bytes(uri, encode_image(sheet.convert("RGB"), "png", png_texts={"Title": title}))
        return uri
    except Exception as error:  # noqa: BLE001 - the sheet must never fail a finished run
        log.warning("could not write the contact sheet: %s: %s", type(error).__name__, error)
        return None


def _pair(sink: OutputSink, row: dict) -> tuple[PIL.Image.Image, PIL.Image.Image, str]:
    output = decode_image(sink.storage.read_bytes(row["output"]), row["output"])
    if row["input"] == "inline":
        source = PIL.Image.new("RGB", output.size, (96, 96, 96))  # inline bytes are not kept
    else:
        source = decode_image(sink.storage.read_bytes(row["input"]), row["input"])
    label = f"{row['id']} #{row['variant']} · seed {row['seed']} · strength {row['strength']:g}"
    return source, output, label
