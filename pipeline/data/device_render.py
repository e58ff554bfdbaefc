"""The device view renderer: crop, antialiased resize and flip of many views as two
batched matrix products, on whatever device the images are on (DESIGN section 5).

Bilinear resizing with antialiasing is separable and linear: each output row is a
fixed weighted sum of input rows, and the same holds for columns. The crop, the flip
and the zero padding of the cifar spec fold into the same weights (a crop offsets
them, a flip reverses the output order, pixels outside the image get none). So one
view is ``Wy @ image @ Wx.T`` per channel, with ``Wx`` (size, W) and ``Wy`` (size, H)
built from its ``view_params`` row, and a batch of views is one batched matmul per
axis: no per-view kernel, no per-view host work.

The weights are those of torch's antialiased bilinear kernel (PIL's triangle filter,
support scaled with the downscale factor), rounded to the fixed-point precision that
kernel uses for uint8 images, and the horizontal pass is rounded to uint8 before the
vertical one, as that kernel does. The CPU renderer (``views._apply``) and this one
therefore agree on all but about one pixel in a million, by one intensity level
(``bench/render.py`` measures it; docs/cache.md states the bound): close, but not
guaranteed identical, and a GPU's matmuls may round a boundary case differently, which
is why the renderer is part of the spec and so of every cache identity.

The code runs on CPU tensors too: that is how the tests exercise it, and how a CPU
student replays a cache that a GPU rendered.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch

from catkd.errors import CatkdError
from pipeline.data import host_images
from pipeline.data import stages as view_stages
from pipeline.data.views import NUM_PARAMS, AugmentSpec, apply_stages, mix_of

# Views per pair of matmuls: bounds the float32 intermediate (views x 3 x H x size).
VIEWS_PER_CALL = 256


class DeviceRenderError(CatkdError, RuntimeError):
    """The device renderer cannot render this batch (out of device memory)."""


@contextmanager
def _exact_float32(device: torch.device):
    """Full float32 matmuls (no TF32): the weights must not lose mantissa bits."""
    if device.type != "cuda":
        yield
        return
    matmul = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul


def axis_weights(
    start: torch.Tensor, length: torch.Tensor, out_size: int, in_size: int, flip: torch.Tensor | None = None
) -> torch.Tensor:
    """(n, out_size, in_size) float32 weights that crop ``[start, start + length)`` of an
    axis of ``in_size`` pixels and resize it to ``out_size`` with antialiased bilinear
    interpolation; ``flip`` (n,) bool reverses the output. Positions outside the axis
    (negative starts: padding) get no weight, so they render as zeros."""
    device = start.device
    start, length = start.to(torch.float64)[:, None, None], length.to(torch.float64)[:, None, None]
    scale = length / out_size
    support = torch.where(scale >= 1, scale, torch.ones_like(scale))
    inverse = torch.where(scale >= 1, 1 / scale, torch.ones_like(scale))
    centre = scale * (torch.arange(out_size, device=device, dtype=torch.float64)[None, :, None] + 0.5)
    low = torch.floor(centre - support + 0.5).clamp(min=0)
    high = torch.minimum(torch.floor(centre + support + 0.5), length)

    def triangle(k: torch.Tensor) -> torch.Tensor:  # k: position inside the crop
        inside = (k >= low) & (k < high)
        return (1 - ((k - centre + 0.5) * inverse).abs()).clamp(min=0) * inside

    # Each row is normalised over the crop positions it covers (as torch does), which
    # reach at most ceil(2 * support) + 1 past ``low``; then evaluated at the axis's pixels.
    reach = int(torch.ceil(2 * support.max()).item()) + 2 if len(support) else 1
    total = triangle(low + torch.arange(reach, device=device, dtype=torch.float64)).sum(-1, keepdim=True)
    weights = triangle(torch.arange(in_size, device=device, dtype=torch.float64)[None, None, :] - start) / total
    if flip is not None:
        weights = torch.where(flip.to(torch.bool)[:, None, None], weights.flip(1), weights)
    return _fixed_point(weights).to(torch.float32)


def _fixed_point(weights: torch.Tensor) -> torch.Tensor:
    """The weights rounded as torch's uint8 kernel rounds them: to ``p`` fractional bits,
    the most that keep the largest weight of the axis within int16 (at most 22). Held
    as float32, the products with uint8 pixels are exact, and so are their sums while
    p <= 16 (a largest weight of at least 1/4: any resize that shrinks by less than
    about 2x); beyond, a sum that lands on a rounding boundary can move one level."""
    largest = weights.amax(dim=(1, 2))  # (n,)
    bits = torch.arange(22, device=weights.device, dtype=torch.float64)
    overflow = torch.floor(0.5 + largest[:, None] * torch.exp2(bits + 1)[None]) >= 2**15  # (n, 22)
    precision = torch.where(overflow.any(1), overflow.to(torch.int64).argmax(1), 22).to(torch.float64)
    unit = torch.exp2(precision)[:, None, None]
    return torch.floor(weights * unit + 0.5) / unit


def _round_uint8(x: torch.Tensor) -> torch.Tensor:
    """Round half up and clip, as torch's fixed-point uint8 kernel does (in place)."""
    return x.add_(0.5).floor_().clamp_(0, 255)


def pad_images(images: list[torch.Tensor]) -> torch.Tensor:
    """(3, H_k, W_k) uint8 images on one device -> (n, 3, H, W) float32, zero-padded at
    the bottom and right (no view's weights reach the padding)."""
    height, width = max(im.shape[1] for im in images), max(im.shape[2] for im in images)
    batch = torch.zeros((len(images), 3, height, width), dtype=torch.float32, device=images[0].device)
    for k, image in enumerate(images):
        batch[k, :, : image.shape[1], : image.shape[2]] = image
    return batch


def render_on_device(spec: AugmentSpec, images: list[torch.Tensor], params: torch.Tensor) -> torch.Tensor:
    """Decoded images (3, H_k, W_k) uint8, all on one device, and their view parameters
    (m, S, P) -> (m, S, 3, size, size) uint8 views on that device: every image reaches
    the device once and all its S views are rendered there, then the spec's stages
    (``views.apply_stages``, the CPU renderer's own) are applied there."""
    device = images[0].device
    m, views = params.shape[:2]
    params = params.to(device=device, dtype=torch.int64)
    out_h = out_w = spec.size
    try:
        padded = pad_images(images)
        height, width = padded.shape[-2:]
        out = torch.empty((m, views, 3, out_h, out_w), dtype=torch.uint8, device=device)
        step = max(1, VIEWS_PER_CALL // views)
        with _exact_float32(device):
            for first in range(0, m, step):
                p = params[first : first + step, :, :NUM_PARAMS].reshape(-1, NUM_PARAMS)  # (c * S, 5), sample-major
                c = len(p) // views
                wx = axis_weights(p[:, 0], p[:, 2], out_w, width, p[:, 4])  # (c * S, size, W)
                wy = axis_weights(p[:, 1], p[:, 3], out_h, height)  # (c * S, size, H)
                # Horizontal pass: the S views' column weights side by side, so each image
                # is read once: (c, 3, H, W) @ (c, 1, W, S * size).
                wx_all = wx.view(c, views * out_w, width).transpose(1, 2)[:, None]
                rows = _round_uint8(torch.matmul(padded[first : first + c], wx_all))  # (c, 3, H, S * size)
                rows = rows.view(c, 3, height, views, out_w).permute(0, 3, 1, 2, 4)  # (c, S, 3, H, size)
                cols = torch.matmul(wy.view(c, views, 1, out_h, height), rows)  # (c, S, 3, size, size)
                out[first : first + c] = _round_uint8(cols).to(torch.uint8)
    except torch.OutOfMemoryError as exc:
        raise DeviceRenderError(
            f"out of {device} memory rendering {m} images x {views} views (largest "
            f"{tuple(padded.shape[-2:]) if 'padded' in locals() else '?'}): "
            f"lower chunk_views (cache build) or batch_size (training), or shard with a smaller max_short_side"
        ) from exc
    if spec.num_params > NUM_PARAMS:
        flat = apply_stages(spec, out.view(m * views, 3, out_h, out_w), params.reshape(m * views, -1))
        out = flat.view(m, views, 3, out_h, out_w)
    return out


def mix_on_device(
    spec: AugmentSpec, views: torch.Tensor, params: torch.Tensor, ids: np.ndarray, rows: int, source: str
) -> torch.Tensor:
    """Rendered views (n, S, 3, size, size) of images ``ids`` (n,) with their parameters
    (n, S, P) -> the first ``rows`` images' views, each mixed with its partner's own view
    of the same index, which must be among the n (``partners.pack_for_device`` sends the
    ones a batch lacks; a cache build sends whole shards). The CPU renderer's mixing
    (``stages.mix_views``), on the device."""
    n, views_per = views.shape[:2]
    own = torch.as_tensor(params)[:rows].reshape(rows * views_per, -1).cpu()
    partner_ids, _ = mix_of(spec, own.numpy())
    row_of = {int(i): r for r, i in enumerate(np.asarray(ids).tolist())}
    missing = [int(p) for p in partner_ids if int(p) not in row_of]
    if missing:
        raise CatkdError(
            f"{source}: mixing partner {missing[0]} was not sent with the images it mixes into "
            f"({len(set(missing))} missing): the device renderer needs every partner's image"
        )
    partner_rows = torch.tensor([row_of[int(p)] for p in partner_ids], device=views.device)
    view_index = torch.arange(views_per, device=views.device).repeat(rows)  # (rows * S,), sample-major
    partner_views = views[partner_rows, view_index]
    mixed = view_stages.mix_views(spec.stages, views[:rows].flatten(0, 1), partner_views, own[:, NUM_PARAMS:])
    return mixed.view(rows, views_per, *views.shape[2:])


def render_packed(
    spec: AugmentSpec,
    packed: dict,
    params: np.ndarray | torch.Tensor,
    ids: np.ndarray | torch.Tensor,
    device: torch.device,
    source: str,
    rows: int | None = None,
) -> tuple[torch.Tensor, np.ndarray]:
    """A packed batch (``host_images.pack``) and its view parameters (m, S, P) ->
    (views (rows, S, 3, size, size) uint8 on ``device``, decode fallbacks by
    ``host_images.FALLBACK_REASONS``: the host's, plus the JPEGs nvJPEG rejected). The
    views are those of the first ``rows`` images (all m by default); a mixing spec's
    partners are found among all m (``mix_on_device``)."""
    rows = len(ids) if rows is None else rows
    images, rejected = host_images.upload(packed, ids, device, source)
    fallbacks = torch.as_tensor(packed["host_fallbacks"]).numpy().astype(np.int64)  # a copy
    fallbacks[host_images.FALLBACK_REASONS.index("device_decode_failed")] += rejected
    params = torch.as_tensor(params)
    views = render_on_device(spec, images, params)
    if spec.mixes:
        views = mix_on_device(spec, views, params, np.asarray(ids), rows, source)
    return views[:rows], fallbacks


def batch_views(
    spec: AugmentSpec, batch: dict[str, torch.Tensor], device: torch.device, source: str = ""
) -> tuple[torch.Tensor, np.ndarray | None]:
    """A loader batch's uint8 views (B, 3, size, size) on ``device``: rendered there
    from the packed images (device renderer), or copied as the loader rendered them;
    and the batch's decode fallbacks (None for a batch rendered on the host)."""
    if "host_data" not in batch:
        return batch["image"].to(device, non_blocking=True), None
    params, ids = batch["params"], batch["ids"]
    if "partner_ids" in batch:  # a mixing batch: its partners' images follow its own
        params, ids = torch.cat([params, batch["partner_params"]]), torch.cat([ids, batch["partner_ids"]])
    views, fallbacks = render_packed(spec, batch, params[:, None], ids, device, source, rows=len(batch["ids"]))
    return views[:, 0], fallbacks
