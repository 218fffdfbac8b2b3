"""Expert compute for moelora (installed as ``moelora.kernels``).

``gated_lora`` is the dense-gated MoE-LoRA op; ``reference`` holds the torch twins that serve as
oracle and CPU path. Triton kernels import lazily, so this package works without triton.
"""

from . import reference
from .ops import BACKENDS, gated_lora, resolve_backend

__all__ = ["BACKENDS", "gated_lora", "reference", "resolve_backend"]
