// Tests for pass@k, problem/sample loading (including every bad-input case) and program
// assembly. No programs run here.
#include <gtest/gtest.h>
#include <zlib.h>

#include <cmath>
#include <filesystem>
#include <fstream>

#include "core/error.h"
#include "eval/languages.h"
#include "eval/pass_at_k.h"
#include "eval/problems.h"
#include "eval/program.h"

namespace fs = std::filesystem;
using namespace loom::eval;

namespace {

const fs::path kData = LOOM_EVAL_TEST_DATA;

std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const loom::Error& e) {
    return e.what();
  }
  return "(no error)";
}

class TempDir {
 public:
  TempDir() {
    char tmpl[] = "/tmp/loom-eval-core-XXXXXX";
    path_ = mkdtemp(tmpl);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  fs::path write(const std::string& name, const std::string& text) const {
    std::ofstream(path_ / name) << text;
    return path_ / name;
  }
  const fs::path& path() const { return path_; }

 private:
  fs::path path_;
};

// ---- pass@k ------------------------------------------------------------------------------

// Reference: 1 - C(n-c, k) / C(n, k) with binomials from lgamma, in long double.
double pass_at_k_lgamma(int64_t n, int64_t c, int64_t k) {
  if (n - c < k) return 1.0;
  auto lbinom = [](long double a, long double b) {
    return std::lgamma(a + 1) - std::lgamma(b + 1) - std::lgamma(a - b + 1);
  };
  return double(1.0L - std::exp(lbinom(n - c, k) - lbinom(n, k)));
}

TEST(PassAtK, ClosedFormsOnHandMadeCounts) {
  // Products of a few exactly representable-or-nearly ratios: 1e-15 is a few ulps of 1.
  EXPECT_NEAR(pass_at_k(10, 3, 1), 0.3, 1e-15);        // 1 - 7/8*8/9*9/10
  EXPECT_NEAR(pass_at_k(5, 2, 2), 0.7, 1e-15);         // 1 - C(3,2)/C(5,2) = 1 - 3/10
  EXPECT_NEAR(pass_at_k(4, 1, 2), 0.5, 1e-15);         // 1 - C(3,2)/C(4,2) = 1 - 3/6
  EXPECT_EQ(pass_at_k(7, 0, 1), 0.0);                  // c = 0: nobody passes
  EXPECT_EQ(pass_at_k(7, 0, 7), 0.0);                  // c = 0 and n = k
  EXPECT_EQ(pass_at_k(7, 7, 3), 1.0);                  // c = n
  EXPECT_EQ(pass_at_k(6, 1, 6), 1.0);                  // n = k, c >= 1: n - c < k
  EXPECT_EQ(pass_at_k(1, 1, 1), 1.0);
  EXPECT_EQ(pass_at_k(1, 0, 1), 0.0);
  EXPECT_NEAR(pass_at_k(3, 1, 1), 1.0 / 3.0, 1e-15);   // pass@1 is c/n
}

TEST(PassAtK, MatchesBinomialFormOnPaperSizes) {
  // n = 200 as in the CodeGeeX paper. lgamma of ~200 carries ~1e-16 relative error per term
  // in long double; 1e-12 absolute bounds the difference of the two forms comfortably.
  for (int64_t c : {0, 1, 5, 37, 100, 150, 199, 200})
    for (int64_t k : {1, 10, 100})
      EXPECT_NEAR(pass_at_k(200, c, k), pass_at_k_lgamma(200, c, k), 1e-12)
          << "c=" << c << " k=" << k;
}

TEST(PassAtK, RejectsImpossibleCounts) {
  EXPECT_THROW(pass_at_k(3, 4, 1), loom::Error);
  EXPECT_THROW(pass_at_k(3, 1, 4), loom::Error);
  EXPECT_THROW(pass_at_k(3, 1, 0), loom::Error);
  EXPECT_THROW(pass_at_k(0, 0, 1), loom::Error);
}

TEST(PassAtK, MeanOverProblemsAndMissingK) {
  const std::vector<std::pair<int64_t, int64_t>> counts{{3, 0}, {3, 3}, {3, 1}};
  EXPECT_NEAR(*mean_pass_at_k(counts, 1), (0.0 + 1.0 + 1.0 / 3.0) / 3.0, 1e-15);
  EXPECT_NEAR(*mean_pass_at_k(counts, 3), (0.0 + 1.0 + 1.0) / 3.0, 1e-15);
  EXPECT_FALSE(mean_pass_at_k(counts, 4).has_value());  // a problem has n < k
  EXPECT_FALSE(mean_pass_at_k({}, 1).has_value());
}

// ---- loading and bad input ---------------------------------------------------------------

TEST(Problems, LoadsLoomProblemSet) {
  const ProblemSet set = ProblemSet::load(
      {kData / "humaneval_python.jsonl", kData / "humaneval_cpp.jsonl",
       kData / "humaneval_java.jsonl", kData / "humaneval_js.jsonl", kData / "humaneval_go.jsonl"});
  EXPECT_EQ(set.problems().size(), 30u);
  const Problem* go = set.find("Go/1");
  ASSERT_NE(go, nullptr);
  EXPECT_EQ(go->language, Language::kGo);
  EXPECT_NE(go->import_block.find("strings"), std::string::npos);
  EXPECT_EQ(set.find("Go/99"), nullptr);
}

TEST(Problems, ReadsGzip) {
  TempDir t;
  const std::string text = read_file_maybe_gz(kData / "humaneval_go.jsonl");
  const fs::path gz = t.path() / "humaneval_go.jsonl.gz";
  gzFile f = gzopen(gz.c_str(), "wb");
  ASSERT_NE(f, nullptr);
  ASSERT_EQ(gzwrite(f, text.data(), unsigned(text.size())), int(text.size()));
  gzclose(f);
  EXPECT_EQ(read_file_maybe_gz(gz), text);
  EXPECT_EQ(ProblemSet::load({gz}).problems().size(), 6u);
  const fs::path fake = t.write("fake.jsonl.gz", "not gzip at all\n");
  // zlib reads a non-gzip stream as plain bytes ("transparent" mode); what matters is that
  // the JSON error then names the file and line.
  EXPECT_NE(error_of([&] { ProblemSet::load({fake}); }).find("fake.jsonl.gz:1: malformed JSON"),
            std::string::npos);
}

TEST(Problems, BadInputNamesFileLineAndFix) {
  TempDir t;
  EXPECT_NE(error_of([&] { ProblemSet::load({t.path() / "nope.jsonl"}); }).find("does not exist"),
            std::string::npos);
  const std::string good =
      R"({"task_id": "Python/0", "prompt": "def f():\n", "canonical_solution": "  return 1\n", "test": "assert f() == 1\n"})";
  const fs::path bad_json = t.write("bad.jsonl", good + "\n{\"task_id\": \"Python/1\",\n");
  EXPECT_NE(error_of([&] { ProblemSet::load({bad_json}); }).find("bad.jsonl:2: malformed JSON"),
            std::string::npos);
  // A number past double's range is not a parse_error but out_of_range (fuzz_humaneval): it
  // must still name the file and line.
  const fs::path huge = t.write("huge.jsonl", good + "\n47E899\n");
  EXPECT_NE(error_of([&] { ProblemSet::load({huge}); }).find("huge.jsonl:2: malformed JSON"),
            std::string::npos);
  const fs::path no_test = t.write(
      "notest.jsonl", R"({"task_id": "Python/0", "prompt": "x", "canonical_solution": "y"})");
  EXPECT_NE(error_of([&] { ProblemSet::load({no_test}); }).find("field 'test' is missing"),
            std::string::npos);
  const fs::path ruby = t.write(
      "ruby.jsonl",
      R"({"task_id": "Ruby/0", "prompt": "x", "canonical_solution": "y", "test": "z"})");
  const std::string e = error_of([&] { ProblemSet::load({ruby}); });
  EXPECT_NE(e.find("ruby.jsonl:1: task_id 'Ruby/0' has an unknown language prefix"),
            std::string::npos) << e;
  EXPECT_NE(e.find("Python, CPP, Java, JavaScript, Go, Rust"), std::string::npos) << e;
  const fs::path dup = t.write("dup.jsonl", good + "\n" + good + "\n");
  EXPECT_NE(error_of([&] { ProblemSet::load({dup}); }).find("already defined at"),
            std::string::npos);
  EXPECT_NE(error_of([&] { ProblemSet::load({t.write("empty.jsonl", "\n\n")}); })
                .find("has no records"),
            std::string::npos);
}

TEST(Samples, IndicesUnknownTasksAndMalformedLines) {
  TempDir t;
  const ProblemSet set = ProblemSet::load({kData / "humaneval_python.jsonl"});
  const fs::path ok = t.write("s.jsonl",
                              "{\"task_id\": \"Python/0\", \"generation\": \"a\"}\n"
                              "{\"task_id\": \"Python/1\", \"generation\": \"b\"}\n"
                              "{\"task_id\": \"Python/0\", \"generation\": \"c\"}\n"
                              "{\"task_id\": \"CPP/0\", \"generation\": \"d\"}\n");
  const auto s = load_samples(ok, set, {Language::kPython});  // CPP/0 filtered out by --lang
  ASSERT_EQ(s.size(), 3u);
  EXPECT_EQ(s[2].task_id, "Python/0");
  EXPECT_EQ(s[2].index, 1);
  EXPECT_EQ(s[2].line, 3);
  // Without the filter, CPP/0 is a sample for a task that was not loaded.
  EXPECT_NE(error_of([&] { load_samples(ok, set, {}); })
                .find("s.jsonl:4: sample for task 'CPP/0', which is not in the problem files"),
            std::string::npos);
  const fs::path unknown =
      t.write("u.jsonl", "{\"task_id\": \"Python/77\", \"generation\": \"a\"}\n");
  EXPECT_NE(error_of([&] { load_samples(unknown, set, {}); }).find("u.jsonl:1"),
            std::string::npos);
  const fs::path broken = t.write(
      "b.jsonl", "{\"task_id\": \"Python/0\", \"generation\": \"a\"}\n\n{oops}\n");
  EXPECT_NE(error_of([&] { load_samples(broken, set, {}); }).find("b.jsonl:3: malformed JSON"),
            std::string::npos);
  const fs::path nogen = t.write("n.jsonl", "{\"task_id\": \"Python/0\", \"completion\": \"a\"}\n");
  EXPECT_NE(error_of([&] { load_samples(nogen, set, {}); }).find("'generation'"),
            std::string::npos);
}

TEST(Languages, ParseNamesAndRejectUnknown) {
  EXPECT_EQ(parse_language("C++"), Language::kCpp);
  EXPECT_EQ(parse_language("JavaScript"), Language::kJavaScript);
  EXPECT_EQ(parse_language("golang"), Language::kGo);
  EXPECT_EQ(parse_language("PYTHON"), Language::kPython);
  EXPECT_NE(error_of([] { parse_language("cobol"); })
                .find("unknown language 'cobol'; choose one of python, cpp, java, js, go, rust"),
            std::string::npos);
}

TEST(Languages, MissingToolchainNamesThePackage) {
  ToolchainPaths p;
  p.go = "/nonexistent/go";
  EXPECT_NE(error_of([&] { resolve_toolchain(Language::kGo, p); }).find("install the Debian "
                                                                        "package golang-go"),
            std::string::npos);
  p.javac = "loom-no-such-javac";
  EXPECT_NE(error_of([&] { resolve_toolchain(Language::kJava, p); })
                .find("'loom-no-such-javac' not found on PATH; install the Debian package "
                      "default-jdk-headless"),
            std::string::npos);
  p.gocode = "/nonexistent/gocode";
  p.go = "go";
  if (resolve_toolchain(Language::kCpp, {}).tools.empty()) GTEST_SKIP() << "SKIP: no g++";
  EXPECT_NE(error_of([&] { resolve_toolchain(Language::kGo, p); })
                .find("golang-github-stretchr-testify-dev"),
            std::string::npos);
  p.node = "";
  EXPECT_NE(error_of([&] { resolve_toolchain(Language::kJavaScript, p); }).find("nodejs"),
            std::string::npos);
}

// ---- program assembly --------------------------------------------------------------------

Problem problem(const std::string& id, const std::string& prompt, const std::string& test) {
  Problem p;
  p.task_id = id;
  p.language = *language_of_task(id);
  p.prompt = prompt;
  p.test = test;
  return p;
}

TEST(Program, PythonCutsAtFirstUnindentedLine) {
  EXPECT_EQ(truncate_python_generation("    return 1\n\n    # tail\nprint(2)\n    x"),
            "    return 1\n\n    # tail");
  EXPECT_EQ(truncate_python_generation("\treturn 1\n"), "\treturn 1\n");
  EXPECT_EQ(truncate_python_generation("def g():\n    pass\n"), "");
  const Program p = assemble_program(problem("Python/3", "def f():\n", "check(f)"),
                                     "    return 1\nif __name__ == '__main__':\n    pass\n");
  EXPECT_EQ(p.file_name, "main.py");
  EXPECT_EQ(p.source.rfind("import math\nimport re\n", 0), 0u);
  EXPECT_NE(p.source.find("import numpy as np\nimport string\nfrom typing import *\n"
                          "from collections import *\ndef f():\n    return 1\ncheck(f)\n"),
            std::string::npos);
  EXPECT_EQ(p.source.find("__main__"), std::string::npos);
}

TEST(Program, CppAddsMissingHelperIncludesAnd162Flags) {
  const Program p = assemble_program(
      problem("CPP/7", "#include<stdio.h>\n#include<vector>\nint f(){\n", "int main(){}\n"),
      "return 1;}\n");
  EXPECT_EQ(p.source.rfind("#include<stdlib.h>\n#include<algorithm>\n#include<math.h>\n"
                           "#include<string>\n#include<climits>\n#include<cstring>\n"
                           "#include<iostream>\n\n#include<stdio.h>\n#include<vector>\nint f(){\n"
                           "return 1;}\n\nint main(){}\n",
                           0),
            0u)
      << p.source;
  EXPECT_TRUE(p.link_flags.empty());
  const Program q = assemble_program(
      problem("CPP/162", "#include<openssl/md5.h>\nstring f(){\n", "int main(){}\n"), "}\n");
  EXPECT_EQ(q.link_flags, (std::vector<std::string>{"-lcrypto", "-lssl"}));
  EXPECT_EQ(q.requirements, (std::vector<std::string>{"header:openssl/md5.h"}));
  ToolchainPaths paths;
  paths.include_dir = "/nonexistent";
  EXPECT_NE(missing_requirement(q, paths).find("libssl-dev"), std::string::npos);
}

TEST(Program, GoStripsPromptImportsAndAddsUsedHelpers) {
  Problem p = problem("Go/4", "import (\n    \"strings\"\n)\n\nfunc F(s string) int {\n",
                      "func TestF(t *testing.T) {}\n");
  p.import_block = "import (\n    \"strings\"\n)\n";
  p.test_setup = "package main\n\nimport (\n    \"testing\"\n)\n";
  const Program prog =
      assemble_program(p, "    return len(strings.TrimSpace(s)) + int(math.Sqrt(4))\n}\n");
  EXPECT_EQ(prog.source,
            "package main\n\nimport (\n    \"testing\"\n)\n\nimport (\n\"math\"\n    \"strings\"\n)"
            "\n\nfunc F(s string) int {\n    return len(strings.TrimSpace(s)) + "
            "int(math.Sqrt(4))\n}\n\nfunc TestF(t *testing.T) {}\n");
  EXPECT_TRUE(prog.notes.empty());
  // "fmt." only in a comment: imported anyway (the official rule), and flagged as a trap.
  const Program trap = assemble_program(p, "    // fmt.Println(s)\n    return 0\n}\n");
  ASSERT_EQ(trap.notes.size(), 1u);
  EXPECT_NE(trap.notes[0].find("\"fmt\" is imported"), std::string::npos);
}

TEST(Program, JavaScriptRequiresAndKnownDefects) {
  const Program p = assemble_program(
      problem("JavaScript/162", "const f = (s) => {\n", "f()\n"),
      "  const md5 = require('js-md5')\n  return md5(s)\n}\n");
  EXPECT_EQ(p.requirements, (std::vector<std::string>{"npm:js-md5"}));
  ToolchainPaths paths;
  paths.node_module_dirs = {"/nonexistent"};
  EXPECT_NE(missing_requirement(p, paths).find("npm package 'js-md5'"), std::string::npos);
  const Program d = assemble_program(problem("JavaScript/155", "x", "y"), "z");
  EXPECT_NE(d.notes[0].find("known dataset defect"), std::string::npos);
}

TEST(Program, JavaAndRustLayouts) {
  const Program j = assemble_program(problem("Java/0", "class Solution {\n", "public class Main {}\n"),
                                     "}\n");
  EXPECT_EQ(j.file_name, "Main.java");
  EXPECT_EQ(j.source, "class Solution {\n}\n\npublic class Main {}\n");
  Problem r = problem("Rust/0", "fn f() -> i32 {\n", "#[cfg(test)]\nmod tests {}\n");
  r.declaration = "use rand::Rng;\n";
  const Program rp = assemble_program(r, "1\n}\n");
  EXPECT_EQ(rp.source, "\nfn main(){ \n } \nuse rand::Rng;\nfn f() -> i32 {\n1\n}\n#[cfg(test)]\n"
                       "mod tests {}\n");
}

}  // namespace
