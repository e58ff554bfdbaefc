"""What makes a teacher-target cache what it is (DESIGN section 6).

``cache_id`` is a short hash of the canonical JSON of the identity fields. A reader
compares the identity a run expects with the manifest's and names the first field
that differs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any, Literal

from catkd.errors import CatkdError, ConfigError

# 2: precision in the identity, the view renderer's version and normalisation in the
# spec, class-mixed data (index version 2). 3: the spec names the renderer (cpu or
# device) and the JPEG decoder (cpu or nvjpeg) that made the views. 4: the spec's
# augmentation stages (ops, erase), whose draws widen the view parameters past five.
# Older caches are refused: rebuild them.
FORMAT_VERSION = 4
TargetKind = Literal["cam", "binarized_cam"]
# How targets are stored (docs/cache.md compares them): one of DENSE_FORMS, every
# class's pooled CAM, or "topk:K", the K classes with the highest teacher logits.
StorageForm = str
DENSE_FORMS = ("float16", "float32", "int8", "features")


class CacheMismatchError(CatkdError, ValueError):
    """A cache that is not the one a run needs (or is partial, or foreign)."""


@dataclass(frozen=True)
class CacheIdentity:
    teacher_arch: str
    teacher_sha256: str  # of the teacher weights file
    dataset_fingerprint: str
    split: str
    spec: dict[str, Any]  # AugmentSpec.to_dict()
    num_views: int
    resolution: int
    num_classes: int
    target_kind: TargetKind = "cam"
    storage: StorageForm = "float16"
    precision: str = "fp32"  # fp32, tf32 or bf16: what the teacher computed in
    format_version: int = FORMAT_VERSION
    # a cache computed from another (``catkd cache derive``): the source's cache_id and the
    # transform; None for a build (and then left out of the canonical form, so that the
    # ids of caches built before the field existed stay what they were)
    derived_from: dict[str, Any] | None = None

    def canonical(self) -> str:
        fields = asdict(self)
        if fields["derived_from"] is None:
            del fields["derived_from"]
        return json.dumps(fields, sort_keys=True, separators=(",", ":"))

    @property
    def cache_id(self) -> str:
        return hashlib.sha256(self.canonical().encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CacheIdentity:
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise CacheMismatchError(
                f"cache format version {version}, this catkd reads version {FORMAT_VERSION} (older caches lack the "
                "augmentation stages, compute precision, view renderer and decoder, or class-mixed data in their "
                "identity); "
                "rebuild it with `catkd cache build`"
            )
        return cls(**data)


def parse_storage(form: str) -> tuple[str, int | None]:
    """``"float16"`` -> ("float16", None); ``"topk:50"`` -> ("topk", 50); anything else is
    a ConfigError naming the field. K's upper bound (the class count) is checked where
    the data is known (``check_topk``)."""
    if form in DENSE_FORMS:
        return form, None
    kind, sep, k = form.partition(":")
    if kind == "topk" and sep and k.strip().lstrip("-").isdigit():
        if int(k) < 1:
            raise ConfigError(f"storage: topk:K keeps K >= 1 classes per view, got {form!r}")
        return "topk", int(k)
    raise ConfigError(f"storage: expected one of {', '.join(DENSE_FORMS)} or topk:K (K classes per view), got {form!r}")


def check_topk(form: str, num_classes: int) -> None:
    """Refuse ``topk:K`` with K above the class count of the data."""
    kind, k = parse_storage(form)
    if kind == "topk" and k > num_classes:
        raise ConfigError(f"storage: {form} keeps {k} classes per view, but the data has only {num_classes} classes")


def identity_of(
    *,
    teacher: str,
    weights_sha: str,
    index: Any,
    split: str,
    spec: dict[str, Any],
    num_views: int,
    resolution: int,
    binarize: bool,
    storage: StorageForm,
    precision: str,
) -> CacheIdentity:
    """The identity of the cache these settings make or need (``index``: the split's
    ShardIndex): the one mapping from settings to identity fields, for the builder and
    for a training run checking its cache."""
    return CacheIdentity(
        teacher_arch=teacher,
        teacher_sha256=weights_sha,
        dataset_fingerprint=index.fingerprint,
        split=split,
        spec=spec,
        num_views=num_views,
        resolution=resolution,
        num_classes=index.num_classes,
        target_kind="binarized_cam" if binarize else "cam",
        storage=storage,
        precision=precision,
    )


def first_difference(expected: CacheIdentity, found: CacheIdentity, *, ignore: tuple[str, ...] = ()) -> str | None:
    """The first identity field (in declaration order) whose values differ, as a message."""
    want, have = asdict(expected), asdict(found)
    for name in want:
        if name in ignore or want[name] == have[name]:
            continue
        if isinstance(want[name], dict) and isinstance(have[name], dict):  # name the key inside (spec)
            key = next(k for k in sorted(set(want[name]) | set(have[name])) if want[name].get(k) != have[name].get(k))
            message = (
                f"{name}.{key}: the run needs {want[name].get(key)!r}, the cache holds "
                f"{have[name].get(key, '(absent)')!r}"
            )
            if key == "renderer_version":
                message += (
                    "; the view renderer changed since this cache was built, so its targets were computed on other "
                    "pixels: rebuild the cache"
                )
            elif key in ("renderer", "decoder"):
                message += (
                    f"; the teacher saw views made by the {have[name].get(key)} {key}, and another {key} gives other "
                    f"pixels (docs/cache.md gives the measured difference): set {key}={have[name].get(key)} "
                    "to see what the teacher saw"
                )
            return message
        return f"{name}: the run needs {want[name]!r}, the cache holds {have[name]!r}"
    return None


def file_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
