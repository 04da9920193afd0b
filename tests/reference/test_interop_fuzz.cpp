// Fuzzing the interop readers (issue 16): mutated torch.save zips, raw data.pkl pickles and
// Hugging Face safetensors files must give loom::Error or load; never crash, hang, allocate
// unboundedly, throw another exception type or run anything. Seeds come from
// interop_fixtures.py (python3-torch); mutations are byte flips, interesting values, truncation,
// insertion and chunk duplication, biased towards headers (the zip directory lives at the end of
// the file, the safetensors JSON at the start). Runs LOOM_FUZZ_SECONDS (default 120) seconds,
// split over the three targets; the random stream is fixed (LOOM_FUZZ_SEED, default 1) so a
// failure reproduces, and the failing input is saved next to the fixtures and named.
#include <gtest/gtest.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>

#include "interop/convert.h"
#include "checkpoint/torch_file.h"
#include "core/error.h"

namespace fs = std::filesystem;
using namespace loom;
using namespace loom::checkpoint;
using namespace loom::interop;

namespace {

std::string slurp(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}
void spit(const fs::path& p, const std::string& s) {
  std::ofstream(p, std::ios::binary | std::ios::trunc).write(s.data(), std::streamsize(s.size()));
}

std::string mutate(std::string s, std::mt19937_64& rng, size_t hot_begin, size_t hot_end) {
  const int n_ops = 1 + int(rng() % 4);
  for (int k = 0; k < n_ops && !s.empty(); ++k) {
    // 80% of edits land in the "hot" region (headers), the rest anywhere.
    size_t lo = 0, hi = s.size();
    if (rng() % 5 != 0 && hot_end > hot_begin && hot_begin < s.size()) {
      lo = hot_begin;
      hi = std::min(hot_end, s.size());
    }
    const size_t pos = lo + rng() % std::max<size_t>(1, hi - lo);
    static const uint8_t interesting[] = {0x00, 0x01, 0x7f, 0x80, 0xff, 0xfe, '.', 'R', 'c', '(',
                                          ')', 'X', 'q', 'h', 'j', 0x8a, 0x93, 'b', 'Q'};
    switch (rng() % 6) {
      case 0: s[pos] = char(s[pos] ^ (1 << (rng() % 8))); break;
      case 1: s[pos] = char(interesting[rng() % sizeof(interesting)]); break;
      case 2: s[pos] = char(rng()); break;
      case 3: s.resize(pos); break;
      case 4: s.insert(pos, std::string(1 + rng() % 8, char(rng()))); break;
      case 5: {
        const size_t len = std::min<size_t>(1 + rng() % 64, s.size() - pos);
        s.insert(pos, s.substr(pos, len));
        break;
      }
    }
  }
  return s;
}

}  // namespace

TEST(InteropFuzz, ReadersNeverCrashOnMutatedInputs) {
  if (std::system("/usr/bin/python3 -c 'import torch' >/dev/null 2>&1") != 0)
    GTEST_SKIP() << "SKIP: /usr/bin/python3 cannot import torch (the seeds are torch.save files)";
  const fs::path dir = fs::temp_directory_path() / ("loom_fuzz_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  const std::string script = std::string(LOOM_SOURCE_DIR) + "/tests/reference/interop_fixtures.py";
  ASSERT_EQ(std::system(("/usr/bin/python3 " + script + " hostile " + (dir / "bad").string()).c_str()), 0);
  ASSERT_EQ(std::system(("/usr/bin/python3 " + script + " hf " + (dir / "hf").string() +
                         " 2>/dev/null").c_str()), 0);
  const std::string seed_pt = slurp(dir / "bad" / "seed.pt");
  const std::string seed_pkl = slurp(dir / "bad" / "seed_data.pkl");
  const std::string seed_st = slurp(dir / "hf" / "hf_st" / "model.safetensors");
  const std::string config_json = slurp(dir / "hf" / "hf_st" / "config.json");
  ASSERT_FALSE(seed_pt.empty() || seed_pkl.empty() || seed_st.empty());
  const size_t st_header = 8 + size_t(uint8_t(seed_st[0]) | uint8_t(seed_st[1]) << 8);

  const char* env_s = std::getenv("LOOM_FUZZ_SECONDS");
  const char* env_seed = std::getenv("LOOM_FUZZ_SEED");
  const double seconds = env_s ? std::atof(env_s) : 120.0;  // the issue asks for 2 minutes in a test
  std::mt19937_64 rng(env_seed ? std::strtoull(env_seed, nullptr, 10) : 1);
  const auto start = std::chrono::steady_clock::now();
  auto elapsed = [&] {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  };
  int64_t runs[3] = {0, 0, 0}, accepted[3] = {0, 0, 0};
  const fs::path input = dir / "input";
  fs::create_directories(dir / "hfdir");
  spit(dir / "hfdir" / "config.json", config_json);
  for (int64_t it = 0; elapsed() < seconds; ++it) {
    const int target = int(it % 3);
    std::string data;
    try {
      if (target == 0) {  // torch zip: the directory is in the last ~1 KiB, data.pkl near the start
        data = mutate(seed_pt, rng, rng() % 2 ? 0 : seed_pt.size() - std::min<size_t>(seed_pt.size(), 1500),
                      rng() % 2 ? 1200 : seed_pt.size());
        spit(input, data);
        TorchFile f(input.string());
        std::map<std::string, TorchTensorRef> tensors;
        std::vector<std::string> skipped;
        flatten_state_dict(f.root(), "", tensors, skipped);
        for (auto& [name, t] : tensors) {
          if (t.numel() > (int64_t(1) << 20)) continue;  // callers allocate from the config
          std::vector<float> buf(size_t(t.numel()));
          f.read_f32(t, buf.data());
        }
      } else if (target == 1) {
        data = mutate(seed_pkl, rng, 0, seed_pkl.size());
        unpickle_restricted(data, "fuzz.pkl");
      } else {
        data = mutate(seed_st, rng, 0, st_header);
        spit(dir / "hfdir" / "model.safetensors", data);
        fs::remove_all(dir / "out");
        convert_hf_gpt2((dir / "hfdir").string(), (dir / "out").string(), {});
      }
      ++accepted[target];
    } catch (const loom::Error&) {
      // expected: a clear error
    } catch (const std::exception& e) {
      const fs::path keep = dir.parent_path() / ("loom_fuzz_failure_" + std::to_string(::getpid()));
      spit(keep, data);
      FAIL() << "target " << target << " threw a non-loom exception (" << e.what()
             << "); input saved to " << keep;
    }
    ++runs[target];
  }
  std::printf("fuzz %.0f s: torch zip %lld runs (%lld loaded), pickle %lld (%lld), safetensors "
              "%lld (%lld)\n", elapsed(), (long long)runs[0], (long long)accepted[0],
              (long long)runs[1], (long long)accepted[1], (long long)runs[2],
              (long long)accepted[2]);
  EXPECT_FALSE(fs::exists(dir / "bad" / "PWNED"));
  for (int t = 0; t < 3; ++t) EXPECT_GT(runs[t], 0);
  fs::remove_all(dir);
}
