"""A free TCP port, for a rendezvous whose port nobody configured.

Apart from `ds_engine` (torch) because the launcher picks the learners' MASTER_PORT before any
rank starts, and it has no other use for torch.
"""

from __future__ import annotations

import socket


def find_free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for MASTER_PORT when none is configured)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
