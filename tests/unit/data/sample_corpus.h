// tests/unit/data/sample_corpus.h: small code files that stress tokenizer round trips (tabs,
// CRLF, non-ASCII, long space runs, U+2581, "<|endoftext|>" in text), a training-text generator
// and a scratch-directory helper.
#pragma once

#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <string>
#include <utility>
#include <vector>

#include <fmt/format.h>

namespace loom::data::testing {

// (file name, content)
inline std::vector<std::pair<std::string, std::string>> sample_files() {
  return {
      {"hello.py",
       "import os\n\n\ndef greet(name: str) -> str:\n    \"\"\"Say hi.\"\"\"\n    return f'héllo "
       "{name} ✓ 你好'\n\n\nclass Point:\n    def __init__(self, x, y):\n        self.x = x\n"
       "        self.y = y\n"},
      {"tabs.go",
       "package main\n\nimport \"fmt\"\n\nfunc main() {\n\tfor i := 0; i < 3; i++ {\n\t\tfmt."
       "Println(i)\n\t}\n}\n"},
      {"crlf.c", "#include <stdio.h>\r\n\r\nint main(void) {\r\n  printf(\"hi\\n\");\r\n  return "
                 "0;\r\n}\r\n"},
      {"spaces.js", "const x = 1;" + std::string(40, ' ') + "// forty spaces\n" +
                        std::string(40, ' ') + "return x;\n  \n   \t \n" + std::string(13, ' ') +
                        "end\n"},
      {"odd.rs",
       "fn main() {\n    let s = \"\xE2\x96\x81 lower block ▁▁ and emoji 😀, nbsp\xC2\xA0.\";\n"
       "    println!(\"{}\", s); // <|endoftext|> inside text\n}\n"},
      {"Main.java",
       "public class Main {\n    public static void main(String[] args) {\n        System.out."
       "println(\"Grüße\");\n    }\n}\n"},
      {"run.sh", "#!/bin/sh\nset -eu\nfor f in *.txt; do\n\techo \"$f\"\ndone\n"},
      {"algo.cpp",
       "#include <vector>\n\ntemplate <typename T>\nT sum(const std::vector<T>& v) {\n  T s{};\n"
       "  for (const auto& x : v) s += x;\n  return s;\n}\n"},
  };
}

// ~`copies` variations of simple code in several languages, for training small tokenizers.
inline std::vector<std::string> training_texts(int copies) {
  std::vector<std::string> out;
  for (const auto& [name, content] : sample_files()) out.push_back(content);
  for (int i = 0; i < copies; ++i) {
    out.push_back(fmt::format(
        "# language: Python\ndef f_{0}(x, y={0}):\n    if x > {0}:\n        return x * y\n    "
        "for i in range({0}):\n        x += i\n    return x\n\n\nclass C{0}:\n    def __init__("
        "self):\n        self.v = {0}\n",
        i));
    out.push_back(fmt::format(
        "// language: C++\n#include <vector>\nint g_{0}(int a) {{\n  int s = 0;\n  for (int i = "
        "0; i < a; ++i) {{\n    s += i * {0};\n  }}\n  return s;\n}}\n",
        i));
    out.push_back(fmt::format(
        "// language: Go\nfunc h{0}(n int) int {{\n\tif n < {0} {{\n\t\treturn n\n\t}}\n\treturn "
        "h{0}(n-1) + {0}\n}}\n",
        i));
  }
  return out;
}

// A fresh directory under the system temp dir, removed when the object dies.
class ScratchDir {
 public:
  explicit ScratchDir(const std::string& tag) {
    path_ = (std::filesystem::temp_directory_path() /
             fmt::format("loom_data_{}_{}", tag, ::getpid()))
                .string();
    std::filesystem::remove_all(path_);
    std::filesystem::create_directories(path_);
  }
  ~ScratchDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

// Writes DIR/meta.json listing every train_*.bin / val_*.bin in DIR, as `loom data build` does
// (the loader and `loom data verify` read only the shards meta.json lists).
inline void write_meta_for_shards(const std::string& dir, int64_t vocab) {
  std::vector<std::string> train, val;
  for (const auto& e : std::filesystem::directory_iterator(dir)) {
    const std::string n = e.path().filename().string();
    if (n.ends_with(".bin") && n.starts_with("train_")) train.push_back(n);
    if (n.ends_with(".bin") && n.starts_with("val_")) val.push_back(n);
  }
  std::sort(train.begin(), train.end());
  std::sort(val.begin(), val.end());
  auto list = [](const std::vector<std::string>& v) {
    std::string out = "[";
    for (size_t i = 0; i < v.size(); ++i) out += fmt::format("{}{{\"file\": \"{}\"}}", i ? ", " : "", v[i]);
    return out + "]";
  };
  std::ofstream(dir + "/meta.json") << fmt::format(
      "{{\"format\": \"loom-token-shards\", \"shard_version\": 1, \"tokenizer_dir\": "
      "\"tokenizer\", \"vocab_size\": {}, \"shards\": {{\"train\": {}, \"val\": {}}}}}\n",
      vocab, list(train), list(val));
}

}  // namespace loom::data::testing
