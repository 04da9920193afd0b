#include "checkpoint/checkpoint.h"

#include <fcntl.h>
#include <openssl/evp.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "core/error.h"

namespace fs = std::filesystem;

namespace loom::checkpoint {

namespace {

void write_text_file(const std::string& path, const std::string& text) {
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  LOOM_CHECK(fd >= 0, "cannot create '{}': {}", path, std::strerror(errno));
  size_t off = 0;
  while (off < text.size()) {
    ssize_t w = ::write(fd, text.data() + off, text.size() - off);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) {
      ::close(fd);
      LOOM_FAIL("writing '{}' failed: {}", path, std::strerror(errno));
    }
    off += size_t(w);
  }
  int rc = ::fsync(fd);
  ::close(fd);
  LOOM_CHECK(rc == 0, "fsync of '{}' failed: {}", path, std::strerror(errno));
}

std::string read_text_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  LOOM_CHECK(f.good(), "cannot open '{}'", path);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

void fsync_dir(const std::string& dir) {
  int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd >= 0) {
    ::fsync(fd);
    ::close(fd);
  }
}

int64_t range_end(int64_t end, const model::ParamLayout& layout) {
  return end < 0 ? layout.total() : end;
}

}  // namespace

std::string sha256_file(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  LOOM_CHECK(fd >= 0, "cannot open '{}': {}", path, std::strerror(errno));
  EVP_MD_CTX* ctx = EVP_MD_CTX_new();
  EVP_DigestInit_ex(ctx, EVP_sha256(), nullptr);
  std::vector<char> buf(1 << 20);
  for (;;) {
    ssize_t r = ::read(fd, buf.data(), buf.size());
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) break;
    EVP_DigestUpdate(ctx, buf.data(), size_t(r));
  }
  ::close(fd);
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  EVP_DigestFinal_ex(ctx, md, &len);
  EVP_MD_CTX_free(ctx);
  std::string hex;
  for (unsigned i = 0; i < len; ++i) hex += fmt::format("{:02x}", md[i]);
  return hex;
}

void save_checkpoint(const std::string& dir_in, const model::ModelConfig& cfg,
                     const model::ParamLayout& layout, const float* weights,
                     const OptimizerState& opt, const nlohmann::json& trainer_state,
                     const std::function<void(const std::string&)>& write_extra) {
  std::string dir = fs::path(dir_in).lexically_normal().string();
  if (!dir.empty() && dir.back() == '/') dir.pop_back();
  LOOM_CHECK(!dir.empty(), "checkpoint directory name is empty");
  fs::path parent = fs::path(dir).parent_path();
  if (!parent.empty()) fs::create_directories(parent);
  const std::string tmp = dir + ".tmp-" + std::to_string(::getpid());
  fs::remove_all(tmp);
  fs::create_directories(tmp);

  LOOM_CHECK(layout.tp().size == 1,
             "save_checkpoint takes the whole model's layout; gather tp shards first (tp = {})",
             layout.tp().size);
  std::vector<TensorToWrite> tensors;
  for (const auto& s : layout.specs())
    tensors.push_back({s.name, DType::f32, s.shape, weights + s.offset});
  write_safetensors(tmp + "/model.safetensors", tensors, {{"format", "loom"}});
  if (opt.m && opt.v) {
    std::vector<TensorToWrite> st;
    for (const auto& s : layout.specs()) {
      st.push_back({"m." + s.name, DType::f32, s.shape, opt.m + s.offset});
      st.push_back({"v." + s.name, DType::f32, s.shape, opt.v + s.offset});
    }
    write_safetensors(tmp + "/optimizer.safetensors", st,
                      {{"format", "loom-adamw"}, {"step", std::to_string(opt.step)}});
  }
  write_text_file(tmp + "/config.toml", cfg.to_toml());
  write_text_file(tmp + "/trainer_state.json", trainer_state.dump(2) + "\n");
  if (write_extra) write_extra(tmp);

  nlohmann::json sums = nlohmann::json::object();
  std::vector<fs::path> files;
  for (auto& e : fs::recursive_directory_iterator(tmp))
    if (e.is_regular_file()) files.push_back(e.path());
  std::sort(files.begin(), files.end());
  for (auto& f : files) {
    std::string rel = fs::relative(f, tmp).string();
    sums[rel] = {{"sha256", sha256_file(f.string())}, {"bytes", fs::file_size(f)}};
  }
  write_text_file(tmp + "/checksums.json", sums.dump(2) + "\n");
  fsync_dir(tmp);

  // Swap in: old -> aside, tmp -> dir, remove old. A crash in between leaves a complete
  // checkpoint under either name.
  std::string aside;
  if (fs::exists(dir)) {
    aside = dir + ".old-" + std::to_string(::getpid());
    fs::remove_all(aside);
    fs::rename(dir, aside);
  }
  fs::rename(tmp, dir);
  fsync_dir(parent.empty() ? "." : parent.string());
  if (!aside.empty()) fs::remove_all(aside);
}

CheckpointReader::CheckpointReader(const std::string& dir) : dir_(dir) {
  LOOM_CHECK(fs::is_directory(dir), "checkpoint '{}' does not exist or is not a directory", dir);
  const std::string sums_path = dir + "/checksums.json";
  LOOM_CHECK(fs::exists(sums_path),
             "checkpoint '{}' has no checksums.json: not a loom checkpoint, or a write was "
             "interrupted", dir);
  nlohmann::json sums;
  try {
    sums = nlohmann::json::parse(read_text_file(sums_path));
  } catch (const nlohmann::json::exception& e) {
    LOOM_FAIL("'{}' is not valid JSON ({})", sums_path, e.what());
  }
  for (const char* required : {"model.safetensors", "config.toml", "trainer_state.json"})
    LOOM_CHECK(sums.contains(required), "checkpoint '{}' lacks {} in checksums.json", dir,
               required);
  for (auto& [name, v] : sums.items()) {
    std::string path = dir + "/" + name;
    LOOM_CHECK(fs::exists(path), "checkpoint file '{}' is missing", path);
    uint64_t bytes = fs::file_size(path);
    LOOM_CHECK(bytes == v["bytes"].get<uint64_t>(),
               "checkpoint file '{}' has {} bytes but {} were written (truncated or modified)",
               path, bytes, v["bytes"].get<uint64_t>());
    std::string sum = sha256_file(path);
    LOOM_CHECK(sum == v["sha256"].get<std::string>(),
               "checkpoint file '{}' is corrupted: SHA-256 {} does not match the recorded {}",
               path, sum, v["sha256"].get<std::string>());
  }
  cfg_ = model::model_config_from_toml(read_text_file(dir + "/config.toml"), dir + "/config.toml");
  try {
    state_ = nlohmann::json::parse(read_text_file(dir + "/trainer_state.json"));
  } catch (const nlohmann::json::exception& e) {
    LOOM_FAIL("'{}/trainer_state.json' is not valid JSON ({})", dir, e.what());
  }
  model_ = std::make_unique<SafetensorsFile>(dir + "/model.safetensors");
  if (fs::exists(dir + "/optimizer.safetensors"))
    optimizer_ = std::make_unique<SafetensorsFile>(dir + "/optimizer.safetensors");
}

CheckpointReader::~CheckpointReader() = default;

bool CheckpointReader::has_optimizer() const { return optimizer_ != nullptr; }

void CheckpointReader::expect_config(const model::ModelConfig& c) const {
  std::string diff;
  auto cmp = [&](const char* key, auto a, auto b) {
    if (a != b) diff += fmt::format("{}{} = {} (checkpoint) vs {} (expected)",
                                    diff.empty() ? "" : "; ", key, a, b);
  };
  cmp("vocab", cfg_.vocab, c.vocab);
  cmp("n_layers", cfg_.n_layers, c.n_layers);
  cmp("d_model", cfg_.d_model, c.d_model);
  cmp("n_heads", cfg_.n_heads, c.n_heads);
  cmp("n_kv_heads", cfg_.n_kv_heads, c.n_kv_heads);
  cmp("d_ff", cfg_.d_ff, c.d_ff);
  cmp("max_seq", cfg_.max_seq, c.max_seq);
  cmp("activation", std::string(model::activation_name(cfg_.activation)),
      std::string(model::activation_name(c.activation)));
  cmp("query_layer", cfg_.query_layer, c.query_layer);
  cmp("norm_eps", cfg_.norm_eps, c.norm_eps);
  LOOM_CHECK(diff.empty(), "checkpoint '{}' is of a different model: {}", dir_, diff);
}

void CheckpointReader::load_weights(const model::ParamLayout& layout, float* weights,
                                    int64_t begin, int64_t end) const {
  end = range_end(end, layout);
  load_weights_packed(layout, weights + begin, begin, end);
}

void CheckpointReader::load_weights_packed(const model::ParamLayout& layout, float* packed,
                                           int64_t begin, int64_t end) const {
  for (const auto& s : layout.specs()) {
    int64_t lo = std::max(s.offset, begin), hi = std::min(s.offset + s.numel, end);
    if (lo >= hi) continue;
    const TensorInfo& i = model_->info(s.name);
    LOOM_CHECK(i.dtype == DType::f32 && i.shape == s.global_shape,
               "'{}': tensor '{}' is {} {} but the model expects F32 {}", model_->path(), s.name,
               dtype_name(i.dtype), shape_str(i.shape), shape_str(s.global_shape));
    // A tp shard reads only its slice of the logical tensor (one range per contiguous run).
    model::for_each_global_run(s, lo - s.offset, hi - s.offset,
                               [&](int64_t local, int64_t global, int64_t len) {
                                 model_->read_range(s.name, DType::f32, global, len,
                                                    packed + (s.offset + local - begin));
                               });
  }
}

int64_t CheckpointReader::load_optimizer(const model::ParamLayout& layout, float* m, float* v,
                                         int64_t begin, int64_t end) const {
  LOOM_CHECK(optimizer_ != nullptr, "checkpoint '{}' has no optimizer.safetensors", dir_);
  end = range_end(end, layout);
  for (const auto& s : layout.specs()) {
    int64_t lo = std::max(s.offset, begin), hi = std::min(s.offset + s.numel, end);
    if (lo >= hi) continue;
    for (const char* which : {"m.", "v."}) {
      std::string name = which + s.name;
      const TensorInfo& i = optimizer_->info(name);
      LOOM_CHECK(i.shape == s.global_shape, "'{}': tensor '{}' is {} but the model expects {}",
                 optimizer_->path(), name, shape_str(i.shape), shape_str(s.global_shape));
      float* dst = which[0] == 'm' ? m : v;  // holds [begin, end) of the flat buffer
      model::for_each_global_run(s, lo - s.offset, hi - s.offset,
                                 [&](int64_t local, int64_t global, int64_t len) {
                                   optimizer_->read_range(name, DType::f32, global, len,
                                                          dst + (s.offset + local - begin));
                                 });
    }
  }
  auto it = optimizer_->metadata().find("step");
  LOOM_CHECK(it != optimizer_->metadata().end(), "'{}' lacks the optimizer step",
             optimizer_->path());
  return std::stoll(it->second);
}

}  // namespace loom::checkpoint
