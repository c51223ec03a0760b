"""Images: load from a path, an http(s) URL or a data URL, and tile them as InternVL does.

Tiling (InternVL's `dynamic_preprocess`): pick the grid (cols, rows) with 1 <= cols*rows <= max_num whose
aspect ratio is closest to the image's (ties go to the larger grid while the image covers more than half
of it), resize to (448*cols, 448*rows) with bicubic, cut 448-px tiles, add a 448-px thumbnail of the
whole image when there is more than one tile, then scale to [0,1] and normalise with ImageNet mean/std.
transformers' GotOcr2 image processor does exactly this; we use its PIL backend, which equals the
reference bit for bit (tests/worker/test_images.py), where the torchvision backend differs by up to 0.27.
"""

from __future__ import annotations

import base64
import binascii
import functools
import io
import ipaddress
import socket
import time
import urllib.parse
import warnings
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MAX_IMAGE_BYTES = 20 * 1024 * 1024
# 89.5M pixels is PIL's own bomb threshold; a 12-tile InternVL image needs far less (448^2 * 13 = 2.6M).
MAX_IMAGE_PIXELS = 89_478_485


class ImageError(ValueError):
    """An image that cannot be used; the message names the input and the reason."""


def _short(src: str) -> str:
    return src if len(src) <= 80 else src[:60] + "..." + src[-12:]


def _is_private_host(host: str) -> bool:
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror as e:
        raise ImageError(f"image URL host {host!r} does not resolve: {e}") from None
    for info in infos:
        addr = ipaddress.ip_address(info[4][0].split("%")[0])
        if addr.is_private or addr.is_loopback or addr.is_link_local or addr.is_reserved or addr.is_multicast or addr.is_unspecified:
            return True
    return False


def fetch_url(url: str, *, timeout: float = 10.0, max_bytes: int = MAX_IMAGE_BYTES, allow_private: bool = True, max_redirects: int = 5) -> bytes:
    """GET an image URL with a timeout, a size cap and a content-type check.

    `timeout` bounds the whole fetch (every redirect and the body), not each socket read: a server that
    drips a byte every few seconds would otherwise hold a worker for as long as it likes.
    With allow_private=False every hop (redirects included) must resolve to a public address, so a
    server inside a cluster cannot be used as a proxy into it.
    """
    import requests
    import urllib3

    deadline = time.monotonic() + timeout

    def remaining() -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise ImageError(f"image URL {_short(url)!r} timed out after {timeout:g}s")
        return left

    for _ in range(max_redirects + 1):
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ImageError(f"image URL {_short(url)!r}: only http(s) URLs are fetched")
        if not allow_private and _is_private_host(parsed.hostname):
            raise ImageError(f"image URL {_short(url)!r} points to a private, loopback or link-local address")
        try:
            resp = requests.get(url, timeout=remaining(), stream=True, allow_redirects=False)
        except requests.Timeout:
            raise ImageError(f"image URL {_short(url)!r} timed out after {timeout:g}s") from None
        except requests.RequestException as e:
            raise ImageError(f"image URL {_short(url)!r} could not be fetched: {type(e).__name__}") from None
        with resp:
            if resp.is_redirect or resp.is_permanent_redirect:
                url = urllib.parse.urljoin(url, resp.headers.get("location", ""))
                continue
            if resp.status_code != 200:
                raise ImageError(f"image URL {_short(url)!r} answered HTTP {resp.status_code}")
            ctype = resp.headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype and not (ctype.startswith("image/") or ctype == "application/octet-stream"):
                raise ImageError(f"image URL {_short(url)!r} has content-type {ctype!r}, not an image")
            declared = resp.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > max_bytes:
                raise ImageError(f"image URL {_short(url)!r} is {int(declared)} bytes, over the {max_bytes}-byte limit")
            data = bytearray()
            try:
                # read1: what has arrived (one socket read, itself bounded by the timeout), so the
                # deadline is checked between reads however slowly the bytes come.
                while chunk := resp.raw.read1(64 * 1024, decode_content=True):
                    data += chunk
                    if len(data) > max_bytes:
                        raise ImageError(f"image URL {_short(url)!r} is over the {max_bytes}-byte limit")
                    remaining()
            except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as e:
                if isinstance(e, (urllib3.exceptions.ReadTimeoutError, TimeoutError, socket.timeout)):
                    raise ImageError(f"image URL {_short(url)!r} timed out after {timeout:g}s") from None
                raise ImageError(f"image URL {_short(url)!r} broke off: {type(e).__name__}") from None
            return bytes(data)
    raise ImageError(f"image URL {_short(url)!r}: more than {max_redirects} redirects")


def decode_data_url(src: str, *, max_bytes: int = MAX_IMAGE_BYTES) -> bytes:
    header, _, payload = src.partition(",")
    if ";base64" not in header:
        raise ImageError("data URL images must be base64 encoded (data:image/png;base64,...)")
    if len(payload) * 3 // 4 > max_bytes:
        raise ImageError(f"data URL image is over the {max_bytes}-byte limit")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError("data URL image is not valid base64") from None


def open_image_bytes(data: bytes, name: str) -> Image.Image:
    """Decode, apply EXIF orientation, and convert to RGB (transparent parts become white)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if img.width * img.height > MAX_IMAGE_PIXELS:
                raise ImageError(f"image {name}: {img.width}x{img.height} pixels is over the {MAX_IMAGE_PIXELS}-pixel limit")
            img.load()
            img = ImageOps.exif_transpose(img)
    except UnidentifiedImageError:
        raise ImageError(f"image {name}: not a readable image") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"image {name}: over the {MAX_IMAGE_PIXELS}-pixel limit, a decompression bomb ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:
        if isinstance(e, ImageError):
            raise
        raise ImageError(f"image {name}: corrupt or truncated ({e})") from None
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if img.mode == "I;16" or img.mode == "I":
        # 16-bit grey: scale to 8 bits rather than clip everything above 255 to white.
        img = img.point(lambda v: v / 256).convert("L")
    return img.convert("RGB")


def url_image_bytes(src: str, *, timeout: float = 10.0, max_bytes: int = MAX_IMAGE_BYTES, allow_private_urls: bool = True) -> tuple[bytes, str]:
    """(the encoded image's bytes, a name for messages) of a data: or http(s) URL, before any decoding (the
    server keys its cache of vision features by these bytes)."""
    if src.startswith("data:"):
        return decode_data_url(src, max_bytes=max_bytes), "from data URL"
    return fetch_url(src, timeout=timeout, max_bytes=max_bytes, allow_private=allow_private_urls), repr(_short(src))


def load_image(src, *, base_dir: str | Path | None = None, timeout: float = 10.0, max_bytes: int = MAX_IMAGE_BYTES, allow_private_urls: bool = True) -> Image.Image:
    """An RGB PIL image from a PIL image, a local path, an http(s) URL or a data: URL."""
    if isinstance(src, Image.Image):
        return src.convert("RGB")
    src = str(src).strip()
    if src.startswith(("data:", "http://", "https://")):
        return open_image_bytes(*url_image_bytes(src, timeout=timeout, max_bytes=max_bytes, allow_private_urls=allow_private_urls))
    path = Path(src).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    if not path.is_file():
        raise ImageError(f"image {src!r} not found" + (f" (looked in {path.parent})" if base_dir else ""))
    size = path.stat().st_size
    if size > max_bytes:
        raise ImageError(f"image {src!r} is {size} bytes, over the {max_bytes}-byte limit")
    return open_image_bytes(path.read_bytes(), repr(src))


def image_size(src, *, base_dir: str | Path | None = None, verify: bool = True, max_bytes: int = MAX_IMAGE_BYTES, **kw) -> tuple[int, int]:
    """(width, height) after EXIF orientation. Local files: the header, plus a full decode when `verify`
    (so truncated files are caught); URLs are fetched and decoded. The byte limit is the one training
    applies when it loads the image, so a row that passes the check does not fail mid-run."""
    if isinstance(src, Image.Image):
        return src.size
    s = str(src)
    if s.startswith(("data:", "http://", "https://")):
        return load_image(s, max_bytes=max_bytes, **kw).size
    path = Path(s).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    if not path.is_file():
        raise ImageError(f"image {s!r} not found" + (f" (looked in {path.parent})" if base_dir else ""))
    size = path.stat().st_size
    if size > max_bytes:
        raise ImageError(f"image {s!r} is {size} bytes, over the {max_bytes}-byte limit")
    try:
        with Image.open(path) as img:
            w, h = img.size
            orientation = img.getexif().get(0x0112, 1)
            if w * h > MAX_IMAGE_PIXELS:
                raise ImageError(f"image {s!r}: {w}x{h} pixels is over the {MAX_IMAGE_PIXELS}-pixel limit")
            if verify:
                # Decode it all, so truncated files are caught here and not in the middle of training;
                # JPEGs decode at 1/8 scale (draft mode), which reads every byte at a fraction of the cost.
                img.draft("RGB", (max(1, w // 8), max(1, h // 8)))
                img.load()
    except UnidentifiedImageError:
        raise ImageError(f"image {s!r}: not a readable image") from None
    except Image.DecompressionBombError as e:  # PIL refuses to open it at all (over twice its own limit)
        raise ImageError(f"image {s!r}: over the {MAX_IMAGE_PIXELS}-pixel limit, a decompression bomb ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:
        if isinstance(e, ImageError):
            raise
        raise ImageError(f"image {s!r}: corrupt or truncated ({e})") from None
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


class ImageTiler:
    """Tiles images into `(tiles, 3, size, size)` pixel values with InternVL's dynamic tiling."""

    def __init__(self, size: int = 448, max_tiles: int = 12):
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

        if max_tiles < 1:
            raise ValueError(f"max tiles must be at least 1, got {max_tiles}")
        self.size, self.max_tiles = size, max_tiles
        self.processor = GotOcr2ImageProcessorPil(
            crop_to_patches=max_tiles > 1,
            min_patches=1,
            max_patches=max_tiles,
            size={"height": size, "width": size},
            image_mean=list(IMAGENET_MEAN),
            image_std=list(IMAGENET_STD),
            do_convert_rgb=True,
        )

    def num_tiles(self, width: int, height: int) -> int:
        """Tiles for an image of this size, thumbnail included, without touching its pixels."""
        return self.processor.get_number_of_image_patches(height, width, {})

    def __call__(self, images: list[Image.Image], *, normalize: bool = True):
        """-> (pixel_values float32 tensor (sum(tiles), 3, size, size), tiles per image).

        normalize=False: the tiles' uint8 pixels instead (4x smaller, and the CPU skips the float work, about
        half the tiling time), for `normalize_pixels` on the GPU, which gives the same float32 values."""
        import numpy as np
        import torch

        if not images:
            return None, []
        if normalize:
            out = self.processor(images=images, return_tensors="np")
            return torch.from_numpy(out["pixel_values"]), [int(n) for n in out["num_patches"]]
        out = self.processor(images=images, return_tensors="np", do_rescale=False, do_normalize=False)
        return torch.from_numpy(out["pixel_values"].astype(np.uint8)), [int(n) for n in out["num_patches"]]


def pixels_on_device(pixel_values, device=None):
    """Float pixel values on `device` (None: where they are): the processor's float tiles moved there, or
    uint8 tiles (`ImageTiler(..., normalize=False)`, as serving's preprocessing and training's data loader
    make them) normalized there by `normalize_pixels`."""
    import torch

    if pixel_values.dtype == torch.uint8:
        return normalize_pixels(pixel_values, device)
    return pixel_values.to(device)


def normalize_pixels(pixels, device=None):
    """uint8 tiles (from `ImageTiler(..., normalize=False)`) -> the float32 pixel values the processor makes:
    rescale by 1/255 in float64 rounded to float32, then (x - mean) / std per channel in float32: the operations
    transformers' numpy path does, in its order, so the values are bit for bit the same."""
    import torch

    x = (pixels.to(device=device, non_blocking=True).double() * (1 / 255)).float()
    mean, std = _channel_stats(x.device)
    return (x - mean) / std


@functools.lru_cache(maxsize=None)
def _channel_stats(device):
    """ImageNet's mean and std as [3, 1, 1] float32 tensors on `device`, made once: a tensor built from a list
    on a GPU is a copy from pageable memory, which waits for the GPU (in every training step, before)."""
    import torch

    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32)[:, None, None]
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32)[:, None, None]
    return mean.to(device), std.to(device)
