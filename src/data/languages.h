// data/languages.h: the programming languages the corpus builder knows, by stable id.
//
// Glossary: a *language id* is the integer stored per document in token shards (the sparse
// expert router reads it), so the numbering below is part of the shard format: append new
// languages at the end, never reorder. A *tag line* is CodeGeeX's language prefix, written in
// the language's own comment syntax without a trailing newline, e.g. "# language: Python" or
// "// language: C++"; the corpus builder puts it (plus "\n") before every document.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace loom::data {

enum class Language : int32_t {
  kPython = 0,
  kC = 1,
  kCpp = 2,
  kJava = 3,
  kJavaScript = 4,
  kGo = 5,
  kRust = 6,
  kShell = 7,
  kTypeScript = 8,
};
inline constexpr int32_t kNumLanguages = 9;
// Language id of a document whose language is not known (synthetic data, foreign shards).
inline constexpr int32_t kUnknownLanguage = -1;

// All languages in id order.
std::vector<Language> all_languages();
// Display name as CodeGeeX writes it in the tag line: "Python", "C++", "JavaScript", ...
std::string_view language_name(Language lang);
// Inverse of language_name (case-sensitive); nullopt for an unknown name.
std::optional<Language> language_from_name(std::string_view name);
// "# language: Python", "// language: Go" (no newline).
std::string language_tag_line(Language lang);
// Language of a file from its extension (".py", ".cc", ...) or, for files without a known
// extension, from a shebang first line ("#!/usr/bin/env python3", "#!/bin/sh"). `first_line` may
// be empty. Returns nullopt for anything else (the builder counts those as unknown_language).
std::optional<Language> detect_language(std::string_view path, std::string_view first_line);

}  // namespace loom::data
