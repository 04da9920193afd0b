// libFuzzer target: tokenizer loaders (data/tokenizer.h). The first byte picks the loader:
// even: a SentencePiece .model file (load_tokenizer on a path); odd: a GPT-2 byte-level BPE
// directory whose vocab.json, merges.txt and added_tokens.json are the rest of the input split
// at "\n====\n". A loaded tokenizer then encodes and decodes a short text.
#include <sys/stat.h>
#include <unistd.h>

#include <cstdint>
#include <fstream>
#include <string>

#include "core/error.h"
#include "data/tokenizer.h"
#include "fuzz_util.h"

namespace {
void write(const std::string& path, const std::string& text) {
  std::ofstream(path, std::ios::binary | std::ios::trunc) << text;
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const std::string rest(reinterpret_cast<const char*>(data) + 1, size - 1);
  std::string path;
  if ((data[0] & 1) == 0) {
    path = loom::fuzz::scratch_file("tok.model", data + 1, size - 1);
  } else {
    static const std::string dir = [] {
      std::string d = (access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp") +
                      std::string("/loom-fuzz-bpe-") + std::to_string(getpid());
      mkdir(d.c_str(), 0700);
      return d;
    }();
    std::string parts[3];
    size_t at = 0;
    for (int k = 0; k < 3; ++k) {
      const size_t sep = k < 2 ? rest.find("\n====\n", at) : std::string::npos;
      parts[k] = rest.substr(at, sep == std::string::npos ? std::string::npos : sep - at);
      if (sep == std::string::npos) {
        at = rest.size();
      } else {
        at = sep + 6;
      }
    }
    write(dir + "/vocab.json", parts[0]);
    write(dir + "/merges.txt", parts[1]);
    write(dir + "/added_tokens.json", parts[2].empty() ? "{}" : parts[2]);
    path = dir;
  }
  try {
    auto tok = loom::data::load_tokenizer(path);
    const auto ids = tok->encode("def f(x):\n\treturn x + 1  # \xc3\xa9\n");
    (void)tok->decode(ids);
  } catch (const loom::Error&) {
  }
  return 0;
}
