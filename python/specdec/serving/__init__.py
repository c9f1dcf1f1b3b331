"""Serving: the gRPC server, the wire conversion (the only place that imports the protobuf types), security and metrics."""
