#include "checkpoint/sharded.h"

#include "checkpoint/commit.h"
#include "checkpoint/pieces.h"
#include "checkpoint/safetensors.h"
#include "core/error.h"

namespace loom::checkpoint {

using namespace detail;

namespace {

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

PieceSpec piece_of(const ParamSpec& spec, int64_t lo, int64_t hi) {
  PieceSpec p;
  p.name = spec.name;
  p.global_shape = spec.global_shape;
  p.shard_dim = spec.shard_dim;
  p.shard_start = spec.shard_start;
  p.shard_len = spec.shard_dim >= 0 ? spec.shape.at(size_t(spec.shard_dim)) : 0;
  p.lo = lo;
  p.hi = hi;
  return p;
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
  add(kind, piece, data, DType::f32);
}

void ShardedWriter::add(const std::string& kind, const PieceSpec& piece, const void* data,
                        DType dtype) {
  LOOM_CHECK(is_stored_dtype(dtype),
             "ShardedWriter::add: {} tensor '{}' as {}: checkpoints store F32, BF16, F16 or I8",
             kind, piece.name, dtype_name(dtype));
  LOOM_CHECK(!committed_, "ShardedWriter::add after commit(); make a new writer per save");
  LOOM_CHECK(!kind.empty() && kind.find('/') == std::string::npos &&
                 piece.name.find('#') == std::string::npos,
             "checkpoint kind '{}' / tensor '{}': kinds must be non-empty without '/', tensor "
             "names without '#'", kind, piece.name);
  check_piece("ShardedWriter::add", kind, piece);
  LOOM_CHECK(data != nullptr || piece.hi == piece.lo,
             "ShardedWriter::add: {} tensor '{}' has {} elements but a null data pointer", kind,
             piece.name, piece.hi - piece.lo);
  pieces_.push_back({kind, piece, data, dtype});
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
      tensors.push_back({tensor_names.back(), p.dtype, Shape{p.spec.hi - p.spec.lo}, p.data});
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
      j["dtype"] = std::string(dtype_name(p.dtype));
      offset += uint64_t(p.spec.hi - p.spec.lo) * dtype_size(p.dtype);
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
      // Each rank's report is parsed and reduced to compact pieces one at a time, and the index
      // is written as text, so rank 0 holds one copy of the piece table, not several JSON trees.
      struct Stored {
        PieceSpec spec;
        int rank;
        std::string tensor;
        uint64_t offset;
      };
      struct Collected {
        std::vector<int64_t> shape;
        std::string dtype;
        std::vector<Stored> pieces;
      };
      std::map<std::string, std::map<std::string, Collected>> by_kind;
      std::map<std::string, FileDigest> sums;
      std::vector<std::string> files;
      std::string errors;
      auto digest = [](const nlohmann::json& sha, const nlohmann::json& bytes) {
        FileDigest d;
        d.sha256 = sha.get<std::string>();
        d.bytes = bytes.get<uint64_t>();
        return d;
      };
      for (size_t r = 0; r < all.size(); ++r) {
        nlohmann::json res = nlohmann::json::parse(all[r]);
        std::string().swap(all[r]);
        if (res.contains("error")) {
          errors += (errors.empty() ? "" : "; ") + res["error"].get<std::string>();
          continue;
        }
        const std::string f = res["file"].get<std::string>();
        files.push_back(f);
        sums[f] = digest(res["sha256"], res["bytes"]);
        sums[blocks_name(f)] = digest(res["blocks_sha256"], res["blocks_bytes"]);
        for (const nlohmann::json& j : res["pieces"]) {
          Stored st;
          PieceSpec& p = st.spec;
          p.name = j["name"].get<std::string>();
          p.global_shape = j["shape"].get<std::vector<int64_t>>();
          p.shard_dim = j["shard_dim"].get<int>();
          p.shard_start = j["shard_start"].get<int64_t>();
          p.shard_len = j["shard_len"].get<int64_t>();
          p.lo = j["lo"].get<int64_t>();
          p.hi = j["hi"].get<int64_t>();
          st.rank = int(r);
          st.tensor = j["tensor"].get<std::string>();
          st.offset = j["offset"].get<uint64_t>();
          const std::string kind = j["kind"].get<std::string>();
          const std::string dtype = j.value("dtype", "F32");
          Collected& c = by_kind[kind][p.name];
          if (c.pieces.empty()) c.shape = p.global_shape, c.dtype = dtype;
          LOOM_CHECK(c.shape == p.global_shape,
                     "{} tensor '{}' is saved with shape {} by rank {} but {} by rank {}; every "
                     "rank must describe the same logical tensor", kind, p.name,
                     shape_text(c.shape), c.pieces.front().rank, shape_text(p.global_shape), r);
          LOOM_CHECK(c.dtype == dtype,
                     "{} tensor '{}' is saved as {} by rank {} but as {} by rank {}; every piece "
                     "of a tensor must have its dtype", kind, p.name, c.dtype,
                     c.pieces.front().rank, dtype, r);
          c.pieces.push_back(std::move(st));
        }
      }
      LOOM_CHECK(errors.empty(), "{}", errors);
      auto quoted = [](const std::string& x) {
        return nlohmann::json(x).dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
      };
      std::string index = fmt::format("{{\"format\": \"{}\", \"world_size\": {},\n \"files\": [",
                                      kFormat, world_);
      for (size_t i = 0; i < files.size(); ++i)
        index += fmt::format("{}\n  {{\"shard\": {}, \"blocks\": {}}}", i ? "," : "",
                             quoted(files[i]), quoted(blocks_name(files[i])));
      index += "],\n \"tensors\": {";
      bool first_kind = true;
      for (auto& [kind, names] : by_kind) {
        index += fmt::format("{}\n  {}: {{", first_kind ? "" : ",", quoted(kind));
        first_kind = false;
        bool first_name = true;
        for (auto& [name, covered] : names) {
          const auto& c = covered;  // a plain reference: clang 14 cannot capture a binding
          std::vector<PieceSpec> specs;
          for (const Stored& st : c.pieces) specs.push_back(st.spec);
          check_coverage(kind, name, c.shape, specs,
                         [&](size_t i) {
                           return fmt::format("rank {} ('{}')", c.pieces[i].rank,
                                              files[size_t(c.pieces[i].rank)]);
                         },
                         "every element of every tensor must be saved by exactly one rank "
                         "(check the tp slices and ZeRO ranges given to ShardedWriter::add)");
          index += fmt::format("{}\n   {}: {{\"shape\": {}, \"dtype\": {}, \"pieces\": [",
                               first_name ? "" : ",", quoted(name), nlohmann::json(c.shape).dump(),
                               quoted(c.dtype));
          first_name = false;
          for (size_t i = 0; i < c.pieces.size(); ++i) {
            const Stored& st = c.pieces[i];
            index += fmt::format(
                "{}\n    {{\"file\": {}, \"tensor\": {}, \"offset\": {}, \"shard_dim\": {}, "
                "\"shard_start\": {}, \"shard_len\": {}, \"lo\": {}, \"hi\": {}}}",
                i ? "," : "", st.rank, quoted(st.tensor), st.offset, st.spec.shard_dim,
                st.spec.shard_start, st.spec.shard_len, st.spec.lo, st.spec.hi);
          }
          index += "]}";
        }
        index += "}";
      }
      index += "}}\n";
      sums["index.json"] = write_file(steps, staging + "/index.json", index);
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

}  // namespace loom::checkpoint
