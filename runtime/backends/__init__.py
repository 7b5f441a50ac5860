"""Runtime backends: one module per backend, all behind `base.GraphBackend`."""

from ferry.runtime.backends.base import BACKENDS, GraphBackend, backend_loader, register_backend

__all__ = ["BACKENDS", "GraphBackend", "backend_loader", "register_backend"]
