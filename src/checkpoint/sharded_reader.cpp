// The sharded reader (sharded.h): finds the checkpoint, checks its files, plans each read from
// the stored pieces that overlap the wanted slice, and verifies every byte it reads.
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>

#include "checkpoint/commit.h"
#include "checkpoint/pieces.h"
#include "checkpoint/safetensors.h"
#include "checkpoint/sharded.h"
#include "core/error.h"

namespace fs = std::filesystem;

namespace loom::checkpoint {

using namespace detail;

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
      LOOM_CHECK(is_stored_dtype(info.dtype) && (kind == "weights" || info.dtype == DType::f32),
                 "'{}': tensor '{}' is {}, but checkpoints hold {}", st.path(), tname,
                 dtype_name(info.dtype),
                 kind == "weights" ? "F32, BF16, F16 or I8 weights" : "F32 optimizer moments");
      Entry& e = tensors_[kind][name];
      e.shape = info.shape;
      e.dtype = info.dtype;
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
  attach_row_scales();
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
        const std::string dt = t.contains("dtype") ? t.at("dtype").get<std::string>() : "F32";
        try {
          e.dtype = dtype_from_name(dt);
        } catch (const Error& err) {
          LOOM_FAIL("'{}': {} tensor '{}': {}", path, kind, name, err.what());
        }
        LOOM_CHECK(is_stored_dtype(e.dtype), "'{}': {} tensor '{}' has dtype {}; checkpoints "
                   "store F32, BF16, F16 or I8", path, kind, name, dt);
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
  attach_row_scales();
}

void ShardedReader::attach_row_scales() {
  const std::string where = legacy_ ? dir_ : dir_ + "/index.json";
  const std::string suffix = kRowScalesSuffix;
  for (auto& [kind, names] : tensors_) {
    for (auto it = names.begin(); it != names.end();) {
      const std::string& n = it->first;
      if (n.size() > suffix.size() && n.ends_with(suffix)) {
        const std::string base = n.substr(0, n.size() - suffix.size());
        auto b = names.find(base);
        LOOM_CHECK(b != names.end() && b->second.dtype == DType::i8,
                   "'{}': {} tensor '{}' holds row scales but there is no I8 tensor '{}' for "
                   "them", where, kind, n, base);
        LOOM_CHECK(it->second.dtype == DType::f32 &&
                       it->second.shape == std::vector<int64_t>{b->second.shape.empty()
                                                                    ? -1
                                                                    : b->second.shape[0]},
                   "'{}': {} tensor '{}' is {} {}, but the row scales of I8 tensor '{}' (shape "
                   "{}) must be F32 [{}]", where, kind, n, dtype_name(it->second.dtype),
                   shape_text(it->second.shape), base, shape_text(b->second.shape),
                   b->second.shape.empty() ? 0 : b->second.shape[0]);
        scales_[kind][base] = std::move(it->second);
        it = names.erase(it);
      } else {
        ++it;
      }
    }
    for (auto& [n, e] : names) {
      if (e.dtype != DType::i8) continue;
      LOOM_CHECK(e.shape.size() == 2, "'{}': {} tensor '{}' is I8 with shape {}; int8 tensors "
                 "are 2-D (one scale per row)", where, kind, n, shape_text(e.shape));
      auto sc = scales_[kind].find(n);
      LOOM_CHECK(sc != scales_[kind].end(), "'{}': {} tensor '{}' is I8 but its row scales "
                 "'{}{}' are missing", where, kind, n, n, suffix);
      e.scales = &sc->second;
    }
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
  return entry(kind, name).shape;
}

DType ShardedReader::dtype(const std::string& kind, const std::string& name) const {
  return entry(kind, name).dtype;
}

const ShardedReader::Entry& ShardedReader::entry(const std::string& kind,
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
  return e->second;
}

void ShardedReader::read(const std::string& kind, const PieceSpec& want, float* dst) const {
  const Entry& e = entry(kind, want.name);
  switch (e.dtype) {
    case DType::f32:
      read_raw(kind, e, want, dst);
      return;
    case DType::bf16:
    case DType::f16: {
      // Through a bounded staging buffer (a quarter of dst's bytes would do, but a whole
      // tensor need not be held twice): 2-byte elements, widened exactly.
      const int64_t n = want.hi - want.lo, chunk = int64_t(1) << 20;
      std::vector<uint16_t> raw(size_t(std::min(n, chunk)));
      for (int64_t a = 0; a < n; a += chunk) {
        PieceSpec part = want;
        part.lo = want.lo + a;
        part.hi = want.lo + std::min(n, a + chunk);
        read_raw(kind, e, part, raw.data());
        const size_t m = size_t(part.hi - part.lo);
        if (e.dtype == DType::bf16)
          convert_bf16_to_f32(reinterpret_cast<const bf16*>(raw.data()), dst + a, m);
        else
          convert_f16_to_f32(raw.data(), dst + a, m);
      }
      return;
    }
    case DType::i8: {
      // Dequantize scale[row] * q: the rows of the local slice that [lo, hi) touches.
      const int64_t n = want.hi - want.lo;
      const Grid g(e.shape);
      const int64_t local_cols = want.shard_dim == 1 ? want.shard_len : g.cols;
      const int64_t row0 = want.shard_dim == 0 ? want.shard_start : 0;
      std::vector<int8_t> q(static_cast<size_t>(n));
      read_raw(kind, e, want, q.data());
      if (n == 0 || local_cols == 0) return;
      const int64_t r0 = want.lo / local_cols, r1 = (want.hi - 1) / local_cols + 1;
      std::vector<float> sc(size_t(r1 - r0));
      read_row_scales(kind, want.name, e, row0 + r0, row0 + r1, sc.data());
      for (int64_t i = 0; i < n; ++i)
        dst[i] = sc[size_t((want.lo + i) / local_cols - r0)] * float(q[size_t(i)]);
      return;
    }
    default:
      break;
  }
  LOOM_FAIL("checkpoint '{}': {} tensor '{}' is {}, which the reader cannot convert to f32",
            dir_, kind, want.name, dtype_name(e.dtype));
}

void ShardedReader::read_row_scales(const std::string& kind, const std::string& name,
                                    const Entry& e, int64_t r0, int64_t r1, float* dst) const {
  LOOM_ASSERT(e.scales != nullptr, "I8 tensor '{}' without scales", name);
  PieceSpec rows = whole_tensor(name + kRowScalesSuffix, e.scales->shape);
  rows.lo = r0;
  rows.hi = r1;
  read_raw(kind, *e.scales, rows, dst);
}

void ShardedReader::read_int8_rows(const std::string& kind, const PieceSpec& want, int8_t* q,
                                   float* row_scales) const {
  const Entry& e = entry(kind, want.name);
  LOOM_CHECK(e.dtype == DType::i8, "checkpoint '{}': {} tensor '{}' is {}, not int8 (I8)", dir_,
             kind, want.name, dtype_name(e.dtype));
  const Grid g(e.shape);
  const int64_t local_cols = want.shard_dim == 1 ? want.shard_len : g.cols;
  LOOM_CHECK(local_cols > 0 && want.lo % local_cols == 0 && want.hi % local_cols == 0,
             "checkpoint '{}': {} tensor '{}': elements [{}, {}) are not whole rows of {} "
             "elements", dir_, kind, want.name, want.lo, want.hi, local_cols);
  read_raw(kind, e, want, q);
  const int64_t row0 = want.shard_dim == 0 ? want.shard_start : 0;
  if (want.hi > want.lo)
    read_row_scales(kind, want.name, e, row0 + want.lo / local_cols, row0 + want.hi / local_cols,
                    row_scales);
}

void ShardedReader::read_raw(const std::string& kind, const Entry& e, const PieceSpec& want,
                             void* dst_raw) const {
  const std::vector<int64_t>& stored_shape = e.shape;
  LOOM_CHECK(want.global_shape == stored_shape,
             "checkpoint '{}': {} tensor '{}' has shape {} but {} was asked for (a checkpoint "
             "of another model?)", dir_, kind, want.name, shape_text(stored_shape),
             shape_text(want.global_shape));
  check_piece("ShardedReader::read", kind, want);
  if (want.hi == want.lo) return;
  char* dst = static_cast<char*>(dst_raw);
  const uint64_t es = dtype_size(e.dtype);
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
    LOOM_CHECK(info.dtype == e.dtype && shape_numel(info.shape) == p.spec.hi - p.spec.lo &&
                   f.st->data_start() + info.begin == p.offset,
               "'{}' and '{}' disagree about '{}': the index says {}, {} elements at byte {}, "
               "the file's header {}, {} elements at byte {} (files from different saves?)",
               index, f.path, p.tensor, dtype_name(e.dtype), p.spec.hi - p.spec.lo, p.offset,
               dtype_name(info.dtype), shape_numel(info.shape), f.st->data_start() + info.begin);
    read_bytes(f, p.offset + uint64_t(c.src) * es, size_t(c.len) * es, dst + c.dst * es);
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
