"""Generated protobuf/gRPC modules of the scepsy.v1 contracts (see protos/scepsy/v1/*.proto)."""
