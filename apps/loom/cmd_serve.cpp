// `loom serve --checkpoint DIR [--host 127.0.0.1] [--port 8080] [--int8] [--dtype f32|bf16]
//  [--max-batch N] [--tp N] [--kv-dtype auto|f32|bf16] [--kv-memory SIZE | --kv-blocks N]
//  [--max-queue N] [--api-key K] ...`: the OpenAI-compatible HTTP server (infer/http/server.h)
// over infer::Engine (continuous batching over the KV-cached decoder).
//
// SIGTERM / SIGINT: stop admitting (new completions get 503), finish every request in flight,
// then exit 0. The signals are blocked in every thread and taken by sigwait() on the main
// thread, so no handler runs inside the engine or the HTTP threads.
//
// `--tp N` under `mpirun -np N`: every rank loads its tensor-parallel shard of the weights; rank 0
// runs the HTTP server and the engine's schedule, and the other ranks follow its steps
// (EngineOptions::tp_replicate: rank 0 broadcasts each step's new requests and cancellations, all
// ranks run the same decoder step together). Only rank 0 acts on SIGTERM / SIGINT (the others
// keep them blocked and never wait for them, so a signal mpirun forwards to every rank still
// drains): once rank 0 has drained it tells the others to stop and every rank exits 0. A failed
// or timed-out collective (a rank died or hangs) ends the job naming the rank
// (comm::abort_world); every collective waits at most the comm timeout (LOOM_COMM_TIMEOUT, 300 s
// by default).
//
// The engine is built in make_engine_for_serving() only, the one place to change should its
// constructor change.
#include <signal.h>
#include <unistd.h>

#include <memory>
#include <string>

#include "cli.h"
#include "comm/mpi_runtime.h"
#include "comm/process_group.h"
#include "core/error.h"
#include "core/log.h"
#include "infer/engine.h"
#include "infer/http/server.h"
#include "infer/service.h"
#include "kv_flags.h"

namespace {

struct ServeEngineOptions {
  std::string checkpoint;
  std::string tokenizer;  // "" = DIR/tokenizer
  std::string model_name;
  std::string domain;  // MoE (rre): requests without "domain" use this ("" = "other")
  std::string head_dtype = "auto";
  bool int8 = false, int8_head = false, batch_invariant = false;
  std::string dtype = "f32";  // the linears' and head's storage without --int8 / --head-dtype
  int64_t max_batch = 8;
  int64_t max_queue = 64;
  int tp = 1;
  loom::cli::KvFlags kv;
};

// tp: the tensor-parallel group (null for one process); rank 0 leads, the others follow().
std::unique_ptr<loom::infer::Engine> make_engine_for_serving(const ServeEngineOptions& o,
                                                             const loom::comm::ProcessGroup* tp) {
  using namespace loom::infer;
  EngineOptions eo;
  eo.model_name = o.model_name;
  eo.max_batch = o.max_batch;
  eo.max_queue = o.max_queue;
  eo.default_domain = o.domain;
  if (tp && tp->size() > 1) {
    eo.tp = tp;
    eo.tp_replicate = true;
    eo.start_thread = tp->rank() == 0;
  }
  // As `loom generate` (infer/weights.h, weight_formats_from_flags).
  WeightFormats wf = weight_formats_from_flags(o.dtype, o.int8, o.int8_head, o.head_dtype);
  wf.batch_invariant = o.batch_invariant;
  loom::cli::apply_kv_flags(o.kv, wf.base, eo);
  return load_engine(o.checkpoint, o.tokenizer, wf, eo);
}

struct ServeOptions {
  ServeEngineOptions engine;
  loom::infer::ServerOptions server;
};

// Rank 0 (or the only process): the engine, the HTTP server, and the wait for SIGTERM / SIGINT.
void serve_rank0(ServeOptions& o, const loom::comm::ProcessGroup* tp,
                 const sigset_t& stop_signals) {
  using namespace loom;
  LOOM_LOG_INFO("loading {} ({}{}){}", o.engine.checkpoint, o.engine.dtype,
                o.engine.int8 ? ", --int8: int8 linears and head" : "",
                tp ? fmt::format(" (tp shard 0 of {})", tp->size()) : std::string());
  std::unique_ptr<infer::Engine> engine = make_engine_for_serving(o.engine, tp);
  const infer::KvPoolSize& kv = engine->kv_pool();
  LOOM_LOG_INFO("KV pool{}: {:.1f} MiB, {} blocks of {} tokens in {} ({} tokens): {} sequences "
                "of the full context ({} tokens) at once; --max-batch {}{}",
                tp ? " (each rank)" : "", double(kv.bytes) / (1024.0 * 1024), kv.blocks,
                kv.shape.block_tokens, infer::kv_dtype_name(kv.shape.dtype), kv.blocks * kv.shape.block_tokens,
                kv.full_sequences(), kv.max_seq_tokens, o.engine.max_batch,
                kv.full_sequences() < o.engine.max_batch
                    ? " (requests beyond that wait for blocks; raise --kv-memory to run them all)"
                    : "");
  infer::HttpServer server(*engine, o.server);
  server.start();
  if (tp)
    LOOM_LOG_INFO("tp {}: rank 0 is pid {}; SIGTERM it to drain and stop every rank", tp->size(),
                  int(::getpid()));
  LOOM_LOG_INFO("ready: curl http://{}:{}/v1/completions -H 'Content-Type: application/json' "
                "-d '{{\"prompt\": \"def fib(n):\", \"max_tokens\": 32}}'   (openai client: "
                "base_url=\"http://{}:{}/v1\")",
                o.server.host, server.port(), o.server.host, server.port());

  int sig = 0;
  sigwait(&stop_signals, &sig);
  LOOM_LOG_INFO("{}: finishing {} requests in flight, then exiting",
                sig == SIGTERM ? "SIGTERM" : "SIGINT", server.active_requests());
  server.shutdown(/*drain=*/true);
  // Under tp the engine's step thread has told the other ranks to stop (shutdown joined it).
  const infer::Engine::Stats st = engine->stats();
  LOOM_LOG_INFO("served {} tokens in {} decoder steps ({:.1f} tokens a step)", st.generated_tokens,
                st.steps, st.steps ? double(st.generated_tokens) / double(st.steps) : 0.0);
  LOOM_LOG_INFO("drained{}; exiting", tp ? "; the other ranks were told to stop" : "");
}

void add_serve(CLI::App& root, loom::cli::Context& ctx) {
  auto o = std::make_shared<ServeOptions>();
  auto& e = o->engine;
  auto& s = o->server;
  CLI::App* sub = root.add_subcommand(
      "serve", "serve a checkpoint over an OpenAI-compatible HTTP API (/v1/completions)");
  sub->add_option("--checkpoint", e.checkpoint, "checkpoint directory")->required();
  sub->add_option("--tokenizer", e.tokenizer, "tokenizer (default: DIR/tokenizer)");
  sub->add_option("--host", s.host,
                  "address to listen on (default 127.0.0.1; any other needs --api-key)")
      ->capture_default_str();
  sub->add_option("--port", s.port, "port (0 = any free port)")->capture_default_str();
  sub->add_flag("--int8", e.int8, "int8 per-row weights for the block linears and the tied head");
  sub->add_flag("--int8-head", e.int8_head, "with --int8: --head-dtype int8 (the default since --int8 quantizes the head)");
  sub->add_option("--head-dtype", e.head_dtype,
                  "tied LM head storage: auto (int8 with --int8, else --dtype), f32, bf16 or int8")
      ->check(CLI::IsMember({"auto", "f32", "bf16", "int8"}));
  sub->add_option("--dtype", e.dtype, "weight storage: f32 or bf16 (with --int8: --kv-dtype auto follows it)")
      ->capture_default_str();
  sub->add_option("--tp", e.tp,
                  "tensor-parallel size; run under mpirun -np N (rank 0 serves HTTP)")
      ->capture_default_str();
  sub->add_option("--max-batch", e.max_batch, "sequences decoded together in one step")
      ->capture_default_str();
  loom::cli::add_kv_flags(sub, e.kv);
  loom::cli::add_batch_invariant_flag(sub, e.batch_invariant);
  sub->add_option("--max-queue", e.max_queue,
                  "requests waiting for a batch slot; more get 429 with Retry-After")
      ->capture_default_str();
  sub->add_option("--api-key", s.api_key,
                  "require 'Authorization: Bearer KEY' on /v1 (or set LOOM_API_KEY)")
      ->envname("LOOM_API_KEY");
  sub->add_option("--model-name", e.model_name, "model id clients send (default: the config's)");
  sub->add_option("--domain", e.domain,
                  "MoE (rre) models: the domain of requests that send no \"domain\" field "
                  "(default: the model's \"other\")");
  sub->add_option("--max-body-bytes", s.max_body_bytes, "larger request bodies get 413")
      ->capture_default_str();
  sub->add_option("--max-tokens-limit", s.max_tokens_limit, "largest max_tokens a request may ask")
      ->capture_default_str();
  sub->add_option("--max-concurrent", s.max_concurrent_requests,
                  "completions in flight over HTTP; more get 429")
      ->capture_default_str();
  sub->add_option("--request-timeout", s.request_timeout_s,
                  "seconds one request may generate before it is cancelled (0 = no limit)")
      ->capture_default_str();
  sub->add_option("--stream-interval-ms", s.stream_interval_ms,
                  "a streaming request's tokens are written at most once per this many ms "
                  "(the first and last at once; a token held when no more come goes out within "
                  "50 ms; 0 = every token as it comes)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  sub->add_flag("--cut-to-context", s.cut_to_context,
                "cut max_tokens to fit the context (finish_reason length) instead of answering "
                "400 context_length_exceeded");
  sub->callback([o, &ctx] {
    using namespace loom;
    // Validate the server options (e.g. a public --host without --api-key) before the minutes
    // a checkpoint takes to load.
    o->server.model_name = o->engine.model_name;
    LOOM_CHECK(infer::is_loopback_host(o->server.host) || !o->server.api_key.empty(),
               "refusing to listen on {} without an API key: anyone who can reach that address "
               "could use the model. Pass --api-key KEY (or set LOOM_API_KEY), or bind to "
               "127.0.0.1 with --host 127.0.0.1",
               o->server.host);
    LOOM_CHECK(o->engine.max_batch >= 1, "--max-batch {} must be >= 1", o->engine.max_batch);
    LOOM_CHECK(o->engine.max_queue >= 0, "--max-queue {} must be >= 0", o->engine.max_queue);
    LOOM_CHECK(o->engine.tp >= 1, "--tp {} must be >= 1", o->engine.tp);
    LOOM_CHECK(o->engine.tp == 1 || cli::launched_by_mpi(),
               "--tp {} needs {} processes: run `mpirun -np {} loom serve ... --tp {}` (or "
               "scripts/mpirun-local {} loom serve ...)",
               o->engine.tp, o->engine.tp, o->engine.tp, o->engine.tp, o->engine.tp);

    // Block the stop signals before any thread starts, so that every thread inherits the mask
    // and only sigwait() below receives them.
    sigset_t stop_signals;
    sigemptyset(&stop_signals);
    sigaddset(&stop_signals, SIGTERM);
    sigaddset(&stop_signals, SIGINT);
    LOOM_CHECK(pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr) == 0,
               "pthread_sigmask(SIG_BLOCK, SIGTERM|SIGINT) failed");

    // Under --tp: MPI with SERIALIZED threading (rank 0's collectives run on the engine's step
    // thread, not on the thread that initialised MPI). The group outlives the engine, MPI the
    // group.
    std::unique_ptr<comm::MpiRuntime> mpi;
    comm::ProcessGroup world;
    if (o->engine.tp > 1) {
      mpi = std::make_unique<comm::MpiRuntime>(nullptr, nullptr, comm::ThreadLevel::serialized);
      world = comm::ProcessGroup::world();
      LOOM_CHECK(world.size() == o->engine.tp,
                 "--tp {} but mpirun started {} ranks; use mpirun -np {} (one tp group)",
                 o->engine.tp, world.size(), o->engine.tp);
    }
    const comm::ProcessGroup* tp = o->engine.tp > 1 ? &world : nullptr;
    try {
      if (tp && tp->rank() != 0) {
        std::unique_ptr<infer::Engine> engine = make_engine_for_serving(o->engine, tp);
        engine->follow();  // until rank 0 has drained and says stop
        LOOM_LOG_INFO("rank {}: rank 0 has stopped serving; exiting", tp->rank());
      } else {
        serve_rank0(*o, tp, stop_signals);
      }
    } catch (const std::exception& e) {
      // One rank's failure ends the whole job now, naming the rank (comm/mpi_runtime.h).
      if (tp) comm::abort_world(e.what());
      throw;
    }
    ctx.exit_code = 0;
  });
}

}  // namespace

LOOM_REGISTER_COMMAND(serve, add_serve);
