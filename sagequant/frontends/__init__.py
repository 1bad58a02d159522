"""Frontends for input models other than torch modules (the torch / transformers frontend is
ir/trace.py). Each produces a quantized model with the same QuantConfig, QuantSpecs and formats."""
