// Tests for infer/engine.h: continuous batching (requests joining and leaving mid-run give the
// tokens they give alone), admission by KV blocks, max_batch, cancel, refusals, stop strings
// through the engine, the background thread and shutdown.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <map>
#include <mutex>

#include "core/memory_pool.h"
#include "core/rng.h"
#include "infer/engine.h"
#include "model/gpt.h"

namespace loom::infer {
namespace {

model::ModelConfig config() {
  model::ModelConfig c;
  c.name = "engine-test";
  c.vocab = 512;
  c.n_layers = 2;
  c.d_model = 32;
  c.n_heads = 4;
  c.n_kv_heads = 2;
  c.d_ff = 64;
  c.max_seq = 64;
  c.activation = model::Activation::fast_gelu;
  c.query_layer = true;
  c.validate();
  return c;
}

ModelWeights weights() {
  const model::ModelConfig cfg = config();
  MemoryPool pool;
  model::Gpt g(cfg, pool, model::Precision::f32);
  g.init_weights(5);
  for (int64_t i = 0; i < g.layout().total(); ++i) g.weights()[i] *= 6.f;  // spread the logits
  return ModelWeights(cfg, g.weights(), WeightFormat::f32, WeightFormat::f32);
}

std::unique_ptr<Engine> make_engine(EngineOptions o) {
  return std::make_unique<Engine>(
      weights(), data::load_tokenizer(std::string(LOOM_TEST_DATA_DIR) + "/tokenizer"), o);
}

struct Outcome {
  std::vector<int32_t> tokens;
  std::vector<float> logprobs;
  std::string text;
  FinishReason finish = FinishReason::none;
  int64_t events = 0, completion_tokens = -1;
};

struct Collector {
  std::mutex mu;
  std::condition_variable cv;
  std::map<int64_t, Outcome> out;
  int64_t finished = 0;
  std::function<void(const TokenEvent&)> sink() {
    return [this](const TokenEvent& e) {
      std::lock_guard<std::mutex> lk(mu);
      Outcome& o = out[e.request_id];
      ++o.events;
      if (e.token >= 0) {
        o.tokens.push_back(e.token);
        o.logprobs.push_back(e.logprob);
      }
      o.text += e.text;
      if (e.finish != FinishReason::none) {
        EXPECT_EQ(o.finish, FinishReason::none) << "two final events";
        o.finish = e.finish;
        o.completion_tokens = e.completion_tokens;
        ++finished;
        cv.notify_all();
      }
    };
  }
};

Request request(std::vector<int32_t> prompt, float temperature, uint64_t seed, int64_t max_tokens,
                Collector& c) {
  Request r;
  r.prompt = std::move(prompt);
  r.params.temperature = temperature;
  r.params.top_k = temperature > 0 ? 50 : 0;
  r.params.seed = seed;
  r.params.max_tokens = max_tokens;
  r.params.token_healing = false;
  r.params.ignore_eod = true;
  r.on_event = c.sink();
  return r;
}

std::vector<int32_t> tokens(int64_t n, uint64_t seed) {
  std::vector<int32_t> t(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) t[size_t(i)] = int32_t(rng_u64(seed, 1, uint64_t(i)) % 300);
  return t;
}

Outcome alone(const Request& proto) {
  EngineOptions o;
  o.start_thread = false;
  auto e = make_engine(o);
  Collector c;
  Request r = proto;
  r.on_event = c.sink();
  const SubmitResult s = e->submit(r);
  EXPECT_EQ(s.status, SubmitResult::Status::ok) << s.message;
  while (e->step()) {
  }
  return c.out[s.request_id];
}

TEST(Engine, RequestsJoiningMidRunGiveTheTokensTheyGiveAlone) {
  Collector dummy;
  std::vector<Request> reqs = {
      request(tokens(7, 1), 0.9f, 5, 12, dummy), request(tokens(3, 2), 0.f, 0, 9, dummy),
      request(tokens(20, 3), 1.f, 9, 15, dummy), request(tokens(1, 4), 0.7f, 11, 5, dummy)};
  std::vector<Outcome> solo;
  for (const Request& r : reqs) solo.push_back(alone(r));
  EngineOptions o;
  o.start_thread = false;
  o.max_batch = 3;  // the fourth waits for a slot
  auto e = make_engine(o);
  Collector c;
  std::vector<int64_t> ids;
  auto submit = [&](size_t i) {
    Request r = reqs[i];
    r.on_event = c.sink();
    const SubmitResult s = e->submit(r);
    ASSERT_EQ(s.status, SubmitResult::Status::ok) << s.message;
    ids.push_back(s.request_id);
  };
  submit(0);
  e->step();
  e->step();
  e->step();
  submit(1);
  submit(2);
  e->step();
  submit(3);
  EXPECT_EQ(e->stats().running, 3);
  EXPECT_EQ(e->stats().queued, 1);
  while (e->step()) {
  }
  for (size_t i = 0; i < reqs.size(); ++i) {
    const Outcome& got = c.out[ids[i]];
    EXPECT_EQ(got.tokens, solo[i].tokens) << "request " << i;
    EXPECT_EQ(got.logprobs, solo[i].logprobs) << "request " << i;  // bitwise
    EXPECT_EQ(got.text, solo[i].text) << "request " << i;
    EXPECT_EQ(got.finish, FinishReason::length);
    EXPECT_EQ(int64_t(got.tokens.size()), reqs[i].params.max_tokens);
    EXPECT_EQ(got.completion_tokens, reqs[i].params.max_tokens);
  }
  EXPECT_EQ(e->stats().kv_blocks_free, e->stats().kv_blocks_total);  // everything returned
}

// Chunked prefill (a 3-token step budget: prompts enter the cache a few tokens per step, beside
// decoding sequences) gives bitwise the tokens and logprobs of whole-prompt prefill.
TEST(Engine, ChunkedPrefillGivesTheSameTokens) {
  Collector dummy;
  std::vector<Request> reqs = {request(tokens(20, 31), 0.9f, 1, 8, dummy),
                               request(tokens(2, 32), 0.f, 0, 10, dummy),
                               request(tokens(13, 33), 1.f, 2, 6, dummy)};
  EngineOptions o;
  o.start_thread = false;
  o.max_step_tokens = 3;
  auto e = make_engine(o);
  Collector c;
  std::vector<int64_t> ids;
  for (Request r : reqs) {
    r.on_event = c.sink();
    ids.push_back(e->submit(r).request_id);
  }
  int64_t steps = 0;
  while (e->step()) ++steps;
  EXPECT_GT(steps, 12);  // the prompts really were chunked (20 prompt tokens alone need 7 steps)
  for (size_t i = 0; i < reqs.size(); ++i) {
    const Outcome solo = alone(reqs[i]);
    EXPECT_EQ(c.out[ids[i]].tokens, solo.tokens) << i;
    EXPECT_EQ(c.out[ids[i]].logprobs, solo.logprobs) << i;
  }
}

TEST(Engine, AdmissionWaitsForKvBlocks) {
  EngineOptions o;
  o.start_thread = false;
  o.max_batch = 4;
  // Room for exactly one full-context sequence: 64 tokens = 4 blocks of 16.
  const KvCacheShape s{3, 2, 8, 16};
  o.kv_budget_bytes = 4 * s.block_bytes();
  auto e = make_engine(o);
  Collector c;
  const SubmitResult a = e->submit(request(tokens(20, 7), 0.f, 0, 30, c));  // 50 tokens: 4 blocks
  const SubmitResult b = e->submit(request(tokens(5, 8), 0.f, 0, 5, c));    // 10 tokens: 1 block
  ASSERT_EQ(a.status, SubmitResult::Status::ok);
  ASSERT_EQ(b.status, SubmitResult::Status::ok);
  e->step();
  EXPECT_EQ(e->stats().running, 1);
  EXPECT_EQ(e->stats().queued, 1);
  while (e->step()) {
  }
  EXPECT_EQ(c.out[a.request_id].tokens.size(), 30u);
  EXPECT_EQ(c.out[b.request_id].tokens.size(), 5u);
  EXPECT_EQ(c.out[b.request_id].tokens, alone(request(tokens(5, 8), 0.f, 0, 5, c)).tokens);
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

// The KV pool sizes (--kv-memory, --kv-blocks, the --max-batch default) in blocks, a bf16 pool
// holding twice the blocks of an f32 one in the same bytes, and errors that name the value given,
// the minimum (one full-context sequence) and the fix.
TEST(Engine, KvPoolSizeFromOptionsAndItsErrors) {
  const model::ModelConfig cfg = config();  // max_seq 64: 4 blocks of 16 tokens per sequence
  const int64_t bb = KvCacheShape{3, 2, 8, 16}.block_bytes();  // L' 3, NKV 2, HD 8, f32
  EngineOptions o;
  o.max_batch = 3;
  KvPoolSize k = kv_pool_size(cfg, o);
  EXPECT_EQ(k.min_blocks, 4);
  EXPECT_EQ(k.blocks, 12);  // max_batch full-context sequences
  EXPECT_EQ(k.bytes, 12 * bb);
  EXPECT_EQ(k.full_sequences(), 3);
  o.kv_budget_bytes = 10 * bb + 7;
  EXPECT_EQ(kv_pool_size(cfg, o).blocks, 10);
  o.kv_dtype = DType::bf16;
  k = kv_pool_size(cfg, o);
  EXPECT_EQ(k.blocks, 20);  // half the bytes per block
  EXPECT_EQ(k.full_sequences(), 5);
  EXPECT_EQ(k.shape.dtype, DType::bf16);
  o = {};
  o.kv_blocks = 7;
  EXPECT_EQ(kv_pool_size(cfg, o).blocks, 7);

  o = {};
  o.kv_budget_bytes = 3 * bb;
  std::string m = error_of([&] { kv_pool_size(cfg, o); });
  EXPECT_NE(m.find("--kv-memory " + std::to_string(3 * bb) + " "), std::string::npos) << m;
  EXPECT_NE(m.find("use --kv-memory " + std::to_string(4 * bb) + " "), std::string::npos) << m;
  EXPECT_NE(m.find("(64 tokens) needs 4 blocks"), std::string::npos) << m;
  o = {};
  o.kv_blocks = 3;
  m = error_of([&] { kv_pool_size(cfg, o); });
  EXPECT_NE(m.find("--kv-blocks 3 is too few"), std::string::npos) << m;
  EXPECT_NE(m.find("use --kv-blocks 4 or more"), std::string::npos) << m;
  o.kv_budget_bytes = 100 * bb;
  m = error_of([&] { kv_pool_size(cfg, o); });
  EXPECT_NE(m.find("give one of them"), std::string::npos) << m;
  o = {};
  o.kv_blocks = int64_t(1) << 30;  // 6 TiB in f32
  m = error_of([&] { kv_pool_size(cfg, o); });
  EXPECT_NE(m.find("of memory; lower --kv-memory"), std::string::npos) << m;
  o = {};
  o.kv_dtype = DType::i8;
  m = error_of([&] { kv_pool_size(cfg, o); });
  EXPECT_NE(m.find("choose f32 or bf16"), std::string::npos) << m;
  // The engine builds exactly that pool, and the error is the same from its constructor.
  o = {};
  o.start_thread = false;
  o.kv_dtype = DType::bf16;
  o.kv_budget_bytes = 8 * bb;
  auto e = make_engine(o);
  EXPECT_EQ(e->stats().kv_blocks_total, 16);
  EXPECT_EQ(e->kv_pool().shape.dtype, DType::bf16);
  o.kv_budget_bytes = bb;
  m = error_of([&] { make_engine(o); });
  EXPECT_NE(m.find("use --kv-memory " + std::to_string(4 * bb / 2) + " "), std::string::npos) << m;
}

TEST(Engine, ByteSizesAndKvDtypeFlags) {
  EXPECT_EQ(parse_byte_size("268435456", "--kv-memory"), 268435456);
  EXPECT_EQ(parse_byte_size("512M", "--kv-memory"), int64_t(512) << 20);
  EXPECT_EQ(parse_byte_size("2GiB", "--kv-memory"), int64_t(2) << 30);
  EXPECT_EQ(parse_byte_size("1.5G", "--kv-memory"), int64_t(3) << 29);
  EXPECT_EQ(parse_byte_size("64k", "--kv-memory"), 65536);
  for (const char* bad : {"", "abc", "-5", "0", "12Q", "5 M", "1e30"}) {
    const std::string m = error_of([&] { parse_byte_size(bad, "--kv-memory"); });
    EXPECT_NE(m.find("--kv-memory '" + std::string(bad) + "' is not a size"), std::string::npos)
        << m;
  }
  EXPECT_EQ(kv_dtype_from_flag("auto", WeightFormat::f32), DType::f32);
  EXPECT_EQ(kv_dtype_from_flag("auto", WeightFormat::bf16), DType::bf16);
  EXPECT_EQ(kv_dtype_from_flag("bf16", WeightFormat::f32), DType::bf16);
  EXPECT_EQ(kv_dtype_from_flag("f32", WeightFormat::bf16), DType::f32);
  EXPECT_THROW(kv_dtype_from_flag("fp8", WeightFormat::f32), Error);
}

// A bf16-KV engine: requests joining mid-run still give the tokens they give alone (the bf16
// cache keeps batch invariance).
TEST(Engine, Bf16KvRequestsGiveTheTokensTheyGiveAlone) {
  auto run = [](const std::vector<Request>& reqs) {
    EngineOptions o;
    o.start_thread = false;
    o.kv_dtype = DType::bf16;
    auto e = make_engine(o);
    Collector c;
    std::vector<int64_t> ids;
    for (const Request& r : reqs) {
      Request x = r;
      x.on_event = c.sink();
      ids.push_back(e->submit(x).request_id);
      e->step();  // each joins a running batch
    }
    while (e->step()) {
    }
    std::vector<Outcome> out;
    for (int64_t id : ids) out.push_back(c.out[id]);
    return out;
  };
  Collector unused;
  std::vector<Request> reqs = {request(tokens(9, 1), 0.f, 0, 12, unused),
                               request(tokens(3, 2), 0.9f, 5, 10, unused),
                               request(tokens(20, 3), 0.f, 0, 8, unused)};
  const std::vector<Outcome> together = run(reqs);
  for (size_t i = 0; i < reqs.size(); ++i) {
    const std::vector<Outcome> solo = run({reqs[i]});
    EXPECT_EQ(together[i].tokens, solo[0].tokens) << i;
    EXPECT_EQ(together[i].logprobs, solo[0].logprobs) << i;
    EXPECT_FALSE(solo[0].tokens.empty()) << i;
  }
}

TEST(Engine, RefusalsNameTheProblem) {
  EngineOptions o;
  o.start_thread = false;
  o.max_queue = 1;
  auto e = make_engine(o);
  Collector c;
  SubmitResult r = e->submit(request(tokens(40, 1), 0.f, 0, 30, c));  // 70 > 64
  EXPECT_EQ(r.status, SubmitResult::Status::too_long);
  EXPECT_NE(r.message.find("maximum context length is 64"), std::string::npos) << r.message;
  r = e->submit(request({}, 0.f, 0, 3, c));
  EXPECT_EQ(r.status, SubmitResult::Status::invalid);
  r = e->submit(request({600}, 0.f, 0, 3, c));  // >= vocab 512
  EXPECT_EQ(r.status, SubmitResult::Status::invalid);
  r = e->submit(request({1, 510}, 0.f, 0, 3, c));  // model vocab padding (tokenizer has 508)
  EXPECT_EQ(r.status, SubmitResult::Status::invalid);
  EXPECT_NE(r.message.find("tokenizer's vocabulary"), std::string::npos) << r.message;
  Request bad = request(tokens(3, 1), NAN, 0, 3, c);
  r = e->submit(bad);
  EXPECT_EQ(r.status, SubmitResult::Status::invalid);
  EXPECT_NE(r.message.find("temperature"), std::string::npos);
  Request rule = request(tokens(3, 1), 0.f, 0, 3, c);
  rule.params.stop_rule = "cobol";
  EXPECT_EQ(e->submit(rule).status, SubmitResult::Status::invalid);
  EXPECT_EQ(e->submit(request(tokens(3, 1), 0.f, 0, 3, c)).status, SubmitResult::Status::ok);
  r = e->submit(request(tokens(3, 1), 0.f, 0, 3, c));
  EXPECT_EQ(r.status, SubmitResult::Status::queue_full);
  e->shutdown(true);
  EXPECT_EQ(c.finished, 1);
  EXPECT_EQ(e->submit(request(tokens(3, 1), 0.f, 0, 3, c)).status,
            SubmitResult::Status::shutting_down);
}

// topk sparse blocks cannot be decoded token by token (their capacity limit couples the tokens
// of a micro-batch): refused when the weights are built, with the reason. (rre models decode:
// infer_decoder_test MoeCachedVsRecompute.)
TEST(Engine, TopkMoeModelIsRefusedWithItsReason) {
  model::ModelConfig cfg = config();
  cfg.name = "engine-test-moe";
  cfg.moe.sparse_layers = {1};
  cfg.moe.router = model::Router::topk;
  cfg.moe.experts = 4;
  cfg.moe.top_k = 2;
  cfg.moe.expert_d_ff = 16;
  cfg.validate();
  MemoryPool pool;
  model::Gpt g(cfg, pool, model::Precision::f32);
  g.init_weights(5);
  try {
    ModelWeights w(cfg, g.weights(), WeightFormat::f32, WeightFormat::f32);
    ADD_FAILURE() << "a topk MoE model was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("topk router"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("capacity"), std::string::npos) << e.what();
  }
}

// rre MoE models: a request's domain routes its tokens. Greedy tokens of a request naming a domain
// equal the decoder's with that domain index; requests without one use the engine default; an
// unknown name is refused as invalid listing the domains (and so is a bad default, at load).
TEST(Engine, RequestDomainsRouteMoeModels) {
  model::ModelConfig cfg = config();
  cfg.name = "engine-test-rre";
  cfg.moe.sparse_layers = {1};
  cfg.moe.router = model::Router::rre;
  cfg.moe.domains = {"python", "cpp", "other"};
  cfg.moe.experts_per_domain = 2;
  cfg.moe.experts = 6;
  cfg.moe.expert_d_ff = 16;
  cfg.validate();
  MemoryPool pool;
  model::Gpt g(cfg, pool, model::Precision::f32);
  g.init_weights(5);
  for (const auto& sp : g.layout().specs())
    if (sp.trainable)
      for (int64_t i = sp.offset; i < sp.offset + sp.numel; ++i) g.weights()[i] *= 6.f;
  auto engine = [&](const std::string& default_domain) {
    EngineOptions o;
    o.start_thread = false;
    o.default_domain = default_domain;
    return std::make_unique<Engine>(
        ModelWeights(cfg, g.weights(), WeightFormat::f32, WeightFormat::f32),
        data::load_tokenizer(std::string(LOOM_TEST_DATA_DIR) + "/tokenizer"), o);
  };
  // Greedy tokens through the decoder alone, every token in domain d.
  auto reference = [&](const std::vector<int32_t>& prompt, int32_t d, int64_t n) {
    const ModelWeights w(cfg, g.weights(), WeightFormat::f32, WeightFormat::f32);
    Decoder dec(w);
    KvCache cache(dec.cache_shape(), dec.cache_shape().block_bytes() * 8, cfg.max_seq);
    const int64_t s = cache.create();
    EXPECT_TRUE(cache.reserve(s, int64_t(prompt.size()) + n));
    std::vector<int32_t> ctx = prompt, out;
    std::vector<float> logits(size_t(cfg.vocab));
    int64_t cached = 0;
    for (int64_t i = 0; i < n; ++i) {
      std::vector<SeqStep> st = {{s, cached,
                                  std::span<const int32_t>(ctx.data() + cached,
                                                           ctx.size() - size_t(cached)),
                                  d}};
      dec.forward(cache, st, logits.data());
      cached = int64_t(ctx.size());
      // the tokenizer's vocabulary (508) only, as the engine samples
      const int32_t t = int32_t(std::max_element(logits.begin(), logits.begin() + 508) -
                                logits.begin());
      ctx.push_back(t);
      out.push_back(t);
    }
    return out;
  };
  const std::vector<int32_t> p = tokens(9, 4);
  auto e = engine("cpp");
  Collector c;
  Request named = request(p, 0.f, 0, 6, c);
  named.domain = "Python";  // case-insensitive
  const SubmitResult a = e->submit(std::move(named));
  const SubmitResult b = e->submit(request(p, 0.f, 0, 6, c));  // the default: cpp
  Request bad = request(p, 0.f, 0, 6, c);
  bad.domain = "cobol";
  const SubmitResult r = e->submit(std::move(bad));
  ASSERT_EQ(a.status, SubmitResult::Status::ok);
  ASSERT_EQ(b.status, SubmitResult::Status::ok);
  EXPECT_EQ(r.status, SubmitResult::Status::invalid);
  EXPECT_NE(r.message.find("unknown domain 'cobol'"), std::string::npos) << r.message;
  EXPECT_NE(r.message.find("python, cpp, other"), std::string::npos) << r.message;
  while (e->step()) {
  }
  EXPECT_EQ(c.out[a.request_id].tokens, reference(p, 0, 6));
  EXPECT_EQ(c.out[b.request_id].tokens, reference(p, 1, 6));
  EXPECT_NE(reference(p, 0, 6), reference(p, 1, 6)) << "domains should route differently here";
  EXPECT_THROW(engine("java"), Error);
}

TEST(Engine, CancelFinishesQueuedAndRunningRequests) {
  EngineOptions o;
  o.start_thread = false;
  o.max_batch = 1;
  auto e = make_engine(o);
  Collector c;
  const int64_t a = e->submit(request(tokens(4, 1), 0.f, 0, 20, c)).request_id;
  const int64_t b = e->submit(request(tokens(4, 2), 0.f, 0, 20, c)).request_id;
  e->step();
  e->step();
  e->cancel(a);
  e->cancel(b);
  e->cancel(12345);  // unknown: ignored
  e->step();
  EXPECT_EQ(c.out[a].finish, FinishReason::cancelled);
  EXPECT_EQ(c.out[a].tokens.size(), 2u);
  EXPECT_EQ(c.out[b].finish, FinishReason::cancelled);
  EXPECT_TRUE(c.out[b].tokens.empty());
  EXPECT_FALSE(e->step());
  EXPECT_EQ(e->stats().kv_blocks_free, e->stats().kv_blocks_total);
}

TEST(Engine, StopStringEndsTheCompletionBeforeTheMatch) {
  Collector c0;
  Request base = request(tokens(5, 3), 0.f, 0, 24, c0);
  const Outcome full = alone(base);
  ASSERT_GE(full.text.size(), 6u);
  // A stop string taken from the middle of the greedy text: the completion must be the text
  // before its first occurrence.
  const std::string stop = full.text.substr(full.text.size() / 2, 3);
  Request r = base;
  r.params.stop = {stop};
  const Outcome cut = alone(r);
  EXPECT_EQ(cut.finish, FinishReason::stop);
  EXPECT_EQ(cut.text, full.text.substr(0, full.text.find(stop)));
  EXPECT_LT(cut.tokens.size(), full.tokens.size());
}

TEST(Engine, BackgroundThreadServesConcurrentRequestsAndDrainsOnShutdown) {
  Collector dummy;
  std::vector<Request> reqs;
  for (uint64_t i = 0; i < 6; ++i)
    reqs.push_back(request(tokens(2 + int64_t(i) * 3, 20 + i), i % 2 ? 0.8f : 0.f, i, 8, dummy));
  std::vector<Outcome> solo;
  for (const Request& r : reqs) solo.push_back(alone(r));
  EngineOptions o;
  o.max_batch = 4;
  auto e = make_engine(o);
  Collector c;
  std::vector<int64_t> ids;
  for (Request r : reqs) {
    r.on_event = c.sink();
    ids.push_back(e->submit(r).request_id);
  }
  e->shutdown(/*drain=*/true);
  ASSERT_EQ(c.finished, 6);
  for (size_t i = 0; i < reqs.size(); ++i) EXPECT_EQ(c.out[ids[i]].tokens, solo[i].tokens) << i;
  e->shutdown(true);  // idempotent
}

TEST(Engine, ShutdownWithoutDrainCancels) {
  EngineOptions o;
  auto e = make_engine(o);
  Collector c;
  for (uint64_t i = 0; i < 3; ++i) e->submit(request(tokens(30, i), 0.f, 0, 34, c));
  e->shutdown(false);
  EXPECT_EQ(c.finished, 3);
  int64_t cancelled = 0;
  for (auto& [id, out] : c.out) cancelled += out.finish == FinishReason::cancelled;
  std::printf("%lld of 3 cancelled\n", (long long)cancelled);
}

TEST(Engine, AThrowingCallbackDoesNotStopTheEngine) {
  EngineOptions o;
  auto e = make_engine(o);
  Collector c;
  Request bad = request(tokens(3, 1), 0.f, 0, 4, c);
  bad.on_event = [](const TokenEvent&) { throw std::runtime_error("client gone"); };
  e->submit(bad);
  e->submit(request(tokens(3, 2), 0.f, 0, 4, c));
  e->shutdown(true);
  EXPECT_EQ(c.finished, 1);
}

TEST(Engine, LogprobsCarryTheTopAlternativesWithTheirText) {
  EngineOptions o;
  o.start_thread = false;
  auto e = make_engine(o);
  std::vector<TokenEvent> events;
  Request r;
  r.prompt = tokens(4, 9);
  r.params.max_tokens = 5;
  r.params.logprobs = 3;
  r.params.token_healing = false;
  r.params.ignore_eod = true;
  r.on_event = [&](const TokenEvent& ev) { events.push_back(ev); };
  ASSERT_EQ(e->submit(r).status, SubmitResult::Status::ok);
  while (e->step()) {
  }
  ASSERT_EQ(events.size(), 5u);
  for (const TokenEvent& ev : events) {
    ASSERT_EQ(ev.top.size(), 3u);
    EXPECT_EQ(ev.top[0].token, ev.token);  // greedy: the chosen token is the best
    EXPECT_EQ(ev.top[0].logprob, ev.logprob);
    EXPECT_GE(ev.top[0].logprob, ev.top[1].logprob);
    EXPECT_GE(ev.top[1].logprob, ev.top[2].logprob);
    EXPECT_LE(ev.logprob, 0.f);
    EXPECT_EQ(ev.top[1].text, e->decode({ev.top[1].token}));
  }
  EXPECT_EQ(events.back().finish, FinishReason::length);
  EXPECT_EQ(events.back().prompt_tokens, 4);
  EXPECT_EQ(events.back().completion_tokens, 5);
}

TEST(Engine, MaxTokensZeroFinishesAtOnce) {
  EngineOptions o;
  o.start_thread = false;
  auto e = make_engine(o);
  Collector c;
  const int64_t id = e->submit(request(tokens(3, 1), 0.f, 0, 0, c)).request_id;
  while (e->step()) {
  }
  EXPECT_EQ(c.out[id].finish, FinishReason::length);
  EXPECT_TRUE(c.out[id].tokens.empty());
  EXPECT_STREQ(finish_reason_name(FinishReason::length), "length");
  EXPECT_STREQ(finish_reason_name(FinishReason::cancelled), "cancelled");
}

}  // namespace
}  // namespace loom::infer
