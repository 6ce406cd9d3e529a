"""Issue #7, benchmarks 1 and 5: our img2img core against diffusers, and how close each gets to the machine.

Both pipelines load the same random-weight model folder (the real SD1.5 architecture; `--quick` uses the
tiny SD1-style test architecture instead) and get the same images, prompts, negative prompts, seeds (one
seeded CPU generator per row, as the parity tests do), scheduler, strength, guidance and steps. One call
each first checks that the outputs match (max |Δ| on `output_type="np"`) and serves as the warm-up; then
the two are timed interleaved (A B A B ...).

Where the time goes is measured with forward hooks on the same four modules in both pipelines (text
encoder, VAE encoder, VAE decoder, UNet), so neither pipeline's internals are touched: the denoise loop is
the span from the start of the first UNet call to the end of the last (it includes the scheduler steps and
the CFG arithmetic in between). FLOPs are counted with `torch.utils.flop_counter.FlopCounterMode` on one
call of each module at the benchmark's shapes (the UNet at the CFG batch 2×B); the machine's peak is the
best of repeated large square matmuls in the benchmark's dtype.

    python -m bench.core_vs_diffusers [--quick] [--device cpu|cuda] [--dtype ...] [--size N] [--batch B ...]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402
import torch  # noqa: E402

from bench.common import interleaved, plot_panel, print_table, save, summary  # noqa: E402
from tests.diffusers_models import write_diffusers_model  # noqa: E402

CACHE = Path(__file__).resolve().parent / ".cache"
CONFIGS = Path(__file__).resolve().parents[1] / "sd_core" / "configs" / "v1"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PROMPTS = [
    "a photo of a cat sitting on a windowsill",
    "an oil painting of a harbour at night",
    "a watercolour of mountains at dawn",
    "a pencil sketch of an old bicycle",
]
NEGATIVE = "blurry, low quality, jpeg artifacts"
GUIDANCE = 7.5
SEED = 0  # weights
# Largest max |Δ| (np output in [0, 1]) still counted as "the same work": fp32 rounding vs half precision.
PARITY_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 0.1, torch.float16: 0.05}


# -- the model -------------------------------------------------------------------------------------


def model_configs(quick: bool) -> dict[str, dict]:
    """diffusers config dicts: the bundled SD1.5 configs, or the tiny SD1-style test configs."""
    if quick:
        from sd_core.tiny_configs import TINY_V1

        return {k: dict(v) for k, v in TINY_V1.items()}
    return {
        name: json.loads((CONFIGS / f"{name}.json").read_text())
        for name in ("unet", "vae", "text_encoder", "scheduler", "tokenizer")
    }


def model_folder(quick: bool) -> Path:
    """A diffusers folder (safetensors) of seeded random weights, written once and reused."""
    configs = model_configs(quick)
    digest = hashlib.sha256(json.dumps([configs, SEED], sort_keys=True).encode()).hexdigest()[:16]
    folder = CACHE / ("sd15-tiny-random" if quick else "sd15-random")
    stamp = folder / "bench-model.json"
    if stamp.exists() and json.loads(stamp.read_text()).get("digest") == digest:
        return folder
    print(f"writing random-weight model to {folder} (once) ...", flush=True)
    started = time.perf_counter()
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    write_diffusers_model(partial, configs, SEED)  # diffusers' writer, shared with the test fixtures
    (partial / "bench-model.json").write_text(json.dumps({"digest": digest, "seed": SEED, "quick": quick}))
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    print(f"  done in {time.perf_counter() - started:.0f} s", flush=True)
    return folder


def load_pipelines(folder: Path, device: torch.device, dtype: torch.dtype, args: argparse.Namespace):
    """(ours, diffusers') on `device` in `dtype`, both running `args.scheduler` built from the model's config;
    diffusers as it comes, ours with the speed settings `args` names (channels-last, compile)."""
    import diffusers

    from sd_core import Img2ImgPipeline

    theirs = diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(
        str(folder), safety_checker=None, requires_safety_checker=False, dtype=dtype
    ).to(device)
    theirs.set_progress_bar_config(disable=True)
    cls = {"pndm": diffusers.PNDMScheduler, "ddim": diffusers.DDIMScheduler}[args.scheduler]
    theirs.scheduler = cls.from_config(theirs.scheduler.config)
    ours = Img2ImgPipeline.from_pretrained(
        folder, device=device, dtype=dtype, scheduler=args.scheduler, channels_last=args.channels_last == "on"
    )
    if args.compile != "off":
        ours.compile_unet(None if args.compile == "default" else args.compile)
    return ours, theirs


def make_images(count: int, size: int, seed: int = 0) -> list[PIL.Image.Image]:
    """Distinct smooth random RGB images (a blurred noise field, so the VAE sees image-like input)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, 3, max(size // 16, 2), max(size // 16, 2), generator=g)
    smooth = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    arrays = (smooth.clamp(0, 1) * 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [PIL.Image.fromarray(a) for a in arrays]


# -- timing by forward hooks -----------------------------------------------------------------------


class PhaseClock:
    """Start/end stamps of every call of some modules: perf_counter on CPU, CUDA events on GPU (no syncs
    inside the call; one `synchronize` in `collect`)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.calls: dict[str, list[tuple[Any, Any]]] = {}
        self._open: dict[str, Any] = {}
        self._handles: list[Any] = []

    def attach(self, name: str, module: torch.nn.Module) -> None:
        self.calls[name] = []
        self._handles += [
            module.register_forward_pre_hook(lambda _m, _a: self._open.__setitem__(name, self._stamp())),
            module.register_forward_hook(
                lambda _m, _a, _o: self.calls[name].append((self._open.pop(name), self._stamp()))
            ),
        ]

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _stamp(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _seconds(self, start, end) -> float:
        return start.elapsed_time(end) / 1e3 if self.cuda else end - start

    def reset(self) -> None:
        for calls in self.calls.values():
            calls.clear()

    def collect(self) -> dict[str, dict[str, float]]:
        """{module: {calls, busy_s (sum of call durations), span_s (first start to last end)}}."""
        if self.cuda:
            torch.cuda.synchronize()
        out = {}
        for name, calls in self.calls.items():
            if not calls:
                out[name] = {"calls": 0, "busy_s": 0.0, "span_s": 0.0}
                continue
            out[name] = {
                "calls": len(calls),
                "busy_s": sum(self._seconds(s, e) for s, e in calls),
                "span_s": self._seconds(calls[0][0], calls[-1][1]),
            }
        return out


def clock_for(pipe, device: torch.device) -> PhaseClock:
    """The same four modules in either pipeline (both name them alike)."""
    clock = PhaseClock(device)
    clock.attach("text_encoder", pipe.text_encoder)
    clock.attach("vae_encoder", pipe.vae.encoder)
    clock.attach("vae_decoder", pipe.vae.decoder)
    clock.attach("unet", pipe.unet)
    return clock


# -- FLOPs and peak --------------------------------------------------------------------------------


def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def count_flops(fn) -> int:
    """FLOPs (2 × MAC) of `fn()`: matmuls, convolutions and attention (CPU SDPA included: torch's counter
    has no formula for `_scaled_dot_product_flash_attention_for_cpu`, so we register the standard one)."""
    from torch.utils.flop_counter import FlopCounterMode

    mapping = {}
    cpu_sdpa = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_sdpa is not None:
        mapping[cpu_sdpa] = _cpu_sdpa_flop
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    return int(counter.get_total_flops())


def model_flops(ours, theirs, batch: int, size: int, device, dtype, cfg: bool) -> dict[str, Any]:
    """FLOPs of one call of each component at the benchmark's shapes, counted on both implementations."""
    latent = size // ours.vae_scale_factor
    rows = 2 * batch if cfg else batch
    x = torch.randn(rows, 4, latent, latent, device=device, dtype=dtype)
    t = torch.tensor(500, device=device)
    context = torch.randn(rows, 77, ours.text_encoder.config.hidden_size, device=device, dtype=dtype)
    pixels = torch.rand(batch, 3, size, size, device=device, dtype=dtype) * 2 - 1
    z = torch.randn(batch, 4, latent, latent, device=device, dtype=dtype)
    ids = ours.tokenizer([PROMPTS[0]] * batch, padding="max_length", max_length=77, return_tensors="pt")
    ids = ids.input_ids.to(device)
    counts = {
        "ours": {
            "unet_call": count_flops(lambda: getattr(ours.unet, "eager_forward", ours.unet)(x, t, context)),
            "vae_encode": count_flops(lambda: ours.vae.encode(pixels)),
            "vae_decode": count_flops(lambda: ours.vae.decode(z)),
            "text_encode": count_flops(lambda: ours.text_encoder(ids)),
        },
        "diffusers": {
            "unet_call": count_flops(
                lambda: theirs.unet(x, t, encoder_hidden_states=context, return_dict=False)
            ),
            "vae_encode": count_flops(lambda: theirs.vae.encode(pixels)),
            "vae_decode": count_flops(lambda: theirs.vae.decode(z)),
            "text_encode": count_flops(lambda: theirs.text_encoder(ids)),
        },
    }
    return {
        "unet_rows": rows,
        "vae_rows": batch,
        "text_rows": batch,
        **counts,
        "same_counts": counts["ours"] == counts["diffusers"],
    }


def measure_peak(device: torch.device, dtype: torch.dtype, n: int, repeats: int) -> dict[str, Any]:
    """Best-of `repeats` timings of an n×n @ n×n matmul: the machine's practical dense peak in `dtype`."""
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device, dtype)
    b = torch.randn(n, n, generator=g).to(device, dtype)
    inner = 1 if device.type == "cpu" else 20  # GPU: amortise launch and event overhead

    def once() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(inner):
            torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - started) / inner

    once()  # warm-up
    seconds = [once() for _ in range(repeats)]
    flops = 2 * n**3
    return {
        "method": f"best of {repeats} × torch.mm({n}x{n}, {n}x{n}) in {str(dtype).removeprefix('torch.')}"
        + (f", {inner} per timing" if inner > 1 else ""),
        "n": n,
        "flop_per_matmul": flops,
        "best_s": min(seconds),
        "median_s": statistics.median(seconds),
        "peak_flops": flops / min(seconds),
    }


# -- one batch size --------------------------------------------------------------------------------


def bench_batch(ours, theirs, args, batch: int) -> dict[str, Any]:
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    images = make_images(batch, args.size, seed=batch)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    negatives = [NEGATIVE] * batch
    seeds = [1000 + i for i in range(batch)]
    common = dict(strength=args.strength, guidance_scale=GUIDANCE, num_inference_steps=args.steps)

    def run_ours():
        return ours(images, prompts, negative_prompts=negatives, seeds=seeds, output_type="np", **common)

    def run_theirs():
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        return theirs(
            image=images,
            prompt=prompts,
            negative_prompt=negatives,
            generator=generators,
            output_type="np",
            **common,
        ).images

    clocks = {"ours": clock_for(ours, device), "diffusers": clock_for(theirs, device)}
    calls = {"ours": run_ours, "diffusers": run_theirs}

    # 1. Same work? One call each (also the warm-up).
    print(f"batch {batch}: parity check ...", flush=True)
    outputs = {}
    for name in ("diffusers", "ours"):
        clocks[name].reset()
        outputs[name] = np.asarray(calls[name](), dtype=np.float32)
    check_phases = {name: clocks[name].collect() for name in clocks}
    delta = np.abs(outputs["ours"] - outputs["diffusers"])
    theirs_out = outputs["diffusers"]
    parity = {
        "max_abs_diff": float(delta.max()),
        "mean_abs_diff": float(delta.mean()),
        "tolerance": PARITY_TOLERANCE[dtype],
        "ok": bool(delta.max() <= PARITY_TOLERANCE[dtype]),
        "output_shape": list(theirs_out.shape),
        # A check on saturated outputs (all 0 or 1 after clamping) would prove nothing: show it is not.
        "output_std": float(theirs_out.std()),
        "unsaturated_fraction": float(((theirs_out > 0) & (theirs_out < 1)).mean()),
        "unet_calls": {name: check_phases[name]["unet"]["calls"] for name in clocks},
    }
    if parity["unet_calls"]["ours"] != parity["unet_calls"]["diffusers"]:
        parity["ok"] = False

    # 2. FLOPs of each component at these shapes.
    print(f"batch {batch}: counting FLOPs ...", flush=True)
    flops = model_flops(ours, theirs, batch, args.size, device, dtype, cfg=GUIDANCE > 1)
    f = flops["diffusers"]
    unet_calls = parity["unet_calls"]["diffusers"]
    text_calls = 2 if GUIDANCE > 1 else 1  # prompt + negative: the model's work (ours caches negatives)
    loop_flops = f["unet_call"] * unet_calls
    image_flops = loop_flops + f["vae_encode"] + f["vae_decode"] + text_calls * f["text_encode"]

    # 3. Interleaved timing; the hooks record where each timed call spent its time.
    print(f"batch {batch}: timing {args.repeats} interleaved rounds ...", flush=True)
    phases: dict[str, list[dict]] = {name: [] for name in calls}

    def timed(name):
        def run():
            clocks[name].reset()
            calls[name]()
            phases[name].append(clocks[name].collect())

        return run

    seconds = interleaved({name: timed(name) for name in calls}, repeats=args.repeats, warmup=args.warmup)
    for clock in clocks.values():
        clock.detach()

    sides = {}
    for name in calls:
        total = summary(seconds[name])
        loop = summary([p["unet"]["span_s"] for p in phases[name]])
        unet_busy = statistics.median(p["unet"]["busy_s"] for p in phases[name])
        parts = {
            part: statistics.median(p[part]["busy_s"] for p in phases[name])
            for part in ("text_encoder", "vae_encoder", "vae_decoder")
        }
        other = statistics.median(
            wall - p["unet"]["span_s"] - sum(p[part]["busy_s"] for part in parts)
            for wall, p in zip(seconds[name], phases[name], strict=True)
        )
        loop_rate = loop_flops / loop["median_s"]
        call_rate = image_flops / total["median_s"]
        sides[name] = {
            "call": total,
            "images_per_s": batch / total["median_s"],
            "images_per_s_best": batch / total["min_s"],  # the least disturbed run
            "denoise_loop": loop,
            "unet_busy_s": unet_busy,
            "phases_median_s": {**parts, "denoise_loop": loop["median_s"], "other": other},
            "text_encoder_calls": phases[name][-1]["text_encoder"]["calls"],
            "vae_encoder_calls": phases[name][-1]["vae_encoder"]["calls"],
            "denoise_flops_per_s": loop_rate,
            "denoise_best_flops_per_s": loop_flops / loop["min_s"],
            "unet_busy_flops_per_s": loop_flops / unet_busy,
            "call_flops_per_s": call_rate,
        }
    return {
        "batch": batch,
        "parity": parity,
        "flops": {
            **flops,
            "unet_calls_per_image_batch": unet_calls,
            "denoise_loop": loop_flops,
            "whole_call": image_flops,
            "per_image_tflop": image_flops / batch / 1e12,
        },
        "ours": sides["ours"],
        "diffusers": sides["diffusers"],
        "ratio_images_per_s": sides["ours"]["images_per_s"] / sides["diffusers"]["images_per_s"],
        "ratio_denoise_loop_speed": sides["diffusers"]["denoise_loop"]["median_s"]
        / sides["ours"]["denoise_loop"]["median_s"],
    }


# -- main ------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.core_vs_diffusers", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny SD1-style architecture: seconds, not minutes"
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument(
        "--size", type=int, help="image side in pixels (default: 256 CPU, 512 CUDA, 128 quick)"
    )
    parser.add_argument("--batch", type=int, nargs="+", help="batch sizes (default: 1 on CPU, 1 8 on CUDA)")
    parser.add_argument("--steps", type=int, help="num_inference_steps (default: 20 CPU, 50 CUDA)")
    parser.add_argument("--strength", type=float, help="img2img strength (default: 0.5 CPU, 0.75 CUDA)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per implementation (default 3)")
    parser.add_argument(
        "--warmup",
        type=int,
        default=0,
        help="extra untimed rounds (default 0: the parity-check call of each is already a warm-up)",
    )
    parser.add_argument(
        "--scheduler",
        choices=["pndm", "ddim"],
        default="pndm",
        help="sampler for both (default pndm, SD1.5's own: it runs int(steps*strength)+1 UNet calls)",
    )
    parser.add_argument(
        "--peak-size", type=int, help="matmul side for the peak (default 4096 CPU, 8192 CUDA)"
    )
    parser.add_argument(
        "--channels-last",
        choices=["auto", "on", "off"],
        default="auto",
        help="our pipeline's weights channels-last (NHWC): on, off, or auto (default: the pipeline's "
        "default, off)",
    )
    parser.add_argument(
        "--compile",
        default="off",
        help="torch.compile our UNet: off (default), default, or a torch.compile mode such as "
        "max-autotune-no-cudagraphs; the parity call compiles and warms up",
    )
    args = parser.parse_args(argv)
    gpu = args.device == "cuda"
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    args.size = args.size or (512 if gpu else 128 if args.quick else 256)
    args.batch = args.batch or ([1, 8] if gpu else [1])
    args.steps = args.steps or (50 if gpu else 20)
    args.strength = args.strength if args.strength is not None else (0.75 if gpu else 0.5)
    args.peak_size = args.peak_size or (8192 if gpu else 2048 if args.quick else 4096)
    if gpu and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    load_before = os.getloadavg()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if device.type == "cuda":
        # Same kernels for both sides; TF32 would only matter for fp32 runs.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False

    folder = model_folder(args.quick)
    print(f"measuring peak ({args.peak_size}² matmul, {args.dtype}) ...", flush=True)
    peak = measure_peak(device, dtype, args.peak_size, repeats=5)
    ours, theirs = load_pipelines(folder, device, dtype, args)
    runs = [bench_batch(ours, theirs, args, batch) for batch in args.batch]
    # Measured again at the end, best of both: a busy moment can only make the peak look lower.
    again = measure_peak(device, dtype, args.peak_size, repeats=5)
    peak["peak_flops_start"], peak["peak_flops_end"] = peak["peak_flops"], again["peak_flops"]
    peak["peak_flops"] = max(peak["peak_flops"], again["peak_flops"])
    peak["method"] += ", at the start and at the end, best of both"
    for run in runs:
        for name in ("ours", "diffusers"):
            side = run[name]
            for key in ("denoise", "denoise_best", "unet_busy", "call"):
                side[f"{key}_fraction_of_peak"] = side[f"{key}_flops_per_s"] / peak["peak_flops"]

    config = {
        "model": "tiny SD1-style random weights (sd_core.tiny_configs.TINY_V1) — NOT SD1.5-sized"
        if args.quick
        else "SD1.5 architecture (sd_core/configs/v1), random weights",
        "weights": f"diffusers from_config, torch.manual_seed({SEED}) default init; "
        f"{folder.name}/ in safetensors",
        "quick": args.quick,
        "device": args.device,
        "dtype": args.dtype,
        "size": args.size,
        "batches": args.batch,
        "num_inference_steps": args.steps,
        "strength": args.strength,
        "guidance_scale": GUIDANCE,
        "scheduler": args.scheduler,
        "negative_prompt": NEGATIVE,
        "output_type": "np",
        "repeats": args.repeats,
        "warmup": f"the parity-check call of each, + {args.warmup} untimed interleaved round(s)",
        "diffusers_setup": "StableDiffusionImg2ImgPipeline.from_pretrained(safety_checker=None, "
        "dtype), one seeded CPU generator per row",
        "ours_setup": "sd_core.Img2ImgPipeline.from_pretrained(device, dtype, scheduler, "
        f"channels_last={ours.channels_last})"
        + (f", compile_unet(mode={args.compile})" if args.compile != "off" else ""),
        "ours_channels_last": ours.channels_last,
        "ours_compile": args.compile,
        "method": {
            "timing": "interleaved A B A B wall time of whole calls (PIL in, np out); median reported",
            "phases": "forward pre/post hooks on text_encoder, vae.encoder, vae.decoder and unet of each "
            "pipeline (perf_counter on CPU, CUDA events on GPU); denoise loop = first UNet call start to "
            "last UNet call end (includes scheduler steps and CFG arithmetic); 'other' = call − loop − "
            "text − VAE (tokenising, image conversion, noise, posterior sampling, output conversion)",
            "flops": "torch.utils.flop_counter.FlopCounterMode on one call of each module at the benchmark "
            "shapes (UNet at CFG batch 2×B), counted on both implementations; matmul/conv/SDPA only "
            "(norms, activations ignored); CPU SDPA counted with torch's standard SDPA formula",
            "achieved": "denoise_flops_per_s = UNet FLOPs × UNet calls / denoise loop time; call_flops_per_s "
            "= (loop + VAE encode + decode + 2 text encodes) FLOPs / whole call time; "
            "fraction_of_peak = achieved / measured matmul peak; *_best from the fastest run (min time), "
            "the least disturbed when other processes share the machine",
        },
        "threads": torch.get_num_threads(),
    }
    results: dict[str, Any] = {
        "peak": peak,
        "runs": runs,
        "wall_s": time.perf_counter() - started,
        # Other processes on the same cores wreck CPU timings (OpenMP threads wait on descheduled ones).
        "load_average_1m": {"before": load_before[0], "after": os.getloadavg()[0]},
    }
    results["plot"] = _plot_panels(runs, args)
    path = save(result_name(args), config, results)
    _print(runs, peak, args)
    print(f"\nsaved {path} ({results['wall_s']:.0f} s)")
    busy = max(load_before[0], os.getloadavg()[0])
    # This process alone keeps about torch.get_num_threads() runnable; more means another was competing.
    if device.type == "cpu" and busy > torch.get_num_threads() + 0.75:
        print(
            f"WARNING: 1-minute load average reached {busy:.1f} on {os.cpu_count()} CPUs during the run: "
            "other processes shared the cores, so the timings (not the parity or FLOPs) are unreliable"
        )
    bad = [r["batch"] for r in runs if not r["parity"]["ok"]]
    if bad:
        print(f"WARNING: outputs differ beyond tolerance for batch {bad}: the timings compare different work")
        return 1
    return 0


def result_name(args: argparse.Namespace) -> str:
    """core_vs_diffusers[_quick] for the CPU default; device, dtype and speed settings appended otherwise."""
    name = "core_vs_diffusers" + ("_quick" if args.quick else "")
    if args.device != "cpu" or args.dtype != "float32":
        name += f"_{args.device}_{args.dtype}"
    if args.channels_last != "auto":
        name += "_nhwc" if args.channels_last == "on" else "_nchw"
    if args.compile != "off":
        name += f"_compile-{args.compile}"
    return name


def _plot_panels(runs: list[dict], args) -> list[dict]:
    tag = f"{'quick, tiny model' if args.quick else 'SD1.5 arch'}, {args.device} {args.dtype}, {args.size}²"
    tag += {"auto": "", "on": ", ours NHWC", "off": ", ours NCHW"}[args.channels_last]
    tag += f", ours compiled ({args.compile})" if args.compile != "off" else ""
    labels, values, notes, peak_labels, peak_values = [], [], [], [], []
    for r in runs:
        for name in ("ours", "diffusers"):
            labels.append(f"{name} b{r['batch']}")
            values.append(r[name]["images_per_s"])
            notes.append(f"ours/diffusers ×{r['ratio_images_per_s']:.2f}" if name == "ours" else "")
            peak_labels.append(f"{name} b{r['batch']}")
            peak_values.append(100 * r[name]["denoise_fraction_of_peak"])
    return [
        plot_panel(f"core vs diffusers: throughput ({tag})", labels, values, "images/s", annotations=notes),
        plot_panel(
            f"core vs diffusers: denoise loop, % of matmul peak ({tag})", peak_labels, peak_values, "%"
        ),
    ]


def _print(runs: list[dict], peak: dict, args) -> None:
    rows = []
    for r in runs:
        for name in ("ours", "diffusers"):
            s = r[name]
            ph = s["phases_median_s"]
            rows.append(
                [
                    r["batch"],
                    name,
                    s["images_per_s"],
                    s["images_per_s_best"],
                    f"{100 * s['call']['spread']:.1f}%",
                    ph["denoise_loop"],
                    ph["vae_encoder"] + ph["vae_decoder"],
                    ph["text_encoder"],
                    ph["other"],
                    s["denoise_flops_per_s"] / 1e9,
                    f"{100 * s['denoise_fraction_of_peak']:.1f}%",
                    f"{100 * s['denoise_best_fraction_of_peak']:.1f}%",
                    f"{100 * s['call_fraction_of_peak']:.1f}%",
                ]
            )
    print_table(
        f"core vs diffusers — {'QUICK (tiny model)' if args.quick else 'SD1.5 architecture'}, {args.device} "
        f"{args.dtype}, {args.size}², {args.steps} steps × {args.strength}, {args.scheduler}, CFG {GUIDANCE}",
        [
            "batch",
            "impl",
            "img/s",
            "best img/s",
            "spread",
            "loop s",
            "vae s",
            "text s",
            "other s",
            "loop GFLOP/s",
            "loop %peak",
            "best loop %peak",
            "call %peak",
        ],
        rows,
    )
    print(f"\npeak: {peak['peak_flops'] / 1e9:.1f} GFLOP/s ({peak['method']})")
    for r in runs:
        p, f = r["parity"], r["flops"]
        print(
            f"batch {r['batch']}: ours/diffusers images/s = {r['ratio_images_per_s']:.3f}, denoise loop "
            f"{r['ratio_denoise_loop_speed']:.3f}; max |Δ| = {p['max_abs_diff']:.2e} "
            f"({'ok' if p['ok'] else 'MISMATCH'}, unsaturated {100 * p['unsaturated_fraction']:.0f}%); "
            f"UNet {f['diffusers']['unet_call'] / 1e9:.1f} GFLOP/call "
            f"× {f['unet_calls_per_image_batch']} calls, "
            f"{f['per_image_tflop']:.3f} TFLOP/image; FLOP counts equal: {f['same_counts']}"
        )


if __name__ == "__main__":
    sys.exit(main())
