"""Quantization methods (RTN/HQQ block grids, GPTQ, AWQ, sensitivity) and the INT4 ONNX graph pass."""
