"""Oversized images (issue 25, item 3): the pixel count is read from the header and an image over ``max_pixels`` is
skipped as 'too large: W×H' before it is decoded, so one small file with a huge header cannot take a node's memory.

The huge images here are real PNGs made by hand (IHDR 12000x12000, 1-bit grey, an IDAT of zeros): ~17 KB on disk,
hundreds of MB once decoded. A spy on PIL's ``ImageFile.load`` refuses to decode them in this process, so a
regression fails fast instead of allocating; the memory itself is measured in a subprocess.
"""
import io
import json
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from sd_dmd import encode_images
from sd_dmd.data import images as image_sources
from sd_dmd.data.images import BadImage, FolderSource, decode_image
from sd_dmd.data.latents import SKIPPED_FILE, LatentStore

ROOT = Path(__file__).resolve().parents[1]
BIG = (12000, 12000)  # 144 Mpx: PIL only warns (DecompressionBombWarning) between ~89 and ~179 Mpx
HUGE = (20000, 20000)  # 400 Mpx: PIL's own DecompressionBombError at open


def huge_header_png(width: int, height: int) -> bytes:
    """A valid 1-bit greyscale PNG of zeros, compressed as a stream: a few KB whatever the size in its header."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    row = bytes(1 + (width + 7) // 8)  # filter byte 0 + the packed bits of one row
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def small_png(size=(20, 24), seed=0) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def loads(monkeypatch):
    """The sizes PIL decoded in this process; decoding anything over 10 Mpx raises instead of allocating."""
    seen, real_load = [], ImageFile.ImageFile.load

    def spy(self):
        seen.append(self.size)
        if self.size[0] * self.size[1] > 10_000_000:
            raise AssertionError(f"decoded a {self.size[0]}x{self.size[1]} image")
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    return seen


def _bomb_warnings(caught) -> list:
    return [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]


def test_crafted_png_is_a_valid_image():
    """The hand-made PNG decodes at a small size: a huge one is skipped for its size, not as a corrupt file."""
    data = huge_header_png(40, 30)
    assert Image.open(io.BytesIO(data)).size == (40, 30)
    x = decode_image(data, 16)
    assert tuple(x.shape) == (3, 16, 16) and float(x.min()) == -1.0 == float(x.max())  # black
    assert len(huge_header_png(*BIG)) < 100_000


def test_decode_image_checks_the_header_before_decoding(loads):
    limit = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(BadImage) as e:
            decode_image(huge_header_png(*BIG), 16)
        assert e.value.reason.startswith("too large: 12000×12000"), e.value.reason
        # over 2x PIL's MAX_IMAGE_PIXELS PIL itself raises at open: the same skip, with the size
        with pytest.raises(BadImage) as e:
            decode_image(huge_header_png(*HUGE), 16)
        assert e.value.reason.startswith("too large: 20000×20000"), e.value.reason
    assert not _bomb_warnings(caught), [str(w.message) for w in caught]
    assert all(w * h <= 10_000_000 for w, h in loads), loads  # nothing big was decoded
    assert Image.MAX_IMAGE_PIXELS == limit  # PIL's own setting is left as it was

    # the limit is a parameter: 20x24 = 480 pixels
    with pytest.raises(BadImage) as e:
        decode_image(small_png((20, 24)), 16, max_pixels=479)
    assert e.value.reason.startswith("too large: 20×24"), e.value.reason
    assert tuple(decode_image(small_png((20, 24)), 16, max_pixels=480).shape) == (3, 16, 16)
    assert tuple(decode_image(small_png((20, 24)), 16, max_pixels=0).shape) == (3, 16, 16)  # 0: no limit of ours


def test_encoded_bytes_over_the_file_limit_are_not_read(tmp_path, monkeypatch):
    (tmp_path / "a.png").write_bytes(small_png())
    (tmp_path / "b.png").write_bytes(small_png((8, 8)))
    monkeypatch.setattr(image_sources, "MAX_FILE_BYTES", len((tmp_path / "b.png").read_bytes()))
    a, b = FolderSource(tmp_path).read([0, 1])
    assert isinstance(a, BadImage) and a.reason.startswith("too large: "), a
    assert "bytes" in a.reason
    assert isinstance(b, bytes)
    with pytest.raises(BadImage, match="^too large: "):
        decode_image(small_png(), 16)


def _encode(images, model, out, *extra):
    encode_images.main(["--images", str(images), "--pretrained_model_name_or_path", str(model), "--output_dir",
                        str(out), "--resolution", "16", "--num_workers", "2", *extra])


def _skipped(out) -> dict:
    lines = (Path(out) / SKIPPED_FILE).read_text().splitlines()
    return {r["source"]: r["reason"] for r in map(json.loads, lines)}


def test_encode_images_skips_a_huge_header_png(tmp_path, tiny_pipe_dir, loads):
    d = tmp_path / "images"
    d.mkdir()
    (d / "big.png").write_bytes(huge_header_png(*BIG))
    (d / "small.png").write_bytes(small_png())
    (d / "big.txt").write_text("a black square, huge")
    (d / "small.txt").write_text("a small noisy image")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _encode(d, tiny_pipe_dir, tmp_path / "store")
    assert not _bomb_warnings(caught), [str(w.message) for w in caught]
    skipped = _skipped(tmp_path / "store")
    assert list(skipped) == ["big.png"]
    assert skipped["big.png"].startswith("too large: 12000×12000"), skipped
    store = LatentStore(tmp_path / "store")
    assert len(store) == 1 and store.rows([0])["source"] == ["small.png"]
    assert all(w * h <= 10_000_000 for w, h in loads), loads

    # --max_pixels sets the limit: 20x24 = 480 pixels
    _encode(d, tiny_pipe_dir, tmp_path / "store2", "--max_pixels", "479")
    skipped = _skipped(tmp_path / "store2")
    assert skipped["small.png"].startswith("too large: 20×24"), skipped
    assert skipped["big.png"].startswith("too large: 12000×12000"), skipped


PEAK = """
import json, resource, sys
from sd_dmd.data.images import BadImage, decode_image
big, small = (open(p, "rb").read() for p in sys.argv[1:3])
decode_image(small, 16)  # imports and first-use allocations before the measurement
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    decode_image(big, 16)
    reason = None
except BadImage as e:
    reason = e.reason
print(json.dumps({"reason": reason, "grew_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before}))
"""


def test_peak_memory_does_not_jump(tmp_path):
    """In a fresh process: decoding the 12000x12000 header raises the peak RSS by well under 64 MiB (the image
    decoded in full is >= 144 MB as 1-bit, ~1.3 GB through the RGB conversions)."""
    (tmp_path / "big.png").write_bytes(huge_header_png(*BIG))
    (tmp_path / "small.png").write_bytes(small_png())
    r = subprocess.run([sys.executable, "-c", PEAK, str(tmp_path / "big.png"), str(tmp_path / "small.png")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert (out["reason"] or "").startswith("too large: 12000×12000"), out
    assert out["grew_kib"] < 64 * 1024, out
