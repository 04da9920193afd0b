// data/text_util.h: small byte-level helpers shared by the data layer: UTF-8 validation, whole
// file I/O with atomic replace, CRC-32C and a content hash.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace loom::data {

// Strict UTF-8 (RFC 3629): rejects overlongs, surrogates, code points above U+10FFFF and
// truncated sequences.
bool is_valid_utf8(std::string_view s);
// Reads a whole file. Throws loom::Error naming the path and errno text on failure.
std::string read_file(const std::string& path);
// Writes `bytes` to path.tmp, then renames it over `path`, so readers never see half a file.
void write_file_atomic(const std::string& path, std::string_view bytes);
// CRC-32C (Castagnoli), continuing from `crc` (start with 0). Detects every 1-3 bit error and
// every burst up to 32 bits; hardware-accelerated with SSE4.2.
uint32_t crc32c(uint32_t crc, const void* data, size_t n);
// A 64-bit content hash for exact-duplicate detection (not cryptographic).
uint64_t content_hash(std::string_view s);

}  // namespace loom::data
