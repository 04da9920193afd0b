// `loom serve --checkpoint DIR [--host 127.0.0.1] [--port 8080] [--int8] [--max-batch N]
//  [--max-queue N] [--api-key K] ...`: the OpenAI-compatible HTTP server (infer/http/server.h)
// over infer::Engine (continuous batching over the KV-cached decoder).
//
// SIGTERM / SIGINT: stop admitting (new completions get 503), finish every request in flight,
// then exit 0. The signals are blocked in every thread and taken by sigwait() on the main
// thread, so no handler runs inside the engine or the HTTP threads.
//
// The engine is built in make_engine_for_serving() only, the one place to change should its
// constructor change.
#include <signal.h>

#include <memory>
#include <string>

#include "cli.h"
#include "core/error.h"
#include "core/log.h"
#include "infer/engine.h"
#include "infer/http/server.h"
#include "infer/service.h"

namespace {

struct ServeEngineOptions {
  std::string checkpoint;
  std::string tokenizer;  // "" = DIR/tokenizer
  std::string model_name;
  std::string domain;  // MoE (rre): requests without "domain" use this ("" = "other")
  bool int8 = false;
  int64_t max_batch = 8;
  int64_t max_queue = 64;
};

std::unique_ptr<loom::infer::CompletionService> make_engine_for_serving(
    const ServeEngineOptions& o) {
  using namespace loom::infer;
  EngineOptions eo;
  eo.model_name = o.model_name;
  eo.max_batch = o.max_batch;
  eo.max_queue = o.max_queue;
  eo.default_domain = o.domain;
  // int8: the block linears in int8 rows; the tied head stays f32 (it is one matrix, and the
  // logits feed sampling and logprobs directly).
  const WeightFormat linears = o.int8 ? WeightFormat::int8_row : WeightFormat::f32;
  return load_engine(o.checkpoint, o.tokenizer, linears, WeightFormat::f32, eo);
}

void add_serve(CLI::App& root, loom::cli::Context& ctx) {
  struct Opts {
    ServeEngineOptions engine;
    loom::infer::ServerOptions server;
  };
  auto o = std::make_shared<Opts>();
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
  sub->add_flag("--int8", e.int8, "int8 per-row weights for the block linears");
  sub->add_option("--max-batch", e.max_batch, "sequences decoded together in one step")
      ->capture_default_str();
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

    // Block the stop signals before any thread starts, so that every thread inherits the mask
    // and only sigwait() below receives them.
    sigset_t stop_signals;
    sigemptyset(&stop_signals);
    sigaddset(&stop_signals, SIGTERM);
    sigaddset(&stop_signals, SIGINT);
    LOOM_CHECK(pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr) == 0,
               "pthread_sigmask(SIG_BLOCK, SIGTERM|SIGINT) failed");

    LOOM_LOG_INFO("loading {}{}", o->engine.checkpoint, o->engine.int8 ? " (int8)" : "");
    std::unique_ptr<infer::CompletionService> engine = make_engine_for_serving(o->engine);
    infer::HttpServer server(*engine, o->server);
    server.start();
    LOOM_LOG_INFO("ready: curl http://{}:{}/v1/completions -H 'Content-Type: application/json' "
                  "-d '{{\"prompt\": \"def fib(n):\", \"max_tokens\": 32}}'   (openai client: "
                  "base_url=\"http://{}:{}/v1\")",
                  o->server.host, server.port(), o->server.host, server.port());

    int sig = 0;
    sigwait(&stop_signals, &sig);
    LOOM_LOG_INFO("{}: finishing {} requests in flight, then exiting",
                  sig == SIGTERM ? "SIGTERM" : "SIGINT", server.active_requests());
    server.shutdown(/*drain=*/true);
    ctx.exit_code = 0;
  });
}

}  // namespace

LOOM_REGISTER_COMMAND(serve, add_serve);
