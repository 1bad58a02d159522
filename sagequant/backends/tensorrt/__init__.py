"""TensorRT emitter: explicit-quantization ONNX (Q/DQ placed by TensorRT's documented rules) and,
where the tensorrt package and a GPU are present, an engine built from it."""
