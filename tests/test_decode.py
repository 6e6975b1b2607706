"""The C++ decoder `sfmkern._decode`: pixel parity with Pillow and torchvision on real photos, the robustness corpus,
misuse errors, the thread pool's sharing of the work, and the GIL released during a decode."""

from __future__ import annotations

import io
import os
import threading
import time

import numpy as np
import pytest
import torch
from decode_corpus import build_corpus, encode_jpeg, photo, pil_rgb, skimage_path

from sfmkern import _decode

JPEG_PHOTOS = ["rocket.jpg", "retina.jpg", "hubble_deep_field.jpg"]
PNG_PHOTOS = ["astronaut.png", "brick.png", "camera.png", "chelsea.png", "coffee.png", "horse.png", "logo.png",
              "motorcycle_left.png", "page.png", "coins.png"]


def _check_jpeg(got: np.ndarray, ref: np.ndarray, what: str) -> None:
    assert got.shape == ref.shape, what
    diff = np.abs(got.astype(np.int64) - ref.astype(np.int64))
    for c in range(3):
        assert diff[..., c].mean() <= 1.5, (what, c, diff[..., c].mean())
        assert diff[..., c].max() <= 8, (what, c, diff[..., c].max())


def _pil_over_white(data: bytes) -> np.ndarray:
    """Pillow's decode, alpha composited over white with the decoder's documented rounding."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        if "A" not in im.getbands() and "transparency" not in im.info:
            return np.asarray(im.convert("RGB"))
        rgba = np.asarray(im.convert("RGBA")).astype(np.int64)
    a = rgba[..., 3:]
    return ((rgba[..., :3] * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)


@pytest.mark.parametrize("name", JPEG_PHOTOS)
def test_bundled_jpeg_matches_pillow(name):
    data = skimage_path(name).read_bytes()
    _check_jpeg(_decode.decode_image(data), pil_rgb(data), name)


@pytest.mark.parametrize("name", ["astronaut.png", "coffee.png", "motorcycle_left.png", "chelsea.png"])
@pytest.mark.parametrize("variant", [dict(quality=75), dict(quality=95, subsampling=0), dict(progressive=True),
                                     dict(mode="L", quality=85), dict(mode="CMYK", quality=90, subsampling=0)])
def test_reencoded_jpeg_matches_pillow(name, variant):
    data = encode_jpeg(photo(name), **variant)
    _check_jpeg(_decode.decode_image(data), pil_rgb(data), f"{name} {variant}")


@pytest.mark.parametrize("name", PNG_PHOTOS)
def test_bundled_png_exact(name):
    data = skimage_path(name).read_bytes()
    np.testing.assert_array_equal(_decode.decode_image(data), _pil_over_white(data))


CORPUS = build_corpus()


@pytest.mark.parametrize("case", CORPUS, ids=[c.name for c in CORPUS])
def test_corpus_full_decode(case):
    if case.expected is None:
        with pytest.raises(ValueError) as info:
            _decode.decode_image(case.data)
        assert str(info.value), case.name
        assert case.reason_contains in str(info.value), (case.name, str(info.value))
        return
    got = _decode.decode_image(case.data)
    if case.exact:
        np.testing.assert_array_equal(got, case.expected, err_msg=case.name)
    else:
        _check_jpeg(got, case.expected, case.name)


def test_corpus_batch_flags_every_bad_slot(tmp_path):
    """All corpus cases in one batch on 2 threads, as bytes and as files: good slots filled, bad ones flagged and
    zero-filled, the process alive, and the same answer from both inputs."""
    decoder = _decode.Decoder(2)
    out = np.full((len(CORPUS), 64, 64, 3), 7, np.uint8)
    reasons = decoder.decode_batch([c.data for c in CORPUS], out, 72, 64)
    paths = []
    for k, case in enumerate(CORPUS):
        paths.append(tmp_path / f"{k}_{case.name}")
        paths[-1].write_bytes(case.data)
    out_files = np.empty_like(out)
    assert decoder.decode_batch(paths, out_files, 72, 64) == reasons
    np.testing.assert_array_equal(out_files, out)
    for case, reason, slot in zip(CORPUS, reasons, out, strict=True):
        if case.expected is None:
            assert reason, f"{case.name} was not flagged"
            assert not slot.any(), f"{case.name}: flagged slot not zero-filled"
        else:
            assert reason == "", f"{case.name}: {reason}"
    missing = decoder.decode_batch([tmp_path / "does_not_exist.jpg"], out[:1], 72, 64)
    assert "does_not_exist.jpg" in missing[0] and "No such file" in missing[0]


def test_pixel_limit_is_configurable():
    data = encode_jpeg(photo()[:100, :120])
    out = np.empty((1, 32, 32, 3), np.uint8)
    assert _decode.Decoder(1, max_pixels=100 * 120).decode_batch([data], out, 32, 32) == [""]
    reason = _decode.Decoder(1, max_pixels=100 * 120 - 1).decode_batch([data], out, 32, 32)[0]
    assert "too many pixels" in reason and "120x100" in reason
    with pytest.raises(ValueError, match="too many pixels"):
        _decode.decode_image(data, max_pixels=1000)


def _torchvision_resize_crop(img: np.ndarray, resize: int, crop: int) -> np.ndarray:
    from torchvision.transforms import v2

    chw = torch.from_numpy(np.array(img)).permute(2, 0, 1)
    out = v2.CenterCrop(crop)(v2.Resize(resize, antialias=True)(chw))
    return out.permute(1, 2, 0).numpy()


@pytest.mark.parametrize(
    "name,size,resize,crop",
    [
        ("chelsea.png", (300, 451), 256, 224),
        ("coffee.png", (400, 600), 256, 224),
        ("retina.jpg", (1411, 1411), 256, 224),
        ("motorcycle_left.png", (257, 741), 256, 224),
        ("astronaut.png", (511, 333), 256, 224),
        ("rocket.jpg", (224, 224), 256, 224),  # upscale
        ("chelsea.png", (97, 151), 256, 224),  # upscale, awkward
        ("coffee.png", (400, 599), 64, 56),
        ("astronaut.png", (512, 300), 300, 17),
    ],
)
def test_fused_resize_crop_matches_torchvision(name, size, resize, crop):
    img = np.ascontiguousarray(photo(name)[: size[0], : size[1]])
    assert img.shape[:2] == size
    out = np.empty((1, crop, crop, 3), np.uint8)
    assert _decode.Decoder(1).resize_batch(img[None], out, resize, crop) == [""]
    ref = _torchvision_resize_crop(img, resize, crop)
    diff = np.abs(out[0].astype(np.int64) - ref.astype(np.int64))
    assert diff.mean() <= 2.0, diff.mean()
    assert diff.max() <= 3, diff.max()  # observed: <= 1 (float vs fixed-point accumulation)


def test_gray_arrays_are_replicated_and_identity_size_is_exact():
    rng = np.random.default_rng(1)
    gray = rng.integers(0, 256, size=(3, 28, 31), dtype=np.uint8)
    out = np.empty((3, 28, 28, 3), np.uint8)
    assert _decode.Decoder(2).resize_batch(gray, out, 28, 28) == ["", "", ""]
    left = (31 - 28 + 1) // 2  # torchvision: int(round(1.5)) == 2
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], gray[:, :, left: left + 28])


def test_fused_decode_close_to_pil_torchvision_pipeline():
    """The whole fused path (DCT scaling included when it keeps >= 2x the target) against the common pipeline."""
    for name, expect_dct in (("rocket.jpg", False), ("retina.jpg", True), ("hubble_deep_field.jpg", False)):
        data = skimage_path(name).read_bytes()
        out = np.empty((1, 224, 224, 3), np.uint8)
        assert _decode.Decoder(1).decode_batch([data], out, 256, 224) == [""]
        ref = _torchvision_resize_crop(pil_rgb(data), 256, 224)
        diff = np.abs(out[0].astype(np.int64) - ref.astype(np.int64)).mean()
        assert diff <= 1.0, (name, expect_dct, diff)


def test_misuse_raises_clear_errors():
    decoder = _decode.Decoder(1)
    with pytest.raises(ValueError, match=r"out must have shape \[1, 32, 32, 3\]"):
        decoder.decode_batch([b"x"], np.empty((1, 32, 31, 3), np.uint8), 40, 32)
    with pytest.raises(TypeError, match="uint8"):
        decoder.decode_batch([b"x"], np.empty((1, 32, 32, 3), np.float32), 40, 32)
    with pytest.raises(ValueError, match="crop"):
        decoder.decode_batch([b"x"], np.empty((1, 32, 32, 3), np.uint8), 16, 32)
    with pytest.raises(TypeError, match="item 0"):
        decoder.decode_batch([12], np.empty((1, 32, 32, 3), np.uint8), 40, 32)
    with pytest.raises(ValueError, match="read-only"):
        ro = np.empty((1, 32, 32, 3), np.uint8)
        ro.flags.writeable = False
        decoder.decode_batch([b"x"], ro, 40, 32)
    with pytest.raises(ValueError, match="threads"):
        _decode.Decoder(0)
    with pytest.raises(ValueError, match="empty file"):
        _decode.decode_image(b"")


def _jpeg_workload(count: int = 48) -> list[bytes]:
    rng = np.random.default_rng(0)
    base = photo("coffee.png")
    items = []
    for k in range(count):
        y, x = rng.integers(0, 80), rng.integers(0, 150)
        items.append(encode_jpeg(np.ascontiguousarray(base[y: y + 320, x: x + 450]), quality=85 + k % 10))
    return items


def _task_ids() -> set[str]:
    return set(os.listdir("/proc/self/task"))


def _run_ns(tid: str) -> int:
    """CPU time (ns) a thread of this process has run: the first field of its schedstat."""
    with open(f"/proc/self/task/{tid}/schedstat") as fh:
        return int(fh.read().split()[0])


HAS_SCHEDSTAT = os.path.exists(f"/proc/self/task/{threading.get_native_id()}/schedstat")


@pytest.mark.skipif(not HAS_SCHEDSTAT, reason="needs Linux's per-thread /proc/self/task/<tid>/schedstat")
def test_pool_threads_share_the_decodes():
    """The C++ thread pool: a 2-thread decoder starts 2 threads and both do a real part of the decoding (measured as
    each thread's own CPU time, not as a speed-up, so a loaded machine cannot fail it)."""
    items = _jpeg_workload()
    out = np.empty((len(items), 224, 224, 3), np.uint8)
    before = _task_ids()
    decoder = _decode.Decoder(2)
    pool = _task_ids() - before
    assert len(pool) == 2, f"Decoder(2) started {len(pool)} threads"
    start = {t: _run_ns(t) for t in pool}
    for _ in range(4):
        assert not any(decoder.decode_batch(items, out, 256, 224))
    used = {t: _run_ns(t) - start[t] for t in pool}
    total = sum(used.values())
    assert total > 0
    assert min(used.values()) >= 0.1 * total, f"one pool thread did almost everything: {sorted(used.values())} ns"


def test_gil_released_during_decode():
    """While one Python thread is inside decode_batch, another keeps running Python code: its longest pause during
    the call is a small part of the call (were the GIL held, the pause would be the whole call)."""
    items = _jpeg_workload() * 2
    out = np.empty((len(items), 224, 224, 3), np.uint8)
    decoder = _decode.Decoder(1)
    decoder.decode_batch(items[:4], out[:4], 256, 224)
    window: dict[str, float] = {}

    def work() -> None:
        window["start"] = time.perf_counter()
        assert not any(decoder.decode_batch(items, out, 256, 224))
        window["end"] = time.perf_counter()

    pauses = []
    thread = threading.Thread(target=work)
    last = time.perf_counter()
    thread.start()
    while thread.is_alive():
        now = time.perf_counter()
        if now - last > 1e-3:
            pauses.append((last, now))
        last = now
    thread.join()
    pauses.append((last, float("inf")))
    start, end = window["start"], window["end"]
    span = end - start
    longest = max(max(0.0, min(b, end) - max(a, start)) for a, b in pauses)
    assert longest < 0.5 * span, f"the main thread stood still for {longest:.3f} s of a {span:.3f} s decode"


def test_version_names_libraries():
    assert "libjpeg-turbo/" in _decode.VERSION and "libspng/" in _decode.VERSION
