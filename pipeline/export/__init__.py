"""PyTorch -> ONNX: export, simplification, FP16/INT8 variants and the model cards."""
