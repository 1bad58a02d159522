"""ONNX Runtime emitter: the lowered QuantGraph as ONNX — standard QDQ (opset 21 block-quantized
DequantizeLinear, Q/DQ on activations) or ONNX Runtime's com.microsoft::MatMulNBits.

Two steps, each its own module:
  capture.py   lowered fx graph -> ONNX, every quantized linear one placeholder node
               `sagequant::QLinear` that still holds our packed codes, scales and QuantSpec;
  qdq.py / matmulnbits.py   rewrite each placeholder (onnx-graphsurgeon) into the target form.
The TensorRT emitter (backends/tensorrt) reuses the capture and writes its own form.
Nothing here is imported by `sagequant` at import time: onnx / onnxscript load on first export.
"""
