"""Routing policies (installed as ``moelora.routers``): each maps tokens to experts."""

from .base import Router, Routing
from .topk import TopKRouter

__all__ = ["Router", "Routing", "TopKRouter"]
