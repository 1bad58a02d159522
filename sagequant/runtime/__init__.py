"""runtime: generation over a paged, optionally quantized KV cache (continuous batching), and
speculative decoding with a draft model."""
from .engine import GenerationEngine, TokenEvent  # noqa: F401
