// data/languages.cpp: language table (names, comment syntax, extensions) and detection.
#include "data/languages.h"

#include <algorithm>
#include <array>

#include "core/error.h"

namespace loom::data {

namespace {

struct LanguageInfo {
  Language lang;
  std::string_view name;
  std::string_view comment;  // line-comment marker used for the tag line
  std::array<std::string_view, 6> extensions;  // lower-case, with the dot; empty = unused
};

// The order matches the enum values (checked by lookup()).
constexpr std::array<LanguageInfo, kNumLanguages> kLanguages = {{
    {Language::kPython, "Python", "#", {".py", ".pyi", ".pyw"}},
    {Language::kC, "C", "//", {".c", ".h"}},
    {Language::kCpp, "C++", "//", {".cc", ".cpp", ".cxx", ".hpp", ".hh", ".hxx"}},
    {Language::kJava, "Java", "//", {".java"}},
    {Language::kJavaScript, "JavaScript", "//", {".js", ".mjs", ".cjs", ".jsx"}},
    {Language::kGo, "Go", "//", {".go"}},
    {Language::kRust, "Rust", "//", {".rs"}},
    {Language::kShell, "Shell", "#", {".sh", ".bash", ".zsh", ".ksh"}},
    {Language::kTypeScript, "TypeScript", "//", {".ts", ".tsx"}},
}};

const LanguageInfo& lookup(Language lang) {
  const auto i = static_cast<int32_t>(lang);
  LOOM_CHECK(i >= 0 && i < kNumLanguages, "language id {} out of range [0, {})", i,
             kNumLanguages);
  LOOM_ASSERT(kLanguages[i].lang == lang, "language table out of order at {}", i);
  return kLanguages[i];
}

std::string lower(std::string_view s) {
  std::string out(s);
  std::transform(out.begin(), out.end(), out.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return out;
}

}  // namespace

std::vector<Language> all_languages() {
  std::vector<Language> out;
  for (const auto& info : kLanguages) out.push_back(info.lang);
  return out;
}

std::string_view language_name(Language lang) { return lookup(lang).name; }

std::optional<Language> language_from_name(std::string_view name) {
  for (const auto& info : kLanguages)
    if (info.name == name) return info.lang;
  return std::nullopt;
}

std::string language_tag_line(Language lang) {
  const auto& info = lookup(lang);
  return std::string(info.comment) + " language: " + std::string(info.name);
}

std::optional<Language> detect_language(std::string_view path, std::string_view first_line) {
  const size_t slash = path.find_last_of('/');
  const std::string_view base = slash == std::string_view::npos ? path : path.substr(slash + 1);
  const size_t dot = base.find_last_of('.');
  if (dot != std::string_view::npos && dot > 0) {
    const std::string ext = lower(base.substr(dot));
    for (const auto& info : kLanguages)
      for (std::string_view e : info.extensions)
        if (!e.empty() && e == ext) return info.lang;
    return std::nullopt;  // a known-foreign extension (.txt, .pyc) is never sniffed
  }
  // Extensionless scripts: trust an interpreter line only.
  if (first_line.substr(0, 2) != "#!") return std::nullopt;
  if (first_line.find("python") != std::string_view::npos) return Language::kPython;
  if (first_line.find("node") != std::string_view::npos) return Language::kJavaScript;
  for (std::string_view sh : {"/sh", "bash", "zsh", "ksh", "dash"})
    if (first_line.find(sh) != std::string_view::npos) return Language::kShell;
  return std::nullopt;
}

}  // namespace loom::data
