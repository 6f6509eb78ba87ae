"""UNet/VAE backends behind one small protocol (torch now; ONNX Runtime and TensorRT later)."""
