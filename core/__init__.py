"""ferry: train a Transformer in PyTorch, export it to ONNX / TensorRT, serve it through one
runtime.

The package root is pure Python and imports nothing heavy: `ferry.runtime` (numpy + onnxruntime)
must stay importable without torch. Subpackages:

- `ferry.model`   the one definition of the architecture (torch)
- `ferry.train`   tokenizer training, datasets, objectives, the training loop (torch)
- `ferry.export`  torch → ONNX bundles, validation (torch, onnx)
- `ferry.runtime` bundle loading, backends, generation, parity (numpy, onnxruntime)
"""

__version__ = "0.1.0"
