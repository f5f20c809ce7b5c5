"""The TCPStore a multi-node group forms through listens on rank 0's address, not on every
interface (`async_pmd.rendezvous`): real torch stores in this process, read back with psutil.
The learners' group built on it (DeepSpeed, two ranks) is checked in
tests/async_pmd/test_learner_step.py's ZeRO-3 test."""

from __future__ import annotations

import socket
from datetime import timedelta

import psutil
import pytest
import torch.distributed as dist

from async_pmd import rendezvous, weight_broadcast
from async_pmd.ports import find_free_port

ANY_ADDRESS = {"::", "0.0.0.0"}


def listening_addresses(port: int) -> set[str]:
    return {c.laddr.ip for c in psutil.Process().net_connections("inet")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port}


def test_torchs_own_store_listens_on_every_interface():
    """The control: what this module exists for, and what the checks below can tell apart."""
    store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=5))
    assert listening_addresses(store.port) & ANY_ADDRESS, listening_addresses(store.port)


@pytest.mark.parametrize("host", ["tcp_store", "weight_broadcast.host_store"])
def test_the_hosted_store_listens_on_its_address_only_and_serves(host):
    if host == "tcp_store":
        store = rendezvous.tcp_store("127.0.0.1", 0, 2, is_master=True, timeout_s=5, wait_for_workers=False)
    else:
        store = weight_broadcast.host_store("127.0.0.1", 2, 5)
    assert listening_addresses(store.port) == {"127.0.0.1"}
    client = rendezvous.tcp_store("127.0.0.1", store.port, 2, is_master=False, timeout_s=5)
    client.set("from-client", "1")
    store.set("from-host", "2")
    assert store.get("from-client") == b"1" and client.get("from-host") == b"2"


def test_a_configured_port_is_the_one_bound_and_freed_with_the_store():
    port = find_free_port()
    store = rendezvous.tcp_store("127.0.0.1", port, 1, is_master=True, timeout_s=5)
    assert store.port == port and listening_addresses(port) == {"127.0.0.1"}
    with pytest.raises(OSError):  # taken while the store lives
        socket.create_server(("127.0.0.1", port), reuse_port=False).close()
    del store  # torch owns the socket it was handed: the store's end closes it, no fd left behind
    assert not listening_addresses(port)
    socket.create_server(("127.0.0.1", port)).close()


def test_a_port_in_use_is_refused_with_the_os_error():
    with socket.create_server(("127.0.0.1", 0)) as taken:
        with pytest.raises(OSError):
            rendezvous.tcp_store("127.0.0.1", taken.getsockname()[1], 1, is_master=True, timeout_s=5)
