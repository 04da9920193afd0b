// `loom bench decode --model M.toml --batch B --prompt-tokens P --new-tokens N
//  --dtype f32|bf16|int8 [--head-dtype f32|bf16|int8] [--kv-dtype auto|f32|bf16] [--seed S]
//  [--batch-invariant]`:
// times the KV-cached decoder (infer::Decoder) on a model
// with loom's random init: one prefill step of B prompts of P tokens, then N decode steps of one
// token per sequence (greedy argmax; sampling is not timed). Prints one JSON line with
// prefill_s, decode_tokens_per_s, the bytes of matmul weights a decode step reads and the rate
// it reads them at, beside a read-bandwidth probe run in the same invocation (the median of five
// readings taken before, between quarters of and after the decode steps), and each quarter's
// rate against the two probes beside it (weight_read_fraction_of_adjacent_probes: their
// median). --kv-dtype auto is bf16 for --dtype bf16 and int8 (whose head is int8 too unless
// --head-dtype says otherwise, as under --int8 elsewhere), f32 for f32 (kv_flags.h).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <vector>

#include "cli.h"
#include "core/error.h"
#include "core/rng.h"
#include "core/threads.h"
#include "infer/decoder.h"
#include "kernels/cpu/bandwidth.h"
#include "kernels/cpu/elementwise.h"
#include "kv_flags.h"
#include "model/params.h"

namespace {

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

void add_bench_decode(CLI::App& root, loom::cli::Context& ctx) {
  struct Opts {
    std::string model, dtype = "f32", head_dtype;
    int64_t batch = 1, prompt_tokens = 128, new_tokens = 128;
    uint64_t seed = 1;
    bool batch_invariant = false;
    loom::cli::KvFlags kv;
  };
  auto o = std::make_shared<Opts>();
  CLI::App* bench = loom::cli::subcommand_path(root, "bench", "benchmarks (JSON output)");
  CLI::App* sub = bench->add_subcommand("decode", "time KV-cached prefill and decode");
  sub->add_option("--model", o->model, "model config (TOML)")->required();
  sub->add_option("--batch", o->batch, "sequences decoded together B");
  sub->add_option("--prompt-tokens", o->prompt_tokens, "prompt length P");
  sub->add_option("--new-tokens", o->new_tokens, "decode steps N");
  sub->add_option("--dtype", o->dtype,
                  "linear weight storage: f32, bf16 or int8 (head: int8 for int8, as --int8 "
                  "stores it)")
      ->check(CLI::IsMember({"f32", "bf16", "int8"}));
  sub->add_option("--head-dtype", o->head_dtype,
                  "tied LM head storage: f32, bf16 or int8 (default: --dtype's)")
      ->check(CLI::IsMember({"f32", "bf16", "int8"}));
  sub->add_option("--seed", o->seed, "init and prompt seed");
  loom::cli::add_kv_dtype_flag(sub, o->kv);
  loom::cli::add_batch_invariant_flag(sub, o->batch_invariant);
  sub->callback([o, &ctx] {
    using namespace loom;
    const model::ModelConfig cfg = model::load_model_config(o->model);
    const int64_t B = o->batch, P = o->prompt_tokens, N = o->new_tokens;
    LOOM_CHECK(B >= 1 && P >= 1 && N >= 2,
               "--batch {} and --prompt-tokens {} must be >= 1 and --new-tokens {} >= 2 (the "
               "first new token comes from the prefill; the decode steps make the others)",
               B, P, N);
    LOOM_CHECK(P + N <= cfg.max_seq,
               "--prompt-tokens {} + --new-tokens {} exceed the model's context of {} tokens", P, N,
               cfg.max_seq);
    const infer::WeightFormat lin = infer::weight_format_from_name(o->dtype);
    const infer::WeightFormat head =
        o->head_dtype.empty() ? lin : infer::weight_format_from_name(o->head_dtype);
    const model::ParamLayout layout(cfg);
    std::vector<float> flat(size_t(layout.total()));  // f32 init, converted below
    model::init_params(layout, cfg, flat.data(), o->seed);
    infer::ModelWeights w(cfg, flat.data(), lin, head);
    w.set_batch_invariant(o->batch_invariant);
    flat = std::vector<float>();
    infer::Decoder dec(w);
    // --kv-dtype auto: bf16 for bf16 and int8 linears, f32 for f32 (whatever the head).
    const DType kv_dtype = infer::kv_dtype_from_flag(
        o->kv.dtype, lin == infer::WeightFormat::int8_row ? infer::WeightFormat::bf16 : lin);
    const infer::KvCacheShape ks = dec.cache_shape(kv_dtype);
    infer::KvCache cache(ks, ks.block_bytes() * B * ((P + N + 15) / 16), P + N);
    std::vector<std::vector<int32_t>> seqs(static_cast<size_t>(B));
    std::vector<int64_t> ids(static_cast<size_t>(B));
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t t = 0; t < P; ++t)
        seqs[size_t(b)].push_back(
            int32_t(rng_u64(o->seed, 77, uint64_t(b * P + t)) % uint64_t(cfg.vocab)));
      ids[size_t(b)] = cache.create();
      LOOM_ASSERT(cache.reserve(ids[size_t(b)], P + N), "bench KV pool too small");
    }
    std::vector<float> logits(size_t(B * cfg.vocab));  // (B,V)
    auto run_step = [&](bool prefill) {
      std::vector<infer::SeqStep> st(static_cast<size_t>(B));
      for (int64_t b = 0; b < B; ++b) {
        const auto& s = seqs[size_t(b)];
        const int64_t pos = prefill ? 0 : int64_t(s.size()) - 1;
        st[size_t(b)] = {ids[size_t(b)], pos,
                         std::span<const int32_t>(s.data() + pos, s.size() - size_t(pos))};
      }
      dec.forward(cache, st, logits.data());
      // Greedy: each row's first largest logit (as the engine's sampler picks it), rows in
      // parallel as PyTorch's argmax over the batch runs.
      std::vector<int32_t> next(static_cast<size_t>(B));
#pragma omp parallel for schedule(static)
      for (int64_t b = 0; b < B; ++b)
        next[size_t(b)] = int32_t(kernels::argmax_first(logits.data() + b * cfg.vocab, cfg.vocab));
      for (int64_t b = 0; b < B; ++b) seqs[size_t(b)].push_back(next[size_t(b)]);
    };
    // The ceiling a weight-bound decode step is measured against: the kernels' read-bandwidth
    // probe (1 GiB, above the last-level cache). The machine's bandwidth drifts within seconds
    // (other tenants), so the probe runs before the decode steps, between quarters of them and
    // after them (each the best of 5 passes, as measure_read_bandwidth_gbs), and the median of
    // those five readings is the ceiling. The probes are not in decode_s.
    kernels::ReadBandwidthProbe probe(0, size_t(1) << 30);
    std::vector<double> probes;  // bytes/s
    auto t0 = std::chrono::steady_clock::now();
    run_step(true);
    const double prefill_s = seconds_since(t0);
    constexpr int64_t kSegments = 4;
    double decode_s = 0;
    std::vector<double> seg_s, seg_steps;  // per quarter: seconds and steps
    for (int64_t seg = 0, done = 0; seg < kSegments; ++seg) {
      probes.push_back(probe.measure(5) * 1e9);
      const int64_t until = (N - 1) * (seg + 1) / kSegments;
      seg_steps.push_back(double(until - done));
      t0 = std::chrono::steady_clock::now();
      for (; done < until; ++done) run_step(false);
      seg_s.push_back(seconds_since(t0));
      decode_s += seg_s.back();
    }
    probes.push_back(probe.measure(5) * 1e9);
    const double steps = double(N - 1);  // >= 1: checked above
    std::vector<double> sorted = probes;
    std::sort(sorted.begin(), sorted.end());
    const double bw = sorted[sorted.size() / 2];
    const double wbytes = double(w.matmul_weight_bytes());
    const double weight_rate = wbytes * steps / std::max(decode_s, 1e-9);
    // The machine's bandwidth can change state between the probes (on the development host it
    // flips between ~31-36 and ~45-57 GB/s from one second to the next), so the whole run's rate
    // against the median probe can compare a slow decode with fast probes or the reverse. Each
    // quarter is also compared with the two probes taken right before and after it, and the
    // median of those four fractions is reported beside the whole-run one.
    std::vector<double> seg_frac;
    for (size_t i = 0; i < seg_s.size(); ++i)
      if (seg_steps[i] > 0)
        seg_frac.push_back(wbytes * seg_steps[i] / std::max(seg_s[i], 1e-9) /
                           (0.5 * (probes[i] + probes[i + 1])));
    std::vector<double> sorted_frac = seg_frac;
    std::sort(sorted_frac.begin(), sorted_frac.end());
    const double adjacent_frac =
        sorted_frac.empty() ? weight_rate / bw
                            : 0.5 * (sorted_frac[(sorted_frac.size() - 1) / 2] +
                                     sorted_frac[sorted_frac.size() / 2]);
    // K and V of every cached layer for the average context of a decode step.
    const double kv_bytes_per_step =
        double(B) * (double(P) + double(N) / 2) * 2 * double(ks.layers * ks.kv_dim()) *
        double(dtype_size(kv_dtype));
    nlohmann::json j = {
        {"impl", "loom"},
        {"model", cfg.name},
        {"dtype", o->dtype},
        {"head_dtype", infer::weight_format_name(head)},
        {"kv_dtype", infer::kv_dtype_name(kv_dtype)},
        {"batch_invariant", o->batch_invariant},
        {"batch", B},
        {"prompt_tokens", P},
        {"new_tokens", N},
        {"threads", num_threads()},
        {"prefill_s", prefill_s},
        {"prefill_tokens_per_s", double(B * P) / prefill_s},
        {"decode_s", decode_s},
        {"decode_step_ms", decode_s / steps * 1e3},
        {"decode_tokens_per_s", double(B) * steps / std::max(decode_s, 1e-9)},
        {"matmul_weight_bytes", w.matmul_weight_bytes()},
        {"weight_bytes_read_per_s", weight_rate},
        {"kv_bytes_read_per_s", kv_bytes_per_step * steps / std::max(decode_s, 1e-9)},
        {"probe_read_bytes_per_s", bw},
        {"probe_readings_bytes_per_s", probes},
        {"weight_read_fraction_of_probe", weight_rate / bw},
        {"weight_read_fraction_by_quarter", seg_frac},
        {"weight_read_fraction_of_adjacent_probes", adjacent_frac}};
    std::printf("%s\n", j.dump().c_str());
    ctx.exit_code = 0;
  });
}

}  // namespace

LOOM_REGISTER_COMMAND(bench_decode, add_bench_decode);
