"""compressed-tensors checkpoint emitter (vLLM / transformers loadable)."""
