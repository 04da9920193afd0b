// `loom train --config T.toml [--steps N] [--out DIR] [--resume DIR] [--set key=value ...]
//  [--dp N] [--tp N] [--pp N] [--zero 0..3] [--micro-batches M] [--recompute R] ...`. Under
// mpirun every rank runs this; loom detects the launcher and trains over all ranks (data
// parallel unless the layout flags say otherwise). A rank whose training throws aborts the job.
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <optional>

#include "comm/mpi_runtime.h"
#include "comm/process_group.h"
#include "core/error.h"
#include <nlohmann/json.hpp>

#include "cli.h"
#include "train/run_dir.h"
#include "train/trainer.h"

namespace {

struct TrainOptions {
  std::string config;
  std::optional<int64_t> steps;
  std::string out;
  std::string resume;
  std::vector<std::string> sets;
  // Layout flags: each overrides the config's [parallel] value when given (1 included).
  loom::parallel::PlanSettings plan;
  bool overwrite = false;
};

// True when an MPI launcher (Open MPI's mpirun, or a PMI-based one such as srun) started us.
bool launched_by_mpi() {
  return std::getenv("OMPI_COMM_WORLD_SIZE") || std::getenv("PMI_SIZE") ||
         std::getenv("PMIX_RANK");
}

void add_train(CLI::App& root, loom::cli::Context& ctx) {
  auto opts = std::make_shared<TrainOptions>();
  CLI::App* sub = root.add_subcommand("train", "train a model (configs/train/*.toml)");
  sub->add_option("--config", opts->config, "training config (TOML)")->required();
  sub->add_option("--steps", opts->steps, "total steps (overrides train.steps)");
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
  sub->add_option("--ep", p.ep, "expert-parallel size, a divisor of dp (1 until experts land)");
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
  sub->add_option("--ranks-per-node", p.ranks_per_node,
                  "treat every K consecutive ranks as one node (emulates several nodes; default: "
                  "MPI's shared-memory islands)");
  sub->callback([opts, &ctx] {
    loom::train::TrainConfig cfg =
        loom::train::load_train_config(opts->config, opts->sets, opts->plan);
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
    if (launched_by_mpi()) {
      mpi = std::make_unique<loom::comm::MpiRuntime>(nullptr, nullptr);
      loom::comm::GroupOptions go;
      go.ranks_per_node = cfg.parallel.ranks_per_node.value_or(0);
      world = loom::comm::ProcessGroup::world(go);
    }
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
