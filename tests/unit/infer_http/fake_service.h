// tests/unit/infer_http/fake_service.h: a scripted CompletionService for the HTTP server's tests.
//
// Tokenizer: one token per byte (token id = byte value), so prompts' token counts are their
// lengths. Generation: one event per running request per step, every step_ms milliseconds, on
// one service thread (like the real engine). Token i of a request with seed s is the letter
// 'a' + (s + i) % 26, so the text depends on the seed and n > 1 choices differ. The last step
// carries the finish (length at max_tokens, stop after stop_after tokens when set), prompt and
// completion counts. It records every submitted request and every cancel.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "infer/service.h"

namespace loom::infer::testing {

class FakeService : public CompletionService {
 public:
  struct Options {
    int64_t context = 64;
    int step_ms = 1;
    int64_t capacity = 1000;  // queued + running; more -> queue_full
    int64_t max_running = 1000;  // requests advanced per step (lowest ids); the rest wait
    int64_t stop_after = -1;  // >= 0: finish with stop after this many tokens
    bool fail = false;        // finish every request with an error at its first step
    bool hold_first = false;  // the first token's text comes with the second token's event (as
                              // the engine holds back text that could start a stop string)
    std::string name = "fake-model";
  };

  explicit FakeService(Options o) : o_(std::move(o)), worker_([this] { run(); }) {}
  ~FakeService() override {
    shutdown(false);
    {
      std::lock_guard lock(mu_);
      exit_ = true;
    }
    cv_.notify_all();
    worker_.join();
  }

  SubmitResult submit(Request request) override {
    std::lock_guard lock(mu_);
    SubmitResult r;
    if (stopping_) {
      r.status = SubmitResult::Status::shutting_down;
      r.message = "fake service is stopping";
      return r;
    }
    if (int64_t(live_.size()) >= o_.capacity) {
      r.status = SubmitResult::Status::queue_full;
      r.message = "queue holds " + std::to_string(o_.capacity) + " requests (capacity)";
      return r;
    }
    if (request.prompt.empty()) {
      r.status = SubmitResult::Status::invalid;
      r.message = "empty prompt";
      return r;
    }
    r.request_id = next_id_++;
    submitted_.push_back(request.params);
    domains_.push_back(request.domain);
    live_[r.request_id] = Live{std::move(request), 0, false};
    cv_.notify_all();
    return r;
  }

  void cancel(int64_t id) override {
    std::lock_guard lock(mu_);
    cancelled_.insert(id);
    auto it = live_.find(id);
    if (it != live_.end()) it->second.cancel = true;
  }

  int64_t context_length() const override { return o_.context; }
  std::string model_name() const override { return o_.name; }
  std::vector<int32_t> encode(const std::string& text) const override {
    std::vector<int32_t> t;
    for (unsigned char c : text) t.push_back(int32_t(c));
    return t;
  }
  std::string decode(const std::vector<int32_t>& tokens) const override {
    std::string s;
    for (int32_t t : tokens) s.push_back(char(t));
    return s;
  }

  void shutdown(bool drain) override {
    std::unique_lock lock(mu_);
    stopping_ = true;
    ++shutdowns_;
    if (!drain)
      for (auto& [id, l] : live_) l.cancel = true;
    cv_.notify_all();
    idle_.wait(lock, [&] { return live_.empty(); });
  }

  // Expected completion text of a request (no stop).
  static std::string expected_text(uint64_t seed, int64_t n) {
    std::string s;
    for (int64_t i = 0; i < n; ++i) s.push_back(char('a' + (seed + uint64_t(i)) % 26));
    return s;
  }

  std::vector<SamplingParams> submitted() const {
    std::lock_guard lock(mu_);
    return submitted_;
  }
  std::vector<std::string> submitted_domains() const {  // Request::domain, in submit order
    std::lock_guard lock(mu_);
    return domains_;
  }
  std::set<int64_t> cancelled() const {
    std::lock_guard lock(mu_);
    return cancelled_;
  }
  int64_t live() const {
    std::lock_guard lock(mu_);
    return int64_t(live_.size());
  }
  int shutdowns() const {
    std::lock_guard lock(mu_);
    return shutdowns_;
  }

 private:
  struct Live {
    Request request;
    int64_t step;
    bool cancel;
  };

  void run() {
    std::unique_lock lock(mu_);
    for (;;) {
      cv_.wait(lock, [&] { return exit_ || !live_.empty(); });
      if (exit_ && live_.empty()) return;
      std::vector<std::pair<std::function<void(const TokenEvent&)>, TokenEvent>> out;
      int64_t running = 0;
      for (auto it = live_.begin(); it != live_.end();) {
        Live& l = it->second;
        if (!l.cancel && running++ >= o_.max_running) {  // queued: no event this step
          ++it;
          continue;
        }
        const auto& p = l.request.params;
        TokenEvent ev;
        ev.request_id = it->first;
        const int64_t i = l.step++;
        if (l.cancel) {
          ev.finish = FinishReason::cancelled;
        } else if (o_.fail) {
          ev.finish = FinishReason::error;
          ev.error = "scripted failure";
        } else if (p.max_tokens == 0) {
          ev.finish = FinishReason::length;
        } else {
          ev.token = int32_t('a' + (p.seed + uint64_t(i)) % 26);
          ev.text = std::string(1, char(ev.token));
          if (o_.hold_first && i == 0 && p.max_tokens > 1) {
            ev.text.clear();
          } else if (o_.hold_first && i == 1) {
            ev.text = std::string(1, char('a' + p.seed % 26)) + ev.text;
          }
          ev.logprob = -0.5f - 0.1f * float(i);
          for (int32_t k = 0; k < std::max(p.logprobs, 0); ++k)
            ev.top.push_back(k == 0 ? TopLogprob{ev.token, ev.text, ev.logprob}
                                    : TopLogprob{int32_t('0' + k), std::string(1, char('0' + k)),
                                                 ev.logprob - float(k)});
          if (i + 1 >= p.max_tokens) ev.finish = FinishReason::length;
          if (o_.stop_after >= 0 && i + 1 >= o_.stop_after) ev.finish = FinishReason::stop;
        }
        if (ev.finish != FinishReason::none) {
          ev.prompt_tokens = int64_t(l.request.prompt.size());
          ev.completion_tokens = ev.token >= 0 ? i + 1 : i;
          out.emplace_back(std::move(l.request.on_event), std::move(ev));
          it = live_.erase(it);
        } else {
          out.emplace_back(l.request.on_event, std::move(ev));
          ++it;
        }
      }
      lock.unlock();
      for (auto& [cb, ev] : out) cb(ev);
      std::this_thread::sleep_for(std::chrono::milliseconds(o_.step_ms));
      lock.lock();
      if (live_.empty()) idle_.notify_all();
    }
  }

  Options o_;
  mutable std::mutex mu_;
  std::condition_variable cv_, idle_;
  std::map<int64_t, Live> live_;
  std::vector<SamplingParams> submitted_;
  std::vector<std::string> domains_;
  std::set<int64_t> cancelled_;
  int64_t next_id_ = 1;
  bool stopping_ = false;
  bool exit_ = false;
  int shutdowns_ = 0;
  std::thread worker_;
};

}  // namespace loom::infer::testing
