// infer/http/server.cpp: HTTP routes, admission, waiting for the service's events, responses.
//
// Threading. The service delivers TokenEvents on its own thread through Request::on_event; the
// callback only appends the event to the HTTP request's Job under a mutex (the contract says it
// must not block). The HTTP thread that owns the connection waits on the Job's condition
// variable, builds JSON and writes it, so a slow client never stalls the generation thread.
//
// Disconnects. cpp-httplib 0.11 (Debian 12) does not tell a handler whether its client is still
// there, so the handler finds its connection's socket once (the fd whose local and peer addresses
// are the request's) and polls it for POLLRDHUP while it waits: a client that closes its end is
// noticed within poll_interval_ms even when no token is being written, and its requests are
// cancelled. A failed write while streaming does the same.
#include "infer/http/server.h"

#include <arpa/inet.h>
#include <dirent.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <httplib.h>

#include <chrono>
#include <cstring>
#include <ctime>
#include <deque>
#include <random>

#include "core/error.h"
#include "core/log.h"
#include "infer/http/openai.h"

namespace loom::infer {

using nlohmann::json;
using openai::ApiError;
using Clock = std::chrono::steady_clock;

namespace {

// HTTP threads beyond max_concurrent_requests: they answer /health, /v1/models, refusals and
// keep-alive connections while every generation slot is taken.
constexpr int kSpareHttpThreads = 8;

const char* finish_name(FinishReason r) {
  switch (r) {
    case FinishReason::stop: return "stop";
    case FinishReason::length: return "length";
    case FinishReason::cancelled: return "cancelled";
    case FinishReason::error: return "error";
    default: return "none";
  }
}

void send_error(httplib::Response& res, const ApiError& e) {
  res.status = e.status;
  if (e.retry_after_s > 0) res.set_header("Retry-After", std::to_string(e.retry_after_s));
  res.set_content(openai::dump(openai::error_body(e)), "application/json");
}

ApiError make_error(int status, std::string type, std::string code, std::string message,
                    std::string param = "") {
  ApiError e;
  e.status = status;
  e.type = std::move(type);
  e.code = std::move(code);
  e.message = std::move(message);
  e.param = std::move(param);
  return e;
}

// The socket of the connection that carried `req`, or -1 if it cannot be found (then only a
// failed write reveals a disconnect). Connected TCP sockets are unique by their address pair.
int find_connection_fd(const httplib::Request& req) {
  DIR* dir = opendir("/proc/self/fd");
  if (!dir) return -1;
  int found = -1;
  while (dirent* ent = readdir(dir)) {
    char* end = nullptr;
    const long fd = std::strtol(ent->d_name, &end, 10);
    if (end == ent->d_name || *end != '\0' || fd == dirfd(dir)) continue;
    sockaddr_storage local{}, peer{};
    socklen_t ll = sizeof(local), pl = sizeof(peer);
    if (getsockname(int(fd), reinterpret_cast<sockaddr*>(&local), &ll) != 0) continue;
    if (getpeername(int(fd), reinterpret_cast<sockaddr*>(&peer), &pl) != 0) continue;
    auto port_and_host = [](const sockaddr_storage& a, std::string& host) -> int {
      char buf[INET6_ADDRSTRLEN] = {0};
      if (a.ss_family == AF_INET) {
        const auto* s = reinterpret_cast<const sockaddr_in*>(&a);
        inet_ntop(AF_INET, &s->sin_addr, buf, sizeof(buf));
        host = buf;
        return ntohs(s->sin_port);
      }
      if (a.ss_family == AF_INET6) {
        const auto* s = reinterpret_cast<const sockaddr_in6*>(&a);
        inet_ntop(AF_INET6, &s->sin6_addr, buf, sizeof(buf));
        host = buf;
        return ntohs(s->sin6_port);
      }
      return -1;
    };
    std::string local_host, peer_host;
    if (port_and_host(local, local_host) != req.local_port) continue;
    if (port_and_host(peer, peer_host) != req.remote_port) continue;
    if (peer_host != req.remote_addr) continue;
    found = int(fd);
    break;
  }
  closedir(dir);
  return found;
}

// True once the client has closed its end (or the connection failed).
bool client_gone(int fd) {
  if (fd < 0) return false;
  pollfd p{fd, POLLRDHUP, 0};
  if (poll(&p, 1, 0) <= 0) return false;
  return (p.revents & (POLLRDHUP | POLLHUP | POLLERR | POLLNVAL)) != 0;
}

// Unpredictable 64-bit values (request seeds without a `seed`, completion ids): a generator per
// HTTP thread seeded once from the system's entropy (a std::random_device per request opened it
// twice a request).
uint64_t random_u64() {
  thread_local std::mt19937_64 gen{(uint64_t(std::random_device{}()) << 32) ^
                                   std::random_device{}()};
  return gen();
}

bool constant_time_equal(const std::string& a, const std::string& b) {
  if (a.size() != b.size()) return false;
  unsigned char diff = 0;
  for (size_t i = 0; i < a.size(); ++i) diff |= static_cast<unsigned char>(a[i] ^ b[i]);
  return diff == 0;
}

// cpp-httplib 0.11 listens with a backlog of 5 (compiled into Debian's library): 32 clients
// connecting at once overflow it and some connections are reset. The listening socket is a
// protected member, so a subclass can re-listen with the system's maximum backlog.
class ListeningServer : public httplib::Server {
 public:
  void raise_backlog() {
    const int fd = int(svr_sock_.load());
    if (fd >= 0 && ::listen(fd, SOMAXCONN) != 0)
      LOOM_LOG_WARN("listen(backlog={}) failed: {}; keeping the backlog of 5", SOMAXCONN,
                    std::strerror(errno));
  }
};

// Events of one HTTP request's service requests (its choices), filled by the service thread.
struct Job {
  std::mutex mutex;
  std::condition_variable cv;
  std::vector<std::deque<TokenEvent>> pending;  // per choice, not yet consumed
  std::vector<int64_t> request_ids;             // per choice; -1 until submitted
  size_t finished = 0;                          // choices whose last event arrived
  // Coalesced wake-ups (ServerOptions::stream_interval_ms): the producer notifies when a
  // choice's first visible event (text, or a token with logprobs asked for) or its last one
  // arrives, and otherwise only once next_wake has passed; events held back in between are
  // taken by the next notify or by the consumer's poll (at most poll_interval_ms later).
  Clock::duration wake_interval{};
  // Per choice, so that the choices of one step (delivered one after another) each wake the
  // consumer rather than the first taking the interval for all.
  std::vector<Clock::time_point> next_wake;
  std::vector<char> shown;  // per choice: a visible event was passed on
};

// What the HTTP thread has made of one choice so far.
struct ChoiceState {
  int64_t prompt_index = 0;
  std::string prompt_text;  // for echo
  std::string text;         // completion text (without the echoed prompt)
  int64_t text_chars = 0;   // code points written so far, echo included (text_offset)
  openai::LogprobsAccumulator logprobs;
  FinishReason finish = FinishReason::none;
  std::string error;
  int64_t prompt_tokens = 0;
  int64_t completion_tokens = 0;
};

}  // namespace

bool is_loopback_host(const std::string& host) {
  if (host == "localhost" || host == "::1" || host == "[::1]") return true;
  in_addr a{};
  if (inet_pton(AF_INET, host.c_str(), &a) == 1) return (ntohl(a.s_addr) >> 24) == 127;
  return false;
}

// Per-request machinery, kept out of the header.
struct HttpServer::Impl {
  // Holds one of max_concurrent_requests slots for as long as a response is being produced; the
  // last owner (the handler or the stream provider) gives it back.
  struct Slot {
    explicit Slot(HttpServer* s) : server(s) {}
    Slot(const Slot&) = delete;
    Slot& operator=(const Slot&) = delete;
    HttpServer* server;
    ~Slot() {
      std::lock_guard lock(server->drain_mutex_);
      server->active_.fetch_sub(1);
      server->drained_.notify_all();
    }
  };

  enum class Wait { events, done, disconnected, timed_out };

  // Moves pending events into `out` (choice index, event). Returns events as soon as there are
  // some; otherwise checks the client and the deadline every poll interval.
  static Wait wait_events(Job& job, int fd, Clock::time_point deadline, int poll_ms,
                          std::vector<std::pair<size_t, TokenEvent>>& out) {
    out.clear();
    for (;;) {
      // Checked before every wait, not only when idle: a steady stream of tokens must not hide
      // a client that left or a deadline that passed.
      if (client_gone(fd)) return Wait::disconnected;
      if (Clock::now() >= deadline) return Wait::timed_out;
      {
        std::unique_lock lock(job.mutex);
        auto has_events = [&] {
          for (const auto& q : job.pending)
            if (!q.empty()) return true;
          return false;
        };
        job.cv.wait_for(lock, std::chrono::milliseconds(poll_ms),
                        [&] { return has_events() || job.finished == job.pending.size(); });
        for (size_t c = 0; c < job.pending.size(); ++c)
          while (!job.pending[c].empty()) {
            out.emplace_back(c, std::move(job.pending[c].front()));
            job.pending[c].pop_front();
          }
        if (!out.empty()) return Wait::events;
        if (job.finished == job.pending.size()) return Wait::done;
      }
    }
  }

  // Every choice has delivered its last event and wait_events has taken them all.
  static bool all_taken(Job& job) {
    std::lock_guard lock(job.mutex);
    if (job.finished != job.pending.size()) return false;
    for (const auto& q : job.pending)
      if (!q.empty()) return false;
    return true;
  }

  static void cancel_all(CompletionService& service, Job& job) {
    std::vector<int64_t> ids;
    {
      std::lock_guard lock(job.mutex);
      ids = job.request_ids;
    }
    for (int64_t id : ids)
      if (id >= 0) service.cancel(id);
  }

  // Applies one event to its choice; returns the text it added (echo not included) and fills
  // `chunk_lp` with this event's logprobs entry when logprobs were asked for.
  static std::string apply(const CompletionService& service, const openai::CompletionRequest& r,
                           ChoiceState& c, const TokenEvent& ev,
                           openai::LogprobsAccumulator* chunk_lp) {
    if (r.logprobs >= 0 && ev.token >= 0) {
      std::string token_text;
      for (const auto& t : ev.top)
        if (t.token == ev.token) token_text = t.text;
      if (token_text.empty()) token_text = service.decode({ev.token});
      for (auto* lp : {&c.logprobs, chunk_lp}) {
        if (!lp) continue;
        lp->tokens.push_back(token_text);
        lp->token_logprobs.push_back(ev.logprob);
        lp->top.push_back(ev.top);
        lp->text_offset.push_back(c.text_chars);
      }
    }
    c.text += ev.text;
    c.text_chars += openai::utf8_length(ev.text);
    if (ev.finish != FinishReason::none) {
      c.finish = ev.finish;
      c.error = ev.error;
      c.prompt_tokens = ev.prompt_tokens;
      c.completion_tokens = ev.completion_tokens;
    }
    return ev.text;
  }

  static json usage_json(const std::vector<ChoiceState>& choices, int32_t n) {
    int64_t prompt = 0, completion = 0;
    for (size_t i = 0; i < choices.size(); ++i) {
      if (i % size_t(n) == 0) prompt += choices[i].prompt_tokens;  // each prompt counted once
      completion += choices[i].completion_tokens;
    }
    return json{{"prompt_tokens", prompt},
                {"completion_tokens", completion},
                {"total_tokens", prompt + completion}};
  }
};

HttpServer::HttpServer(CompletionService& service, ServerOptions options)
    : service_(service), options_(std::move(options)) {
  const auto& o = options_;
  LOOM_CHECK(o.port >= 0 && o.port <= 65535, "port={} must be in [0, 65535] (0 = any free port)",
             o.port);
  LOOM_CHECK(!o.host.empty(), "host is empty; use 127.0.0.1 (this machine only) or an address");
  LOOM_CHECK(is_loopback_host(o.host) || !o.api_key.empty(),
             "refusing to listen on {} without an API key: anyone who can reach that address could "
             "use the model. Pass --api-key KEY (clients then send 'Authorization: Bearer KEY'), "
             "or bind to 127.0.0.1 with --host 127.0.0.1",
             o.host);
  LOOM_CHECK(o.max_body_bytes > 0, "max_body_bytes={} must be > 0", o.max_body_bytes);
  LOOM_CHECK(o.max_tokens_limit >= 0, "max_tokens_limit={} must be >= 0", o.max_tokens_limit);
  LOOM_CHECK(o.max_n >= 1, "max_n={} must be >= 1", o.max_n);
  LOOM_CHECK(o.max_concurrent_requests >= 1, "max_concurrent_requests={} must be >= 1",
             o.max_concurrent_requests);
  LOOM_CHECK(o.poll_interval_ms >= 1, "poll_interval_ms={} must be >= 1", o.poll_interval_ms);
  LOOM_CHECK(o.stream_interval_ms >= 0, "stream_interval_ms={} must be >= 0 (0 = every token)",
             o.stream_interval_ms);
  LOOM_CHECK(o.read_timeout_s >= 1 && o.write_timeout_s >= 1,
             "read_timeout_s={} and write_timeout_s={} must be >= 1", o.read_timeout_s,
             o.write_timeout_s);
  LOOM_CHECK(o.request_timeout_s >= 0, "request_timeout_s={} must be >= 0 (0 = none)",
             o.request_timeout_s);
  model_name_ = o.model_name.empty() ? service_.model_name() : o.model_name;
  created_ = int64_t(std::time(nullptr));
  http_ = std::make_unique<ListeningServer>();
  install_routes();
}

HttpServer::~HttpServer() {
  try {
    close(/*shutdown_service=*/false, /*drain=*/true);
  } catch (...) {
    // A destructor must not throw; close() logs what went wrong.
  }
}

void HttpServer::start() {
  LOOM_CHECK(bound_port_ < 0, "HttpServer::start() called twice");
  // A client that goes away mid-response must not kill the server with SIGPIPE (cpp-httplib
  // writes with plain send()).
  signal(SIGPIPE, SIG_IGN);
  if (options_.port == 0) {
    bound_port_ = http_->bind_to_any_port(options_.host);
  } else {
    bound_port_ = http_->bind_to_port(options_.host, options_.port) ? options_.port : -1;
  }
  LOOM_CHECK(bound_port_ > 0,
             "cannot listen on {}:{}: {} (is the port taken by another process, or the address "
             "not one of this machine's? choose another with --port/--host)",
             options_.host, options_.port, std::strerror(errno));
  static_cast<ListeningServer&>(*http_).raise_backlog();
  listen_thread_ = std::thread([this] { http_->listen_after_bind(); });
  // listen_after_bind() starts accepting at once; wait until the server says it runs so that a
  // caller may connect as soon as start() returns.
  for (int i = 0; i < 1000 && !http_->is_running(); ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  LOOM_LOG_INFO("serving {} on http://{}:{} (context {} tokens, max_tokens <= {})", model_name_,
                options_.host, bound_port_, service_.context_length(), options_.max_tokens_limit);
}

void HttpServer::shutdown(bool drain) { close(/*shutdown_service=*/true, drain); }

void HttpServer::close(bool shutdown_service, bool drain) {
  std::lock_guard guard(shutdown_mutex_);
  if (stopped_.load()) return;
  shutting_down_.store(true);
  // New completions now get 503; the service finishes (or cancels) what it has. Without
  // shutdown_service (the destructor) the responses in flight end when their requests do.
  if (shutdown_service) service_.shutdown(drain);
  {
    std::unique_lock lock(drain_mutex_);
    const bool drained = drained_.wait_for(lock, std::chrono::seconds(options_.drain_timeout_s),
                                           [&] { return active_.load() == 0; });
    if (!drained)
      LOOM_LOG_WARN("shutdown: {} responses still in flight after drain_timeout_s={}; closing",
                    active_.load(), options_.drain_timeout_s);
  }
  if (bound_port_ > 0) http_->stop();
  if (listen_thread_.joinable()) listen_thread_.join();
  stopped_.store(true);
}

void HttpServer::install_routes() {
  auto& svr = *http_;
  const auto& o = options_;
  svr.set_payload_max_length(size_t(o.max_body_bytes));
  svr.set_read_timeout(o.read_timeout_s, 0);
  svr.set_write_timeout(o.write_timeout_s, 0);
  // Stream chunks are small: without TCP_NODELAY, Nagle's algorithm holds each one until the
  // client's delayed ACK (~40 ms on Linux), which shows up as time to first token.
  svr.set_tcp_nodelay(true);
  const size_t threads = size_t(o.max_concurrent_requests) + kSpareHttpThreads;
  svr.new_task_queue = [threads] { return new httplib::ThreadPool(threads); };

  // Bodies for the statuses cpp-httplib produces itself (413, unknown paths, malformed HTTP).
  svr.set_error_handler(httplib::Server::HandlerWithResponse([this](const httplib::Request& req,
                                                                   httplib::Response& res) {
    if (!res.body.empty()) return httplib::Server::HandlerResponse::Unhandled;
    ApiError e;
    e.status = res.status;
    if (res.status == 413) {
      e = make_error(413, "invalid_request_error", "request_too_large",
                     fmt::format("the request body is larger than this server's limit of {} "
                                 "bytes (max_body_bytes)",
                                 options_.max_body_bytes));
    } else if (res.status == 404) {
      e = make_error(404, "invalid_request_error", "unknown_url",
                     fmt::format("no endpoint {} {}; this server has POST /v1/completions, GET "
                                 "/v1/models and GET /health",
                                 req.method, req.path));
    } else {
      e = make_error(res.status, res.status >= 500 ? "server_error" : "invalid_request_error", "",
                     fmt::format("HTTP {} for {} {}", res.status, req.method, req.path));
    }
    send_error(res, e);
    return httplib::Server::HandlerResponse::Handled;
  }));
  svr.set_exception_handler(
      [](const httplib::Request& req, httplib::Response& res, std::exception_ptr ep) {
        std::string what = "unknown exception";
        try {
          std::rethrow_exception(ep);
        } catch (const std::exception& ex) {
          what = ex.what();
        } catch (...) {
        }
        LOOM_LOG_ERROR("{} {}: {}", req.method, req.path, what);
        send_error(res, make_error(500, "server_error", "internal_error",
                                   fmt::format("internal server error: {}", what)));
      });

  // Returns false (and answers 401) unless the request carries the key.
  auto authorized = [this](const httplib::Request& req, httplib::Response& res) {
    if (options_.api_key.empty()) return true;
    const std::string h = req.get_header_value("Authorization");
    const std::string prefix = "Bearer ";
    if (h.empty()) {
      send_error(res, make_error(401, "invalid_request_error", "invalid_api_key",
                                 "no API key: send it in an Authorization header using Bearer "
                                 "auth (Authorization: Bearer YOUR_KEY)"));
      return false;
    }
    if (h.compare(0, prefix.size(), prefix) != 0 ||
        !constant_time_equal(h.substr(prefix.size()), options_.api_key)) {
      send_error(res, make_error(401, "invalid_request_error", "invalid_api_key",
                                 "incorrect API key provided in the Authorization header"));
      return false;
    }
    return true;
  };

  svr.Get("/health", [this](const httplib::Request&, httplib::Response& res) {
    if (shutting_down_.load()) {
      res.status = 503;
      res.set_content(R"({"status":"shutting down"})", "application/json");
      return;
    }
    res.set_content(R"({"status":"ok"})", "application/json");
  });

  auto model_json = [this] {
    return json{{"id", model_name_},
                {"object", "model"},
                {"created", created_},
                {"owned_by", "loom"},
                {"max_model_len", service_.context_length()}};
  };
  svr.Get("/v1/models", [authorized, model_json](const httplib::Request& req,
                                                 httplib::Response& res) {
    if (!authorized(req, res)) return;
    res.set_content(openai::dump(json{{"object", "list"}, {"data", json::array({model_json()})}}),
                    "application/json");
  });
  svr.Get(R"(/v1/models/(.+))", [this, authorized, model_json](const httplib::Request& req,
                                                               httplib::Response& res) {
    if (!authorized(req, res)) return;
    const std::string id = req.matches[1];
    if (id != model_name_) {
      send_error(res, make_error(404, "invalid_request_error", "model_not_found",
                                 fmt::format("The model `{}` does not exist; this server serves "
                                             "`{}`",
                                             id, model_name_),
                                 "model"));
      return;
    }
    res.set_content(openai::dump(model_json()), "application/json");
  });

  // The body is read here, not by cpp-httplib: 0.11 enforces payload_max_length on bodies with
  // a Content-Length only, and a chunked body would otherwise grow without bound.
  svr.Post("/v1/completions", [this, authorized](const httplib::Request& req,
                                                 httplib::Response& res,
                                                 const httplib::ContentReader& read_body) {
    std::string body;
    bool too_large = false;
    const bool read_ok = read_body([&](const char* data, size_t len) {
      if (body.size() + len > size_t(options_.max_body_bytes)) {
        too_large = true;
        return false;
      }
      body.append(data, len);
      return true;
    });
    // cpp-httplib refuses a Content-Length above max_body_bytes itself, before any byte.
    const std::string declared = req.get_header_value("Content-Length");
    if (!read_ok && !too_large && !declared.empty() &&
        std::strtoull(declared.c_str(), nullptr, 10) > uint64_t(options_.max_body_bytes))
      too_large = true;
    if (too_large) {
      send_error(res, make_error(413, "invalid_request_error", "request_too_large",
                                 fmt::format("the request body is larger than this server's "
                                             "limit of {} bytes (max_body_bytes)",
                                             options_.max_body_bytes)));
      res.set_header("Connection", "close");  // the rest of the body is not read
      return;
    }
    if (!read_ok) {
      send_error(res, make_error(400, "invalid_request_error", "invalid_body",
                                 "the request body could not be read (truncated, malformed "
                                 "chunked encoding, or slower than the read timeout)"));
      res.set_header("Connection", "close");
      return;
    }
    if (!authorized(req, res)) return;
    if (shutting_down_.load()) {
      send_error(res, make_error(503, "server_error", "shutting_down",
                                 "the server is shutting down and accepts no new requests"));
      return;
    }
    openai::CompletionRequest r;
    try {
      r = openai::parse_completion_request(
          body, openai::Limits{options_.max_tokens_limit, options_.max_n});
    } catch (const ApiError& e) {
      send_error(res, e);
      return;
    }
    if (r.model && *r.model != model_name_) {
      send_error(res, make_error(404, "invalid_request_error", "model_not_found",
                                 fmt::format("The model `{}` does not exist; this server serves "
                                             "`{}` (GET /v1/models)",
                                             *r.model, model_name_),
                                 "model"));
      return;
    }

    // A slot among max_concurrent_requests, held until the response is written.
    int64_t active = active_.load();
    do {
      if (active >= options_.max_concurrent_requests) {
        ApiError e = make_error(
            429, "rate_limit_error", "too_many_requests",
            fmt::format("the server is busy: {} completions are in flight, the limit is {} "
                        "(max_concurrent_requests); retry after {} s",
                        active, options_.max_concurrent_requests, options_.retry_after_s));
        e.retry_after_s = options_.retry_after_s;
        send_error(res, e);
        return;
      }
    } while (!active_.compare_exchange_weak(active, active + 1));
    auto slot = std::make_shared<Impl::Slot>(this);

    // Tokenize and fit every prompt into the context.
    const int64_t context = service_.context_length();
    const bool cut = r.cut_to_context.value_or(options_.cut_to_context);
    std::vector<int64_t> max_tokens(r.prompts.size(), r.max_tokens);
    for (size_t p = 0; p < r.prompts.size(); ++p) {
      auto& prompt = r.prompts[p];
      if (prompt.is_text) prompt.tokens = service_.encode(prompt.text);
      const std::string name = r.prompts.size() > 1 ? fmt::format("prompt[{}]", p) : "prompt";
      if (prompt.tokens.empty()) {
        send_error(res, openai::invalid_request(
                            fmt::format("'{}' is empty (0 tokens); send at least one token", name),
                            "prompt", "invalid_value"));
        return;
      }
      const int64_t pt = int64_t(prompt.tokens.size());
      if (pt >= context && !(pt == context && r.max_tokens == 0)) {
        send_error(res, openai::invalid_request(
                            fmt::format("This model's maximum context length is {} tokens. "
                                        "However, '{}' alone has {} tokens; shorten it",
                                        context, name, pt),
                            "prompt", "context_length_exceeded"));
        return;
      }
      if (pt + r.max_tokens > context) {
        if (cut) {
          max_tokens[p] = context - pt;
        } else {
          send_error(res, openai::invalid_request(
                              fmt::format("This model's maximum context length is {} tokens. "
                                          "However, you requested {} tokens ({} in '{}', {} for "
                                          "the completion). Reduce the prompt or max_tokens, or "
                                          "send \"cut_to_context\": true to have max_tokens cut "
                                          "to {} (finish_reason \"length\")",
                                          context, pt + r.max_tokens, pt, name, r.max_tokens,
                                          context - pt),
                              "max_tokens", "context_length_exceeded"));
          return;
        }
      }
    }

    // One service request per choice, seeds seed, seed+1, ... within each prompt.
    const uint64_t seed = r.seed ? uint64_t(*r.seed) : random_u64();
    const size_t num_choices = r.prompts.size() * size_t(r.n);
    auto job = std::make_shared<Job>();
    job->pending.resize(num_choices);
    job->request_ids.assign(num_choices, -1);
    job->shown.assign(num_choices, 0);
    job->next_wake.assign(num_choices, Clock::time_point{});
    // A non-streaming response needs nothing before the end: its thread wakes for the last
    // events (and polls the client).
    job->wake_interval = r.stream ? std::chrono::milliseconds(options_.stream_interval_ms)
                                  : Clock::duration::max() / 2;
    std::vector<ChoiceState> choices(num_choices);
    for (size_t c = 0; c < num_choices; ++c) {
      const size_t p = c / size_t(r.n);
      const auto& prompt = r.prompts[p];
      choices[c].prompt_index = int64_t(p);
      if (r.echo) {
        choices[c].prompt_text = prompt.is_text ? prompt.text : service_.decode(prompt.tokens);
        choices[c].text_chars = openai::utf8_length(choices[c].prompt_text);
      }
      Request sr;
      sr.prompt = prompt.tokens;
      sr.domain = r.domain;
      auto& sp = sr.params;
      sp.temperature = r.temperature;
      sp.top_p = r.top_p;
      sp.top_k = r.top_k;
      sp.repetition_penalty = r.repetition_penalty;
      sp.seed = seed + uint64_t(c % size_t(r.n));
      sp.max_tokens = max_tokens[p];
      sp.stop = r.stop;
      sp.stop_rule = r.stop_rule;
      sp.token_healing = r.token_healing.value_or(prompt.is_text);
      sp.logprobs = r.logprobs;
      sp.ignore_eod = r.ignore_eos;
      const bool with_logprobs = r.logprobs >= 0;
      sr.on_event = [job, c, with_logprobs](const TokenEvent& ev) {
        std::lock_guard lock(job->mutex);
        job->pending[c].push_back(ev);
        const bool last = ev.finish != FinishReason::none;
        if (last) ++job->finished;
        // The first visible event goes out at once (time to first token), whatever the
        // interval: a first event with no text (a partial character, text held back for a
        // stop string) must not start the interval's clock.
        const bool first_shown =
            !job->shown[c] && (!ev.text.empty() || (with_logprobs && ev.token >= 0));
        if (first_shown) job->shown[c] = 1;
        const auto now = Clock::now();
        if (last || first_shown || now >= job->next_wake[c]) {
          job->next_wake[c] = now + job->wake_interval;
          job->cv.notify_all();
        }
      };
      const SubmitResult sub = service_.submit(std::move(sr));
      if (sub.status != SubmitResult::Status::ok) {
        Impl::cancel_all(service_, *job);
        ApiError e;
        switch (sub.status) {
          case SubmitResult::Status::queue_full:
            e = make_error(429, "rate_limit_error", "queue_full",
                           fmt::format("the server is overloaded: {}; retry after {} s",
                                       sub.message, options_.retry_after_s));
            e.retry_after_s = options_.retry_after_s;
            break;
          case SubmitResult::Status::too_long:
            e = make_error(400, "invalid_request_error", "context_length_exceeded", sub.message,
                           "prompt");
            break;
          case SubmitResult::Status::shutting_down:
            e = make_error(503, "server_error", "shutting_down",
                           fmt::format("the server is shutting down: {}", sub.message));
            break;
          default:
            e = make_error(400, "invalid_request_error", "invalid_value", sub.message);
            break;
        }
        send_error(res, e);
        return;
      }
      std::lock_guard lock(job->mutex);
      job->request_ids[c] = sub.request_id;
    }

    const std::string id =
        fmt::format("cmpl-{:x}{:08x}", next_id_.fetch_add(1), uint32_t(random_u64()));
    const int64_t created = int64_t(std::time(nullptr));
    const int fd = find_connection_fd(req);
    const auto deadline = options_.request_timeout_s > 0
                              ? Clock::now() + std::chrono::seconds(options_.request_timeout_s)
                              : Clock::time_point::max();
    const int poll_ms = options_.poll_interval_ms;
    const int32_t timeout_s = options_.request_timeout_s;
    auto timeout_error = [timeout_s] {
      return make_error(504, "server_error", "request_timeout",
                        fmt::format("generation took longer than this server's limit of {} s "
                                    "(request_timeout_s); ask for fewer tokens",
                                    timeout_s));
    };

    if (!r.stream) {
      std::vector<std::pair<size_t, TokenEvent>> events;
      for (;;) {
        const auto w = Impl::wait_events(*job, fd, deadline, poll_ms, events);
        if (w == Impl::Wait::done) break;
        if (w == Impl::Wait::disconnected) {
          Impl::cancel_all(service_, *job);
          LOOM_LOG_INFO("{}: client went away; cancelled {} requests", id, num_choices);
          res.status = 499;  // nobody reads it
          return;
        }
        if (w == Impl::Wait::timed_out) {
          Impl::cancel_all(service_, *job);
          send_error(res, timeout_error());
          return;
        }
        for (auto& [c, ev] : events) Impl::apply(service_, r, choices[c], ev, nullptr);
      }
      json out_choices = json::array();
      for (size_t c = 0; c < num_choices; ++c) {
        const auto& ch = choices[c];
        if (ch.finish == FinishReason::error || ch.finish == FinishReason::cancelled) {
          const bool cancelled = ch.finish == FinishReason::cancelled;
          send_error(res, cancelled ? make_error(503, "server_error", "shutting_down",
                                                 "the request was cancelled: the server is "
                                                 "shutting down")
                                    : make_error(500, "server_error", "generation_error",
                                                 fmt::format("generation failed: {}", ch.error)));
          return;
        }
        out_choices.push_back(json{
            {"text", ch.prompt_text + ch.text},
            {"index", c},
            {"logprobs", r.logprobs >= 0 ? ch.logprobs.to_json() : json(nullptr)},
            {"finish_reason", finish_name(ch.finish)}});
      }
      json body{{"id", id},
                {"object", "text_completion"},
                {"created", created},
                {"model", model_name_},
                {"choices", std::move(out_choices)},
                {"usage", Impl::usage_json(choices, r.n)}};
      res.set_content(openai::dump(body), "application/json");
      return;
    }

    // Streaming: server-sent events, written by this thread after the handler returns.
    res.set_header("Cache-Control", "no-cache");
    auto state = std::make_shared<std::vector<ChoiceState>>(std::move(choices));
    res.set_chunked_content_provider(
        "text/event-stream",
        [this, job, slot, state, r, id, created, fd, deadline, poll_ms, num_choices,
         timeout_error](size_t, httplib::DataSink& sink) {
          auto chunk = [&](json choices_json) {
            json c{{"id", id},
                   {"object", "text_completion"},
                   {"created", created},
                   {"model", model_name_},
                   {"choices", std::move(choices_json)}};
            if (r.include_usage) c["usage"] = nullptr;
            return c;
          };
          // Events are gathered into `out` and written together (flush): the tokens of one
          // wake-up go out in one write, each still its own server-sent event.
          std::string out;
          auto flush = [&] {
            if (out.empty()) return true;
            const bool ok = sink.write(out.data(), out.size());
            out.clear();
            return ok;
          };
          auto add = [&](const json& j) {
            out += "data: ";
            out += openai::dump(j);
            out += "\n\n";
          };
          auto send = [&](const json& j) {
            add(j);
            return flush();
          };
          auto fail = [&](const char* why) {
            Impl::cancel_all(service_, *job);
            LOOM_LOG_INFO("{}: {}; cancelled {} requests", id, why, num_choices);
            return false;
          };
          auto finish_stream = [&] {
            out += "data: [DONE]\n\n";
            flush();
            sink.done();
            return true;
          };
          auto& choices = *state;
          if (r.echo)
            for (size_t c = 0; c < num_choices; ++c)
              if (!send(chunk(json::array({json{{"text", choices[c].prompt_text},
                                                {"index", c},
                                                {"logprobs", nullptr},
                                                {"finish_reason", nullptr}}}))))
                return fail("client went away");
          std::vector<std::pair<size_t, TokenEvent>> events;
          for (;;) {
            const auto w = Impl::wait_events(*job, fd, deadline, poll_ms, events);
            if (w == Impl::Wait::done) break;
            if (w == Impl::Wait::disconnected) return fail("client went away");
            if (w == Impl::Wait::timed_out) {
              Impl::cancel_all(service_, *job);
              add(openai::error_body(timeout_error()));
              return finish_stream();
            }
            for (auto& [c, ev] : events) {
              openai::LogprobsAccumulator lp;
              const std::string text =
                  Impl::apply(service_, r, choices[c], ev, r.logprobs >= 0 ? &lp : nullptr);
              const FinishReason f = choices[c].finish;
              if (f == FinishReason::error || f == FinishReason::cancelled) {
                // OpenAI streams have no error chunk; vLLM and llama.cpp send an error object
                // as an event, which the openai client raises as an APIError.
                Impl::cancel_all(service_, *job);
                add(openai::error_body(
                    f == FinishReason::cancelled
                        ? make_error(503, "server_error", "shutting_down",
                                     "the request was cancelled: the server is shutting down")
                        : make_error(500, "server_error", "generation_error",
                                     fmt::format("generation failed: {}", choices[c].error))));
                return finish_stream();
              }
              if (text.empty() && f == FinishReason::none && lp.empty()) continue;
              json one{{"text", text},
                       {"index", c},
                       {"logprobs", r.logprobs >= 0 ? lp.to_json() : json(nullptr)},
                       {"finish_reason",
                        f == FinishReason::none ? json(nullptr) : json(finish_name(f))}};
              add(chunk(json::array({std::move(one)})));
            }
            // The last events, the usage chunk and [DONE] go out in one write.
            if (Impl::all_taken(*job)) break;
            if (!flush()) return fail("client went away");
          }
          if (r.include_usage) {
            json u = chunk(json::array());
            u["usage"] = Impl::usage_json(choices, r.n);
            add(u);
          }
          return finish_stream();
        },
        // Called when the response is done with; unsuccessful (headers could not be written,
        // or the provider gave up) means nobody reads these choices any more.
        [this, job](bool success) {
          if (!success) Impl::cancel_all(service_, *job);
        });
  });
}

}  // namespace loom::infer
