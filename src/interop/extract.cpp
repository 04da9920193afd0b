// interop/extract.cpp: sub-model extraction (see extract.h).
#include "interop/extract.h"

#include <filesystem>
#include <fmt/ranges.h>
#include <map>

#include "core/error.h"
#include "interop/model_checkpoint.h"
#include "model/params.h"

namespace loom::interop {

namespace fs = std::filesystem;

model::ModelConfig extracted_config(const model::ModelConfig& cfg, int32_t d) {
  const model::MoeConfig& m = cfg.moe;
  LOOM_CHECK(m.enabled(),
             "model '{}' is dense (no sparse blocks): there are no experts to extract; it is "
             "already the whole model",
             cfg.name);
  LOOM_CHECK(m.router == model::Router::rre,
             "model '{}' uses the topk router, and extraction needs rre: a topk token may be "
             "sent to any of the {} experts by its learned gate, so no subset of experts serves "
             "one domain exactly; rre routes a domain's tokens only to that domain's group of "
             "experts (moe.router = \"rre\")",
             cfg.name, m.experts);
  LOOM_CHECK(d >= 0 && d < m.num_domains(), "domain index {} is outside [0, {}) (domains: {})", d,
             m.num_domains(), fmt::format("{}", fmt::join(m.domains, ", ")));
  model::ModelConfig out = cfg;
  out.name = cfg.name + "-" + m.domains[size_t(d)];
  out.moe.domains = {m.domains[size_t(d)]};
  out.moe.experts = m.experts_per_domain;
  out.validate();
  return out;
}

namespace {
int64_t dir_bytes(const fs::path& dir) {
  int64_t n = 0;
  for (const auto& e : fs::recursive_directory_iterator(dir))
    if (e.is_regular_file()) n += int64_t(e.file_size());
  return n;
}
}  // namespace

ExtractReport extract_domain(const std::string& checkpoint_dir, const std::string& domain,
                             const std::string& out_dir) {
  std::error_code ec;
  LOOM_CHECK(!fs::exists(out_dir, ec) || (fs::is_directory(out_dir, ec) && fs::is_empty(out_dir, ec)),
             "--out '{}' already exists and is not empty; choose another directory", out_dir);
  CheckpointReader r(checkpoint_dir);
  const model::ModelConfig& cfg = r.config();
  // Router first (extraction's own reason), then the domain name.
  if (!cfg.moe.enabled() || cfg.moe.router != model::Router::rre) extracted_config(cfg, 0);
  const int32_t d = cfg.domain_index(domain);
  const model::ModelConfig sub = extracted_config(cfg, d);
  const model::ParamLayout src(cfg), dst(sub);
  std::map<std::string, const model::ParamSpec*> by_name;
  for (const auto& s : src.specs()) by_name[s.name] = &s;
  const int64_t G = cfg.moe.experts_per_domain, V = cfg.vocab;

  // Each tensor of the sub-model from its source range: expert j of a sparse block is the
  // source's expert d*G + j; the routing table is row d of the source's (D, V) table.
  auto produce = [&](const model::ParamSpec& s, float* out) {
    std::string name = s.name;
    int64_t skip = 0;  // elements into the source tensor
    const std::string tag = ".moe.experts.";
    if (const size_t at = name.find(tag); at != name.npos) {
      const size_t b = at + tag.size(), e = name.find('.', b);
      const int64_t j = std::stoll(name.substr(b, e - b));
      name = name.substr(0, b) + std::to_string(int64_t(d) * G + j) + name.substr(e);
    } else if (name.ends_with(".moe.rre_table")) {
      skip = int64_t(d) * V;
    }
    auto it = by_name.find(name);
    LOOM_ASSERT(it != by_name.end(), "extract: source tensor '{}' for '{}'", name, s.name);
    LOOM_ASSERT(skip + s.numel <= it->second->numel, "extract: '{}' range", s.name);
    const int64_t begin = it->second->offset + skip;
    r.load_weights_packed(src, out, begin, begin + s.numel);
  };
  const fs::path tok = fs::path(r.dir()) / "tokenizer";
  auto copy_tokenizer = [&](const std::string& staging) {
    if (fs::exists(tok))
      fs::copy(tok, fs::path(staging) / "tokenizer", fs::copy_options::recursive);
  };
  nlohmann::json state = {{"step", r.trainer_state().value("step", 0)},
                          {"extracted_from", r.dir()},
                          {"domain", cfg.moe.domains[size_t(d)]}};
  save_checkpoint_streamed(out_dir, sub, dst, produce, state, copy_tokenizer);

  ExtractReport rep;
  rep.domain = cfg.moe.domains[size_t(d)];
  rep.params_full = cfg.num_params();
  rep.params_extracted = sub.num_params();
  rep.weight_bytes_full = 4 * cfg.num_buffer_elements();
  rep.weight_bytes_extracted = 4 * sub.num_buffer_elements();
  rep.bytes_full = dir_bytes(r.dir());
  rep.bytes_extracted = dir_bytes(out_dir);
  return rep;
}

}  // namespace loom::interop
