"""What users import and run: the `AdaptiveClient` library and the `adaptive-inference` CLI."""
