"""The export station: adapter, merged 16-bit model (GGUF and Modelfile arrive with issue 5)."""
