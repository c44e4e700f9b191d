"""A free loopback port for a process a test starts (the OS picks it; the socket closes before the process
binds it, a race that loopback tests in one session do not lose in practice)."""

import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
