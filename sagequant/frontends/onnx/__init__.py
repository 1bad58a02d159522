"""ONNX input models: quantize an exported LLM graph with passes over its onnx-graphsurgeon form
(graph.py: load, checks, linears, norm groups; calibrate.py: statistics through onnxruntime;
balance.py: SmoothQuant / AWQ folding; compile.py: the pipeline and the compiled model).

This is a separate frontend rather than passes/ because passes/ rewrite the torch.fx QuantGraph
under the PassManager; an ONNX graph is a different IR with its own node and tensor model. What
is shared is everything below the IR: QuantConfig, QuantSpec / formats numerics, the SmoothQuant /
AWQ math, the observers, and the ONNX emitters (backends/onnxruntime, backends/tensorrt).
"""
from .compile import OnnxCompiledModel, compile_onnx  # noqa: F401
from .graph import OnnxInputError  # noqa: F401
