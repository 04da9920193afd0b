// core/config_file.h: reading a user-named text file (a TOML config) with errors that say which.
//
// read_config_file(path, what) returns the file's bytes, or throws loom::Error naming `what` and
// the path when it does not exist, is a directory or another non-regular file (a directory
// opens as an empty stream, and a config read from it fails later with a misleading "missing
// key"), or cannot be read.
#pragma once

#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

#include "core/error.h"

namespace loom {

inline std::string read_config_file(const std::string& path, const char* what) {
  std::error_code ec;
  const auto st = std::filesystem::status(path, ec);
  LOOM_CHECK(std::filesystem::exists(st), "{} '{}' does not exist", what, path);
  LOOM_CHECK(!std::filesystem::is_directory(st),
             "{} '{}' is a directory; pass a TOML file (for example one under configs/)", what,
             path);
  LOOM_CHECK(std::filesystem::is_regular_file(st), "{} '{}' is not a regular file", what, path);
  std::ifstream f(path, std::ios::binary);
  LOOM_CHECK(f.good(), "cannot open {} '{}': not readable", what, path);
  std::stringstream ss;
  ss << f.rdbuf();
  LOOM_CHECK(!f.bad(), "cannot read {} '{}'", what, path);
  return ss.str();
}

}  // namespace loom
