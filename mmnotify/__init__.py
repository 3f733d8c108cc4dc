"""mmnotify: a distributed model of Linux MMU notifiers and XPMEM remote mappings.

The public, stable API is what this package exports (README, "Python API"):

* :class:`Client` (trio) and :class:`SyncClient`: the admin client of a
  running cluster, one method per ``mmn`` command, typed results, failures as
  :class:`KernelError` with the errno (:class:`Errno`);
* :class:`LocalCluster`: the whole system in one process, around the host's
  real core (``LocalCluster.client()`` gives the same client interface);
* the pytest plugin (``mmnotify.pytest_plugin``, registered as ``mmnotify``):
  the ``mmn_cluster`` fixture.

The other installed packages (``protocol``, ``transport``, ``broker``,
``node``, ``mmn``) are the implementation; their names may change.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AccessResult", "Client", "ClientError", "Errno", "Event", "FaultResult", "KernelError", "LocalCluster",
    "MmStatus", "NodeStatus", "Page", "Status", "SyncClient", "Unreachable",
]

_FROM = {
    "LocalCluster": "mmnotify.local",
    "Errno": "protocol.types",
    "KernelError": "protocol.types",
}


def __getattr__(name: str) -> Any:
    """Imported on first use: ``import mmnotify`` stays cheap, and the
    in-process cluster does not pull in the client's sockets."""
    if name not in __all__:
        raise AttributeError(f"module 'mmnotify' has no attribute {name!r}")
    import importlib

    module = importlib.import_module(_FROM.get(name, "mmnotify.client"))
    value = getattr(module, name)
    globals()[name] = value
    return value
