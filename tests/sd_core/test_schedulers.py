"""sd_core.schedulers against diffusers' scheduler classes: the same executed img2img timesteps and the same
latents after every step, for configs written for any scheduler class."""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass

import diffusers
import pytest
import torch
from diffusers.utils import logging as diffusers_logging

from sd_core.schedulers import SCHEDULER_NAMES, Scheduler, make_scheduler
from sd_core.tiny_configs import TINY_V1, TINY_V2

diffusers_logging.set_verbosity_error()  # from_config notes every key meant for another class

_DPM_2M = {"algorithm_type": "dpmsolver++", "solver_order": 2}
DIFFUSERS_EQUIVALENT = {  # name -> (diffusers class, from_config keyword arguments)
    "ddim": (diffusers.DDIMScheduler, {}),
    "pndm": (diffusers.PNDMScheduler, {}),
    "euler": (diffusers.EulerDiscreteScheduler, {}),
    "euler_a": (diffusers.EulerAncestralDiscreteScheduler, {}),
    "dpmpp_2m": (diffusers.DPMSolverMultistepScheduler, {**_DPM_2M, "use_karras_sigmas": False}),
    "dpmpp_2m_karras": (diffusers.DPMSolverMultistepScheduler, {**_DPM_2M, "use_karras_sigmas": True}),
    "lms": (diffusers.LMSDiscreteScheduler, {}),
    "unipc": (diffusers.UniPCMultistepScheduler, {}),
}

SD1_PNDM_LEADING = TINY_V1["scheduler"]  # leading spacing, steps_offset=1, PLMS
SD2_DDIM_VPRED_TRAILING = TINY_V2["scheduler"]
EULER_LINSPACE = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "timestep_spacing": "linspace",
}
CONFIGS = {
    "sd1_pndm_leading": SD1_PNDM_LEADING,
    "sd2_ddim_vpred_trailing": SD2_DDIM_VPRED_TRAILING,
    "euler_linspace": EULER_LINSPACE,
}
SEEDS = (11, 22, 33)
TOLERANCE = 1e-6  # on the final latents; intermediate ones (up to |x| ~ 50 in sigma space) scale it by |x|


def fake_unet(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A fixed, nonlinear stand-in for the UNet's prediction, keeping latents O(1) to the end."""
    channel = torch.arange(x.shape[1], dtype=torch.float32).view(1, -1, 1, 1)
    return 0.9 * x + 0.1 * torch.sin(3 * x + t.float() / 100 + channel)


@dataclass
class Trajectory:
    timesteps: torch.Tensor
    latents: list[torch.Tensor]  # after add_noise, then after each step


def latents_and_noise() -> tuple[torch.Tensor, torch.Tensor]:
    """Clean latents and initial noise, one row per seed."""
    generator = torch.Generator().manual_seed(0)
    shape = (len(SEEDS), 4, 8, 8)
    return torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)


def generators(seeds=SEEDS) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed) for seed in seeds]


def diffusers_img2img(name, config, steps, strength, eta=0.0, **overrides) -> Trajectory:
    """diffusers' StableDiffusionImg2ImgPipeline scheduler calls, with fake_unet for the UNet."""
    cls, kwargs = DIFFUSERS_EQUIVALENT[name]
    scheduler = cls.from_config(config, **kwargs, **overrides)
    scheduler.set_timesteps(steps)
    t_start = max(steps - min(int(steps * strength), steps), 0)
    timesteps = scheduler.timesteps[t_start * scheduler.order :]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(t_start * scheduler.order)
    z0, noise = latents_and_noise()
    x = scheduler.add_noise(z0, noise, timesteps[:1].repeat(len(SEEDS)))
    accepted = inspect.signature(scheduler.step).parameters
    step_kwargs = {"eta": eta} if "eta" in accepted else {}
    if "generator" in accepted:
        step_kwargs["generator"] = generators()
    latents = [x]
    for t in timesteps:
        model_out = fake_unet(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(model_out, t, x, **step_kwargs, return_dict=False)[0]
        latents.append(x)
    return Trajectory(timesteps, latents)


def our_img2img(scheduler: Scheduler, steps, strength, eta=0.0, rows=slice(None)) -> Trajectory:
    """Our run of the same loop; `rows` picks a part of the batch (with its seeds)."""
    run = scheduler.start(steps, strength, device="cpu", eta=eta)
    z0, noise = latents_and_noise()
    row_generators = generators(SEEDS[rows])
    x = run.add_noise(z0[rows], noise[rows])
    latents = [x]
    for i, t in enumerate(run.timesteps):
        x = run.step(fake_unet(run.scale_model_input(x, i), t), i, x, row_generators)
        latents.append(x)
    assert run.num_steps == len(run.timesteps)
    return Trajectory(run.timesteps, latents)


def max_difference(ours: Trajectory, reference: Trajectory) -> float:
    """Asserts the trajectories match; returns max |difference| of the final latents."""
    assert ours.timesteps.dtype == reference.timesteps.dtype
    assert torch.equal(ours.timesteps, reference.timesteps)
    assert len(ours.latents) == len(reference.latents)
    for step, (x, x_ref) in enumerate(zip(ours.latents, reference.latents, strict=True)):
        scale = max(1.0, x_ref.abs().max().item())
        assert (x - x_ref).abs().max().item() <= TOLERANCE * scale, f"latents differ after step {step}"
    final = (ours.latents[-1] - reference.latents[-1]).abs().max().item()
    assert final <= TOLERANCE
    return final


@pytest.mark.parametrize("strength", [0.3, 0.75, 1.0])
@pytest.mark.parametrize("steps", [7, 25])
@pytest.mark.parametrize("config_name", CONFIGS)
@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_img2img_matches_diffusers(name, config_name, steps, strength):
    config = CONFIGS[config_name]
    ours = our_img2img(make_scheduler(name, config), steps, strength)
    max_difference(ours, diffusers_img2img(name, config, steps, strength))


@pytest.mark.parametrize("strength", [0.3, 1.0])
@pytest.mark.parametrize("config_name", CONFIGS)
def test_stochastic_ddim_matches_diffusers(config_name, strength):
    config = CONFIGS[config_name]
    ours = our_img2img(make_scheduler("ddim", config), 25, strength, eta=0.5)
    max_difference(ours, diffusers_img2img("ddim", config, 25, strength, eta=0.5))


_SD1, _SD2 = SD1_PNDM_LEADING, SD2_DDIM_VPRED_TRAILING
_UNIPC_KARRAS = {
    "_class_name": "UniPCMultistepScheduler",
    **_SD1,
    "use_karras_sigmas": True,
    "sigma_min": 0.05,
}
OPTION_CASES = [
    pytest.param("euler", {**_SD1, "use_karras_sigmas": True}, id="euler-karras"),
    pytest.param("euler", {**_SD1, "use_karras_sigmas": True, "sigma_max": 10.0}, id="euler-karras-bounds"),
    pytest.param("euler", {**_SD1, "final_sigmas_type": "sigma_min"}, id="euler-final-sigma-min"),
    pytest.param("euler", {**_SD2, "rescale_betas_zero_snr": True}, id="euler-zero-snr"),
    pytest.param("euler_a", {**_SD2, "rescale_betas_zero_snr": True}, id="euler_a-zero-snr"),
    pytest.param(
        "ddim", {**_SD2, "rescale_betas_zero_snr": True, "set_alpha_to_one": True}, id="ddim-zero-snr"
    ),
    pytest.param("ddim", {**_SD1, "prediction_type": "sample", "clip_sample": True}, id="ddim-sample-clip"),
    pytest.param("ddim", {**_SD1, "beta_schedule": "squaredcos_cap_v2"}, id="ddim-cosine"),
    pytest.param("pndm", {**_SD1, "skip_prk_steps": False, "set_alpha_to_one": True}, id="pndm-prk"),
    pytest.param("pndm", {**_SD2, "skip_prk_steps": True}, id="pndm-vpred-trailing"),
    pytest.param("lms", {**_SD1, "use_karras_sigmas": True}, id="lms-karras"),
    pytest.param("lms", {**_SD1, "prediction_type": "sample"}, id="lms-sample"),
    pytest.param(
        "lms", {**_SD1, "trained_betas": torch.linspace(1e-4, 0.02, 1000).tolist()}, id="lms-trained"
    ),
    pytest.param(
        "dpmpp_2m", {**_SD1, "final_sigmas_type": "sigma_min", "lower_order_final": False}, id="dpm-2nd-last"
    ),
    pytest.param(
        "dpmpp_2m", {**_SD1, "euler_at_final": True, "solver_type": "heun"}, id="dpm-heun-euler-final"
    ),
    pytest.param("dpmpp_2m", {**_SD1, "final_sigmas_type": "sigma_min"}, id="dpm-final-sigma-min"),
    pytest.param("dpmpp_2m", {**_SD1, "lambda_min_clipped": -5.1}, id="dpm-lambda-clipped"),
    pytest.param(
        "dpmpp_2m", {**_SD1, "algorithm_type": "sde-dpmsolver++", "solver_order": 3}, id="dpm-forced-2m"
    ),
    pytest.param("dpmpp_2m_karras", {**_SD1, "beta_schedule": "squaredcos_cap_v2"}, id="dpm-karras-cosine"),
    pytest.param("dpmpp_2m_karras", _UNIPC_KARRAS, id="dpm-karras-foreign-sigma-min"),
    pytest.param("unipc", {**_SD1, "solver_order": 3}, id="unipc-order3"),
    pytest.param(
        "unipc", {**_UNIPC_KARRAS, "solver_type": "bh1", "final_sigmas_type": "sigma_min"}, id="unipc-bh1"
    ),
    pytest.param(
        "unipc", {**_SD1, "disable_corrector": [0, 3], "solver_type": "midpoint"}, id="unipc-no-corrector"
    ),
    pytest.param(
        "unipc", {**_SD2, "_use_default_values": ["prediction_type"]}, id="unipc-use-default-values"
    ),
]


@pytest.mark.parametrize("strength", [0.6, 1.0])
@pytest.mark.parametrize("steps", [10, 20])  # either side of DPM-Solver's lower_order_final cutoff (15)
@pytest.mark.parametrize(("name", "config"), OPTION_CASES)
def test_config_options_match_diffusers(name, config, steps, strength):
    ours = our_img2img(make_scheduler(name, config), steps, strength)
    max_difference(ours, diffusers_img2img(name, config, steps, strength))


@pytest.mark.parametrize("config_name", CONFIGS)
@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_config_resolves_like_from_config(name, config_name):
    """Every field of our resolved config equals the diffusers class's config built from the same dict."""
    cls, kwargs = DIFFUSERS_EQUIVALENT[name]
    reference = cls.from_config(CONFIGS[config_name], **kwargs).config
    ours = make_scheduler(name, CONFIGS[config_name]).config
    for field in dataclasses.fields(ours):
        expected = getattr(reference, field.name, None)  # DPM's sigma bounds exist only if the dict has them
        expected = tuple(expected) if isinstance(expected, list) else expected
        assert getattr(ours, field.name) == expected, field.name


def test_ddim_clips_by_default_when_the_config_does_not_say():
    config = {k: v for k, v in SD2_DDIM_VPRED_TRAILING.items() if k != "clip_sample"}
    scheduler = make_scheduler("ddim", config)
    assert scheduler.config.clip_sample is True
    clipped = our_img2img(scheduler, 25, 1.0)
    max_difference(clipped, diffusers_img2img("ddim", config, 25, 1.0))
    unclipped = our_img2img(make_scheduler("ddim", {**config, "clip_sample": False}), 25, 1.0)
    assert not torch.equal(clipped.latents[-1], unclipped.latents[-1])


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_a_row_depends_only_on_its_generator(name):
    scheduler = make_scheduler(name, SD1_PNDM_LEADING)
    batch = our_img2img(scheduler, 10, 0.8, eta=0.5)
    alone = our_img2img(scheduler, 10, 0.8, eta=0.5, rows=slice(1, 2))
    assert torch.equal(alone.latents[-1], batch.latents[-1][1:2])


def test_prediction_type_override_matches_diffusers():
    scheduler = make_scheduler("euler", SD1_PNDM_LEADING)
    overridden = scheduler.with_prediction_type("v_prediction")
    assert (scheduler.prediction_type, overridden.prediction_type) == ("epsilon", "v_prediction")
    assert overridden.name == "euler"
    reference = diffusers_img2img("euler", SD1_PNDM_LEADING, 25, 0.75, prediction_type="v_prediction")
    max_difference(our_img2img(overridden, 25, 0.75), reference)


def test_prediction_type_override_is_validated():
    with pytest.raises(ValueError, match="prediction_type"):
        make_scheduler("pndm", SD1_PNDM_LEADING).with_prediction_type("sample")


def test_unknown_name_lists_the_names():
    with pytest.raises(ValueError, match="euler_a, dpmpp_2m"):
        make_scheduler("heun", SD1_PNDM_LEADING)


@pytest.mark.parametrize(
    ("steps", "strength", "message"),
    [
        (10, 0.05, "zero denoising steps"),
        (1, 0.99, "zero denoising steps"),
        (10, -0.1, "strength must be in"),
        (10, 1.5, "strength must be in"),
        (0, 0.5, "num_inference_steps must be at least 1"),
    ],
)
def test_start_rejects_runs_without_steps(steps, strength, message):
    with pytest.raises(ValueError, match=message):
        make_scheduler("euler", SD1_PNDM_LEADING).start(steps, strength)


@pytest.mark.parametrize(
    ("name", "config", "key"),
    [
        ("ddim", {**SD1_PNDM_LEADING, "thresholding": True}, "thresholding"),
        ("euler", {**SD1_PNDM_LEADING, "use_exponential_sigmas": True}, "use_exponential_sigmas"),
        ("euler", {**SD1_PNDM_LEADING, "interpolation_type": "log_linear"}, "interpolation_type"),
        ("euler", {**SD2_DDIM_VPRED_TRAILING, "timestep_type": "continuous"}, "timestep_type"),
        ("euler_a", {**SD1_PNDM_LEADING, "prediction_type": "sample"}, "prediction_type"),
        ("lms", {**SD1_PNDM_LEADING, "use_beta_sigmas": True}, "use_beta_sigmas"),
        ("dpmpp_2m", {**SD1_PNDM_LEADING, "variance_type": "learned_range"}, "variance_type"),
        ("dpmpp_2m", {**SD1_PNDM_LEADING, "timestep_spacing": "uniform"}, "timestep_spacing"),
        ("unipc", {**SD1_PNDM_LEADING, "predict_x0": False}, "predict_x0"),
        ("unipc", {**SD1_PNDM_LEADING, "solver_type": "bh1"}, "solver_type"),
        ("pndm", {**SD1_PNDM_LEADING, "beta_schedule": "sigmoid"}, "beta_schedule"),
    ],
)
def test_unsupported_config_values_are_refused(name, config, key):
    with pytest.raises(ValueError, match=f"{key}="):
        make_scheduler(name, config)


def test_pndm_runge_kutta_needs_four_steps():
    with pytest.raises(ValueError, match="num_inference_steps >= 4"):
        make_scheduler("pndm", SD2_DDIM_VPRED_TRAILING).start(3, 1.0)


def test_steps_must_run_in_order():
    run = make_scheduler("dpmpp_2m", SD1_PNDM_LEADING).start(10, 1.0)
    x = torch.zeros(1, 4, 8, 8)
    with pytest.raises(ValueError, match="expected step 0, got 1"):
        run.step(x, 1, x, generators(SEEDS[:1]))


def test_stochastic_steps_need_one_generator_per_row():
    run = make_scheduler("euler_a", SD1_PNDM_LEADING).start(10, 1.0)
    x = torch.zeros(3, 4, 8, 8)
    with pytest.raises(ValueError, match="one generator per batch row"):
        run.step(x, 0, x, generators(SEEDS[:1]))


def diffusers_expert_slice(name, config, steps, denoising_start=None, denoising_end=None) -> Trajectory:
    """diffusers' SDXL img2img get_timesteps with denoising_start, then its denoising_end truncation; the
    input is taken as partly denoised latents when denoising_start is set (no noise added)."""
    cls, kwargs = DIFFUSERS_EQUIVALENT[name]
    scheduler = cls.from_config(config, **kwargs)
    scheduler.set_timesteps(steps)
    train = scheduler.config.num_train_timesteps
    if denoising_start is None:
        timesteps = scheduler.timesteps
        begin = 0
    else:
        cutoff = int(round(train - denoising_start * train))
        count = int((scheduler.timesteps < cutoff).sum().item())
        begin = len(scheduler.timesteps) - count
        timesteps = scheduler.timesteps[begin:]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(begin)
    if denoising_end is not None:
        cutoff = int(round(train - denoising_end * train))
        timesteps = timesteps[: len([t for t in timesteps if t >= cutoff])]
    z0, noise = latents_and_noise()
    x = z0
    if denoising_start is None:
        x = scheduler.add_noise(z0, noise, timesteps[:1].repeat(len(SEEDS)))
    accepted = inspect.signature(scheduler.step).parameters
    step_kwargs = {"generator": generators()} if "generator" in accepted else {}
    latents = [x]
    for t in timesteps:
        x = scheduler.step(fake_unet(scheduler.scale_model_input(x, t), t), t, x, **step_kwargs)[0]
        latents.append(x)
    return Trajectory(timesteps, latents)


def our_expert_slice(name, config, steps, denoising_start=None, denoising_end=None) -> Trajectory:
    run = make_scheduler(name, config).start(
        steps, 1.0, denoising_start=denoising_start, denoising_end=denoising_end
    )
    z0, noise = latents_and_noise()
    x = z0 if denoising_start is not None else run.add_noise(z0, noise)
    latents, row_generators = [x], generators()
    for i, t in enumerate(run.timesteps):
        x = run.step(fake_unet(run.scale_model_input(x, i), t), i, x, row_generators)
        latents.append(x)
    return Trajectory(run.timesteps, latents)


@pytest.mark.parametrize(
    ("denoising_start", "denoising_end"), [(None, 0.8), (0.8, None), (0.3, 0.7), (None, 0.35), (0.55, None)]
)
@pytest.mark.parametrize("config_name", CONFIGS)
@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_denoising_start_and_end_match_diffusers(name, config_name, denoising_start, denoising_end):
    config = CONFIGS[config_name]
    ours = our_expert_slice(name, config, 20, denoising_start, denoising_end)
    max_difference(ours, diffusers_expert_slice(name, config, 20, denoising_start, denoising_end))


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_base_end_and_refiner_start_split_one_schedule(name):
    """Base up to denoising_end=d and refiner from denoising_start=d run every step of the schedule once."""
    scheduler = make_scheduler(name, SD1_PNDM_LEADING)
    full = scheduler.start(25, 1.0).timesteps
    base = scheduler.start(25, 1.0, denoising_end=0.8).timesteps
    refiner = scheduler.start(25, 1.0, denoising_start=0.8).timesteps
    assert torch.equal(torch.cat([base, refiner]), full)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"denoising_start": 1.0}, "strictly between 0 and 1"),
        ({"denoising_end": 0.0}, "strictly between 0 and 1"),
        ({"denoising_start": 0.6, "denoising_end": 0.4}, "must be below denoising_end"),
        ({"denoising_start": 0.999}, "leave none of"),
    ],
)
def test_bad_denoising_ranges_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_scheduler("euler", SD1_PNDM_LEADING).start(10, 1.0, **kwargs)
