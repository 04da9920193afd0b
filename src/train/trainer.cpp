#include "train/trainer.h"

#include <chrono>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <fstream>

#include "checkpoint/checkpoint.h"
#include "core/error.h"
#include "core/log.h"
#include "core/threads.h"
#include "data/token_stream.h"
#include "kernels/cpu/grad_norm.h"
#include "kernels/cpu/matmul.h"

namespace fs = std::filesystem;

namespace loom::train {

Trainer::Trainer(const TrainConfig& cfg, MemoryPool& pool) : cfg_(cfg), pool_(pool) {
  model_ = std::make_unique<model::Gpt>(cfg_.model, pool_, cfg_.precision);
  model_->set_recompute(cfg_.recompute);
  optimizer_ = std::make_unique<optim::AdamW>(model_->layout(), cfg_.optim, pool_);
  tokens_.resize(size_t(cfg_.batch * (cfg_.seq + 1)));
}

Trainer::~Trainer() = default;

std::unique_ptr<data::TokenStream> Trainer::make_stream(const std::string& split) const {
  if (cfg_.data_source == "synthetic") {
    // The held-out stream is the same Markov chain drawn from another position of the sequence
    // space: a different dp "rank" far from any training rank.
    int rank = split == "train" ? 0 : 1;
    return data::make_synthetic_stream(cfg_.model.vocab, cfg_.data_seed, rank, 2);
  }
  return data::open_shard_stream(cfg_.data_path, split, cfg_.data_seed, 0, 1);
}

void Trainer::init_fresh() {
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
  r.load_weights(model_->layout(), model_->weights());
  model_->sync_low_precision_weights();
  if (r.has_optimizer()) {
    int64_t s = r.load_optimizer(model_->layout(), optimizer_->m(), optimizer_->v());
    optimizer_->set_step_count(s);
  }
  train_stream_ = make_stream("train");
  if (r.trainer_state().contains("data")) train_stream_->restore(r.trainer_state()["data"]);
}

StepStats Trainer::train_step() {
  LOOM_CHECK(train_stream_ != nullptr, "train_step() before init_fresh() or resume()");
  auto t0 = std::chrono::steady_clock::now();
  const int64_t B = cfg_.batch, T = cfg_.seq, M = cfg_.micro_batches;
  const float grad_scale = 1.0f / float(B * T * M);
  model_->zero_grads();
  double loss_sum = 0;
  int64_t count = 0;
  for (int64_t mb = 0; mb < M; ++mb) {
    train_stream_->next_batch(tokens_.data(), nullptr, B, T);
    model::LossSum l = model_->forward_backward(tokens_.data(), B, T, grad_scale);
    loss_sum += l.sum;
    count += l.count;
  }
  const int64_t n = model_->layout().total();
  double norm = std::sqrt(kernels::sum_squares(model_->grads(), n));
  float factor = cfg_.optim.clip > 0 ? kernels::clip_factor(norm, cfg_.optim.clip) : 1.0f;
  StepStats s;
  s.lr = optim::lr_at(cfg_.optim, optimizer_->step_count() + 1);
  optimizer_->step(model_->weights(), model_->grads(), factor);
  model_->sync_low_precision_weights();
  s.step = optimizer_->step_count();
  s.loss = count ? loss_sum / double(count) : 0.0;
  s.grad_norm = norm;
  s.step_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  double tokens = double(B * T * M);
  s.tokens_per_s = tokens / s.step_s;
  s.gflops = cfg_.model.train_flops_per_token(T) * tokens / s.step_s / 1e9;
  return s;
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
  // The optimizer covers the whole flat buffer here, so m/v index like the weights.
  opt.m = optimizer_->m();
  opt.v = optimizer_->v();
  opt.step = optimizer_->step_count();
  // The tokenizer travels with the checkpoint so `loom generate` can decode without the data.
  std::string tokenizer_dir = cfg_.data_path + "/tokenizer";
  auto copy_tokenizer = [&](const std::string& tmp) {
    if (cfg_.data_source == "shards" && fs::is_directory(tokenizer_dir))
      fs::copy(tokenizer_dir, tmp + "/tokenizer", fs::copy_options::recursive);
  };
  checkpoint::save_checkpoint(dir, cfg_.model, model_->layout(), model_->weights(), opt, state,
                              copy_tokenizer);
}

namespace {
volatile std::sig_atomic_t g_stop_signal = 0;
extern "C" void on_stop_signal(int sig) { g_stop_signal = sig; }
}  // namespace

StepStats run_training(const TrainConfig& cfg, const std::string& resume_dir) {
  if (cfg.threads > 0) set_num_threads(int(cfg.threads));
  MemoryPool pool;
  Trainer trainer(cfg, pool);
  if (resume_dir.empty()) {
    trainer.init_fresh();
  } else {
    trainer.resume(resume_dir);
    LOOM_LOG_INFO("resumed from {} at step {}", resume_dir, trainer.step());
  }
  fs::create_directories(cfg.log_dir);
  std::ofstream metrics(cfg.log_dir + "/metrics.jsonl", resume_dir.empty() ? std::ios::trunc
                                                                           : std::ios::app);
  LOOM_CHECK(metrics.good(), "cannot write '{}/metrics.jsonl'", cfg.log_dir);
  const double peak = kernels::measure_matmul_peak_gflops(cfg.precision == model::Precision::bf16);
  LOOM_LOG_INFO("model {}: {} parameters, {} threads, matmul peak {:.0f} GFLOP/s ({})",
                cfg.model.name, cfg.model.num_params(), num_threads(), peak,
                cfg.precision == model::Precision::bf16 ? "bf16" : "f32");

  auto old_int = std::signal(SIGINT, on_stop_signal);
  auto old_term = std::signal(SIGTERM, on_stop_signal);
  StepStats last;
  auto t_start = std::chrono::steady_clock::now();
  const int64_t first = trainer.step();
  auto out_of_time = [&] {
    return cfg.time_limit_s > 0 &&
           std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count() >=
               cfg.time_limit_s;
  };
  while (trainer.step() < cfg.steps && !g_stop_signal && !out_of_time()) {
    pool.reset_peaks();
    last = trainer.train_step();
    nlohmann::json m = {{"step", last.step},          {"loss", last.loss},
                        {"lr", last.lr},              {"grad_norm", last.grad_norm},
                        {"step_s", last.step_s},      {"tokens_per_s", last.tokens_per_s},
                        {"gflops", last.gflops},      {"peak_fraction", last.gflops / peak}};
    nlohmann::json mem;
    for (size_t c = 0; c < kNumMemCategories; ++c)
      mem[std::string(mem_category_name(MemCategory(c)))] = pool.peak(MemCategory(c));
    m["peak_bytes"] = mem;
    bool eval_now = cfg.eval_every > 0 && (last.step % cfg.eval_every == 0 ||
                                           last.step == cfg.steps || out_of_time());
    if (eval_now) m["val_loss"] = trainer.eval_loss(cfg.eval_batches);
    metrics << m.dump() << "\n";
    metrics.flush();
    if (last.step % cfg.log_every == 0 || last.step == cfg.steps) {
      double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count();
      double eta = elapsed / double(last.step - first) * double(cfg.steps - last.step);
      LOOM_LOG_INFO("step {:>5}/{} loss {:.4f}{} lr {:.2e} gnorm {:.3f} {:.0f} tok/s {:.1f} "
                    "GFLOP/s ({:.0f}% of peak) act {:.1f} MiB eta {:.0f}s",
                    last.step, cfg.steps, last.loss,
                    eval_now ? fmt::format(" val {:.4f}", m["val_loss"].get<double>()) : "",
                    last.lr, last.grad_norm, last.tokens_per_s, last.gflops,
                    100.0 * last.gflops / peak,
                    double(pool.peak(MemCategory::activations)) / (1 << 20), eta);
    }
    if (cfg.checkpoint_every > 0 && last.step % cfg.checkpoint_every == 0 &&
        last.step < cfg.steps)
      trainer.save(cfg.checkpoint_dir);
  }
  if (out_of_time())
    LOOM_LOG_INFO("time limit of {:.0f} s reached at step {}", cfg.time_limit_s, trainer.step());
  if (g_stop_signal)
    LOOM_LOG_WARN("signal {} received: saving a checkpoint at step {} and stopping",
                  int(g_stop_signal), trainer.step());
  trainer.save(cfg.checkpoint_dir);
  LOOM_LOG_INFO("checkpoint written to {} (step {})", cfg.checkpoint_dir, trainer.step());
  std::signal(SIGINT, old_int);
  std::signal(SIGTERM, old_term);
  g_stop_signal = 0;
  return last;
}

}  // namespace loom::train
