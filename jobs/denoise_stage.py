"""The job's GPU stage: the actor that loads the model (and refiner) once and edits batches of rows, the
core call's per-row SDXL arguments, and what it records of each call and its models on every row."""

from __future__ import annotations

import os
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from jobs.faults import inject_worker_death
from jobs.rows import SDXL_ARGUMENTS
from jobs.stages import mark_error, rows_table, table_rows


def shape_groups(rows: Sequence[dict], batch_size: int) -> Iterator[list[int]]:
    """Positions of ok rows grouped by what one core call must share, in chunks of `batch_size`."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for position, row in enumerate(rows):
        if row["error_type"] is None:
            key = (row["pixel_height"], row["pixel_width"], row["strength"], row["num_inference_steps"])
            groups[key].append(position)
    for positions in groups.values():
        for start in range(0, len(positions), batch_size):
            yield positions[start : start + batch_size]


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[B, H, W, 3] floats in [0, 1] → uint8, rounded as diffusers' numpy_to_pil does."""
    return (np.clip(images, 0.0, 1.0) * 255).round().astype(np.uint8)


class Denoiser:
    """The GPU actor: loads the model and adapters once, then edits batches of rows.

    `make_pipeline` builds the ready pipeline (model loaded, adapters pinned, warmed up); it is a
    parameter so the job's model loading stays in one place (jobs/model_setup.py).
    """

    def __init__(
        self,
        make_pipeline: Callable[[], Any],
        batch_size: int,
        eta: float,
        clip_skip: int,
        registry: Any = None,
        prompt_syntax: str = "plain",
    ):
        if registry is not None:  # the driver releases this actor (and its GPU) when the pass ends
            import ray

            registry.add.remote(ray.get_runtime_context().current_actor)
        started = time.perf_counter()
        self.pipe, self.model_info = make_pipeline()
        self.batch_size = batch_size
        self.eta = eta
        self.clip_skip = clip_skip
        self.prompt_syntax = prompt_syntax
        self.start_s = time.perf_counter() - started
        self.actor_id = _actor_id()
        self._timesteps: dict[tuple[int, float], int] = {}

    def __call__(self, table: pa.Table) -> pa.Table:
        rows = table_rows(table)
        for positions in shape_groups(rows, self.batch_size):
            self._run_isolating(rows, positions)
        for row in rows:
            row.update(actor_id=self.actor_id, actor_start_s=self.start_s)
            if row["error_type"] is not None:
                row["pixels"] = None
        return rows_table(rows, table, DENOISE_COLUMNS)

    def _run_isolating(self, rows: list[dict], positions: list[int]) -> None:
        """Run one core call; if it fails, run its rows one by one so only the bad row fails."""
        try:
            self._run(rows, positions)
        except Exception as error:  # noqa: BLE001
            if len(positions) == 1:
                mark_error(rows[positions[0]], "denoise", error)
                return
            for position in positions:
                self._run_isolating(rows, [position])

    def _run(self, rows: list[dict], positions: list[int]) -> None:
        import torch

        chosen = [rows[p] for p in positions]
        inject_worker_death(chosen)
        first = chosen[0]
        height, width = first["pixel_height"], first["pixel_width"]
        pixels = np.stack([np.frombuffer(r["pixels"], np.uint8).reshape(height, width, 3) for r in chosen])
        tensor = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div(255)
        started = time.perf_counter()
        images = self.pipe(
            tensor,
            [r["prompt"] for r in chosen],
            negative_prompts=[r["negative_prompt"] or None for r in chosen],  # "": none (SDXL: zeros)
            strength=first["strength"],
            guidance_scale=[r["guidance_scale"] for r in chosen],
            num_inference_steps=first["num_inference_steps"],
            seeds=[r["seed"] for r in chosen],
            eta=self.eta,
            clip_skip=self.clip_skip,
            output_type="np",
            guidance_rescale=[r["guidance_rescale"] for r in chosen],
            prompt_syntax=self.prompt_syntax,
            **family_options(chosen),
        )
        elapsed_ms = (time.perf_counter() - started) * 1000 / len(chosen)
        report = self.pipe.last_call
        steps = first["num_inference_steps"]
        start_timestep = self._start_timestep(steps, first["strength"])
        steps_run = min(int(steps * first["strength"]), steps)  # img2img's count (base and refiner)
        realised = realised_values(report.micro_conditioning, len(chosen))
        for position, (row, image) in enumerate(zip(chosen, to_uint8(np.asarray(images)), strict=True)):
            row.update(realised[position])
            row.update(
                pixels=image.tobytes(),
                denoise_ms=elapsed_ms,
                core_batch_rows=len(chosen),
                # the call's count, on its first row
                core_encoded_images=report.encoded_images if position == 0 else 0,
                steps_run=steps_run,
                start_timestep=start_timestep,
                prompt_truncated=report.truncated_prompts[position],
                **{name: self.model_info[name] for name, _ in MODEL_COLUMNS},
                a1111_identity=self.model_info["a1111_identity"],
            )

    def _start_timestep(self, steps: int, strength: float) -> int:
        key = (steps, strength)
        if key not in self._timesteps:
            run = self.pipe.scheduler.start(steps, strength)
            self._timesteps[key] = int(run.timesteps[0])
        return self._timesteps[key]


# What the actor records of its models on every row (jobs.model_setup's model_info keys).
MODEL_COLUMNS = (
    ("family", pa.string()),
    ("scheduler", pa.string()),
    ("model_sha256", pa.string()),
    ("adapters", pa.string()),
    ("refiner_sha256", pa.string()),
    ("refiner_adapters", pa.string()),
    ("refiner_switch_at", pa.float64()),
)
DENOISE_COLUMNS = (
    ("pixels", pa.binary()),
    ("denoise_ms", pa.float64()),
    ("core_batch_rows", pa.int64()),
    ("core_encoded_images", pa.int64()),
    ("steps_run", pa.int64()),
    ("start_timestep", pa.int64()),
    ("prompt_truncated", pa.bool_()),
    *MODEL_COLUMNS,
    ("a1111_identity", pa.string()),  # jobs.infotext.run_identity: for the write stage, not metadata
    ("actor_id", pa.string()),
    ("actor_start_s", pa.float64()),
)
def family_options(rows: Sequence[dict]) -> dict[str, list]:
    """The SDXL arguments of one core call, a value per row (None: the core's default), for the ones
    any row sets; a row's empty second prompt means none (the first prompt is used)."""
    options = {argument: [_argument(row, cols) for row in rows] for argument, cols in SDXL_ARGUMENTS.items()}
    return {name: values for name, values in options.items() if any(v is not None for v in values)}


def _argument(row: dict, columns: tuple[str, ...]) -> Any:
    values = [row[column] for column in columns]
    if len(values) == 1:
        return None if values[0] == "" else values[0]
    return None if all(v is None for v in values) else tuple(v or 0 for v in values)


def realised_values(micro_conditioning: dict[str, list], rows: int) -> list[dict[str, Any]]:
    """Per row, the micro-conditioning values the core used (defaults filled in) as work columns."""
    realised: list[dict[str, Any]] = [{} for _ in range(rows)]
    for argument, values in micro_conditioning.items():
        columns = SDXL_ARGUMENTS.get(argument)  # target sizes and negative sizes have no column
        if columns is None:
            continue
        for row, value in zip(realised, values, strict=True):
            row.update(zip(columns, value if len(columns) == 2 else (value,), strict=True))
    return realised


def _actor_id() -> str:
    try:
        import ray

        context = ray.get_runtime_context()
        return f"{context.get_node_id()[:12]}/{context.get_actor_id() or os.getpid()}"
    except Exception:  # noqa: BLE001 - outside Ray (tests, the bare core loop)
        return f"local/{os.getpid()}"
