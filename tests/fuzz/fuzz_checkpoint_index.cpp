// libFuzzer target: the sharded checkpoint's index reader (checkpoint::ShardedReader on
// index.json). A small valid checkpoint (two kinds, a tensor in two row pieces and a whole one)
// is written once per process; each input replaces its index.json, checksums.json is rewritten
// with the input's size and hash (so the reader gets past the integrity check and parses the
// fuzzed index), and every tensor the index lists is read back whole when it is small. The shard
// files stay valid, so offsets, piece ranges, shard dims and shapes in the index are what is
// exercised.
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "checkpoint/commit.h"
#include "checkpoint/sharded.h"
#include "core/error.h"
#include "fuzz_util.h"

namespace {

std::string make_checkpoint() {
  namespace ck = loom::checkpoint;
  const std::string root = loom::fuzz::scratch_file("unused", nullptr, 0) + "-ckpt";
  std::filesystem::remove_all(root);
  std::filesystem::create_directories(root);
  static const std::string to_remove = root;  // the checkpoint goes when the fuzzer exits
  std::atexit([] {
    std::error_code ec;
    std::filesystem::remove_all(to_remove, ec);
    std::filesystem::remove(loom::fuzz::scratch_file("unused", nullptr, 0), ec);
  });
  static std::vector<float> a(12), b(5);  // (4, 3) and (5)
  for (size_t i = 0; i < a.size(); ++i) a[i] = float(i);
  for (size_t i = 0; i < b.size(); ++i) b[i] = -float(i);
  // Stored dtypes: h (2, 3) BF16 in two row pieces, e (5) F16, q (2, 3) I8 with its row scales.
  static std::vector<uint16_t> h = {0x3f80, 0x4000, 0xbf80, 0x0000, 0x4040, 0x3f00},
                               e = {0x3c00, 0x4000, 0xbc00, 0x0000, 0x3800};
  static std::vector<int8_t> q = {127, -3, 0, 5, -127, 64};
  static std::vector<float> qs = {0.5f, 0.25f};
  ck::ShardedWriter w(root, nullptr, ck::WriterOptions{0, 1});
  ck::PieceSpec top = ck::whole_tensor("a", {4, 3});
  top.shard_dim = 0, top.shard_start = 0, top.shard_len = 2, top.hi = 6;
  ck::PieceSpec bottom = top;
  bottom.shard_start = 2;
  w.add("weights", top, a.data());
  w.add("weights", bottom, a.data() + 6);
  w.add("weights", ck::whole_tensor("b", {5}), b.data());
  w.add("m", ck::whole_tensor("b", {5}), b.data());
  ck::PieceSpec h0 = ck::whole_tensor("h", {2, 3});
  h0.shard_dim = 0, h0.shard_start = 0, h0.shard_len = 1, h0.hi = 3;
  ck::PieceSpec h1 = h0;
  h1.shard_start = 1;
  w.add("weights", h0, h.data(), loom::DType::bf16);
  w.add("weights", h1, h.data() + 3, loom::DType::bf16);
  w.add("weights", ck::whole_tensor("e", {5}), e.data(), loom::DType::f16);
  w.add("weights", ck::whole_tensor("q", {2, 3}), q.data(), loom::DType::i8);
  w.add("weights", ck::whole_tensor(std::string("q") + ck::kRowScalesSuffix, {2}), qs.data());
  const std::string dir = w.commit("", nlohmann::json{{"step", 1}}).dir;
  // LOOM_FUZZ_SEED_OUT=FILE: keep the valid index as a seed (how corpus/checkpoint_index/ began).
  if (const char* out = std::getenv("LOOM_FUZZ_SEED_OUT"))
    std::filesystem::copy_file(dir + "/index.json", out,
                               std::filesystem::copy_options::overwrite_existing);
  return dir;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const std::string dir = make_checkpoint();
  namespace ck = loom::checkpoint;
  {
    std::ofstream f(dir + "/index.json", std::ios::out | std::ios::binary | std::ios::trunc);
    f.write(reinterpret_cast<const char*>(data), std::streamsize(size));
  }
  {
    nlohmann::json sums = nlohmann::json::parse(std::ifstream(dir + "/checksums.json"));
    sums["index.json"] = {{"sha256", ck::sha256_hex(data, size)}, {"bytes", size}};
    std::ofstream(dir + "/checksums.json", std::ios::out | std::ios::trunc) << sums.dump();
  }
  try {
    ck::ShardedReader r(dir);
    for (const char* kind : {"weights", "m", "v"}) {
      if (!r.has(kind)) continue;
      for (const std::string& name : r.names(kind)) {
        const std::vector<int64_t>& shape = r.shape(kind, name);
        ck::PieceSpec want = ck::whole_tensor(name, shape);
        const int64_t n = ck::slice_numel(want);
        if (n < 0 || n > (int64_t(1) << 20)) continue;
        std::vector<float> dst(size_t(n) + 1);
        r.read(kind, want, dst.data());
        if (r.dtype(kind, name) == loom::DType::i8 && shape.size() == 2 && shape[0] >= 0 &&
            shape[0] <= n) {
          std::vector<int8_t> qd(size_t(n) + 1);
          std::vector<float> sd(size_t(shape[0]) + 1);
          r.read_int8_rows(kind, want, qd.data(), sd.data());
        }
      }
    }
  } catch (const loom::Error&) {
  }
  return 0;
}
