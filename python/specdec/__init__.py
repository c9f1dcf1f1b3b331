"""specdec: exact speculative decoding served over gRPC."""
