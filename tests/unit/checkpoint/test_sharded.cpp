// tests/unit/checkpoint/test_sharded.cpp: sharded checkpoints in one process: any layout reads
// any other bit-exactly, coverage is validated, damaged files are named, keep = N, the
// pre-sharding format loads.
#include <gtest/gtest.h>

#include <cmath>
#include <deque>
#include <map>
#include <fstream>
#include <random>

#include "checkpoint/commit.h"
#include "checkpoint/safetensors.h"
#include "checkpoint/sharded.h"
#include "core/error.h"
#include "unit/checkpoint/ck_helpers.h"

namespace loom::checkpoint::test {
namespace {

const char* kKinds[] = {"weights", "m", "v"};

// Saves `version`'s logical values cut as `layout` (all pieces from this one process).
CommitResult save_version(const fs::path& dir, const std::string& layout, int version,
                          int64_t step, WriterOptions opt = {}) {
  std::deque<std::vector<float>> bufs;  // the pieces' memory, alive until commit returns
  ShardedWriter w(dir.string(), nullptr, opt);
  for (const char* kind : kKinds)
    for (const TestTensor& t : test_tensors()) {
      std::vector<float> g = logical_values(version, kind, t);
      for (const PieceSpec& p : layout_pieces(layout, t)) {
        bufs.push_back(reference_slice(p, g));
        w.add(kind, p, bufs.back().data());
      }
    }
  return w.commit("model = \"test\"\n", {{"step", step}, {"version", version}});
}

// Every piece of `layout` read back equals the reference bit for bit.
void expect_reads_as(const ShardedReader& r, int version, const std::string& layout) {
  for (const char* kind : kKinds)
    for (const TestTensor& t : test_tensors()) {
      std::vector<float> g = logical_values(version, kind, t);
      for (const PieceSpec& p : layout_pieces(layout, t)) {
        std::vector<float> got(size_t(p.hi - p.lo), -1.0f);
        r.read(kind, p, got.data());
        ASSERT_TRUE(same_bits(got, reference_slice(p, g)))
            << kind << " " << t.name << " layout " << layout << " slice dim " << p.shard_dim
            << " [" << p.shard_start << "+" << p.shard_len << "] elements [" << p.lo << ", "
            << p.hi << ")";
      }
    }
}

int version_of(const ShardedReader& r) { return r.trainer_state()["version"].get<int>(); }

template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

#define EXPECT_ERROR_HAS(stmt, needle)                                                   \
  do {                                                                                   \
    std::string msg_ = error_of([&] { stmt; });                                          \
    EXPECT_NE(msg_.find(needle), std::string::npos) << "expected '" << needle << "' in: " \
                                                    << msg_;                             \
  } while (0)

const std::vector<std::string> kLayouts = {"whole",    "rows:2:1", "rows:2:2", "cols:2:1",
                                           "cols:2:3", "rows:3:2", "flat:5",   "cols:4:2"};

TEST(Sharded, EveryLayoutReadsEveryOtherBitExactly) {
  fs::path root = temp_dir("layouts");
  int version = 0;
  for (const std::string& wl : kLayouts) {
    ++version;
    fs::path dir = root / ("w_" + std::to_string(version));
    CommitResult res = save_version(dir, wl, version, 10);
    EXPECT_EQ(res.dir, (dir / "step-00000010").string());
    ShardedReader r(dir.string());
    EXPECT_EQ(r.dir(), res.dir);
    EXPECT_FALSE(r.legacy_format());
    EXPECT_EQ(version_of(r), version);
    EXPECT_EQ(r.config_toml(), "model = \"test\"\n");
    EXPECT_EQ(r.shape("weights", "cube"), (std::vector<int64_t>{4, 3, 5}));
    EXPECT_EQ(r.names("m").size(), test_tensors().size());
    for (const std::string& rl : kLayouts) expect_reads_as(r, version, rl);
  }
  fs::remove_all(root);
}

TEST(Sharded, ArbitrarySlicesAndElementRanges) {
  fs::path dir = temp_dir("ranges");
  save_version(dir, "cols:2:3", 7, 3);
  ShardedReader r(dir.string());
  std::mt19937_64 rng(42);
  for (int trial = 0; trial < 400; ++trial) {
    const TestTensor t = test_tensors()[size_t(trial) % test_tensors().size()];
    PieceSpec p;
    p.name = t.name;
    p.global_shape = t.shape;
    p.shard_dim = int(rng() % (t.shape.size() == 2 ? 3 : 2)) - 1;
    if (p.shard_dim >= 0) {
      const int64_t extent = t.shape[size_t(p.shard_dim)];
      p.shard_start = int64_t(rng() % uint64_t(extent));
      p.shard_len = 1 + int64_t(rng() % uint64_t(extent - p.shard_start));
    }
    const int64_t n = slice_numel(p);
    p.lo = int64_t(rng() % uint64_t(n + 1));
    p.hi = p.lo + int64_t(rng() % uint64_t(n - p.lo + 1));
    for (const char* kind : kKinds) {
      std::vector<float> got(size_t(p.hi - p.lo), -1.0f);
      r.read(kind, p, got.data());
      ASSERT_TRUE(same_bits(got, reference_slice(p, logical_values(7, kind, t))))
          << kind << " " << t.name << " dim " << p.shard_dim << " [" << p.shard_start << "+"
          << p.shard_len << "] [" << p.lo << ", " << p.hi << ")";
    }
  }
  fs::remove_all(dir);
}

TEST(Sharded, CoverageGapAndOverlapAreNamedAndNothingIsCommitted) {
  fs::path dir = temp_dir("coverage");
  save_version(dir, "whole", 1, 1);
  auto try_save = [&](int drop, int dup) {
    std::deque<std::vector<float>> bufs;
    ShardedWriter w(dir.string(), nullptr);
    int i = 0;
    for (const TestTensor& t : test_tensors()) {
      std::vector<float> g = logical_values(2, "weights", t);
      for (const PieceSpec& p : layout_pieces("rows:2:2", t)) {
        bufs.push_back(reference_slice(p, g));
        if (t.name == "h.0.attn.w" && i++ == drop) continue;
        w.add("weights", p, bufs.back().data());
        if (t.name == "h.0.attn.w" && i - 1 == dup) w.add("weights", p, bufs.back().data());
      }
    }
    w.commit("", {{"step", 2}, {"version", 2}});
  };
  EXPECT_ERROR_HAS(try_save(1, -1), "weights tensor 'h.0.attn.w' (shape [6, 10]): elements "
                                    "[15, 30) of the flattened tensor are saved by no piece");
  EXPECT_ERROR_HAS(try_save(-1, 2), "weights tensor 'h.0.attn.w' (shape [6, 10]): elements "
                                    "[30, 45) of the flattened tensor are saved twice");
  // A piece outside its tensor is refused when added.
  ShardedWriter w(dir.string(), nullptr);
  PieceSpec bad = whole_tensor("x", {4, 4});
  bad.shard_dim = 1;
  bad.shard_start = 2;
  bad.shard_len = 3;
  bad.hi = 12;
  float f[12] = {};
  EXPECT_ERROR_HAS(w.add("weights", bad, f), "columns [2, 5) are not a column slice");
  // The failed saves left the first checkpoint and no temporary.
  ShardedReader r(dir.string());
  EXPECT_EQ(version_of(r), 1);
  for (auto& e : fs::directory_iterator(dir))
    EXPECT_TRUE(e.path().filename() == "latest" || e.path().filename() == "step-00000001")
        << e.path();
  fs::remove_all(dir);
}

TEST(Sharded, ReaderNamesTheMissingRange) {
  fs::path dir = temp_dir("partial");
  // A checkpoint of weights only; asking for m names the kind.
  {
    std::vector<float> g = logical_values(1, "weights", test_tensors()[0]);
    ShardedWriter w(dir.string(), nullptr);
    w.add("weights", whole_tensor("wte", {13, 6}), g.data());
    w.commit("", {{"step", 1}});
  }
  ShardedReader r(dir.string());
  std::vector<float> buf(100);
  EXPECT_ERROR_HAS(r.read("m", whole_tensor("wte", {13, 6}), buf.data()), "has no m tensors");
  EXPECT_ERROR_HAS(r.read("weights", whole_tensor("wte", {13, 7}), buf.data()),
                   "has shape [13, 6] but [13, 7] was asked for");
  EXPECT_ERROR_HAS(r.read("weights", whole_tensor("nope", {2}), buf.data()),
                   "no weights tensor named 'nope'");
  fs::remove_all(dir);
}

TEST(Sharded, KeepNewestNAndSameStepTwice) {
  fs::path dir = temp_dir("keep");
  for (int v = 1; v <= 5; ++v) save_version(dir, "rows:2:2", v, v * 10, {.keep = 2});
  std::vector<std::string> names;
  for (auto& e : fs::directory_iterator(dir)) names.push_back(e.path().filename().string());
  std::sort(names.begin(), names.end());
  EXPECT_EQ(names, (std::vector<std::string>{"latest", "step-00000040", "step-00000050"}));
  EXPECT_EQ(read_latest(dir.string()),
            (std::vector<std::string>{"step-00000040", "step-00000050"}));
  // A second save of step 50 gets its own name and becomes the newest.
  CommitResult res = save_version(dir, "cols:2:1", 6, 50, {.keep = 2});
  EXPECT_EQ(res.dir, (dir / "step-00000050.1").string());
  ShardedReader r(dir.string());
  EXPECT_EQ(version_of(r), 6);
  expect_reads_as(r, 6, "flat:3");
  // keep = 0 keeps everything.
  save_version(dir, "whole", 7, 60);
  EXPECT_EQ(read_latest(dir.string()).size(), 3u);
  fs::remove_all(dir);
}

TEST(Sharded, FindsTheCheckpointFromRunDirRootOrCheckpointDir) {
  fs::path run = temp_dir("find");
  save_version(run / "ckpt", "whole", 1, 5);
  save_version(run / "ckpt", "whole", 2, 6);
  EXPECT_EQ(version_of(ShardedReader(run.string())), 2);
  EXPECT_EQ(version_of(ShardedReader((run / "ckpt").string())), 2);
  EXPECT_EQ(version_of(ShardedReader((run / "ckpt" / "step-00000005").string())), 1);
  // An uncommitted step directory (killed between its rename and the pointer's) is not loaded,
  // and the next save removes it along with a stale staging directory.
  fs::copy(run / "ckpt" / "step-00000006", run / "ckpt" / "step-00000007",
           fs::copy_options::recursive);
  fs::create_directories(run / "ckpt" / ".staging-step-00000008");
  EXPECT_EQ(ShardedReader(run.string()).dir(), (run / "ckpt" / "step-00000006").string());
  save_version(run / "ckpt", "whole", 3, 9);
  EXPECT_FALSE(fs::exists(run / "ckpt" / "step-00000007"));
  EXPECT_FALSE(fs::exists(run / "ckpt" / ".staging-step-00000008"));
  // Without `latest`, the newest complete step directory.
  fs::remove(run / "ckpt" / "latest");
  EXPECT_EQ(version_of(ShardedReader(run.string())), 3);
  EXPECT_ERROR_HAS(ShardedReader((run / "nothing").string()), "does not exist");
  fs::create_directories(run / "empty");
  EXPECT_ERROR_HAS(ShardedReader((run / "empty").string()), "has no checksums.json");
  fs::remove_all(run);
}

// Flips one byte of `path` at `offset`.
void flip_byte(const fs::path& path, uint64_t offset) {
  std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
  f.seekg(std::streamoff(offset));
  char c;
  f.get(c);
  f.seekp(std::streamoff(offset));
  f.put(char(c ^ 0x10));
}

// Rewrites dir/checksums.json so that `rel` matches its current bytes (to test the checks
// behind the checksum).
void reseal(const fs::path& dir, const std::string& rel) {
  auto sums = read_checksums(dir.string());
  sums[rel] = digest_file((dir / rel).string());
  ProtocolSteps steps;
  write_checksums(steps, dir.string(), sums);
}

TEST(Sharded, DamagedFilesAreNamed) {
  fs::path root = temp_dir("damage");
  auto fresh = [&] {
    fs::remove_all(root / "c");
    return fs::path(save_version(root / "c", "rows:2:2", 1, 1).dir);
  };
  const std::string shard = "shard-00000-of-00001.safetensors";
  std::vector<float> buf(200);
  const PieceSpec wte = whole_tensor("wte", {13, 6});

  fs::path d = fresh();
  flip_byte(d / shard, fs::file_size(d / shard) - 8);
  ShardedReader r1(d.string());  // opening checks sizes only; the read verifies the shard
  EXPECT_ERROR_HAS(r1.read("weights", wte, buf.data()),
                   shard + "' is corrupted: SHA-256");
  EXPECT_ERROR_HAS(r1.verify_all(), shard + "' is corrupted: SHA-256");

  d = fresh();
  fs::resize_file(d / shard, fs::file_size(d / shard) - 4);
  EXPECT_ERROR_HAS(ShardedReader(d.string()), shard + "' has");

  d = fresh();
  fs::remove(d / shard);
  EXPECT_ERROR_HAS(ShardedReader(d.string()), shard + "' is missing");

  d = fresh();
  flip_byte(d / "index.json", 40);
  EXPECT_ERROR_HAS(ShardedReader(d.string()), "index.json' is corrupted: SHA-256");

  d = fresh();
  flip_byte(d / "trainer_state.json", 3);
  EXPECT_ERROR_HAS(ShardedReader(d.string()), "trainer_state.json' is corrupted: SHA-256");

  // An index that disagrees with the shard (checksums made to match): a piece's offset moved.
  d = fresh();
  {
    std::ifstream f(d / "index.json");
    nlohmann::json j = nlohmann::json::parse(f);
    j["tensors"]["weights"]["wte"]["pieces"][1]["offset"] =
        j["tensors"]["weights"]["wte"]["pieces"][1]["offset"].get<uint64_t>() + 4;
    std::ofstream(d / "index.json") << j.dump(1);
  }
  reseal(d, "index.json");
  ShardedReader r2(d.string());
  EXPECT_ERROR_HAS(r2.read("weights", wte, buf.data()), shard + "' disagree about 'weights/wte#1'");
  // ... or names a tensor the shard does not have.
  d = fresh();
  {
    std::ifstream f(d / "index.json");
    nlohmann::json j = nlohmann::json::parse(f);
    j["tensors"]["weights"]["wte"]["pieces"][0]["tensor"] = "weights/wte#9";
    std::ofstream(d / "index.json") << j.dump(1);
  }
  reseal(d, "index.json");
  ShardedReader r3(d.string());
  EXPECT_ERROR_HAS(r3.read("weights", wte, buf.data()), shard + "' has no tensor named 'weights/wte#9'");
  // ... or leaves a gap.
  d = fresh();
  {
    std::ifstream f(d / "index.json");
    nlohmann::json j = nlohmann::json::parse(f);
    j["tensors"]["weights"]["wte"]["pieces"].erase(2);
    std::ofstream(d / "index.json") << j.dump(1);
  }
  reseal(d, "index.json");
  ShardedReader r4(d.string());
  EXPECT_ERROR_HAS(r4.read("weights", wte, buf.data()),
                   "index.json': weights tensor 'wte' (the whole tensor, elements [0, 78)): "
                   "elements [36, 57) are in no stored piece");
  // Rows that are stored still load.
  PieceSpec top = wte;
  top.shard_dim = 0;
  top.shard_start = 0;
  top.shard_len = 6;
  top.hi = 36;
  std::vector<float> got(36);
  r4.read("weights", top, got.data());
  EXPECT_TRUE(same_bits(got, reference_slice(top, logical_values(1, "weights", test_tensors()[0]))));
  // A missing checksums.json.
  d = fresh();
  fs::remove(d / "checksums.json");
  EXPECT_ERROR_HAS(ShardedReader(d.string()), "has no checksums.json");
  fs::remove_all(root);
}

// The pre-sharding format, written as today's save_checkpoint wrote it.
TEST(Sharded, OldFormatLoadsAtAnyLayout) {
  fs::path dir = temp_dir("old");
  std::vector<TensorToWrite> model, opt;
  std::deque<std::vector<float>> keep;
  for (const TestTensor& t : test_tensors()) {
    keep.push_back(logical_values(3, "weights", t));
    model.push_back({t.name, DType::f32, t.shape, keep.back().data()});
    for (const char* kind : {"m", "v"}) {
      keep.push_back(logical_values(3, kind, t));
      opt.push_back({std::string(kind) + "." + t.name, DType::f32, t.shape, keep.back().data()});
    }
  }
  write_safetensors((dir / "model.safetensors").string(), model, {{"format", "loom"}});
  write_safetensors((dir / "optimizer.safetensors").string(), opt,
                    {{"format", "loom-adamw"}, {"step", "17"}});
  std::ofstream(dir / "config.toml") << "vocab = 13\n";
  std::ofstream(dir / "trainer_state.json") << R"({"step": 17, "version": 3})";
  nlohmann::json sums;
  for (const char* f : {"model.safetensors", "optimizer.safetensors", "config.toml",
                        "trainer_state.json"}) {
    FileDigest d = digest_file((dir / f).string());
    sums[f] = {{"sha256", d.sha256}, {"bytes", d.bytes}};
  }
  std::ofstream(dir / "checksums.json") << sums.dump(2);
  ShardedReader r(dir.string());
  EXPECT_TRUE(r.legacy_format());
  EXPECT_EQ(r.legacy_optimizer_step(), 17);
  EXPECT_EQ(r.config_toml(), "vocab = 13\n");
  for (const std::string& rl : kLayouts) expect_reads_as(r, 3, rl);
  fs::remove_all(dir);
}

}  // namespace
}  // namespace loom::checkpoint::test

namespace loom::checkpoint::test {
namespace {

// Shards carry per-block checksums: a read verifies the blocks it touches and no others, so a
// rank loading a part of a big shard does not hash (or read) the rest.
TEST(Sharded, ReadsVerifyOnlyTheBlocksTheyTouch) {
  fs::path dir = temp_dir("blocks");
  const TestTensor big{"big", {1024, 1024}};  // 4 MiB: four 1 MiB blocks of the shard
  std::vector<float> g = logical_values(1, "weights", big);
  {
    ShardedWriter w(dir.string(), nullptr);
    for (const PieceSpec& p : layout_pieces("rows:2:1", big))
      w.add("weights", p, g.data() + p.shard_start * 1024);
    w.commit("", {{"step", 1}});
  }
  fs::path ckpt = dir / "step-00000001";
  const std::string shard = "shard-00000-of-00001.safetensors";
  std::fstream f(ckpt / shard, std::ios::in | std::ios::out | std::ios::binary);
  f.seekp(std::streamoff(fs::file_size(ckpt / shard) - 100));
  f.put('\x7f');
  f.close();
  ShardedReader r(dir.string());
  PieceSpec top = whole_tensor("big", big.shape);
  top.shard_dim = 0;
  top.shard_len = 100;
  top.hi = 100 * 1024;
  std::vector<float> got(size_t(top.hi));
  r.read("weights", top, got.data());  // the first block only: fine
  EXPECT_TRUE(same_bits(got, reference_slice(top, g)));
  PieceSpec bottom = top;
  bottom.shard_start = 1000;
  bottom.shard_len = 24;
  bottom.hi = 24 * 1024;
  EXPECT_ERROR_HAS(r.read("weights", bottom, got.data()),
                   shard + "' is corrupted: SHA-256");
  fs::remove_all(dir);
}

}  // namespace
}  // namespace loom::checkpoint::test

namespace loom::checkpoint::test {
namespace {

// Hostile input: random byte changes in the index, a block-sum file or a shard's header, with
// checksums.json made to match, must give loom::Error (or, where harmless, correct data) and
// never a crash or a foreign exception.
TEST(Sharded, MutatedFilesGiveErrorsNotCrashes) {
  fs::path root = temp_dir("mutate");
  fs::path clean = save_version(root / "c", "cols:2:3", 5, 1).dir;
  std::mt19937_64 rng(1234);
  int errors = 0, loads = 0;
  for (int trial = 0; trial < 150; ++trial) {
    fs::path d = root / "m";
    fs::remove_all(d);
    fs::copy(clean, d, fs::copy_options::recursive);
    const char* files[] = {"index.json", "shard-00000-of-00001.blocks.json",
                           "shard-00000-of-00001.safetensors"};
    const std::string rel = files[trial % 3];
    // The shard: only its header (data changes are caught by the checksums).
    uint64_t limit = fs::file_size(d / rel);
    if (trial % 3 == 2) limit = std::min<uint64_t>(limit, 400);
    {
      std::fstream f(d / rel, std::ios::in | std::ios::out | std::ios::binary);
      for (int k = 0; k < 1 + int(rng() % 3); ++k) {
        f.seekp(std::streamoff(rng() % limit));
        const char pool[] = "0123456789[]{}\",:-e.x ";
        f.put(pool[rng() % (sizeof(pool) - 1)]);
      }
    }
    // Re-seal so that the checks behind the checksums are what is tested.
    auto sums = read_checksums(d.string());
    sums[rel] = digest_file((d / rel).string());
    if (rel.find(".safetensors") != std::string::npos) {
      // Keep the block sums consistent with the changed shard too.
      ProtocolSteps steps;
      FileWriter w(steps, (d / "tmp").string(), size_t(1) << 20, uint64_t(1) << 20);
      std::ifstream in(d / rel, std::ios::binary);
      std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
      w.write(bytes.data(), bytes.size());
      FileDigest bd = w.finish();
      fs::remove(d / "tmp");
      nlohmann::json b = {{"file", rel}, {"bytes", bd.bytes}, {"block_bytes", bd.block_bytes},
                          {"sha256", bd.block_sha256}};
      std::ofstream(d / "shard-00000-of-00001.blocks.json") << b.dump() << "\n";
      sums["shard-00000-of-00001.blocks.json"] =
          digest_file((d / "shard-00000-of-00001.blocks.json").string());
    }
    ProtocolSteps steps;
    write_checksums(steps, d.string(), sums);
    try {
      ShardedReader r(d.string());
      for (const char* kind : kKinds)
        for (const TestTensor& t : test_tensors()) {
          PieceSpec p = whole_tensor(t.name, t.shape);
          std::vector<float> got(size_t(p.hi));
          r.read(kind, p, got.data());
          EXPECT_TRUE(same_bits(got, reference_slice(p, logical_values(5, kind, t))))
              << "trial " << trial << ": " << rel << " changed, loaded without error, wrong data";
        }
      ++loads;
    } catch (const Error&) {
      ++errors;
    } catch (const std::exception& e) {
      ADD_FAILURE() << "trial " << trial << " (" << rel << "): not a loom::Error: " << e.what();
    }
  }
  EXPECT_GT(errors, 50) << loads << " loads";
  fs::remove_all(root);
}

}  // namespace
}  // namespace loom::checkpoint::test

// ---- storage dtypes (sharded.h "Storage dtypes") ---------------------------------------------
namespace loom::checkpoint::test {
namespace {

// The logical values narrowed to `dt` and widened back: what a BF16 / F16 checkpoint reads as.
std::vector<float> narrowed(const std::vector<float>& v, DType dt) {
  std::vector<float> out(v.size());
  for (size_t i = 0; i < v.size(); ++i)
    out[i] = dt == DType::bf16 ? bf16_to_f32(f32_to_bf16(v[i])) : f16_to_f32(f32_to_f16(v[i]));
  return out;
}

// Per-row int8 of a (rows, cols) tensor: q and scales as kernels::quantize_rows_int8 defines
// them (written out here, so the reader is checked against an independent statement).
void int8_rows(const std::vector<float>& w, int64_t rows, int64_t cols, std::vector<int8_t>& q,
               std::vector<float>& s) {
  q.assign(w.size(), 0);
  s.assign(size_t(rows), 0.f);
  for (int64_t r = 0; r < rows; ++r) {
    float amax = 0.f;
    for (int64_t c = 0; c < cols; ++c) amax = std::max(amax, std::fabs(w[size_t(r * cols + c)]));
    s[size_t(r)] = amax / 127.f;
    for (int64_t c = 0; c < cols; ++c)
      q[size_t(r * cols + c)] =
          amax == 0.f ? 0 : int8_t(std::lrint(w[size_t(r * cols + c)] / s[size_t(r)]));
  }
}

// Weights stored as BF16, F16 and I8 (2-D tensors; row scales beside them) in every layout read
// back in every other layout: BF16 / F16 widened exactly, I8 dequantized (scale[row] * q) and,
// through read_int8_rows, as stored. m and v stay F32 beside them.
TEST(ShardedDtypes, EveryDtypeEveryLayoutReadsEveryOther) {
  fs::path root = temp_dir("dtypes");
  int n = 0;
  for (DType dt : {DType::bf16, DType::f16, DType::i8})
    for (const std::string& wl : {std::string("whole"), std::string("rows:2:2"),
                                  std::string("cols:2:3"), std::string("flat:5")}) {
      SCOPED_TRACE(std::string(dtype_name(dt)) + " written as " + wl);
      std::deque<std::vector<char>> bufs;
      std::map<std::string, std::vector<float>> expect;  // what each weight reads as (f32)
      ShardedWriter w((root / std::to_string(++n)).string(), nullptr);
      for (const TestTensor& t : test_tensors()) {
        const std::vector<float> g = logical_values(1, "weights", t);
        const bool i8 = dt == DType::i8 && t.shape.size() == 2;
        const DType stored = dt == DType::i8 ? (i8 ? DType::i8 : DType::f32) : dt;
        std::vector<int8_t> q;
        std::vector<float> s;
        std::vector<char> all(g.size() * dtype_size(stored));  // the whole tensor, stored
        if (i8) {
          int8_rows(g, t.shape[0], t.shape[1], q, s);
          std::memcpy(all.data(), q.data(), q.size());
          std::vector<float>& e = expect[t.name];
          for (size_t i = 0; i < g.size(); ++i)
            e.push_back(s[i / size_t(t.shape[1])] * float(q[i]));
          // The scales: one whole F32 tensor.
          bufs.emplace_back(s.size() * 4);
          std::memcpy(bufs.back().data(), s.data(), s.size() * 4);
          w.add("weights", whole_tensor(t.name + kRowScalesSuffix, {t.shape[0]}),
                bufs.back().data(), DType::f32);
        } else if (stored == DType::f32) {
          std::memcpy(all.data(), g.data(), all.size());
          expect[t.name] = g;
        } else {
          expect[t.name] = narrowed(g, stored);
          for (size_t i = 0; i < g.size(); ++i) {
            const uint16_t b = stored == DType::bf16 ? f32_to_bf16(g[i]).bits : f32_to_f16(g[i]);
            std::memcpy(all.data() + 2 * i, &b, 2);
          }
        }
        // Each piece: the stored elements of its slice, gathered by flat index.
        std::vector<float> index(g.size());
        for (size_t i = 0; i < g.size(); ++i) index[i] = float(i);
        for (const PieceSpec& p : layout_pieces(wl, t)) {
          const std::vector<float> at = reference_slice(p, index);
          const size_t es = dtype_size(stored);
          bufs.emplace_back(at.size() * es);
          for (size_t i = 0; i < at.size(); ++i)
            std::memcpy(bufs.back().data() + i * es, all.data() + size_t(at[i]) * es, es);
          w.add("weights", p, bufs.back().data(), stored);
          bufs.emplace_back(at.size() * 4);
          const std::vector<float> mv = reference_slice(p, logical_values(1, "m", t));
          std::memcpy(bufs.back().data(), mv.data(), mv.size() * 4);
          w.add("m", p, bufs.back().data(), DType::f32);
        }
      }
      const std::string dir = w.commit("", {{"step", 1}}).dir;
      ShardedReader r(dir);
      EXPECT_EQ(r.names("weights").size(), test_tensors().size()) << "scales are not listed";
      for (const TestTensor& t : test_tensors()) {
        const bool i8 = dt == DType::i8 && t.shape.size() == 2;
        EXPECT_EQ(r.dtype("weights", t.name), dt == DType::i8 ? (i8 ? DType::i8 : DType::f32) : dt);
        EXPECT_EQ(r.dtype("m", t.name), DType::f32);
        for (const std::string& rl : kLayouts)
          for (const PieceSpec& p : layout_pieces(rl, t)) {
            std::vector<float> got(size_t(p.hi - p.lo), -1.f);
            r.read("weights", p, got.data());
            ASSERT_TRUE(same_bits(got, reference_slice(p, expect[t.name])))
                << t.name << " read as " << rl << " [" << p.lo << ", " << p.hi << ")";
            r.read("m", p, got.data());
            ASSERT_TRUE(same_bits(got, reference_slice(p, logical_values(1, "m", t))));
          }
        if (!i8) continue;
        // As stored: a row slice and a column slice (whole local rows), with their rows' scales.
        std::vector<int8_t> q;
        std::vector<float> s;
        int8_rows(logical_values(1, "weights", t), t.shape[0], t.shape[1], q, s);
        for (const std::string& rl : {std::string("rows:2:1"), std::string("cols:2:1")})
          for (const PieceSpec& p : layout_pieces(rl, t)) {
            std::vector<int8_t> gq(size_t(p.hi - p.lo));
            const int64_t local_cols = p.shard_dim == 1 ? p.shard_len : t.shape[1];
            std::vector<float> gs(size_t((p.hi - p.lo) / local_cols));
            r.read_int8_rows("weights", p, gq.data(), gs.data());
            std::vector<float> idx(q.size());
            for (size_t i = 0; i < q.size(); ++i) idx[i] = float(i);
            const std::vector<float> at = reference_slice(p, idx);
            for (size_t i = 0; i < at.size(); ++i) ASSERT_EQ(gq[i], q[size_t(at[i])]);
            const int64_t row0 = p.shard_dim == 0 ? p.shard_start : 0;
            for (size_t k = 0; k < gs.size(); ++k) ASSERT_EQ(gs[k], s[size_t(row0) + k]);
          }
        PieceSpec half = whole_tensor(t.name, t.shape);
        half.hi = 3;  // not whole rows
        std::vector<int8_t> gq(3);
        std::vector<float> gs(1);
        EXPECT_ERROR_HAS(r.read_int8_rows("weights", half, gq.data(), gs.data()), "whole rows");
      }
      if (dt != DType::i8)
        EXPECT_ERROR_HAS(r.read_int8_rows("weights", whole_tensor("wte", {13, 6}), nullptr, nullptr),
                         "not int8");
    }
  fs::remove_all(root);
}

// A dtype the reader does not know, a non-weight dtype, an I8 tensor without its scales, scales
// of the wrong shape, and pieces of one tensor in two dtypes: each named.
TEST(ShardedDtypes, BadDtypesAreNamed) {
  fs::path root = temp_dir("baddtypes");
  std::vector<float> a(12, 0.5f);
  std::vector<int8_t> q(12, 3);
  auto save = [&](const std::string& name, bool scales, std::vector<int64_t> scale_shape) {
    ShardedWriter w((root / name).string(), nullptr);
    w.add("weights", whole_tensor("a", {4, 3}), q.data(), DType::i8);
    w.add("weights", whole_tensor("b", {5}), a.data());
    if (scales) w.add("weights", whole_tensor(std::string("a") + kRowScalesSuffix, scale_shape), a.data());
    return w.commit("", {{"step", 1}}).dir;
  };
  EXPECT_ERROR_HAS(ShardedReader(save("noscales", false, {})), "row scales 'a:row_scales' are missing");
  EXPECT_ERROR_HAS(ShardedReader(save("badscales", true, {3})), "must be F32 [4]");
  const std::string ok = save("ok", true, {4});
  auto with_dtype = [&](const std::string& dt) {
    std::ifstream f(fs::path(ok) / "index.json");
    nlohmann::json j = nlohmann::json::parse(f);
    f.close();
    j["tensors"]["weights"]["b"]["dtype"] = dt;
    std::ofstream(fs::path(ok) / "index.json") << j.dump(1);
    reseal(ok, "index.json");
  };
  with_dtype("F8_E4M3");
  EXPECT_ERROR_HAS(ShardedReader{ok}, "weights tensor 'b': unknown dtype 'F8_E4M3'");
  with_dtype("I32");
  EXPECT_ERROR_HAS(ShardedReader{ok}, "weights tensor 'b' has dtype I32; checkpoints store F32, "
                                      "BF16, F16 or I8");
  with_dtype("F16");  // the index says F16, the shard's header F32: caught at the read
  {
    ShardedReader r(ok);
    std::vector<float> out(5);
    EXPECT_ERROR_HAS(r.read("weights", whole_tensor("b", {5}), out.data()),
                     "the index says F16");
  }
  {
    ShardedWriter w((root / "mixed").string(), nullptr);
    PieceSpec top = whole_tensor("a", {4, 3});
    top.hi = 6;
    PieceSpec bottom = top;
    bottom.lo = 6, bottom.hi = 12;
    w.add("weights", top, a.data());
    w.add("weights", bottom, q.data(), DType::bf16);
    EXPECT_ERROR_HAS(w.commit("", {{"step", 1}}), "every piece of a tensor must have its dtype");
  }
  {
    ShardedWriter w((root / "f64").string(), nullptr);
    EXPECT_ERROR_HAS(w.add("weights", whole_tensor("a", {4, 3}), a.data(), DType::f64),
                     "checkpoints store F32, BF16, F16 or I8");
  }
  fs::remove_all(root);
}

}  // namespace
}  // namespace loom::checkpoint::test
