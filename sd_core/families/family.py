"""What a model family is, as data: its text towers, its micro-conditioning and its loading defaults.

The pipeline is written once against these fields; a family adds no branch to it. ComfyUI's
`supported_models.py` is the model for this: each family is one small record.
"""

from __future__ import annotations

from dataclasses import dataclass

# Micro-conditioning values (SDXL's `add_time_ids`) and how many numbers each one is.
TIME_ID_WIDTHS = {
    "original_size": 2,
    "negative_original_size": 2,
    "crops_coords_top_left": 2,
    "negative_crops_coords_top_left": 2,
    "target_size": 2,
    "negative_target_size": 2,
    "aesthetic_score": 1,
    "negative_aesthetic_score": 1,
}


@dataclass(frozen=True)
class TextTower:
    """One text encoder of a family, and how its hidden states become the UNet's conditioning."""

    component: str  # "text_encoder" / "text_encoder_2": its folder in a diffusers layout
    tokenizer: str  # "tokenizer" / "tokenizer_2"
    hidden_act: str  # "quick_gelu" (OpenAI CLIP) or "gelu" (OpenCLIP): tells the towers of a folder apart
    projection: bool  # a CLIPTextModelWithProjection, whose projected pooled vector conditions the UNet
    # Token states: hidden_states[-(1 + layer_offset + clip_skip)], through the final LayerNorm or not.
    # SD1/SD2 take the last layer normalised; SDXL the penultimate one as it is.
    layer_offset: int
    final_layer_norm: bool
    checkpoint_prefix: str  # where its weights sit in a CompVis/SGM single-file checkpoint
    checkpoint_layout: str  # "clip" (transformers' key names) or "open_clip" (fused q/k/v, resblocks)
    pad_token: str  # the padding token of its tokenizer ("!" for OpenCLIP-trained towers)
    kohya_prefixes: tuple[str, ...]  # how kohya/A1111 LoRA keys name it: lora_te_, lora_te1_, lora_te2_
    embedding_key: str | None  # its tensor in SDXL textual-inversion files (clip_l / clip_g); None: SD1/2


@dataclass(frozen=True)
class TimeIds:
    """SDXL's micro-conditioning: the values concatenated into `time_ids`, for prompts and negatives.

    The names are the pipeline's keyword arguments; diffusers' base pipeline uses the positive crop for
    the negative ids too, which `negative` reproduces by naming it."""

    positive: tuple[str, ...]
    negative: tuple[str, ...]

    @property
    def width(self) -> int:
        return sum(TIME_ID_WIDTHS[name] for name in self.positive)

    @property
    def options(self) -> tuple[str, ...]:
        """The call arguments these ids read, in order, each once."""
        return tuple(dict.fromkeys(self.positive + self.negative))


@dataclass(frozen=True)
class ModelFamily:
    """A Stable Diffusion family: everything about it that is not weights or a config.json."""

    name: str  # "v1", "v2", "xl_base", "xl_refiner": bundled config folder, detection result
    label: str  # "SD 1.x", ... for messages and metadata
    towers: tuple[TextTower, ...]
    time_ids: TimeIds | None = None  # None: the UNet has no added (text_time) embedding
    zero_negatives: bool = False  # diffusers' force_zeros_for_empty_prompt default for the family
    vae_force_upcast: bool = False  # the pipeline honours the VAE config's force_upcast (SDXL's does)

    @property
    def components(self) -> tuple[str, ...]:
        """The model folders of its diffusers layout that hold weights."""
        return ("unet", "vae", *(tower.component for tower in self.towers))

    @property
    def pooled_tower(self) -> TextTower | None:
        """The tower whose projected pooled vector conditions the UNet (SDXL); None for SD1/SD2."""
        return next((tower for tower in self.towers if tower.projection), None)

    def tower(self, component: str) -> TextTower:
        for tower in self.towers:
            if tower.component == component:
                return tower
        raise KeyError(f"{self.label} has no {component}")

    @property
    def call_options(self) -> tuple[str, ...]:
        """The family's own keyword arguments of the pipeline call (beyond those every family takes)."""
        second_prompts = ("prompts_2", "negative_prompts_2") if len(self.towers) > 1 else ()
        return second_prompts + (self.time_ids.options if self.time_ids else ())

    @property
    def description(self) -> str:
        """The family and where a single-file checkpoint keeps its text towers."""
        where = " + ".join(f"{tower.checkpoint_prefix}*" for tower in self.towers)
        return f"{self.label} ({where})"
