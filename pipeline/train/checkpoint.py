"""Training checkpoints: everything needed to resume, nothing of the teacher.

The model is unwrapped from DDP before ``state_dict`` (no "module." keys). Ray Train
persists the folder we hand it; writing goes through a temporary name and a rename.
"""

from __future__ import annotations

import os
from dataclasses import asdict
from typing import Any

import torch

from catkd.models import CAMClassifier, checkpoint_payload
from pipeline.train.config import TrainConfig

FORMAT = "catkd.train"
VERSION = 1
FILENAME = "state.pt"


def unwrap(model: torch.nn.Module) -> CAMClassifier:
    """The plain student inside torch.compile's and DDP's wrappers."""
    model = getattr(model, "_orig_mod", model)
    return model.module if hasattr(model, "module") else model


def save_training_state(
    folder: str, model, optimizer, scheduler, epoch: int, cfg: TrainConfig, history: list[dict[str, Any]]
) -> None:
    state = {
        "format": FORMAT,
        "version": VERSION,
        "model": checkpoint_payload(unwrap(model), cfg.student),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": epoch,  # epochs completed
        "config": asdict(cfg),
        "history": history,
    }
    tmp = os.path.join(folder, FILENAME + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, os.path.join(folder, FILENAME))


def load_training_state(folder: str) -> dict[str, Any]:
    state = torch.load(os.path.join(folder, FILENAME), map_location="cpu", weights_only=True)
    if state.get("format") != FORMAT or state.get("version") != VERSION:
        raise ValueError(
            f"{folder}: not a catkd training checkpoint (format {state.get('format')!r} version "
            f"{state.get('version')!r})"
        )
    return state
