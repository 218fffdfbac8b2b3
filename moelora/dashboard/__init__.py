"""Routing-analysis dashboard: the routing store, the HTML report, and the Lightning callback.

    moelora report runs/tensorboard/version_0 -o report.html

``RoutingDashboard`` (a Lightning callback, on by default in the ``moelora`` CLI as
``--dashboard.*``) appends windows of routing statistics to ``<log_dir>/routing/`` and writes
``<log_dir>/routing_report.html`` at the end of ``fit``. Imports are lazy so reading a store
needs neither plotly nor Lightning.
"""

from __future__ import annotations

from .store import RoutingStore, StoreContents, Window, find_store, read_store

__all__ = ["RoutingDashboard", "RoutingStore", "StoreContents", "Window", "build_report", "find_store",
           "read_store", "render_html"]


def __getattr__(name: str):
    if name in ("build_report", "render_html"):
        from . import report

        return getattr(report, name)
    if name == "RoutingDashboard":
        from .callback import RoutingDashboard

        return RoutingDashboard
    raise AttributeError(f"module 'moelora.dashboard' has no attribute {name!r}")
