"""edge-run quant: numeric formats (one class each, registered by name), GPTQ, recipes, and
packers into target layouts (ORT MatMulNBits, GGUF blocks). Knows nothing about graphs."""
from . import formats  # noqa: F401  (registers the formats)
from .base import BLOCK_SIZES, BlockParams, QuantFormat, QuantizedTensor, format_names, get_format, register_format
from .gptq import gptq_quantize
from .recipe import PRESETS, Calibration, Recipe, TensorRule, load_recipe

__all__ = ["BLOCK_SIZES", "PRESETS", "BlockParams", "Calibration", "QuantFormat", "QuantizedTensor", "Recipe",
           "TensorRule", "format_names", "get_format", "gptq_quantize", "load_recipe", "register_format"]
