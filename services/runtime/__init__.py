"""Shared plumbing: configuration, logging, the gRPC server bootstrap, error mapping, the Redis
store and its key schema, proto conversion. Depends on ``services.core``; services depend on it."""
