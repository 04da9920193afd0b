// checkpoint/sharded.h: sharded, streaming checkpoints: every rank writes its own pieces of the
// logical tensors, any layout reads any other layout's checkpoint.
//
// Glossary: kind a family of tensors with the same names ("weights", "m", "v"); piece one rank's
// part of one logical tensor; w ranks in the writer's group, r this rank.
//
// A checkpoint directory (see commit.h for how it is committed):
//   shard-RRRRR-of-WWWWW.safetensors  rank r's pieces, one 1-D tensor per piece in the tensor's
//                                     dtype, named "<kind>/<tensor>#<k>" (a valid safetensors
//                                     file)
//   shard-RRRRR-of-WWWWW.blocks.json  {"file", "bytes", "block_bytes": 1048576, "sha256": [one
//                                     per 1 MiB block of the shard]}
//   index.json      {"format": "loom-sharded-1", "world_size": w,
//                    "files": [{"shard": "shard-...safetensors", "blocks": "shard-...blocks.json"}],
//                    "tensors": {kind: {tensor: {"shape": [...], "dtype": "F32", "pieces": [
//                      {"file": i, "tensor": "<kind>/<tensor>#<k>", "offset": byte offset of
//                       element lo in the file, "shard_dim", "shard_start", "shard_len", "lo",
//                       "hi"}]}}}}
//   config.toml, trainer_state.json   as given to commit()
//   checksums.json  SHA-256 and size of every other file (extra files included)
//   ...             whatever the `extra` callback wrote (e.g. tokenizer/)
// Nothing here knows about models: callers describe their tensors with PieceSpec.
//
// Storage dtypes. A tensor is stored as F32, BF16, F16 (safetensors names) or I8; every piece
// of a tensor has the tensor's dtype. An I8 tensor is 2-D, int8 per output row: W[n, k] =
// scale[n] * q[n, k] (kernels/cpu/weight_matmul.h), with its scales in the F32 tensor
// "<tensor>:row_scales" (shape [rows]) of the same kind, saved like any other tensor and
// attached to it by the reader (names() does not list it). The trainer writes F32 only;
// `loom convert` keeps a source's F16 / BF16, `loom quantize` writes I8. The format string
// stays "loom-sharded-1": readers before dtypes refuse any tensor whose dtype is not F32 with
// an error naming it (they check the index's and the flat file's dtype), so no old reader can
// misread a new file, and every F32 checkpoint reads as before. The same holds for the
// pre-sharding flat format's model.safetensors (tensors in these dtypes, scales beside them).
// Readers convert: read() gives f32 (BF16 / F16 widened exactly, I8 dequantized as
// scale * q in f32); read_int8_rows() gives an I8 tensor's bytes and scales as stored. A dtype
// the reader does not know is an error naming it and the tensor.
//
// How a training executor uses it (any of dp, tp, pp, ZeRO 1/2/3): every rank makes a
// ShardedWriter on the world group and adds, per kind, one piece for each tensor it holds: its tp
// slice (model::ParamSpec shard_dim / shard_start, shard_len = local shape[shard_dim]) and,
// under ZeRO, its dp share [lo, hi) of that slice. A tensor replicated over tp or dp is added by
// one replica only (e.g. tp rank 0 and dp rank 0), otherwise coverage validation fails naming it;
// each pipeline stage adds only its own tensors. To resume, every rank opens a ShardedReader on
// the run or checkpoint directory and reads the slices it holds now, whatever layout wrote them.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "checkpoint/commit.h"
#include "comm/process_group.h"
#include "core/dtype.h"
#include "core/param_spec.h"

namespace loom::checkpoint {

// Suffix of the F32 row-scale tensor that accompanies an I8 tensor (see above).
inline constexpr const char* kRowScalesSuffix = ":row_scales";

// One rank's piece of a logical tensor of shape `global_shape`.
// The tp slice it belongs to: shard_dim -1 the whole tensor, 0 rows [shard_start,
// shard_start+shard_len) (dimension 0; the rest of the dimensions whole), 1 columns of a 2-D
// tensor. The local slice is row-major; the piece is its elements [lo, hi) (a ZeRO share may be
// any sub-range; the whole slice is lo = 0, hi = its element count). shard_len is ignored for
// shard_dim -1.
struct PieceSpec {
  std::string name;
  std::vector<int64_t> global_shape;
  int shard_dim = -1;
  int64_t shard_start = 0, shard_len = 0;
  int64_t lo = 0, hi = 0;
};

// The element count of the local slice `p` describes (whole tensor, rows or columns).
int64_t slice_numel(const PieceSpec& p);
// A whole tensor as one piece.
PieceSpec whole_tensor(const std::string& name, const std::vector<int64_t>& shape);
// Elements [lo, hi) of the local slice a parameter spec (core/param_spec.h) describes.
PieceSpec piece_of(const ParamSpec& spec, int64_t lo, int64_t hi);

struct WriterOptions {
  int keep = 0;       // keep the newest `keep` checkpoints in the directory (0: all)
  int64_t step = -1;  // the step the checkpoint is named after; < 0: trainer_state["step"]
};

struct CommitResult {
  std::string dir;        // the committed checkpoint, e.g. DIR/step-00000012
  int64_t steps = 0;      // protocol steps this rank took (see commit.h, fault injection)
  uint64_t shard_bytes = 0;  // bytes of this rank's shard file
};

// Collective over `group` (a null/invalid group: a single process, rank 0 of 1).
class ShardedWriter {
 public:
  ShardedWriter(std::string checkpoint_dir, const comm::ProcessGroup* group,
                WriterOptions options = {});

  // Records a piece; `data` (hi - lo floats) is not copied and must stay valid and unchanged
  // until commit() returns. Throws naming the tensor if the spec is inconsistent (range outside
  // the slice, slice outside the tensor, shard_dim 1 of a tensor that is not 2-D).
  void add(const std::string& kind, const PieceSpec& piece, const float* data);
  // The same for a piece stored as `dtype` (F32, BF16, F16 or I8; `data` holds hi - lo
  // elements of it). Every piece of a tensor must have the same dtype (checked at commit); an
  // I8 tensor needs its "<tensor>:row_scales" F32 tensor added too.
  void add(const std::string& kind, const PieceSpec& piece, const void* data, DType dtype);

  // Every rank writes and fsyncs its shard, streamed from the recorded pointers (this adds at
  // most a fixed 4 MiB buffer to any rank); rank 0 then validates that every logical tensor of
  // every kind is covered exactly once (no gap, no overlap; all ranks' pieces together), writes
  // index.json, config.toml, trainer_state.json, runs `extra(staging_dir)` (files it writes
  // there are fsynced and checksummed too), writes checksums.json and commits (commit.h). An
  // error on any rank throws loom::Error on every rank, naming the rank(s) and the file; the
  // previous checkpoint is left as it was and nothing staged remains. Call once.
  CommitResult commit(const std::string& config_toml, const nlohmann::json& trainer_state,
                      const std::function<void(const std::string& staging_dir)>& extra = {});

 private:
  struct Piece {
    std::string kind;
    PieceSpec spec;
    const void* data;
    DType dtype;
  };
  std::string dir_;
  comm::ProcessGroup group_;
  int rank_ = 0, world_ = 1;
  WriterOptions options_;
  std::vector<Piece> pieces_;
  bool committed_ = false;
};

struct ReaderOptions {
  // Verify checksums before using any byte: a shard block by block (1 MiB blocks, each hashed
  // the first time a read touches it, so a rank reads little more than the ranges it needs),
  // other files whole. false: sizes are still checked.
  bool verify_checksums = true;
};

class ShardedReader {
 public:
  // `path`: a checkpoint directory, a directory of checkpoints (its newest committed one), or a
  // run directory holding ckpt/ (see find_checkpoint in commit.h). The pre-sharding format
  // (model.safetensors [+ optimizer.safetensors], kinds "weights", "m", "v") loads too. Checks
  // that every file checksums.json lists exists with its size, and verifies index.json,
  // config.toml and trainer_state.json. Throws naming the file and the problem.
  explicit ShardedReader(const std::string& path, ReaderOptions options = {});
  ~ShardedReader();
  ShardedReader(const ShardedReader&) = delete;
  ShardedReader& operator=(const ShardedReader&) = delete;

  const std::string& dir() const { return dir_; }  // the checkpoint directory actually read
  bool legacy_format() const { return legacy_; }
  const std::string& config_toml() const { return config_toml_; }
  const nlohmann::json& trainer_state() const { return trainer_state_; }
  // The optimizer step the pre-sharding format stores in optimizer.safetensors; -1 if none.
  int64_t legacy_optimizer_step() const { return legacy_step_; }

  bool has(const std::string& kind) const;
  bool has(const std::string& kind, const std::string& name) const;
  std::vector<std::string> names(const std::string& kind) const;
  // Throws naming the kind and tensor if absent.
  const std::vector<int64_t>& shape(const std::string& kind, const std::string& name) const;
  // The stored dtype (F32, BF16, F16 or I8). Throws naming the kind and tensor if absent.
  DType dtype(const std::string& kind, const std::string& name) const;

  // Fills dst (want.hi - want.lo floats) with elements [want.lo, want.hi) of the local slice
  // `want` describes, reading only the stored pieces' byte ranges that overlap it. Any layout
  // loads any other. Throws naming the tensor, the file and the first missing range if the
  // stored pieces do not cover it, or if want's global_shape differs from the stored one.
  // BF16 and F16 are widened exactly; I8 is dequantized (scale[row] * q, in f32).
  void read(const std::string& kind, const PieceSpec& want, float* dst) const;
  // An I8 tensor as stored: q (want.hi - want.lo int8) and the scales of the rows the elements
  // are in (one per local row: want.lo and want.hi must be whole rows of the local slice; a
  // column slice gets the scales of its whole rows). Throws naming the tensor and its dtype if
  // it is not I8.
  void read_int8_rows(const std::string& kind, const PieceSpec& want, int8_t* q,
                      float* row_scales) const;

  // Hashes every file checksums.json lists (the pre-sharding CheckpointReader's behaviour).
  void verify_all() const;

 private:
  struct File;
  struct StoredPiece {
    int file = 0;
    std::string tensor;  // its name inside the safetensors file
    uint64_t offset = 0;
    PieceSpec spec;
  };
  struct Entry {
    std::vector<int64_t> shape;
    DType dtype = DType::f32;
    std::vector<StoredPiece> pieces;
    const Entry* scales = nullptr;  // I8: its row scales (in scales_)
  };
  File& open_file(int i) const;
  // Bytes [offset, offset+n) of the file, each block verified against its checksum before its
  // first use (files without block checksums: the whole file, once).
  void read_bytes(File& f, uint64_t offset, size_t n, void* dst) const;
  void load_legacy();
  void load_index();
  // Moves every "<t>:row_scales" entry to scales_ and attaches it to its I8 tensor; checks
  // that every I8 tensor is 2-D with F32 scales of its row count, and that no scales are
  // left without their tensor.
  void attach_row_scales();
  const Entry& entry(const std::string& kind, const std::string& name) const;
  // Elements [want.lo, want.hi) of the entry's local slice, as stored (dtype_size bytes each).
  void read_raw(const std::string& kind, const Entry& e, const PieceSpec& want, void* dst) const;
  // The row scales of the global rows [r0, r1) of I8 entry e.
  void read_row_scales(const std::string& kind, const std::string& name, const Entry& e,
                       int64_t r0, int64_t r1, float* dst) const;

  std::string dir_;
  ReaderOptions options_;
  bool legacy_ = false;
  std::string config_toml_;
  nlohmann::json trainer_state_;
  int64_t legacy_step_ = -1;
  std::map<std::string, FileDigest> checksums_;  // file (relative) -> SHA-256, size
  std::vector<std::unique_ptr<File>> files_;
  mutable std::vector<char> block_buf_;  // one block (1 MiB) for verification
  std::map<std::string, std::map<std::string, Entry>> tensors_;  // kind -> name -> entry
  std::map<std::string, std::map<std::string, Entry>> scales_;   // kind -> I8 tensor -> scales
};

}  // namespace loom::checkpoint
