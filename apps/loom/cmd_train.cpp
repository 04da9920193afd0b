// `loom train --config T.toml [--steps N] [--out DIR] [--resume DIR] [--set key=value ...]
//  [--dp N] [--tp N] [--pp N] [--zero 0..3] [--bucket-mb X] [--ranks-per-node K] ...`. Under
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
  int64_t steps = -1;
  std::string out;
  std::string resume;
  std::vector<std::string> sets;
  int64_t dp = -1, zero = -1, tp = 1, pp = -1, micro_batches = -1, virtual_stages = -1;
  std::optional<int64_t> ranks_per_node;
  double bucket_mb = -1;
  std::string schedule, stage_layers;
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
  sub->add_option("--dp", opts->dp, "data-parallel size (must equal the number of ranks)");
  sub->add_option("--zero", opts->zero, "ZeRO stage: 0 replicated optimizer, 1 sharded over dp");
  sub->add_option("--bucket-mb", opts->bucket_mb, "gradient all-reduce bucket size (MiB)");
  sub->add_option("--tp", opts->tp, "tensor-parallel size (Megatron-style with sequence parallelism; world = dp x tp)");
  sub->add_option("--pp", opts->pp, "pipeline stages (world = dp x pp; dp = ranks / pp)");
  sub->add_option("--schedule", opts->schedule, "pipeline schedule: gpipe, 1f1b or interleaved");
  sub->add_option("--virtual-stages", opts->virtual_stages, "model chunks per rank (interleaved)");
  sub->add_option("--micro-batches", opts->micro_batches, "micro-batches per step");
  sub->add_option("--stage-layers", opts->stage_layers, "blocks per stage, e.g. 5,6,6,5");
  sub->add_option("--ranks-per-node", opts->ranks_per_node,
                  "treat every K consecutive ranks as one node (emulates several nodes; default: "
                  "MPI's shared-memory islands)");
  sub->callback([opts, &ctx] {
    std::vector<std::string> sets = opts->sets;
    if (opts->steps >= 0) sets.push_back("train.steps=" + std::to_string(opts->steps));
    if (!opts->out.empty()) {
      sets.push_back("log.dir=\"" + opts->out + "\"");
      sets.push_back("checkpoint.dir=\"" + opts->out + "/ckpt\"");
    }
    if (opts->dp >= 0) sets.push_back("parallel.dp=" + std::to_string(opts->dp));
    if (opts->zero >= 0) sets.push_back("parallel.zero=" + std::to_string(opts->zero));
    if (opts->bucket_mb > 0) sets.push_back("parallel.bucket_mb=" + std::to_string(opts->bucket_mb));
    if (opts->tp != 1) sets.push_back("parallel.tp=" + std::to_string(opts->tp));
    if (opts->pp > 0) sets.push_back("parallel.pp=" + std::to_string(opts->pp));
    if (!opts->schedule.empty()) sets.push_back("parallel.schedule=\"" + opts->schedule + "\"");
    if (opts->virtual_stages > 0)
      sets.push_back("parallel.virtual_stages=" + std::to_string(opts->virtual_stages));
    if (opts->micro_batches > 0)
      sets.push_back("train.micro_batches=" + std::to_string(opts->micro_batches));
    if (!opts->stage_layers.empty())
      sets.push_back("parallel.stage_layers=\"" + opts->stage_layers + "\"");
    if (opts->ranks_per_node)
      sets.push_back("parallel.ranks_per_node=" + std::to_string(*opts->ranks_per_node));
    loom::train::TrainConfig cfg = loom::train::load_train_config(opts->config, sets);
    std::unique_ptr<loom::comm::MpiRuntime> mpi;
    loom::comm::ProcessGroup world;
    if (launched_by_mpi()) {
      mpi = std::make_unique<loom::comm::MpiRuntime>(nullptr, nullptr);
      loom::comm::GroupOptions go;
      go.ranks_per_node = int(cfg.ranks_per_node);
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
