#include "train/trainer.h"

#include <chrono>
#include <cstdio>
#include <filesystem>

#include "checkpoint/checkpoint.h"
#include "core/error.h"
#include "core/log.h"
#include "core/threads.h"
#include "data/token_stream.h"
#include "kernels/cpu/grad_norm.h"
#include "kernels/cpu/matmul.h"
#include "train/loop.h"
#include "train/pipeline_run.h"
#include "parallel/topology.h"

#include <fmt/ranges.h>

namespace fs = std::filesystem;

namespace loom::train {

Trainer::Trainer(const TrainConfig& cfg, MemoryPool& pool, const comm::ProcessGroup* dp,
                 const comm::ProcessGroup* tp)
    : cfg_(cfg),
      pool_(pool),
      dp_(dp && dp->size() > 1 ? dp : nullptr),
      tp_(tp && tp->size() > 1 ? tp : nullptr) {
  if (cfg_.zero >= 2 && dp_) {
    model::ParamLayout layout(cfg_.model, tp_ ? model::TpShard{tp_->rank(), tp_->size()}
                                              : model::TpShard{});
    zero_ = std::make_unique<ZeroStore>(int(cfg_.zero), model_zero_space(cfg_.model, layout),
                                        cfg_.precision, pool_, *dp_, tp_);
    model_ = std::make_unique<model::Gpt>(cfg_.model, pool_, cfg_.precision, tp_, zero_.get());
    model_->set_recompute(cfg_.recompute);
    optimizer_ = std::make_unique<optim::AdamW>(model_->layout(), cfg_.optim, pool_, zero_->pieces());
    tokens_.resize(size_t(cfg_.batch * (cfg_.seq + 1)));
    return;
  }
  model_ = std::make_unique<model::Gpt>(cfg_.model, pool_, cfg_.precision, tp_);
  model_->set_recompute(cfg_.recompute);
  const int64_t total = model_->layout().total();
  int64_t begin = 0, end = total;
  if (cfg_.zero >= 1 && dp_) {
    // Equal shards of the flat buffer (the last may be shorter or empty).
    const int64_t shard = (total + dp_size() - 1) / dp_size();
    begin = std::min(total, shard * dp_rank());
    end = std::min(total, begin + shard);
  }
  optimizer_ = std::make_unique<optim::AdamW>(model_->layout(), cfg_.optim, pool_, begin, end);
  tokens_.resize(size_t(cfg_.batch * (cfg_.seq + 1)));
}

Trainer::~Trainer() = default;

std::unique_ptr<data::TokenStream> Trainer::make_stream(const std::string& split) const {
  // Training windows: dp rank r takes windows k = r (mod dp) of the group's sequence, so the dp
  // ranks together see exactly the windows a single rank would see with dp times the batch.
  // Validation is the same on every rank.
  if (cfg_.data_source == "synthetic") {
    // The synthetic sequence is interleaved 2 ways: even windows train, odd windows validate.
    if (split == "train")
      return data::make_synthetic_stream(cfg_.model.vocab, cfg_.data_seed, 2 * dp_rank(),
                                         2 * dp_size());
    return data::make_synthetic_stream(cfg_.model.vocab, cfg_.data_seed, 1, 2);
  }
  if (split == "train")
    return data::open_shard_stream(cfg_.data_path, split, cfg_.data_seed, dp_rank(), dp_size());
  return data::open_shard_stream(cfg_.data_path, split, cfg_.data_seed, 0, 1);
}

void Trainer::init_fresh() {
  if (zero_)
    zero_->init(cfg_.seed);
  else
    model_->init_weights(cfg_.seed);
  train_stream_ = make_stream("train");
  LOOM_CHECK(train_stream_->vocab_size() <= cfg_.model.vocab,
             "the data's vocabulary ({} tokens) is larger than the model's vocab = {}; set the "
             "model's vocab to at least {}",
             train_stream_->vocab_size(), cfg_.model.vocab, train_stream_->vocab_size());
}

void Trainer::resume(const std::string& dir) {
  checkpoint::CheckpointReader r(dir);
  r.expect_config(cfg_.model);
  model_->zero_grads();
  if (zero_) {
    zero_->load(r, model_->layout());
  } else {
    r.load_weights(model_->layout(), model_->weights());
    model_->sync_low_precision_weights();
  }
  if (r.has_optimizer() && zero_) {
    // ZeRO-2/3: each rank reads the moments of its pieces only.
    int64_t s = 0, off = 0;
    for (const optim::Range& p : optimizer_->ranges()) {
      if (p.end > p.begin)
        s = r.load_optimizer(model_->layout(), optimizer_->m() + off, optimizer_->v() + off,
                             p.begin, p.end);
      off += p.end - p.begin;
    }
    optimizer_->set_step_count(s);
  } else if (r.has_optimizer()) {
    // Each rank reads only its shard: a checkpoint from any dp/zero layout loads at any other.
    int64_t s = r.load_optimizer(model_->layout(), optimizer_->m(), optimizer_->v(),
                                 optimizer_->begin(), optimizer_->end());
    optimizer_->set_step_count(s);
  }
  train_stream_ = make_stream("train");
  if (r.trainer_state().contains("data")) train_stream_->restore(r.trainer_state()["data"]);
}

StepStats Trainer::train_step() {
  LOOM_CHECK(train_stream_ != nullptr, "train_step() before init_fresh() or resume()");
  auto t0 = std::chrono::steady_clock::now();
  const int64_t B = cfg_.batch, T = cfg_.seq, M = cfg_.micro_batches;
  const float grad_scale = 1.0f / float(B * T * M * dp_size());
  model_->zero_grads();
  if (zero_) zero_->zero_grads();
  double loss[2] = {0, 0};  // summed loss, counted tokens
  for (int64_t mb = 0; mb < M; ++mb) {
    train_stream_->next_batch(tokens_.data(), nullptr, B, T);
    if (zero_) {
      // ZeRO-2/3: every micro-batch's unit gradients are reduce-scattered during its backward.
      model::LossSum l = model_->forward_backward(tokens_.data(), B, T, grad_scale);
      zero_->finish_micro_batch();
      loss[0] += l.sum;
      loss[1] += double(l.count);
      continue;
    }
    // Gradients are final only during the last micro-batch's backward: reduce them then.
    if (dp_ && mb == M - 1)
      model_->set_grad_ready_hook([this](int64_t b, int64_t e) { reduce_gradients_start(b, e); });
    model::LossSum l = model_->forward_backward(tokens_.data(), B, T, grad_scale);
    model_->set_grad_ready_hook(nullptr);
    loss[0] += l.sum;
    loss[1] += double(l.count);
  }
  const auto t_wait = std::chrono::steady_clock::now();
  if (dp_ && !zero_) {
    if (bucket_lo_ >= 0) {
      pending_.push_back(dp_->all_reduce(
          comm::BufferRef(model_->grads() + bucket_lo_, bucket_hi_ - bucket_lo_, DType::f32)));
      bucket_lo_ = bucket_hi_ = -1;
    }
    for (auto& w : pending_) w.wait();
    pending_.clear();
  }
  const double dp_wait_s =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t_wait).count();
  if (dp_) dp_->all_reduce(comm::BufferRef(loss, 2, DType::f64)).wait();
  // tp: the replicated tensors' partial gradients (from each rank's rows) are summed.
  if (!zero_) model_->reduce_replicated_grads();
  // After the all-reduce every rank holds the same full gradient, hence the same norm (ZeRO-2/3:
  // the sum of the shards' squares over dp).
  double norm = std::sqrt(zero_ ? zero_->grad_sum_squares() : model_->grad_sum_squares());
  float factor = cfg_.optim.clip > 0 ? kernels::clip_factor(norm, cfg_.optim.clip) : 1.0f;
  StepStats s;
  s.lr = optim::lr_at(cfg_.optim, optimizer_->step_count() + 1);
  if (zero_) {
    zero_->step(*optimizer_, factor);
  } else {
    optimizer_->step(model_->weights(), model_->grads(), factor);
    if (dp_ && cfg_.zero >= 1) broadcast_weight_shards();
    model_->sync_low_precision_weights();
  }
  s.step = optimizer_->step_count();
  s.loss = loss[1] > 0 ? loss[0] / loss[1] : 0.0;
  s.grad_norm = norm;
  s.dp_wait_s = dp_wait_s;
  s.step_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  double tokens = double(B * T * M * dp_size());
  s.tokens_per_s = tokens / s.step_s;
  s.gflops = cfg_.model.train_flops_per_token(T) * tokens / s.step_s / 1e9;
  return s;
}

void Trainer::reduce_gradients_start(int64_t begin, int64_t end) {
  // Ranges arrive back to front and tile the buffer, so a bucket grows downwards.
  if (bucket_lo_ < 0) {
    bucket_lo_ = begin;
    bucket_hi_ = end;
  } else {
    LOOM_ASSERT(end == bucket_lo_, "gradient range [{}, {}) does not continue bucket [{}, {})",
                begin, end, bucket_lo_, bucket_hi_);
    bucket_lo_ = begin;
  }
  const int64_t bucket_elems = std::max<int64_t>(1, int64_t(cfg_.bucket_mb * (1 << 20) / 4));
  if (bucket_hi_ - bucket_lo_ >= bucket_elems) {
    pending_.push_back(dp_->all_reduce(
        comm::BufferRef(model_->grads() + bucket_lo_, bucket_hi_ - bucket_lo_, DType::f32)));
    bucket_lo_ = bucket_hi_ = -1;
  }
  // MPI progresses only inside MPI calls: poke the reductions in flight between layers.
  for (auto& w : pending_) w.test();
}

void Trainer::broadcast_weight_shards() {
  const int64_t total = model_->layout().total();
  const int64_t shard = (total + dp_size() - 1) / dp_size();
  std::vector<comm::Work> works;
  for (int r = 0; r < dp_size(); ++r) {
    int64_t lo = std::min(total, shard * r), hi = std::min(total, lo + shard);
    if (hi > lo)
      works.push_back(dp_->broadcast(comm::BufferRef(model_->weights() + lo, hi - lo, DType::f32), r));
  }
  for (auto& w : works) w.wait();
}

bool Trainer::any_rank(bool flag) const {
  int32_t v = flag ? 1 : 0;
  for (const comm::ProcessGroup* g : {dp_, tp_})
    if (g) g->all_reduce(comm::BufferRef(&v, 1, DType::i32), comm::ReduceOp::max).wait();
  return v != 0;
}


std::vector<float> Trainer::full_weights() const {
  std::vector<float> z;
  if (zero_) {
    z = zero_->full_weights();
    if (!tp_) return z;
  }
  const float* w = zero_ ? z.data() : model_->weights();
  if (!tp_) return std::vector<float>(w, w + model_->layout().total());
  return model::gather_tp_buffer(cfg_.model, model_->layout(), w, *tp_);
}

double Trainer::eval_loss(int64_t batches) {
  auto stream = make_stream("val");
  double sum = 0;
  int64_t count = 0;
  for (int64_t i = 0; i < batches; ++i) {
    stream->next_batch(tokens_.data(), nullptr, cfg_.batch, cfg_.seq);
    model::LossSum l = model_->forward_loss(tokens_.data(), cfg_.batch, cfg_.seq);
    sum += l.sum;
    count += l.count;
  }
  return count ? sum / double(count) : 0.0;
}

nlohmann::json Trainer::data_state() const {
  return train_stream_ ? train_stream_->state() : nlohmann::json();
}

void Trainer::save(const std::string& dir) {
  nlohmann::json state = {{"step", step()},
                          {"data", data_state()},
                          {"seed", cfg_.seed},
                          {"precision", cfg_.precision == model::Precision::bf16 ? "bf16" : "f32"},
                          {"config_file", cfg_.source_path}};
  checkpoint::OptimizerState opt;
  opt.step = optimizer_->step_count();
  Tensor full_m, full_v;
  std::vector<float> z_m, z_v, z_w;
  if (zero_) {
    // ZeRO-2/3: assemble the logical tensors from every rank's pieces (collective).
    z_m = zero_->gather_packed(optimizer_->m());
    z_v = zero_->gather_packed(optimizer_->v());
    z_w = zero_->full_weights();
    opt.m = z_m.data();
    opt.v = z_v.data();
  } else if (dp_ && cfg_.zero >= 1) {
    // Gather the optimizer shards on rank 0 (the checkpoint holds logical, unsharded tensors).
    const int64_t total = model_->layout().total();
    const int64_t shard = (total + dp_size() - 1) / dp_size();
    if (dp_rank() == 0) {
      full_m = Tensor::empty({total}, DType::f32, pool_, MemCategory::workspace);
      full_v = Tensor::empty({total}, DType::f32, pool_, MemCategory::workspace);
      for (int r = 0; r < dp_size(); ++r) {
        int64_t lo = std::min(total, shard * r), hi = std::min(total, lo + shard);
        if (hi <= lo) continue;
        if (r == 0) {
          std::copy(optimizer_->m(), optimizer_->m() + (hi - lo), full_m.data<float>() + lo);
          std::copy(optimizer_->v(), optimizer_->v() + (hi - lo), full_v.data<float>() + lo);
        } else {
          dp_->recv(comm::BufferRef(full_m.data<float>() + lo, hi - lo, DType::f32), r, 11);
          dp_->recv(comm::BufferRef(full_v.data<float>() + lo, hi - lo, DType::f32), r, 12);
        }
      }
    } else if (optimizer_->end() > optimizer_->begin()) {
      const int64_t len = optimizer_->end() - optimizer_->begin();
      dp_->send(comm::BufferRef(optimizer_->m(), len, DType::f32), 0, 11);
      dp_->send(comm::BufferRef(optimizer_->v(), len, DType::f32), 0, 12);
    }
    opt.m = full_m.defined() ? full_m.data<float>() : nullptr;
    opt.v = full_v.defined() ? full_v.data<float>() : nullptr;
  } else {
    // The optimizer covers the whole flat buffer, so m/v index like the weights.
    opt.m = optimizer_->m();
    opt.v = optimizer_->v();
  }
  state["dp"] = dp_size();
  state["tp"] = tp_size();
  state["zero"] = cfg_.zero;
  // tp: the tp ranks of dp rank 0 gather their shards into the logical tensors.
  const model::ParamLayout* layout = &model_->layout();
  const float* weights = zero_ ? z_w.data() : model_->weights();
  std::unique_ptr<model::ParamLayout> full_layout;
  std::vector<float> full_w, tp_m, tp_v;
  if (tp_ && dp_rank() == 0) {
    full_layout = std::make_unique<model::ParamLayout>(cfg_.model);
    full_w = model::gather_tp_buffer(cfg_.model, model_->layout(), weights, *tp_);
    if (opt.m) {
      tp_m = model::gather_tp_buffer(cfg_.model, model_->layout(), opt.m, *tp_);
      tp_v = model::gather_tp_buffer(cfg_.model, model_->layout(), opt.v, *tp_);
      opt.m = tp_m.data();
      opt.v = tp_v.data();
    }
    layout = full_layout.get();
    weights = full_w.data();
  }
  // The tokenizer travels with the checkpoint so `loom generate` can decode without the data.
  std::string tokenizer_dir = cfg_.data_path + "/tokenizer";
  auto copy_tokenizer = [&](const std::string& tmp) {
    if (cfg_.data_source == "shards" && fs::is_directory(tokenizer_dir))
      fs::copy(tokenizer_dir, tmp + "/tokenizer", fs::copy_options::recursive);
  };
  // One writer; the others wait so nobody reads a checkpoint before it exists.
  std::string error;
  if (dp_rank() == 0 && tp_rank() == 0) {
    try {
      checkpoint::save_checkpoint(dir, cfg_.model, *layout, weights, opt, state, copy_tokenizer);
    } catch (const std::exception& e) {
      error = e.what();
    }
  }
  if (any_rank(!error.empty())) {
    LOOM_CHECK(error.empty(), "saving checkpoint '{}' failed: {}", dir, error);
    LOOM_FAIL("saving checkpoint '{}' failed on the writing rank (see its log)", dir);
  }
}

StepStats run_training(const TrainConfig& cfg, const std::string& resume_dir,
                       const comm::ProcessGroup* world) {
  const int world_size = world ? world->size() : 1;
  if (cfg.pp > 1) {
    LOOM_CHECK(world != nullptr,
               "parallel.pp = {} needs at least {} MPI ranks (dp x pp); launch: mpirun -np {} "
               "loom train ... --pp {}",
               cfg.pp, cfg.pp, cfg.pp, cfg.pp);
    return run_pipeline_training(cfg, resume_dir, *world);
  }
  // Layout: world = dp x tp (tp ranks adjacent). Validated before anything is allocated.
  LOOM_CHECK(world_size % cfg.tp == 0,
             "parallel.tp = {} does not divide the {} launched ranks; tp sizes that divide it: {}",
             cfg.tp, world_size, fmt::join(parallel::divisors(world_size), ", "));
  const int64_t dp = world_size / cfg.tp;
  LOOM_CHECK(cfg.dp == 0 || cfg.dp == dp,
             "parallel.dp = {} x tp = {} is {} but {} ranks were launched; use dp = {} (or 0: all "
             "ranks not used by tp), or launch dp x tp ranks (mpirun -np {})",
             cfg.dp, cfg.tp, cfg.dp * cfg.tp, world_size, dp, cfg.dp * cfg.tp);
  parallel::ParallelSizes sizes;
  sizes.dp = int(dp);
  sizes.tp = int(cfg.tp);
  const parallel::Topology topo(world_size, sizes, "tp-dp-pp");
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
  MemoryPool pool;
  Trainer trainer(cfg, pool, world ? &groups.dp : nullptr, world ? &groups.tp : nullptr);
  if (resume_dir.empty()) {
    trainer.init_fresh();
  } else {
    trainer.resume(resume_dir);
    LOOM_LOG_INFO("resumed from {} at step {}", resume_dir, trainer.step());
  }
  const double peak = kernels::measure_matmul_peak_gflops(cfg.precision == model::Precision::bf16);
  LOOM_LOG_INFO("model {}: {} parameters, dp {} (zero {}) x tp {}, {} threads per rank, matmul "
                "peak {:.0f} GFLOP/s per rank ({})",
                cfg.model.name, cfg.model.num_params(), dp, cfg.zero, cfg.tp, num_threads(), peak,
                cfg.precision == model::Precision::bf16 ? "bf16" : "f32");
  LoopHooks hooks;
  hooks.step = [&] { return trainer.step(); };
  hooks.train_step = [&] { return trainer.train_step(); };
  hooks.eval_loss = [&] { return trainer.eval_loss(cfg.eval_batches); };
  hooks.save = [&](const std::string& dir) { trainer.save(dir); };
  hooks.any_rank = [&](bool flag) { return trainer.any_rank(flag); };
  LoopContext ctx;
  ctx.pool = &pool;
  ctx.leader = leader;
  ctx.world_rank = world ? world->rank() : 0;
  ctx.world_size = world_size;
  ctx.peak_gflops = peak;
  if (world) ctx.groups = {&groups.dp, &groups.tp};
  StepStats last = run_loop(cfg, hooks, ctx, !resume_dir.empty());
  return last;
}

}  // namespace loom::train
