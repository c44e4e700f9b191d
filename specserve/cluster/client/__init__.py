"""The front-end's side: `RemoteTarget` (a generation's session on a verifier, remote.py), the pool of
replicas with routing and health checks (router.py), drafting ahead while a window travels (pipeline.py).
It imports the wire format (cluster/protocol.py) and the engine, never the verifier's side."""
