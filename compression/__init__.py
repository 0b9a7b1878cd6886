"""Offline half of the product: datasets, architectures, training, ONNX export, profiling, the
method registry and the builder that writes the model family `adaptive-inference build` produces.

`compression.methods` holds the compression methods, one module per method, named after it.
`compression.core` is the torch-free part the server imports too: the family format and its
encodings, the ONNX Runtime session factory and timing helper, and the early-exit rules.
"""
