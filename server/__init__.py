"""The seqserve gRPC server: servicer over core over model runtime."""
