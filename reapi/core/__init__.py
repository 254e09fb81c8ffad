"""The bottom layer: digests, errors with their gRPC codes, resource names, the
conventions a worker and a client share. It imports nothing of this project but
the generated protos (reapi/protos); everything else may import it."""
