// infer/engine.h: infer::Engine, the CompletionService (service.h) that runs the KV-cached
// decoder with continuous batching.
//
// Scheduling (Orca-style iteration-level batching, no preemption):
//   - submit() validates a request and puts it in a bounded FIFO queue (max_queue), or refuses
//     it at once (queue_full, too_long: prompt + max_tokens > context, invalid, shutting_down).
//   - Before every step the head of the queue is admitted while fewer than max_batch sequences
//     run AND the KV pool has free blocks for its whole prompt + max_tokens (reserved up front,
//     so a running sequence never waits or is preempted). FIFO: a request that does not fit
//     blocks the ones behind it (no starvation of long prompts).
//   - One step = one decoder forward over every running sequence: one token of each decoding
//     sequence, then prompt chunks of prefilling ones up to max_step_tokens (chunked prefill, so
//     a long prompt does not stall the others), then one sampled token for every sequence whose
//     prompt is fully in the cache.
//     Finished sequences leave and free their blocks; queued ones join at the next step.
//   - Determinism: a request's tokens depend only on its prompt, parameters and seed, never on
//     which requests share its steps (batch-invariant decoder, counter-based sampling).
// Events: delivered from the step thread, in order, without any engine lock held. A request's
// text is the completion after the FULL prompt (token healing's re-emitted text is removed).
// End-of-document finishes with `stop` and a last event without a token (unless ignore_eod).
//
// Threads: with start_thread (default) a background thread runs steps while there is work;
// shutdown(drain) stops admission, then finishes (drain) or cancels everything and joins it.
// With start_thread = false the caller drives step() (tests, single-threaded tools).
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_set>
#include <vector>

#include "data/tokenizer.h"
#include "infer/decoder.h"
#include "infer/kv_cache.h"
#include "infer/sampling.h"
#include "infer/service.h"
#include "infer/stop.h"
#include "infer/weights.h"

namespace loom::infer {

struct EngineOptions {
  std::string model_name;          // "" -> the model config's name
  int64_t max_batch = 8;           // sequences in one step (>= 1)
  int64_t max_queue = 64;          // requests waiting for admission (>= 0); more -> queue_full
  // The KV pool (kv_pool_size below): K and V stored as kv_dtype (f32 or bf16), sized
  // kv_budget_bytes (`--kv-memory`), else kv_blocks blocks of 16 tokens (`--kv-blocks`), else
  // (both 0) max_batch sequences of the full context.
  DType kv_dtype = DType::f32;
  int64_t kv_budget_bytes = 0;
  int64_t kv_blocks = 0;
  int64_t max_step_tokens = 2048;  // tokens per step (decodes first, then prompt chunks); 0: no cap
  bool start_thread = true;        // false: the caller drives step()
  // Tensor parallel: the group the weights are sharded over (ModelWeights with its TpShard), or
  // null. Under tp every rank runs its own Engine with start_thread = false, submits the same
  // requests in the same order and calls step() in lockstep (the decoder's collectives keep the
  // ranks together; logits, and so every sampled token, are identical on all ranks).
  const comm::ProcessGroup* tp = nullptr;
  // MoE (rre) models: the domain of requests that name none ("" = the model's "other" domain);
  // checked at construction (ModelConfig::domain_index).
  std::string default_domain;
  // Under tp, the leader/follower mode instead (loom serve --tp): tp rank 0's engine alone takes
  // requests (submit, cancel, shutdown from any thread; start_thread = true) and, at every step,
  // broadcasts over `tp` what changed since its last step: requests queued (prompt, parameters,
  // id), cancellations, and a final stop once it is shutting down with nothing left. Every other
  // rank calls follow(), which applies those changes to its own engine and runs the same step,
  // so the queues, the admissions and the KV caches stay identical and the decoder's collectives
  // line up. With nothing to do rank 0 still steps every idle_sync_s, so the others never wait
  // in a broadcast longer than that (every wait is bounded by the group's comm timeout). A
  // failed collective is fatal under tp: rank 0's step thread ends the job
  // (comm::abort_world, naming the failure); follow() throws.
  bool tp_replicate = false;
  double idle_sync_s = 0.5;
};

// The KV pool an Engine with `o` builds for `cfg` (this rank's shard under o.tp): its geometry,
// blocks and bytes, and the least that works (one sequence of the model's context, max_seq
// tokens). Throws loom::Error, naming the value asked for (as the flag `--kv-memory` /
// `--kv-blocks` that sets it), the minimum in the same unit and the fix, when it cannot hold one
// full-context sequence, when both sizes are given, when it exceeds this machine's physical
// memory, or when kv_dtype is neither f32 nor bf16. Needs no weights: load_engine calls it
// before loading them.
struct KvPoolSize {
  KvCacheShape shape;
  int64_t blocks = 0, bytes = 0;
  int64_t min_blocks = 0, min_bytes = 0;
  int64_t max_seq_tokens = 0;  // the model's context
  // Full-context sequences the pool holds at once: blocks / min_blocks.
  int64_t full_sequences() const { return min_blocks ? blocks / min_blocks : 0; }
};
KvPoolSize kv_pool_size(const model::ModelConfig& cfg, const EngineOptions& o);

// The KV flags `loom generate`, `serve`, `eval humaneval-x`, `eval loss` and `bench decode` share:
// --kv-dtype auto|f32|bf16, where auto is bf16 when the weights' --dtype (the head's format,
// `head`) is bf16 and f32 otherwise (f32 weights, or --int8 with the f32 default head), as vLLM's
// kv_cache_dtype "auto" follows the model's dtype. Throws naming the accepted values.
DType kv_dtype_from_flag(const std::string& flag, WeightFormat head);
// A byte count as `--kv-memory` takes it: an integer, optionally with a binary suffix K, M, G or
// T (KiB, MiB, GiB, TiB; "512M", "1.5G", "268435456"). Throws naming `flag` and the text.
int64_t parse_byte_size(const std::string& text, const std::string& flag);

class Engine : public CompletionService {
 public:
  // The tokenizer's vocabulary must not exceed the model's (tokens past it, the vocabulary
  // padding, are never sampled). Throws loom::Error on bad options or a KV budget that cannot
  // hold one full-context sequence.
  Engine(ModelWeights weights, std::unique_ptr<data::Tokenizer> tokenizer,
         EngineOptions options = {});
  ~Engine() override;  // shutdown(/*drain=*/false)

  SubmitResult submit(Request request) override;
  void cancel(int64_t request_id) override;
  int64_t context_length() const override;
  std::string model_name() const override;
  std::vector<int32_t> encode(const std::string& text) const override;
  std::string decode(const std::vector<int32_t>& tokens) const override;
  void shutdown(bool drain) override;

  // One scheduling step on the calling thread (start_thread = false only). Returns false when
  // nothing was queued or running.
  bool step();

  // tp_replicate, tp ranks other than 0: runs the steps rank 0 broadcasts until rank 0 stops
  // (after its shutdown). Throws on a failed or timed-out collective.
  void follow();

  struct Stats {
    int64_t queued = 0, running = 0;
    int64_t kv_blocks_free = 0, kv_blocks_total = 0;
    int64_t steps = 0, generated_tokens = 0;
  };
  Stats stats() const;  // thread-safe snapshot
  const ModelWeights& weights() const { return weights_; }
  const data::Tokenizer& tokenizer() const { return *tok_; }
  const KvPoolSize& kv_pool() const { return kv_pool_; }

 private:
  struct Active;
  // tp_replicate roles (both false without it).
  bool tp_leader() const;
  bool tp_follower() const;
  // The Active of a validated request (token healing, stop state); no id yet.
  std::unique_ptr<Active> make_active(Request request) const;
  // Followers: applies rank 0's serialized changes (under mu_).
  void apply_ops(const std::string& ops);
  void broadcast_ops(std::string& ops);  // rank 0 sends, the others receive
  void run_thread();
  void fail_all(const std::string& why);
  void finish(Active& a, FinishReason why, std::vector<TokenEvent>& out,
              const std::string& error = {});

  ModelWeights weights_;
  std::unique_ptr<data::Tokenizer> tok_;
  EngineOptions opts_;
  TokenTexts texts_;
  Decoder decoder_;
  KvPoolSize kv_pool_;
  KvCache cache_;  // used by the step thread only (admission runs there too)
  std::vector<float> logits_;  // (B,V) a step's logits (step thread); grown, not cleared per step
  int32_t default_domain_ = -1;  // opts_.default_domain's index (-1: "other")

  mutable std::mutex mu_;  // guards everything below
  std::condition_variable cv_;
  std::deque<std::unique_ptr<Active>> queue_;
  std::vector<std::unique_ptr<Active>> running_;
  std::unordered_set<int64_t> cancel_;
  bool stopping_ = false;
  int64_t next_id_ = 1;
  Stats stats_;
  std::string ops_;           // tp_replicate, rank 0: changes since its last step (serialized)
  bool stop_sent_ = false;    // rank 0: the final stop went out (step thread only)
  bool leader_stopped_ = false;  // followers: rank 0 sent its stop (follow()'s thread only)
  std::mutex step_mu_;  // one step at a time
  std::mutex join_mu_;
  std::thread thread_;
};

// Loads a loom checkpoint and its tokenizer into an Engine: weights in `formats`
// (ModelWeights::load); under options.tp only this rank's shard of the weights. The KV pool
// options are checked (kv_pool_size) from the checkpoint's config before the weights load.
// tokenizer_path "": the tokenizer/ of the directory DIR resolves to (DIR itself, or the newest
// committed step of a versioned DIR or of RUN/ckpt; checkpoint::find_checkpoint).
std::unique_ptr<Engine> load_engine(const std::string& checkpoint_dir,
                                    const std::string& tokenizer_path,
                                    const WeightFormats& formats, EngineOptions options = {});

}  // namespace loom::infer
