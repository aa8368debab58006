"""``flashmoe-convert``: repack an MLX MoE checkpoint into a flashmoe layout."""

from .convert import convert_checkpoint
from .errors import ConvertError

__all__ = ["ConvertError", "convert_checkpoint"]
