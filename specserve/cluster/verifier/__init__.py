"""The verifier's side: the gRPC service behind `specserve verifier` (service.py) and its Prometheus
metrics (metrics.py). It imports the wire format (cluster/protocol.py), the engine and the runtime that loads
its model, never the front-end's client."""
