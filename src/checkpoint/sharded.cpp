#include "checkpoint/sharded.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "checkpoint/commit.h"
#include "checkpoint/safetensors.h"
#include "core/error.h"

namespace fs = std::filesystem;

namespace loom::checkpoint {

namespace {

constexpr const char* kFormat = "loom-sharded-1";
// Shards carry a SHA-256 per block of this many bytes (in shard-*.blocks.json), so that a reader
// verifies what it reads without hashing whole shards it needs only a part of.
constexpr uint64_t kBlockBytes = uint64_t(1) << 20;

std::string blocks_name(const std::string& shard) {
  const std::string ext = ".safetensors";
  std::string base = shard.size() > ext.size() && shard.ends_with(ext)
                         ? shard.substr(0, shard.size() - ext.size())
                         : shard;
  return base + ".blocks.json";
}

void pread_exact(int fd, void* dst, size_t n, uint64_t offset, const std::string& path) {
  char* p = static_cast<char*>(dst);
  while (n > 0) {
    ssize_t r = ::pread(fd, p, n, off_t(offset));
    if (r < 0 && errno == EINTR) continue;
    LOOM_CHECK(r > 0, "reading '{}' at byte {} failed: {}", path, offset,
               r == 0 ? "unexpected end of file (truncated?)" : std::strerror(errno));
    p += r;
    n -= size_t(r);
    offset += uint64_t(r);
  }
}

std::string shape_text(const std::vector<int64_t>& s) {
  std::string t = "[";
  for (size_t i = 0; i < s.size(); ++i) t += (i ? ", " : "") + std::to_string(s[i]);
  return t + "]";
}

int64_t numel_of(const std::vector<int64_t>& s) {
  int64_t n = 1;
  for (int64_t d : s) n *= d;
  return n;
}

// A tensor seen as rows x cols: rows = dimension 0, cols = the product of the others (a 0-D
// tensor is 1 x 1). Row slices (shard_dim 0) are contiguous in the flattened tensor; column
// slices (shard_dim 1, 2-D only) are one segment per row.
struct Grid {
  int64_t rows = 1, cols = 1;
  explicit Grid(const std::vector<int64_t>& shape) {
    if (!shape.empty()) {
      rows = shape[0];
      cols = rows == 0 ? 0 : numel_of(shape) / rows;
    }
  }
};

// Flat offset of the slice's local element 0 when the slice is contiguous (shard_dim -1 or 0).
int64_t contiguous_base(const PieceSpec& p, const Grid& g) {
  return p.shard_dim == 0 ? p.shard_start * g.cols : 0;
}

// Rows [first, last) that elements [lo, hi) of the slice touch.
std::pair<int64_t, int64_t> rows_touched(const PieceSpec& p, const Grid& g) {
  if (p.shard_dim == 1) return {p.lo / p.shard_len, (p.hi - 1) / p.shard_len + 1};
  const int64_t b = contiguous_base(p, g);
  return {(b + p.lo) / g.cols, (b + p.hi - 1) / g.cols + 1};
}

// The columns [c0, c1) of row r that elements [lo, hi) of the slice hold, and the local index
// of (r, c0). False if none.
bool row_segment(const PieceSpec& p, const Grid& g, int64_t r, int64_t& c0, int64_t& c1,
                 int64_t& local0) {
  if (p.shard_dim == 1) {
    const int64_t w = p.shard_len;
    const int64_t a = std::max(r * w, p.lo), b = std::min(r * w + w, p.hi);
    if (a >= b) return false;
    c0 = p.shard_start + (a - r * w);
    c1 = c0 + (b - a);
    local0 = a;
    return true;
  }
  const int64_t base = contiguous_base(p, g);
  const int64_t a = std::max(r * g.cols, base + p.lo), b = std::min(r * g.cols + g.cols, base + p.hi);
  if (a >= b) return false;
  c0 = a - r * g.cols;
  c1 = b - r * g.cols;
  local0 = a - base;
  return true;
}

// Calls f(a_local, b_local, len) for every run of elements that both a's elements [lo, hi) and
// b's hold: a_local, b_local are indices into the two slices. Both describe the same tensor.
template <class F>
void for_each_overlap(const PieceSpec& a, const PieceSpec& b, const Grid& g, F&& f) {
  if (a.lo >= a.hi || b.lo >= b.hi) return;
  if (a.shard_dim != 1 && b.shard_dim != 1) {  // both contiguous: one interval each
    const int64_t ab = contiguous_base(a, g), bb = contiguous_base(b, g);
    const int64_t x = std::max(ab + a.lo, bb + b.lo), y = std::min(ab + a.hi, bb + b.hi);
    if (x < y) f(x - ab, x - bb, y - x);
    return;
  }
  auto [ar0, ar1] = rows_touched(a, g);
  auto [br0, br1] = rows_touched(b, g);
  for (int64_t r = std::max(ar0, br0); r < std::min(ar1, br1); ++r) {
    int64_t ac0, ac1, al, bc0, bc1, bl;
    if (!row_segment(a, g, r, ac0, ac1, al) || !row_segment(b, g, r, bc0, bc1, bl)) continue;
    const int64_t c0 = std::max(ac0, bc0), c1 = std::min(ac1, bc1);
    if (c0 < c1) f(al + (c0 - ac0), bl + (c0 - bc0), c1 - c0);
  }
}

// Throws naming the tensor if the spec is not a slice of its tensor.
void check_piece(const std::string& where, const std::string& kind, const PieceSpec& p) {
  const std::string what = fmt::format("{}: {} tensor '{}' (shape {})", where, kind, p.name,
                                        shape_text(p.global_shape));
  LOOM_CHECK(!p.name.empty(), "{}: a piece has an empty tensor name", where);
  int64_t n_total = 1;
  for (int64_t d : p.global_shape) {
    LOOM_CHECK(d >= 0 && d <= (int64_t(1) << 40), "{} has dimension {} outside [0, 2^40]", what,
               d);
    LOOM_CHECK(d == 0 || n_total <= (int64_t(1) << 50) / d,
               "{} has more than 2^50 elements", what);
    n_total *= d;
  }
  LOOM_CHECK(p.shard_dim >= -1 && p.shard_dim <= 1,
             "{}: shard_dim = {} must be -1 (whole), 0 (rows) or 1 (columns)", what, p.shard_dim);
  if (p.shard_dim == 0)
    LOOM_CHECK(!p.global_shape.empty() && p.shard_start >= 0 && p.shard_len >= 0 &&
                   p.shard_start + p.shard_len <= p.global_shape[0],
               "{}: rows [{}, {}) are not inside its {} rows", what, p.shard_start,
               p.shard_start + p.shard_len, p.global_shape.empty() ? 0 : p.global_shape[0]);
  if (p.shard_dim == 1)
    LOOM_CHECK(p.global_shape.size() == 2 && p.shard_start >= 0 && p.shard_len >= 0 &&
                   p.shard_start + p.shard_len <= p.global_shape[1],
               "{}: columns [{}, {}) are not a column slice of a 2-D tensor", what,
               p.shard_start, p.shard_start + p.shard_len);
  const int64_t n = slice_numel(p);
  LOOM_CHECK(p.lo >= 0 && p.lo <= p.hi && p.hi <= n,
             "{}: element range [{}, {}) is not inside its slice of {} elements", what, p.lo,
             p.hi, n);
}

// Every element of a tensor of `numel` elements in exactly one of the pieces: throws naming the
// tensor, the elements (flat indices) and the owners ("rank 3", ...) otherwise.
void check_coverage(const std::string& kind, const std::string& name,
                    const std::vector<int64_t>& shape, const std::vector<PieceSpec>& pieces,
                    const std::vector<std::string>& owners, const std::string& fix) {
  const Grid g(shape);
  struct Interval {
    int64_t a, b;
    size_t owner;
  };
  std::vector<Interval> iv;
  for (size_t i = 0; i < pieces.size(); ++i) {
    const PieceSpec& p = pieces[i];
    if (p.lo >= p.hi) continue;
    if (p.shard_dim != 1) {
      const int64_t b = contiguous_base(p, g);
      iv.push_back({b + p.lo, b + p.hi, i});
      continue;
    }
    auto [r0, r1] = rows_touched(p, g);
    for (int64_t r = r0; r < r1; ++r) {
      int64_t c0, c1, l;
      if (row_segment(p, g, r, c0, c1, l)) iv.push_back({r * g.cols + c0, r * g.cols + c1, i});
    }
  }
  std::sort(iv.begin(), iv.end(), [](const Interval& x, const Interval& y) { return x.a < y.a; });
  const int64_t n = numel_of(shape);
  int64_t cursor = 0;
  size_t last = 0;
  for (const Interval& v : iv) {
    LOOM_CHECK(v.a >= cursor,
               "{} tensor '{}' (shape {}): elements [{}, {}) of the flattened tensor are saved "
               "twice, by {} and by {}; {}", kind, name, shape_text(shape), v.a,
               std::min(v.b, cursor), owners[last], owners[v.owner], fix);
    LOOM_CHECK(v.a == cursor,
               "{} tensor '{}' (shape {}): elements [{}, {}) of the flattened tensor are saved "
               "by no piece (a gap); {}", kind, name, shape_text(shape), cursor, v.a, fix);
    cursor = v.b;
    last = v.owner;
  }
  LOOM_CHECK(cursor == n,
             "{} tensor '{}' (shape {}): elements [{}, {}) of the flattened tensor are saved by "
             "no piece (a gap); {}", kind, name, shape_text(shape), cursor, n, fix);
}

std::string read_text(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  LOOM_CHECK(f.good(), "cannot open '{}'", path);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// --- collectives on strings (rank 0 is the root) --------------------------------------------

std::string broadcast_string(const comm::ProcessGroup& g, std::string s) {
  if (!g.valid() || g.size() == 1) return s;
  int64_t n = int64_t(s.size());
  g.broadcast(comm::BufferRef(&n, 1, DType::i64), 0).wait();
  s.resize(size_t(n));
  if (n > 0) g.broadcast(comm::BufferRef(s.data(), n, DType::u8), 0).wait();
  return s;
}

// Rank 0 gets every rank's string (by rank); the others get {}.
std::vector<std::string> gather_strings(const comm::ProcessGroup& g, const std::string& s) {
  if (!g.valid() || g.size() == 1) return {s};
  constexpr int kTag = 7301;
  if (g.rank() != 0) {
    int64_t n = int64_t(s.size());
    g.send(comm::BufferRef(&n, 1, DType::i64), 0, kTag);
    g.send(comm::BufferRef(const_cast<char*>(s.data()), n, DType::u8), 0, kTag);
    return {};
  }
  std::vector<std::string> all(size_t(g.size()));
  all[0] = s;
  for (int r = 1; r < g.size(); ++r) {
    int64_t n = 0;
    g.recv(comm::BufferRef(&n, 1, DType::i64), r, kTag);
    all[size_t(r)].resize(size_t(n));
    g.recv(comm::BufferRef(all[size_t(r)].data(), n, DType::u8), r, kTag);
  }
  return all;
}

nlohmann::json piece_json(const PieceSpec& p) {
  return {{"shard_dim", p.shard_dim}, {"shard_start", p.shard_start},
          {"shard_len", p.shard_len}, {"lo", p.lo}, {"hi", p.hi}};
}

}  // namespace

int64_t slice_numel(const PieceSpec& p) {
  const Grid g(p.global_shape);
  if (p.shard_dim == 0) return p.shard_len * g.cols;
  if (p.shard_dim == 1) return g.rows * p.shard_len;
  return numel_of(p.global_shape);
}

PieceSpec whole_tensor(const std::string& name, const std::vector<int64_t>& shape) {
  PieceSpec p;
  p.name = name;
  p.global_shape = shape;
  p.hi = numel_of(shape);
  return p;
}

// --- writer ---------------------------------------------------------------------------------

ShardedWriter::ShardedWriter(std::string checkpoint_dir, const comm::ProcessGroup* group,
                             WriterOptions options)
    : dir_(std::move(checkpoint_dir)), options_(options) {
  if (group && group->valid()) {
    group_ = *group;
    rank_ = group_.rank();
    world_ = group_.size();
  }
  LOOM_CHECK(options_.keep >= 0, "checkpoint keep = {} must be >= 0 (0 keeps every checkpoint)",
             options_.keep);
}

void ShardedWriter::add(const std::string& kind, const PieceSpec& piece, const float* data) {
  LOOM_CHECK(!committed_, "ShardedWriter::add after commit(); make a new writer per save");
  LOOM_CHECK(!kind.empty() && kind.find('/') == std::string::npos &&
                 piece.name.find('#') == std::string::npos,
             "checkpoint kind '{}' / tensor '{}': kinds must be non-empty without '/', tensor "
             "names without '#'", kind, piece.name);
  check_piece("ShardedWriter::add", kind, piece);
  LOOM_CHECK(data != nullptr || piece.hi == piece.lo,
             "ShardedWriter::add: {} tensor '{}' has {} elements but a null data pointer", kind,
             piece.name, piece.hi - piece.lo);
  pieces_.push_back({kind, piece, data});
}

CommitResult ShardedWriter::commit(const std::string& config_toml,
                                   const nlohmann::json& trainer_state,
                                   const std::function<void(const std::string&)>& extra) {
  LOOM_CHECK(!committed_, "ShardedWriter::commit called twice; make a new writer per save");
  committed_ = true;
  int64_t step = options_.step;
  if (step < 0 && trainer_state.is_object() && trainer_state.contains("step") &&
      trainer_state["step"].is_number_integer())
    step = trainer_state["step"].get<int64_t>();
  LOOM_CHECK(step >= 0,
             "checkpoint save to '{}': no step to name it by: give trainer_state an integer "
             "\"step\" >= 0 or set WriterOptions::step", dir_);
  const std::string who = world_ > 1 ? fmt::format("[rank {}/{}] ", rank_, world_) : "";
  ProtocolSteps steps(rank_);
  CommitResult result;

  // 1. Rank 0 cleans up after interrupted saves and makes the staging directory.
  std::string err;
  VersionedSave save;
  if (rank_ == 0) {
    try {
      save = begin_versioned(steps, dir_, step);
    } catch (const std::exception& e) {
      err = who + e.what();
    }
  }
  err = broadcast_string(group_, err);
  LOOM_CHECK(err.empty(), "checkpoint save to '{}' failed (the previous checkpoint is unchanged): {}",
             dir_, err);
  const std::string staging = staging_dir(dir_, step);

  // 2. Every rank streams its pieces into its shard file.
  const std::string file = fmt::format("shard-{:05d}-of-{:05d}.safetensors", rank_, world_);
  nlohmann::json mine;
  try {
    std::vector<TensorToWrite> tensors;
    std::vector<std::string> tensor_names;
    std::map<std::string, int> counter;
    for (const Piece& p : pieces_) {
      if (p.spec.hi == p.spec.lo) continue;
      std::string key = p.kind + "/" + p.spec.name;
      tensor_names.push_back(key + "#" + std::to_string(counter[key]++));
      tensors.push_back({tensor_names.back(), DType::f32, Shape{p.spec.hi - p.spec.lo}, p.data});
    }
    std::map<std::string, std::string> meta = {{"format", kFormat},
                                               {"rank", std::to_string(rank_)},
                                               {"world_size", std::to_string(world_)}};
    const uint64_t data_start = safetensors_header(tensors, meta).size();
    FileDigest d = write_safetensors(steps, staging + "/" + file, tensors, meta, kBlockBytes);
    result.shard_bytes = d.bytes;
    const nlohmann::json blocks_json = {{"file", file}, {"bytes", d.bytes},
                                        {"block_bytes", d.block_bytes},
                                        {"sha256", d.block_sha256}};
    FileDigest bd = write_file(steps, staging + "/" + blocks_name(file), blocks_json.dump() + "\n");
    nlohmann::json pieces = nlohmann::json::array();
    uint64_t offset = data_start;
    size_t k = 0;
    for (const Piece& p : pieces_) {
      if (p.spec.hi == p.spec.lo) continue;
      nlohmann::json j = piece_json(p.spec);
      j["kind"] = p.kind;
      j["name"] = p.spec.name;
      j["shape"] = p.spec.global_shape;
      j["tensor"] = tensor_names[k++];
      j["offset"] = offset;
      offset += uint64_t(p.spec.hi - p.spec.lo) * sizeof(float);
      pieces.push_back(std::move(j));
    }
    mine = {{"file", file}, {"sha256", d.sha256}, {"bytes", d.bytes},
            {"blocks_sha256", bd.sha256}, {"blocks_bytes", bd.bytes}, {"pieces", pieces}};
  } catch (const std::exception& e) {
    mine = {{"error", who + e.what()}};
  }
  // Invalid UTF-8 (a path in an error message) must not throw here: the other ranks wait for it.
  std::vector<std::string> all = gather_strings(
      group_, mine.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace));

  // 3. Rank 0 checks the pieces, writes the index and the small files, and commits.
  std::string status;
  if (rank_ == 0) {
    try {
      std::vector<nlohmann::json> results;
      std::string errors;
      for (const std::string& s : all) {
        results.push_back(nlohmann::json::parse(s));
        if (results.back().contains("error"))
          errors += (errors.empty() ? "" : "; ") + results.back()["error"].get<std::string>();
      }
      LOOM_CHECK(errors.empty(), "{}", errors);
      // kind -> name -> (shape, pieces, owners, json pieces)
      struct Collected {
        std::vector<int64_t> shape;
        std::vector<PieceSpec> specs;
        std::vector<std::string> owners;
        nlohmann::json pieces = nlohmann::json::array();
      };
      std::map<std::string, std::map<std::string, Collected>> by_kind;
      std::map<std::string, FileDigest> sums;
      nlohmann::json files = nlohmann::json::array();
      for (size_t r = 0; r < results.size(); ++r) {
        const nlohmann::json& res = results[r];
        const std::string f = res["file"].get<std::string>();
        files.push_back({{"shard", f}, {"blocks", blocks_name(f)}});
        auto digest = [](const nlohmann::json& sha, const nlohmann::json& bytes) {
          FileDigest d;
          d.sha256 = sha.get<std::string>();
          d.bytes = bytes.get<uint64_t>();
          return d;
        };
        sums[f] = digest(res["sha256"], res["bytes"]);
        sums[blocks_name(f)] = digest(res["blocks_sha256"], res["blocks_bytes"]);
        for (const nlohmann::json& j : res["pieces"]) {
          PieceSpec p;
          p.name = j["name"].get<std::string>();
          p.global_shape = j["shape"].get<std::vector<int64_t>>();
          p.shard_dim = j["shard_dim"].get<int>();
          p.shard_start = j["shard_start"].get<int64_t>();
          p.shard_len = j["shard_len"].get<int64_t>();
          p.lo = j["lo"].get<int64_t>();
          p.hi = j["hi"].get<int64_t>();
          const std::string kind = j["kind"].get<std::string>();
          Collected& c = by_kind[kind][p.name];
          if (c.specs.empty()) c.shape = p.global_shape;
          LOOM_CHECK(c.shape == p.global_shape,
                     "{} tensor '{}' is saved with shape {} by {} but {} by rank {}; every rank "
                     "must describe the same logical tensor", kind, p.name, shape_text(c.shape),
                     c.owners.front(), shape_text(p.global_shape), r);
          nlohmann::json e = piece_json(p);
          e["file"] = r;
          e["tensor"] = j["tensor"];
          e["offset"] = j["offset"];
          c.pieces.push_back(std::move(e));
          c.specs.push_back(std::move(p));
          c.owners.push_back(fmt::format("rank {} ('{}')", r, res["file"].get<std::string>()));
        }
      }
      nlohmann::json tensors = nlohmann::json::object();
      for (auto& [kind, names] : by_kind)
        for (auto& [name, c] : names) {
          check_coverage(kind, name, c.shape, c.specs, c.owners,
                         "every element of every tensor must be saved by exactly one rank "
                         "(check the tp slices and ZeRO ranges given to ShardedWriter::add)");
          tensors[kind][name] = {{"shape", c.shape}, {"dtype", "F32"}, {"pieces", c.pieces}};
        }
      nlohmann::json index = {{"format", kFormat}, {"world_size", world_}, {"files", files},
                              {"tensors", tensors}};
      sums["index.json"] = write_file(steps, staging + "/index.json", index.dump(1) + "\n");
      sums["config.toml"] = write_file(steps, staging + "/config.toml", config_toml);
      sums["trainer_state.json"] =
          write_file(steps, staging + "/trainer_state.json", trainer_state.dump(2) + "\n");
      if (extra) extra(staging);
      sync_new_files(steps, staging, sums);
      write_checksums(steps, staging, sums);
    } catch (const std::exception& e) {
      status = e.what();
      remove_tree(staging);
    }
    if (status.empty()) {
      try {
        commit_versioned(steps, save, options_.keep);  // cleans up after itself on failure
        result.dir = save.root + "/" + save.name;
      } catch (const std::exception& e) {
        status = e.what();
      }
    }
    status = status.empty() ? "ok:" + result.dir : "error:" + status;
  }
  status = broadcast_string(group_, status);
  LOOM_CHECK(status.rfind("ok:", 0) == 0, "checkpoint save to '{}' failed (the previous "
             "checkpoint is unchanged): {}", dir_, status.substr(6));
  result.dir = status.substr(3);
  result.steps = steps.count();
  return result;
}

// --- reader ---------------------------------------------------------------------------------

struct ShardedReader::File {
  std::string rel, path;
  FileDigest expected;
  bool verified = false;  // the whole file was hashed
  std::unique_ptr<SafetensorsFile> st;
  int fd = -1;
  std::string blocks_rel;  // the block checksums (sharded format), or empty: whole-file hash
  uint64_t block_bytes = 0;
  std::vector<std::string> block_sha256;
  std::vector<bool> block_ok;
  ~File() {
    if (fd >= 0) ::close(fd);
  }
};

namespace {

void verify_file(const std::string& path, const FileDigest& expected) {
  FileDigest d = digest_file(path);
  LOOM_CHECK(d.bytes == expected.bytes,
             "checkpoint file '{}' has {} bytes but {} were written (truncated or modified)",
             path, d.bytes, expected.bytes);
  LOOM_CHECK(d.sha256 == expected.sha256,
             "checkpoint file '{}' is corrupted: SHA-256 {} does not match the recorded {}", path,
             d.sha256, expected.sha256);
}

}  // namespace

ShardedReader::ShardedReader(const std::string& path, ReaderOptions options)
    : options_(options) {
  dir_ = find_checkpoint(path);
  std::map<std::string, FileDigest> sums = read_checksums(dir_);
  for (auto& [rel, d] : sums) {
    const std::string p = dir_ + "/" + rel;
    std::error_code ec;
    LOOM_CHECK(fs::is_regular_file(p, ec), "checkpoint file '{}' is missing (listed in '{}')", p,
               dir_ + "/checksums.json");
    const uint64_t bytes = fs::file_size(p, ec);
    LOOM_CHECK(bytes == d.bytes,
               "checkpoint file '{}' has {} bytes but {} were written (truncated or modified)", p,
               bytes, d.bytes);
  }
  legacy_ = !sums.count("index.json");
  const char* required[] = {legacy_ ? "model.safetensors" : "index.json", "config.toml",
                            "trainer_state.json"};
  for (const char* r : required)
    LOOM_CHECK(sums.count(r), "checkpoint '{}' lacks {} in checksums.json", dir_, r);
  for (const char* small : {"config.toml", "trainer_state.json", "index.json"})
    if (sums.count(small) && options_.verify_checksums)
      verify_file(dir_ + "/" + small, sums[small]);
  for (auto& [rel, d] : sums) {
    auto f = std::make_unique<File>();
    f->rel = rel;
    f->path = dir_ + "/" + rel;
    f->expected = d;
    files_.push_back(std::move(f));
  }
  checksums_ = std::move(sums);
  config_toml_ = read_text(dir_ + "/config.toml");
  try {
    trainer_state_ = nlohmann::json::parse(read_text(dir_ + "/trainer_state.json"));
  } catch (const nlohmann::json::exception& e) {
    LOOM_FAIL("'{}/trainer_state.json' is not valid JSON ({})", dir_, e.what());
  }
  if (legacy_)
    load_legacy();
  else
    load_index();
}

ShardedReader::~ShardedReader() = default;

ShardedReader::File& ShardedReader::open_file(int i) const {
  File& f = *files_.at(size_t(i));
  if (f.fd >= 0) return f;
  if (options_.verify_checksums) {
    if (f.blocks_rel.empty()) {
      if (!f.verified) verify_file(f.path, f.expected);
      f.verified = true;
    } else {
      const std::string bpath = dir_ + "/" + f.blocks_rel;
      verify_file(bpath, checksums_.at(f.blocks_rel));
      try {
        nlohmann::json b = nlohmann::json::parse(read_text(bpath));
        f.block_bytes = b.at("block_bytes").get<uint64_t>();
        f.block_sha256 = b.at("sha256").get<std::vector<std::string>>();
        LOOM_CHECK(b.at("bytes").get<uint64_t>() == f.expected.bytes && f.block_bytes > 0 &&
                       f.block_sha256.size() ==
                           (f.expected.bytes + f.block_bytes - 1) / f.block_bytes,
                   "'{}' does not describe the {} bytes of '{}' (files from different saves?)",
                   bpath, f.expected.bytes, f.path);
      } catch (const nlohmann::json::exception& e) {
        LOOM_FAIL("'{}' is not a valid block checksum file ({})", bpath, e.what());
      }
      f.block_ok.assign(f.block_sha256.size(), false);
    }
  }
  f.fd = ::open(f.path.c_str(), O_RDONLY | O_CLOEXEC);
  LOOM_CHECK(f.fd >= 0, "cannot open '{}': {}", f.path, std::strerror(errno));
  // The header is parsed from verified bytes only: verify its blocks first.
  if (!f.block_sha256.empty()) {
    unsigned char len[8];
    read_bytes(f, 0, 8, len);
    uint64_t n = 0;
    for (int k = 0; k < 8; ++k) n |= uint64_t(len[k]) << (8 * k);
    std::vector<char> header(size_t(std::min<uint64_t>(n, f.expected.bytes)));
    read_bytes(f, 8, header.size(), header.data());
  }
  f.st = std::make_unique<SafetensorsFile>(f.path);
  return f;
}

void ShardedReader::read_bytes(File& f, uint64_t offset, size_t n, void* dst) const {
  char* out = static_cast<char*>(dst);
  if (f.block_sha256.empty() || f.verified || n == 0) {  // verified whole (or not at all)
    pread_exact(f.fd, out, n, offset, f.path);
    return;
  }
  const uint64_t bb = f.block_bytes, end = offset + n;
  for (uint64_t b = offset / bb; b * bb < end; ++b) {
    const uint64_t b0 = b * bb, b1 = std::min(b0 + bb, f.expected.bytes);
    const uint64_t a = std::max(offset, b0), e = std::min(end, b1);
    LOOM_CHECK(b < f.block_sha256.size() && a < e,
               "reading bytes [{}, {}) of '{}' beyond its {} bytes", offset, end, f.path,
               f.expected.bytes);
    if (f.block_ok[b]) {
      pread_exact(f.fd, out + (a - offset), size_t(e - a), a, f.path);
      continue;
    }
    block_buf_.resize(size_t(b1 - b0));
    pread_exact(f.fd, block_buf_.data(), block_buf_.size(), b0, f.path);
    const std::string got = sha256_hex(block_buf_.data(), block_buf_.size());
    LOOM_CHECK(got == f.block_sha256[b],
               "checkpoint file '{}' is corrupted: SHA-256 {} of bytes [{}, {}) does not match "
               "the recorded {} (in '{}')", f.path, got, b0, b1, f.block_sha256[b],
               dir_ + "/" + f.blocks_rel);
    f.block_ok[b] = true;
    std::memcpy(out + (a - offset), block_buf_.data() + (a - b0), size_t(e - a));
  }
}

void ShardedReader::load_legacy() {
  auto file_index = [&](const std::string& rel) {
    for (size_t i = 0; i < files_.size(); ++i)
      if (files_[i]->rel == rel) return int(i);
    return -1;
  };
  for (const char* rel : {"model.safetensors", "optimizer.safetensors"}) {
    int fi = file_index(rel);
    if (fi < 0) continue;
    // The header only (checksums are verified before the first read of tensor data).
    SafetensorsFile st(files_[size_t(fi)]->path);
    for (auto& [tname, info] : st.tensors()) {
      std::string kind = "weights", name = tname;
      if (std::string(rel) == "optimizer.safetensors") {
        if (tname.rfind("m.", 0) == 0) kind = "m";
        else if (tname.rfind("v.", 0) == 0) kind = "v";
        else continue;
        name = tname.substr(2);
      }
      LOOM_CHECK(info.dtype == DType::f32, "'{}': tensor '{}' is {}, but checkpoints hold F32",
                 st.path(), tname, dtype_name(info.dtype));
      Entry& e = tensors_[kind][name];
      e.shape = info.shape;
      StoredPiece p;
      p.file = fi;
      p.tensor = tname;
      p.offset = st.data_start() + info.begin;
      p.spec = whole_tensor(name, info.shape);
      e.pieces = {p};
    }
    if (std::string(rel) == "optimizer.safetensors") {
      auto it = st.metadata().find("step");
      LOOM_CHECK(it != st.metadata().end(), "'{}' lacks the optimizer step", st.path());
      try {
        size_t used = 0;
        legacy_step_ = std::stoll(it->second, &used);
        LOOM_CHECK(used == it->second.size() && legacy_step_ >= 0, "");
      } catch (const std::exception&) {
        LOOM_FAIL("'{}': metadata step = '{}' is not an integer >= 0", st.path(), it->second);
      }
    }
  }
}

void ShardedReader::load_index() {
  const std::string path = dir_ + "/index.json";
  try {
    nlohmann::json j = nlohmann::json::parse(read_text(path));
    LOOM_CHECK(j.is_object() && j.value("format", "") == kFormat,
               "'{}' is not a loom checkpoint index (format '{}' expected)", path, kFormat);
    std::vector<int> file_ids;
    for (const nlohmann::json& f : j.at("files")) {
      const std::string rel = f.at("shard").get<std::string>();
      const std::string blocks = f.at("blocks").get<std::string>();
      int id = -1;
      for (size_t i = 0; i < files_.size(); ++i)
        if (files_[i]->rel == rel) id = int(i);
      LOOM_CHECK(id >= 0 && checksums_.count(blocks),
                 "'{}' lists shard '{}' (block checksums '{}') that checksums.json does not: "
                 "the index and the checksums are from different saves", path, rel, blocks);
      files_[size_t(id)]->blocks_rel = blocks;
      file_ids.push_back(id);
    }
    for (auto& [kind, names] : j.at("tensors").items())
      for (auto& [name, t] : names.items()) {
        Entry& e = tensors_[kind][name];
        e.shape = t.at("shape").get<std::vector<int64_t>>();
        LOOM_CHECK(t.value("dtype", "F32") == "F32", "'{}': {} tensor '{}' has dtype {}, only "
                   "F32 is supported", path, kind, name, t.value("dtype", ""));
        for (const nlohmann::json& pj : t.at("pieces")) {
          StoredPiece p;
          const int64_t fi = pj.at("file").get<int64_t>();
          LOOM_CHECK(fi >= 0 && fi < int64_t(file_ids.size()),
                     "'{}': a piece of {} tensor '{}' names file {} of {}", path, kind, name, fi,
                     file_ids.size());
          p.file = file_ids[size_t(fi)];
          p.tensor = pj.at("tensor").get<std::string>();
          p.offset = pj.at("offset").get<uint64_t>();
          p.spec.name = name;
          p.spec.global_shape = e.shape;
          p.spec.shard_dim = pj.at("shard_dim").get<int>();
          p.spec.shard_start = pj.at("shard_start").get<int64_t>();
          p.spec.shard_len = pj.at("shard_len").get<int64_t>();
          p.spec.lo = pj.at("lo").get<int64_t>();
          p.spec.hi = pj.at("hi").get<int64_t>();
          check_piece(path, kind, p.spec);
          e.pieces.push_back(std::move(p));
        }
      }
  } catch (const nlohmann::json::exception& e) {
    LOOM_FAIL("'{}' is not a valid checkpoint index ({})", path, e.what());
  }
}

bool ShardedReader::has(const std::string& kind) const { return tensors_.count(kind) > 0; }

bool ShardedReader::has(const std::string& kind, const std::string& name) const {
  auto it = tensors_.find(kind);
  return it != tensors_.end() && it->second.count(name) > 0;
}

std::vector<std::string> ShardedReader::names(const std::string& kind) const {
  std::vector<std::string> out;
  auto it = tensors_.find(kind);
  if (it != tensors_.end())
    for (auto& [n, e] : it->second) out.push_back(n);
  return out;
}

const std::vector<int64_t>& ShardedReader::shape(const std::string& kind,
                                                 const std::string& name) const {
  auto it = tensors_.find(kind);
  LOOM_CHECK(it != tensors_.end(), "checkpoint '{}' has no {} tensors (it has {})", dir_, kind,
             [&] {
               std::string s;
               for (auto& [k, v] : tensors_) s += (s.empty() ? "" : ", ") + k;
               return s.empty() ? std::string("none") : s;
             }());
  auto e = it->second.find(name);
  LOOM_CHECK(e != it->second.end(), "checkpoint '{}' has no {} tensor named '{}'", dir_, kind,
             name);
  return e->second.shape;
}

void ShardedReader::read(const std::string& kind, const PieceSpec& want, float* dst) const {
  const std::vector<int64_t>& stored_shape = shape(kind, want.name);
  LOOM_CHECK(want.global_shape == stored_shape,
             "checkpoint '{}': {} tensor '{}' has shape {} but {} was asked for (a checkpoint "
             "of another model?)", dir_, kind, want.name, shape_text(stored_shape),
             shape_text(want.global_shape));
  check_piece("ShardedReader::read", kind, want);
  if (want.hi == want.lo) return;
  const Entry& e = tensors_.at(kind).at(want.name);
  const Grid g(stored_shape);
  // Plan every copy first, so an incomplete checkpoint fails before any read.
  struct Copy {
    const StoredPiece* piece;
    int64_t dst, src, len;  // dst: index into dst; src: element index within the piece
  };
  std::vector<Copy> copies;
  for (const StoredPiece& p : e.pieces)
    for_each_overlap(want, p.spec, g, [&](int64_t wl, int64_t pl, int64_t len) {
      copies.push_back({&p, wl - want.lo, pl - p.spec.lo, len});
    });
  std::sort(copies.begin(), copies.end(),
            [](const Copy& a, const Copy& b) { return a.dst < b.dst; });
  const std::string index = legacy_ ? dir_ : dir_ + "/index.json";
  const std::string slice =
      want.shard_dim < 0 ? std::string("the whole tensor")
                         : fmt::format("{} [{}, {})", want.shard_dim == 0 ? "rows" : "columns",
                                       want.shard_start, want.shard_start + want.shard_len);
  int64_t cursor = 0;
  for (const Copy& c : copies) {
    LOOM_CHECK(c.dst >= cursor, "'{}': {} tensor '{}' has elements stored twice (pieces in '{}' "
               "overlap): the index is inconsistent", index, kind, want.name,
               files_[size_t(c.piece->file)]->path);
    LOOM_CHECK(c.dst == cursor, "'{}': {} tensor '{}' ({}, elements [{}, {})): elements [{}, {}) "
               "are in no stored piece; the checkpoint does not cover what was asked for", index,
               kind, want.name, slice, want.lo, want.hi, want.lo + cursor, want.lo + c.dst);
    cursor += c.len;
  }
  LOOM_CHECK(cursor == want.hi - want.lo,
             "'{}': {} tensor '{}' ({}, elements [{}, {})): elements [{}, {}) are in no stored "
             "piece; the checkpoint does not cover what was asked for", index, kind, want.name,
             slice, want.lo, want.hi, want.lo + cursor, want.hi);
  for (const Copy& c : copies) {
    File& f = open_file(c.piece->file);
    const StoredPiece& p = *c.piece;
    // The index must agree with the shard's own header.
    const TensorInfo& info = f.st->info(p.tensor);  // throws naming the file if absent
    LOOM_CHECK(info.dtype == DType::f32 && shape_numel(info.shape) == p.spec.hi - p.spec.lo &&
                   f.st->data_start() + info.begin == p.offset,
               "'{}' and '{}' disagree about '{}': the index says F32, {} elements at byte {}, "
               "the file's header {}, {} elements at byte {} (files from different saves?)",
               index, f.path, p.tensor, p.spec.hi - p.spec.lo, p.offset, dtype_name(info.dtype),
               shape_numel(info.shape), f.st->data_start() + info.begin);
    read_bytes(f, p.offset + uint64_t(c.src) * sizeof(float), size_t(c.len) * sizeof(float),
               dst + c.dst);
  }
}

void ShardedReader::verify_all() const {
  for (auto& f : files_)
    if (!f->verified) {
      verify_file(f->path, f->expected);
      f->verified = true;
    }
}

}  // namespace loom::checkpoint
