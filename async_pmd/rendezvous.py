"""torch's TCPStore, its server listening on one address instead of every interface.

Given any host, torch's TCPStore server binds `[::]`: while a group forms, rank 0 would accept
connections on every interface of its node. Here rank 0 binds the listening socket itself, to its
node's own address (127.0.0.1 on one machine), and hands it to torch (`master_listen_fd`, which
torch's libuv server adopts and closes with the store). The learners' multi-node group
(`ds_engine.init_engine`) and the collective weight groups (`weight_broadcast.host_store`) meet
through it; the other ranks connect as to any TCPStore.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch.distributed as dist


def tcp_store(address: str, port: int, world_size: int, *, is_master: bool, timeout_s: float,
              wait_for_workers: bool = True) -> dist.TCPStore:
    """Host (`is_master`, on `address`:`port`, port 0 for a free one: `store.port`) or join the
    store of a group of `world_size`."""
    timeout = timedelta(seconds=timeout_s)
    if not is_master:
        return dist.TCPStore(address, port, world_size, is_master=False, timeout=timeout)
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.create_server((address, port), family=family, backlog=max(128, world_size))
    bound_port = sock.getsockname()[1]
    fd = sock.detach()  # torch owns it from here: the store's server closes it
    try:
        return dist.TCPStore(address, bound_port, world_size, is_master=True, timeout=timeout,
                             wait_for_workers=wait_for_workers, master_listen_fd=fd, use_libuv=True)
    except BaseException:
        os.close(fd)
        raise
