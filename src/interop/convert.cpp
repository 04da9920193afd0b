// checkpoint/interop.cpp: CodeGeeX / Hugging Face GPT-2 import (the export: export_hf.cpp).
//
// Each importer builds the loom config from the source's own description (tensor shapes, and
// config.json or Megatron args), checks every source tensor's shape against it, and declares
// how each loom parameter is filled; the save then produces the parameters one at a time (in
// f32, stored in the source's dtype or the one asked for), so the peak is one parameter plus
// one source tensor; the source file is never loaded whole.
#include "interop/convert.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <functional>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "interop/model_checkpoint.h"
#include "checkpoint/safetensors.h"
#include "checkpoint/torch_file.h"
#include "core/config_file.h"
#include "core/error.h"
#include "core/log.h"
#include "model/params.h"

namespace fs = std::filesystem;

namespace loom::interop {

using namespace loom::checkpoint;  // the model-free formats and commit protocol below


namespace {

// A JSON or text file the user named (errors say which file and why it cannot be read).
std::string read_text(const std::string& path) { return read_config_file(path, "file"); }

std::string shape_text(const Shape& s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}

// A source of named tensors readable one at a time as f32.
class TensorSource {
 public:
  virtual ~TensorSource() = default;
  const std::map<std::string, Shape>& shapes() const { return shapes_; }
  virtual void read_f32(const std::string& name, float* dst) const = 0;
  virtual std::string dtype_of(const std::string& name) const = 0;

 protected:
  std::map<std::string, Shape> shapes_;
};

// torch.save zip(s). `strip` removes a leading "module." style prefix.
class TorchSource final : public TensorSource {
 public:
  void add_file(const std::string& path, std::vector<std::string>& warnings) {
    files_.push_back(std::make_unique<TorchFile>(path));
    const TorchFile& f = *files_.back();
    std::map<std::string, TorchTensorRef> t;
    std::vector<std::string> skipped;
    flatten_state_dict(f.root(), "", t, skipped);
    for (const std::string& s : skipped) {
      warnings.push_back("'" + path + "': skipped non-tensor entry " + s);
      // Megatron's args: remember it for fields the shapes cannot tell (heads).
      if (s.find("argparse.Namespace") != std::string::npos) find_args(f.root());
    }
    for (auto& [name, ref] : t) {
      Shape s(ref.shape.begin(), ref.shape.end());
      shapes_[name] = s;
      refs_[name] = {files_.size() - 1, ref};
    }
  }
  void read_f32(const std::string& name, float* dst) const override {
    const auto& [fi, ref] = refs_.at(name);
    files_[fi]->read_f32(ref, dst);
  }
  std::string dtype_of(const std::string& name) const override {
    return torch_dtype_name(refs_.at(name).second.dtype);
  }
  int64_t args_int(const std::string& key) const {
    if (!args_ || !args_->state || args_->state->kind != PyValue::Kind::dict) return 0;
    for (const auto& [k, v] : args_->state->entries)
      if (k->kind == PyValue::Kind::string && k->s == key && v->kind == PyValue::Kind::integer)
        return v->i;
    return 0;
  }

 private:
  void find_args(const PyRef& d) {
    for (const auto& [k, v] : d->entries) {
      if (v->kind == PyValue::Kind::object && v->s == "argparse.Namespace") args_ = v;
      else if (v->kind == PyValue::Kind::dict) find_args(v);
    }
  }
  std::vector<std::unique_ptr<TorchFile>> files_;
  std::map<std::string, std::pair<size_t, TorchTensorRef>> refs_;
  PyRef args_;
};

// CodeGeeX tensor-parallel shards (mp_rank_XX_model_states.pt, written by CodeGeeX's
// convert_ckpt_parallel.py with torch.chunk): the split dimension of each tensor by name. Rows
// (0): word and top-query tables, q/k/v weights and biases, dense_h_to_4h weight and bias;
// columns (1): attention.dense and dense_4h_to_h weights; replicated (-1): layernorms, the
// position table, attention.dense and dense_4h_to_h biases.
int codegeex_tp_split_dim(const std::string& name) {
  auto has = [&](const char* s) { return name.find(s) != std::string::npos; };
  if (has("word_embeddings") || has("top_query_embeddings")) return 0;
  if (!has(".transformer.") || has("layernorm")) return -1;
  if (has(".weight")) {
    if (has("attention.")) return has("attention.dense") ? 1 : 0;
    return has("dense_h_to_4h") ? 0 : 1;
  }
  if (has("4h_to_h") || has("attention.dense")) return -1;
  return 0;
}

// The shards of one tp-split CodeGeeX checkpoint seen as the whole model: shapes concatenated on
// each tensor's split dimension, reads assembled shard by shard (one shard's slice in memory).
class TpMergedSource final : public TensorSource {
 public:
  explicit TpMergedSource(std::vector<std::unique_ptr<TorchSource>> shards)
      : shards_(std::move(shards)) {
    for (auto& [name, s0] : shards_[0]->shapes()) {
      const int d = codegeex_tp_split_dim(name);
      Shape merged = s0;
      for (size_t r = 1; r < shards_.size(); ++r) {
        auto it = shards_[r]->shapes().find(name);
        LOOM_CHECK(it != shards_[r]->shapes().end(), "tp shard {} lacks tensor '{}'", r, name);
        const Shape& sr = it->second;
        bool ok = sr.size() == s0.size() && (d < 0 || size_t(d) < sr.size());
        for (size_t k = 0; ok && k < sr.size(); ++k)
          if (int(k) != d && sr[k] != s0[k]) ok = false;
        LOOM_CHECK(ok && (d >= 0 || sr == s0), "tp shard {}: tensor '{}' has shape {}, shard 0 "
                   "has {} (split dim {})", r, name, shape_text(sr), shape_text(s0), d);
        if (d >= 0) merged[size_t(d)] += sr[size_t(d)];
      }
      shapes_[name] = merged;
    }
    for (size_t r = 1; r < shards_.size(); ++r)
      LOOM_CHECK(shards_[r]->shapes().size() == shards_[0]->shapes().size(),
                 "tp shard {} has {} tensors, shard 0 has {}", r, shards_[r]->shapes().size(),
                 shards_[0]->shapes().size());
  }
  void read_f32(const std::string& name, float* dst) const override {
    const int d = codegeex_tp_split_dim(name);
    if (d < 0) return shards_[0]->read_f32(name, dst);
    const Shape& full = shapes_.at(name);
    const int64_t cols = full.size() > 1 ? full[1] : 1;
    int64_t at = 0;  // rows (d = 0) or columns (d = 1) placed so far
    std::vector<float> tmp;
    for (const auto& sh : shards_) {
      const Shape& s = sh->shapes().at(name);
      if (d == 0) {
        sh->read_f32(name, dst + at * cols);
        at += s[0];
      } else {
        tmp.resize(size_t(shape_numel(s)));
        sh->read_f32(name, tmp.data());
        for (int64_t r = 0; r < s[0]; ++r)
          std::memcpy(dst + r * cols + at, tmp.data() + r * s[1], size_t(s[1]) * sizeof(float));
        at += s[1];
      }
    }
  }
  std::string dtype_of(const std::string& name) const override { return shards_[0]->dtype_of(name); }
  int64_t args_int(const std::string& key) const { return shards_[0]->args_int(key); }

 private:
  std::vector<std::unique_ptr<TorchSource>> shards_;
};

// Hugging Face safetensors (F32, F16, BF16, F64), validated as the safetensors spec says:
// header at most 100 MB of JSON, tensors tiling the data section without gaps or overlaps, sizes
// matching dtype x shape, and the file holding every byte the header claims.
class SafetensorsSource final : public TensorSource {
 public:
  ~SafetensorsSource() override {
    for (int fd : fds_) ::close(fd);
  }
  void add_file(const std::string& path) {
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    LOOM_CHECK(fd >= 0, "cannot open '{}': {}", path, std::strerror(errno));
    fds_.push_back(fd);
    paths_.push_back(path);
    const uint64_t size = uint64_t(::lseek(fd, 0, SEEK_END));
    LOOM_CHECK(size >= 8, "'{}': {} bytes is too short for a safetensors file", path, size);
    uint64_t n = 0;
    pread_exact(fd, &n, 8, 0, path);
    LOOM_CHECK(n <= 100000000 && n <= size - 8,
               "'{}': safetensors header claims {} bytes but the file holds {} after the length "
               "field (limit 100000000): truncated or not safetensors", path, n, size - 8);
    std::string hdr(size_t(n), '\0');
    pread_exact(fd, hdr.data(), n, 8, path);
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(hdr);
    } catch (const std::exception& e) {
      LOOM_FAIL("'{}': safetensors header is not valid JSON: {}", path, e.what());
    }
    LOOM_CHECK(j.is_object(), "'{}': safetensors header is not a JSON object", path);
    const uint64_t data_size = size - 8 - n;
    std::vector<std::pair<uint64_t, uint64_t>> ranges;
    for (auto& [name, v] : j.items()) {
      if (name == "__metadata__") continue;
      LOOM_CHECK(v.is_object() && v.contains("dtype") && v["dtype"].is_string() &&
                     v.contains("shape") && v["shape"].is_array() && v.contains("data_offsets") &&
                     v["data_offsets"].is_array() && v["data_offsets"].size() == 2,
                 "'{}': tensor '{}' lacks dtype, shape or data_offsets", path, name);
      const std::string dt = v["dtype"].get<std::string>();
      size_t es = dt == "F32" ? 4 : dt == "F16" || dt == "BF16" ? 2 : dt == "F64" ? 8 : 0;
      LOOM_CHECK(es > 0, "'{}': tensor '{}' has dtype '{}'; loom converts floating weights "
                 "stored as F32, F16, BF16 or F64", path, name, dt);
      Shape s;
      uint64_t numel = 1;
      for (auto& d : v["shape"]) {
        LOOM_CHECK(d.is_number_unsigned() && d.get<uint64_t>() < (uint64_t(1) << 40),
                   "'{}': tensor '{}' has an invalid shape", path, name);
        s.push_back(int64_t(d.get<uint64_t>()));
        numel *= d.get<uint64_t>();
        LOOM_CHECK(numel < (uint64_t(1) << 48), "'{}': tensor '{}' is too large", path, name);
      }
      auto& o = v["data_offsets"];
      LOOM_CHECK(o[0].is_number_unsigned() && o[1].is_number_unsigned(),
                 "'{}': tensor '{}' has invalid data_offsets", path, name);
      const uint64_t b = o[0].get<uint64_t>(), e = o[1].get<uint64_t>();
      LOOM_CHECK(b <= e && e - b == numel * es,
                 "'{}': tensor '{}' spans {} bytes but dtype {} and shape {} need {}", path, name,
                 e - b, dt, shape_text(s), numel * es);
      LOOM_CHECK(e <= data_size, "'{}': tensor '{}' ends at byte {} of the data section but the "
                 "file holds only {} data bytes: truncated", path, name, e, data_size);
      LOOM_CHECK(!shapes_.count(name), "'{}': tensor '{}' appears in two files", path, name);
      ranges.emplace_back(b, e);
      shapes_[name] = s;
      info_[name] = {fds_.size() - 1, 8 + n + b, numel, dt};
    }
    std::sort(ranges.begin(), ranges.end());
    uint64_t at = 0;
    for (auto& [b, e] : ranges) {
      LOOM_CHECK(b == at, "'{}': tensor data overlaps or leaves a gap at byte {} (safetensors "
                 "requires tensors to tile the data section)", path, at);
      at = e;
    }
  }
  void read_f32(const std::string& name, float* dst) const override {
    const Info& i = info_.at(name);
    const size_t es = i.dtype == "F32" ? 4 : i.dtype == "F64" ? 8 : 2;
    std::vector<uint8_t> buf;
    for (uint64_t k = 0; k < i.numel;) {
      const uint64_t c = std::min<uint64_t>(i.numel - k, uint64_t(1) << 22);
      buf.resize(size_t(c * es));
      pread_exact(fds_[i.file], buf.data(), buf.size(), i.offset + k * es, paths_[i.file]);
      for (uint64_t q = 0; q < c; ++q) {
        const uint8_t* s = buf.data() + q * es;
        float& out = dst[k + q];
        if (es == 4) std::memcpy(&out, s, 4);
        else if (es == 8) { double d; std::memcpy(&d, s, 8); out = float(d); }
        else if (i.dtype == "F16") out = f16_to_f32(uint16_t(s[0] | s[1] << 8));
        else { uint32_t u = uint32_t(s[0] | s[1] << 8) << 16; std::memcpy(&out, &u, 4); }
      }
      k += c;
    }
  }
  std::string dtype_of(const std::string& name) const override { return info_.at(name).dtype; }

 private:
  static void pread_exact(int fd, void* dst, uint64_t n, uint64_t off, const std::string& path) {
    auto* p = static_cast<char*>(dst);
    while (n > 0) {
      ssize_t r = ::pread(fd, p, size_t(std::min<uint64_t>(n, 1u << 30)), off_t(off));
      if (r < 0 && errno == EINTR) continue;
      LOOM_CHECK(r > 0, "'{}': read at offset {} failed: {}", path, off,
                 r < 0 ? std::strerror(errno) : "unexpected end of file");
      p += r;
      n -= uint64_t(r);
      off += uint64_t(r);
    }
  }
  struct Info {
    size_t file;
    uint64_t offset, numel;
    std::string dtype;
  };
  std::vector<int> fds_;
  std::vector<std::string> paths_;
  std::map<std::string, Info> info_;
};

int64_t round_up(int64_t v, int64_t m) { return m <= 1 ? v : (v + m - 1) / m * m; }

// Maps source tensors to loom parameters. Nothing is read when a mapping is declared: each
// declaration records how to fill one loom parameter, and the save runs it when that
// parameter's turn to be written comes (save_checkpoint_streamed), so a conversion holds one
// source tensor and one parameter in memory at a time, never the model.
struct Writer {
  using Fill = std::function<void(float* dst)>;  // fills a zeroed parameter buffer
  const TensorSource& src;
  const model::ParamLayout& layout;
  std::set<std::string> used;
  std::map<std::string, Fill> fills;  // loom parameter -> how to fill it
  std::map<std::string, std::string> source_of;  // loom parameter -> its source tensor

  const Shape& expect(const std::string& name, const Shape& want) {
    auto it = src.shapes().find(name);
    LOOM_CHECK(it != src.shapes().end(), "source tensor '{}' is missing", name);
    LOOM_CHECK(it->second == want, "source tensor '{}' has shape {} but the model config implies "
               "{}", name, shape_text(it->second), shape_text(want));
    used.insert(name);
    return it->second;
  }
  void declare(const std::string& dst, const std::string& source, Fill fill) {
    (void)layout.find(dst);  // throws naming it if the layout has no such parameter
    LOOM_CHECK(fills.emplace(dst, std::move(fill)).second, "internal: '{}' mapped twice", dst);
    source_of[dst] = source;
  }
  // The stored dtype of a loom parameter: `forced` if given, else its source's (F16 and BF16
  // kept, anything else F32).
  DType storage(const model::ParamSpec& s, const std::string& forced) const {
    if (!forced.empty()) return storage_dtype_from_name(forced);
    const std::string d = src.dtype_of(source_of.at(s.name));
    if (d == "F16" || d == "float16") return DType::f16;
    if (d == "BF16" || d == "bfloat16") return DType::bf16;
    return DType::f32;
  }
  // Same layout: straight copy (rows beyond the source's, if any, stay zero).
  void copy(const std::string& name, const Shape& want, const std::string& dst) {
    expect(name, want);
    LOOM_CHECK(shape_numel(want) <= layout.find(dst).numel, "internal: '{}' larger than '{}'",
               name, dst);
    declare(dst, name, [this, name](float* d) { src.read_f32(name, d); });
  }
  // Conv1D (in, out) columns [c0, c0 + n) -> loom (n, in).
  void conv1d(const std::string& name, const Shape& want, int64_t c0, int64_t n,
              const std::string& dst) {
    expect(name, want);
    const int64_t in = want[0], out = want[1];
    declare(dst, name, [this, name, in, out, c0, n](float* d) {
      std::vector<float> tmp(size_t(in * out));  // (in, out)
      src.read_f32(name, tmp.data());
      for (int64_t r = 0; r < n; ++r)
        for (int64_t i = 0; i < in; ++i) d[r * in + i] = tmp[size_t(i * out + c0 + r)];
    });
  }
  void vec_slice(const std::string& name, int64_t len, int64_t c0, int64_t n,
                 const std::string& dst) {
    expect(name, {len});
    declare(dst, name, [this, name, len, c0, n](float* d) {
      std::vector<float> tmp(static_cast<size_t>(len));  // (len)
      src.read_f32(name, tmp.data());
      std::memcpy(d, tmp.data() + c0, size_t(n) * sizeof(float));
    });
  }
  // For save_checkpoint_streamed: every loom parameter must have been mapped.
  void fill(const model::ParamSpec& s, float* dst) const {
    auto it = fills.find(s.name);
    LOOM_CHECK(it != fills.end(), "internal: no source tensor maps to loom parameter '{}'",
               s.name);
    it->second(dst);
  }
};

void copy_tokenizer_files(const std::string& from, const std::string& to_dir) {
  fs::create_directories(to_dir);
  for (const char* f : {"vocab.json", "merges.txt", "added_tokens.json"})
    if (fs::exists(fs::path(from) / f)) fs::copy_file(fs::path(from) / f, fs::path(to_dir) / f);
}

// HF tokenizer.json (BPE) -> vocab.json + merges.txt (+ added_tokens.json). `merges` entries are
// "a b" strings (tokenizers < 0.20) or ["a", "b"] pairs (later): both are read.
void tokenizer_json_to_files(const std::string& path, const std::string& to_dir) {
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(read_text(path));
  } catch (const nlohmann::json::exception& e) {
    LOOM_FAIL("'{}': not valid JSON: {}", path, e.what());
  }
  LOOM_CHECK(j.contains("model") && j["model"].value("type", "") == "BPE" &&
                 j["model"].contains("vocab") && j["model"].contains("merges"),
             "'{}': not a BPE tokenizer.json (model.type must be \"BPE\" with vocab and merges)",
             path);
  fs::create_directories(to_dir);
  std::ofstream(fs::path(to_dir) / "vocab.json") << j["model"]["vocab"].dump();
  std::ofstream m(fs::path(to_dir) / "merges.txt");
  m << "#version: 0.2\n";
  for (auto& e : j["model"]["merges"]) {
    if (e.is_string()) m << e.get<std::string>() << "\n";
    else {
      LOOM_CHECK(e.is_array() && e.size() == 2, "'{}': malformed merge entry", path);
      m << e[0].get<std::string>() << " " << e[1].get<std::string>() << "\n";
    }
  }
  nlohmann::json added = nlohmann::json::object();
  if (j.contains("added_tokens"))
    for (auto& t : j["added_tokens"])
      if (!j["model"]["vocab"].contains(t.value("content", "")))
        added[t.value("content", "")] = t.value("id", 0);
  if (!added.empty()) std::ofstream(fs::path(to_dir) / "added_tokens.json") << added.dump();
}

int64_t tokenizer_size(const std::string& dir) {
  if (!fs::exists(fs::path(dir) / "vocab.json")) return 0;
  auto v = nlohmann::json::parse(read_text((fs::path(dir) / "vocab.json").string()));
  int64_t n = 0;
  for (auto& [k, id] : v.items()) n = std::max<int64_t>(n, id.get<int64_t>() + 1);
  if (fs::exists(fs::path(dir) / "added_tokens.json")) {
    auto a = nlohmann::json::parse(read_text((fs::path(dir) / "added_tokens.json").string()));
    for (auto& [k, id] : a.items()) n = std::max<int64_t>(n, id.get<int64_t>() + 1);
  }
  return n;
}

// Saves the mapped model; returns the stored dtype's name ("mixed" if tensors differ).
std::string save(const std::string& out_dir, const model::ModelConfig& cfg, const Writer& wr,
                 const nlohmann::json& interop, const std::string& tok_src, bool tok_is_json,
                 const std::string& dtype) {
  std::set<std::string> stored;
  for (const auto& s : wr.layout.specs()) stored.insert(storage_dtype_name(wr.storage(s, dtype)));
  save_checkpoint_streamed(
      out_dir, cfg, wr.layout,
      [&wr](const model::ParamSpec& s, float* dst) { wr.fill(s, dst); },
      {{"step", 0}, {"interop", interop}}, [&](const std::string& tmp) {
                    if (tok_src.empty()) return;
                    if (tok_is_json) tokenizer_json_to_files(tok_src, tmp + "/tokenizer");
                    else copy_tokenizer_files(tok_src, tmp + "/tokenizer");
                  },
      [&wr, &dtype](const model::ParamSpec& s) { return wr.storage(s, dtype); });
  return stored.size() == 1 ? *stored.begin() : "mixed";
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// CodeGeeX

model::ModelConfig codegeex_config(const std::map<std::string, Shape>& shapes, int64_t n_heads,
                                   const std::string& name, std::vector<std::string>& warnings) {
  const std::string emb = "language_model.embedding.";
  const std::string tr = "language_model.transformer.";
  auto shape = [&](const std::string& k) -> const Shape& {
    auto it = shapes.find(k);
    LOOM_CHECK(it != shapes.end(), "not a CodeGeeX checkpoint: tensor '{}' is missing (found {} "
               "tensors, e.g. '{}')", k, shapes.size(), shapes.empty() ? "" : shapes.begin()->first);
    return it->second;
  };
  const Shape& we = shape(emb + "word_embeddings.weight");
  const Shape& pe = shape(emb + "position_embeddings.weight");
  LOOM_CHECK(we.size() == 2 && pe.size() == 2 && pe[1] == we[1],
             "word_embeddings {} and position_embeddings {} must be (V, C) and (S, C)",
             shape_text(we), shape_text(pe));
  model::ModelConfig c;
  c.vocab = we[0];
  c.d_model = we[1];
  c.max_seq = pe[0];
  int64_t L = 0;
  while (shapes.count(tr + "layers." + std::to_string(L) + ".input_layernorm.weight")) ++L;
  c.n_layers = L;
  const Shape& up = shape(tr + "layers.0.mlp.dense_h_to_4h.weight");
  LOOM_CHECK(up.size() == 2, "dense_h_to_4h.weight must be 2-D, is {}", shape_text(up));
  c.d_ff = up[0];
  if (n_heads <= 0) {
    LOOM_CHECK(c.d_model % 128 == 0, "the head count is not in the file (no Megatron args) and "
               "d_model = {} is not a multiple of CodeGeeX's head dim 128: pass --n-heads",
               c.d_model);
    n_heads = c.d_model / 128;
    warnings.push_back("head count not recorded in the checkpoint; assumed CodeGeeX's head dim "
                       "128: n_heads = " + std::to_string(n_heads) + " (override with --n-heads)");
  }
  c.n_heads = c.n_kv_heads = n_heads;
  c.activation = model::Activation::fast_gelu;
  c.norm_eps = 1e-5f;
  c.query_layer = true;
  c.tied_head = true;
  c.name = !name.empty() ? name
           : (c.vocab == 52224 && c.n_layers == 39 && c.d_model == 5120 && c.n_heads == 40 &&
              c.d_ff == 20480 && c.max_seq == 2048)
               ? "codegeex-13b"
               : "codegeex";
  c.validate();
  return c;
}

namespace {
// JSON errors (a config.json or vocab.json of the wrong shape) become loom::Error naming `what`.
template <class F>
auto json_errors_named(const std::string& what, F&& f) {
  try {
    return f();
  } catch (const nlohmann::json::exception& e) {
    LOOM_FAIL("'{}': unexpected JSON content: {}", what, e.what());
  }
}
ConvertResult convert_codegeex_impl(const std::string& in_pt, const std::string& out_dir,
                                    const ConvertOptions& opt);
ConvertResult convert_hf_gpt2_impl(const std::string& in_dir, const std::string& out_dir,
                                   const ConvertOptions& opt);
}  // namespace

DType storage_dtype_from_name(const std::string& name) {
  if (name == "f32") return DType::f32;
  if (name == "bf16") return DType::bf16;
  if (name == "f16") return DType::f16;
  LOOM_FAIL("storage dtype '{}' is unknown; choose f32, bf16 or f16", name);
}

const char* storage_dtype_name(DType t) {
  switch (t) {
    case DType::f32: return "f32";
    case DType::bf16: return "bf16";
    case DType::f16: return "f16";
    case DType::i8: return "int8";
    default: return "?";
  }
}

ConvertResult convert_codegeex(const std::string& in_pt, const std::string& out_dir,
                               const ConvertOptions& opt) {
  if (!opt.dtype.empty()) (void)storage_dtype_from_name(opt.dtype);  // before any work
  return json_errors_named(in_pt, [&] { return convert_codegeex_impl(in_pt, out_dir, opt); });
}
ConvertResult convert_hf_gpt2(const std::string& in_dir, const std::string& out_dir,
                              const ConvertOptions& opt) {
  if (!opt.dtype.empty()) (void)storage_dtype_from_name(opt.dtype);
  return json_errors_named(in_dir, [&] { return convert_hf_gpt2_impl(in_dir, out_dir, opt); });
}

namespace {
ConvertResult convert_codegeex_impl(const std::string& in_pt, const std::string& out_dir,
                                    const ConvertOptions& opt) {
  ConvertResult res;
  // One file, or a directory of tensor-parallel shards mp_rank_00_model_states.pt, ...
  std::unique_ptr<TensorSource> src_owner;
  int64_t args_heads = 0;
  if (fs::is_directory(in_pt)) {
    std::vector<std::unique_ptr<TorchSource>> shards;
    for (int r = 0;; ++r) {
      const fs::path f = fs::path(in_pt) / fmt::format("mp_rank_{:02d}_model_states.pt", r);
      if (!fs::exists(f)) break;
      shards.push_back(std::make_unique<TorchSource>());
      shards.back()->add_file(f.string(), res.warnings);
    }
    LOOM_CHECK(!shards.empty(), "'{}' is a directory without mp_rank_00_model_states.pt (give a "
               "CodeGeeX .pt file or a directory of its tensor-parallel shards)", in_pt);
    auto merged = std::make_unique<TpMergedSource>(std::move(shards));
    args_heads = merged->args_int("num_attention_heads");
    src_owner = std::move(merged);
  } else {
    auto one = std::make_unique<TorchSource>();
    one->add_file(in_pt, res.warnings);
    args_heads = one->args_int("num_attention_heads");
    src_owner = std::move(one);
  }
  const TensorSource& src = *src_owner;
  // A whole state dict, or one under "module" (what CodeGeeX's tools save): strip the prefix.
  std::map<std::string, Shape> shapes;
  std::string prefix;
  for (auto& [k, s] : src.shapes())
    if (k.rfind("module.", 0) == 0) prefix = "module.";
  for (auto& [k, s] : src.shapes())
    if (k.rfind(prefix, 0) == 0) shapes[k.substr(prefix.size())] = s;
  int64_t heads = opt.n_heads > 0 ? opt.n_heads : args_heads;
  res.cfg = codegeex_config(shapes, heads, opt.name, res.warnings);
  const model::ModelConfig& cfg = res.cfg;
  const model::ParamLayout layout(cfg);
  Writer wr{src, layout, {}, {}, {}};
  const int64_t C = cfg.d_model, F = cfg.d_ff, S = cfg.max_seq, V = cfg.vocab;
  const std::string lm = prefix + "language_model.";
  wr.copy(lm + "embedding.word_embeddings.weight", {V, C}, "embed.token.weight");
  wr.copy(lm + "embedding.position_embeddings.weight", {S, C}, "embed.position.weight");
  wr.copy(lm + "topQueryEmbedding.top_query_embeddings.weight", {S, C},
          "query_layer.position.weight");
  auto block = [&](const std::string& s, const std::string& d) {
    wr.copy(s + "input_layernorm.weight", {C}, d + "norm1.weight");
    wr.copy(s + "input_layernorm.bias", {C}, d + "norm1.bias");
    for (const char* q : {"query", "key", "value"}) {
      const std::string dn = d + "attn." + std::string(1, q[0]) + ".";
      wr.copy(s + "attention." + q + ".weight", {C, C}, dn + "weight");
      wr.copy(s + "attention." + q + ".bias", {C}, dn + "bias");
    }
    wr.copy(s + "attention.dense.weight", {C, C}, d + "attn.out.weight");
    wr.copy(s + "attention.dense.bias", {C}, d + "attn.out.bias");
    wr.copy(s + "post_attention_layernorm.weight", {C}, d + "norm2.weight");
    wr.copy(s + "post_attention_layernorm.bias", {C}, d + "norm2.bias");
    wr.copy(s + "mlp.dense_h_to_4h.weight", {F, C}, d + "ffn.up.weight");
    wr.copy(s + "mlp.dense_h_to_4h.bias", {F}, d + "ffn.up.bias");
    wr.copy(s + "mlp.dense_4h_to_h.weight", {C, F}, d + "ffn.down.weight");
    wr.copy(s + "mlp.dense_4h_to_h.bias", {C}, d + "ffn.down.bias");
  };
  for (int64_t i = 0; i < cfg.n_layers; ++i)
    block(lm + "transformer.layers." + std::to_string(i) + ".",
          "blocks." + std::to_string(i) + ".");
  wr.copy(lm + "transformer.final_layernorm.weight", {C}, "final_norm.weight");
  wr.copy(lm + "transformer.final_layernorm.bias", {C}, "final_norm.bias");
  block(lm + "transformer.topQueryLayer.", "query_layer.");
  std::vector<std::string> unknown;
  for (auto& [k, s] : src.shapes())
    if (!wr.used.count(k)) unknown.push_back(k);
  LOOM_CHECK(unknown.empty(), "'{}': {} tensors do not map to the CodeGeeX architecture, e.g. "
             "'{}'", in_pt, unknown.size(), unknown.empty() ? "" : unknown[0]);
  res.tensors = int64_t(wr.used.size());
  res.vocab_used = V;
  if (!opt.tokenizer_dir.empty()) {
    const int64_t n = tokenizer_size(opt.tokenizer_dir);
    LOOM_CHECK(n > 0 && n <= V, "tokenizer '{}' has {} tokens; the model has {} vocabulary rows "
               "(expected vocab.json + merges.txt [+ added_tokens.json])", opt.tokenizer_dir, n, V);
    res.vocab_used = n;
  }
  res.dtype = save(out_dir, cfg, wr,
                   {{"from", "codegeex"}, {"source", in_pt}, {"vocab_used", res.vocab_used}},
                   opt.tokenizer_dir, false, opt.dtype);
  return res;
}

// ---------------------------------------------------------------------------------------------
// Hugging Face GPT-2

ConvertResult convert_hf_gpt2_impl(const std::string& in_dir, const std::string& out_dir,
                                   const ConvertOptions& opt) {
  ConvertResult res;
  const fs::path dir(in_dir);
  const std::string cfg_path = (dir / "config.json").string();
  nlohmann::json hc;
  try {
    hc = nlohmann::json::parse(read_text(cfg_path));
  } catch (const nlohmann::json::exception& e) {
    LOOM_FAIL("'{}': not valid JSON: {}", cfg_path, e.what());
  }
  auto get_int = [&](const char* k, int64_t def) -> int64_t {
    if (!hc.contains(k) || hc[k].is_null()) {
      LOOM_CHECK(def >= 0, "'{}': missing key '{}'", cfg_path, k);
      return def;
    }
    LOOM_CHECK(hc[k].is_number_integer(), "'{}': '{}' must be an integer", cfg_path, k);
    return hc[k].get<int64_t>();
  };
  const std::string mt = hc.value("model_type", "gpt2");
  LOOM_CHECK(mt == "gpt2", "'{}': model_type '{}' is not gpt2", cfg_path, mt);
  auto refuse_flag = [&](const char* k, bool bad_value, const char* why) {
    if (hc.contains(k) && hc[k].is_boolean() && hc[k].get<bool>() == bad_value)
      LOOM_FAIL("'{}': {} = {} is not supported: {}", cfg_path, k, bad_value, why);
  };
  refuse_flag("scale_attn_by_inverse_layer_idx", true, "loom scales scores by 1/sqrt(head dim) only");
  refuse_flag("scale_attn_weights", false, "loom always scales scores by 1/sqrt(head dim)");
  refuse_flag("add_cross_attention", true, "loom is decoder-only");
  model::ModelConfig c;
  c.d_model = get_int("n_embd", -1);
  c.n_heads = c.n_kv_heads = get_int("n_head", -1);
  c.n_layers = get_int("n_layer", -1);
  c.max_seq = get_int("n_positions", hc.contains("n_ctx") ? get_int("n_ctx", -1) : -1);
  const int64_t V0 = get_int("vocab_size", -1);
  c.d_ff = get_int("n_inner", 4 * c.d_model);
  c.norm_eps = float(hc.value("layer_norm_epsilon", 1e-5));
  const std::string act = hc.value("activation_function", "gelu_new");
  if (act == "gelu_new" || act == "gelu_fast" || act == "gelu_pytorch_tanh")
    c.activation = model::Activation::gelu;
  else if (act == "gelu") c.activation = model::Activation::gelu_erf;
  else if (act == "quick_gelu") c.activation = model::Activation::fast_gelu;
  else
    LOOM_FAIL("'{}': activation_function '{}' has no loom equivalent; supported: gelu_new, "
              "gelu_fast, gelu_pytorch_tanh (tanh GELU), gelu (erf GELU), quick_gelu (FastGELU)",
              cfg_path, act);
  c.vocab = round_up(V0, opt.vocab_multiple);
  c.name = !opt.name.empty() ? opt.name : fs::path(out_dir).filename().string();
  if (c.name.empty()) c.name = "gpt2";
  c.validate();
  res.cfg = c;
  res.vocab_used = V0;
  if (c.vocab != V0)
    res.warnings.push_back("vocab " + std::to_string(V0) + " padded to " + std::to_string(c.vocab) +
                           " rows (multiple of " + std::to_string(opt.vocab_multiple) +
                           ", as Megatron pads it); the padding rows are zero and never sampled");

  // Weights: safetensors preferred, then pytorch_model.bin; either may be sharded (index JSON).
  std::unique_ptr<TensorSource> src;
  auto shards = [&](const std::string& index) {
    std::set<std::string> files;
    auto j = nlohmann::json::parse(read_text((dir / index).string()));
    LOOM_CHECK(j.contains("weight_map") && j["weight_map"].is_object(),
               "'{}': no weight_map", (dir / index).string());
    for (auto& [k, f] : j["weight_map"].items()) {
      const std::string fn = f.get<std::string>();
      LOOM_CHECK(fn.find('/') == std::string::npos && fn != "..", "'{}': shard name '{}' must be "
                 "a file name in the same directory", index, fn);
      files.insert(fn);
    }
    return files;
  };
  if (fs::exists(dir / "model.safetensors") || fs::exists(dir / "model.safetensors.index.json")) {
    auto s = std::make_unique<SafetensorsSource>();
    if (fs::exists(dir / "model.safetensors")) s->add_file((dir / "model.safetensors").string());
    else for (auto& f : shards("model.safetensors.index.json")) s->add_file((dir / f).string());
    src = std::move(s);
  } else if (fs::exists(dir / "pytorch_model.bin") ||
             fs::exists(dir / "pytorch_model.bin.index.json")) {
    auto s = std::make_unique<TorchSource>();
    if (fs::exists(dir / "pytorch_model.bin"))
      s->add_file((dir / "pytorch_model.bin").string(), res.warnings);
    else
      for (auto& f : shards("pytorch_model.bin.index.json")) s->add_file((dir / f).string(), res.warnings);
    src = std::move(s);
  } else {
    LOOM_FAIL("'{}': no model.safetensors, pytorch_model.bin or their *.index.json", in_dir);
  }
  // Fine-tuned GPT2LMHeadModel files prefix "transformer."; the original gpt2 files do not.
  std::string p;
  if (src->shapes().count("transformer.wte.weight")) p = "transformer.";
  const model::ParamLayout layout(c);
  Writer wr{*src, layout, {}, {}, {}};
  const int64_t C = c.d_model, F = c.d_ff;
  wr.copy(p + "wte.weight", {V0, C}, "embed.token.weight");
  wr.copy(p + "wpe.weight", {c.max_seq, C}, "embed.position.weight");
  for (int64_t i = 0; i < c.n_layers; ++i) {
    const std::string s = p + "h." + std::to_string(i) + ".", d = "blocks." + std::to_string(i) + ".";
    wr.copy(s + "ln_1.weight", {C}, d + "norm1.weight");
    wr.copy(s + "ln_1.bias", {C}, d + "norm1.bias");
    const char* qkv[3] = {"q", "k", "v"};
    for (int64_t k = 0; k < 3; ++k) {
      wr.conv1d(s + "attn.c_attn.weight", {C, 3 * C}, k * C, C, d + "attn." + qkv[k] + ".weight");
      wr.vec_slice(s + "attn.c_attn.bias", 3 * C, k * C, C, d + "attn." + qkv[k] + ".bias");
    }
    wr.conv1d(s + "attn.c_proj.weight", {C, C}, 0, C, d + "attn.out.weight");
    wr.copy(s + "attn.c_proj.bias", {C}, d + "attn.out.bias");
    wr.copy(s + "ln_2.weight", {C}, d + "norm2.weight");
    wr.copy(s + "ln_2.bias", {C}, d + "norm2.bias");
    wr.conv1d(s + "mlp.c_fc.weight", {C, F}, 0, F, d + "ffn.up.weight");
    wr.copy(s + "mlp.c_fc.bias", {F}, d + "ffn.up.bias");
    wr.conv1d(s + "mlp.c_proj.weight", {F, C}, 0, C, d + "ffn.down.weight");
    wr.copy(s + "mlp.c_proj.bias", {C}, d + "ffn.down.bias");
    for (const char* buf : {"attn.bias", "attn.masked_bias"})
      if (src->shapes().count(s + buf)) wr.used.insert(s + buf);  // mask buffers, not weights
  }
  wr.copy(p + "ln_f.weight", {C}, "final_norm.weight");
  wr.copy(p + "ln_f.bias", {C}, "final_norm.bias");
  if (src->shapes().count("lm_head.weight")) {
    // Tied in GPT-2; a file that stores it must hold the same values.
    // Both are read whole for the check: twice the largest tensor, before the save streams.
    wr.expect("lm_head.weight", {V0, C});
    std::vector<float> head(size_t(V0 * C)), wte(size_t(V0 * C));  // (V0, C) each
    src->read_f32("lm_head.weight", head.data());
    src->read_f32(p + "wte.weight", wte.data());
    LOOM_CHECK(std::memcmp(head.data(), wte.data(), head.size() * sizeof(float)) == 0,
               "'{}': lm_head.weight differs from wte.weight: an untied head is not supported "
               "(loom ties the head to the token embedding)", in_dir);
  }
  std::vector<std::string> unknown;
  for (auto& [k, s] : src->shapes())
    if (!wr.used.count(k)) unknown.push_back(k);
  LOOM_CHECK(unknown.empty(), "'{}': {} tensors do not map to GPT-2, e.g. '{}'", in_dir,
             unknown.size(), unknown.empty() ? "" : unknown[0]);
  res.tensors = int64_t(wr.used.size());
  std::string tok = opt.tokenizer_dir.empty() ? in_dir : opt.tokenizer_dir;
  bool tok_json = false;
  if (!fs::exists(fs::path(tok) / "vocab.json")) {
    if (fs::exists(fs::path(tok) / "tokenizer.json")) {
      tok = (fs::path(tok) / "tokenizer.json").string();
      tok_json = true;
    } else {
      res.warnings.push_back("no tokenizer (vocab.json + merges.txt or tokenizer.json) in '" + tok +
                             "': the checkpoint has none");
      tok.clear();
    }
  }
  res.dtype = save(out_dir, c, wr, {{"from", "hf-gpt2"}, {"source", in_dir}, {"vocab_used", V0}},
                   tok, tok_json, opt.dtype);
  return res;
}

}  // namespace

}  // namespace loom::interop
