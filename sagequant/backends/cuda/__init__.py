"""backends/cuda: Triton and torch._scaled_mm / torch._int_mm kernels for W4A16, W8A16,
FP8-W8A16, W8A8-FP8 and W8A8-INT8. Importable without a GPU or triton; `kernels` defines the
rows (registered by backends/__init__.py), `layout` holds the CPU-testable planning (choose(),
thresholds, peer layouts)."""
