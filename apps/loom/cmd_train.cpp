// `loom train --config T.toml [--steps N] [--out DIR] [--resume DIR] [--set key=value ...]
//  [--dp N] [--tp N] [--pp N] [--zero 0..3] [--micro-batches M] [--recompute R] ...`. Under
// mpirun every rank runs this; loom detects the launcher and trains over all ranks (data
// parallel unless the layout flags say otherwise). A rank whose training throws aborts the job.
#include <cstdio>
#include <cstdlib>
#include <filesystem>

#include <fmt/format.h>
#include <memory>
#include <optional>

#include "comm/mpi_runtime.h"
#include "comm/process_group.h"
#include "core/error.h"
#include <nlohmann/json.hpp>

#include "cli.h"
#include "planner/cluster.h"
#include "planner/cost_model.h"
#include "planner/search.h"
#include "train/run_dir.h"
#include "train/trainer.h"

namespace {

struct TrainOptions {
  std::string config;
  std::optional<int64_t> steps;
  std::optional<int64_t> batch, seq;  // --batch / --seq: train.batch / train.seq
  std::string out;
  std::string resume;
  std::vector<std::string> sets;
  // Layout flags: each overrides the config's [parallel] value when given (1 included).
  loom::parallel::PlanSettings plan;
  bool overwrite = false;
  // --auto: the planner picks the layout (issue 13).
  bool auto_plan = false;
  std::string cluster = "configs/clusters/local.toml";
  std::optional<double> memory_limit_gib;
};

// --auto: the fastest frontier plan under the memory limit for `world` ranks on the cluster
// file, written into cfg.parallel as settings, so that the run validates and executes it through
// parallel::make_plan exactly as if it had been given as flags. Every rank searches (the search
// is deterministic, so all pick the same plan); rank 0 logs the choice and why.
void choose_auto_plan(loom::train::TrainConfig& cfg, const TrainOptions& o,
                      const loom::comm::ProcessGroup& group) {
  using namespace loom::planner;
  const int world = group.valid() ? group.size() : 1;
  const bool log = !group.valid() || group.rank() == 0;
  // Without the cluster file, measure this machine first (issue 13: calibrate when missing), over
  // the ranks this run was started with; LOOM_CALIBRATE_QUICK=1 shortens the timing windows as
  // `loom calibrate --quick` does (tests).
  bool missing = !std::filesystem::exists(o.cluster);
  if (group.valid()) {
    int any = missing ? 1 : 0;
    group.all_reduce(loom::comm::BufferRef(&any, 1, loom::DType::i32), loom::comm::ReduceOp::max)
        .wait();
    missing = any != 0;
  }
  if (missing) {
    if (log) {
      std::fprintf(stderr,
                   "--auto: cluster file '%s' does not exist: measuring this machine first over "
                   "%d rank(s) (as `loom calibrate --out %s`; under 3 minutes)\n",
                   o.cluster.c_str(), world, o.cluster.c_str());
      const std::filesystem::path parent = std::filesystem::path(o.cluster).parent_path();
      if (!parent.empty()) std::filesystem::create_directories(parent);
    }
    const char* quick = std::getenv("LOOM_CALIBRATE_QUICK");
    loom::cli::calibrate_to_file(o.cluster, quick && std::string(quick) == "1", group);
    if (group.valid()) group.barrier().wait();  // rank 0 wrote the file
  }
  LOOM_CHECK(std::filesystem::exists(o.cluster),
             "--auto needs the cluster file '{}', which does not exist; measure this machine "
             "first: mpirun -np {} loom calibrate --out {} (or pass --cluster FILE)",
             o.cluster, std::max(2, world), o.cluster);
  const Cluster cluster = load_cluster(o.cluster);
  if (!cluster.cpu_model.empty() && cluster.cpu_model != this_cpu_model() && log)
    std::fprintf(stderr, "warning: '%s' was calibrated on '%s', this machine is '%s'; recalibrate "
                         "with: loom calibrate --out %s\n",
                 o.cluster.c_str(), cluster.cpu_model.c_str(), this_cpu_model().c_str(),
                 o.cluster.c_str());
  const int64_t limit =
      o.memory_limit_gib
          ? int64_t(*o.memory_limit_gib * 1024.0 * 1024.0 * 1024.0)
          : (cluster.host_cores > 0 ? cluster.memory_bytes / std::max(1, world) : cluster.memory_bytes);
  SearchOptions so;
  so.devices = world;
  so.global_batch = cfg.batch;
  so.seq = cfg.seq;
  so.precision = cfg.precision;
  const SearchResult r = search(cfg.model, cluster, so);
  const Candidate* c = fastest_under(r.frontier, limit);
  if (!c) {
    const Candidate* s = smallest_memory(r.frontier);
    LOOM_FAIL("--auto: no plan for {} ranks fits {:.3f} GiB per rank; the smallest needs {:.3f} "
              "GiB ({}); raise --memory-limit or use more ranks",
              world, double(limit) / (1 << 30), double(s->cost.peak_bytes) / (1 << 30), s->key);
  }
  const std::optional<double> bucket = cfg.parallel.bucket_mb;
  const std::optional<int> rpn = cfg.parallel.ranks_per_node;
  cfg.parallel = parse_plan_string(c->key);
  cfg.parallel.bucket_mb = bucket;
  cfg.parallel.ranks_per_node = rpn;
  if (log) {
    std::string terms;
    for (auto [n, v] : c->cost.terms.named())
      if (v > 0) terms += fmt::format("{}{} {:.3g} s", terms.empty() ? "" : ", ", n, v);
    std::fprintf(stderr,
                 "auto plan: %s\n  %s\n  fastest of %zu frontier plans (%ld timed) under %.3f GiB "
                 "per rank: predicted step %.4g s (%s), peak %.3f GiB\n",
                 c->key.c_str(), c->plan.describe().c_str(), r.frontier.size(), long(r.timed),
                 double(limit) / (1 << 30), c->cost.step_time, terms.c_str(),
                 double(c->cost.peak_bytes) / (1 << 30));
    if (c != &r.frontier.front())
      std::fprintf(stderr, "  faster plans need more memory: %s (%.4g s, %.3f GiB)\n",
                   r.frontier.front().key.c_str(), r.frontier.front().cost.step_time,
                   double(r.frontier.front().cost.peak_bytes) / (1 << 30));
  }
}


void add_train(CLI::App& root, loom::cli::Context& ctx) {
  auto opts = std::make_shared<TrainOptions>();
  CLI::App* sub = root.add_subcommand("train", "train a model (configs/train/*.toml)");
  sub->add_option("--config", opts->config, "training config (TOML)")->required();
  sub->add_option("--steps", opts->steps, "total steps (overrides train.steps)");
  sub->add_option("--batch", opts->batch,
                  "global batch: sequences per optimizer step (overrides train.batch)");
  sub->add_option("--seq", opts->seq, "tokens per sequence (overrides train.seq)");
  sub->add_option("--out", opts->out,
                  "run directory: metrics, plot and checkpoint go here (overrides log.dir and "
                  "checkpoint.dir)");
  sub->add_option("--resume", opts->resume, "continue from this checkpoint directory");
  sub->add_flag("--overwrite", opts->overwrite,
                "start a fresh run even if --out already holds one (replaces its metrics and "
                "checkpoint)");
  sub->add_option("--set", opts->sets, "override a config key: section.key=value (repeatable)");
  loom::parallel::PlanSettings& p = opts->plan;
  sub->add_option("--dp", p.dp, "data-parallel size (0: every rank not used by tp, pp and cp)");
  sub->add_option("--tp", p.tp, "tensor-parallel size (Megatron-style with sequence parallelism)");
  sub->add_option("--pp", p.pp, "pipeline stages");
  sub->add_option("--cp", p.cp,
                  "context-parallel size G: every sequence split over G ranks (zigzag: seq "
                  "divisible by 2G)");
  sub->add_option("--cp-scheme", p.cp_scheme,
                  "context-parallel attention: burst (default; per-layer choice of backward), "
                  "ring, allgather or ulysses");
  sub->add_option("--cp-layout", p.cp_layout, "context-parallel token layout: zigzag or striped");
  sub->add_option("--ep", p.ep, "expert-parallel size, a divisor of dp and of the experts (MoE models)");
  sub->add_option("--ecss", p.ecss,
                  "expert computation/storage separation (MoE, ZeRO 0 or 1): off, dense (every "
                  "expert updated as AdamW) or lazy (only experts that got tokens)");
  sub->add_option("--cp-overlap", p.cp_overlap,
                  "context-parallel: post the next ring transfer before computing (true, "
                  "default) or wait for each first (false)");
  sub->add_option("--zero", p.zero,
                  "ZeRO stage over dp: 0 replicated, 1 optimizer state, 2 + gradients, 3 + weights");
  sub->add_option("--bucket-mb", p.bucket_mb, "gradient all-reduce bucket size (MiB)");
  sub->add_option("--schedule", p.schedule, "pipeline schedule: gpipe, 1f1b or interleaved");
  sub->add_option("--virtual-stages", p.virtual_stages, "model chunks per rank (interleaved)");
  sub->add_option("--micro-batches", p.micro_batches,
                  "micro-batches per step (each dp rank splits its batch/dp sequences into them)");
  sub->add_option("--stage-layers", p.stage_layers, "blocks per stage, e.g. 5,6,6,5");
  sub->add_option("--recompute", p.recompute,
                  "none, selective, full, or per layer, e.g. full:0-11,selective:12-23");
  sub->add_flag("--auto", opts->auto_plan,
                "let the planner choose the layout for the launched ranks (loom plan's fastest "
                "plan under the memory limit; replaces the layout flags and [parallel])");
  sub->add_option("--cluster", opts->cluster, "cluster file for --auto (default "
                                              "configs/clusters/local.toml, from loom calibrate)");
  sub->add_option("--memory-limit", opts->memory_limit_gib,
                  "--auto: GiB per rank (default: the host memory divided among the ranks)");
  sub->add_option("--ranks-per-node", p.ranks_per_node,
                  "treat every K consecutive ranks as one node (emulates several nodes; default: "
                  "MPI's shared-memory islands)");
  sub->callback([opts, &ctx] {
    // --batch and --seq go in as --set overrides after the user's own --set (so they win, as
    // --steps does), and the config loader checks them with everything else (divisibility by dp
    // and the micro-batches, the model's context).
    std::vector<std::string> sets = opts->sets;
    if (opts->batch) sets.push_back(fmt::format("train.batch={}", *opts->batch));
    if (opts->seq) sets.push_back(fmt::format("train.seq={}", *opts->seq));
    loom::train::TrainConfig cfg = loom::train::load_train_config(opts->config, sets, opts->plan);
    if (opts->steps) {
      LOOM_CHECK(*opts->steps >= 0, "--steps {} must be >= 0", *opts->steps);
      cfg.steps = *opts->steps;
    }
    if (!opts->out.empty()) {
      cfg.log_dir = opts->out;
      cfg.checkpoint_dir = opts->out + "/ckpt";
    }
    std::unique_ptr<loom::comm::MpiRuntime> mpi;
    loom::comm::ProcessGroup world;
    if (loom::cli::launched_by_mpi()) {
      mpi = std::make_unique<loom::comm::MpiRuntime>(nullptr, nullptr);
      loom::comm::GroupOptions go;
      go.ranks_per_node = cfg.parallel.ranks_per_node.value_or(0);
      world = loom::comm::ProcessGroup::world(go);
    }
    if (opts->auto_plan)
      choose_auto_plan(cfg, *opts, world);
    loom::train::StepStats s;
    try {
      auto run_lock = loom::train::claim_run_dir(cfg.log_dir, !opts->resume.empty(),
                                                 opts->overwrite, !world.valid() || world.rank() == 0);
      s = loom::train::run_training(cfg, opts->resume, world.valid() ? &world : nullptr);
    } catch (const std::exception& e) {
      // One rank's failure ends the whole job now, naming the rank (comm/mpi_runtime.h).
      if (world.valid() && world.size() > 1) loom::comm::abort_world(e.what());
      throw;
    }
    if (world.valid() && world.rank() != 0) {
      ctx.exit_code = 0;
      return;
    }
    nlohmann::json out = {{"step", s.step},
                          {"loss", s.loss},
                          {"tokens_per_s", s.tokens_per_s},
                          {"checkpoint", cfg.checkpoint_dir},
                          {"metrics", cfg.log_dir + "/metrics.jsonl"}};
    std::printf("%s\n", out.dump().c_str());
    ctx.exit_code = 0;
  });
}

}  // namespace

LOOM_REGISTER_COMMAND(train, add_train);
