"""sd_core: Stable Diffusion 1.x/2.x img2img in plain PyTorch, numerically identical to diffusers.

Knows nothing of Ray or storage: tensors or PIL images in, tensors or PIL images out.
"""

__all__ = ["Img2ImgPipeline"]


def __getattr__(name: str):
    # Lazy so that `import sd_core.schedulers` (say) does not pull in the whole pipeline.
    if name == "Img2ImgPipeline":
        from sd_core.pipeline import Img2ImgPipeline

        return Img2ImgPipeline
    raise AttributeError(f"module 'sd_core' has no attribute {name!r}")
