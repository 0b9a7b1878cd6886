"""The torch-free core both halves import: the family format, its encodings and errors, the ONNX
Runtime session factory and timing helper, and the early-exit rules.

The build (`compression.methods`, torch) and the server (`server`, no torch) call the very same
functions here, so a rule such as "which samples leave at exit 1" exists once. Nothing under
this package may import torch; `tests/unit/test_torch_free.py` checks it.
"""
