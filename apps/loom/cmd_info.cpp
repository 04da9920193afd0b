// `loom info --model M.toml [--batch G --seq T --dtype f32|bf16 --dp --tp --pp --cp --ep --zero
// --micro-batches --schedule --virtual-stages --stage-layers --recompute --bf16-emulation]
// [--json]`: parameters, FLOPs per token and the memory of every rank of a layout
// (model/memory.h), as a table that groups identical ranks, or as JSON with one `per_rank` entry
// per rank (rank, its dp/tp/pp coordinates, bytes per category) and the totals over ranks.
//
// --batch is the GLOBAL batch (sequences per optimizer step), split over dp and the
// micro-batches as in `loom train`; the layout is validated by parallel::make_plan on
// dp * tp * pp ranks.
#include <cstdio>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <string>

#include <fmt/format.h>

#include "cli.h"
#include "model/config.h"
#include "model/memory.h"
#include "parallel/plan.h"

namespace {

using loom::MemCategory;

// "0-7,16-23" for a sorted set of integers.
std::string ranges(const std::set<int>& xs) {
  std::string out;
  for (auto it = xs.begin(); it != xs.end();) {
    const int lo = *it;
    int hi = lo;
    for (++it; it != xs.end() && *it == hi + 1; ++it) hi = *it;
    if (!out.empty()) out += ',';
    out += lo == hi ? std::to_string(lo) : fmt::format("{}-{}", lo, hi);
  }
  return out;
}

std::string human(int64_t bytes) {
  const double b = double(bytes);
  if (b >= 1024.0 * 1024 * 1024) return fmt::format("{:.2f} GiB", b / (1024.0 * 1024 * 1024));
  if (b >= 1024.0 * 1024) return fmt::format("{:.2f} MiB", b / (1024.0 * 1024));
  if (b >= 1024.0) return fmt::format("{:.1f} KiB", b / 1024.0);
  return fmt::format("{} B", bytes);
}

nlohmann::json categories(const std::array<int64_t, loom::kNumMemCategories>& b) {
  nlohmann::json j = nlohmann::json::object();
  int64_t total = 0;
  for (size_t c = 0; c < loom::kNumMemCategories; ++c) {
    j[std::string(loom::mem_category_name(MemCategory(c)))] = b[c];
    total += b[c];
  }
  j["total"] = total;
  return j;
}

void add_info(CLI::App& root, loom::cli::Context& ctx) {
  struct Opts {
    std::string model;
    int64_t batch = 1, seq = 0;
    std::string precision = "f32", emulation = "auto";
    bool json = false;
    loom::parallel::PlanSettings plan;
  };
  auto o = std::make_shared<Opts>();
  CLI::App* sub = root.add_subcommand(
      "info", "parameters, FLOPs per token and per-rank memory of a model at a layout");
  sub->add_option("--model", o->model, "model config (TOML)")->required();
  sub->add_option("--batch", o->batch, "global batch: sequences per optimizer step (default 1)");
  sub->add_option("--seq", o->seq, "sequence length T (default: max_seq)");
  sub->add_option("--dtype", o->precision, "f32 or bf16")->check(CLI::IsMember({"f32", "bf16"}));
  sub->add_option("--bf16-emulation", o->emulation,
                  "bf16 copies as f32 (on: emulated, as on CPUs without AMX) or as bf16 (off); "
                  "auto: as this machine runs")
      ->check(CLI::IsMember({"auto", "on", "off"}));
  loom::parallel::PlanSettings& p = o->plan;
  sub->add_option("--dp", p.dp, "data-parallel size (default 1)");
  sub->add_option("--tp", p.tp, "tensor-parallel size");
  sub->add_option("--pp", p.pp, "pipeline stages");
  sub->add_option("--cp", p.cp, "context-parallel size (every sequence split over cp ranks)");
  sub->add_option("--cp-layout", p.cp_layout, "context-parallel token layout: zigzag or striped");
  sub->add_option("--ep", p.ep,
                  "expert-parallel size, a divisor of dp and of the experts (MoE models): each "
                  "rank holds experts/ep of every sparse block");
  sub->add_option("--zero", p.zero, "ZeRO stage over dp (x cp): 0, 1, 2 or 3");
  sub->add_option("--ecss", p.ecss,
                  "expert computation/storage separation (MoE, ZeRO 0 or 1): off, dense (every "
                  "expert updated as AdamW) or lazy (only experts that got tokens)");
  sub->add_option("--micro-batches", p.micro_batches, "micro-batches per step and dp rank");
  sub->add_option("--schedule", p.schedule, "pipeline schedule: gpipe, 1f1b or interleaved");
  sub->add_option("--virtual-stages", p.virtual_stages, "model chunks per rank (interleaved)");
  sub->add_option("--stage-layers", p.stage_layers, "blocks per (virtual) stage, e.g. 5,6,6,5");
  sub->add_option("--recompute", p.recompute,
                  "none, selective, full, or per layer, e.g. full:0-11,selective:12-23");
  sub->add_flag("--json", o->json, "print JSON (one per_rank entry per rank)");
  sub->callback([o, &ctx] {
    using namespace loom::model;
    ModelConfig cfg = load_model_config(o->model);
    const int64_t T = o->seq > 0 ? o->seq : cfg.max_seq;
    const Precision precision = o->precision == "bf16" ? Precision::bf16 : Precision::f32;
    loom::parallel::PlanSettings s = o->plan;
    if (!s.dp || *s.dp == 0) s.dp = 1;
    const int world = *s.dp * s.tp.value_or(1) * s.pp.value_or(1) * s.cp.value_or(1);
    loom::parallel::ModelShape shape{cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.d_ff,
                                     cfg.vocab, T};
    shape.experts = cfg.moe.enabled() ? cfg.moe.experts : 0;  // by name
    const loom::parallel::ParallelPlan plan = loom::parallel::make_plan(s, shape, o->batch, world);
    cfg.check_context_parallel(plan.cp);
    MemoryOptions mo;
    if (o->emulation != "auto") mo.bf16_emulated = o->emulation == "on";
    const bool emulated = mo.bf16_emulated.value_or(bf16_emulated());
    const std::vector<RankMemory> ranks = memory_all_ranks(cfg, plan, T, precision, mo);

    std::array<int64_t, loom::kNumMemCategories> sum{}, most{};
    for (const RankMemory& r : ranks)
      for (size_t c = 0; c < loom::kNumMemCategories; ++c) {
        sum[c] += r.bytes[c];
        most[c] = std::max(most[c], r.bytes[c]);
      }
    if (o->json) {
      nlohmann::json per_rank = nlohmann::json::array();
      for (const RankMemory& r : ranks) {
        nlohmann::json e = {{"rank", r.rank}, {"dp", r.dp}, {"tp", r.tp}, {"pp", r.pp},
                            {"cp", r.cp}};
        e.update(categories(r.bytes));
        per_rank.push_back(e);
      }
      nlohmann::json j = {{"model", cfg.name},
                          {"params", cfg.num_params()},
                          {"active_params_per_token", cfg.active_params()},
                          {"batch", o->batch},
                          {"seq", T},
                          {"dtype", o->precision},
                          {"bf16_emulated", precision == Precision::bf16 && emulated},
                          {"flops_per_token_train", cfg.train_flops_per_token(T)},
                          {"flops_per_token_forward", cfg.train_flops_per_token(T) / 3.0},
                          {"plan", plan.to_json()},
                          {"world", plan.world_size()},
                          // The largest rank's bytes per category (what each device must hold).
                          {"memory_bytes", categories(most)},
                          {"per_rank", per_rank},
                          {"totals", categories(sum)}};
      std::printf("%s\n", j.dump(2).c_str());
      ctx.exit_code = 0;
      return;
    }
    std::printf("model %s: %lld parameters (%.4g), %lld active per token (%.4g), %.4g training "
                "FLOPs per token at T = %lld\n",
                cfg.name.c_str(), (long long)cfg.num_params(), double(cfg.num_params()),
                (long long)cfg.active_params(), double(cfg.active_params()),
                cfg.train_flops_per_token(T), (long long)T);
    if (cfg.moe.enabled())
      std::printf("moe: %zu sparse blocks x %lld experts (expert d_ff %lld), router %s%s\n",
                  cfg.moe.sparse_layers.size(), (long long)cfg.moe.experts,
                  (long long)cfg.moe.expert_d_ff, loom::model::router_name(cfg.moe.router),
                  cfg.moe.router == loom::model::Router::rre
                      ? fmt::format(" ({} domains x {} experts)", cfg.moe.num_domains(),
                                    cfg.moe.experts_per_domain)
                            .c_str()
                      : fmt::format(" (top-{}, capacity factor {}, aux {})", cfg.moe.top_k,
                                    cfg.moe.capacity_factor, cfg.moe.aux_loss_coef)
                            .c_str());
    std::printf("layout: %s on %d ranks, %s%s, T = %lld\n", plan.describe().c_str(),
                plan.world_size(), o->precision.c_str(),
                precision == Precision::bf16 ? (emulated ? " (emulated: f32 copies)" : " (bf16 copies)") : "",
                (long long)T);
    std::printf("peak bytes per rank by pool category (ranks with identical bytes grouped):\n");
    std::printf("%-14s %-8s %-8s %-8s %11s %11s %11s %11s %11s %11s %11s\n", "ranks", "dp", "tp",
                "pp", "weights", "grads", "optimizer", "activations", "workspace", "comm", "total");
    std::vector<bool> shown(ranks.size(), false);
    for (size_t i = 0; i < ranks.size(); ++i) {
      if (shown[i]) continue;
      std::set<int> rs, dps, tps, pps;
      for (size_t k = i; k < ranks.size(); ++k)
        if (!shown[k] && ranks[k].same_bytes(ranks[i])) {
          shown[k] = true;
          rs.insert(ranks[k].rank);
          dps.insert(ranks[k].dp);
          tps.insert(ranks[k].tp);
          pps.insert(ranks[k].pp);
        }
      const RankMemory& r = ranks[i];
      std::printf("%-14s %-8s %-8s %-8s %11s %11s %11s %11s %11s %11s %11s\n", ranges(rs).c_str(),
                  ranges(dps).c_str(), ranges(tps).c_str(), ranges(pps).c_str(),
                  human(r.weights()).c_str(), human(r.grads()).c_str(),
                  human(r.optimizer()).c_str(), human(r.activations()).c_str(),
                  human(r.workspace()).c_str(), human(r.comm()).c_str(),
                  human(r.total()).c_str());
    }
    int64_t total = 0;
    for (int64_t b : sum) total += b;
    std::printf("all ranks: weights %s, grads %s, optimizer %s, activations %s, workspace %s, "
                "comm %s, total %s\n",
                human(sum[0]).c_str(), human(sum[1]).c_str(), human(sum[2]).c_str(),
                human(sum[3]).c_str(), human(sum[4]).c_str(), human(sum[5]).c_str(),
                human(total).c_str());
    int64_t host = 0, host_max = 0;
    for (const RankMemory& r : ranks) {
      host += r.host_store;
      host_max = std::max(host_max, r.host_store);
    }
    if (host > 0)
      std::printf("outside the pool: ECSS host expert store (f32 master, m, v; 12 B per stored "
                  "expert element) %s on the largest rank, %s on all ranks\n",
                  human(host_max).c_str(), human(host).c_str());
    ctx.exit_code = 0;
  });
}

}  // namespace

LOOM_REGISTER_COMMAND(info, add_info);
