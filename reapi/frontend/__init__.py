"""The top layer: the gRPC services, the server's assembly (its composition
root, server.py), access control and the command line. Nothing below imports it
(tests/unit/test_layers.py)."""
