"""`make demo`: run the img2img core end to end on generated images with a tiny model it makes.

Until the Ray job lands this exercises the core alone: it writes a tiny random SD1-style model in the
diffusers layout, draws a few test images, edits them with two samplers and saves the results.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import PIL.Image
import PIL.ImageDraw

from sd_core import Img2ImgPipeline
from sd_core.tiny import make_tiny_model

PROMPTS = ["a red circle on a blue sky", "a green square, oil painting", "a yellow stripe at dusk"]


def test_images(size: tuple[int, int] = (96, 64)) -> list[PIL.Image.Image]:
    """Three simple, distinct pictures: a circle, a square and a stripe on gradients."""
    images = []
    for i, shape in enumerate(("circle", "square", "stripe")):
        image = PIL.Image.linear_gradient("L").resize(size).convert("RGB")
        draw = PIL.ImageDraw.Draw(image)
        colour = [(220, 40, 40), (40, 200, 60), (240, 220, 30)][i]
        box = (size[0] // 4, size[1] // 4, 3 * size[0] // 4, 3 * size[1] // 4)
        if shape == "circle":
            draw.ellipse(box, fill=colour)
        elif shape == "square":
            draw.rectangle(box, fill=colour)
        else:
            draw.rectangle((0, size[1] // 2 - 6, size[0], size[1] // 2 + 6), fill=colour)
        images.append(image)
    return images


def run_demo(output: Path) -> list[Path]:
    model_dir = make_tiny_model(output / "tiny-model", family="v1")
    pipe = Img2ImgPipeline.from_pretrained(model_dir)
    images = test_images()
    written = []
    for i, image in enumerate(images):
        path = output / "inputs" / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
    for scheduler in ("pndm", "euler_a"):
        pipe.set_scheduler(scheduler)
        start = time.perf_counter()
        results = pipe(
            images,
            PROMPTS,
            negative_prompts="blurry",
            strength=0.75,
            guidance_scale=7.5,
            num_inference_steps=20,
            seeds=[1, 2, 3],
        )
        elapsed = time.perf_counter() - start
        for i, result in enumerate(results):
            path = output / "images" / scheduler / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            result.save(path)
            written.append(path)
        print(
            f"{scheduler}: {len(results)} images {results[0].size[0]}x{results[0].size[1]} in {elapsed:.2f}s"
        )
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("demo-output"), help="folder to write into")
    args = parser.parse_args(argv)
    written = run_demo(args.output)
    print(f"wrote {len(written)} images under {args.output.resolve() / 'images'}")


if __name__ == "__main__":
    main()
