// infer/http/server.h: the OpenAI-compatible HTTP front end of `loom serve`.
//
// HttpServer speaks HTTP/1.1 (cpp-httplib) and turns OpenAI `/v1/completions` requests into
// CompletionService requests; it never generates text itself, so it is tested against a scripted
// service as well as the real infer::Engine.
//
// Endpoints
//   POST /v1/completions   OpenAI completions, non-streaming or server-sent events
//   GET  /v1/models        {"object":"list","data":[{id, object:"model", created, owned_by}]}
//   GET  /v1/models/{id}   one model, or 404
//   GET  /health           200 {"status":"ok"}; 503 while shutting down. Never touches the service,
//                          so it answers while the engine is busy (it runs on an HTTP thread).
// Every error body has OpenAI's shape {"error":{"message","type","param","code"}}.
//
// Request contract (what a client of OpenAI, vLLM or llama.cpp's server expects):
//   model          optional; when given it must equal the served name, else 404 model_not_found
//   prompt         string | [string] | [int] | [[int]]; non-empty
//   max_tokens     default 16 (null = 16), 0..max_tokens_limit
//   temperature    0..2, default 1 (OpenAI's default; 0 = greedy)
//   top_p (0,1], top_k >= 0 or -1 (extension; 0 and -1 = off), n 1..max_n, seed (any int64;
//                  absent = a fresh random seed), stop (string or up to 4 strings), echo,
//                  logprobs 0..5, stream, stream_options.include_usage, user (ignored)
//   extensions     repetition_penalty > 0, stop_rule ("" or a HumanEval-X language),
//                  ignore_eos, token_healing (default: on for text prompts, off for token ids),
//                  cut_to_context (see "Context overflow"), domain (MoE models: the domain the
//                  prompt is routed by, e.g. "python"; "" or absent = `loom serve --domain`'s
//                  default; unknown names are a 400 listing the model's domains)
//   refused (400)  suffix (the model cannot fill in the middle), echo together with logprobs
//                  (the service does not score prompt tokens), best_of != n, logit_bias,
//                  non-zero presence/frequency penalties, any unknown field (named in the error)
//   choices        prompt p, sample i -> choice index p*n + i, one service request each, with
//                  seed + i (so a choice does not depend on how many others were asked for)
//
// Context overflow: prompt_tokens + max_tokens > context_length() is REJECTED with
//   400 code "context_length_exceeded" (what OpenAI, vLLM and llama.cpp do), because a silent cut
//   returns fewer tokens than asked for with a 200. A request may opt in to the cut with the
//   extension field "cut_to_context": true, or the server with ServerOptions::cut_to_context:
//   max_tokens is then lowered to context - prompt_tokens and the choice ends with
//   finish_reason "length". A prompt that alone fills the context is always a 400.
//
// Limits and their statuses: body > max_body_bytes -> 413; missing or wrong bearer key (when
//   api_key is set, every /v1 path) -> 401; more than max_concurrent_requests completions in
//   flight, or the service's queue full -> 429 with Retry-After; shutting down -> 503;
//   generation longer than request_timeout_s -> the requests are cancelled and the client gets
//   504 (or an error event when streaming).
//
// A client that disconnects cancels its requests (CompletionService::cancel) within about
// poll_interval_ms, whether it was streaming or not, so generation for nobody stops.
//
// Threads: cpp-httplib serves each connection on one thread of a pool of
//   max_concurrent_requests + kSpareHttpThreads threads; the spare threads answer /health,
//   /v1/models and refusals while every generation slot is busy.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "infer/service.h"

namespace httplib {
class Server;
}

namespace loom::infer {

struct ServerOptions {
  std::string host = "127.0.0.1";
  int port = 8080;                         // 0 = any free port; see HttpServer::port()
  std::string api_key;                     // "" = no authentication (loopback hosts only)
  std::string model_name;                  // "" = service.model_name()
  int64_t max_body_bytes = 1 << 20;        // larger request bodies get 413
  int64_t max_tokens_limit = 4096;         // largest max_tokens a request may ask for
  int32_t max_n = 16;                      // largest prompts * n of one request
  int32_t max_concurrent_requests = 64;    // completions in flight (HTTP requests); more -> 429
  int32_t retry_after_s = 1;               // Retry-After of a 429
  bool cut_to_context = false;             // true: every over-long request is cut, not refused
  int32_t read_timeout_s = 30;             // socket read timeout (slow or stalled clients)
  int32_t write_timeout_s = 30;            // socket write timeout (clients that stop reading)
  int32_t request_timeout_s = 600;         // generation time of one HTTP request; 0 = none
  int32_t poll_interval_ms = 50;           // how often a waiting request checks its client
  // A streaming request's HTTP thread is woken at most once per stream_interval_ms while tokens
  // come (the first token and the last are passed on at once); the tokens of the interval go
  // out together, each still its own server-sent event. 0 = wake for every token. Under load
  // the per-token wake-ups of every stream compete with the decoder for the cores.
  int32_t stream_interval_ms = 10;
  int32_t drain_timeout_s = 600;           // shutdown(): longest wait for responses in flight
};

class HttpServer {
 public:
  // Validates the options (throws loom::Error naming the option, its value and the fix): a
  // host other than loopback needs an api_key. Nothing is bound until start().
  HttpServer(CompletionService& service, ServerOptions options);
  // If still running: refuses new completions, waits (at most drain_timeout_s) for the
  // responses in flight and closes the socket. It does NOT shut the service down: the service
  // is the caller's.
  ~HttpServer();
  HttpServer(const HttpServer&) = delete;
  HttpServer& operator=(const HttpServer&) = delete;

  // Binds host:port (throws loom::Error naming them and the system's reason) and serves on a
  // background thread. Returns once the socket accepts connections.
  void start();
  int port() const { return bound_port_; }  // the bound port (useful with port 0)

  // Stops admitting completions (503), asks the service to finish (drain) or cancel what is
  // queued and running, waits until every response in flight is written (at most
  // drain_timeout_s), then closes the socket. Idempotent; thread-safe.
  void shutdown(bool drain);
  bool shutting_down() const { return shutting_down_.load(); }

  // Completions currently in flight (for tests and logs).
  int64_t active_requests() const { return active_.load(); }

  // Implementation details shared with server.cpp's helpers.
  struct Impl;

 private:
  void install_routes();
  void close(bool shutdown_service, bool drain);

  CompletionService& service_;
  ServerOptions options_;
  std::string model_name_;
  int64_t created_ = 0;  // unix time of construction, the models' "created"
  std::unique_ptr<httplib::Server> http_;
  std::thread listen_thread_;
  int bound_port_ = -1;
  std::atomic<bool> shutting_down_{false};
  std::atomic<bool> stopped_{false};
  std::atomic<int64_t> active_{0};
  std::atomic<uint64_t> next_id_{0};
  std::mutex drain_mutex_;
  std::condition_variable drained_;
  std::mutex shutdown_mutex_;
};

// True for 127.0.0.0/8, ::1 and "localhost".
bool is_loopback_host(const std::string& host);

}  // namespace loom::infer
