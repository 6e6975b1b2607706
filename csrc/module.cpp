// pybind11 binding of the decode core: `sfmkern._decode`. Python objects are read while the GIL is held (paths,
// byte buffers, output buffer), then the GIL is released for all file I/O, decoding and resampling, which run on a
// C++ thread pool. Per-item failures come back as reason strings ("" = ok; an exception inside the pool becomes
// "internal error: ..."); only misuse (bad shapes) raises.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <memory>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

#include "decode_core.h"
#include "thread_pool.h"

namespace py = pybind11;
using namespace pybind11::literals;

namespace {

using sfmkern::ItemSource;
using sfmkern::Limits;
using sfmkern::Scratch;

// A writable, C-contiguous uint8 buffer [n, crop, crop, 3].
uint8_t* check_out(py::buffer_info& info, size_t n, int crop) {
  if (info.readonly) throw py::value_error("out must be writable");
  if (info.itemsize != 1 || (info.format != "B" && info.format != "b" && info.format != "c"))
    throw py::type_error("out must be a uint8 buffer, got format '" + info.format + "'");
  if (info.ndim != 4 || info.shape[0] != static_cast<py::ssize_t>(n) || info.shape[1] != crop ||
      info.shape[2] != crop || info.shape[3] != 3) {
    std::string got = "[";
    for (py::ssize_t d = 0; d < info.ndim; ++d) got += (d ? ", " : "") + std::to_string(info.shape[d]);
    throw py::value_error("out must have shape [" + std::to_string(n) + ", " + std::to_string(crop) + ", " +
                          std::to_string(crop) + ", 3], got " + got + "]");
  }
  if (info.strides[3] != 1 || info.strides[2] != 3 || info.strides[1] != 3 * crop ||
      info.strides[0] != py::ssize_t(3) * crop * crop)
    throw py::value_error("out must be C-contiguous");
  return static_cast<uint8_t*>(info.ptr);
}

void check_sizes(int resize, int crop) {
  if (crop <= 0 || resize <= 0) throw py::value_error("resize and crop must be positive integers");
  if (crop > resize)
    throw py::value_error("crop (" + std::to_string(crop) + ") must be <= resize (" + std::to_string(resize) + ")");
}

// Reasons as a list of str; bytes that are not UTF-8 (a non-UTF-8 path inside a reason) become backslash escapes.
py::list reasons_to_py(const std::vector<std::string>& reasons) {
  py::list out(reasons.size());
  for (size_t i = 0; i < reasons.size(); ++i) {
    PyObject* text = PyUnicode_DecodeUTF8(reasons[i].data(), static_cast<Py_ssize_t>(reasons[i].size()),
                                          "backslashreplace");
    if (text == nullptr) throw py::error_already_set();
    out[i] = py::reinterpret_steal<py::object>(text);
  }
  return out;
}

// Failed slots hold zeros, whatever a failing job left there.
void zero_failed(const std::vector<std::string>& reasons, uint8_t* dst, size_t slot) {
  for (size_t i = 0; i < reasons.size(); ++i)
    if (!reasons[i].empty()) std::memset(dst + i * slot, 0, slot);
}

class Decoder {
 public:
  Decoder(int threads, uint64_t max_pixels, uint64_t max_scratch_bytes) : pool_(threads < 1 ? 1 : threads) {
    if (threads < 1) throw py::value_error("threads must be >= 1, got " + std::to_string(threads));
    if (max_pixels == 0) throw py::value_error("max_pixels must be >= 1");
    limits_.max_pixels = max_pixels;
    limits_.max_scratch_bytes = max_scratch_bytes;
  }

  int threads() const { return pool_.size(); }
  uint64_t max_pixels() const { return limits_.max_pixels; }
  uint64_t max_scratch_bytes() const { return limits_.max_scratch_bytes; }
  size_t scratch_bytes() {
    py::gil_scoped_release release;  // waits for a run in another thread to finish
    return pool_.scratch_bytes();
  }

  // items: bytes-like objects, paths (str / bytes-path / os.PathLike) or (path, offset, length) tuples. Every item
  // is held by an owned reference (`keep`) until the GIL is back, so a lazy sequence that makes its items on the
  // fly cannot free a buffer the decode threads still read. Paths go through os.fsencode (any bytes the OS allows,
  // non-UTF-8 names included).
  py::list decode_batch(const py::sequence& items, const py::buffer& out, int resize, int crop) {
    check_sizes(resize, crop);
    const size_t n = py::len(items);
    py::buffer_info out_info = out.request(true);
    uint8_t* dst = check_out(out_info, n, crop);
    std::vector<ItemSource> sources(n);
    std::vector<py::object> keep;  // owned references to every item (and so to every bytes object read below)
    keep.reserve(n);
    std::vector<std::unique_ptr<py::buffer_info>> views;  // keeps non-bytes buffers alive until the GIL is back
    py::module_ os = py::module_::import("os");
    py::object fsencode = os.attr("fsencode");
    auto path_of = [&](py::handle p) { return fsencode(p).cast<std::string>(); };
    for (size_t i = 0; i < n; ++i) {
      keep.push_back(items[i]);
      const py::object& item = keep.back();
      ItemSource& src = sources[i];
      if (PyBytes_Check(item.ptr())) {
        src.data = reinterpret_cast<const uint8_t*>(PyBytes_AS_STRING(item.ptr()));
        src.size = static_cast<size_t>(PyBytes_GET_SIZE(item.ptr()));
        if (src.size == 0) src.data = nullptr;
      } else if (py::isinstance<py::tuple>(item)) {
        auto t = py::reinterpret_borrow<py::tuple>(item);
        if (t.size() != 3) throw py::value_error("item " + std::to_string(i) + ": expected (path, offset, length)");
        src.path = path_of(t[0]);
        src.offset = t[1].cast<int64_t>();
        src.length = t[2].cast<int64_t>();
        if (src.offset < 0) throw py::value_error("item " + std::to_string(i) + ": negative offset");
      } else if (py::isinstance<py::str>(item) || py::hasattr(item, "__fspath__")) {
        src.path = path_of(item);
      } else if (PyObject_CheckBuffer(item.ptr())) {
        auto info = std::make_unique<py::buffer_info>(py::reinterpret_borrow<py::buffer>(item).request());
        if (info->itemsize != 1 || info->ndim != 1 || (info->ndim == 1 && info->strides[0] != 1))
          throw py::type_error("item " + std::to_string(i) + ": buffers must be 1-D contiguous bytes");
        src.data = static_cast<const uint8_t*>(info->ptr);
        src.size = static_cast<size_t>(info->size);
        if (src.size == 0) src.data = nullptr;
        views.push_back(std::move(info));
      } else {
        throw py::type_error("item " + std::to_string(i) + ": expected bytes, a path or (path, offset, length), got " +
                             std::string(py::str(py::type::of(item).attr("__name__"))));
      }
      if (!src.path.empty() && src.path.find('\0') != std::string::npos)
        throw py::value_error("item " + std::to_string(i) + ": path contains a NUL byte");
      if (src.data == nullptr && src.path.empty()) src.size = 0;
    }
    std::vector<std::string> reasons(n);
    const size_t slot = size_t(crop) * size_t(crop) * 3;
    {
      py::gil_scoped_release release;
      const Limits limits = limits_;
      auto job = sfmkern::guarded(reasons, [&](size_t i, Scratch& scratch) {
        reasons[i] = sfmkern::process_item(sources[i], scratch, limits, resize, crop, dst + i * slot);
      });
      pool_.run(n, job);
      zero_failed(reasons, dst, slot);
    }
    return reasons_to_py(reasons);
  }

  // images: uint8 [n, h, w] or [n, h, w, 3] (C-contiguous) -> out [n, crop, crop, 3]
  py::list resize_batch(const py::buffer& images, const py::buffer& out, int resize, int crop) {
    check_sizes(resize, crop);
    py::buffer_info in = images.request();
    if (in.itemsize != 1 || in.format != "B") throw py::type_error("images must be uint8");
    if (!(in.ndim == 3 || (in.ndim == 4 && (in.shape[3] == 3 || in.shape[3] == 1))))
      throw py::value_error("images must have shape [N, H, W] or [N, H, W, 3]");
    const int channels = in.ndim == 4 ? static_cast<int>(in.shape[3]) : 1;
    const py::ssize_t n = in.shape[0], h = in.shape[1], w = in.shape[2];
    if (h <= 0 || w <= 0) throw py::value_error("images must be non-empty");
    if (in.strides[in.ndim - 1] != 1 || in.strides[2] != channels || in.strides[1] != w * channels ||
        in.strides[0] != h * w * channels)
      throw py::value_error("images must be C-contiguous");
    py::buffer_info out_info = out.request(true);
    uint8_t* dst = check_out(out_info, static_cast<size_t>(n), crop);
    const uint8_t* src = static_cast<const uint8_t*>(in.ptr);
    std::vector<std::string> reasons(n);
    {
      py::gil_scoped_release release;
      const size_t slot = size_t(crop) * size_t(crop) * 3;
      const size_t image_bytes = size_t(h) * size_t(w) * size_t(channels);
      const size_t max_scratch = static_cast<size_t>(limits_.max_scratch_bytes);
      auto job = sfmkern::guarded(reasons, [&](size_t i, Scratch& scratch) {
        reasons[i] = sfmkern::resize_crop(src + i * image_bytes, static_cast<int>(w), static_cast<int>(h),
                                          channels, w * channels, static_cast<int>(w), static_cast<int>(h), resize,
                                          crop, dst + i * slot, scratch);
        scratch.trim(max_scratch);
      });
      pool_.run(static_cast<size_t>(n), job);
      zero_failed(reasons, dst, slot);
    }
    return reasons_to_py(reasons);
  }

 private:
  sfmkern::ThreadPool pool_;
  Limits limits_;
};

// Full-resolution decode of one encoded image to uint8 RGB [H, W, 3]; raises ValueError with the reason.
py::array_t<uint8_t> decode_image(const py::bytes& data, uint64_t max_pixels) {
  std::string_view view = data;
  Scratch scratch;
  Limits limits;
  limits.max_pixels = max_pixels;
  sfmkern::Decoded img;
  std::string reason;
  {
    py::gil_scoped_release release;
    try {
      reason = sfmkern::decode_rgb(reinterpret_cast<const uint8_t*>(view.data()), view.size(), scratch, limits, 0,
                                   &img);
    } catch (const std::bad_alloc&) {
      reason = "out of memory";
    }
  }
  if (!reason.empty()) throw py::value_error(reason);
  py::array_t<uint8_t> out({img.height, img.width, 3});
  std::memcpy(out.mutable_data(), scratch.rgb.data(), size_t(img.height) * img.width * 3);
  return out;
}

// Test hook for the pool's error path: runs n items on a pool of `threads`, item `throw_at` throws (`kind`:
// "runtime", "bad_alloc" or "other"); returns the per-item reasons the decoder would return.
std::vector<std::string> pool_throw_test(int threads, size_t n, size_t throw_at, const std::string& kind) {
  std::vector<std::string> reasons(n);
  py::gil_scoped_release release;
  sfmkern::ThreadPool pool(threads);
  auto job = sfmkern::guarded(reasons, [&](size_t i, Scratch&) {
    if (i != throw_at) return;
    if (kind == "bad_alloc") throw std::bad_alloc();
    if (kind == "runtime") throw std::runtime_error("boom at item " + std::to_string(i));
    throw 42;
  });
  pool.run(n, job);
  return reasons;
}

}  // namespace

PYBIND11_MODULE(_decode, m) {
  m.doc() = "sfmkern's streaming image decoder: JPEG/PNG decode + antialiased resize + centre crop (C++).";
  m.attr("VERSION") = sfmkern::version_string();
  m.attr("DEFAULT_MAX_PIXELS") = py::int_(uint64_t(1) << 28);

  py::class_<Decoder>(m, "Decoder", "A pool of decode threads (one TurboJPEG handle each).")
      .def(py::init<int, uint64_t, uint64_t>(), "threads"_a, "max_pixels"_a = uint64_t(1) << 28,
           "max_scratch_bytes"_a = uint64_t(64) << 20)
      .def_property_readonly("threads", &Decoder::threads)
      .def_property_readonly("max_pixels", &Decoder::max_pixels)
      .def_property_readonly("max_scratch_bytes", &Decoder::max_scratch_bytes)
      .def("scratch_bytes", &Decoder::scratch_bytes,
           "Bytes the decode threads' scratch buffers hold between batches (buffers above max_scratch_bytes are "
           "freed after each item).")
      .def("decode_batch", &Decoder::decode_batch, "items"_a, "out"_a, "resize"_a, "crop"_a,
           "Decode items (bytes, path, or (path, offset, length)) into out uint8 [N, crop, crop, 3]; returns one "
           "reason per item, '' when it decoded. Failed slots are zero-filled.")
      .def("resize_batch", &Decoder::resize_batch, "images"_a, "out"_a, "resize"_a, "crop"_a,
           "Resize+crop uint8 images [N, H, W] or [N, H, W, 3] into out uint8 [N, crop, crop, 3].");
  m.def("_pool_throw_test", &pool_throw_test, "threads"_a, "n"_a, "throw_at"_a, "kind"_a,
        "Test hook: per-item reasons when item throw_at throws inside the thread pool.");
  m.def("decode_image", &decode_image, "data"_a, "max_pixels"_a = uint64_t(1) << 28,
        "Decode one JPEG/PNG to uint8 RGB [H, W, 3] at full resolution; ValueError(reason) on failure.");
}
