"""Disaggregated speculative decoding: the draft in the front-end, the target in verifier services.

verifier.proto (+ generated stubs), protocol.py (engine objects <-> wire), service.py (`specserve verifier`),
remote.py (`RemoteTarget`, the client session), router.py (replicas, routing, health checks).
"""
