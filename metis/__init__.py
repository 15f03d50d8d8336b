"""Metis-HOME demo library: model, routing, generation, fine-tuning and UI pieces.

Importing the package registers the Metis-HOME classes with transformers' Auto classes.
"""

from .configuration import MetisHomeConfig, MetisHomeTextConfig
from .modeling import MetisHomeForConditionalGeneration

__all__ = ["MetisHomeConfig", "MetisHomeTextConfig", "MetisHomeForConditionalGeneration"]
