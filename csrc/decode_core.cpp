// sfmkern decode core (see decode_core.h). Formats are sniffed from magic bytes, never from file names. Output is
// always 8-bit RGB: gray replicated, alpha composited over white, 16-bit scaled by 255/65535 with rounding, CMYK/YCCK
// converted like Pillow. EXIF orientation is ignored (as Pillow's Image.open and torchvision's Resize pipeline do).
// Limits: declared width*height above Limits::max_pixels is refused before any pixel buffer is allocated.
#include "decode_core.h"

#include <spng.h>
#include <turbojpeg.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <new>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#ifndef SFMKERN_TURBOJPEG_VERSION
#define SFMKERN_TURBOJPEG_VERSION "unknown"
#endif
#ifndef SFMKERN_SPNG_VERSION
#define SFMKERN_SPNG_VERSION "unknown"
#endif

namespace sfmkern {

namespace {

constexpr int kDecoderRevision = 1;  // bump whenever decoded pixels may change
constexpr uint8_t kBackground = 255;  // alpha is composited over white

inline uint8_t clamp_u8(float v) {
  // round half up, then clamp: the resampler's float accumulator to uint8
  v += 0.5f;
  if (v <= 0.f) return 0;
  if (v >= 255.f) return 255;
  return static_cast<uint8_t>(v);
}

inline int muldiv255(int a, int b) {  // Pillow's MULDIV255: round(a * b / 255) for a, b in [0, 255]
  int t = a * b + 128;
  return ((t >> 8) + t) >> 8;
}

template <typename Fn>
struct Defer {
  Fn fn;
  ~Defer() { fn(); }
};
template <typename Fn>
Defer<Fn> defer(Fn fn) {
  return Defer<Fn>{fn};
}

std::string too_many_pixels(uint64_t w, uint64_t h, const Limits& limits) {
  return "too many pixels: declared " + std::to_string(w) + "x" + std::to_string(h) + " > limit " +
         std::to_string(limits.max_pixels);
}

// True when a JPEG carries an Adobe APP14 marker (then CMYK samples are stored inverted, as Photoshop writes them).
bool has_adobe_marker(const uint8_t* d, size_t n) {
  size_t i = 2;
  while (i + 4 <= n) {
    if (d[i] != 0xFF) return false;
    uint8_t m = d[i + 1];
    if (m == 0xFF) { ++i; continue; }
    if (m == 0xDA || m == 0xD9) return false;  // start of scan / end of image: no more header segments
    size_t len = (size_t(d[i + 2]) << 8) | d[i + 3];
    if (len < 2) return false;
    if (m == 0xEE && len >= 7 && i + 4 + 5 <= n && std::memcmp(d + i + 4, "Adobe", 5) == 0) return true;
    i += 2 + len;
  }
  return false;
}

// Frame size and component count from the first SOFn marker (used when TurboJPEG 2.x refuses to report the header
// of a JPEG whose subsampling it cannot name, e.g. CMYK with subsampled channels; decompression still works).
bool parse_sof(const uint8_t* d, size_t n, int* w, int* h, int* components) {
  size_t i = 2;
  while (i + 4 <= n) {
    if (d[i] != 0xFF) return false;
    uint8_t m = d[i + 1];
    if (m == 0xFF) { ++i; continue; }
    if (m == 0xDA || m == 0xD9) return false;
    size_t len = (size_t(d[i + 2]) << 8) | d[i + 3];
    if (len < 2) return false;
    const bool sof = m >= 0xC0 && m <= 0xCF && m != 0xC4 && m != 0xC8 && m != 0xCC;
    if (sof) {
      if (len < 8 || i + 10 > n) return false;
      *h = (int(d[i + 5]) << 8) | d[i + 6];
      *w = (int(d[i + 7]) << 8) | d[i + 8];
      *components = d[i + 9];
      return true;
    }
    i += 2 + len;
  }
  return false;
}

std::string tj_error(void* tj, const char* what) {
  const char* msg = tjGetErrorStr2(static_cast<tjhandle>(tj));
  return std::string("jpeg: ") + what + ": " + (msg ? msg : "unknown error");
}

std::string decode_jpeg_impl(const uint8_t* data, size_t size, Scratch& s, const Limits& limits, int min_short,
                             Decoded* out, bool* handle_failed);

// TurboJPEG 2.x leaves a handle mid-stream after a failed call (tjDecompressHeader3 returns without aborting the
// libjpeg decompressor), which changes how the next image is parsed. So the handle is replaced after any failure.
std::string decode_jpeg(const uint8_t* data, size_t size, Scratch& s, const Limits& limits, int min_short,
                        Decoded* out) {
  if (s.tj == nullptr) s.tj = tjInitDecompress();
  if (s.tj == nullptr) return "jpeg: TurboJPEG decompressor could not be created";
  bool handle_failed = false;
  std::string reason = decode_jpeg_impl(data, size, s, limits, min_short, out, &handle_failed);
  if (handle_failed) {
    tjDestroy(static_cast<tjhandle>(s.tj));
    s.tj = tjInitDecompress();
  }
  return reason;
}

std::string decode_jpeg_impl(const uint8_t* data, size_t size, Scratch& s, const Limits& limits, int min_short,
                             Decoded* out, bool* handle_failed) {
  tjhandle tj = static_cast<tjhandle>(s.tj);
  int w = 0, h = 0, subsamp = 0, colorspace = 0;
  if (tjDecompressHeader3(tj, data, static_cast<unsigned long>(size), &w, &h, &subsamp, &colorspace) != 0) {
    *handle_failed = true;
    const char* msg = tjGetErrorStr2(tj);
    int components = 0;
    if (msg == nullptr || std::strstr(msg, "subsampling") == nullptr || !parse_sof(data, size, &w, &h, &components) ||
        (components != 1 && components != 3 && components != 4)) {
      return tj_error(tj, "bad header");
    }
    colorspace = components == 4 ? TJCS_CMYK : TJCS_YCbCr;  // decompression converts YCCK/CMYK alike to CMYK
  }
  if (w <= 0 || h <= 0) return "jpeg: invalid size " + std::to_string(w) + "x" + std::to_string(h);
  if (uint64_t(w) * uint64_t(h) > limits.max_pixels) return too_many_pixels(w, h, limits);

  tjscalingfactor scale{1, 1};
  if (min_short > 0) {
    int count = 0;
    tjscalingfactor* factors = tjGetScalingFactors(&count);
    if (factors == nullptr || count <= 0) return tj_error(tj, "tjGetScalingFactors");
    const int short_side = std::min(w, h);
    for (int denom : {8, 4, 2}) {  // smallest image first: stop at the first that keeps short side >= min_short
      bool available = false;
      for (int k = 0; k < count; ++k) available |= (factors[k].num == 1 && factors[k].denom == denom);
      tjscalingfactor f{1, denom};
      if (available && TJSCALED(short_side, f) >= min_short) {
        scale = f;
        break;
      }
    }
  }
  const int sw = TJSCALED(w, scale), sh = TJSCALED(h, scale);
  const bool cmyk = (colorspace == TJCS_CMYK || colorspace == TJCS_YCCK);
  const int pf = cmyk ? TJPF_CMYK : TJPF_RGB;
  const size_t bytes = size_t(sw) * size_t(sh) * size_t(tjPixelSize[pf]);
  s.decoded.resize(bytes);
  const int flags = TJFLAG_LIMITSCANS;  // refuse progressive files with > 500 scans (a known decompression bomb)
  if (tjDecompress2(tj, data, static_cast<unsigned long>(size), s.decoded.data(), sw, 0, sh, pf, flags) != 0) {
    *handle_failed = true;
    // Warnings (corrupt-but-decodable data, e.g. extraneous bytes) are accepted as Pillow accepts them; a
    // truncated stream is refused (Pillow raises "image file is truncated"); fatal errors are refused.
    const char* msg = tjGetErrorStr2(tj);
    const bool truncated = msg != nullptr && std::strstr(msg, "Premature end") != nullptr;
    if (tjGetErrorCode(tj) != TJERR_WARNING || truncated) return tj_error(tj, truncated ? "truncated" : "decode");
  }
  s.rgb.resize(size_t(sw) * size_t(sh) * 3);
  if (cmyk) {
    const bool inverted = has_adobe_marker(data, size);
    const uint8_t* src = s.decoded.data();
    uint8_t* dst = s.rgb.data();
    for (size_t p = 0, n = size_t(sw) * size_t(sh); p < n; ++p, src += 4, dst += 3) {
      // Pillow: CMYK (inverted when Adobe) -> RGB as R = (255-K) - (C * (255-K)) / 255, per channel.
      const int k = inverted ? src[3] : 255 - src[3];  // nk = 255 - K in Pillow's terms
      for (int c = 0; c < 3; ++c) {
        const int v = inverted ? 255 - src[c] : src[c];
        dst[c] = static_cast<uint8_t>(std::clamp(k - muldiv255(v, k), 0, 255));
      }
    }
  } else {
    s.rgb.swap(s.decoded);
  }
  out->width = sw;
  out->height = sh;
  out->orig_width = w;
  out->orig_height = h;
  return "";
}

std::string spng_error(int rc, const char* what) {
  return std::string("png: ") + what + ": " + spng_strerror(rc);
}

std::string decode_png(const uint8_t* data, size_t size, Scratch& s, const Limits& limits, Decoded* out) {
  spng_ctx* ctx = spng_ctx_new(0);
  if (ctx == nullptr) return "png: spng_ctx_new failed (out of memory)";
  auto free_ctx = defer([ctx] { spng_ctx_free(ctx); });
  int rc = spng_set_crc_action(ctx, SPNG_CRC_ERROR, SPNG_CRC_DISCARD);  // bad CRC: error (critical), drop (ancillary)
  if (rc != 0) return spng_error(rc, "spng_set_crc_action");
  rc = spng_set_chunk_limits(ctx, size_t(64) << 20, size_t(64) << 20);
  if (rc != 0) return spng_error(rc, "spng_set_chunk_limits");
  rc = spng_set_png_buffer(ctx, data, size);
  if (rc != 0) return spng_error(rc, "spng_set_png_buffer");
  spng_ihdr ihdr{};
  rc = spng_get_ihdr(ctx, &ihdr);
  if (rc != 0) return spng_error(rc, "bad header");
  const uint64_t w = ihdr.width, h = ihdr.height;
  if (w == 0 || h == 0) return "png: invalid size";
  if (w * h > limits.max_pixels) return too_many_pixels(w, h, limits);
  if (w > 0x7fffffff || h > 0x7fffffff) return too_many_pixels(w, h, limits);

  const bool wide = ihdr.bit_depth == 16;
  const int fmt = wide ? SPNG_FMT_RGBA16 : SPNG_FMT_RGBA8;
  size_t bytes = 0;
  rc = spng_decoded_image_size(ctx, fmt, &bytes);
  if (rc != 0) return spng_error(rc, "spng_decoded_image_size");
  if (bytes != w * h * (wide ? 8 : 4)) return "png: unexpected decoded size";
  s.decoded.resize(bytes);
  rc = spng_decode_image(ctx, s.decoded.data(), bytes, fmt, SPNG_DECODE_TRNS);
  if (rc != 0) return spng_error(rc, "decode");

  const size_t n = size_t(w) * size_t(h);
  s.rgb.resize(n * 3);
  uint8_t* dst = s.rgb.data();
  if (wide) {
    const uint16_t* src = reinterpret_cast<const uint16_t*>(s.decoded.data());  // host-endian per libspng
    for (size_t p = 0; p < n; ++p, src += 4, dst += 3) {
      const uint64_t a = src[3];
      for (int c = 0; c < 3; ++c) {
        // composite over white in 16 bits, then scale to 8 bits: round(v * 255 / 65535)
        const uint64_t v = (uint64_t(src[c]) * a + 65535u * (65535u - a) + 32767u) / 65535u;
        dst[c] = static_cast<uint8_t>((v * 255u + 32767u) / 65535u);
      }
    }
  } else {
    const uint8_t* src = s.decoded.data();
    for (size_t p = 0; p < n; ++p, src += 4, dst += 3) {
      const int a = src[3];
      if (a == 255) {
        dst[0] = src[0];
        dst[1] = src[1];
        dst[2] = src[2];
      } else {
        for (int c = 0; c < 3; ++c) dst[c] = static_cast<uint8_t>((src[c] * a + kBackground * (255 - a) + 127) / 255);
      }
    }
  }
  out->width = out->orig_width = static_cast<int>(w);
  out->height = out->orig_height = static_cast<int>(h);
  return "";
}

const char* sniff_other(const uint8_t* d, size_t n) {
  if (n >= 6 && (std::memcmp(d, "GIF87a", 6) == 0 || std::memcmp(d, "GIF89a", 6) == 0)) return "GIF";
  if (n >= 12 && std::memcmp(d, "RIFF", 4) == 0 && std::memcmp(d + 8, "WEBP", 4) == 0) return "WebP";
  if (n >= 2 && d[0] == 'B' && d[1] == 'M') return "BMP";
  if (n >= 4 && (std::memcmp(d, "II*\0", 4) == 0 || std::memcmp(d, "MM\0*", 4) == 0)) return "TIFF";
  return nullptr;
}

// Filter windows and normalised triangle-filter weights for output indices [first, first + count) of a resize
// from in_size to out_size (Pillow's / torch's antialiased bilinear: support scales with the downscale factor).
void resample_coeffs(int in_size, int64_t out_size, int64_t first, int count, std::vector<int>& start,
                     std::vector<int>& taps, std::vector<float>& weights, int* max_taps) {
  const double scale = double(in_size) / double(out_size);
  const double filterscale = std::max(scale, 1.0);
  const double support = filterscale * 1.0;
  const int ksize = static_cast<int>(std::ceil(support)) * 2 + 1;
  start.resize(count);
  taps.resize(count);
  weights.assign(size_t(count) * size_t(ksize), 0.f);
  *max_taps = ksize;
  for (int i = 0; i < count; ++i) {
    const double center = (double(first + i) + 0.5) * scale;
    int xmin = static_cast<int>(center - support + 0.5);
    if (xmin < 0) xmin = 0;
    int xmax = static_cast<int>(center + support + 0.5);
    if (xmax > in_size) xmax = in_size;
    int n = std::min(xmax - xmin, ksize);
    if (n < 1) {  // cannot happen for valid sizes; keep one tap so every output is defined
      xmin = std::min(std::max(static_cast<int>(center), 0), in_size - 1);
      n = 1;
    }
    double total = 0.0;
    float* w = weights.data() + size_t(i) * ksize;
    double tmp[64];
    std::vector<double> big;
    double* acc = tmp;
    if (n > 64) {
      big.resize(n);
      acc = big.data();
    }
    for (int x = 0; x < n; ++x) {
      const double t = std::fabs((x + xmin - center + 0.5) / filterscale);
      const double v = t < 1.0 ? 1.0 - t : 0.0;
      acc[x] = v;
      total += v;
    }
    for (int x = 0; x < n; ++x) w[x] = total > 0.0 ? static_cast<float>(acc[x] / total) : (x == 0 ? 1.f : 0.f);
    start[i] = xmin;
    taps[i] = n;
  }
}

// torchvision CenterCrop offset: int(round((size - crop) / 2.0)) with Python's round-half-to-even.
int64_t centre_offset(int64_t size, int64_t crop) {
  const int64_t d = size - crop;
  if (d % 2 == 0) return d / 2;
  const int64_t half = d / 2;  // d > 0 here since crop <= size; value is half + 0.5
  return (half % 2 == 0) ? half : half + 1;
}

}  // namespace

Scratch::Scratch() { tj = tjInitDecompress(); }

Scratch::~Scratch() {
  if (tj != nullptr) tjDestroy(static_cast<tjhandle>(tj));
}

namespace {
template <typename T>
size_t capacity_bytes(const std::vector<T>& v) {
  return v.capacity() * sizeof(T);
}
template <typename T>
void release_above(std::vector<T>& v, size_t max_bytes) {
  if (capacity_bytes(v) > max_bytes) std::vector<T>().swap(v);
}
}  // namespace

size_t Scratch::bytes() const {
  return capacity_bytes(file) + capacity_bytes(decoded) + capacity_bytes(rgb) + capacity_bytes(rows) +
         capacity_bytes(wx) + capacity_bytes(wy) + capacity_bytes(bx) + capacity_bytes(by) + capacity_bytes(nx) +
         capacity_bytes(ny);
}

void Scratch::trim(size_t max_bytes) {
  release_above(file, max_bytes);
  release_above(decoded, max_bytes);
  release_above(rgb, max_bytes);
  release_above(rows, max_bytes);
  release_above(wx, max_bytes);
  release_above(wy, max_bytes);
  release_above(bx, max_bytes);
  release_above(by, max_bytes);
  release_above(nx, max_bytes);
  release_above(ny, max_bytes);
}

std::string load_bytes(const ItemSource& src, Scratch& scratch, const Limits& limits, const uint8_t** data,
                       size_t* size) {
  if (src.data != nullptr || src.path.empty()) {
    *data = src.data;
    *size = src.data ? src.size : 0;
    return "";
  }
  // O_NONBLOCK: opening a FIFO (or a device) must not block; anything but a regular file is refused unread.
  const int fd = ::open(src.path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);
  if (fd < 0) return "cannot open " + src.path + ": " + std::strerror(errno);
  struct stat st {};
  if (fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    return "cannot stat " + src.path + ": " + std::strerror(err);
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    return "not a regular file (FIFO, socket or device): " + src.path;
  }
  const int flags = fcntl(fd, F_GETFL);
  if (flags >= 0) fcntl(fd, F_SETFL, flags & ~O_NONBLOCK);
  FILE* fh = fdopen(fd, "rb");
  if (fh == nullptr) {
    const int err = errno;
    ::close(fd);
    return "cannot open " + src.path + ": " + std::strerror(err);
  }
  auto close_fh = defer([fh] { std::fclose(fh); });
  int64_t length = src.length;
  if (length < 0) {
    length = static_cast<int64_t>(st.st_size) - src.offset;
    if (length < 0) return "offset beyond end of " + src.path;
  }
  if (uint64_t(length) > limits.max_file_bytes) return "file too large: " + std::to_string(length) + " bytes";
  if (src.offset > 0 && fseeko(fh, static_cast<off_t>(src.offset), SEEK_SET) != 0) {
    return "cannot seek in " + src.path + ": " + std::strerror(errno);
  }
  scratch.file.resize(size_t(length));
  const size_t got = length > 0 ? std::fread(scratch.file.data(), 1, size_t(length), fh) : 0;
  if (got != size_t(length)) {
    return std::ferror(fh) ? "read error in " + src.path + ": " + std::strerror(errno)
                           : "short read in " + src.path;
  }
  *data = scratch.file.data();
  *size = got;
  return "";
}

std::string decode_rgb(const uint8_t* data, size_t size, Scratch& scratch, const Limits& limits, int min_short,
                       Decoded* out) {
  if (data == nullptr || size == 0) return "empty file";
  static const uint8_t kPng[8] = {0x89, 'P', 'N', 'G', 0x0D, 0x0A, 0x1A, 0x0A};
  if (size >= 3 && data[0] == 0xFF && data[1] == 0xD8 && data[2] == 0xFF) {
    return decode_jpeg(data, size, scratch, limits, min_short, out);
  }
  if (size >= 8 && std::memcmp(data, kPng, 8) == 0) return decode_png(data, size, scratch, limits, out);
  if (const char* other = sniff_other(data, size)) return std::string("unsupported format: ") + other;
  char magic[32];
  std::snprintf(magic, sizeof magic, "%02x %02x %02x %02x", size > 0 ? data[0] : 0, size > 1 ? data[1] : 0,
                size > 2 ? data[2] : 0, size > 3 ? data[3] : 0);
  return std::string("unsupported format (not JPEG or PNG; first bytes ") + magic + ")";
}

std::string resize_crop(const uint8_t* src, int w, int h, int channels, int64_t src_row_stride, int orig_w,
                        int orig_h, int resize, int crop, uint8_t* out, Scratch& s) {
  if (w <= 0 || h <= 0 || orig_w <= 0 || orig_h <= 0) return "resize: empty image";
  if (channels != 1 && channels != 3) return "resize: channels must be 1 or 3";
  if (crop <= 0 || resize < crop) return "resize: need 0 < crop <= resize";
  // torchvision Resize(int): shorter side -> resize, longer -> int(resize * long / short) (computed exactly here)
  int64_t new_w, new_h;
  if (orig_w <= orig_h) {
    new_w = resize;
    new_h = int64_t(resize) * orig_h / orig_w;
  } else {
    new_h = resize;
    new_w = int64_t(resize) * orig_w / orig_h;
  }
  if (new_w < crop || new_h < crop) return "resize: crop larger than resized image";
  const int64_t top = centre_offset(new_h, crop), left = centre_offset(new_w, crop);

  int kx = 0, ky = 0;
  resample_coeffs(w, new_w, left, crop, s.bx, s.nx, s.wx, &kx);
  resample_coeffs(h, new_h, top, crop, s.by, s.ny, s.wy, &ky);
  const int row0 = s.by[0];
  int row1 = row0;
  for (int i = 0; i < crop; ++i) row1 = std::max(row1, s.by[i] + s.ny[i]);
  const int rows = row1 - row0;

  // horizontal pass over the source rows the crop needs -> float [rows, crop, 3]
  s.rows.resize(size_t(rows) * size_t(crop) * 3);
  for (int r = 0; r < rows; ++r) {
    const uint8_t* line = src + int64_t(row0 + r) * src_row_stride;
    float* dst = s.rows.data() + size_t(r) * crop * 3;
    for (int j = 0; j < crop; ++j) {
      const float* wt = s.wx.data() + size_t(j) * kx;
      const int x0 = s.bx[j], n = s.nx[j];
      float a0 = 0.f, a1 = 0.f, a2 = 0.f;
      if (channels == 3) {
        const uint8_t* p = line + size_t(x0) * 3;
        for (int t = 0; t < n; ++t, p += 3) {
          a0 += wt[t] * p[0];
          a1 += wt[t] * p[1];
          a2 += wt[t] * p[2];
        }
      } else {
        const uint8_t* p = line + x0;
        for (int t = 0; t < n; ++t) a0 += wt[t] * p[t];
        a1 = a2 = a0;
      }
      dst[3 * j] = a0;
      dst[3 * j + 1] = a1;
      dst[3 * j + 2] = a2;
    }
  }
  // vertical pass -> out [crop, crop, 3]
  const size_t row_len = size_t(crop) * 3;
  for (int i = 0; i < crop; ++i) {
    const float* wt = s.wy.data() + size_t(i) * ky;
    const float* base = s.rows.data() + size_t(s.by[i] - row0) * row_len;
    uint8_t* o = out + size_t(i) * row_len;
    const int n = s.ny[i];
    for (size_t k = 0; k < row_len; ++k) {
      float acc = 0.f;
      for (int t = 0; t < n; ++t) acc += wt[t] * base[size_t(t) * row_len + k];
      o[k] = clamp_u8(acc);
    }
  }
  return "";
}

std::string process_item(const ItemSource& src, Scratch& scratch, const Limits& limits, int resize, int crop,
                         uint8_t* out) {
  std::string reason;
  try {
    const uint8_t* data = nullptr;
    size_t size = 0;
    reason = load_bytes(src, scratch, limits, &data, &size);
    Decoded img;
    // DCT scaling keeps a 2x margin over the target, so the antialiased resize still does the filtering and the
    // result stays close to a full decode + resize (scaling straight to the target measurably sharpens textures).
    if (reason.empty()) reason = decode_rgb(data, size, scratch, limits, 2 * resize, &img);
    if (reason.empty()) {
      reason = resize_crop(scratch.rgb.data(), img.width, img.height, 3, int64_t(img.width) * 3, img.orig_width,
                           img.orig_height, resize, crop, out, scratch);
    }
  } catch (const std::bad_alloc&) {
    reason = "out of memory";
  } catch (const std::exception& e) {
    reason = std::string("internal error: ") + e.what();
  } catch (...) {
    reason = "internal error";
  }
  if (!reason.empty()) std::memset(out, 0, size_t(crop) * size_t(crop) * 3);
  scratch.trim(static_cast<size_t>(std::min<uint64_t>(limits.max_scratch_bytes, SIZE_MAX)));
  return reason;
}

std::string version_string() {
  return "sfmkern-decode/" + std::to_string(kDecoderRevision) + " libjpeg-turbo/" SFMKERN_TURBOJPEG_VERSION
         " libspng/" SFMKERN_SPNG_VERSION " resize=triangle-aa crop=center dct-scale=short>=2*resize bg=white";
}

}  // namespace sfmkern
