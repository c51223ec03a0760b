"""Images: InternVL's tiling reproduced exactly, and every way an image can be bad."""

import base64
import http.server
import io
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from internvl_worker.images import IMAGENET_MEAN, IMAGENET_STD, ImageError, ImageTiler, fetch_url, image_size, load_image, normalize_pixels


def reference_tiles(img: Image.Image, size: int = 448, max_num: int = 12) -> np.ndarray:
    """InternVL's dynamic_preprocess + build_transform, written out from the algorithm's description."""
    w, h = img.size
    aspect = w / h
    grids = sorted({(i, j) for i in range(1, max_num + 1) for j in range(1, max_num + 1) if i * j <= max_num}, key=lambda g: g[0] * g[1])
    best, best_diff = (1, 1), float("inf")
    for g in grids:
        diff = abs(aspect - g[0] / g[1])
        if diff < best_diff:
            best, best_diff = g, diff
        elif diff == best_diff and w * h > 0.5 * size * size * g[0] * g[1]:
            best = g
    cols, rows = best
    resized = img.resize((size * cols, size * rows), Image.BICUBIC)
    tiles = [resized.crop((c * size, r * size, (c + 1) * size, (r + 1) * size)) for r in range(rows) for c in range(cols)]
    if len(tiles) > 1:
        tiles.append(img.resize((size, size), Image.BICUBIC))
    arr = np.stack([np.asarray(t, dtype=np.float32) / 255.0 for t in tiles])
    arr = (arr - np.array(IMAGENET_MEAN, dtype=np.float32)) / np.array(IMAGENET_STD, dtype=np.float32)
    return arr.transpose(0, 3, 1, 2)


@pytest.mark.parametrize("w,h", [(1000, 300), (333, 777), (448, 448), (1920, 1080), (50, 900), (901, 449), (17, 23)])
def test_tiling_equals_internvl_reference(w, h):
    rng = np.random.default_rng(w * h)
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    pixel_values, tiles = ImageTiler(448, 12)([img])
    ref = reference_tiles(img)
    assert tiles == [ref.shape[0]]
    assert tuple(pixel_values.shape) == ref.shape
    np.testing.assert_array_equal(pixel_values.numpy(), ref)
    assert ImageTiler(448, 12).num_tiles(w, h) == ref.shape[0]
    # the server's path: uint8 tiles, normalized later (on the GPU) to the very same float32 values
    pixels, tiles8 = ImageTiler(448, 12)([img], normalize=False)
    assert pixels.dtype == torch.uint8 and tiles8 == tiles
    np.testing.assert_array_equal(normalize_pixels(pixels).numpy(), ref)


def test_tile_limit_and_several_images():
    tiler = ImageTiler(448, 6)
    a = Image.new("RGB", (2000, 400), "red")
    b = Image.new("RGB", (300, 300), "blue")
    pixel_values, tiles = tiler([a, b])
    assert tiles[1] == 1 and 2 <= tiles[0] <= 7  # at most 6 tiles + 1 thumbnail
    assert pixel_values.shape[0] == sum(tiles)
    assert tiles == [tiler.num_tiles(2000, 400), tiler.num_tiles(300, 300)]
    assert ImageTiler(448, 1).num_tiles(2000, 400) == 1


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_data_url_and_modes(tmp_path):
    red = Image.new("RGB", (8, 4), (255, 0, 0))
    url = "data:image/png;base64," + base64.b64encode(_png(red)).decode()
    assert load_image(url).getpixel((0, 0)) == (255, 0, 0)
    # Transparent pixels become white, not black.
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert load_image(_save(tmp_path / "a.png", rgba)).getpixel((1, 1)) == (255, 255, 255)
    # 16-bit grey keeps its brightness (65535 -> white), CMYK and palette become RGB.
    grey16 = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    assert load_image(_save(tmp_path / "g.png", grey16)).getpixel((0, 0)) == (255, 255, 255)
    assert load_image(_save(tmp_path / "c.jpg", Image.new("CMYK", (4, 4), (0, 255, 255, 0)))).mode == "RGB"
    assert load_image(_save(tmp_path / "p.gif", Image.new("P", (4, 4)))).mode == "RGB"


def _save(path, img):
    img.save(path)
    return str(path)


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), "red")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    img.save(tmp_path / "r.jpg", exif=exif.tobytes())
    assert load_image(tmp_path / "r.jpg").size == (20, 40)
    assert image_size(tmp_path / "r.jpg") == (20, 40)


@pytest.mark.parametrize(
    "content,expected",
    [(b"not an image at all", "not a readable image"), (b"", "not a readable image")],
)
def test_bad_files_name_the_input(tmp_path, content, expected):
    path = tmp_path / "bad.png"
    path.write_bytes(content)
    with pytest.raises(ImageError, match=expected) as e:
        load_image(path)
    assert "bad.png" in str(e.value)


def test_truncated_missing_and_oversized(tmp_path):
    data = _png(Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)))
    (tmp_path / "t.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="t.png"):
        load_image(tmp_path / "t.png")
    with pytest.raises(ImageError, match="not found"):
        load_image("missing.png", base_dir=tmp_path)
    (tmp_path / "big.png").write_bytes(data)
    with pytest.raises(ImageError, match="over the 100-byte limit"):
        load_image(tmp_path / "big.png", max_bytes=100)
    with pytest.raises(ImageError, match="base64"):
        load_image("data:image/png;base64,@@@not-base64@@@")


def test_decompression_bomb_refused(tmp_path, monkeypatch):
    import internvl_worker.images as images

    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 1000)
    _save(tmp_path / "b.png", Image.new("RGB", (100, 100)))
    with pytest.raises(ImageError, match="pixel limit"):
        load_image(tmp_path / "b.png")


class _Handler(http.server.BaseHTTPRequestHandler):
    routes: dict = {}

    def do_GET(self):
        status, headers, body, delay = self.routes.get(self.path, (404, {}, b"", 0))
        if delay:
            threading.Event().wait(delay)
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        try:
            self.wfile.write(body)
        except BrokenPipeError:  # the client gave up (the timeout test)
            pass

    def log_message(self, *args):
        pass


@pytest.fixture()
def image_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", _Handler.routes
    server.shutdown()
    _Handler.routes.clear()


def test_url_fetch_rules(image_server):
    base, routes = image_server
    png = _png(Image.new("RGB", (6, 6), (0, 0, 255)))
    routes["/ok.png"] = (200, {"Content-Type": "image/png"}, png, 0)
    routes["/page"] = (200, {"Content-Type": "text/html"}, b"<html>", 0)
    routes["/slow.png"] = (200, {"Content-Type": "image/png"}, png, 1.5)
    routes["/gone.png"] = (404, {}, b"", 0)
    routes["/hop"] = (302, {"Location": "/ok.png"}, b"", 0)
    assert load_image(f"{base}/ok.png").getpixel((0, 0)) == (0, 0, 255)
    assert load_image(f"{base}/hop").size == (6, 6)
    with pytest.raises(ImageError, match="content-type 'text/html'"):
        load_image(f"{base}/page")
    with pytest.raises(ImageError, match="timed out"):
        load_image(f"{base}/slow.png", timeout=0.3)
    with pytest.raises(ImageError, match="HTTP 404"):
        load_image(f"{base}/gone.png")
    with pytest.raises(ImageError, match="byte limit"):
        fetch_url(f"{base}/ok.png", max_bytes=10)
    # A server inside a cluster must not fetch from private or loopback addresses.
    with pytest.raises(ImageError, match="private, loopback or link-local"):
        load_image(f"{base}/ok.png", allow_private_urls=False)
    with pytest.raises(ImageError, match="only http"):
        fetch_url("file:///etc/passwd")
