// data/text_util.cpp: see text_util.h.
#include "data/text_util.h"

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>

#if defined(__SSE4_2__)
#include <nmmintrin.h>
#endif

#include "core/error.h"

namespace loom::data {

bool is_valid_utf8(std::string_view s) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const size_t n = s.size();
  size_t i = 0;
  while (i < n) {
    // ASCII fast path: 8 bytes at a time.
    if (i + 8 <= n) {
      uint64_t w;
      std::memcpy(&w, p + i, 8);
      if ((w & 0x8080808080808080ull) == 0) {
        i += 8;
        continue;
      }
    }
    const unsigned char c = p[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    int len;
    uint32_t cp;
    if ((c & 0xE0) == 0xC0) {
      len = 2;
      cp = c & 0x1F;
    } else if ((c & 0xF0) == 0xE0) {
      len = 3;
      cp = c & 0x0F;
    } else if ((c & 0xF8) == 0xF0) {
      len = 4;
      cp = c & 0x07;
    } else {
      return false;
    }
    if (i + len > n) return false;
    for (int k = 1; k < len; ++k) {
      if ((p[i + k] & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (p[i + k] & 0x3F);
    }
    static constexpr uint32_t kMinForLen[5] = {0, 0, 0x80, 0x800, 0x10000};
    if (cp < kMinForLen[len] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return false;
    i += len;
  }
  return true;
}

std::string read_file(const std::string& path) {
  FILE* f = std::fopen(path.c_str(), "rb");
  LOOM_CHECK(f != nullptr, "cannot open '{}': {}", path, std::strerror(errno));
  std::string out;
  char buf[1 << 16];
  size_t got;
  while ((got = std::fread(buf, 1, sizeof(buf), f)) > 0) out.append(buf, got);
  const bool failed = std::ferror(f) != 0;
  const int err = errno;
  std::fclose(f);
  LOOM_CHECK(!failed, "cannot read '{}': {}", path, std::strerror(err));
  return out;
}

void write_file_atomic(const std::string& path, std::string_view bytes) {
  const std::string tmp = path + ".tmp";
  FILE* f = std::fopen(tmp.c_str(), "wb");
  LOOM_CHECK(f != nullptr, "cannot create '{}': {}", tmp, std::strerror(errno));
  const size_t put = std::fwrite(bytes.data(), 1, bytes.size(), f);
  const bool ok = put == bytes.size() && std::fflush(f) == 0;
  const int err = errno;
  std::fclose(f);
  LOOM_CHECK(ok, "cannot write {} bytes to '{}': {}", bytes.size(), tmp, std::strerror(err));
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  LOOM_CHECK(!ec, "cannot rename '{}' to '{}': {}", tmp, path, ec.message());
}

namespace {
// Reflected CRC-32C polynomial.
constexpr uint32_t kCastagnoli = 0x82F63B78u;

[[maybe_unused]] uint32_t crc32c_bytewise(uint32_t crc, const unsigned char* p, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    crc ^= p[i];
    for (int k = 0; k < 8; ++k) crc = (crc >> 1) ^ (kCastagnoli & (0u - (crc & 1u)));
  }
  return crc;
}
}  // namespace

uint32_t crc32c(uint32_t crc, const void* data, size_t n) {
  const auto* p = static_cast<const unsigned char*>(data);
  crc = ~crc;
#if defined(__SSE4_2__)
  uint64_t c64 = crc;
  while (n >= 8) {
    uint64_t w;
    std::memcpy(&w, p, 8);
    c64 = _mm_crc32_u64(c64, w);
    p += 8;
    n -= 8;
  }
  crc = static_cast<uint32_t>(c64);
  while (n > 0) {
    crc = _mm_crc32_u8(crc, *p++);
    --n;
  }
#else
  crc = crc32c_bytewise(crc, p, n);
#endif
  return ~crc;
}

uint64_t content_hash(std::string_view s) {
  // 8-byte words chained through the splitmix64 finaliser, which spreads every input bit over
  // the whole state. The length is mixed in, so "a" and "a\0" differ.
  auto mix = [](uint64_t x) {
    x ^= x >> 30;
    x *= 0xBF58476D1CE4E5B9ull;
    x ^= x >> 27;
    x *= 0x94D049BB133111EBull;
    x ^= x >> 31;
    return x;
  };
  uint64_t h = mix(s.size() + 0x9E3779B97F4A7C15ull);
  size_t i = 0;
  for (; i + 8 <= s.size(); i += 8) {
    uint64_t w;
    std::memcpy(&w, s.data() + i, 8);
    h = mix(h ^ w) + 0x9E3779B97F4A7C15ull;
  }
  uint64_t tail = 0;
  std::memcpy(&tail, s.data() + i, s.size() - i);
  return mix(h ^ tail ^ (uint64_t(s.size() - i) << 56));
}

}  // namespace loom::data
