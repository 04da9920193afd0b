// train/trainer.cpp: a training run of any layout (see trainer.h).
//
// Glossary: G global batch, dp/tp/pp the layout, M micro-batches, b micro-batch size, T
// sequence, n elements of this tp rank's flat parameter buffer.
#include "train/trainer.h"

#include <chrono>
#include <cstring>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <numeric>

#include "checkpoint/sharded.h"
#include "core/error.h"
#include "core/log.h"
#include "core/threads.h"
#include "core/rng.h"
#include "data/data_meta.h"
#include "data/token_stream.h"
#include "interop/model_checkpoint.h"
#include "kernels/cpu/matmul.h"
#include "model/memory.h"
#include "model/moe.h"
#include "parallel/topology.h"
#include "train/loop.h"

namespace fs = std::filesystem;

namespace loom::train {

namespace {

// The process's peak resident set (VmHWM) in KiB, or -1 where /proc does not say.
int64_t peak_rss_kib() {
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line))
    if (line.rfind("VmHWM:", 0) == 0) return std::strtoll(line.c_str() + 6, nullptr, 10);
  return -1;
}

// Bytes the kernel says can be allocated without swapping (MemAvailable), or -1 if unknown.
int64_t available_memory_bytes() {
  std::ifstream f("/proc/meminfo");
  std::string line;
  while (std::getline(f, line))
    if (line.rfind("MemAvailable:", 0) == 0) return std::strtoll(line.c_str() + 13, nullptr, 10) * 1024;
  return -1;
}

const comm::ProcessGroup* real(const comm::ProcessGroup* g) {
  return g && g->valid() && g->size() > 1 ? g : nullptr;
}

// The plan of a trainer built on these groups: the config's settings with the groups' sizes.
parallel::ParallelPlan plan_for_groups(const TrainConfig& cfg, const comm::ProcessGroup* dp,
                                       const comm::ProcessGroup* tp, const comm::ProcessGroup* pp,
                                       const comm::ProcessGroup* cp) {
  TrainConfig c = cfg;
  parallel::PlanSettings& s = c.parallel;
  auto size = [](const comm::ProcessGroup* g) { return g ? g->size() : 1; };
  auto agree = [](std::optional<int>& setting, int actual, const char* axis) {
    LOOM_CHECK(!setting || *setting == actual || (*setting == 0 && std::string(axis) == "dp"),
               "the config sets parallel.{} = {} but the run's {} group has {} rank(s); set "
               "parallel.{} = {} or launch the matching layout",
               axis, *setting, axis, actual, axis, actual);
    setting = actual;
  };
  agree(s.dp, size(dp), "dp");
  agree(s.tp, size(tp), "tp");
  agree(s.pp, size(pp), "pp");
  agree(s.cp, size(cp), "cp");
  return make_train_plan(c, size(dp) * size(tp) * size(pp) * size(cp));
}

}  // namespace

Trainer::Trainer(const TrainConfig& cfg, MemoryPool& pool, const comm::ProcessGroup* dp,
                 const comm::ProcessGroup* tp, const comm::ProcessGroup* pp,
                 const comm::ProcessGroup* cp, const comm::ProcessGroup* dp_cp)
    : cfg_(cfg), plan_(plan_for_groups(cfg, real(dp), real(tp), real(pp), real(cp))), pool_(pool) {
  if (real(dp)) dp_ = *dp;
  if (real(tp)) tp_ = *tp;
  if (real(pp)) pp_ = *pp;
  if (real(cp)) cp_ = *cp;
  LOOM_CHECK(!real(cp) || (dp_cp && dp_cp->valid() && dp_cp->size() == plan_.dp * plan_.cp),
             "context parallel (cp = {}) needs the dp x cp gradient-reduction group of {} ranks "
             "(parallel::ProcessGroups::dp_cp), got {}",
             plan_.cp, plan_.dp * plan_.cp, dp_cp && dp_cp->valid() ? dp_cp->size() : 0);
  // Gradients reduce over every replica of the weights: dp, and under cp dp x cp.
  const comm::ProcessGroup* reduce = real(cp) ? dp_cp : real(dp);
  ExecutorConfig ec;
  ec.plan = plan_;
  ec.precision = cfg_.precision;
  ec.optim = cfg_.optim;
  ec.ecss_store = cfg_.ecss_store;
  exec_ = std::make_unique<Executor>(cfg_.model, ec, pool_, reduce, real(tp), real(pp), real(cp));
  const int64_t M = plan_.micro_batches, b = plan_.micro_batch_size, T = cfg_.seq;
  global_.resize(size_t(cfg_.batch * (T + 1)));
  language_domains_ = cfg_.model.language_domains();
  tokens_.resize(size_t(M * b * (T + 1)));
}

Trainer::~Trainer() = default;

std::unique_ptr<data::TokenStream> Trainer::make_stream(const std::string& split) const {
  // One global sequence of windows for every rank and layout (see trainer.h).
  if (cfg_.data_source == "synthetic") {
    // The synthetic sequence is interleaved 2 ways: even windows train, odd windows validate.
    return data::make_synthetic_stream(cfg_.model.vocab, cfg_.data_seed, split == "train" ? 0 : 1,
                                       2);
  }
  return data::open_shard_stream(cfg_.data_path, split, cfg_.data_seed, 0, 1);
}

void Trainer::next_windows(data::TokenStream& stream, std::vector<int32_t>& mine,
                           std::vector<int32_t>& domains) {
  const int64_t G = cfg_.batch, T = cfg_.seq, per_rank = G / dp_size();
  const int64_t first_row = int64_t(dp_rank()) * per_rank * (T + 1);
  domains.clear();
  if (language_domains_.empty()) {
    stream.next_batch(global_.data(), nullptr, G, T);
  } else {
    // rre MoE: every token's domain from its document's language (unknown -> "other").
    global_langs_.resize(global_.size());
    stream.next_batch_token_languages(global_.data(), global_langs_.data(), G, T);
    const int32_t other = int32_t(cfg_.model.moe.other_domain());
    domains.resize(size_t(per_rank * (T + 1)));
    for (size_t i = 0; i < domains.size(); ++i) {
      const int32_t l = global_langs_[size_t(first_row) + i];
      domains[i] = l >= 0 && size_t(l) < language_domains_.size() ? language_domains_[size_t(l)]
                                                                  : other;
    }
  }
  const int32_t* first = global_.data() + first_row;
  mine.assign(first, first + per_rank * (T + 1));  // (M, b, T+1): micro-batch major
}

void Trainer::init_fresh() {
  exec_->init_weights(cfg_.seed);
  const model::MoeConfig& moe = cfg_.model.moe;
  if (moe.enabled() && moe.router == model::Router::rre && moe.rre_table == model::RreTable::balanced)
    init_balanced_rre_tables();
  train_stream_ = make_stream("train");
  LOOM_CHECK(train_stream_->vocab_size() <= cfg_.model.vocab,
             "the data's vocabulary ({} tokens) is larger than the model's vocab = {}; set the "
             "model's vocab to at least {}",
             train_stream_->vocab_size(), cfg_.model.vocab, train_stream_->vocab_size());
}

void Trainer::init_balanced_rre_tables() {
  const model::ModelConfig& m = cfg_.model;
  LOOM_CHECK(cfg_.data_source != "synthetic",
             "model '{}' asks for rre_table = \"balanced\", which is built from the corpus's "
             "per-language token counts, but the data source is synthetic; train on a corpus from "
             "`loom data build` or set rre_table = \"uniform\"",
             m.name);
  int64_t V = 0;
  const std::vector<int64_t> by_lang = data::read_token_counts(cfg_.data_path, &V);
  LOOM_CHECK(V <= m.vocab, "the data's vocabulary ({}) exceeds the model's vocab = {}", V, m.vocab);
  // Per-domain counts (D, model vocab): each language's counts go to its domain.
  const int64_t D = m.moe.num_domains(), G = m.moe.experts_per_domain;
  std::vector<int64_t> counts(size_t(D * m.vocab), 0);
  for (size_t l = 0; l < language_domains_.size(); ++l)
    for (int64_t t = 0; t < V; ++t)
      counts[size_t(language_domains_[l] * m.vocab + t)] += by_lang[size_t(int64_t(l) * V + t)];
  const std::vector<int32_t> table = model::balanced_rre_table(counts, D, m.vocab, G);
  std::vector<int32_t> uniform(table.size());
  for (size_t i = 0; i < uniform.size(); ++i)
    uniform[i] = int32_t(rng_u64(cfg_.seed, rng_stream_id("blocks.moe.rre_table"), i) % uint64_t(G));
  if (dp_rank() == 0 && tp_rank() == 0 && pp_rank() == 0)
    LOOM_LOG_INFO("rre table: frequency-balanced from {} train tokens; expected max/mean expert load "
            "{:.3f} (a uniform table: {:.3f})",
            std::accumulate(counts.begin(), counts.end(), int64_t(0)),
            model::rre_table_max_over_mean(table, counts, D, m.vocab, G),
            model::rre_table_max_over_mean(uniform, counts, D, m.vocab, G));
  // Into every held rre table, wherever the executor keeps it (ZeRO stores included).
  exec_->load_checkpoint(
      [&](const char* kind, const ParamSpec& spec, int64_t lo, int64_t hi, float* dst) {
        if (std::string(kind) != "weights" || spec.name.find(".moe.rre_table") == std::string::npos)
          return;
        for (int64_t i = lo; i < hi; ++i) dst[i - lo] = float(table[size_t(i)]);
      },
      /*moments=*/false, 0);
}

void Trainer::resume(const std::string& dir) {
  // Any layout's checkpoint (sharded, or the pre-sharding whole-model format): each rank reads
  // only the byte ranges of the tensors it holds, straight into its own buffers.
  checkpoint::ShardedReader r(dir);
  // BF16 / F16 weights widen exactly into the f32 masters; int8 rows (`loom quantize`) are an
  // inference format whose rounding training would bake in: refuse them.
  for (const std::string& n : r.names("weights")) {
    if (r.dtype("weights", n) != DType::i8) continue;
    const nlohmann::json& st = r.trainer_state();
    const nlohmann::json q = st.is_object() && st.contains("quantized") && st["quantized"].is_object()
                                 ? st["quantized"]
                                 : nlohmann::json::object();
    const std::string from = q.contains("from") && q["from"].is_string()
                                 ? " ('" + q["from"].get<std::string>() + "')"
                                 : std::string();
    LOOM_FAIL("checkpoint '{}' holds int8-quantized weights (e.g. '{}', written by `loom "
              "quantize`), an inference-only format: train from the f32 checkpoint it was "
              "quantized from{}", r.dir(), n, from);
  }
  interop::expect_same_model(
      model::model_config_from_toml(r.config_toml(), r.dir() + "/config.toml"), cfg_.model,
      r.dir());
  const nlohmann::json& st = r.trainer_state();
  const bool moments = r.has("m") && r.has("v");
  int64_t step = 0;
  if (r.legacy_optimizer_step() >= 0) {
    step = r.legacy_optimizer_step();
  } else {
    const char* key = st.contains("optimizer_step") ? "optimizer_step" : "step";
    LOOM_CHECK(st.contains(key) && st[key].is_number_integer() && st[key].get<int64_t>() >= 0,
               "'{}/trainer_state.json': key '{}' must be an integer >= 0", r.dir(), key);
    step = st[key].get<int64_t>();
  }
  exec_->load_checkpoint(
      [&](const char* kind, const ParamSpec& spec, int64_t lo, int64_t hi, float* dst) {
        r.read(kind, checkpoint::piece_of(spec, lo, hi), dst);
      },
      moments, step);
  if (moments && plan_.ecss == "lazy" && st.contains("ecss_expert_steps")) {
    // ECSS lazy: the saved per-expert counts (a checkpoint without them: every expert at the
    // optimizer step, set by load_checkpoint).
    std::map<int64_t, std::vector<int64_t>> steps;
    const nlohmann::json& j = st["ecss_expert_steps"];
    LOOM_CHECK(j.is_object(), "'{}/trainer_state.json': ecss_expert_steps must be an object",
               r.dir());
    for (auto it = j.begin(); it != j.end(); ++it) {
      LOOM_CHECK(it.value().is_array(),
                 "'{}/trainer_state.json': ecss_expert_steps['{}'] must be a list of counts",
                 r.dir(), it.key());
      steps[std::stoll(it.key())] = it.value().get<std::vector<int64_t>>();
    }
    exec_->set_ecss_expert_steps(steps);
  }
  train_stream_ = make_stream("train");
  if (st.contains("data")) train_stream_->restore(st["data"]);
  if (!st.contains("plan"))
    LOOM_LOG_WARN("checkpoint {} predates global batches: there train.batch was per dp rank and "
                  "micro-batch (dp = {}); this run reads train.batch = {} as the global batch "
                  "(sequences per optimizer step) from the saved data position",
                  r.dir(), st.value("dp", 1), cfg_.batch);
}

StepStats Trainer::train_step() {
  LOOM_CHECK(train_stream_ != nullptr, "train_step() before init_fresh() or resume()");
  auto t0 = std::chrono::steady_clock::now();
  next_windows(*train_stream_, tokens_, domains_);
  StepResult r = exec_->train_step(tokens_.data(), plan_.micro_batch_size, cfg_.seq,
                                   domains_.empty() ? nullptr : domains_.data());
  StepStats s;
  s.step = r.step;
  s.loss = r.loss;
  s.lr = r.lr;
  s.grad_norm = r.grad_norm;
  s.dp_wait_s = r.dp_wait_s;
  s.optimizer_s = r.optimizer_s;
  s.zero_gather_s = r.zero_gather_s;
  s.cp_workspace_bytes = r.cp_workspace_bytes;
  s.cp_wait_s = r.cp_wait_s;
  s.ecss = r.ecss;
  s.step_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const double tokens = double(cfg_.batch * cfg_.seq);
  s.tokens_per_s = tokens / s.step_s;
  s.gflops = cfg_.model.train_flops_per_token(cfg_.seq) * tokens / s.step_s / 1e9;
  return s;
}

double Trainer::eval_loss(int64_t batches) {
  auto stream = make_stream("val");
  const int64_t b = plan_.micro_batch_size, T = cfg_.seq;
  std::vector<int32_t> tokens(size_t(batches * b * (T + 1)));
  std::vector<int32_t> domains;
  if (language_domains_.empty()) {
    for (int64_t i = 0; i < batches; ++i)
      stream->next_batch(tokens.data() + i * b * (T + 1), nullptr, b, T);
  } else {
    domains.resize(tokens.size());
    for (int64_t i = 0; i < batches; ++i)
      stream->next_batch_token_languages(tokens.data() + i * b * (T + 1),
                                         domains.data() + i * b * (T + 1), b, T);
    const int32_t other = int32_t(cfg_.model.moe.other_domain());
    for (int32_t& d : domains)
      d = d >= 0 && size_t(d) < language_domains_.size() ? language_domains_[size_t(d)] : other;
  }
  return exec_->eval_loss(tokens.data(), batches, b, T, domains.empty() ? nullptr : domains.data());
}

nlohmann::json Trainer::data_state() const {
  return train_stream_ ? train_stream_->state() : nlohmann::json();
}

bool Trainer::any_rank(bool flag) const {
  // A max over each axis in turn is the max over the whole grid.
  int32_t v = flag ? 1 : 0;
  for (const comm::ProcessGroup* g : {&tp_, &dp_, &pp_, &cp_})
    if (g->valid()) g->all_reduce(comm::BufferRef(&v, 1, DType::i32), comm::ReduceOp::max).wait();
  return v != 0;
}

std::vector<float> Trainer::full_weights() const {
  const model::ParamLayout& layout = exec_->chunk(0).global_layout();
  std::vector<float> w(size_t(layout.total()), 0.f);
  exec_->export_weights(w.data());  // collective over dp under ZeRO-3 and bf16 ECSS ZeRO-1
  // Expert parallel: each ep rank wrote its experts only (the rest are 0): a sum fills them in.
  if (const comm::ProcessGroup* ep = exec_->ep_group())
    for (int64_t l : cfg_.model.moe.sparse_layers) {
      const model::BlockOffsets& o = layout.block(l);
      ep->all_reduce(comm::BufferRef(w.data() + o.moe_experts,
                                     o.moe_n_experts * o.moe_stride,
                                     DType::f32))
          .wait();
    }
  // Every tensor has one owner among the pp ranks: a sum fills in the rest.
  if (pp_.valid()) pp_.all_reduce(comm::BufferRef(w.data(), layout.total(), DType::f32)).wait();
  if (tp_.valid()) return model::gather_tp_buffer(cfg_.model, layout, w.data(), tp_);
  return w;
}

void Trainer::save(const std::string& dir) {
  // Every rank writes its own pieces of the logical tensors straight from its buffers (no
  // gather, no whole-model buffer anywhere); one rank writes the index and commits atomically
  // (checkpoint/sharded.h, commit.h). The writer's group spans the run's ranks.
  const int64_t rss_before = peak_rss_kib();
  const int ranks = dp_size() * tp_size() * pp_size() * cp_size();
  comm::ProcessGroup all;
  if (ranks > 1) {
    all = comm::ProcessGroup::world();
    LOOM_CHECK(all.size() == ranks,
               "saving needs every rank of MPI's world in this run: the run has {} ranks, the "
               "world {}",
               ranks, all.size());
  }
  checkpoint::WriterOptions wo;
  wo.keep = int(cfg_.checkpoint_keep);
  wo.step = step();
  checkpoint::ShardedWriter w(dir, all.valid() ? &all : nullptr, wo);
  exec_->for_each_checkpoint_piece(
      [&](const char* kind, const ParamSpec& spec, int64_t lo, int64_t hi, const float* data) {
        w.add(kind, checkpoint::piece_of(spec, lo, hi), data);
      });
  nlohmann::json state = {{"step", step()},
                          {"optimizer_step", step()},
                          {"data", data_state()},
                          {"seed", cfg_.seed},
                          {"precision", cfg_.precision == model::Precision::bf16 ? "bf16" : "f32"},
                          {"config_file", cfg_.source_path},
                          {"global_batch", cfg_.batch},
                          {"seq", cfg_.seq},
                          {"plan", plan_.to_json()}};
  if (plan_.ecss == "lazy") {
    // ECSS lazy: every sparse block's per-expert update counts (optim/expert_store.h). Each
    // rank knows its stages' blocks; a max over the world fills in the others.
    const model::MoeConfig& moe = cfg_.model.moe;
    const int64_t E = moe.experts;
    std::vector<int64_t> all_steps(size_t(cfg_.model.n_layers * E), 0);
    for (const auto& [l, v] : exec_->ecss_expert_steps())
      for (size_t e = 0; e < v.size(); ++e) all_steps[size_t(l * E) + e] = v[e];
    if (all.valid())
      all.all_reduce(comm::BufferRef(all_steps.data(), int64_t(all_steps.size()), DType::i64),
                     comm::ReduceOp::max)
          .wait();
    nlohmann::json j = nlohmann::json::object();
    for (int64_t l : moe.sparse_layers)
      j[std::to_string(l)] = std::vector<int64_t>(all_steps.begin() + l * E,
                                                  all_steps.begin() + (l + 1) * E);
    state["ecss_expert_steps"] = j;
  }
  // The tokenizer travels with the checkpoint so `loom generate` can decode without the data.
  const std::string tokenizer_dir = cfg_.data_path + "/tokenizer";
  auto copy_tokenizer = [&](const std::string& staging) {
    if (cfg_.data_source == "shards" && fs::is_directory(tokenizer_dir))
      fs::copy(tokenizer_dir, staging + "/tokenizer", fs::copy_options::recursive);
  };
  const checkpoint::CommitResult done = w.commit(cfg_.model.to_toml(), state, copy_tokenizer);
  LOOM_LOG_DEBUG("checkpoint {} committed ({} bytes from this rank)", done.dir, done.shard_bytes);
  // LOOM_SAVE_RSS=1: every rank reports how much the save raised its peak resident set (the
  // measurement behind docs/status.md's save-memory figures).
  if (std::getenv("LOOM_SAVE_RSS"))
    std::fprintf(stderr, "save rss: rank %d/%d peak %lld KiB before the save, %lld KiB after\n",
                 all.valid() ? all.rank() : 0, ranks, (long long)rss_before,
                 (long long)peak_rss_kib());
}

StepStats run_training(const TrainConfig& cfg, const std::string& resume_dir,
                       const comm::ProcessGroup* world) {
  const int world_size = world ? world->size() : 1;
  // The plan first: every layout error before anything is allocated.
  const parallel::ParallelPlan plan = make_train_plan(cfg, world_size);
  parallel::ParallelSizes sizes;
  sizes.dp = plan.dp;
  sizes.tp = plan.tp;
  sizes.pp = plan.pp;
  sizes.cp = plan.cp;
  // cp next to tp: both talk in every layer, so they get the closest ranks.
  const parallel::Topology topo(world_size, sizes, "tp-cp-dp-pp");
  parallel::ProcessGroups groups;
  if (world) groups = parallel::ProcessGroups::build(topo, *world);
  const bool leader = !world || world->rank() == 0;
  if (world && world_size > 1) {
    set_log_rank(world->rank(), world_size);
    if (!leader) set_log_level(LogLevel::warn);
  }
  if (world && world_size > 1 && leader) parallel::log_placement(topo, *world);
  set_num_threads(cfg.threads > 0 ? int(cfg.threads)
                                  : default_num_threads(world ? world->host_ranks() : 1));
  // The per-rank memory model prices this rank before anything is allocated: a plan that cannot
  // fit this machine's available memory (shared by the ranks on this host) is refused with both
  // numbers, instead of being killed by the kernel's OOM killer part-way.
  const int world_rank = world ? world->rank() : 0;
  const model::RankMemory predicted =
      model::memory_per_rank(cfg.model, plan, world_rank, cfg.seq, cfg.precision);
  {
    const int64_t avail = available_memory_bytes();
    const int host_ranks = world ? world->host_ranks() : 1;
    LOOM_CHECK(avail < 0 || predicted.total() <= avail / host_ranks,
               "[rank {}] this plan needs {:.2f} GiB on this rank (weights {:.2f}, grads {:.2f}, "
               "optimizer {:.2f}, activations {:.2f}, workspace {:.2f}, comm {:.2f}) but the "
               "machine has {:.2f} GiB available for {} rank(s) here, {:.2f} GiB each; use more "
               "ranks, ZeRO, recompute, a smaller micro-batch or a smaller model "
               "(`loom info` prices any plan)",
               world_rank, predicted.total() / 1073741824.0, predicted.weights() / 1073741824.0,
               predicted.grads() / 1073741824.0, predicted.optimizer() / 1073741824.0,
               predicted.activations() / 1073741824.0, predicted.workspace() / 1073741824.0,
               predicted.comm() / 1073741824.0, avail / 1073741824.0, host_ranks,
               avail / 1073741824.0 / host_ranks);
  }
  MemoryPool pool;
  Trainer trainer(cfg, pool, world ? &groups.dp : nullptr, world ? &groups.tp : nullptr,
                  world ? &groups.pp : nullptr, world ? &groups.cp : nullptr,
                  world ? &groups.dp_cp : nullptr);
  LOOM_LOG_INFO("plan: {}", trainer.plan().describe());
  LOOM_LOG_INFO("memory per rank (model/memory.h, rank 0): {:.1f} MiB (weights {:.1f}, grads "
                "{:.1f}, optimizer {:.1f}, activations {:.1f}, workspace {:.1f}, comm {:.1f})",
                predicted.total() / 1048576.0, predicted.weights() / 1048576.0,
                predicted.grads() / 1048576.0, predicted.optimizer() / 1048576.0,
                predicted.activations() / 1048576.0, predicted.workspace() / 1048576.0,
                predicted.comm() / 1048576.0);
  if (predicted.host_store > 0)
    LOOM_LOG_INFO("outside the pool (rank 0): ECSS host expert store {:.1f} MiB",
                  predicted.host_store / 1048576.0);
  if (resume_dir.empty()) {
    trainer.init_fresh();
  } else {
    trainer.resume(resume_dir);
    LOOM_LOG_INFO("resumed from {} at step {}", resume_dir, trainer.step());
  }
  const double peak = kernels::measure_matmul_peak_gflops(cfg.precision == model::Precision::bf16);
  LOOM_LOG_INFO("model {}: {} parameters, {} threads per rank, matmul peak {:.0f} GFLOP/s per "
                "rank ({})",
                cfg.model.name, cfg.model.num_params(), num_threads(), peak,
                cfg.precision == model::Precision::bf16 ? "bf16" : "f32");
  LoopHooks hooks;
  hooks.step = [&] { return trainer.step(); };
  // The memory model is checked against what the pool measures: a step whose peak exceeds the
  // prediction in any category is a bug in the model (or an engine change it missed). The loop
  // resets the peaks before every step, so only the step itself is measured here.
  bool memory_warned = false;
  hooks.train_step = [&] {
    StepStats st = trainer.train_step();
    for (size_t c = 0; c < kNumMemCategories && !memory_warned; ++c) {
      const auto cat = MemCategory(c);
      if (pool.peak(cat) > predicted[cat]) {
        LOOM_LOG_WARN("memory model under-predicts {} on rank {}: measured peak {} bytes, "
                      "predicted {} (internal error in model/memory.cpp, please report)",
                      mem_category_name(cat), world_rank, pool.peak(cat), predicted[cat]);
        memory_warned = true;
      }
    }
    return st;
  };
  hooks.eval_loss = [&] { return trainer.eval_loss(cfg.eval_batches); };
  hooks.save = [&](const std::string& dir) { trainer.save(dir); };
  hooks.any_rank = [&](bool flag) { return trainer.any_rank(flag); };
  LoopContext ctx;
  ctx.pool = &pool;
  ctx.leader = leader;
  ctx.world_rank = world ? world->rank() : 0;
  ctx.world_size = world_size;
  ctx.peak_gflops = peak;
  if (world) ctx.groups = {&groups.dp, &groups.tp, &groups.pp, &groups.cp, &groups.dp_cp};
  return run_loop(cfg, hooks, ctx, !resume_dir.empty());
}

}  // namespace loom::train
