"""A real run with a pinned LoRA and embedding writes PNGs whose infotext A1111's rules and sd-parsers read
back as the run's settings: sampler, schedule type, clip skip, the model's name and hash, the adapters'
hashes. On the suite's Ray cluster, one row, two steps."""

from __future__ import annotations

import hashlib
import io
import json

import PIL.Image
import pytest

from connectors.output import OutputSink
from connectors.storage import Storage
from jobs.img2img import EXIT_OK
from jobs.write_stage import sdbatch_version
from sd_core import Img2ImgPipeline
from tests.jobs.test_img2img import make_config, run_job, write_dataset
from tests.jobs.test_infotext import (
    addnet_hash,
    lora_multipliers,
    parse_generation_parameters,
    pasted_lora_hashes,
    sd_parsers_read,
)
from tests.sd_core.test_lora import KOHYA_UNET_MODULES, pick, weight_shapes, write_kohya
from tests.sd_core.test_textual_inversion import WIDTH, vectors, write_safetensors

pytestmark = pytest.mark.slow


def sha256_of(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_png_infotext_of_a_run_with_a_lora_and_an_embedding(ray_driver, model_dirs, tmp_path):
    pipe = Img2ImgPipeline.from_pretrained(model_dirs["v1"])
    checkpoint = tmp_path / "tiny-sd15.safetensors"
    pipe.save_single_file(checkpoint)
    lora = tmp_path / "paper-cut.safetensors"
    shapes = weight_shapes(pipe)
    write_kohya(lora, shapes, pick(shapes, KOHYA_UNET_MODULES), alpha_of=lambda m: 2.0, rank_of=lambda m: 2)
    embedding = write_safetensors(tmp_path / "fox.safetensors", {"<fox>": vectors(1, WIDTH["v1"], 2)})
    prompt = "a <fox> in snow"
    manifest = write_dataset(
        Storage(), str(tmp_path / "data"), [(64, 48)], prompt=[prompt], negative_prompt=["blurry"]
    )
    output = str(tmp_path / "out")
    config = make_config(
        str(checkpoint),
        manifest,
        output,
        **{
            "model.scheduler": "dpmpp_2m_karras",
            "model.clip_skip": 2,
            "defaults.num_inference_steps": 2,
            "adapters.loras": [{"path": str(lora), "scale": 0.8}],
            "adapters.embeddings": [{"path": str(embedding), "token": "<fox>"}],
        },
    )
    assert run_job(config)["exit_code"] == EXIT_OK

    (row,) = OutputSink(Storage(), output).read_metadata().to_pylist()
    assert row["prompt"] == prompt  # the metadata keeps the row's prompt
    data = Storage().read_bytes(row["output"])
    texts = PIL.Image.open(io.BytesIO(data)).text
    params = parse_generation_parameters(texts["parameters"])
    assert (params["Sampler"], params["Schedule type"], params["Clip skip"]) == ("DPM++ 2M", "Karras", "2")
    assert (params["Model"], params["Model hash"]) == ("tiny-sd15", sha256_of(checkpoint)[:10])
    assert pasted_lora_hashes(params) == {"paper-cut": addnet_hash(str(lora))[:12]}
    assert lora_multipliers(params["Prompt"]) == {"paper-cut": (0.8, 0.8)}
    assert params["TI hashes"] == f"<fox>: {sha256_of(embedding)[:12]}"
    assert (params["Steps"], params["Denoising strength"], params["Negative prompt"]) == (
        "2",
        "0.75",
        "blurry",
    )
    assert params["Version"] == f"sdbatch {sdbatch_version()}"
    assert json.loads(texts["sdbatch"])["scheduler"] == "dpmpp_2m_karras"

    (sampler,) = sd_parsers_read(data).samplers
    assert (sampler.name, sampler.parameters["scheduler"]) == ("DPM++ 2M", "Karras")
    assert (sampler.model.name, sampler.model.hash) == ("tiny-sd15", sha256_of(checkpoint)[:10])
    assert sampler.prompts[0].value == f"{prompt} <lora:paper-cut:0.8>"
