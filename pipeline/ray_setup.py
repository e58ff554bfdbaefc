"""Connecting to Ray: ``RAY_ADDRESS`` when set, otherwise a fresh local Ray (DESIGN section 3)."""

from __future__ import annotations

import logging
import os

import ray


def init_ray(num_cpus: int | None = None) -> None:
    """Idempotent. A fresh local instance is started explicitly ("local"), so a stale
    /tmp/ray/ray_current_cluster from an earlier cluster is never picked up."""
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS") or "local"
    kwargs = {"num_cpus": num_cpus} if address == "local" and num_cpus else {}
    # The dashboard stays on: Ray Train V2's controller queries the state API it serves.
    ray.init(address=address, logging_level=logging.WARNING, **kwargs)
