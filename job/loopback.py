"""Keep the embedded default's listeners on 127.0.0.1.

A private local Ray binds its GCS, raylet, workers, agents and metrics port to the node IP, which
is 127.0.0.1 when `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` is set before Ray is imported (the
launcher does that). One listener ignores the node IP: every Ray Serve replica opens an
inter-deployment gRPC server on `[::]:0` (ray 2.60, `serve/_private/replica.py`), which the
RolloutDriver's handles send their requests to (`services.driver.direct_handle`) at the replica's node
IP. `bind_serve_grpc_to_loopback` is a Ray worker setup hook that rebinds that server to the
node's own address (127.0.0.1 on the embedded default; on a cluster, the address Ray gave it). It patches a private Ray
function, so
`tests/services/test_faults.py` lists the job's listening sockets to catch a Ray upgrade that
moves it.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

SETUP_HOOK = "job.loopback.bind_serve_grpc_to_loopback"  # runtime_env worker_process_setup_hook
_REPLICA = "ray.serve._private.replica"
_ANY_HOST = "[::]:"


def bind_serve_grpc_to_loopback() -> None:
    """Patch Serve's replica module when it loads in this worker (at once if it already has).

    Importing it eagerly would cost every worker ~3 s, and most workers never host a replica.
    """
    if _REPLICA in sys.modules:
        _patch(sys.modules[_REPLICA])
    elif not any(isinstance(f, _ReplicaFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _ReplicaFinder())


def _patch(module) -> None:
    from ray.util import get_node_ip_address

    original = module.add_port_to_grpc_server
    if getattr(original, "_loopback", False):
        return

    def add_port(server, address: str):
        if address.startswith(_ANY_HOST):  # the node's own address: 127.0.0.1 on the embedded default
            address = f"{get_node_ip_address()}:{address[len(_ANY_HOST):]}"
        return original(server, address)

    add_port._loopback = True
    module.add_port_to_grpc_server = add_port


class _ReplicaFinder(importlib.abc.MetaPathFinder):
    """Finds nothing itself; wraps the loader of Serve's replica module to patch it once loaded."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _REPLICA:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _PatchingLoader(spec.loader)
        return spec


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        _patch(module)
