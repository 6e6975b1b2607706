"""The decoder's robustness corpus: real photos (scikit-image) re-encoded in every supported variant, plus broken,
hostile and edge-case files. Used by tests/test_decode*.py and by scripts/asan_corpus.sh (`python3
tests/decode_corpus.py OUT_DIR` writes the files).

Each case: bytes, a file name (the extension is deliberately wrong for some), and either `expected` (the exact or
reference uint8 RGB [H, W, 3] the decoder must reproduce; `exact` says whether it must match bit for bit) or
`expected=None` meaning the decoder must flag it with a reason.
"""

from __future__ import annotations

import io
import struct
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

WHITE = 255


@dataclass
class Case:
    name: str  # file name, extension as written to disk
    data: bytes
    expected: np.ndarray | None  # None: must be flagged
    exact: bool = True  # False: JPEG tolerance (mean <= 1.5, max <= 8)
    reason_contains: str = ""  # for flagged cases: a substring the reason must hold


def skimage_path(name: str) -> Path:
    import skimage.data

    return Path(skimage.data.__file__).parent / name


def photo(name: str = "chelsea.png") -> np.ndarray:
    from PIL import Image

    with Image.open(skimage_path(name)) as im:
        return np.asarray(im.convert("RGB"))


# --- a small PNG writer (any colour type, 8/16-bit, tRNS, Adam7 interlace) -----------------------------------------
def _chunk(tag: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body) & 0xFFFFFFFF)


_ADAM7 = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]


def encode_png(samples: np.ndarray, color_type: int, *, palette: np.ndarray | None = None, trns: bytes | None = None,
               interlace: bool = False, width: int | None = None, height: int | None = None, level: int = 6) -> bytes:
    """samples: [H, W, channels] uint8 or uint16 (palette: indices [H, W, 1]). width/height override the IHDR.
    level: zlib level (0: stored, so the file size depends on the image size only)."""
    h, w, _ = samples.shape
    depth = 16 if samples.dtype == np.uint16 else 8
    raw = samples.astype(">u2") if depth == 16 else samples.astype(np.uint8)

    def scanlines(img: np.ndarray) -> bytes:
        rows = img.reshape(img.shape[0], -1).view(np.uint8) if img.size else img
        return b"".join(b"\x00" + row.tobytes() for row in rows)

    if interlace:
        data = b"".join(scanlines(raw[y0::dy, x0::dx]) for x0, y0, dx, dy in _ADAM7
                        if raw[y0::dy, x0::dx].size)
    else:
        data = scanlines(raw)
    size = (w if width is None else width, h if height is None else height)
    ihdr = struct.pack(">IIBBBBB", *size, depth, color_type, 0, 0, int(interlace))
    out = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr)
    if palette is not None:
        out += _chunk(b"PLTE", palette.astype(np.uint8).tobytes())
    if trns is not None:
        out += _chunk(b"tRNS", trns)
    return out + _chunk(b"IDAT", zlib.compress(data, level)) + _chunk(b"IEND", b"")


def over_white8(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """The decoder's documented compositing: round-half-up (c*a + 255*(255-a)) / 255."""
    c, a = rgb.astype(np.int64), alpha.astype(np.int64)[..., None]
    return ((c * a + WHITE * (255 - a) + 127) // 255).astype(np.uint8)


def scale16(v: np.ndarray) -> np.ndarray:
    return ((v.astype(np.uint64) * 255 + 32767) // 65535).astype(np.uint8)


def over_white16(rgb16: np.ndarray, alpha16: np.ndarray) -> np.ndarray:
    c, a = rgb16.astype(np.uint64), alpha16.astype(np.uint64)[..., None]
    return scale16((c * a + 65535 * (65535 - a) + 32767) // 65535)


def encode_jpeg(rgb: np.ndarray, *, mode: str = "RGB", quality: int = 90, progressive: bool = False,
                subsampling: int = 2) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).convert(mode).save(buf, "JPEG", quality=quality, progressive=progressive,
                                           subsampling=subsampling)
    return buf.getvalue()


def pil_rgb(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def _patch_jpeg_size(data: bytes, width: int, height: int) -> bytes:
    b = bytearray(data)
    for marker in (0xC0, 0xC1, 0xC2):
        i = b.find(bytes([0xFF, marker]))
        if i > 0:
            b[i + 5: i + 9] = struct.pack(">HH", height, width)
            return bytes(b)
    raise ValueError("no SOF marker")


def build_corpus(seed: int = 0) -> list[Case]:
    rng = np.random.default_rng(seed)
    rgb = photo("chelsea.png")[:200, :240]  # real photo content, 200 x 240
    gray = rgb.mean(axis=2).astype(np.uint8)
    cases: list[Case] = []

    def jpeg_case(name, data):
        cases.append(Case(name, data, pil_rgb(data), exact=False))

    # JPEG variants of a real photo
    base = encode_jpeg(rgb)
    jpeg_case("baseline420.jpg", base)
    jpeg_case("baseline444_q75.jpg", encode_jpeg(rgb, quality=75, subsampling=0))
    jpeg_case("progressive.jpg", encode_jpeg(rgb, progressive=True))
    jpeg_case("gray.jpg", encode_jpeg(rgb, mode="L"))
    jpeg_case("cmyk.jpg", encode_jpeg(rgb, mode="CMYK"))
    jpeg_case("tiny_1x1.jpg", encode_jpeg(rgb[:1, :1]))
    jpeg_case("wide_1x5000.jpg", encode_jpeg(np.repeat(rgb[:1, :200], 25, axis=1)))
    jpeg_case("tall_5000x1.jpg", encode_jpeg(np.repeat(rgb[:200, :1], 25, axis=0)))

    # PNG variants (exact): 8/16-bit, gray, gray+alpha, palette, palette+tRNS, RGBA, interlaced
    alpha8 = rng.integers(0, 256, size=rgb.shape[:2], dtype=np.uint8)
    rgb16 = rgb.astype(np.uint16) * 257 + rng.integers(0, 257, size=rgb.shape, dtype=np.uint16)
    alpha16 = rng.integers(0, 65536, size=rgb.shape[:2], dtype=np.uint16)
    gray16 = rgb16[..., 0]
    cases += [
        Case("rgb8.png", encode_png(rgb, 2), rgb),
        Case("rgb8_interlaced.png", encode_png(rgb, 2, interlace=True), rgb),
        Case("gray8.png", encode_png(gray[..., None], 0), np.repeat(gray[..., None], 3, axis=2)),
        Case("gray_alpha8.png", encode_png(np.stack([gray, alpha8], axis=2), 4),
             over_white8(np.repeat(gray[..., None], 3, axis=2), alpha8)),
        Case("rgba8.png", encode_png(np.concatenate([rgb, alpha8[..., None]], axis=2), 6), over_white8(rgb, alpha8)),
        Case("rgb16.png", encode_png(rgb16, 2), scale16(rgb16)),
        Case("gray16.png", encode_png(gray16[..., None], 0), np.repeat(scale16(gray16)[..., None], 3, axis=2)),
        Case("gray_alpha16_interlaced.png", encode_png(np.stack([gray16, alpha16], axis=2), 4, interlace=True),
             over_white16(np.repeat(gray16[..., None], 3, axis=2), alpha16)),
        Case("rgba16.png", encode_png(np.concatenate([rgb16, alpha16[..., None]], axis=2), 6),
             over_white16(rgb16, alpha16)),
    ]
    pal = rng.integers(0, 256, size=(256, 3), dtype=np.uint8)
    idx = rng.integers(0, 256, size=(60, 70, 1), dtype=np.uint8)
    pal_alpha = rng.integers(0, 256, size=100, dtype=np.uint8)  # tRNS may be shorter than the palette
    full_alpha = np.concatenate([pal_alpha, np.full(156, 255, np.uint8)])
    cases += [
        Case("palette.png", encode_png(idx, 3, palette=pal), pal[idx[..., 0]]),
        Case("palette_trns_interlaced.png", encode_png(idx, 3, palette=pal, trns=pal_alpha.tobytes(), interlace=True),
             over_white8(pal[idx[..., 0]], full_alpha[idx[..., 0]])),
        Case("tiny_1x1.png", encode_png(rgb[:1, :1], 2), rgb[:1, :1]),
        Case("wide_1x5000.png", encode_png(np.repeat(rgb[:1, :200], 25, axis=1), 2), np.repeat(rgb[:1, :200], 25, 1)),
        Case("tall_5000x1.png", encode_png(np.repeat(rgb[:200, :1], 25, axis=0), 2), np.repeat(rgb[:200, :1], 25, 0)),
    ]
    png = encode_png(rgb, 2)
    cases.append(Case("png_named.jpg", png, rgb))  # a PNG with a JPEG name (ImageNet has one)

    # broken and hostile files: must be flagged with a reason
    for frac in (0.5, 0.9):
        cut = int(len(base) * frac)
        cases.append(Case(f"jpeg_truncated_{cut}.jpg", base[:cut], None, reason_contains="truncated"))
    for cut in (2, 10, 100):
        cases.append(Case(f"jpeg_truncated_{cut}.jpg", base[:cut], None))
    sos = base.find(b"\xff\xda")
    cases.append(Case("jpeg_header_only.jpg", base[: sos + 2], None))
    for cut in (8, 20, 40, len(png) // 2, len(png) - 30):
        cases.append(Case(f"png_truncated_{cut}.png", png[:cut], None))
    cases.append(Case("png_without_iend.png", png[:-12], rgb))  # all pixel data present: decodes
    bad_crc = bytearray(png)
    idat = bad_crc.find(b"IDAT")
    bad_crc[idat + 40] ^= 0xFF  # corrupt one byte of IDAT data: the CRC no longer matches
    cases.append(Case("png_bad_crc.png", bytes(bad_crc), None))
    cases.append(Case("empty.jpg", b"", None, reason_contains="empty"))
    cases.append(Case("random.jpg", rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(), None))
    cases.append(Case("random_jpeg_magic.jpg", b"\xff\xd8\xff" + rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(),
                      None))
    cases.append(Case("random_png_magic.png", png[:8] + rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(), None))
    cases.append(Case("huge_65535x65535.jpg", _patch_jpeg_size(base, 65535, 65535), None, reason_contains="pixels"))
    cases.append(Case("huge_20000x20000.jpg", _patch_jpeg_size(base, 20000, 20000), None,
                      reason_contains="too many pixels"))
    cases.append(Case("huge_65535x65535.png", encode_png(rgb[:2, :2], 2, width=65535, height=65535), None,
                      reason_contains="pixels"))
    cases.append(Case("zero_size.png", encode_png(rgb[:2, :2], 2, width=0, height=2), None))
    cases.append(Case("animation.gif", b"GIF89a" + bytes(64), None, reason_contains="GIF"))
    return cases


def write_corpus(out_dir: str | Path, cases: list[Case] | None = None) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for case in cases if cases is not None else build_corpus():
        path = out / case.name
        path.write_bytes(case.data)
        paths.append(path)
    return paths


def mutations(cases: list[Case], count: int, seed: int = 1) -> list[Case]:
    """`count` hostile variants of the decodable cases: random truncations, byte flips and spliced garbage."""
    rng = np.random.default_rng(seed)
    good = [c for c in cases if c.expected is not None and len(c.data) > 16]
    out = []
    for k in range(count):
        src = good[k % len(good)].data
        b = bytearray(src)
        kind = k % 3
        if kind == 0:
            b = b[: int(rng.integers(1, len(b)))]
        elif kind == 1:
            for pos in rng.integers(0, len(b), size=int(rng.integers(1, 16))):
                b[pos] = int(rng.integers(0, 256))
        else:
            pos = int(rng.integers(0, len(b)))
            b[pos:pos] = rng.integers(0, 256, size=int(rng.integers(1, 512)), dtype=np.uint8).tobytes()
        out.append(Case(f"mutant_{k:04d}_{good[k % len(good)].name}", bytes(b), None))
    return out


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit("usage: python3 tests/decode_corpus.py OUT_DIR [NUM_MUTANTS]")
    corpus = build_corpus()
    corpus += mutations(corpus, int(sys.argv[2]) if len(sys.argv) == 3 else 0)
    for p in write_corpus(sys.argv[1], corpus):
        print(p)
