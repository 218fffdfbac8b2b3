"""Routing policies (installed as ``moelora.routers``): each maps tokens to experts."""

from .base import Router, Routing
from .sira import SiRARouter
from .topk import TopKRouter

__all__ = ["Router", "Routing", "SiRARouter", "TopKRouter"]

from .meteora import MeteoRARouter

__all__ += ["MeteoRARouter"]

from .flylora import FlyLoRARouter

__all__ += ["FlyLoRARouter"]
