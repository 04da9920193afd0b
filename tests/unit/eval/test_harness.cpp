// End-to-end tests of the HumanEval-X harness: loom's own problem set in five languages with
// the expected outcome of every sample, parallel == serial, --canonical, hostile samples, and
// tasks that must be skipped with a reason. Programs really run, in the sandbox, as root.
//
// Timing: run timeouts are 3 s (2 s for hostile samples) against programs that finish in well
// under 1 s, and compiles get 120 s; the expected timeouts are infinite loops, so a slow or
// loaded machine cannot flip any outcome.
#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "eval/harness.h"

namespace fs = std::filesystem;
using namespace loom::eval;
using nlohmann::json;

namespace {

const fs::path kData = LOOM_EVAL_TEST_DATA;

const std::vector<fs::path> kAllProblems = {
    kData / "humaneval_python.jsonl", kData / "humaneval_cpp.jsonl",
    kData / "humaneval_java.jsonl", kData / "humaneval_js.jsonl", kData / "humaneval_go.jsonl"};

HarnessOptions base_options() {
  HarnessOptions o;
  o.problem_files = kAllProblems;
  o.timeout_seconds = 3.0;
  o.compile_timeout_seconds = 120.0;
  o.workers = 2;
  o.ks = {1, 2, 3};
  o.go_cache_dir = LOOM_EVAL_TEST_GO_CACHE;
  return o;
}

// Skips (visibly) where programs cannot be isolated: never run them unsandboxed in a test.
bool can_isolate(std::string& why) {
  if (geteuid() != 0) {
    why = "SKIP: the harness tests need root for the sandbox's namespaces";
    return false;
  }
  try {
    Sandbox::create({});
  } catch (const loom::Error& e) {
    why = std::string("SKIP: ") + e.what();
    return false;
  }
  return true;
}

#define REQUIRE_SANDBOX()                        \
  do {                                           \
    std::string why;                             \
    if (!can_isolate(why)) GTEST_SKIP() << why;  \
  } while (0)

// Expected outcome per (task_id, sample index), from samples.jsonl's "expected" field.
std::map<std::pair<std::string, int64_t>, std::string> expected_outcomes(const fs::path& file) {
  std::map<std::pair<std::string, int64_t>, std::string> out;
  std::map<std::string, int64_t> next;
  std::ifstream in(file);
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty()) continue;
    const json j = json::parse(line);
    const std::string id = j["task_id"];
    out[{id, next[id]++}] = j["expected"];
  }
  return out;
}

const LanguageSummary& summary_of(const EvalReport& r, Language l) {
  for (const auto& s : r.languages)
    if (s.language == l) return s;
  throw std::runtime_error("language missing from report");
}

TEST(Harness, ProblemSetGivesExpectedOutcomesAndParallelEqualsSerial) {
  REQUIRE_SANDBOX();
  HarnessOptions o = base_options();
  o.samples_file = kData / "samples.jsonl";
  const EvalReport par = evaluate_humaneval_x(o);
  const auto expected = expected_outcomes(o.samples_file);
  ASSERT_EQ(par.results.size(), expected.size());
  for (const SampleResult& r : par.results) {
    const auto it = expected.find({r.task_id, r.sample_index});
    ASSERT_NE(it, expected.end()) << r.task_id;
    EXPECT_EQ(outcome_name(r.outcome), it->second)
        << r.task_id << " sample " << r.sample_index << ": " << r.excerpt;
  }
  EXPECT_TRUE(par.isolated);
  // Every language: 6 problems, one correct sample each among 3 (4 for Python/0 and JS/0).
  for (Language l : {Language::kPython, Language::kCpp, Language::kJava, Language::kJavaScript,
                     Language::kGo}) {
    const LanguageSummary& s = summary_of(par, l);
    EXPECT_EQ(s.problems, 6);
    EXPECT_EQ(s.counts.at(Outcome::kTimeout), 1) << language_name(l);
    EXPECT_EQ(s.counts.at(Outcome::kCompileError), 3) << language_name(l);
    EXPECT_EQ(s.counts.at(Outcome::kRuntimeError), 2) << language_name(l);
  }
  // pass@k from the closed form: C++ has n=3, c=1 for every problem.
  const LanguageSummary& cpp = summary_of(par, Language::kCpp);
  EXPECT_NEAR(*cpp.pass_at_k[0].value, 1.0 / 3.0, 1e-15);
  EXPECT_NEAR(*cpp.pass_at_k[1].value, 2.0 / 3.0, 1e-15);  // 1 - C(2,2)/C(3,2)
  EXPECT_EQ(*cpp.pass_at_k[2].value, 1.0);
  // Python/0 has n=4, c=2 (the truncated sample passes): pass@1 mean = (2/4 + 5 * 1/3) / 6.
  EXPECT_NEAR(*summary_of(par, Language::kPython).pass_at_k[0].value,
              (0.5 + 5.0 / 3.0) / 6.0, 1e-15);

  // The same samples on one worker: identical outcomes in identical order (a subset of the
  // languages keeps the test short; the scheduling code is language-independent).
  o.workers = 1;
  o.languages = {Language::kPython, Language::kJavaScript};
  const EvalReport ser = evaluate_humaneval_x(o);
  std::vector<std::pair<std::string, Outcome>> a, b;
  for (const auto& r : par.results)
    if (r.language == Language::kPython || r.language == Language::kJavaScript)
      a.emplace_back(r.task_id + "#" + std::to_string(r.sample_index), r.outcome);
  for (const auto& r : ser.results)
    b.emplace_back(r.task_id + "#" + std::to_string(r.sample_index), r.outcome);
  EXPECT_EQ(a, b);
  EXPECT_EQ(ser.workers, 1);
}

TEST(Harness, CanonicalSolutionsAllPassAndReportIsWritten) {
  REQUIRE_SANDBOX();
  HarnessOptions o = base_options();
  o.canonical = true;
  o.ks = {1, 10};
  const EvalReport r = evaluate_humaneval_x(o);
  ASSERT_EQ(r.results.size(), 30u);
  for (const SampleResult& s : r.results)
    EXPECT_EQ(s.outcome, Outcome::kPassed) << s.task_id << ": " << s.excerpt;
  EXPECT_EQ(*r.overall_pass_at_k[0].value, 1.0);
  EXPECT_FALSE(r.overall_pass_at_k[1].value.has_value());  // n = 1 < 10: not reported

  char tmpl[] = "/tmp/loom-eval-report-XXXXXX";
  const fs::path out = mkdtemp(tmpl);
  write_report(r, out);
  std::ifstream results(out / "results.jsonl");
  std::string first;
  std::getline(results, first);
  const json j = json::parse(first);
  EXPECT_EQ(j["task_id"], "Python/0");
  EXPECT_EQ(j["outcome"], "passed");
  EXPECT_EQ(j["passed"], true);
  const json summary = json::parse(std::ifstream(out / "summary.json"));
  EXPECT_EQ(summary["languages"]["go"]["pass_at_k"]["pass@1"], 1.0);
  EXPECT_TRUE(summary["languages"]["go"]["pass_at_k"]["pass@10"].is_null());
  EXPECT_EQ(summary["overall"]["pass@1"], 1.0);
  fs::remove_all(out);
  EXPECT_NE(format_table(r).find("all"), std::string::npos);
}

// Hostile generations for Python/0 (def add(a, b)) and CPP/0 (int add(int a,int b){), each
// with the outcome the harness must report. The escape targets are reachable from this test
// process, so each check would fail without the sandbox.
struct Hostile {
  std::string task_id;
  std::string what;
  std::string generation;
  std::vector<Outcome> allowed;
};

std::vector<Hostile> hostile_samples(int port, const std::string& py_file,
                                     const std::string& cpp_file) {
  const std::string pid = std::to_string(getpid()), pgid = std::to_string(getpgrp());
  const std::string p = std::to_string(port);
  const Outcome V = Outcome::kSandboxViolation, T = Outcome::kTimeout, R = Outcome::kRuntimeError;
  return {
      {"Python/0", "infinite loop", "    while True:\n        pass\n", {T}},
      // The forks fail with EAGAIN at the process limit and the program dies of it (or spins
      // until the timeout, if its own fork never fails): contained either way.
      {"Python/0", "fork bomb", "    import os\n    while True:\n        os.fork()\n", {V, T}},
      {"Python/0", "allocate 10 GB", "    x = bytearray(10 * 2**30)\n    return a + b\n", {V}},
      {"Python/0", "write outside",
       "    open('" + py_file + "', 'w').write('x')\n    return a + b\n", {V}},
      {"Python/0", "connect to 127.0.0.1",
       "    import socket\n    socket.create_connection(('127.0.0.1', " + p +
           "), timeout=1)\n    return a + b\n",
       {V}},
      {"Python/0", "kill parent process group",
       "    import os, signal\n"
       "    for f in (lambda: os.kill(" + pid + ", 9), lambda: os.killpg(" + pgid +
           ", 9), lambda: os.kill(os.getppid(), 9), lambda: os.kill(-1, 9)):\n"
           "        try:\n            f()\n        except OSError:\n            pass\n"
           "    os.killpg(0, signal.SIGKILL)\n",
       {R}},
      {"Python/0", "print 1 GB",
       "    import sys\n    for _ in range(16384):\n        sys.stdout.write('x' * 65536)\n"
       "    return a + b\n",
       {V}},
      {"Python/0", "correct (after the hostiles)", "    return a + b\n", {Outcome::kPassed}},
      {"CPP/0", "infinite loop", "    volatile long x=0;\n    while(true){x++;}\n}\n", {T}},
      {"CPP/0", "fork bomb",
       "    return a+b;\n}\n#include<unistd.h>\n"
       "static int bomb = [](){ while(true) fork(); return 0; }();\n",
       {T, V}},
      {"CPP/0", "allocate 10 GB",
       "    std::vector<char> v(10LL<<30, 1);\n    return a+b+v[5]-1;\n}\n", {V}},
      {"CPP/0", "write outside",
       "    FILE* f=fopen(\"" + cpp_file + "\",\"w\");\n    if(!f){perror(\"fopen\");abort();}\n"
       "    fputs(\"x\",f);\n    fclose(f);\n    return a+b;\n}\n",
       {V}},
      {"CPP/0", "connect to 127.0.0.1",
       "    return a+b;\n}\n#include<sys/socket.h>\n#include<netinet/in.h>\n#include<arpa/inet.h>\n"
       "static int net = [](){\n  int s=socket(AF_INET,SOCK_STREAM,0);\n  sockaddr_in a{};\n"
       "  a.sin_family=AF_INET;\n  a.sin_port=htons(" + p + ");\n"
       "  a.sin_addr.s_addr=htonl(INADDR_LOOPBACK);\n"
       "  if(connect(s,(sockaddr*)&a,sizeof a)!=0){perror(\"connect\");abort();}\n"
       "  return 0;\n}();\n",
       {V}},
      {"CPP/0", "kill parent process group",
       "    return a+b;\n}\n#include<signal.h>\n#include<unistd.h>\n"
       "static int k = [](){ kill(" + pid + ",SIGKILL); kill(-" + pgid +
           ",SIGKILL); kill(getppid(),SIGKILL); kill(-1,SIGKILL); kill(0,SIGKILL); return 0; }();\n",
       {R}},
      {"CPP/0", "print 1 GB",
       "    static char buf[65536];\n    memset(buf,'x',sizeof buf);\n"
       "    for(long i=0;i<16384;i++) fwrite(buf,1,sizeof buf,stdout);\n    return a+b;\n}\n",
       {V}},
      {"CPP/0", "correct (after the hostiles)", "    return a+b;\n}\n", {Outcome::kPassed}},
  };
}

TEST(Harness, HostileSamplesAreContainedAndTheRunGoesOn) {
  REQUIRE_SANDBOX();
  // A listener the samples would reach without the network namespace.
  const int s = socket(AF_INET, SOCK_STREAM, 0);
  ASSERT_GE(s, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(bind(s, reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
  ASSERT_EQ(listen(s, 16), 0);
  socklen_t len = sizeof a;
  getsockname(s, reinterpret_cast<sockaddr*>(&a), &len);
  const std::string tag = std::to_string(getpid());
  const fs::path py_file = "/tmp/loom-hostile-py-" + tag, cpp_file = "/tmp/loom-hostile-cpp-" + tag;
  const auto hostiles = hostile_samples(ntohs(a.sin_port), py_file, cpp_file);

  char tmpl[] = "/tmp/loom-eval-hostile-XXXXXX";
  const fs::path dir = mkdtemp(tmpl);
  {
    std::ofstream out(dir / "hostile.jsonl");
    for (const Hostile& h : hostiles)
      out << json{{"task_id", h.task_id}, {"generation", h.generation}}.dump() << "\n";
  }
  HarnessOptions o = base_options();
  o.problem_files = {kData / "humaneval_python.jsonl", kData / "humaneval_cpp.jsonl"};
  o.samples_file = dir / "hostile.jsonl";
  o.timeout_seconds = 2.0;
  o.ks = {1};
  const EvalReport r = evaluate_humaneval_x(o);
  close(s);
  fs::remove_all(dir);

  // Results come in problem order (Python/0 then CPP/0), samples in file order.
  ASSERT_EQ(r.results.size(), hostiles.size());
  for (size_t i = 0; i < hostiles.size(); ++i) {
    const Hostile& h = hostiles[i];
    const SampleResult& res = r.results[i];
    ASSERT_EQ(res.task_id, h.task_id);
    std::printf("hostile %-9s %-28s -> %-17s %.70s\n", h.task_id.c_str(), h.what.c_str(),
                std::string(outcome_name(res.outcome)).c_str(),
                res.excerpt.substr(0, res.excerpt.find('\n')).c_str());
    EXPECT_NE(std::find(h.allowed.begin(), h.allowed.end(), res.outcome), h.allowed.end())
        << h.task_id << " " << h.what << ": got " << outcome_name(res.outcome) << ": "
        << res.excerpt;
  }
  EXPECT_FALSE(fs::exists(py_file));
  EXPECT_FALSE(fs::exists(cpp_file));
}

TEST(Harness, TasksThatCannotRunHereAreSkippedWithAReason) {
  REQUIRE_SANDBOX();
  char tmpl[] = "/tmp/loom-eval-skip-XXXXXX";
  const fs::path dir = mkdtemp(tmpl);
  {
    std::ofstream(dir / "humaneval_js.jsonl")
        << json{{"task_id", "JavaScript/162"},
                {"prompt", "const stringToMd5 = (text) => {\n"},
                {"canonical_solution",
                 "  if (text == '') { return null }\n  var md5 = require('js-md5')\n"
                 "  return md5(text)\n}\n"},
                {"test", "console.assert(stringToMd5('') === null)\n"}}
               .dump()
        << "\n";
    std::ofstream(dir / "humaneval_rust.jsonl")
        << json{{"task_id", "Rust/0"},
                {"prompt", "fn f() -> i32 {\n"},
                {"declaration", "use rand::Rng;\n"},
                {"canonical_solution", "1\n}\n"},
                {"test", "#[cfg(test)]\nmod tests {}\n"}}
               .dump()
        << "\n";
  }
  HarnessOptions o = base_options();
  o.problem_files = {dir / "humaneval_js.jsonl", dir / "humaneval_rust.jsonl"};
  o.canonical = true;
  o.ks = {1};
  o.toolchains.node_module_dirs = {(dir / "node_modules").string()};  // js-md5 absent
  const EvalReport r = evaluate_humaneval_x(o);
  fs::remove_all(dir);
  ASSERT_EQ(r.results.size(), 2u);
  EXPECT_EQ(r.results[0].outcome, Outcome::kSkipped);
  EXPECT_NE(r.results[0].excerpt.find("npm package 'js-md5'"), std::string::npos);
  EXPECT_EQ(r.results[1].outcome, Outcome::kSkipped);
  EXPECT_NE(r.results[1].excerpt.find("rand, regex and md5"), std::string::npos)
      << r.results[1].excerpt;
  // Skipped samples are not counted: no problem ran, so no pass@k, and the table says why.
  EXPECT_FALSE(r.overall_pass_at_k[0].value.has_value());
  const std::string table = format_table(r);
  EXPECT_NE(table.find("warning: JavaScript/162: skipped"), std::string::npos) << table;
  EXPECT_NE(table.find("Rust execution is not implemented"), std::string::npos) << table;
}

TEST(Harness, BadOptionsAreRejectedBeforeAnythingRuns) {
  HarnessOptions o = base_options();
  o.samples_file = kData / "samples.jsonl";
  o.canonical = true;
  EXPECT_THROW(evaluate_humaneval_x(o), loom::Error);  // both
  o.samples_file.clear();
  o.canonical = false;
  EXPECT_THROW(evaluate_humaneval_x(o), loom::Error);  // neither
  o.canonical = true;
  o.toolchains.go = "/nonexistent/go";
  try {
    evaluate_humaneval_x(o);
    ADD_FAILURE() << "missing Go was not reported";
  } catch (const loom::Error& e) {
    EXPECT_NE(std::string(e.what()).find("golang-go"), std::string::npos) << e.what();
  }
  // --lang drops Go, so its missing toolchain no longer matters... but an empty selection
  // is an error of its own.
  o.problem_files = {kData / "humaneval_go.jsonl"};
  o.languages = {Language::kPython};
  EXPECT_THROW(evaluate_humaneval_x(o), loom::Error);
}

}  // namespace
