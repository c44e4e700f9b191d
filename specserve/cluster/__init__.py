"""Disaggregated speculative decoding: the draft in the front-end, the target in verifier services.

verifier.proto (+ generated stubs) and protocol.py (engine objects <-> wire) are shared; client/ is the
front-end's side, verifier/ the service's; imports point from each to the shared part, never between them.
ray_deploy.py runs both on a Ray cluster.
"""
