"""Checkpoints: one reader and loader for every weight source (:mod:`.weights`; pretrained directories and Hub
ids: :mod:`.pretrained_dir`), the checks and builder for the configs stored with weights (:mod:`.stored_config`),
one writer of training state (:mod:`.training_state`)."""
from rsam.checkpoint.stored_config import StoredConfigError, build_stored, check_stored_config, register_stored_builder
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
    KINDS,
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
    "KINDS",
    "StoredConfigError",
    "build_stored",
    "check_stored_config",
    "register_stored_builder",
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
