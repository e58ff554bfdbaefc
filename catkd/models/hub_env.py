"""Where the hubs keep their files and whether they may download, read from the
environment at call time (the hub libraries read it once, at import: a process that sets
it later, such as a test or a job's entry point, would not be heard)."""

from __future__ import annotations

import os


def offline() -> bool:
    """``HF_HUB_OFFLINE`` set: no download from any hub, the caches only."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hf_cache_dir() -> str:
    """The Hugging Face hub cache: ``HF_HUB_CACHE``, else ``HF_HOME/hub``, else
    ``~/.cache/huggingface/hub``."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return os.path.join(home, "hub")


def torch_checkpoints_dir() -> str:
    """torch's hub cache of checkpoint files (``TORCH_HOME/hub/checkpoints``)."""
    import torch.hub

    return os.path.join(torch.hub.get_dir(), "checkpoints")


HUB_ENV_VARS = ("HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE", "TORCH_HOME")


def hub_env() -> dict[str, str]:
    """The hub settings of this process, for the Ray workers that build its models (the
    teacher actors, verify's checkers, training's ranks): a worker started before they
    were set, or on another node, would look for the files elsewhere."""
    return {name: os.environ[name] for name in HUB_ENV_VARS if name in os.environ}
