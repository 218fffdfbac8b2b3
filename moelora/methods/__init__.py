"""Method configs beyond plain top-k MoE-LoRA (one module per method)."""

from .sira import SiRAConfig

__all__ = ["SiRAConfig"]
