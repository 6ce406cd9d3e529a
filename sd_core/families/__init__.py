"""Model families (SD 1.x, SD 2.x, SDXL base and refiner) as data, and telling which one a model is."""

from sd_core.families.catalog import (
    FAMILIES,
    SD1,
    SD2,
    SDXL_BASE,
    SDXL_REFINER,
    SUPPORTED,
    bundled_config,
    family_named,
    family_of_configs,
)
from sd_core.families.detection import UNET_PREFIX, VAE_PREFIX, detect_family, read_header_shapes
from sd_core.families.family import TIME_ID_WIDTHS, ModelFamily, TextTower, TimeIds

__all__ = [
    "FAMILIES",
    "SD1",
    "SD2",
    "SDXL_BASE",
    "SDXL_REFINER",
    "SUPPORTED",
    "TIME_ID_WIDTHS",
    "UNET_PREFIX",
    "VAE_PREFIX",
    "ModelFamily",
    "TextTower",
    "TimeIds",
    "bundled_config",
    "detect_family",
    "family_named",
    "family_of_configs",
    "read_header_shapes",
]
