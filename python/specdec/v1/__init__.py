"""Generated gRPC stubs for ``proto/specdec/v1/specdec.proto`` (regenerate with ``make proto``; never edit by hand)."""
