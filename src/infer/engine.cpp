// infer/engine.cpp: continuous batching over the KV-cached decoder (see engine.h).
#include "infer/engine.h"

#include <algorithm>
#include <cmath>
#include <chrono>
#include <cstdio>
#include <cstring>

#include <unistd.h>  // sysconf: the machine's physical memory

#include "checkpoint/commit.h"
#include "checkpoint/sharded.h"
#include "comm/mpi_runtime.h"
#include "core/error.h"
#include "core/threads.h"

namespace loom::infer {

const char* finish_reason_name(FinishReason r) {
  switch (r) {
    case FinishReason::none:
      return "none";
    case FinishReason::stop:
      return "stop";
    case FinishReason::length:
      return "length";
    case FinishReason::cancelled:
      return "cancelled";
    case FinishReason::error:
      return "error";
  }
  return "none";
}

// One request from submit() to its last event.
struct Engine::Active {
  int64_t id = 0;
  Request req;
  int64_t prompt_tokens = 0;     // as submitted (before token healing)
  std::vector<int32_t> context;  // (prompt after healing + generated) token ids
  Healing heal;
  TextStopper stopper;
  std::vector<int32_t> generated;  // sampled tokens (EOD excluded)
  std::string text;                // the completion so far (healed text removed)
  size_t emitted = 0;              // bytes of `text` already delivered
  int64_t kv_seq = -1;
  int32_t domain = -1;  // MoE: domain index (-1: the model's "other")
  int64_t cached = 0;  // tokens of `context` whose K/V are in the cache
  bool cancelled = false;
  bool done = false;
};

namespace {
const data::Tokenizer& require_tokenizer(const std::unique_ptr<data::Tokenizer>& t) {
  LOOM_CHECK(t != nullptr, "engine: a tokenizer is required");
  return *t;
}

std::string human_bytes(int64_t b) {
  const double x = double(b);
  if (x >= 1024.0 * 1024 * 1024) return fmt::format("{:.2f} GiB", x / (1024.0 * 1024 * 1024));
  if (x >= 1024.0 * 1024) return fmt::format("{:.1f} MiB", x / (1024.0 * 1024));
  if (x >= 1024.0) return fmt::format("{:.1f} KiB", x / 1024.0);
  return fmt::format("{} bytes", b);
}

// tp_replicate: the changes rank 0 broadcasts before a step, as records
//   'Q' id prompt params   a request queued     'C' id   a cancellation     'S'   stop
// in native byte order (every rank of a tp group runs on one machine type).
constexpr char kOpQueue = 'Q', kOpCancel = 'C', kOpStop = 'S';

template <class T>
void put(std::string& s, const T& v) {
  s.append(reinterpret_cast<const char*>(&v), sizeof(T));
}
void put_str(std::string& s, const std::string& v) {
  put(s, uint64_t(v.size()));
  s += v;
}

struct OpReader {
  const std::string& s;
  size_t pos = 0;
  bool done() const { return pos >= s.size(); }
  template <class T>
  T get() {
    LOOM_CHECK(pos + sizeof(T) <= s.size(), "tp serving: a truncated step record from rank 0");
    T v;
    std::memcpy(&v, s.data() + pos, sizeof(T));
    pos += sizeof(T);
    return v;
  }
  std::string get_str() {
    const uint64_t n = get<uint64_t>();
    LOOM_CHECK(n <= s.size() - pos, "tp serving: a truncated step record from rank 0");
    std::string v = s.substr(pos, size_t(n));
    pos += size_t(n);
    return v;
  }
};

void put_request(std::string& s, int64_t id, const Request& r) {
  s += kOpQueue;
  put(s, id);
  put(s, uint64_t(r.prompt.size()));
  s.append(reinterpret_cast<const char*>(r.prompt.data()), r.prompt.size() * sizeof(int32_t));
  const SamplingParams& p = r.params;
  put(s, p.temperature);
  put(s, p.top_p);
  put(s, p.top_k);
  put(s, p.repetition_penalty);
  put(s, p.seed);
  put(s, p.max_tokens);
  put(s, uint64_t(p.stop.size()));
  for (const std::string& x : p.stop) put_str(s, x);
  put_str(s, p.stop_rule);
  put(s, uint8_t(p.token_healing));
  put(s, p.logprobs);
  put(s, uint8_t(p.ignore_eod));
  put_str(s, r.domain);
}

Request get_request(OpReader& in) {
  Request r;
  const uint64_t n = in.get<uint64_t>();
  LOOM_CHECK(n <= in.s.size(), "tp serving: a truncated step record from rank 0");
  r.prompt.resize(size_t(n));
  for (auto& t : r.prompt) t = in.get<int32_t>();
  SamplingParams& p = r.params;
  p.temperature = in.get<float>();
  p.top_p = in.get<float>();
  p.top_k = in.get<int32_t>();
  p.repetition_penalty = in.get<float>();
  p.seed = in.get<uint64_t>();
  p.max_tokens = in.get<int64_t>();
  const uint64_t ns = in.get<uint64_t>();
  LOOM_CHECK(ns <= in.s.size(), "tp serving: a truncated step record from rank 0");
  for (uint64_t i = 0; i < ns; ++i) p.stop.push_back(in.get_str());
  p.stop_rule = in.get_str();
  p.token_healing = in.get<uint8_t>() != 0;
  p.logprobs = in.get<int32_t>();
  p.ignore_eod = in.get<uint8_t>() != 0;
  r.domain = in.get_str();
  return r;
}
}  // namespace

KvPoolSize kv_pool_size(const model::ModelConfig& cfg, const EngineOptions& o) {
  LOOM_CHECK(o.kv_dtype == DType::f32 || o.kv_dtype == DType::bf16,
             "KV cache dtype {} is not supported; choose f32 or bf16 (--kv-dtype)",
             dtype_name(o.kv_dtype));
  LOOM_CHECK(o.kv_budget_bytes >= 0 && o.kv_blocks >= 0,
             "--kv-memory {} and --kv-blocks {} must be >= 0 (0: the default pool)",
             o.kv_budget_bytes, o.kv_blocks);
  LOOM_CHECK(o.kv_budget_bytes == 0 || o.kv_blocks == 0,
             "--kv-memory {} and --kv-blocks {} both size the KV pool; give one of them",
             o.kv_budget_bytes, o.kv_blocks);
  const int64_t P = o.tp ? o.tp->size() : 1;
  KvPoolSize k;
  k.shape = kv_cache_shape(cfg, P, o.kv_dtype);
  k.max_seq_tokens = cfg.max_seq;
  const int64_t bb = k.shape.block_bytes(), BT = k.shape.block_tokens;
  k.min_blocks = (cfg.max_seq + BT - 1) / BT;
  k.min_bytes = k.min_blocks * bb;
  const std::string each = fmt::format(
      "a KV block holds {} tokens of K and V for {} layers x {} kv heads x {} dims in {} = {}",
      BT, k.shape.layers, k.shape.kv_heads, k.shape.head_dim, kv_dtype_name(o.kv_dtype),
      human_bytes(bb));
  if (o.kv_budget_bytes > 0) {
    k.blocks = o.kv_budget_bytes / bb;
    LOOM_CHECK(k.blocks >= k.min_blocks,
               "--kv-memory {} ({}) holds {} KV blocks, but one sequence of the model's context "
               "({} tokens) needs {} blocks ({}); use --kv-memory {} ({}) or more. ({})",
               o.kv_budget_bytes, human_bytes(o.kv_budget_bytes), k.blocks, cfg.max_seq,
               k.min_blocks, human_bytes(k.min_bytes), k.min_bytes, human_bytes(k.min_bytes),
               each);
  } else if (o.kv_blocks > 0) {
    k.blocks = o.kv_blocks;
    LOOM_CHECK(k.blocks >= k.min_blocks,
               "--kv-blocks {} is too few: one sequence of the model's context ({} tokens) needs "
               "{} blocks of {} tokens; use --kv-blocks {} or more ({})",
               o.kv_blocks, cfg.max_seq, k.min_blocks, BT, k.min_blocks, each);
  } else {
    k.blocks = k.min_blocks * std::max<int64_t>(1, o.max_batch);
  }
  LOOM_CHECK(k.blocks < (int64_t(1) << 31),
             "the KV pool of {} blocks exceeds the 2^31 block ids; lower --kv-memory / "
             "--kv-blocks", k.blocks);
  k.bytes = k.blocks * bb;
  const long pages = ::sysconf(_SC_PHYS_PAGES), page = ::sysconf(_SC_PAGESIZE);
  if (pages > 0 && page > 0) {
    const int64_t phys = int64_t(pages) * int64_t(page);
    LOOM_CHECK(k.bytes <= phys,
               "the KV pool would take {} ({} blocks) but this machine has {} of memory; lower "
               "--kv-memory / --kv-blocks (or --max-batch, which sizes the default pool: {} "
               "full-context sequences of {} each){}",
               human_bytes(k.bytes), k.blocks, human_bytes(phys), std::max<int64_t>(1, o.max_batch),
               human_bytes(k.min_bytes),
               o.kv_dtype == DType::f32 ? ", or use --kv-dtype bf16 (half the bytes)" : "");
  }
  return k;
}

DType kv_dtype_from_flag(const std::string& flag, WeightFormat head) {
  if (flag == "auto") return head == WeightFormat::bf16 ? DType::bf16 : DType::f32;
  if (flag == "f32") return DType::f32;
  if (flag == "bf16") return DType::bf16;
  LOOM_FAIL("--kv-dtype '{}' is unknown; choose auto (bf16 with --dtype bf16, else f32), f32 or "
            "bf16", flag);
}

int64_t parse_byte_size(const std::string& text, const std::string& flag) {
  size_t used = 0;
  double v = 0;
  try {
    v = std::stod(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  std::string suffix = text.substr(used);
  if (!suffix.empty() && (suffix.back() == 'B' || suffix.back() == 'b')) suffix.pop_back();
  if (suffix.size() == 2 && (suffix[1] == 'i' || suffix[1] == 'I')) suffix.pop_back();  // GiB
  double mul = 0;
  if (suffix.empty()) mul = 1;
  else if (suffix == "K" || suffix == "k") mul = 1024.0;
  else if (suffix == "M" || suffix == "m") mul = 1024.0 * 1024;
  else if (suffix == "G" || suffix == "g") mul = 1024.0 * 1024 * 1024;
  else if (suffix == "T" || suffix == "t") mul = 1024.0 * 1024 * 1024 * 1024;
  const double bytes = v * mul;
  LOOM_CHECK(used > 0 && mul > 0 && std::isfinite(bytes) && bytes > 0 && bytes < 9.2e18,
             "{} '{}' is not a size; give bytes, optionally with K, M, G or T (powers of 1024), "
             "e.g. {} 512M or {} 2G",
             flag, text, flag, flag);
  return int64_t(bytes);
}

bool Engine::tp_leader() const {
  return opts_.tp_replicate && opts_.tp && opts_.tp->size() > 1 && opts_.tp->rank() == 0;
}
bool Engine::tp_follower() const {
  return opts_.tp_replicate && opts_.tp && opts_.tp->size() > 1 && opts_.tp->rank() != 0;
}

Engine::Engine(ModelWeights weights, std::unique_ptr<data::Tokenizer> tokenizer,
               EngineOptions options)
    : weights_(std::move(weights)),
      tok_(std::move(tokenizer)),
      opts_(std::move(options)),
      texts_(require_tokenizer(tok_)),
      decoder_(weights_, opts_.tp),
      kv_pool_(kv_pool_size(weights_.config(), opts_)),
      cache_(kv_pool_.shape, kv_pool_.bytes, weights_.config().max_seq) {
  const model::ModelConfig& cfg = weights_.config();
  LOOM_CHECK(opts_.max_batch >= 1, "engine: max_batch={} must be >= 1", opts_.max_batch);
  LOOM_CHECK(!opts_.tp || opts_.tp->size() == 1 || !opts_.start_thread || tp_leader(),
             "engine: under tensor parallelism (tp = {}) every rank must drive step() in "
             "lockstep (start_thread = false), or rank 0 leads (tp_replicate) and the others "
             "follow()",
             opts_.tp ? opts_.tp->size() : 1);
  LOOM_CHECK(!tp_leader() || opts_.idle_sync_s > 0, "engine: idle_sync_s={} must be > 0",
             opts_.idle_sync_s);
  LOOM_CHECK(opts_.max_queue >= 0, "engine: max_queue={} must be >= 0", opts_.max_queue);
  LOOM_CHECK(tok_->vocab_size() <= cfg.vocab,
             "tokenizer has {} tokens but the model's vocab is {}; use the model's tokenizer",
             tok_->vocab_size(), cfg.vocab);
  if (!opts_.default_domain.empty()) default_domain_ = cfg.domain_index(opts_.default_domain);
  stats_.kv_blocks_total = stats_.kv_blocks_free = cache_.num_blocks();
  if (opts_.start_thread) {
    // The step thread becomes an OpenMP master of its own; the workers the constructing thread
    // (which loaded the weights) started would otherwise count against the cores and make the
    // step thread's team sleep at every barrier (see core/threads.h).
    release_thread_pool();
    thread_ = std::thread([this] { run_thread(); });
  }
}

Engine::~Engine() {
  try {
    shutdown(false);
  } catch (...) {
  }
}

int64_t Engine::context_length() const { return weights_.config().max_seq; }
std::string Engine::model_name() const {
  return opts_.model_name.empty() ? weights_.config().name : opts_.model_name;
}
std::vector<int32_t> Engine::encode(const std::string& text) const { return tok_->encode(text); }
std::string Engine::decode(const std::vector<int32_t>& tokens) const {
  return tok_->decode(tokens);
}

SubmitResult Engine::submit(Request request) {
  using S = SubmitResult::Status;
  SubmitResult res;
  auto refuse = [&](S s, std::string msg) {
    res.status = s;
    res.message = std::move(msg);
    return res;
  };
  const int64_t ctx = context_length(), P = int64_t(request.prompt.size());
  // Prompt ids must be tokens the tokenizer knows (the model's vocabulary padding is not text).
  const int64_t V = tok_->vocab_size();
  if (P == 0) return refuse(S::invalid, "the prompt has no tokens");
  for (int64_t i = 0; i < P; ++i)
    if (request.prompt[size_t(i)] < 0 || request.prompt[size_t(i)] >= V)
      return refuse(S::invalid, fmt::format("prompt token {} at index {} is outside the "
                                            "tokenizer's vocabulary [0, {})",
                                            request.prompt[size_t(i)], i, V));
  try {
    validate_sampling(request.params);
    stop_rule_from_name(request.params.stop_rule);  // throws on an unknown language
    if (!request.domain.empty()) weights_.config().domain_index(request.domain);  // names them
  } catch (const Error& e) {
    return refuse(S::invalid, e.what());
  }
  if (P + request.params.max_tokens > ctx)
    return refuse(S::too_long,
                  fmt::format("this model's maximum context length is {} tokens, but {} tokens "
                              "were requested ({} in the prompt, {} for the completion); "
                              "shorten the prompt or lower max_tokens to at most {}",
                              ctx, P + request.params.max_tokens, P, request.params.max_tokens,
                              std::max<int64_t>(0, ctx - P)));
  auto a = make_active(std::move(request));
  std::lock_guard<std::mutex> lk(mu_);
  if (tp_follower())
    return refuse(S::invalid, "under tp serving only rank 0 takes requests");
  if (stopping_) return refuse(S::shutting_down, "the service is shutting down");
  if (int64_t(queue_.size()) >= opts_.max_queue)
    return refuse(S::queue_full,
                  fmt::format("{} requests are already waiting (the queue holds {}); retry later",
                              queue_.size(), opts_.max_queue));
  a->id = next_id_++;
  res.request_id = a->id;
  if (tp_leader()) put_request(ops_, a->id, a->req);
  queue_.push_back(std::move(a));
  stats_.queued = int64_t(queue_.size());
  cv_.notify_all();
  return res;
}

std::unique_ptr<Engine::Active> Engine::make_active(Request request) const {
  auto a = std::make_unique<Active>();
  const StopRule rule = stop_rule_from_name(request.params.stop_rule);
  a->req = std::move(request);
  a->prompt_tokens = int64_t(a->req.prompt.size());
  a->domain = a->req.domain.empty() ? default_domain_ : weights_.config().domain_index(a->req.domain);
  a->context = a->req.prompt;
  if (a->req.params.token_healing) a->heal = heal_prompt(a->context, texts_);
  const std::string prompt_text = tok_->decode(a->req.prompt);
  a->stopper =
      TextStopper(a->req.params.stop, rule, prompt_text.empty() || prompt_text.back() == '\n');
  return a;
}

void Engine::cancel(int64_t request_id) {
  std::lock_guard<std::mutex> lk(mu_);
  // Only live ids are remembered (unknown or finished ones are ignored).
  bool live = false;
  for (auto& q : queue_) live |= q->id == request_id;
  for (auto& r : running_) live |= r->id == request_id;
  if (live && !tp_follower()) {
    cancel_.insert(request_id);
    if (tp_leader()) {
      ops_ += kOpCancel;
      put(ops_, request_id);
    }
  }
  cv_.notify_all();
}

void Engine::apply_ops(const std::string& ops) {
  OpReader in{ops};
  while (!in.done()) {
    const char kind = in.get<char>();
    if (kind == kOpQueue) {
      const int64_t id = in.get<int64_t>();
      auto a = make_active(get_request(in));
      // Rank 0 numbers requests as it queues them; the same order here gives the same ids.
      LOOM_CHECK(id == next_id_,
                 "tp serving: rank 0 queued request {} but this rank expected id {}; the ranks' "
                 "engines diverged",
                 id, next_id_);
      a->id = next_id_++;
      queue_.push_back(std::move(a));
    } else if (kind == kOpCancel) {
      const int64_t id = in.get<int64_t>();
      bool live = false;
      for (auto& q : queue_) live |= q->id == id;
      for (auto& r : running_) live |= r->id == id;
      if (live) cancel_.insert(id);
    } else if (kind == kOpStop) {
      leader_stopped_ = true;
      stopping_ = true;
    } else {
      LOOM_FAIL("tp serving: unknown step record {} from rank 0", int(kind));
    }
  }
  stats_.queued = int64_t(queue_.size());
}

void Engine::broadcast_ops(std::string& ops) {
  int64_t n = int64_t(ops.size());
  opts_.tp->broadcast(comm::BufferRef(&n, 1, DType::i64), 0).wait();
  if (n == 0) return;
  ops.resize(size_t(n));
  opts_.tp->broadcast(comm::BufferRef(ops.data(), n, DType::u8), 0).wait();
}

void Engine::follow() {
  LOOM_CHECK(tp_follower(), "engine: follow() is for tp ranks other than 0 with tp_replicate");
  while (!leader_stopped_) step();
}

void Engine::finish(Active& a, FinishReason why, std::vector<TokenEvent>& out,
                    const std::string& error) {
  TokenEvent ev;
  ev.request_id = a.id;
  if (why == FinishReason::length || (why == FinishReason::stop && a.emitted < a.text.size()))
    ev.text = a.text.substr(a.emitted);  // nothing is pending any more: flush what was held
  a.emitted = a.text.size();
  ev.finish = why;
  ev.error = error;
  ev.prompt_tokens = a.prompt_tokens;
  ev.completion_tokens = int64_t(a.generated.size());
  out.push_back(std::move(ev));
  a.done = true;
}

bool Engine::step() {
  std::lock_guard<std::mutex> step_lock(step_mu_);
  std::vector<TokenEvent> events;
  std::vector<Active*> batch;
  std::vector<std::unique_ptr<Active>> finished_queued;
  // tp_replicate: rank 0's changes since its last step; the others receive them here and apply
  // them below, at the point where rank 0 took them (before cancellations and admission).
  std::string ops;
  if (tp_follower()) broadcast_ops(ops);
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (tp_leader()) {
      ops.swap(ops_);
      if (stopping_ && queue_.empty() && running_.empty()) {
        ops += kOpStop;
        stop_sent_ = true;
      }
    } else if (tp_follower()) {
      apply_ops(ops);
    }
    // Cancellations: queued requests leave at once; running ones finish below.
    for (auto it = queue_.begin(); it != queue_.end();) {
      if (cancel_.count((*it)->id)) {
        finished_queued.push_back(std::move(*it));
        it = queue_.erase(it);
      } else {
        ++it;
      }
    }
    for (auto& r : running_)
      if (cancel_.count(r->id)) r->cancelled = true;
    for (auto& q : finished_queued) cancel_.erase(q->id);
    for (auto& r : running_) cancel_.erase(r->id);
    // Admission: FIFO while a batch slot and the KV blocks of prompt + max_tokens are free.
    while (!queue_.empty() && int64_t(running_.size()) < opts_.max_batch) {
      Active& a = *queue_.front();
      if (a.req.params.max_tokens > 0) {
        const int64_t need = int64_t(a.context.size()) + a.req.params.max_tokens;
        const int64_t seq = cache_.create();
        if (!cache_.reserve(seq, need)) {
          cache_.release(seq);
          break;
        }
        a.kv_seq = seq;
      }
      running_.push_back(std::move(queue_.front()));
      queue_.pop_front();
    }
    for (auto& r : running_) batch.push_back(r.get());
    stats_.queued = int64_t(queue_.size());
  }
  if (tp_leader()) broadcast_ops(ops);
  for (auto& q : finished_queued) finish(*q, FinishReason::cancelled, events);

  int64_t generated_now = 0;
  // Who runs this step: everything admitted and not cancelled or already complete.
  std::vector<Active*> run;
  for (Active* a : batch) {
    if (a->cancelled)
      finish(*a, FinishReason::cancelled, events);
    else if (a->req.params.max_tokens == 0)
      finish(*a, FinishReason::length, events);
    else
      run.push_back(a);
  }
  if (!run.empty()) {
    // Token budget of the step (chunked prefill): every decoding sequence feeds its one token
    // first, then prefilling sequences, in admission order, feed prompt chunks while the budget
    // lasts (at least one token per step so a prefill always advances). A token's arithmetic
    // does not depend on the chunking (decoder.h), so neither do the sampled tokens.
    int64_t budget = opts_.max_step_tokens > 0 ? opts_.max_step_tokens : INT64_MAX;
    std::vector<int64_t> feed(run.size(), 0);
    bool progressed = false;
    for (size_t i = 0; i < run.size(); ++i)
      if (int64_t(run[i]->context.size()) - run[i]->cached == 1) {
        feed[i] = 1;
        --budget;
        progressed = true;
      }
    for (size_t i = 0; i < run.size(); ++i) {
      const int64_t rem = int64_t(run[i]->context.size()) - run[i]->cached;
      if (rem <= 1) continue;
      const int64_t take = std::min(rem, std::max<int64_t>(budget, progressed ? 0 : 1));
      if (take <= 0) continue;
      feed[i] = take;
      budget -= take;
      progressed = true;
    }
    std::vector<Active*> fed;
    std::vector<SeqStep> steps;
    for (size_t i = 0; i < run.size(); ++i) {
      if (feed[i] == 0) continue;
      Active& a = *run[i];
      fed.push_back(&a);
      steps.push_back({a.kv_seq, a.cached,
                       std::span<const int32_t>(a.context.data() + a.cached, size_t(feed[i])),
                       a.domain});
    }
    const int64_t V = weights_.config().vocab, TV = tok_->vocab_size();
    // (B,V), every row overwritten by the forward (a fresh zeroed vector was a 0.5 MB memset
    // a step at batch 32, V 4096, on the step thread alone).
    if (logits_.size() < fed.size() * size_t(V)) logits_.resize(fed.size() * size_t(V));
    float* const logits = logits_.data();
    try {
      decoder_.forward(cache_, steps, logits);
    } catch (const std::exception& e) {
      // Under tp_replicate a failed step (a collective timed out, a rank died) leaves the ranks
      // out of step: fatal (run_thread ends the job; follow() throws).
      if (tp_leader() || tp_follower()) throw;
      for (Active* a : fed) finish(*a, FinishReason::error, events, e.what());
      fed.clear();
    }
    // Each row that completes its context this step samples a token. The rows are independent
    // (a row's draw depends only on its logits, seed and counter), so they are sampled in
    // parallel: a row's log-softmax over V takes ~0.2 ms (greedy, V 50k; more with top-p), a
    // tenth of a batch-8 decode step when the rows ran one after another.
    std::vector<Sampled> sampled(fed.size());
    std::vector<std::string> failed(fed.size());
    std::vector<char> due(fed.size(), 0);
    for (size_t i = 0; i < fed.size(); ++i)
      due[i] = fed[i]->cached + int64_t(steps[i].tokens.size()) >= int64_t(fed[i]->context.size());
#pragma omp parallel for schedule(dynamic, 1) if (fed.size() > 1)
    for (size_t i = 0; i < fed.size(); ++i) {
      if (!due[i]) continue;
      const Active& a = *fed[i];
      const SamplingParams& p = a.req.params;
      std::span<float> row(logits + i * size_t(V), size_t(V));
      try {
        // Tokens the tokenizer cannot produce (vocab padding) are never sampled.
        for (int64_t v = TV; v < V; ++v) row[size_t(v)] = -INFINITY;
        if (a.generated.empty()) mask_for_healing(row, a.heal, texts_, tok_->eod_id());
        apply_repetition_penalty(row, a.context, p.repetition_penalty);
        sampled[i] = sample_token(row, p, uint64_t(a.generated.size()), std::max(0, p.logprobs));
      } catch (const std::exception& e) {
        failed[i] = e.what();
        if (failed[i].empty()) failed[i] = "sampling failed";
      }
    }
    for (size_t i = 0; i < fed.size(); ++i) {
      Active& a = *fed[i];
      const SamplingParams& p = a.req.params;
      a.cached += int64_t(steps[i].tokens.size());
      if (!due[i]) continue;  // prompt not all in the cache yet
      if (!failed[i].empty()) {
        finish(a, FinishReason::error, events, failed[i]);
        continue;
      }
      const Sampled& s = sampled[i];
      if (s.token == tok_->eod_id() && !p.ignore_eod) {
        finish(a, FinishReason::stop, events);
        continue;
      }
      a.generated.push_back(s.token);
      a.context.push_back(s.token);
      std::string full = tok_->decode(a.generated);
      const size_t strip =
          full.compare(0, a.heal.healed.size(), a.heal.healed) == 0 ? a.heal.healed.size() : 0;
      a.text = full.substr(strip);
      const TextStopper::Verdict vd = a.stopper.check(a.text);
      TokenEvent ev;
      ev.request_id = a.id;
      ev.token = s.token;
      ev.logprob = s.logprob;
      if (p.logprobs >= 0)
        for (auto& [t, lp] : s.top)
          ev.top.push_back({t, t < TV ? texts_.text(t) : std::string(), lp});
      const size_t upto = vd.end;
      if (upto > a.emitted) {
        ev.text = a.text.substr(a.emitted, upto - a.emitted);
        a.emitted = upto;
      }
      if (vd.stopped) {
        a.text.resize(std::max(vd.end, a.emitted));
        ev.finish = FinishReason::stop;
      } else if (int64_t(a.generated.size()) >= p.max_tokens ||
                 int64_t(a.context.size()) >= context_length()) {
        ev.text += a.text.substr(a.emitted);
        a.emitted = a.text.size();
        ev.finish = FinishReason::length;
      }
      if (ev.finish != FinishReason::none) {
        ev.prompt_tokens = a.prompt_tokens;
        ev.completion_tokens = int64_t(a.generated.size());
        a.done = true;
      }
      events.push_back(std::move(ev));
      ++generated_now;
    }
  }

  bool any;
  std::vector<std::unique_ptr<Active>> retired;  // finished this step; destroyed after delivery
  {
    std::lock_guard<std::mutex> lk(mu_);
    for (auto& r : running_)
      if (r->done) {
        cancel_.erase(r->id);  // a cancel that raced with the last token
        if (r->kv_seq >= 0) cache_.release(r->kv_seq);
        r->kv_seq = -1;
        retired.push_back(std::move(r));
      }
    std::erase_if(running_, [](const std::unique_ptr<Active>& r) { return r == nullptr; });
    stats_.generated_tokens += generated_now;
    stats_.running = int64_t(running_.size());
    stats_.kv_blocks_free = cache_.free_blocks();
    any = !batch.empty() || !finished_queued.empty();
    if (any) ++stats_.steps;
  }
  // Deliver outside every lock (callbacks may call cancel() or submit()), in event order. The
  // Active objects are alive: running ones in running_ (only this thread removes them), the
  // others in `retired` and `finished_queued`.
  for (const TokenEvent& ev : events) {
    Active* owner = nullptr;
    for (Active* a : batch)
      if (a->id == ev.request_id) owner = a;
    for (auto& q : finished_queued)
      if (q->id == ev.request_id) owner = q.get();
    if (!owner || !owner->req.on_event) continue;
    try {
      owner->req.on_event(ev);
    } catch (const std::exception& e) {
      // A callback that throws must not take the step thread (and every other request) down.
      std::fprintf(stderr, "loom infer: the event callback of request %lld threw: %s\n",
                   (long long)ev.request_id, e.what());
    } catch (...) {
      std::fprintf(stderr, "loom infer: the event callback of request %lld threw\n",
                   (long long)ev.request_id);
    }
  }
  return any;
}

void Engine::run_thread() {
  for (;;) {
    {
      std::unique_lock<std::mutex> lk(mu_);
      auto work = [&] { return stopping_ || !queue_.empty() || !running_.empty(); };
      if (tp_leader()) {
        // Steps (and so broadcasts to the followers) at least every idle_sync_s; the step that
        // finds the engine stopping with nothing left sends the followers their stop.
        cv_.wait_for(lk, std::chrono::duration<double>(opts_.idle_sync_s), work);
      } else {
        cv_.wait(lk, work);
        if (stopping_ && queue_.empty() && running_.empty()) return;
      }
    }
    try {
      step();
    } catch (const std::exception& e) {
      if (tp_leader())
        comm::abort_world(fmt::format("tp serving: a step failed, ending the job: {}", e.what()));
      fail_all(e.what());
    }
    if (stop_sent_) return;
  }
}

void Engine::fail_all(const std::string& why) {
  // Something outside the per-request error paths failed (out of memory, a broken invariant):
  // every request ends with `error` rather than the thread dying with them pending.
  std::vector<std::unique_ptr<Active>> all;
  {
    std::lock_guard<std::mutex> lk(mu_);
    for (auto& q : queue_) all.push_back(std::move(q));
    for (auto& r : running_) all.push_back(std::move(r));
    queue_.clear();
    running_.clear();
    for (auto& a : all)
      if (a->kv_seq >= 0) cache_.release(a->kv_seq);
    stats_.queued = stats_.running = 0;
    stats_.kv_blocks_free = cache_.free_blocks();
  }
  std::fprintf(stderr, "loom infer: step failed, ending %zu requests: %s\n", all.size(),
               why.c_str());
  for (auto& a : all) {
    if (a->done) continue;
    std::vector<TokenEvent> ev;
    finish(*a, FinishReason::error, ev, why);
    try {
      if (a->req.on_event) a->req.on_event(ev[0]);
    } catch (...) {
    }
  }
}

void Engine::shutdown(bool drain) {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stopping_ = true;
    if (!drain && !tp_follower()) {
      for (auto& q : queue_) cancel_.insert(q->id);
      for (auto& r : running_) cancel_.insert(r->id);
      if (tp_leader())
        for (int64_t id : cancel_) {
          ops_ += kOpCancel;
          put(ops_, id);
        }
    }
    cv_.notify_all();
  }
  std::lock_guard<std::mutex> jl(join_mu_);
  if (thread_.joinable()) {
    thread_.join();
  } else if (!opts_.start_thread && !tp_follower()) {  // followers step in follow() only
    while (step()) {
    }
  }
}

Engine::Stats Engine::stats() const {
  std::lock_guard<std::mutex> lk(mu_);
  return stats_;
}

std::unique_ptr<Engine> load_engine(const std::string& checkpoint_dir,
                                    const std::string& tokenizer_path,
                                    const WeightFormats& formats, EngineOptions options) {
  model::TpShard shard;
  if (options.tp && options.tp->size() > 1) shard = {options.tp->rank(), options.tp->size()};
  {
    // The KV options are checked from the config before the (possibly minutes of) weights load.
    const checkpoint::ShardedReader r(checkpoint_dir);
    kv_pool_size(model::model_config_from_toml(r.config_toml(), r.dir() + "/config.toml"),
                 options);
  }
  ModelWeights w = ModelWeights::load(checkpoint_dir, formats, shard);
  // The tokenizer saved with the checkpoint: in the directory the weights come from (a run's
  // ckpt/ holds versioned step directories and `latest`; find_checkpoint resolves it).
  const std::string tp = tokenizer_path.empty()
                             ? checkpoint::find_checkpoint(checkpoint_dir) + "/tokenizer"
                             : tokenizer_path;
  auto tok = data::load_tokenizer(tp);
  return std::make_unique<Engine>(std::move(w), std::move(tok), std::move(options));
}

}  // namespace loom::infer
