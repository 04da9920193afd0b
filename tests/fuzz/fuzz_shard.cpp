// libFuzzer target: the token shard reader (data/shard.h). Header checksums would stop almost
// every mutation at the first check, so the target recomputes both CRCs over the input before
// writing it (like an attacker who writes a consistent file); the input's first byte chooses
// whether to do so, keeping the checksum checks themselves covered.
#include <cstdint>
#include <cstring>
#include <string>

#include "core/error.h"
#include "data/shard.h"
#include "data/text_util.h"
#include "fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const bool fix_crcs = data[0] & 1;
  std::string bytes(reinterpret_cast<const char*>(data) + 1, size - 1);
  if (fix_crcs && bytes.size() >= 64) {
    const uint32_t payload = loom::data::crc32c(0, bytes.data() + 64, bytes.size() - 64);
    std::memcpy(bytes.data() + 40, &payload, 4);
    const uint32_t header = loom::data::crc32c(0, bytes.data(), 60);
    std::memcpy(bytes.data() + 60, &header, 4);
  }
  const std::string path = loom::fuzz::scratch_file(
      "shard.bin", reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size());
  try {
    loom::data::ShardReader r(path);
    int64_t sum = 0;
    for (int64_t i = 0; i < r.token_count(); ++i) sum += r.token(i);
    if (r.token_count() > 0) {
      (void)r.document_of(r.token_count() - 1);
      int32_t t = 0;
      r.copy_tokens(r.token_count() - 1, 1, &t);
    }
    if (sum < 0) std::abort();  // tokens are checked to be in [0, vocab)
  } catch (const loom::Error&) {
  }
  return 0;
}
