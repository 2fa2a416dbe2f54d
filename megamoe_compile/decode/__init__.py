"""Decoding with fixed shapes (CUDA-graph ready): DeepSeek-V4's static cache and the decode
forwards of its attention, compressors and indexer."""

from .v4_static_cache import DeepseekV4StaticCache
from .v4_static_decode import cache_keyword, disable_static_decode, enable_static_decode

__all__ = ["DeepseekV4StaticCache", "cache_keyword", "disable_static_decode", "enable_static_decode"]
