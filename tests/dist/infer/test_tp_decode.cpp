// Tensor-parallel decoding (infer/decoder.h with a tp group): every rank's logits, step by step
// through the KV cache, against the tp = 1 decoder on the whole model, computed on each rank.
//
// Glossary: P tp size, V vocab, B sequences, G generated tokens.
// Tolerance: f32 with the attn.out / ffn.down partial sums added in another order (plus the
// all-reduce's order): ~1e-6 of the logits' scale after 3 layers; 1e-5 as in the tp = 1 tests.
// Greedy tokens must match up to the first step whose top-2 margin is below it (printed).
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <map>
#include <mutex>
#include <thread>
#include <vector>

#include "comm/process_group.h"
#include "core/rng.h"
#include "data/tokenizer.h"
#include "infer/decoder.h"
#include "infer/engine.h"
#include "model/params.h"

namespace loom::infer {
namespace {

model::ModelConfig config(bool query_layer, model::Activation act, int64_t nkv) {
  model::ModelConfig c;
  c.name = "tp-infer-test";
  c.vocab = 96;
  c.n_layers = 2;
  c.d_model = 32;
  c.n_heads = 4;
  c.n_kv_heads = nkv;
  c.d_ff = 64;
  c.max_seq = 64;
  c.activation = act;
  c.query_layer = query_layer;
  c.validate();
  return c;
}

// The whole model's weights: loom's init, scaled and perturbed (non-zero biases, non-unit norms).
std::vector<float> full_weights(const model::ModelConfig& cfg) {
  const model::ParamLayout layout(cfg);
  std::vector<float> w(size_t(layout.total()));
  model::init_params(layout, cfg, w.data(), 3);
  for (size_t i = 0; i < w.size(); ++i) w[i] = 4.f * w[i] + 0.05f * rng_normal(17, 5, i);
  return w;
}

// This rank's shard of `full` in ParamLayout(cfg, tp) order.
std::vector<float> shard_of(const model::ModelConfig& cfg, const std::vector<float>& full,
                            model::TpShard tp) {
  const model::ParamLayout whole(cfg), mine(cfg, tp);
  std::vector<float> out(size_t(mine.total()));
  for (const auto& s : mine.specs()) {
    const int64_t base = whole.find(s.name).offset;
    for_each_global_run(s, 0, s.numel, [&](int64_t local, int64_t global, int64_t len) {
      std::copy(full.begin() + base + global, full.begin() + base + global + len,
                out.begin() + s.offset + local);
    });
  }
  return out;
}

// Greedy decode of B prompts (one prefill step, then G-1 decode steps); returns per-step logits.
std::vector<std::vector<float>> run(Decoder& dec, const std::vector<std::vector<int32_t>>& prompts,
                                    int64_t G, std::vector<std::vector<int32_t>>& ctx) {
  const int64_t B = int64_t(prompts.size()), V = dec.weights().config().vocab;
  KvCache cache(dec.cache_shape(), dec.cache_shape().block_bytes() * 8 * B, 64);
  ctx = prompts;
  std::vector<int64_t> seq(static_cast<size_t>(B)), cached(static_cast<size_t>(B), 0);
  for (int64_t b = 0; b < B; ++b) {
    seq[size_t(b)] = cache.create();
    EXPECT_TRUE(cache.reserve(seq[size_t(b)], int64_t(prompts[size_t(b)].size()) + G));
  }
  std::vector<std::vector<float>> out;
  std::vector<float> logits(size_t(B * V));
  for (int64_t g = 0; g < G; ++g) {
    std::vector<SeqStep> st(static_cast<size_t>(B));
    for (int64_t b = 0; b < B; ++b) {
      const auto& c = ctx[size_t(b)];
      st[size_t(b)] = {seq[size_t(b)], cached[size_t(b)],
                       std::span<const int32_t>(c.data() + cached[size_t(b)],
                                                c.size() - size_t(cached[size_t(b)]))};
    }
    dec.forward(cache, st, logits.data());
    out.push_back(logits);
    for (int64_t b = 0; b < B; ++b) {
      cached[size_t(b)] = int64_t(ctx[size_t(b)].size());
      const float* l = logits.data() + b * V;
      ctx[size_t(b)].push_back(int32_t(std::max_element(l, l + V) - l));
    }
  }
  return out;
}

void check(const model::ModelConfig& cfg) {
  comm::ProcessGroup world = comm::ProcessGroup::world();
  const int P = world.size();
  const auto ok = model::valid_tp_sizes(cfg);
  if (std::find(ok.begin(), ok.end(), P) == ok.end()) {
    if (world.rank() == 0) std::printf("SKIP: tp = %d does not divide this config\n", P);
    return;
  }
  const std::vector<float> full = full_weights(cfg);
  const ModelWeights w1(cfg, full.data(), WeightFormat::f32, WeightFormat::f32);
  const model::TpShard shard{world.rank(), P};
  const std::vector<float> part = shard_of(cfg, full, shard);
  const ModelWeights wp(cfg, part.data(), WeightFormat::f32, WeightFormat::f32, shard);
  Decoder d1(w1), dp(wp, &world);
  std::vector<std::vector<int32_t>> prompts;
  const int64_t lens[5] = {1, 5, 17, 9, 33};
  for (int i = 0; i < 5; ++i) {
    std::vector<int32_t> p;
    for (int64_t t = 0; t < lens[i]; ++t)
      p.push_back(int32_t(rng_u64(40 + uint64_t(i), 1, uint64_t(t)) % 96));
    prompts.push_back(p);
  }
  const int64_t G = 10, V = cfg.vocab;
  std::vector<std::vector<int32_t>> c1, cp;
  const auto l1 = run(d1, prompts, G, c1);
  const auto lp = run(dp, prompts, G, cp);
  for (size_t b = 0; b < prompts.size(); ++b)
    for (int64_t g = 0; g < G; ++g) {
      const float* a = l1[size_t(g)].data() + b * size_t(V);
      const float* x = lp[size_t(g)].data() + b * size_t(V);
      double err = 0, scale = 1, top = -1e30, second = -1e30;
      for (int64_t v = 0; v < V; ++v) {
        err = std::max(err, double(std::fabs(a[v] - x[v])));
        scale = std::max(scale, double(std::fabs(a[v])));
        if (a[v] > top) {
          second = top;
          top = a[v];
        } else if (a[v] > second) {
          second = a[v];
        }
      }
      EXPECT_LE(err, 1e-5 * scale) << "tp " << P << " sequence " << b << " step " << g;
      const size_t at = prompts[b].size() + size_t(g);
      if (top - second < 1e-5 * scale) {
        std::printf("tp %d sequence %zu step %lld: top-2 margin %.3g below tolerance\n", P, b,
                    (long long)g, top - second);
        break;
      }
      EXPECT_EQ(c1[b][at], cp[b][at]) << "tp " << P << " sequence " << b << " step " << g;
      if (c1[b][at] != cp[b][at]) break;
    }
}

TEST(TensorParallelDecode, QueryLayerGqaFastGelu) {
  check(config(true, model::Activation::fast_gelu, 2));
}
TEST(TensorParallelDecode, QueryLayerMhaGelu) { check(config(true, model::Activation::gelu, 4)); }
TEST(TensorParallelDecode, NoQueryLayerMhaGeluErf) {
  check(config(false, model::Activation::gelu_erf, 4));
}

// The engine in leader/follower mode (EngineOptions::tp_replicate, `loom serve --tp`): rank 0's
// engine runs its own step thread and takes requests from this (another) thread, staggered so
// they join a running batch of at most 3 (the rest queue), one cancelled from its event callback
// after its 2nd token; the other ranks only follow(). Every finished request's greedy tokens
// equal those of a tp = 1 engine running it alone (up to a step whose top-2 logprob margin is
// below 1e-4, reported), the cancelled one ends `cancelled` with a prefix of them, and every rank
// leaves follow() / shutdown() (rank 0's stop reached them).
TEST(TensorParallelEngine, FollowersReplayRankZerosRequests) {
  comm::ProcessGroup world = comm::ProcessGroup::world();
  const int P = world.size();
  model::ModelConfig cfg = config(true, model::Activation::fast_gelu, 4);
  cfg.vocab = 512;  // the test tokenizer has 508 tokens
  cfg.validate();
  const auto ok = model::valid_tp_sizes(cfg);
  if (std::find(ok.begin(), ok.end(), P) == ok.end()) {
    if (world.rank() == 0) std::printf("SKIP: tp = %d does not divide this config\n", P);
    return;
  }
  const std::string tok_dir = std::string(LOOM_TEST_DATA_DIR) + "/tokenizer";
  const std::vector<float> full = full_weights(cfg);
  const model::TpShard shard{world.rank(), P};
  const std::vector<float> part = shard_of(cfg, full, shard);
  EngineOptions o;
  o.tp = &world;
  o.tp_replicate = true;
  o.max_batch = 3;
  o.start_thread = world.rank() == 0;
  Engine e(ModelWeights(cfg, part.data(), WeightFormat::f32, WeightFormat::f32, shard),
           data::load_tokenizer(tok_dir), o);
  if (world.rank() != 0) {
    EXPECT_EQ(e.submit(Request{{1, 2}, {}, {}, nullptr}).status, SubmitResult::Status::invalid)
        << "followers take no requests";
    e.follow();  // returns once rank 0 has drained and sent its stop
    world.barrier().wait();
    return;
  }
  EXPECT_THROW(e.follow(), Error);  // rank 0 leads

  struct Out {
    std::vector<int32_t> tokens;
    std::vector<float> margin;  // top-2 logprob margin of each step
    FinishReason finish = FinishReason::none;
  };
  std::mutex mu;
  std::condition_variable cv;
  std::map<int64_t, Out> out;
  int finished = 0;
  const int kCancel = 3;
  std::map<int64_t, int> index_of;  // request id -> prompt index
  std::vector<Request> reqs;
  for (int i = 0; i < 6; ++i) {
    Request r;
    for (int64_t t = 0; t < 3 + 4 * i; ++t)
      r.prompt.push_back(int32_t(rng_u64(70 + uint64_t(i), 1, uint64_t(t)) % 500));
    r.params.temperature = 0.f;
    r.params.max_tokens = 12;
    r.params.logprobs = 2;
    r.params.token_healing = false;
    r.params.ignore_eod = true;
    reqs.push_back(r);
  }
  auto sink = [&](int i) {
    return [&, i](const TokenEvent& ev) {
      bool cancel = false;
      {
        std::lock_guard<std::mutex> lk(mu);
        Out& x = out[i];
        if (ev.token >= 0) {
          x.tokens.push_back(ev.token);
          x.margin.push_back(ev.top.size() >= 2 ? ev.top[0].logprob - ev.top[1].logprob : 1e30f);
        }
        if (ev.finish != FinishReason::none) {
          x.finish = ev.finish;
          ++finished;
          cv.notify_all();
        }
        cancel = i == kCancel && x.tokens.size() == 2 && ev.finish == FinishReason::none;
      }
      if (cancel) e.cancel(ev.request_id);
    };
  };
  for (int i = 0; i < 6; ++i) {
    Request r = reqs[size_t(i)];
    r.on_event = sink(i);
    const SubmitResult res = e.submit(std::move(r));
    ASSERT_EQ(res.status, SubmitResult::Status::ok) << res.message;
    std::this_thread::sleep_for(std::chrono::milliseconds(3 * i));
  }
  {
    std::unique_lock<std::mutex> lk(mu);
    ASSERT_TRUE(cv.wait_for(lk, std::chrono::seconds(120), [&] { return finished == 6; }))
        << finished << " of 6 requests finished";
  }
  e.shutdown(/*drain=*/true);  // sends the followers their stop
  world.barrier().wait();

  // The tp = 1 reference, one request at a time.
  EngineOptions o1;
  o1.start_thread = false;
  Engine ref(ModelWeights(cfg, full.data(), WeightFormat::f32, WeightFormat::f32),
             data::load_tokenizer(tok_dir), o1);
  for (int i = 0; i < 6; ++i) {
    Out alone;
    Request r = reqs[size_t(i)];
    r.on_event = [&](const TokenEvent& ev) {
      if (ev.token >= 0) alone.tokens.push_back(ev.token);
      if (ev.finish != FinishReason::none) alone.finish = ev.finish;
    };
    ASSERT_EQ(ref.submit(std::move(r)).status, SubmitResult::Status::ok);
    while (ref.step()) {
    }
    const Out& got = out[i];
    if (i == kCancel) {
      EXPECT_EQ(got.finish, FinishReason::cancelled);
      EXPECT_LT(got.tokens.size(), alone.tokens.size());
    } else {
      EXPECT_EQ(got.finish, FinishReason::length) << "request " << i;
      EXPECT_EQ(got.tokens.size(), alone.tokens.size()) << "request " << i;
    }
    for (size_t k = 0; k < std::min(got.tokens.size(), alone.tokens.size()); ++k) {
      if (got.tokens[k] == alone.tokens[k]) continue;
      if (got.margin[k] < 1e-4) {
        std::printf("tp %d request %d step %zu: top-2 margin %.3g below tolerance\n", P, i, k,
                    double(got.margin[k]));
      } else {
        ADD_FAILURE() << "tp " << P << " request " << i << " step " << k << ": token "
                      << got.tokens[k] << " vs " << alone.tokens[k] << " (margin "
                      << got.margin[k] << ")";
      }
      break;
    }
  }
}

}  // namespace
}  // namespace loom::infer
