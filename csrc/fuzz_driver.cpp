// Bounded mutation fuzzer for the decode core (scripts/fuzz_decoder.sh builds it with AddressSanitizer + UBSan).
// Seeds are the files named on the command line (the corpus of tests/decode_corpus.py). Each execution takes a seed,
// applies 1-4 mutations (random byte flips, truncations, inserted or spliced bytes, and header edits: JPEG SOF
// size/components/precision and segment lengths, PNG IHDR fields and chunk lengths with a recomputed CRC) and runs
// it through the same paths as the Python module: the fused decode + resize + crop (`process_item`, at a random
// resize/crop) and the full-size decode (`decode_rgb`). Fixed seed, time box, `--threads` worker threads (each with
// its own Scratch, as in the pool). Prints "executions: N" at the end; a sanitizer report aborts the process, and
// the death callback first writes every thread's current input to --crash-dir and prints the execution count.
//   fuzz_driver --seed 1 --seconds 60 [--threads 2] [--crash-dir DIR] FILE...
#include <sanitizer/common_interface_defs.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "decode_core.h"

namespace {

constexpr int kMaxThreads = 16;
std::vector<uint8_t> g_current[kMaxThreads];  // the input each thread is decoding (dumped by the death callback)
std::atomic<uint64_t> g_executions{0};
std::string g_crash_dir;

void on_death() {
  std::fprintf(stderr, "fuzz_driver: executions before the report: %llu\n",
               static_cast<unsigned long long>(g_executions.load()));
  if (g_crash_dir.empty()) return;
  for (int t = 0; t < kMaxThreads; ++t) {
    if (g_current[t].empty()) continue;
    const std::string path = g_crash_dir + "/crash-" + std::to_string(t) + ".bin";
    if (FILE* fh = std::fopen(path.c_str(), "wb")) {
      std::fwrite(g_current[t].data(), 1, g_current[t].size(), fh);
      std::fclose(fh);
      std::fprintf(stderr, "fuzz_driver: thread %d input written to %s\n", t, path.c_str());
    }
  }
}

uint32_t crc32(const uint8_t* data, size_t n) {
  uint32_t c = 0xFFFFFFFFu;
  for (size_t i = 0; i < n; ++i) {
    c ^= data[i];
    for (int k = 0; k < 8; ++k) c = (c >> 1) ^ (0xEDB88320u & (0u - (c & 1u)));
  }
  return c ^ 0xFFFFFFFFu;
}

void put_be16(std::vector<uint8_t>& b, size_t at, uint32_t v) {
  if (at + 2 > b.size()) return;
  b[at] = uint8_t(v >> 8);
  b[at + 1] = uint8_t(v);
}

void put_be32(std::vector<uint8_t>& b, size_t at, uint32_t v) {
  if (at + 4 > b.size()) return;
  for (int k = 0; k < 4; ++k) b[at + k] = uint8_t(v >> (24 - 8 * k));
}

uint32_t get_be32(const std::vector<uint8_t>& b, size_t at) {
  return (uint32_t(b[at]) << 24) | (uint32_t(b[at + 1]) << 16) | (uint32_t(b[at + 2]) << 8) | b[at + 3];
}

// A value that exercises edges: 0, 1, small, a byte boundary, a 16-bit edge or anything.
uint32_t edgy(std::mt19937_64& rng, uint32_t max) {
  static const uint32_t kEdges[] = {0, 1, 2, 3, 7, 8, 15, 16, 255, 256, 4095, 4096, 32767, 32768, 65534, 65535};
  const uint32_t pick = rng() % 4;
  uint32_t v = pick == 0 ? kEdges[rng() % (sizeof kEdges / sizeof kEdges[0])]
                         : pick == 1 ? uint32_t(rng() % 64) : uint32_t(rng());
  return max ? v % (max + 1) : v;
}

// JPEG: edit a header segment (SOF size, components, precision; any segment's length field).
void edit_jpeg_header(std::vector<uint8_t>& b, std::mt19937_64& rng) {
  std::vector<size_t> segments;
  size_t i = 2;
  while (i + 4 <= b.size() && b[i] == 0xFF && segments.size() < 64) {
    const uint8_t m = b[i + 1];
    if (m == 0xDA || m == 0xD9) {
      segments.push_back(i);
      break;
    }
    segments.push_back(i);
    i += 2 + ((size_t(b[i + 2]) << 8) | b[i + 3]);
  }
  if (segments.empty()) return;
  const size_t at = segments[rng() % segments.size()];
  const uint8_t m = b[at + 1];
  const bool sof = m >= 0xC0 && m <= 0xCF && m != 0xC4 && m != 0xC8 && m != 0xCC;
  switch (rng() % 4) {
    case 0:
      put_be16(b, at + 2, edgy(rng, 0xFFFF));  // segment length
      break;
    case 1:
      if (sof) {
        put_be16(b, at + 5, edgy(rng, 0xFFFF));  // height
        put_be16(b, at + 7, edgy(rng, 0xFFFF));  // width
      }
      break;
    case 2:
      if (sof && at + 9 < b.size()) b[at + 9] = uint8_t(edgy(rng, 255));  // components
      if (sof && at + 4 < b.size()) b[at + 4] = uint8_t(rng() % 2 ? 8 : edgy(rng, 255));  // precision
      break;
    default:
      if (sof && at + 12 < b.size()) b[at + 11] = uint8_t(edgy(rng, 255));  // first component's sampling factors
      else if (at + 5 < b.size()) b[at + 4 + rng() % 2] = uint8_t(rng());
      break;
  }
}

// PNG: edit IHDR (size, bit depth, colour type, interlace) or any chunk's length, then recompute that chunk's CRC.
void edit_png_header(std::vector<uint8_t>& b, std::mt19937_64& rng) {
  std::vector<size_t> chunks;
  size_t i = 8;
  while (i + 12 <= b.size() && chunks.size() < 64) {
    chunks.push_back(i);
    const uint64_t len = get_be32(b, i);
    if (len > b.size()) break;
    i += 12 + size_t(len);
  }
  if (chunks.empty()) return;
  const bool ihdr = chunks[0] + 8 + 13 + 4 <= b.size() && std::memcmp(b.data() + chunks[0] + 4, "IHDR", 4) == 0;
  const size_t at = (ihdr && rng() % 2 == 0) ? chunks[0] : chunks[rng() % chunks.size()];
  if (at == chunks[0] && ihdr) {
    static const uint8_t kDepths[] = {0, 1, 2, 4, 8, 16, 3, 32};
    static const uint8_t kTypes[] = {0, 2, 3, 4, 6, 1, 5, 7};
    switch (rng() % 4) {
      case 0:
        put_be32(b, at + 8, edgy(rng, 0));
        put_be32(b, at + 12, edgy(rng, 0));
        break;
      case 1:
        b[at + 16] = kDepths[rng() % 8];
        break;
      case 2:
        b[at + 17] = kTypes[rng() % 8];
        break;
      default:
        b[at + 18 + rng() % 3] = uint8_t(rng() % 3);  // compression, filter, interlace
        break;
    }
  } else {
    put_be32(b, at, edgy(rng, 0));  // chunk length
  }
  const uint64_t len = get_be32(b, at);
  if (at + 8 + len + 4 <= b.size()) put_be32(b, at + 8 + size_t(len), crc32(b.data() + at + 4, size_t(len) + 4));
}

void mutate(std::vector<uint8_t>& b, const std::vector<std::vector<uint8_t>>& seeds, std::mt19937_64& rng) {
  const int rounds = 1 + int(rng() % 4);
  for (int r = 0; r < rounds; ++r) {
    const bool jpeg = b.size() >= 3 && b[0] == 0xFF && b[1] == 0xD8;
    const bool png = b.size() >= 8 && b[1] == 'P' && b[2] == 'N' && b[3] == 'G';
    switch (rng() % 6) {
      case 0: {  // byte flips
        const int flips = 1 + int(rng() % 16);
        for (int k = 0; k < flips && !b.empty(); ++k) b[rng() % b.size()] ^= uint8_t(1u << (rng() % 8));
        break;
      }
      case 1:  // random bytes
        for (int k = 0, n = 1 + int(rng() % 8); k < n && !b.empty(); ++k) b[rng() % b.size()] = uint8_t(rng());
        break;
      case 2:  // truncation
        if (!b.empty()) b.resize(rng() % b.size());
        break;
      case 3: {  // inserted garbage or a splice from another seed
        const size_t pos = b.empty() ? 0 : rng() % (b.size() + 1);
        std::vector<uint8_t> ins;
        if (rng() % 2) {
          ins.resize(1 + rng() % 512);
          for (auto& v : ins) v = uint8_t(rng());
        } else {
          const auto& other = seeds[rng() % seeds.size()];
          if (!other.empty()) {
            const size_t from = rng() % other.size();
            const size_t len = std::min<size_t>(other.size() - from, 1 + rng() % 4096);
            ins.assign(other.begin() + from, other.begin() + from + len);
          }
        }
        b.insert(b.begin() + pos, ins.begin(), ins.end());
        break;
      }
      default:  // header edits (twice as likely: that is where the parsers branch)
        if (jpeg) edit_jpeg_header(b, rng);
        else if (png) edit_png_header(b, rng);
        else if (!b.empty()) b[rng() % b.size()] = uint8_t(rng());
        break;
    }
  }
}

bool read_file(const char* path, std::vector<uint8_t>* out) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return false;
  out->assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  uint64_t seed = 1;
  double seconds = 60;
  int threads = 2;
  std::vector<std::vector<uint8_t>> seeds;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--seed" && i + 1 < argc) seed = std::strtoull(argv[++i], nullptr, 10);
    else if (arg == "--seconds" && i + 1 < argc) seconds = std::atof(argv[++i]);
    else if (arg == "--threads" && i + 1 < argc) threads = std::atoi(argv[++i]);
    else if (arg == "--crash-dir" && i + 1 < argc) g_crash_dir = argv[++i];
    else {
      std::vector<uint8_t> data;
      if (!read_file(argv[i], &data)) {
        std::fprintf(stderr, "fuzz_driver: cannot read seed %s\n", argv[i]);
        return 2;
      }
      if (!data.empty()) seeds.push_back(std::move(data));
    }
  }
  if (seeds.empty() || threads < 1 || threads > kMaxThreads || !(seconds > 0)) {
    std::fprintf(stderr, "usage: fuzz_driver --seed N --seconds S [--threads 1..%d] [--crash-dir DIR] FILE...\n",
                 kMaxThreads);
    return 2;
  }
  __sanitizer_set_death_callback(on_death);
  sfmkern::Limits limits;
  limits.max_pixels = uint64_t(1) << 22;        // keeps one execution fast; the limit check itself is exercised
  limits.max_scratch_bytes = uint64_t(8) << 20;  // exercises the trim path
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
  std::vector<std::thread> workers;
  for (int t = 0; t < threads; ++t) {
    workers.emplace_back([&, t] {
      std::mt19937_64 rng(seed * 1000003u + uint64_t(t));
      sfmkern::Scratch scratch;
      static const int kSizes[][2] = {{256, 224}, {64, 64}, {33, 17}, {1, 1}, {300, 299}};
      std::vector<uint8_t> out(size_t(299) * 299 * 3);
      while (std::chrono::steady_clock::now() < deadline) {
        std::vector<uint8_t>& input = g_current[t];
        input = seeds[rng() % seeds.size()];
        mutate(input, seeds, rng);
        sfmkern::ItemSource src;
        src.data = input.empty() ? nullptr : input.data();
        src.size = input.size();
        const auto& size = kSizes[rng() % 5];
        sfmkern::process_item(src, scratch, limits, size[0], size[1], out.data());
        sfmkern::Decoded img;
        sfmkern::decode_rgb(src.data, src.size, scratch, limits, 0, &img);
        g_executions.fetch_add(1, std::memory_order_relaxed);
      }
    });
  }
  for (auto& w : workers) w.join();
  std::printf("executions: %llu\n", static_cast<unsigned long long>(g_executions.load()));
  return 0;
}
