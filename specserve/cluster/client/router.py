"""The front-end's view of its verifier replicas: connect and check them, route new sessions to the least
loaded healthy one, keep checking health in the background so a replica that comes back is used again."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from specserve import SpecserveError
from specserve.cluster import verifier_pb2 as pb
from specserve.cluster import verifier_pb2_grpc as pb_grpc
from specserve.cluster.protocol import auth_metadata

log = logging.getLogger("specserve.router")
HEALTH_EVERY_S = 1.0
INFO_TIMEOUT_S = 5.0
RETRY_FIRST_S, RETRY_MAX_S = 0.5, 8.0  # backoff while no replica has answered yet


@dataclass(eq=False)
class Replica:
    address: str
    channel: grpc.Channel
    stub: pb_grpc.VerifierStub
    healthy: bool = False
    sessions: int = 0  # this front-end's open sessions on it
    remote_load: int = 0  # sessions + queued windows it reported at the last health check
    info: pb.InfoReply | None = None
    error: str = ""

    @property
    def load(self) -> int:
        return max(self.sessions, self.remote_load)


@dataclass
class ClientOptions:
    auth_token: str | None = None
    tls_ca: str | None = None  # PEM file: use TLS and trust this CA
    window_timeout_s: float = 60.0  # deadline for one window's verdict
    interceptors: tuple = ()  # gRPC client interceptors on every replica's channel
    wait_s: float = 0.0  # how long to retry when no replica answers at first (EngineConfig.verifier_wait_s)
    on_wait: Callable[[str], None] | None = None  # told why while it waits (the server's /health)


@dataclass(eq=False)  # identity: sessions on one pool share its verifier (remote.py)
class VerifierPool:
    """Replicas behind `--verifier HOST:PORT[,HOST:PORT...]`; `RemoteTarget(pool)` opens a session on one."""

    addresses: list[str]
    tokenizer_digest: str
    options: ClientOptions = field(default_factory=ClientOptions)

    def __post_init__(self) -> None:
        if not self.addresses:
            raise SpecserveError("no verifier address given")
        credentials = None
        if self.options.tls_ca:
            try:
                with open(self.options.tls_ca, "rb") as f:
                    credentials = grpc.ssl_channel_credentials(root_certificates=f.read())
            except OSError as exc:
                raise SpecserveError(f"cannot read --tls-ca: {exc}") from None
        self.replicas = []
        for address in self.addresses:
            if ":" not in address:
                raise SpecserveError(f"verifier address must be HOST:PORT, got {address!r}")
            channel = grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
            channel = grpc.intercept_channel(channel, *self.options.interceptors)
            self.replicas.append(Replica(address, channel, pb_grpc.VerifierStub(channel)))
        self.metadata = auth_metadata(self.options.auth_token)
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._info_s = 0.0  # duration of a health check call: the network's share of a window
        # (backend, model file) of the first replica up: a replica computing another target would change
        # the model in the middle of a reply when a session fails over to it
        self.target: tuple[str, str] | None = None
        up = self._wait_for_a_replica()
        first = up[0].info
        self.model_name, self.n_ctx, self.n_vocab = first.model, min(r.info.n_ctx for r in up), first.n_vocab
        self.chat_template = first.chat_template
        self.weights = first.weights
        self.window_cost_s = {int(k): v for k, v in first.window_cost_s.items()}
        self._health = threading.Thread(target=self._watch, name="specserve-verifier-health", daemon=True)
        self._health.start()

    def _wait_for_a_replica(self) -> list[Replica]:
        """The healthy replicas, once there is one: retried with backoff for up to `options.wait_s`."""
        deadline = time.monotonic() + self.options.wait_s
        pause, said = RETRY_FIRST_S, ""
        while True:
            self.check_now()
            if up := [r for r in self.replicas if r.healthy]:
                return up
            reasons = "; ".join(f"{r.address}: {r.error}" for r in self.replicas)
            if time.monotonic() + pause > deadline:
                raise SpecserveError(f"no verifier reachable ({reasons})")
            if reasons != said:  # once per reason, not once per try
                log.warning("no verifier reachable yet (%s); retrying", reasons)
                said = reasons
            if self.options.on_wait is not None:
                self.options.on_wait(f"waiting for a verifier: {reasons}")
            time.sleep(pause)
            pause = min(2 * pause, RETRY_MAX_S)

    # --- routing ---

    def acquire(self, avoid: Replica | None = None) -> Replica:
        """The least loaded healthy replica for a new session (another one than `avoid` if there is one)."""
        if (reason := self.unavailable()) is not None:
            raise SpecserveError(reason)
        with self._lock:
            up = [r for r in self.replicas if r.healthy] or self.replicas  # one just went down: try it anyway
            choices = [r for r in up if r is not avoid] or up
            replica = min(choices, key=lambda r: r.load)
            replica.sessions += 1
            return replica

    def unavailable(self) -> str | None:
        """Why no new session can open now (every replica down), or None."""
        with self._lock:
            if any(r.healthy for r in self.replicas):
                return None
            return "no verifier available: " + "; ".join(f"{r.address}: {r.error or 'down'}" for r in self.replicas)

    def release(self, replica: Replica) -> None:
        with self._lock:
            replica.sessions = max(0, replica.sessions - 1)

    def mark_down(self, replica: Replica, error: str) -> None:
        with self._lock:
            if replica.healthy or error != replica.error:  # once per reason, also for one never up
                log.warning("verifier %s is down: %s", replica.address, error)
            replica.healthy, replica.error = False, error

    # --- health ---

    def _check(self, replica: Replica) -> None:
        start = time.perf_counter()
        try:
            info = replica.stub.Info(pb.InfoRequest(), timeout=INFO_TIMEOUT_S, metadata=self.metadata)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                error = f"refused: {exc.details()}"
            else:
                error = f"{exc.code().name.lower()}: {exc.details()}"
            self.mark_down(replica, error)
            return
        elapsed = time.perf_counter() - start
        if info.tokenizer_digest != self.tokenizer_digest:
            self.mark_down(replica, f"its model {info.model} has a different tokenizer than the draft")
            return
        runs = (info.backend, info.model)
        with self._lock:
            self.target = self.target or runs
        if runs != self.target:
            other = f"{self.target[0]} on {self.target[1]}"
            self.mark_down(replica, f"it runs {runs[0]} on {runs[1]}, the pool {other}: a failover would change models")
            return
        with self._lock:
            if not replica.healthy and replica.info is not None:
                log.info("verifier %s is back", replica.address)
            replica.info, replica.healthy, replica.error = info, True, ""
            replica.remote_load = info.sessions + info.queued
            self._info_s = elapsed if not self._info_s else 0.8 * self._info_s + 0.2 * elapsed

    def check_now(self) -> None:
        """Check every replica now, timing the network afresh (the first call includes connecting: the
        second is timed)."""
        for _ in range(2):
            self._info_s = 0.0
            for replica in self.replicas:
                self._check(replica)

    def _watch(self) -> None:
        while not self._closed.wait(HEALTH_EVERY_S):
            for replica in self.replicas:
                self._check(replica)

    @property
    def round_trip_s(self) -> float:
        """Network seconds per window, for adaptive k: a health check's round trip."""
        return self._info_s

    def close(self) -> None:
        self._closed.set()
        for replica in self.replicas:
            replica.channel.close()
