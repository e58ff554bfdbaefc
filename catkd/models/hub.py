"""Where a pretrained spec's weights file is: the hubs' own caches, as their libraries lay
them out.

* ``timm:NAME.TAG:pretrained=true``: the tag's ``pretrained_cfg`` (timm's registry) says
  where timm would load it from: a Hugging Face repo (``hf_hub_id``), a URL or a file.
  ``timm:hf-hub:ORG/NAME`` names the repo itself, ``timm:local-dir:PATH`` a folder.
* ``tv_NAME:weights=ENUM``: torchvision's weights enum gives the URL.

A Hugging Face file is looked up in the hub cache (``HF_HUB_CACHE``, else
``HF_HOME/hub``, else ``~/.cache/huggingface/hub``), a URL's file in torch's hub cache
(``TORCH_HOME/hub/checkpoints``), both read at call time. What is missing is downloaded
by the hub's own client unless ``HF_HUB_OFFLINE`` is set; offline, or when the download
fails, one line names the model, the file, where it was looked for and the command that
fetches it (``WeightsUnavailableError``, exit 2).

The file's bytes, not its name, identify a teacher: a cache records their sha256, since a
hub tag is not promised to stay the same bytes.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass
from urllib.parse import urlparse

from catkd.errors import CatkdError, first_line
from catkd.models import timm_models
from catkd.models.hub_env import hf_cache_dir, offline, torch_checkpoints_dir
from catkd.models.registry import zoo_weights

# What timm looks for in a Hugging Face repo or a local folder, in its order.
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class WeightsUnavailableError(CatkdError, FileNotFoundError):
    """A pretrained spec whose weights file is not here and could not be fetched."""


@dataclass(frozen=True)
class WeightsSource:
    """Where a spec's weights come from: ``kind`` is hf-hub (``location`` a repo id),
    url, or file (a local path, a file or a folder)."""

    kind: str
    location: str
    filenames: tuple[str, ...] = HF_WEIGHT_FILES


def wants_pretrained(name: str) -> bool:
    """Does the spec ask for hub weights (``pretrained=true``, ``weights=ENUM``)?"""
    if timm_models.is_timm_name(name):
        return timm_models.wants_pretrained(name)
    return ":" in name and zoo_weights(name) is not None


def weights_source(name: str) -> WeightsSource:
    """Where the pretrained weights of spec ``name`` are published."""
    if not timm_models.is_timm_name(name):
        return WeightsSource("url", zoo_weights(name).url)  # type: ignore[union-attr]
    model, _ = timm_models.parse_timm_name(name)
    if model.startswith("hf-hub:"):
        return WeightsSource("hf-hub", model.removeprefix("hf-hub:"))
    if model.startswith("local-dir:"):
        return WeightsSource("file", model.removeprefix("local-dir:"))
    cfg = timm_models.pretrained_cfg(model)
    if cfg.get("file"):
        return WeightsSource("file", cfg["file"])
    if cfg.get("hf_hub_id"):
        files = (cfg["hf_hub_filename"],) if cfg.get("hf_hub_filename") else HF_WEIGHT_FILES
        return WeightsSource("hf-hub", cfg["hf_hub_id"], files)
    if cfg.get("url"):
        return WeightsSource("url", cfg["url"])
    raise WeightsUnavailableError(f"{name}: timm publishes no pretrained weights for {model}")


def resolve_weights(name: str) -> str:
    """The local weights file of pretrained spec ``name``, downloaded first when it is
    missing and downloads are allowed."""
    source = weights_source(name)
    if source.kind == "file":
        return _local_file(name, source.location)
    if source.kind == "hf-hub":
        return _hf_file(name, source)
    return _url_file(name, source.location)


def _local_file(name: str, path: str) -> str:
    if os.path.isdir(path):
        for filename in HF_WEIGHT_FILES:
            if os.path.isfile(os.path.join(path, filename)):
                return os.path.join(path, filename)
        raise WeightsUnavailableError(f"{name}: {path} holds none of {', '.join(HF_WEIGHT_FILES)}")
    if not os.path.isfile(path):
        raise WeightsUnavailableError(f"{name}: weights file {path} does not exist")
    return path


def _hf_file(name: str, source: WeightsSource) -> str:
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    repo, revision = (source.location.split("@", 1) + [None])[:2]
    cache = hf_cache_dir()
    for filename in source.filenames:
        found = try_to_load_from_cache(repo, filename, cache_dir=cache, revision=revision)
        if isinstance(found, str):
            return found
    reason = "HF_HUB_OFFLINE is set"
    if not offline():
        from huggingface_hub.errors import EntryNotFoundError

        for filename in source.filenames:
            try:
                return hf_hub_download(repo, filename, cache_dir=cache, revision=revision)
            except EntryNotFoundError:
                continue  # timm's order: the next file the repo may hold
            except Exception as exc:  # the hub client raises many types for a network failure
                reason = f"download failed: {first_line(exc)}"
                break
    raise WeightsUnavailableError(
        f"{name}: pretrained weights not found: expected {source.filenames[0]} of Hugging Face repo {repo} in "
        f"{cache} ({reason}); fetch it with: HF_HUB_CACHE={cache} hf download {repo} {source.filenames[0]}"
    )


def _url_file(name: str, url: str) -> str:
    folder = torch_checkpoints_dir()
    path = os.path.join(folder, posixpath.basename(urlparse(url).path))
    if os.path.isfile(path):
        return path
    reason = "HF_HUB_OFFLINE is set"
    if not offline():
        import torch.hub

        try:
            os.makedirs(folder, exist_ok=True)
            torch.hub.download_url_to_file(url, path, progress=True)
            return path
        except Exception as exc:  # urllib raises many types for a network failure
            reason = f"download failed: {first_line(exc)}"
    raise WeightsUnavailableError(
        f"{name}: pretrained weights not found: expected {path} ({reason}); fetch it with: "
        f"mkdir -p {folder} && curl -L -o {path} {url}"
    )
