"""Offline half of the product: datasets, architectures, training, compression methods and the
model-family format that `adaptive-inference build` writes and the server loads."""
