"""Lightning integration: the training module, text data, and routing callbacks."""

from .callbacks import RoutingLogger, RoutingPredictionWriter
from .data import EpochSampler, TextDataModule
from .module import MoELoRAModule

__all__ = ["EpochSampler", "MoELoRAModule", "RoutingLogger", "RoutingPredictionWriter", "TextDataModule"]
