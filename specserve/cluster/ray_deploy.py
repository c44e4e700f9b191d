"""`specserve ray up|status|down`: verifier replicas and a front-end as Ray actors on a Ray cluster.

Ray places the actors and restarts one whose process dies (max_restarts=-1); this module only says what to
run. Each verifier actor serves gRPC on a fixed port, so a replica restarted on the same node comes back
at the same address and the front-end's health checks route to it again. The front-end actor runs the
HTTP server with `--verifier` pointing at the replicas. Actors are detached and named (namespace
"specserve"), so `status` and `down` find them from another process.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import socket
import threading
import time
from pathlib import Path

from specserve import SpecserveError
from specserve.config import ServerConfig, VerifierConfig

NAMESPACE = "specserve"
FRONTEND = "frontend"
RAY_CONNECT_TIMEOUT_S = 5.0  # a GCS that does not take a TCP connection by then is not there


def _replica_name(i: int) -> str:
    return f"verifier-{i}"


class VerifierActor:
    """One `specserve verifier` inside a Ray actor process."""

    def __init__(self, config: VerifierConfig):
        from specserve.cluster.verifier.service import build_verifier, start_server

        service = build_verifier(config, show_progress=False)
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="verifier-loop", daemon=True).start()
        started = asyncio.run_coroutine_threadsafe(start_server(service, config.listen), self.loop)
        self.server, bound = started.result(timeout=60)
        self._address = f"{config.listen.rsplit(':', 1)[0]}:{bound}"

    def address(self) -> str:
        return self._address

    def pid(self) -> int:
        return os.getpid()


class FrontendActor:
    """The HTTP front-end (draft model + OpenAI API) inside a Ray actor, verifying on the replicas."""

    def __init__(self, config: ServerConfig):
        from specserve.server.app import serve

        threading.Thread(target=serve, args=(config,), name="frontend", daemon=True).start()
        self._url = f"http://{config.host}:{config.port}/v1"

    def url(self) -> str:
        return self._url


def _connect(address: str):
    import ray

    repo = str(Path(__file__).resolve().parents[2])  # this checkout, importable by the actors' workers
    env = {"PYTHONPATH": repo, "OMP_WAIT_POLICY": "PASSIVE"}
    try:
        live = _live_address(address)
        ray.init(address=live, namespace=NAMESPACE, runtime_env={"env_vars": env}, log_to_driver=False)
    except ConnectionError as exc:
        raise SpecserveError(f"no Ray cluster at {address!r}: {exc}") from None
    return ray


def _live_address(address: str) -> str:
    """The GCS address `address` stands for ("auto": RAY_ADDRESS, else the cluster last started on this
    machine), once it answers: `ray.init` retries a dead one for ten minutes, as it does for the address a
    stopped cluster left in /tmp/ray/ray_current_cluster."""
    from ray._private.services import canonicalize_bootstrap_address

    from_env = os.environ.get("RAY_ADDRESS", "") if address == "auto" else ""
    if "://" in (from_env or address):
        return address  # a Ray Client URL (ray://): ray.init connects to it and says what went wrong
    fix = "start one with `ray start --head`, or name one with --address HOST:PORT"
    try:
        resolved = canonicalize_bootstrap_address(address)
    except (ConnectionError, ValueError) as exc:
        raise SpecserveError(f"no Ray cluster at {address!r} ({exc}): {fix}") from None
    if resolved is None:
        raise SpecserveError(f"no Ray cluster at {address!r}: {fix}")
    host, port = resolved.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=RAY_CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        where = " (RAY_ADDRESS)" if from_env else " (where the last cluster started here was)"
        found = where if address == "auto" else ""
        raise SpecserveError(f"no Ray cluster answers at {resolved}{found}: {exc.strerror or exc}; {fix}") from None
    return resolved


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def ray_up(args: argparse.Namespace, verifier: VerifierConfig, frontend: ServerConfig) -> int:
    """Start `args.replicas` verifiers like `verifier` (each on its own port) and a front-end like `frontend`
    verifying on them."""
    ray = _connect(args.address)
    options = {"lifetime": "detached", "max_restarts": -1, "max_task_retries": -1, "num_cpus": args.replica_cpus}
    actor = ray.remote(VerifierActor)
    replicas = []
    for i in range(args.replicas):
        port = args.verifier_port + i if args.verifier_port else _free_port(args.host)
        config = dataclasses.replace(verifier, listen=f"{args.host}:{port}")
        replicas.append(actor.options(name=_replica_name(i), **options).remote(config))
    addresses = ray.get([r.address.remote() for r in replicas], timeout=args.timeout)
    print("verifiers: " + ",".join(addresses), flush=True)
    engine = dataclasses.replace(frontend.engine, verifiers=tuple(addresses))
    frontend = (
        ray.remote(FrontendActor)
        .options(name=FRONTEND, lifetime="detached", max_restarts=-1, num_cpus=0)
        .remote(dataclasses.replace(frontend, engine=engine))
    )
    print(f"front-end: {ray.get(frontend.url.remote(), timeout=args.timeout)}", flush=True)
    return 0


def ray_status(args: argparse.Namespace) -> int:
    ray = _connect(args.address)
    found = False
    for i in range(64):
        try:
            replica = ray.get_actor(_replica_name(i))
        except ValueError:
            break
        found = True
        address, pid = ray.get([replica.address.remote(), replica.pid.remote()], timeout=args.timeout)
        print(f"{_replica_name(i)}: {address} pid {pid}")
    try:
        print(f"front-end: {ray.get(ray.get_actor(FRONTEND).url.remote(), timeout=args.timeout)}")
    except ValueError:
        if not found:
            print("no specserve actors on this Ray cluster")
    return 0


def ray_down(args: argparse.Namespace) -> int:
    ray = _connect(args.address)
    names = [FRONTEND] + [_replica_name(i) for i in range(64)]
    for name in names:
        try:
            ray.kill(ray.get_actor(name), no_restart=True)
            print(f"stopped {name}")
        except ValueError:
            if name != FRONTEND:
                break
    time.sleep(0.5)
    return 0
