"""Router fine-tuning (issue 5): only the router gates learn, the experts stay frozen.

data (validated JSONL/CSV) -> features (one forced-expert prefill per example, pooled MoE inputs)
-> trainer (epochs over the cached features) -> router.safetensors + metrics.json.
"""

from .data import DatasetError, Example, load_dataset
from .export import ROUTER_FILE, apply_router, check_router, load_router, save_router
from .features import Cancelled, Features, extract_features
from .trainer import EpochMetrics, RouterTrainer, TrainResult, TrainSettings, TrainSummary, train_router

__all__ = [
    "DatasetError", "Example", "load_dataset", "ROUTER_FILE", "apply_router", "check_router", "load_router",
    "save_router", "Cancelled", "Features", "extract_features", "EpochMetrics", "RouterTrainer",
    "TrainResult", "TrainSettings", "TrainSummary", "train_router",
]
