"""Online half of the product: the gRPC server that routes each request to a variant."""
