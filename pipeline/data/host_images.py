"""What the host does on the device path: read, decode (or leave the JPEG to nvJPEG),
pack, pin, copy; no per-view work (DESIGN section 5).

A batch's images travel as one flat uint8 buffer (``pack``): decoded (H, W, 3) pixels,
or the JPEG bytes themselves when nvJPEG will decode them on the device, with offsets,
image sizes and a flag per image. One buffer pins once and copies to the device in
one transfer; ``upload`` turns it back into per-image (3, H, W) tensors on the device.

nvJPEG gets only what it decodes: 8-bit baseline (or extended sequential) Huffman
JPEGs with three components, read from the frame header without decoding. The rest
(progressive, grayscale, CMYK, other formats, unreadable headers) is decoded on the
host, the same way for teacher and student, and counted by reason. A JPEG that nvJPEG
still rejects is decoded on the host too and counted; one that no decoder reads fails
with its file and sample named (``ShardError``).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.data.shard_format import Sample, decode_image

# Why an image was decoded on the host although the decoder is nvjpeg; the order of
# the per-batch counts in ``host_fallbacks``.
FALLBACK_REASONS = ("progressive", "grayscale", "cmyk", "not_jpeg", "unreadable_header", "device_decode_failed")
_SEQUENTIAL = {0xC0, 0xC1}  # baseline and extended sequential Huffman: what nvJPEG's batched decoder takes
_OTHER_FRAMES = {0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_STANDALONE = {0x01, *range(0xD0, 0xD8)}  # markers without a length field


@dataclass(frozen=True)
class JpegFrame:
    marker: int  # the SOF marker: 0xC0 baseline, 0xC2 progressive, ...
    precision: int  # bits per sample
    height: int
    width: int
    components: int  # 1 grayscale, 3 YCbCr, 4 CMYK/YCCK


def jpeg_frame(data: bytes) -> JpegFrame | None:
    """The frame header of a JPEG, read by walking its marker segments (no decoding);
    None when the bytes are not a JPEG or end before a frame header."""
    if data[:2] != b"\xff\xd8":
        return None
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _STANDALONE:
            pos += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image, or scan data before any frame header
            return None
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        if marker in _SEQUENTIAL or marker in _OTHER_FRAMES:
            if pos + 10 > len(data):
                return None
            precision, height, width, components = struct.unpack(">BHHB", data[pos + 4 : pos + 10])
            return JpegFrame(marker, precision, height, width, components)
        pos += 2 + length
    return None


def nvjpeg_refusal(sample: Sample) -> str | None:
    """Why nvJPEG will not get this sample (a FALLBACK_REASONS entry), or None."""
    return _screen(sample)[0]


def _screen(sample: Sample) -> tuple[str | None, JpegFrame | None]:
    """(why nvJPEG will not get the sample or None, its frame header when readable)."""
    if sample.fmt != "jpg":
        return "not_jpeg", None
    frame = jpeg_frame(sample.image)
    if frame is None or frame.height == 0 or frame.width == 0:
        return "unreadable_header", None
    if frame.marker not in _SEQUENTIAL or frame.precision != 8:
        return "progressive", frame
    if frame.components == 1:
        return "grayscale", frame
    if frame.components != 3:
        return "cmyk", frame
    return None, frame


def pack(samples: list[Sample], shape: list[int] | None, source: str, decoder: str) -> dict[str, np.ndarray]:
    """The images of ``samples`` in one flat buffer for the device path:
    ``host_data`` (flat uint8), ``host_offsets`` (n + 1,), ``host_hw`` (n, 2),
    ``host_encoded`` (n,) bool (JPEG bytes for nvJPEG), ``host_fallbacks`` (counts by
    FALLBACK_REASONS of images decoded here although the decoder is nvjpeg)."""
    parts: list[np.ndarray] = []
    hw = np.empty((len(samples), 2), np.int64)
    encoded = np.zeros(len(samples), bool)
    fallbacks = np.zeros(len(FALLBACK_REASONS), np.int64)
    for k, sample in enumerate(samples):
        reason, frame = _screen(sample) if decoder == "nvjpeg" else (None, None)
        if decoder == "nvjpeg" and reason is None:  # the header was read once, by the screen
            hw[k] = frame.height, frame.width
            encoded[k] = True
            parts.append(np.frombuffer(sample.image, np.uint8))
            continue
        if reason is not None and reason != "not_jpeg":
            fallbacks[FALLBACK_REASONS.index(reason)] += 1
        pixels = decode_image(sample, shape, source)  # names the file and sample when it fails
        hw[k] = pixels.shape[:2]
        parts.append(np.ascontiguousarray(pixels).reshape(-1))
    offsets = np.zeros(len(parts) + 1, np.int64)
    np.cumsum([len(p) for p in parts], out=offsets[1:])
    data = np.concatenate(parts) if parts else np.empty(0, np.uint8)
    # numpy: zero-copy through Ray's object store; a DataLoader turns them into tensors.
    return {
        "host_data": data,
        "host_offsets": offsets,
        "host_hw": hw,
        "host_encoded": encoded,
        "host_fallbacks": fallbacks,
    }


def concat(first: dict[str, np.ndarray], second: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Two packed batches as one: ``second``'s images after ``first``'s (a mixing
    batch's own images, then its partners'), fallback counts added."""
    offsets = np.concatenate([first["host_offsets"], second["host_offsets"][1:] + first["host_offsets"][-1]])
    return {
        "host_data": np.concatenate([first["host_data"], second["host_data"]]),
        "host_offsets": offsets,
        "host_hw": np.concatenate([first["host_hw"], second["host_hw"]]),
        "host_encoded": np.concatenate([first["host_encoded"], second["host_encoded"]]),
        "host_fallbacks": first["host_fallbacks"] + second["host_fallbacks"],
    }


def image_sizes(packed: dict[str, np.ndarray]) -> np.ndarray:
    """(n, 2) heights and widths: what ``view_params`` needs, known before decoding."""
    return np.asarray(packed["host_hw"])


DeviceDecoder = Callable[[list[torch.Tensor], torch.device], list[torch.Tensor]]


def nvjpeg_decode(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """torchvision's batched JPEG decode on ``device`` (nvJPEG on CUDA; on a CPU device
    the same call runs libjpeg-turbo, which is how the tests drive this path)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)


def upload(
    packed: dict[str, np.ndarray | torch.Tensor],
    ids: np.ndarray | torch.Tensor,
    device: torch.device,
    source: str,
    decode: DeviceDecoder = nvjpeg_decode,
) -> tuple[list[torch.Tensor], int]:
    """Per-image (3, H, W) uint8 tensors on ``device`` from a packed batch (pinned by
    the DataLoader: one copy of the flat buffer), and how many JPEGs nvJPEG rejected
    and the host decoded instead."""
    data = torch.as_tensor(packed["host_data"])
    offsets, ids = np.asarray(packed["host_offsets"]).tolist(), np.asarray(ids).tolist()
    hw, encoded = np.asarray(packed["host_hw"]).tolist(), np.asarray(packed["host_encoded"]).tolist()
    images: list[torch.Tensor | None] = [None] * len(hw)
    jpegs = [k for k, flag in enumerate(encoded) if flag]
    if len(jpegs) < len(encoded):  # decoded pixels: the whole buffer in one copy, then views of it
        on_device = data.to(device, non_blocking=True)
        for k, flag in enumerate(encoded):
            if not flag:
                h, w = hw[k]
                images[k] = on_device[offsets[k] : offsets[k + 1]].view(h, w, 3).permute(2, 0, 1)
    rejected = 0
    if jpegs:
        chunks = [data[offsets[k] : offsets[k + 1]] for k in jpegs]
        try:
            decoded = decode(chunks, device)
        except RuntimeError:  # one bad image fails the whole batched call: retry one by one
            decoded = []
            for chunk in chunks:
                try:
                    decoded.append(decode([chunk], device)[0])
                except RuntimeError:
                    decoded.append(None)
        for k, image in zip(jpegs, decoded, strict=True):
            if image is None or tuple(image.shape[1:]) != tuple(hw[k]):
                rejected += 1
                image = _host_decode(data[offsets[k] : offsets[k + 1]], ids[k], source).to(device)
            images[k] = image
    return images, rejected


def _host_decode(chunk: torch.Tensor, sample_id: int, source: str) -> torch.Tensor:
    pixels = decode_image(Sample(sample_id, -1, chunk.numpy().tobytes(), "jpg"), None, source)
    return torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1)


def fallback_counts(total: torch.Tensor | np.ndarray) -> dict[str, int]:
    """Non-zero fallback counts by reason, for reports."""
    return {reason: int(n) for reason, n in zip(FALLBACK_REASONS, np.asarray(total).tolist(), strict=True) if n}


def describe_fallbacks(total: torch.Tensor | np.ndarray, images: int) -> str | None:
    counts = fallback_counts(total)
    if not counts:
        return None
    n = sum(counts.values())
    return (
        f"{n:,} of {images:,} images decoded on the host instead of nvJPEG "
        f"({', '.join(f'{k} {v:,}' for k, v in counts.items())})"
    )
