"""gRPC servicers: thin adapters that validate requests and call into cas/ and executor/."""
