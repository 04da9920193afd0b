// eval/harness.cpp: scheduling, compile cache, aggregation and report files.
#include "eval/harness.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <fstream>
#include <future>
#include <mutex>
#include <thread>

#include "core/error.h"
#include "core/threads.h"
#include "eval/pass_at_k.h"

namespace loom::eval {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

double since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// A compile shared by every sample whose program text (and command) is identical: the
// first sample to need it compiles; the others wait for it and copy its artifacts.
struct CompileOutcome {
  std::optional<Verdict> failure;
  fs::path artifact_dir;  // root-owned copy of the artifacts
  double seconds = 0.0;
};

class CompileCache {
 public:
  explicit CompileCache(fs::path root) : root_(std::move(root)) {}

  // Returns the outcome for `key`, running `compile` (which must fill artifact_dir from the
  // given fresh directory) only if no other sample has. `owner` tells whether this call compiled.
  CompileOutcome get(const std::string& key,
                     const std::function<CompileOutcome(const fs::path&)>& compile, bool& owner) {
    std::shared_future<CompileOutcome> fut;
    std::promise<CompileOutcome> promise;
    fs::path dir;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = entries_.find(key);
      owner = it == entries_.end();
      if (owner) {
        fut = promise.get_future().share();
        entries_.emplace(key, fut);
        dir = root_ / fmt::format("c{}", next_++);
      } else {
        fut = it->second;
      }
    }
    if (owner) {
      try {
        fs::create_directories(dir);
        promise.set_value(compile(dir));
      } catch (...) {
        promise.set_exception(std::current_exception());
      }
    }
    return fut.get();
  }

 private:
  fs::path root_;
  std::mutex mu_;
  std::map<std::string, std::shared_future<CompileOutcome>> entries_;
  int64_t next_ = 0;
};

void write_text(const fs::path& file, const std::string& text) {
  fs::create_directories(file.parent_path());
  std::ofstream out(file, std::ios::binary);
  out << text;
  LOOM_CHECK(out.good(), "cannot write '{}'", file.string());
}

// Copies the files matching `patterns` ("name" or "*.ext") from `from` to `to`.
void copy_artifacts(const fs::path& from, const fs::path& to,
                    const std::vector<std::string>& patterns) {
  for (const auto& e : fs::directory_iterator(from)) {
    const std::string name = e.path().filename().string();
    for (const std::string& p : patterns) {
      const bool match = p.rfind("*", 0) == 0
                             ? name.size() >= p.size() - 1 &&
                                   name.compare(name.size() - (p.size() - 1), p.size() - 1,
                                                p.substr(1)) == 0
                             : name == p;
      if (match && e.is_regular_file()) {
        fs::copy_file(e.path(), to / name, fs::copy_options::overwrite_existing);
        break;
      }
    }
  }
}

struct Job {
  const Problem* problem = nullptr;
  const Sample* sample = nullptr;
};

}  // namespace

EvalReport evaluate_humaneval_x(const HarnessOptions& options) {
  const auto t0 = std::chrono::steady_clock::now();
  LOOM_CHECK(options.canonical != !options.samples_file.empty(),
             "give exactly one of --samples FILE or --canonical");
  LOOM_CHECK(options.timeout_seconds > 0 && options.compile_timeout_seconds > 0,
             "timeouts must be positive, got run {} s and compile {} s", options.timeout_seconds,
             options.compile_timeout_seconds);
  for (int64_t k : options.ks) LOOM_CHECK(k >= 1, "every k of pass@k must be >= 1, got {}", k);

  ProblemSet problems = ProblemSet::load(options.problem_files);
  problems.keep_languages(options.languages);
  LOOM_CHECK(!problems.problems().empty(),
             "no problems left after --lang; the problem files hold other languages");
  const std::vector<Sample> samples =
      options.canonical ? canonical_samples(problems)
                        : load_samples(options.samples_file, problems, options.languages);

  // Languages present, in canonical order, with their toolchains (throws when one is missing).
  std::vector<Language> langs;
  for (Language l : kAllLanguages)
    for (const Sample& s : samples)
      if (language_of_task(s.task_id) == l) {
        langs.push_back(l);
        break;
      }
  std::map<Language, Toolchain> toolchains;
  for (Language l : langs) toolchains.emplace(l, resolve_toolchain(l, options.toolchains));

  const int workers = options.workers > 0 ? options.workers : std::max(1, available_cores());
  Sandbox::Config sc;
  sc.allow_unisolated = options.allow_network;
  sc.max_slots = std::max(workers, 1);
  const Sandbox sandbox = Sandbox::create(sc);

  // Scratch: searchable (0711) so each slot's uid can reach its own 0700 directory inside.
  const fs::path parent =
      options.scratch_parent.empty() ? fs::temp_directory_path() : options.scratch_parent;
  std::string tmpl = (parent / "loom-eval-XXXXXX").string();
  LOOM_CHECK(mkdtemp(tmpl.data()) != nullptr, "mkdtemp({}) failed: {}", tmpl,
             std::strerror(errno));
  const fs::path scratch = tmpl;
  struct Cleanup {
    fs::path p;
    ~Cleanup() {
      std::error_code ec;
      fs::remove_all(p, ec);
    }
  } cleanup{scratch};
  fs::permissions(scratch, fs::perms(0711));
  const fs::path go_cache = options.go_cache_dir.empty() ? scratch / "gocache"
                                                         : fs::absolute(options.go_cache_dir);
  if (std::find(langs.begin(), langs.end(), Language::kGo) != langs.end()) {
    fs::create_directories(go_cache);
    // Shared by the slots' uids during compiles (see compile_step).
    fs::permissions(go_cache, fs::perms::all);
  }
  CompileCache cache(scratch / "compiled");

  std::vector<Job> jobs;
  for (const Sample& s : samples) jobs.push_back({problems.find(s.task_id), &s});
  EvalReport report;
  report.results.resize(jobs.size());
  report.sandbox = sandbox.describe();
  report.isolated = sandbox.isolated();
  report.workers = workers;
  const StepTimes times{options.timeout_seconds, options.compile_timeout_seconds};

  auto run_job = [&](const Job& job, int slot) -> SampleResult {
    SampleResult r;
    r.task_id = job.problem->task_id;
    r.language = job.problem->language;
    r.sample_index = job.sample->index;
    const Toolchain& tc = toolchains.at(r.language);
    if (!tc.unavailable.empty()) {
      r.outcome = Outcome::kSkipped;
      r.excerpt = tc.unavailable;
      return r;
    }
    const Program prog = assemble_program(*job.problem, job.sample->generation);
    r.notes = prog.notes;
    if (const std::string missing = missing_requirement(prog, options.toolchains);
        !missing.empty()) {
      r.outcome = Outcome::kSkipped;
      r.excerpt = missing;
      return r;
    }
    const fs::path dir = sandbox.make_dir(scratch, slot);
    struct DirCleanup {
      fs::path p;
      ~DirCleanup() {
        std::error_code ec;
        fs::remove_all(p, ec);
      }
    } dir_cleanup{dir};
    write_text(dir / prog.file_name, prog.source);
    sandbox.give_to_slot(dir, slot);

    if (auto step = compile_step(tc, prog, dir, times, go_cache, options.toolchains)) {
      // Key: the command (paths inside `dir` are relative) and the exact program text.
      std::string key = std::string(language_name(prog.language)) + '\0';
      for (size_t i = 0; i < step->argv.size(); ++i) key += step->argv[i] + '\0';
      key += prog.source;
      bool owner = false;
      const CompileOutcome co = cache.get(
          key,
          [&](const fs::path& artifact_dir) {
            SandboxSpec spec{step->argv, step->env, dir, step->extra_writable, step->limits,
                             step->umask};
            const SandboxResult sr = sandbox.run(spec, slot);
            CompileOutcome out;
            out.seconds = sr.wall_seconds;
            out.failure = judge_compile(sr);
            out.artifact_dir = artifact_dir;
            if (!out.failure) copy_artifacts(dir, artifact_dir, step->artifacts);
            return out;
          },
          owner);
      r.compile_seconds = owner ? co.seconds : 0.0;
      r.compile_cached = !owner;
      if (co.failure) {
        r.outcome = co.failure->outcome;
        r.excerpt = co.failure->excerpt;
        return r;
      }
      if (!owner) {
        copy_artifacts(co.artifact_dir, dir, step->artifacts);
        sandbox.give_to_slot(dir, slot);
      }
    }
    const StepSpec run = run_step(tc, prog, dir, times, options.toolchains);
    SandboxSpec spec{run.argv, run.env, dir, run.extra_writable, run.limits, run.umask};
    const SandboxResult sr = sandbox.run(spec, slot);
    r.run_seconds = sr.wall_seconds;
    const Verdict v = judge_run(r.language, sr);
    r.outcome = v.outcome;
    r.excerpt = v.excerpt;
    return r;
  };

  // Worker pool: each worker takes the next job index; results land at their job's index, so
  // the report's order never depends on scheduling.
  std::atomic<size_t> next{0};
  std::mutex progress_mu;
  int64_t done = 0;
  std::exception_ptr first_error;
  std::mutex error_mu;
  auto worker = [&](int slot) {
    for (;;) {
      const size_t i = next.fetch_add(1);
      if (i >= jobs.size()) return;
      try {
        report.results[i] = run_job(jobs[i], slot);
      } catch (...) {
        std::lock_guard<std::mutex> lock(error_mu);
        if (!first_error) first_error = std::current_exception();
        next.store(jobs.size());  // stop handing out work
        return;
      }
      std::lock_guard<std::mutex> lock(progress_mu);
      ++done;
      if (options.progress) options.progress({done, int64_t(jobs.size()), since(t0)});
    }
  };
  {
    std::vector<std::thread> pool;
    for (int s = 0; s < workers; ++s) pool.emplace_back(worker, s);
    for (auto& t : pool) t.join();
  }
  if (first_error) std::rethrow_exception(first_error);

  // Aggregate: (n, c) per problem, in problem order.
  std::map<std::string, std::pair<int64_t, int64_t>> per_task;
  for (const SampleResult& r : report.results) {
    if (r.outcome == Outcome::kSkipped) continue;
    auto& [n, c] = per_task[r.task_id];
    ++n;
    if (r.outcome == Outcome::kPassed) ++c;
  }
  std::vector<std::pair<int64_t, int64_t>> all_counts;
  for (Language l : langs) {
    LanguageSummary ls;
    ls.language = l;
    const Toolchain& tc = toolchains.at(l);
    ls.toolchain = tc.unavailable.empty() ? tc.version : "unavailable: " + tc.unavailable;
    for (Outcome o : kAllOutcomes) ls.counts[o] = 0;
    for (const SampleResult& r : report.results)
      if (r.language == l) {
        ++ls.samples;
        ++ls.counts[r.outcome];
        ls.busy_seconds += r.compile_seconds + r.run_seconds;
      }
    std::vector<std::pair<int64_t, int64_t>> counts;
    for (const Problem& p : problems.problems()) {
      if (p.language != l) continue;
      auto it = per_task.find(p.task_id);
      if (it != per_task.end()) counts.push_back(it->second);
    }
    ls.problems = int64_t(counts.size());
    for (int64_t k : options.ks) ls.pass_at_k.push_back({k, mean_pass_at_k(counts, k)});
    all_counts.insert(all_counts.end(), counts.begin(), counts.end());
    if (!tc.unavailable.empty()) report.warnings.push_back(tc.unavailable);
    report.languages.push_back(std::move(ls));
  }
  for (int64_t k : options.ks) report.overall_pass_at_k.push_back({k, mean_pass_at_k(all_counts, k)});

  // Warnings a reader must not miss.
  int64_t without = 0;
  for (const Problem& p : problems.problems())
    if (std::none_of(samples.begin(), samples.end(),
                     [&](const Sample& s) { return s.task_id == p.task_id; }))
      ++without;
  if (without > 0)
    report.warnings.push_back(fmt::format(
        "{} problem(s) have no samples; pass@k is averaged over the problems that do", without));
  std::map<std::string, std::string> noted;  // task -> first skip reason or trap
  for (const SampleResult& r : report.results) {
    if (r.outcome == Outcome::kSkipped && toolchains.at(r.language).unavailable.empty())
      noted.emplace(r.task_id, "skipped: " + r.excerpt);
    for (const std::string& n : r.notes)
      if (n.rfind("JavaScript passes only", 0) != 0) noted.emplace(r.task_id, n);
  }
  for (const auto& [task, why] : noted) report.warnings.push_back(task + ": " + why);
  for (int64_t k : options.ks)
    for (const LanguageSummary& ls : report.languages)
      if (ls.problems > 0 && !ls.pass_at_k.empty() &&
          !std::find_if(ls.pass_at_k.begin(), ls.pass_at_k.end(), [&](const PassAtKValue& v) {
             return v.k == k;
           })->value)
        report.warnings.push_back(fmt::format(
            "{}: pass@{} not reported: some problem has fewer than {} samples",
            language_name(ls.language), k, k));
  if (!sandbox.isolated()) report.warnings.insert(report.warnings.begin(), sandbox.describe());
  report.wall_seconds = since(t0);
  return report;
}

json result_json(const SampleResult& r) {
  json j;
  j["task_id"] = r.task_id;
  j["language"] = language_name(r.language);
  j["sample_index"] = r.sample_index;
  j["passed"] = r.outcome == Outcome::kPassed;
  j["outcome"] = outcome_name(r.outcome);
  j["excerpt"] = r.excerpt;
  j["compile_seconds"] = r.compile_seconds;
  j["run_seconds"] = r.run_seconds;
  j["compile_cached"] = r.compile_cached;
  if (!r.notes.empty()) j["notes"] = r.notes;
  return j;
}

namespace {
json pass_json(const std::vector<PassAtKValue>& values) {
  json j = json::object();
  for (const auto& v : values)
    j[fmt::format("pass@{}", v.k)] = v.value ? json(*v.value) : json(nullptr);
  return j;
}
}  // namespace

json summary_json(const EvalReport& report) {
  json j;
  j["sandbox"] = report.sandbox;
  j["isolated"] = report.isolated;
  j["workers"] = report.workers;
  j["wall_seconds"] = report.wall_seconds;
  j["samples"] = report.results.size();
  j["programs_per_second"] =
      report.wall_seconds > 0 ? double(report.results.size()) / report.wall_seconds : 0.0;
  j["overall"] = pass_json(report.overall_pass_at_k);
  json langs = json::object();
  for (const LanguageSummary& ls : report.languages) {
    json l;
    l["toolchain"] = ls.toolchain;
    l["problems"] = ls.problems;
    l["samples"] = ls.samples;
    json counts = json::object();
    for (const auto& [o, c] : ls.counts) counts[std::string(outcome_name(o))] = c;
    l["outcomes"] = counts;
    l["pass_at_k"] = pass_json(ls.pass_at_k);
    l["busy_seconds"] = ls.busy_seconds;
    l["seconds_per_program"] = ls.samples > 0 ? ls.busy_seconds / double(ls.samples) : 0.0;
    langs[std::string(language_name(ls.language))] = l;
  }
  j["languages"] = langs;
  j["warnings"] = report.warnings;
  return j;
}

void write_report(const EvalReport& report, const fs::path& out_dir) {
  fs::create_directories(out_dir);
  {
    std::ofstream out(out_dir / "results.jsonl");
    LOOM_CHECK(out.good(), "cannot write {}", (out_dir / "results.jsonl").string());
    for (const SampleResult& r : report.results)
      out << result_json(r).dump(-1, ' ', false, json::error_handler_t::replace) << "\n";
  }
  std::ofstream out(out_dir / "summary.json");
  LOOM_CHECK(out.good(), "cannot write {}", (out_dir / "summary.json").string());
  out << summary_json(report).dump(2, ' ', false, json::error_handler_t::replace) << "\n";
}

std::string format_table(const EvalReport& report) {
  std::string header = fmt::format("{:<8} {:>8} {:>8}", "language", "problems", "samples");
  std::vector<int64_t> ks;
  for (const auto& v : report.overall_pass_at_k) ks.push_back(v.k);
  for (int64_t k : ks) header += fmt::format(" {:>9}", fmt::format("pass@{}", k));
  header += fmt::format("  {:>6} {:>6} {:>7} {:>7} {:>7} {:>9} {:>7} {:>8}", "passed", "failed",
                        "compile", "timeout", "runtime", "violation", "skipped", "s/prog");
  std::string out = header + "\n" + std::string(header.size(), '-') + "\n";
  auto pct = [](const std::optional<double>& v) {
    return v ? fmt::format("{:>8.2f}%", 100.0 * *v) : fmt::format("{:>9}", "-");
  };
  int64_t total_problems = 0, total_samples = 0;
  std::map<Outcome, int64_t> total;
  for (const LanguageSummary& ls : report.languages) {
    std::string row = fmt::format("{:<8} {:>8} {:>8}", language_name(ls.language), ls.problems,
                                  ls.samples);
    for (const auto& v : ls.pass_at_k) row += fmt::format(" {}", pct(v.value));
    auto c = [&](Outcome o) {
      auto it = ls.counts.find(o);
      return it == ls.counts.end() ? int64_t(0) : it->second;
    };
    row += fmt::format("  {:>6} {:>6} {:>7} {:>7} {:>7} {:>9} {:>7} {:>8.2f}", c(Outcome::kPassed),
                       c(Outcome::kFailed), c(Outcome::kCompileError), c(Outcome::kTimeout),
                       c(Outcome::kRuntimeError), c(Outcome::kSandboxViolation),
                       c(Outcome::kSkipped),
                       ls.samples ? ls.busy_seconds / double(ls.samples) : 0.0);
    out += row + "\n";
    total_problems += ls.problems;
    total_samples += ls.samples;
    for (const auto& [o, n] : ls.counts) total[o] += n;
  }
  std::string row = fmt::format("{:<8} {:>8} {:>8}", "all", total_problems, total_samples);
  for (const auto& v : report.overall_pass_at_k) row += fmt::format(" {}", pct(v.value));
  row += fmt::format("  {:>6} {:>6} {:>7} {:>7} {:>7} {:>9} {:>7}", total[Outcome::kPassed],
                     total[Outcome::kFailed], total[Outcome::kCompileError],
                     total[Outcome::kTimeout], total[Outcome::kRuntimeError],
                     total[Outcome::kSandboxViolation], total[Outcome::kSkipped]);
  out += std::string(header.size(), '-') + "\n" + row + "\n";
  out += fmt::format("{} programs in {:.1f} s on {} workers ({:.2f} programs/s); sandbox: {}\n",
                     report.results.size(), report.wall_seconds, report.workers,
                     report.wall_seconds > 0 ? double(report.results.size()) / report.wall_seconds
                                             : 0.0,
                     report.sandbox);
  for (const std::string& w : report.warnings) out += "warning: " + w + "\n";
  return out;
}

}  // namespace loom::eval
