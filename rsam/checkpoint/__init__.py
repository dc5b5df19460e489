"""Checkpoints: one reader and loader for every weight file (:mod:`.weights`), one writer of training state
(:mod:`.training_state`)."""
from rsam.checkpoint.training_state import (
    BEST_NAME,
    RESUME_NAME,
    Checkpointer,
    TrainingProgress,
    initialise_from_pretrained,
    seed_everything,
    training_progress,
)
from rsam.checkpoint.weights import (
    OFFICIAL_VIDEO_LEFTOVERS,
    Checkpoint,
    CheckpointError,
    LoadReport,
    detect_format,
    load_weights,
    read_checkpoint,
    read_torch_file,
)

__all__ = [
    "BEST_NAME",
    "RESUME_NAME",
    "Checkpoint",
    "CheckpointError",
    "Checkpointer",
    "LoadReport",
    "OFFICIAL_VIDEO_LEFTOVERS",
    "TrainingProgress",
    "detect_format",
    "initialise_from_pretrained",
    "load_weights",
    "read_checkpoint",
    "read_torch_file",
    "seed_everything",
    "training_progress",
]
