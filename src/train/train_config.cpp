#include "train/train_config.h"

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <toml++/toml.h>

#include "core/config_file.h"
#include "core/error.h"
#include <cfloat>
#include <cmath>
#include "model/params.h"
#include "parallel/plan.h"
#include <optional>
#include <type_traits>

#include <fmt/ranges.h>

namespace fs = std::filesystem;

namespace loom::train {

namespace {

// The schema: section -> allowed keys. "" is the top level.
const std::map<std::string, std::set<std::string>>& schema() {
  static const std::map<std::string, std::set<std::string>> s = {
      {"", {"model"}},
      {"data", {"source", "path", "seed"}},
      {"train", {"batch", "seq", "micro_batches", "steps", "seed", "precision", "recompute",
                 "threads", "eval_every", "eval_batches", "time_limit_s"}},
      {"optim", {"lr", "min_lr", "beta1", "beta2", "eps", "weight_decay", "clip",
                 "warmup_steps", "decay_steps"}},
      {"checkpoint", {"dir", "every", "keep"}},
      {"log", {"dir", "every"}},
      {"parallel",
       {"dp", "tp", "pp", "cp", "ep", "zero", "bucket_mb", "schedule", "virtual_stages",
        "stage_layers", "ranks_per_node", "micro_batches", "recompute", "cp_scheme",
        "cp_layout", "ecss", "ecss_store", "cp_overlap"}},
  };
  return s;
}

std::string join(const std::set<std::string>& s) {
  std::string out;
  for (auto& k : s) out += (out.empty() ? "" : ", ") + k;
  return out;
}

void check_key(const std::string& section, const std::string& key, const std::string& where) {
  auto it = schema().find(section);
  if (it == schema().end()) {
    std::set<std::string> sections;
    for (auto& [k, v] : schema())
      if (!k.empty()) sections.insert(k);
    LOOM_FAIL("{}: unknown section [{}]; allowed sections: {}", where, section, join(sections));
  }
  if (!it->second.count(key))
    LOOM_FAIL("{}: unknown key '{}{}{}'; allowed keys in {}: {}", where, section,
              section.empty() ? "" : ".", key, section.empty() ? "the top level" : "[" + section + "]",
              join(it->second));
}

// Parses an override value as TOML (so 3, 1e-3, true, "x" keep their types); a bare word that is
// not valid TOML becomes a string.
toml::table parse_override_value(const std::string& value) {
  try {
    return toml::parse("v = " + value);
  } catch (const toml::parse_error&) {
    toml::table t;
    t.insert("v", value);
    return t;
  }
}

}  // namespace

TrainConfig load_train_config(const std::string& path, const std::vector<std::string>& overrides,
                              const parallel::PlanSettings& flags) {
  const std::string text = read_config_file(path, "training config");
  toml::table tbl;
  try {
    tbl = toml::parse(text, path);
  } catch (const toml::parse_error& e) {
    LOOM_FAIL("{}: TOML syntax error at line {}: {}", path, e.source().begin.line,
              std::string(e.description()));
  }
  // Strictness on the file itself.
  for (auto& [k, v] : tbl) {
    std::string key(k.str());
    if (v.is_table()) {
      for (auto& [k2, v2] : *v.as_table()) check_key(key, std::string(k2.str()), path);
    } else {
      check_key("", key, path);
    }
  }
  // Overrides: section.key=value.
  for (const std::string& o : overrides) {
    auto eq = o.find('=');
    LOOM_CHECK(eq != std::string::npos && eq > 0,
               "--set '{}' must look like section.key=value (e.g. train.steps=10)", o);
    std::string lhs = o.substr(0, eq), value = o.substr(eq + 1);
    auto dot = lhs.find('.');
    std::string section = dot == std::string::npos ? "" : lhs.substr(0, dot);
    std::string key = dot == std::string::npos ? lhs : lhs.substr(dot + 1);
    check_key(section, key, "--set " + o);
    toml::table v = parse_override_value(value);
    if (section.empty()) {
      tbl.insert_or_assign(key, *v["v"].node());
    } else {
      if (!tbl[section].is_table()) tbl.insert_or_assign(section, toml::table{});
      tbl[section].as_table()->insert_or_assign(key, *v["v"].node());
    }
  }

  TrainConfig c;
  c.source_path = path;
  auto where = [&](const std::string& s, const std::string& k) {
    return fmt::format("{}: {}{}{}", path, s, s.empty() ? "" : ".", k);
  };
  auto get_int = [&](const std::string& s, const std::string& k, int64_t& out, int64_t min) {
    auto node = s.empty() ? tbl[k] : tbl[s][k];
    if (!node) return;
    LOOM_CHECK(node.is_integer(), "{} must be an integer", where(s, k));
    out = *node.value<int64_t>();
    LOOM_CHECK(out >= min, "{} = {} must be at least {}", where(s, k), out, min);
  };
  auto get_float = [&](const std::string& s, const std::string& k, float& out) {
    auto node = tbl[s][k];
    if (!node) return;
    LOOM_CHECK(node.is_number(), "{} must be a number", where(s, k));
    const double v = *node.value<double>();
    LOOM_CHECK(std::isfinite(v) && std::fabs(v) <= double(FLT_MAX),
               "{} = {} is not a finite float", where(s, k), v);
    out = float(v);
  };
  auto get_str = [&](const std::string& s, const std::string& k, std::string& out) {
    auto node = s.empty() ? tbl[k] : tbl[s][k];
    if (!node) return;
    LOOM_CHECK(node.is_string(), "{} must be a string", where(s, k));
    out = *node.value<std::string>();
  };

  std::string model_path;
  get_str("", "model", model_path);
  LOOM_CHECK(!model_path.empty(), "{}: missing 'model = \"path/to/model.toml\"'", path);
  // Relative model paths: next to the config first, else relative to the working directory.
  fs::path beside = fs::path(path).parent_path() / model_path;
  std::error_code ec;  // a path too long or unreadable is "does not exist", not an exception
  if (fs::path(model_path).is_relative() && !fs::exists(model_path, ec) && fs::exists(beside, ec))
    model_path = beside.string();
  LOOM_CHECK(fs::exists(model_path, ec), "{}: model = '{}' does not exist", path, model_path);
  c.model_path = model_path;
  c.model = model::load_model_config(model_path);

  get_str("data", "source", c.data_source);
  LOOM_CHECK(c.data_source == "synthetic" || c.data_source == "shards",
             "{} = '{}': choose \"synthetic\" or \"shards\"", where("data", "source"),
             c.data_source);
  get_str("data", "path", c.data_path);
  if (c.data_source == "shards") {
    LOOM_CHECK(!c.data_path.empty(), "{}: data.source = \"shards\" needs data.path", path);
    LOOM_CHECK(fs::is_directory(c.data_path), "{}: data.path = '{}' is not a directory", path,
               c.data_path);
  }
  int64_t seed = int64_t(c.data_seed);
  get_int("data", "seed", seed, 0);
  c.data_seed = uint64_t(seed);

  get_int("train", "batch", c.batch, 1);
  get_int("train", "seq", c.seq, 1);
  get_int("train", "steps", c.steps, 0);
  seed = int64_t(c.seed);
  get_int("train", "seed", seed, 0);
  c.seed = uint64_t(seed);
  std::string precision = "f32";
  get_str("train", "precision", precision);
  LOOM_CHECK(precision == "f32" || precision == "bf16", "{} = '{}': choose \"f32\" or \"bf16\"",
             where("train", "precision"), precision);
  c.precision = precision == "bf16" ? model::Precision::bf16 : model::Precision::f32;
  get_int("train", "threads", c.threads, 0);
  get_int("train", "eval_every", c.eval_every, 0);
  get_int("train", "eval_batches", c.eval_batches, 1);
  if (auto node = tbl["train"]["time_limit_s"]) {
    LOOM_CHECK(node.is_number() && *node.value<double>() >= 0,
               "{} must be a number of seconds >= 0", where("train", "time_limit_s"));
    c.time_limit_s = *node.value<double>();
  }
  LOOM_CHECK(c.seq <= c.model.max_seq,
             "{}: train.seq = {} exceeds the model's max_seq = {}; use train.seq <= {}", path,
             c.seq, c.model.max_seq, c.model.max_seq);

  get_float("optim", "lr", c.optim.lr);
  get_float("optim", "min_lr", c.optim.min_lr);
  get_float("optim", "beta1", c.optim.beta1);
  get_float("optim", "beta2", c.optim.beta2);
  get_float("optim", "eps", c.optim.eps);
  get_float("optim", "weight_decay", c.optim.weight_decay);
  get_float("optim", "clip", c.optim.clip);
  get_int("optim", "warmup_steps", c.optim.warmup_steps, 0);
  get_int("optim", "decay_steps", c.optim.decay_steps, 0);
  LOOM_CHECK(c.optim.lr > 0 && c.optim.min_lr >= 0 && c.optim.min_lr <= c.optim.lr,
             "{}: need optim.lr > 0 and 0 <= optim.min_lr <= optim.lr (got lr={}, min_lr={})",
             path, c.optim.lr, c.optim.min_lr);
  LOOM_CHECK(c.optim.beta1 >= 0 && c.optim.beta1 < 1 && c.optim.beta2 >= 0 && c.optim.beta2 < 1,
             "{}: optim.beta1 = {} and optim.beta2 = {} must be in [0, 1)", path, c.optim.beta1,
             c.optim.beta2);

  get_str("checkpoint", "dir", c.checkpoint_dir);
  get_int("checkpoint", "every", c.checkpoint_every, 0);
  get_int("checkpoint", "keep", c.checkpoint_keep, 0);
  // [parallel] (and the older train.micro_batches / train.recompute): the raw settings; the plan
  // itself is made and validated by parallel::make_plan once the world size is known.
  parallel::PlanSettings& ps = c.parallel;
  auto opt_int = [&](const std::string& sec, const std::string& k, auto& out, int64_t min) {
    int64_t v = 0;
    if (!(sec.empty() ? tbl[k] : tbl[sec][k])) return;
    get_int(sec, k, v, min);
    LOOM_CHECK(v <= (int64_t(1) << 30), "{} = {} is too large (at most 2^30)", where(sec, k), v);
    using T = typename std::decay_t<decltype(out)>::value_type;
    out = T(v);
  };
  auto opt_str = [&](const std::string& sec, const std::string& k, std::optional<std::string>& out) {
    std::string v;
    if (!tbl[sec][k]) return;
    get_str(sec, k, v);
    out = v;
  };
  auto both = [&](const std::string& k) {
    LOOM_CHECK(!(tbl["train"][k] && tbl["parallel"][k]),
               "{}: train.{} and parallel.{} are the same setting; give only parallel.{}", path, k,
               k, k);
  };
  both("micro_batches");
  both("recompute");
  opt_int("parallel", "dp", ps.dp, 0);
  opt_int("parallel", "tp", ps.tp, 1);
  opt_int("parallel", "pp", ps.pp, 1);
  opt_int("parallel", "cp", ps.cp, 1);
  opt_int("parallel", "ep", ps.ep, 1);
  opt_int("parallel", "zero", ps.zero, 0);
  opt_int("parallel", "virtual_stages", ps.virtual_stages, 1);
  opt_int("parallel", "ranks_per_node", ps.ranks_per_node, 0);
  opt_int("train", "micro_batches", ps.micro_batches, 1);
  opt_int("parallel", "micro_batches", ps.micro_batches, 1);
  opt_str("train", "recompute", ps.recompute);
  opt_str("parallel", "recompute", ps.recompute);
  opt_str("parallel", "schedule", ps.schedule);
  opt_str("parallel", "cp_scheme", ps.cp_scheme);
  opt_str("parallel", "cp_layout", ps.cp_layout);
  opt_str("parallel", "ecss", ps.ecss);
  get_str("parallel", "ecss_store", c.ecss_store);
  if (auto node = tbl["parallel"]["cp_overlap"]) {
    LOOM_CHECK(node.is_boolean(), "{} must be true or false", where("parallel", "cp_overlap"));
    ps.cp_overlap = *node.value<bool>();
  }
  if (auto node = tbl["parallel"]["bucket_mb"]) {
    LOOM_CHECK(node.is_number() && *node.value<double>() > 0,
               "{} must be a positive number of MiB", where("parallel", "bucket_mb"));
    ps.bucket_mb = *node.value<double>();
  }
  if (auto node = tbl["parallel"]["stage_layers"]) {
    if (node.is_string()) {  // "5,6,6,5"
      ps.stage_layers = *node.value<std::string>();
    } else {
      LOOM_CHECK(node.is_array(), "{} must be a list of block counts", where("parallel", "stage_layers"));
      std::string list;
      for (auto& e : *node.as_array()) {
        LOOM_CHECK(e.is_integer() && *e.value<int64_t>() > 0, "{} entries must be positive integers",
                   where("parallel", "stage_layers"));
        if (!list.empty()) list += ',';
        list += std::to_string(*e.value<int64_t>());
      }
      ps.stage_layers = list;
    }
  }
  ps.override_with(flags);
  // Everything about the layout that does not depend on the number of ranks or the batch split
  // is checked now (make_train_plan checks the rest at launch).
  try {
    parallel::PlanSettings probe = ps;
    // dp automatic: the smallest dp that admits the ep size (ep | dp is checked at launch).
    if (!probe.dp || *probe.dp == 0) probe.dp = std::max(1, probe.ep.value_or(1));
    const int64_t divisible = int64_t(*probe.dp) * probe.micro_batches.value_or(1);
    parallel::ModelShape shape = plan_shape(c.model);
    shape.seq = c.seq;
    c.model.check_context_parallel(parallel::make_plan(probe, shape, divisible, 0).cp);
  } catch (const Error& e) {
    LOOM_FAIL("{}: {}", path, e.what());
  }
  get_str("log", "dir", c.log_dir);
  get_int("log", "every", c.log_every, 1);
  return c;
}

parallel::ModelShape plan_shape(const model::ModelConfig& m) {
  parallel::ModelShape shape{m.n_layers, m.n_heads, m.n_kv_heads, m.d_ff, m.vocab, 0};
  shape.experts = m.moe.enabled() ? m.moe.experts : 0;  // by name: ModelShape grows fields
  return shape;
}

parallel::ParallelPlan make_train_plan(const TrainConfig& cfg, int world_size) {
  parallel::ModelShape shape = plan_shape(cfg.model);
  shape.seq = cfg.seq;
  parallel::ParallelPlan p = parallel::make_plan(cfg.parallel, shape, cfg.batch, world_size);
  cfg.model.check_context_parallel(p.cp);
  LOOM_CHECK((p.micro_batch_size * cfg.seq) % p.tp == 0,
             "tp = {}: sequence parallelism splits a micro-batch's {} x {} = {} token rows over the "
             "tp ranks; choose train.batch, train.seq and micro_batches so that (batch / (dp x "
             "micro_batches)) x seq is divisible by {}",
             p.tp, p.micro_batch_size, cfg.seq, p.micro_batch_size * cfg.seq, p.tp);
  return p;
}

}  // namespace loom::train
