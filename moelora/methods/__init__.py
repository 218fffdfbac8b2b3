"""Method configs beyond plain top-k MoE-LoRA (one module per method)."""

from .sira import SiRAConfig

__all__ = ["SiRAConfig"]

from .moa import MoAConfig  # noqa: E402  (imports moelora.inject, which needs the package above)

__all__ += ["MoAConfig"]

from .weightlora_config import WeightLoRAConfig  # noqa: E402

__all__ += ["WeightLoRAConfig"]
