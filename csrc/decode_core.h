// sfmkern decode core: sniff -> decode (TurboJPEG / libspng) -> antialiased shorter-side resize -> centre crop,
// written straight into a caller-provided uint8 [S,S,3] slot. Plain C++ (no Python), so the same code runs inside
// the pybind11 module and inside the AddressSanitizer corpus driver. Every failure is returned as a reason string;
// nothing in here throws across the public functions.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace sfmkern {

// Per-thread working memory, reused from image to image, plus this thread's TurboJPEG handle. Buffers grow to the
// largest image seen; `trim` frees those above a threshold, so one huge image does not pin its memory for good.
struct Scratch {
  Scratch();
  ~Scratch();
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;

  size_t bytes() const;             // capacity of every buffer, in bytes
  void trim(size_t max_bytes);      // free each buffer whose capacity exceeds max_bytes

  void* tj = nullptr;             // tjhandle, created by tjInitDecompress in the owning thread, freed by tjDestroy
  std::vector<uint8_t> file;      // bytes read from disk
  std::vector<uint8_t> decoded;   // raw decoder output (RGB, CMYK, RGBA8 or RGBA16)
  std::vector<uint8_t> rgb;       // 8-bit RGB image handed to the resampler
  std::vector<float> rows;        // horizontally resampled rows [rows, S, 3]
  std::vector<float> wx, wy;      // filter weights
  std::vector<int> bx, by, nx, ny;  // filter windows (first tap, tap count)
};

struct Limits {
  uint64_t max_pixels = uint64_t(1) << 28;   // declared width*height above this is flagged, never allocated
  uint64_t max_file_bytes = uint64_t(1) << 30;
  uint64_t max_scratch_bytes = uint64_t(64) << 20;  // per-buffer capacity kept between items (process_item trims)
};

// An 8-bit RGB image in Scratch::rgb with its size; orig_w/orig_h are the declared (pre DCT-scaling) dimensions.
struct Decoded {
  int width = 0, height = 0;
  int orig_width = 0, orig_height = 0;
};

// Where the encoded bytes of one item live: in memory (data != nullptr) or in a file (path, offset, length<0: all).
struct ItemSource {
  const uint8_t* data = nullptr;
  size_t size = 0;
  std::string path;
  int64_t offset = 0;
  int64_t length = -1;
};

// Reads `src` into scratch.file when it names a file. Returns "" on success.
std::string load_bytes(const ItemSource& src, Scratch& scratch, const Limits& limits, const uint8_t** data,
                       size_t* size);

// Decodes JPEG or PNG (sniffed from magic bytes) to 8-bit RGB in scratch.rgb. `min_short` > 0 lets JPEG use DCT
// scaling (1/2, 1/4, 1/8) as long as the scaled shorter side stays >= min_short. Returns "" or a reason.
std::string decode_rgb(const uint8_t* data, size_t size, Scratch& scratch, const Limits& limits, int min_short,
                       Decoded* out);

// Resizes the shorter side of an image whose declared size is orig_w x orig_h to `resize` (the longer side to
// floor(resize * long / short), torchvision's rule) with an antialiased triangle filter, then takes the centre
// `crop` x `crop` window (torchvision's CenterCrop offsets), reading the actual pixels `src` [h, w, channels]
// (h, w may be DCT-scaled versions of orig). Channels 1 (replicated) or 3. Writes out[crop, crop, 3].
std::string resize_crop(const uint8_t* src, int w, int h, int channels, int64_t src_row_stride, int orig_w,
                        int orig_h, int resize, int crop, uint8_t* out, Scratch& scratch);

// decode + resize + crop of one item into out[crop, crop, 3]; zero-fills `out` on failure; trims the scratch to
// limits.max_scratch_bytes afterwards. Never throws.
std::string process_item(const ItemSource& src, Scratch& scratch, const Limits& limits, int resize, int crop,
                         uint8_t* out);

// Library versions and decoder behaviour revision, recorded in statistics files.
std::string version_string();

}  // namespace sfmkern
