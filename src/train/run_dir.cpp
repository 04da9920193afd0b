// train/run_dir.cpp: run-directory guards (see run_dir.h).
#include "train/run_dir.h"

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <utility>

#include <nlohmann/json.hpp>

#include "core/error.h"

namespace loom::train {

namespace fs = std::filesystem;

namespace {
constexpr const char* kLockName = ".loom.lock";
}

void check_run_dir_free(const std::string& run_dir, bool resuming, bool overwrite) {
  if (resuming || overwrite) return;
  std::error_code ec;
  if (!fs::is_directory(run_dir, ec)) return;
  std::string found;
  for (const auto& e : fs::directory_iterator(run_dir, ec)) {
    const std::string name = e.path().filename().string();
    if (name == "metrics.jsonl" || name.starts_with("ckpt")) {
      found = name;
      break;
    }
  }
  LOOM_CHECK(found.empty(),
             "run directory '{}' already holds a run ('{}' exists); pass --resume {}/ckpt to "
             "continue it, --overwrite to replace it, or choose another --out",
             run_dir, found, run_dir);
}

RunDirLock::RunDirLock(const std::string& run_dir) {
  std::error_code ec;
  fs::create_directories(run_dir, ec);
  LOOM_CHECK(!ec, "cannot create run directory '{}': {}", run_dir, ec.message());
  const std::string path = run_dir + "/" + kLockName;
  const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  LOOM_CHECK(fd >= 0, "cannot open lock file '{}': {}", path, std::strerror(errno));
  if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
    const int err = errno;
    char holder[256] = {};
    const ssize_t n = ::pread(fd, holder, sizeof(holder) - 1, 0);
    ::close(fd);
    std::string who = n > 0 ? std::string(holder, size_t(n)) : std::string("another process");
    while (!who.empty() && (who.back() == '\n' || who.back() == ' ')) who.pop_back();
    LOOM_CHECK(err != EWOULDBLOCK,
               "run directory '{}' is in use by {} (lock '{}'); wait for that run to end or "
               "choose another --out",
               run_dir, who, path);
    LOOM_FAIL("cannot lock '{}': {}", path, std::strerror(err));
  }
  char host[256] = {};
  ::gethostname(host, sizeof(host) - 1);
  const std::string me = "loom train pid " + std::to_string(::getpid()) + " on " + host + "\n";
  if (::ftruncate(fd, 0) == 0 && ::pwrite(fd, me.data(), me.size(), 0) < 0) {
    // The text is only for the message above; the lock itself is what matters.
  }
  fd_ = fd;
}

RunDirLock::~RunDirLock() {
  if (fd_ >= 0) ::close(fd_);  // closing the descriptor releases the flock
}

RunDirLock::RunDirLock(RunDirLock&& other) noexcept : fd_(std::exchange(other.fd_, -1)) {}

RunDirLock& RunDirLock::operator=(RunDirLock&& other) noexcept {
  if (this != &other) {
    if (fd_ >= 0) ::close(fd_);
    fd_ = std::exchange(other.fd_, -1);
  }
  return *this;
}

RunDirLock claim_run_dir(const std::string& run_dir, bool resuming, bool overwrite,
                         bool take_lock) {
  if (run_dir.empty()) return {};
  if (!take_lock) {
    check_run_dir_free(run_dir, resuming, overwrite);
    return {};
  }
  // Lock first: a second run must be told the directory is in use, not that it holds a run.
  RunDirLock lock(run_dir);
  check_run_dir_free(run_dir, resuming, overwrite);
  return lock;
}

int64_t truncate_metrics(const std::string& path, int64_t step) {
  std::ifstream in(path);
  if (!in.good()) return 0;
  std::string kept, line;
  int64_t removed = 0;
  bool cut = false;
  while (std::getline(in, line)) {
    if (cut) {
      ++removed;
      continue;
    }
    nlohmann::json j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded() || !j.is_object() || !j.contains("step") ||
        !j["step"].is_number_integer() || j["step"].get<int64_t>() > step) {
      cut = true;  // a torn line, or the first step past the checkpoint: drop it and the rest
      ++removed;
      continue;
    }
    kept += line;
    kept += '\n';
  }
  in.close();
  if (removed == 0) return 0;
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::trunc);
    out << kept;
    out.flush();
    LOOM_CHECK(out.good(), "cannot write '{}'", tmp);
  }
  std::error_code ec;
  fs::rename(tmp, path, ec);
  LOOM_CHECK(!ec, "cannot replace '{}': {}", path, ec.message());
  return removed;
}

}  // namespace loom::train
