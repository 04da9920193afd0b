// eval/generate.cpp: see generate.h.
#include "eval/generate.h"

#include <unistd.h>

#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <deque>
#include <fstream>
#include <map>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <sstream>
#include <vector>

#include "core/error.h"
#include "data/languages.h"

namespace loom::eval {

namespace fs = std::filesystem;
using nlohmann::json;

data::Language data_language(Language lang) {
  switch (lang) {
    case Language::kPython: return data::Language::kPython;
    case Language::kCpp: return data::Language::kCpp;
    case Language::kJava: return data::Language::kJava;
    case Language::kJavaScript: return data::Language::kJavaScript;
    case Language::kGo: return data::Language::kGo;
    case Language::kRust: return data::Language::kRust;
  }
  return data::Language::kPython;
}

namespace {

// The training corpus's tag line for a HumanEval-X language (data/languages.h).
std::string tag_line(Language lang) { return data::language_tag_line(data_language(lang)); }

json settings_json(const GenerateOptions& o) {
  json j = {{"n", o.n},
          {"temperature", double(o.temperature)},
          {"top_p", double(o.top_p)},
          {"top_k", o.top_k},
          {"max_tokens", o.max_tokens},
          {"seed", o.seed},
          {"language_tag", o.language_tag}};
  // MoE domains only when set, so dense models' runs keep their settings file.
  if (!o.domain.empty()) j["domain"] = o.domain;
  if (o.domain.empty() && !o.language_domains.empty()) {
    json m = json::object();
    for (const auto& [l, d] : o.language_domains) m[std::string(language_name(l))] = d;
    j["language_domains"] = m;
  }
  return j;
}

std::string read_all(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  LOOM_CHECK(f.good(), "cannot read '{}'", p.string());
  std::ostringstream s;
  s << f.rdbuf();
  return s.str();
}

void write_atomically(const fs::path& path, const std::string& text) {
  const fs::path tmp = path.string() + ".tmp";
  std::FILE* f = std::fopen(tmp.c_str(), "wb");
  LOOM_CHECK(f != nullptr, "cannot create '{}'", tmp.string());
  const bool ok = std::fwrite(text.data(), 1, text.size(), f) == text.size() &&
                  std::fflush(f) == 0 && ::fsync(fileno(f)) == 0;
  std::fclose(f);
  LOOM_CHECK(ok, "writing '{}' failed (disk full?)", tmp.string());
  fs::rename(tmp, path);
}

// The log's names for how a sample ended (service.h's FinishReason; kept here so eval needs only
// the header of the service interface, not the engine library).
std::string finish_name(infer::FinishReason r) {
  switch (r) {
    case infer::FinishReason::stop: return "stop";
    case infer::FinishReason::length: return "length";
    case infer::FinishReason::cancelled: return "cancelled";
    case infer::FinishReason::error: return "error";
    case infer::FinishReason::none: break;
  }
  return "none";
}

struct Finished {
  size_t problem = 0;
  int64_t index = 0;
  std::string text;
  std::string finish;
  int64_t tokens = 0;
  std::string error;
};

// Shared with the service's callbacks, which may outlive a throwing generate_samples.
struct Shared {
  std::mutex mu;
  std::condition_variable cv;
  std::deque<Finished> done;
};

}  // namespace

uint64_t sample_seed(uint64_t seed, const std::string& task_id, int64_t index) {
  uint64_t h = 14695981039346656037ull;  // FNV-1a of the task id
  for (unsigned char c : task_id) h = (h ^ c) * 1099511628211ull;
  uint64_t x = seed ^ (h + 0x9e3779b97f4a7c15ull * uint64_t(index + 1));
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;  // splitmix64 finaliser
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

GenerateReport generate_samples(infer::CompletionService& service, const ProblemSet& problems,
                                const fs::path& out_dir, const GenerateOptions& o) {
  LOOM_CHECK(o.n >= 1, "-n {} must be >= 1 (samples per problem)", o.n);
  LOOM_CHECK(std::isfinite(o.temperature) && o.temperature >= 0.f,
             "--temperature {} must be a finite number >= 0", o.temperature);
  LOOM_CHECK(o.top_p > 0.f && o.top_p <= 1.f, "--top-p {} must be in (0, 1]", o.top_p);
  LOOM_CHECK(o.top_k >= 0, "--top-k {} must be >= 0", o.top_k);
  LOOM_CHECK(o.max_tokens >= 1, "--max-tokens {} must be >= 1", o.max_tokens);
  LOOM_CHECK(o.in_flight >= 1, "in_flight {} must be >= 1", o.in_flight);
  const std::vector<Problem>& probs = problems.problems();
  LOOM_CHECK(!probs.empty(), "no problems to generate for");
  fs::create_directories(out_dir);
  const fs::path log_path = out_dir / "generations.jsonl";
  const fs::path settings_path = out_dir / "generate.json";
  GenerateReport rep;
  rep.total = int64_t(probs.size()) * o.n;
  rep.samples_file = out_dir / "samples.jsonl";

  // Settings: a resumed run must continue the same experiment.
  const json settings = settings_json(o);
  if (fs::exists(log_path) || fs::exists(settings_path)) {
    LOOM_CHECK(o.resume, "'{}' holds generations of an earlier run: pass --resume to continue "
               "it, or choose another --out", out_dir.string());
    LOOM_CHECK(fs::exists(settings_path), "'{}' is missing: cannot check that --resume uses the "
               "earlier run's settings; choose another --out", settings_path.string());
    json old;
    try {
      old = json::parse(read_all(settings_path));
    } catch (const json::exception& e) {
      LOOM_FAIL("'{}' is not valid JSON ({}); choose another --out", settings_path.string(),
                e.what());
    }
    std::string diff;
    for (auto& [k, v] : settings.items())
      if (!old.contains(k) || old[k] != v)
        diff += fmt::format("{}{} = {} (earlier run) vs {} (now)", diff.empty() ? "" : "; ", k,
                            old.contains(k) ? old[k].dump() : "missing", v.dump());
    LOOM_CHECK(diff.empty(), "--resume with other settings than the run in '{}': {}",
               out_dir.string(), diff);
  } else {
    write_atomically(settings_path, settings.dump(2) + "\n");
  }

  // The log: what exists already. A torn last line is cut; any other bad line is an error.
  std::map<std::string, size_t> problem_of;
  for (size_t i = 0; i < probs.size(); ++i) problem_of[probs[i].task_id] = i;
  std::vector<std::vector<std::optional<std::string>>> gens(
      probs.size(), std::vector<std::optional<std::string>>(size_t(o.n)));
  if (fs::exists(log_path)) {
    const std::string text = read_all(log_path);
    size_t pos = 0, good_end = 0;
    int64_t line_no = 0;
    while (pos < text.size()) {
      size_t nl = text.find('\n', pos);
      const bool last = nl == std::string::npos || nl + 1 >= text.size();
      const std::string line = text.substr(pos, nl == std::string::npos ? std::string::npos : nl - pos);
      ++line_no;
      std::string why;
      json j;
      try {
        j = json::parse(line);
        if (!j.is_object() || !j.contains("task_id") || !j["task_id"].is_string() ||
            !j.contains("index") || !j["index"].is_number_integer() ||
            !j.contains("generation") || !j["generation"].is_string())
          why = "expected {\"task_id\": string, \"index\": integer, \"generation\": string}";
      } catch (const json::exception& e) {
        why = e.what();
      }
      if (!why.empty() || nl == std::string::npos) {
        // Only the last line can be torn (a kill while appending); it is regenerated.
        LOOM_CHECK(last, "'{}' line {}: {} (a line other than the last is damaged: remove the "
                   "file to start over)", log_path.string(), line_no,
                   why.empty() ? "no newline" : why);
        break;
      }
      const std::string tid = j["task_id"].get<std::string>();
      const int64_t idx = j["index"].get<int64_t>();
      auto it = problem_of.find(tid);
      LOOM_CHECK(it != problem_of.end() && idx >= 0 && idx < o.n,
                 "'{}' line {}: task '{}' sample {} is not part of this run ({} problems, n = "
                 "{}); use the same --problems, --lang and -n as the earlier run",
                 log_path.string(), line_no, tid, idx, probs.size(), o.n);
      auto& slot = gens[it->second][size_t(idx)];
      LOOM_CHECK(!slot, "'{}' line {}: task '{}' sample {} appears twice", log_path.string(),
                 line_no, tid, idx);
      slot = j["generation"].get<std::string>();
      ++rep.reused;
      pos = nl + 1;
      good_end = pos;
    }
    if (good_end < text.size()) {
      rep.torn_bytes_cut = int64_t(text.size() - good_end);
      fs::resize_file(log_path, good_end);
    }
  }

  std::FILE* log = std::fopen(log_path.c_str(), "ab");
  LOOM_CHECK(log != nullptr, "cannot append to '{}'", log_path.string());
  std::unique_ptr<std::FILE, int (*)(std::FILE*)> log_closer(log, &std::fclose);
  auto append = [&](const Finished& f) {
    const std::string line =
        json{{"task_id", probs[f.problem].task_id}, {"index", f.index}, {"generation", f.text},
             {"finish_reason", f.finish}, {"completion_tokens", f.tokens}}
            .dump(-1, ' ', false, json::error_handler_t::replace) + "\n";
    const bool ok = std::fwrite(line.data(), 1, line.size(), log) == line.size() &&
                    std::fflush(log) == 0 && ::fsync(fileno(log)) == 0;
    LOOM_CHECK(ok, "appending to '{}' failed (disk full?)", log_path.string());
    gens[f.problem][size_t(f.index)] = f.text;
  };

  // Jobs in problem order, index order.
  std::vector<std::pair<size_t, int64_t>> jobs;
  for (size_t p = 0; p < probs.size(); ++p)
    for (int64_t i = 0; i < o.n; ++i)
      if (!gens[p][size_t(i)]) jobs.emplace_back(p, i);
  const auto start = std::chrono::steady_clock::now();
  auto report_progress = [&] {
    if (!o.progress) return;
    EvalProgress pr;
    pr.done = rep.reused + rep.generated;
    pr.total = rep.total;
    pr.elapsed_seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    o.progress(pr);
  };
  auto shared = std::make_shared<Shared>();
  const int64_t ctx = service.context_length();
  size_t next = 0;
  int64_t in_flight = 0;
  std::vector<int64_t> ids;  // request ids in flight (cancelled if we throw)
  try {
    while (next < jobs.size() || in_flight > 0) {
      while (next < jobs.size() && in_flight < o.in_flight) {
        const auto [p, i] = jobs[next];
        const Problem& prob = probs[p];
        const std::string text =
            o.language_tag ? tag_line(prob.language) + "\n" + prob.prompt : prob.prompt;
        infer::Request req;
        req.prompt = service.encode(text);
        const int64_t room = ctx - int64_t(req.prompt.size());
        if (req.prompt.empty() || room < 1) {
          append({p, i, "", "too_long", 0, ""});
          ++rep.too_long;
          ++rep.generated;
          ++next;
          report_progress();
          continue;
        }
        req.params.temperature = o.temperature;
        req.params.top_p = o.top_p;
        req.params.top_k = o.top_k;
        req.params.seed = sample_seed(o.seed, prob.task_id, i);
        req.params.max_tokens = std::min(o.max_tokens, room);
        req.params.stop_rule = std::string(language_name(prob.language));
        if (!o.domain.empty()) {
          req.domain = o.domain;
        } else if (auto it = o.language_domains.find(prob.language);
                   it != o.language_domains.end()) {
          req.domain = it->second;
        }
        auto acc = std::make_shared<std::string>();
        req.on_event = [shared, acc, p = p, i = i](const infer::TokenEvent& e) {
          *acc += e.text;
          if (e.finish == infer::FinishReason::none) return;
          Finished f{p, i, *acc, finish_name(e.finish), e.completion_tokens,
                     e.finish == infer::FinishReason::error ? e.error : ""};
          std::lock_guard<std::mutex> lock(shared->mu);
          shared->done.push_back(std::move(f));
          shared->cv.notify_one();
        };
        const infer::SubmitResult r = service.submit(std::move(req));
        if (r.status == infer::SubmitResult::Status::queue_full && in_flight > 0) break;
        LOOM_CHECK(r.status == infer::SubmitResult::Status::ok,
                   "generating {} sample {} failed: {}", prob.task_id, i, r.message);
        ids.push_back(r.request_id);
        ++in_flight;
        ++next;
      }
      if (in_flight == 0) continue;
      std::deque<Finished> got;
      {
        std::unique_lock<std::mutex> lock(shared->mu);
        shared->cv.wait(lock, [&] { return !shared->done.empty(); });
        got.swap(shared->done);
      }
      for (Finished& f : got) {
        --in_flight;
        LOOM_CHECK(f.error.empty() && f.finish != "cancelled",
                   "generating {} sample {} failed ({}): {}; the samples finished so far are "
                   "kept in '{}': rerun with --resume", probs[f.problem].task_id, f.index,
                   f.finish, f.error, log_path.string());
        append(f);
        ++rep.generated;
        report_progress();
      }
    }
  } catch (...) {
    for (int64_t id : ids) service.cancel(id);
    throw;
  }

  std::string out;
  for (size_t p = 0; p < probs.size(); ++p)
    for (int64_t i = 0; i < o.n; ++i)
      out += json{{"task_id", probs[p].task_id}, {"generation", *gens[p][size_t(i)]}}
                 .dump(-1, ' ', false, json::error_handler_t::replace) + "\n";
  write_atomically(rep.samples_file, out);
  return rep;
}

}  // namespace loom::eval
