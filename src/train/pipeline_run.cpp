#include "train/pipeline_run.h"

#include <chrono>

#include "checkpoint/checkpoint.h"
#include "core/error.h"
#include "core/log.h"
#include "core/threads.h"
#include "data/token_stream.h"
#include "model/params.h"
#include "train/loop.h"
#include "train/pipeline.h"
#include "parallel/topology.h"

#include <fmt/ranges.h>

namespace loom::train {

namespace {

std::unique_ptr<data::TokenStream> make_stream(const TrainConfig& cfg, bool train, int dp_rank,
                                               int dp_size) {
  // Every pp rank of a dp rank reads the same windows (only the first and last stage use
  // them); dp ranks take interleaved windows as in train/trainer.cpp, so dp x pp equals serial.
  if (!train) {
    dp_rank = 0;
    dp_size = 1;
  }
  if (cfg.data_source == "synthetic")
    return data::make_synthetic_stream(cfg.model.vocab, cfg.data_seed,
                                       train ? 2 * dp_rank : 1, 2 * dp_size);
  return data::open_shard_stream(cfg.data_path, train ? "train" : "val", cfg.data_seed, dp_rank,
                                 dp_size);
}

// Gathers the logical weights / moments on every rank: each rank exports its own tensors into a
// zeroed full buffer and a sum all-reduce fills in the rest (every tensor has one owner).
void gather_full(const comm::ProcessGroup& pp, float* full, int64_t n) {
  pp.all_reduce(comm::BufferRef(full, n, DType::f32)).wait();
}

}  // namespace

StepStats run_pipeline_training(const TrainConfig& cfg, const std::string& resume_dir,
                                const comm::ProcessGroup& world) {
  // Layout dp x tp x pp (order tp-dp-pp: tp ranks adjacent, then the dp ranks of a stage).
  LOOM_CHECK(world.size() % (cfg.pp * cfg.tp) == 0,
             "parallel.pp = {} x tp = {} = {} but {} ranks were launched; pp x tp must divide the "
             "ranks (dp = ranks / (pp x tp)); sizes that divide {}: {}",
             cfg.pp, cfg.tp, cfg.pp * cfg.tp, world.size(), world.size(),
             fmt::join(parallel::divisors(world.size()), ", "));
  const int n_dp = world.size() / int(cfg.pp * cfg.tp);
  LOOM_CHECK(cfg.dp == 0 || cfg.dp == n_dp,
             "parallel.dp = {} x tp = {} x pp = {} is {} but {} ranks were launched; use dp = {} "
             "(or 0)",
             cfg.dp, cfg.tp, cfg.pp, cfg.dp * cfg.tp * cfg.pp, world.size(), n_dp);
  parallel::ParallelSizes sizes;
  sizes.dp = n_dp;
  sizes.tp = int(cfg.tp);
  sizes.pp = int(cfg.pp);
  const parallel::Topology topo(world.size(), sizes, "tp-dp-pp");
  parallel::ProcessGroups groups = parallel::ProcessGroups::build(topo, world);
  const int dp_rank = groups.dp.rank();
  const bool leader = world.rank() == 0;
  set_log_rank(world.rank(), world.size());
  if (!leader) set_log_level(LogLevel::warn);
  if (leader && world.size() > 1) parallel::log_placement(topo, world);
  set_num_threads(cfg.threads > 0 ? int(cfg.threads) : default_num_threads(world.host_ranks()));

  PipelineConfig pc;
  pc.schedule = parallel::schedule_from_name(cfg.schedule);
  pc.micro_batches = int(cfg.micro_batches);
  pc.virtual_stages = int(cfg.virtual_stages);
  pc.stage_layers = cfg.stage_layers;
  pc.precision = cfg.precision;
  pc.recompute = cfg.recompute;
  pc.optim = cfg.optim;
  pc.zero = int(cfg.zero);
  pc.bucket_mb = cfg.bucket_mb;
  MemoryPool pool;
  PipelineExecutor exec(cfg.model, pc, groups.pp, pool, &groups.dp, &groups.tp);
  // This tp rank's layout (the whole model when tp = 1): what the executor imports / exports.
  const model::ParamLayout layout(cfg.model, cfg.tp > 1 ? model::TpShard{groups.tp.rank(), int(cfg.tp)}
                                                        : model::TpShard{});
  const int64_t n = layout.total();

  auto train_stream = make_stream(cfg, true, dp_rank, n_dp);
  if (resume_dir.empty()) {
    exec.init_weights(cfg.seed);
  } else {
    checkpoint::CheckpointReader r(resume_dir);
    r.expect_config(cfg.model);
    std::vector<float> full(static_cast<size_t>(n)), m(static_cast<size_t>(n)), v(static_cast<size_t>(n));
    // Each rank reads only the ranges its chunks hold (of its tp shard: slices of the tensors).
    int64_t step = 0;
    for (int c = 0; c < exec.num_chunks(); ++c)
      for (auto [b, e] : exec.chunk(c).held_ranges()) {
        r.load_weights(layout, full.data(), b, e);
        if (r.has_optimizer()) step = r.load_optimizer(layout, m.data() + b, v.data() + b, b, e);
      }
    exec.import_weights(full.data());
    if (r.has_optimizer()) exec.import_optimizer(m.data(), v.data(), step);
    if (r.trainer_state().contains("data")) train_stream->restore(r.trainer_state()["data"]);
    LOOM_LOG_INFO("resumed from {} at step {}", resume_dir, exec.step_count());
  }

  auto save = [&](const std::string& dir) {
    // dp replicas hold identical weights: the pipeline of dp rank 0 gathers and writes. Under
    // ZeRO each dp rank holds a share of the moments: they are summed over dp first, chunk by
    // chunk. Only the assembling ranks hold whole-model buffers: (n) buffers on every rank of
    // an 8-rank gpt2 run (1.5 GB each) had the kernel kill a rank for memory.
    const bool assembles = dp_rank == 0;
    const bool shares_moments = cfg.zero >= 1 && n_dp > 1;
    const size_t nw = assembles || cfg.zero == 3 ? size_t(n) : 0;
    const size_t nm = assembles ? size_t(n) : 0;
    std::vector<float> w(nw, 0.f), m(nm, 0.f), v(nm, 0.f);
    if (shares_moments)
      exec.export_optimizer_dp_summed(assembles ? m.data() : nullptr, assembles ? v.data() : nullptr);
    // Collective over dp under ZeRO-3 (weights are gathered), so every dp rank calls it then.
    if (nw > 0) exec.export_weights(w.data());
    if (assembles) {
      if (cfg.zero == 0 || n_dp == 1) exec.export_optimizer(m.data(), v.data());
      gather_full(groups.pp, w.data(), n);
      gather_full(groups.pp, m.data(), n);
      gather_full(groups.pp, v.data(), n);
      if (cfg.tp > 1) {  // tp shards -> the logical tensors
        w = model::gather_tp_buffer(cfg.model, layout, w.data(), groups.tp);
        m = model::gather_tp_buffer(cfg.model, layout, m.data(), groups.tp);
        v = model::gather_tp_buffer(cfg.model, layout, v.data(), groups.tp);
      }
    }
    int32_t failed = 0;
    std::string error;
    if (leader) {
      nlohmann::json state = {{"step", exec.step_count()}, {"data", train_stream->state()},
                              {"seed", cfg.seed}, {"dp", n_dp}, {"tp", cfg.tp}, {"pp", cfg.pp},
                              {"schedule", cfg.schedule}};
      try {
        checkpoint::save_checkpoint(dir, cfg.model, model::ParamLayout(cfg.model), w.data(),
                                    {m.data(), v.data(), exec.step_count()}, state);
      } catch (const std::exception& e) {
        error = e.what();
        failed = 1;
      }
    }
    world.all_reduce(comm::BufferRef(&failed, 1, DType::i32), comm::ReduceOp::max).wait();
    LOOM_CHECK(!failed, "saving checkpoint '{}' failed{}{}", dir, error.empty() ? " on rank 0" : ": ",
               error);
  };

  LOOM_LOG_INFO("model {}: {} parameters, dp {} x tp {} x pp {} ({} schedule, {} micro-batches, "
                "{} virtual stages), {} threads per rank",
                cfg.model.name, cfg.model.num_params(), n_dp, cfg.tp, cfg.pp, cfg.schedule, cfg.micro_batches,
                cfg.virtual_stages, num_threads());
  const int64_t B = cfg.batch, T = cfg.seq, M = cfg.micro_batches;
  std::vector<int32_t> tokens(size_t(M * B * (T + 1)));
  LoopHooks hooks;
  hooks.step = [&] { return exec.step_count(); };
  hooks.train_step = [&] {
    auto t0 = std::chrono::steady_clock::now();
    for (int64_t mb = 0; mb < M; ++mb)
      train_stream->next_batch(tokens.data() + mb * B * (T + 1), nullptr, B, T);
    PipelineStepStats ps = exec.train_step(tokens.data(), B, T);
    StepStats st;
    st.step = ps.step;
    st.loss = ps.loss;
    st.lr = ps.lr;
    st.grad_norm = ps.grad_norm;
    st.dp_wait_s = ps.dp_wait_s;
    st.step_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    st.tokens_per_s = double(B * T * M * n_dp) / st.step_s;
    st.gflops = cfg.model.train_flops_per_token(T) * double(B * T * M * n_dp) / st.step_s / 1e9;
    return st;
  };
  // Validation, as run_training: the same val windows on every dp replica, forward only.
  hooks.eval_loss = [&] {
    auto val_stream = make_stream(cfg, false, dp_rank, n_dp);
    std::vector<int32_t> val_tokens(size_t(cfg.eval_batches * B * (T + 1)));
    for (int64_t i = 0; i < cfg.eval_batches; ++i)
      val_stream->next_batch(val_tokens.data() + i * B * (T + 1), nullptr, B, T);
    return exec.eval_loss(val_tokens.data(), cfg.eval_batches, B, T);
  };
  hooks.save = save;
  hooks.any_rank = [&](bool flag) {
    int32_t v = flag ? 1 : 0;
    world.all_reduce(comm::BufferRef(&v, 1, DType::i32), comm::ReduceOp::max).wait();
    return v != 0;
  };
  LoopContext ctx;
  ctx.pool = &pool;
  ctx.leader = leader;
  ctx.world_rank = world.rank();
  ctx.world_size = world.size();
  ctx.groups = {&groups.dp, &groups.tp, &groups.pp};
  return run_loop(cfg, hooks, ctx, !resume_dir.empty());
}

}  // namespace loom::train
