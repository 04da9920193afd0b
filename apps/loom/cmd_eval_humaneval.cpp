// `loom eval humaneval-x`: sandboxed functional-correctness evaluation of HumanEval-X samples
// (or, with --canonical, of the problems' own solutions: a self-test of this machine's
// toolchains). Prints a per-language table; --out writes results.jsonl and summary.json.
// Exit status: 0 done, 1 bad input or missing toolchain, 3 --canonical found a canonical
// solution that does not pass (other than the known-defective ones).
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "cli.h"
#include "core/error.h"
#include "eval/harness.h"

namespace {

struct Args {
  std::vector<std::string> problems;
  std::string samples;
  bool canonical = false;
  std::string ks = "1,10,100";
  int workers = 0;
  double timeout = 10.0;
  double compile_timeout = 60.0;
  std::string out;
  std::vector<std::string> langs;
  bool allow_network = false;
  std::string go_cache;
  bool no_progress = false;
};

std::vector<int64_t> parse_ks(const std::string& text) {
  std::vector<int64_t> ks;
  size_t start = 0;
  while (start <= text.size()) {
    size_t end = text.find(',', start);
    if (end == std::string::npos) end = text.size();
    const std::string item = text.substr(start, end - start);
    size_t used = 0;
    long long k = 0;
    try {
      k = std::stoll(item, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    LOOM_CHECK(used == item.size() && !item.empty() && k >= 1,
               "-k '{}': expected a comma-separated list of positive integers such as 1,10,100",
               text);
    ks.push_back(k);
    if (end == text.size()) break;
    start = end + 1;
  }
  return ks;
}

std::string clock(double seconds) {
  const long s = std::lround(seconds);
  return s >= 3600 ? fmt::format("{}h{:02}m{:02}s", s / 3600, s / 60 % 60, s % 60)
                   : fmt::format("{}m{:02}s", s / 60, s % 60);
}

// "[#########.........] 123/456  27%  3.1 prog/s  ETA 1m47s" on a terminal (redrawn in place);
// one line per 10% otherwise, so logs stay short.
void show_progress(const loom::eval::EvalProgress& p, bool tty, int64_t& last_decile) {
  const double frac = p.total ? double(p.done) / double(p.total) : 1.0;
  const double rate = p.elapsed_seconds > 0 ? double(p.done) / p.elapsed_seconds : 0.0;
  const double eta = rate > 0 ? double(p.total - p.done) / rate : 0.0;
  if (tty) {
    constexpr int kWidth = 30;
    const int fill = int(frac * kWidth);
    std::fprintf(stderr, "\r[%s%s] %lld/%lld %3d%% %5.2f prog/s ETA %s ",
                 std::string(size_t(fill), '#').c_str(),
                 std::string(size_t(kWidth - fill), '.').c_str(), (long long)p.done,
                 (long long)p.total, int(100 * frac), rate, clock(eta).c_str());
    if (p.done == p.total) std::fprintf(stderr, "\n");
  } else {
    const int64_t decile = int64_t(10 * frac);
    if (decile > last_decile || p.done == p.total) {
      last_decile = decile;
      std::fprintf(stderr, "progress: %lld/%lld (%d%%), %.2f prog/s, ETA %s\n",
                   (long long)p.done, (long long)p.total, int(100 * frac), rate,
                   clock(eta).c_str());
    }
  }
  std::fflush(stderr);
}

void add_eval_humaneval(CLI::App& root, loom::cli::Context& ctx) {
  CLI::App* eval = loom::cli::subcommand_path(root, "eval", "evaluate models and samples");
  CLI::App* sub = eval->add_subcommand(
      "humaneval-x", "run HumanEval-X samples (or canonical solutions) in a sandbox; pass@k");
  auto args = std::make_shared<Args>();
  sub->add_option("--problems", args->problems, "humaneval_<lang>.jsonl[.gz] files")
      ->required()
      ->expected(1, -1);
  auto* samples = sub->add_option("--samples", args->samples,
                                   "JSON Lines of {\"task_id\", \"generation\"}");
  auto* canonical = sub->add_flag("--canonical", args->canonical,
                                  "evaluate each problem's canonical solution (toolchain "
                                  "self-test)");
  samples->excludes(canonical);
  sub->add_option("-k", args->ks, "pass@k values, comma-separated")->capture_default_str();
  sub->add_option("--workers", args->workers, "parallel programs (default: available cores)");
  sub->add_option("--timeout", args->timeout, "wall-clock seconds per run")
      ->capture_default_str();
  sub->add_option("--compile-timeout", args->compile_timeout, "wall-clock seconds per compile")
      ->capture_default_str();
  sub->add_option("--out", args->out, "write results.jsonl and summary.json here");
  sub->add_option("--lang", args->langs, "only these languages: python cpp java js go rust")
      ->expected(1, -1);
  sub->add_flag("--allow-network", args->allow_network,
                "where namespaces are unavailable, run generated code WITHOUT network, "
                "filesystem and uid isolation (dangerous)");
  sub->add_option("--go-cache", args->go_cache,
                  "Go build cache shared by compiles (default: a fresh one per run)");
  sub->add_flag("--no-progress", args->no_progress, "no progress output on stderr");
  sub->callback([args, &ctx] {
    LOOM_CHECK(args->canonical || !args->samples.empty(),
               "give --samples FILE or --canonical");
    loom::eval::HarnessOptions o;
    for (const auto& p : args->problems) o.problem_files.push_back(p);
    o.samples_file = args->samples;
    o.canonical = args->canonical;
    o.ks = parse_ks(args->ks);
    o.workers = args->workers;
    LOOM_CHECK(args->workers >= 0, "--workers {} must be >= 0 (0 = available cores)",
               args->workers);
    o.timeout_seconds = args->timeout;
    o.compile_timeout_seconds = args->compile_timeout;
    for (const auto& l : args->langs) o.languages.push_back(loom::eval::parse_language(l));
    o.allow_network = args->allow_network;
    o.go_cache_dir = args->go_cache;
    const bool tty = isatty(STDERR_FILENO) != 0;
    int64_t last_decile = -1;
    if (!args->no_progress)
      o.progress = [tty, &last_decile](const loom::eval::EvalProgress& p) {
        show_progress(p, tty, last_decile);
      };
    const loom::eval::EvalReport report = loom::eval::evaluate_humaneval_x(o);
    if (!report.isolated)
      std::fprintf(stderr,
                   "\n*** WARNING: generated programs ran WITHOUT isolation: %s ***\n\n",
                   report.sandbox.c_str());
    std::fputs(loom::eval::format_table(report).c_str(), stdout);
    if (!args->out.empty()) {
      loom::eval::write_report(report, args->out);
      std::printf("wrote %s/results.jsonl and %s/summary.json\n", args->out.c_str(),
                  args->out.c_str());
    }
    ctx.exit_code = 0;
    if (args->canonical) {
      int64_t bad = 0;
      for (const auto& r : report.results) {
        const bool known_defect = std::any_of(r.notes.begin(), r.notes.end(), [](const auto& n) {
          return n.rfind("known dataset defect", 0) == 0;
        });
        if (r.outcome != loom::eval::Outcome::kPassed &&
            r.outcome != loom::eval::Outcome::kSkipped && !known_defect) {
          std::printf("canonical solution failed: %s (%s): %s\n", r.task_id.c_str(),
                      std::string(loom::eval::outcome_name(r.outcome)).c_str(),
                      r.excerpt.c_str());
          ++bad;
        }
      }
      if (bad > 0) ctx.exit_code = 3;
    }
  });
}

}  // namespace

LOOM_REGISTER_COMMAND(eval_humaneval, add_eval_humaneval);
