#include "checkpoint/commit.h"

#include <fcntl.h>
#include <openssl/evp.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <optional>
#include <sstream>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/log.h"

namespace fs = std::filesystem;

namespace loom::checkpoint {

namespace {

constexpr size_t kMaxWriteChunk = size_t(64) << 20;

// "K" or "R:K" -> K if it applies to `rank`, else -1. Malformed values are an error: a test that
// meant to inject a fault must not silently run without one.
int64_t parse_fault(const char* var, int rank) {
  const char* v = std::getenv(var);
  if (!v || !*v) return -1;
  std::string s(v);
  int target_rank = -1;
  auto colon = s.find(':');
  try {
    size_t used = 0;
    if (colon != std::string::npos) {
      target_rank = std::stoi(s.substr(0, colon), &used);
      LOOM_CHECK(used == colon, "");
      s = s.substr(colon + 1);
    }
    int64_t k = std::stoll(s, &used);
    LOOM_CHECK(used == s.size() && k >= 1, "");
    return (target_rank < 0 || target_rank == rank) ? k : -1;
  } catch (const std::exception&) {
    LOOM_FAIL("{}='{}' is not a step number: use K or RANK:K with K >= 1 (see "
              "checkpoint/commit.h)", var, v);
  }
}

// (step, k) of "step-0000000N" or "step-0000000N.k"; nullopt for any other name.
std::optional<std::pair<int64_t, int64_t>> parse_step_name(const std::string& name) {
  if (name.rfind("step-", 0) != 0 || name.size() < 6) return std::nullopt;
  std::string rest = name.substr(5), k_part;
  auto dot = rest.find('.');
  if (dot != std::string::npos) {
    k_part = rest.substr(dot + 1);
    rest = rest.substr(0, dot);
    if (k_part.empty()) return std::nullopt;
  }
  auto all_digits = [](const std::string& s) {
    return !s.empty() && s.size() <= 18 &&
           std::all_of(s.begin(), s.end(), [](char c) { return c >= '0' && c <= '9'; });
  };
  if (!all_digits(rest) || (!k_part.empty() && !all_digits(k_part))) return std::nullopt;
  return std::make_pair(std::stoll(rest), k_part.empty() ? int64_t(0) : std::stoll(k_part));
}

std::string strip_slash(std::string p) {
  while (p.size() > 1 && p.back() == '/') p.pop_back();
  return p;
}

std::string parent_of(const std::string& dir) {
  std::string p = fs::path(dir).parent_path().string();
  return p.empty() ? "." : p;
}

bool is_complete_dir(const fs::path& d) {
  std::error_code ec;
  return fs::is_directory(d, ec) && fs::is_regular_file(d / "checksums.json", ec);
}

[[noreturn]] void fail_errno(const std::string& call, const std::string& path, int err) {
  LOOM_FAIL("{} '{}' failed: {}{}", call, path, std::strerror(err),
            err == ENOSPC ? " (the disk is full: free space or choose another checkpoint "
                            "directory)"
                          : "");
}

}  // namespace

ProtocolSteps::ProtocolSteps(int rank) : rank_(rank) {
  kill_at_ = parse_fault("LOOM_CKPT_KILL_AT", rank);
  fail_at_ = parse_fault("LOOM_CKPT_FAIL_AT", rank);
  const char* t = std::getenv("LOOM_CKPT_TRACE");
  trace_ = t && *t && std::string(t) != "0";
}

int ProtocolSteps::next(const char* what, const std::string& path) {
  ++n_;
  if (trace_) std::fprintf(stderr, "ckpt step %lld (rank %d): %s %s\n", (long long)n_, rank_,
                           what, path.c_str());
  if (n_ == kill_at_) {
    std::fflush(stderr);
    ::raise(SIGKILL);
  }
  return n_ == fail_at_ ? ENOSPC : 0;
}

FileDigest digest_file(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  LOOM_CHECK(fd >= 0, "cannot open '{}': {}", path, std::strerror(errno));
  EVP_MD_CTX* ctx = EVP_MD_CTX_new();
  EVP_DigestInit_ex(ctx, EVP_sha256(), nullptr);
  std::vector<char> buf(size_t(1) << 20);
  FileDigest d;
  int err = 0;
  for (;;) {
    ssize_t r = ::read(fd, buf.data(), buf.size());
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) err = errno;
    if (r <= 0) break;
    EVP_DigestUpdate(ctx, buf.data(), size_t(r));
    d.bytes += uint64_t(r);
  }
  ::close(fd);
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  EVP_DigestFinal_ex(ctx, md, &len);
  EVP_MD_CTX_free(ctx);
  LOOM_CHECK(err == 0, "reading '{}' failed: {}", path, std::strerror(err));
  for (unsigned i = 0; i < len; ++i) d.sha256 += fmt::format("{:02x}", md[i]);
  return d;
}

namespace {

std::string finish_hex(void* ctx) {
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  EVP_DigestFinal_ex(static_cast<EVP_MD_CTX*>(ctx), md, &len);
  std::string hex;
  for (unsigned i = 0; i < len; ++i) hex += fmt::format("{:02x}", md[i]);
  return hex;
}

}  // namespace

std::string sha256_hex(const void* data, size_t n) {
  EVP_MD_CTX* ctx = EVP_MD_CTX_new();
  EVP_DigestInit_ex(ctx, EVP_sha256(), nullptr);
  EVP_DigestUpdate(ctx, data, n);
  std::string hex = finish_hex(ctx);
  EVP_MD_CTX_free(ctx);
  return hex;
}

void FileWriter::hash(const char* p, size_t n) {
  EVP_DigestUpdate(static_cast<EVP_MD_CTX*>(sha_), p, n);
  if (block_bytes_ == 0) return;
  auto* b = static_cast<EVP_MD_CTX*>(block_sha_);
  while (n > 0) {
    const size_t take = size_t(std::min<uint64_t>(n, block_bytes_ - in_block_));
    EVP_DigestUpdate(b, p, take);
    p += take;
    n -= take;
    in_block_ += take;
    if (in_block_ == block_bytes_) {
      blocks_.push_back(finish_hex(b));
      EVP_DigestInit_ex(b, EVP_sha256(), nullptr);
      in_block_ = 0;
    }
  }
}

FileWriter::FileWriter(ProtocolSteps& steps, std::string path, size_t buffer_bytes,
                       uint64_t block_bytes)
    : steps_(steps), path_(std::move(path)), buf_(buffer_bytes), block_bytes_(block_bytes) {
  int inj = steps_.next("create", path_);
  if (inj) fail_errno("creating", path_, inj);
  fd_ = ::open(path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd_ < 0) fail_errno("creating", path_, errno);
  EVP_MD_CTX* ctx = EVP_MD_CTX_new();
  EVP_DigestInit_ex(ctx, EVP_sha256(), nullptr);
  sha_ = ctx;
  if (block_bytes_ > 0) {
    EVP_MD_CTX* b = EVP_MD_CTX_new();
    EVP_DigestInit_ex(b, EVP_sha256(), nullptr);
    block_sha_ = b;
  }
}

FileWriter::~FileWriter() {
  if (fd_ >= 0) ::close(fd_);
  if (sha_) EVP_MD_CTX_free(static_cast<EVP_MD_CTX*>(sha_));
  if (block_sha_) EVP_MD_CTX_free(static_cast<EVP_MD_CTX*>(block_sha_));
}

void FileWriter::write_direct(const char* p, size_t n) {
  while (n > 0) {
    size_t chunk = std::min(n, kMaxWriteChunk);
    int inj = steps_.next("write", path_);
    if (inj) fail_errno("writing", path_, inj);
    ssize_t w = ::write(fd_, p, chunk);
    if (w < 0 && errno == EINTR) continue;
    if (w < 0) fail_errno("writing", path_, errno);
    LOOM_CHECK(w > 0, "writing '{}' failed: write(2) wrote 0 bytes", path_);
    p += w;
    n -= size_t(w);
  }
}

void FileWriter::flush() {
  if (used_ > 0) write_direct(buf_.data(), used_);
  used_ = 0;
}

void FileWriter::write(const void* data, size_t n) {
  LOOM_ASSERT(fd_ >= 0, "FileWriter::write after finish() on '{}'", path_);
  const char* p = static_cast<const char*>(data);
  hash(p, n);
  bytes_ += n;
  if (used_ + n <= buf_.size()) {
    std::memcpy(buf_.data() + used_, p, n);
    used_ += n;
    return;
  }
  flush();
  if (n <= buf_.size()) {
    std::memcpy(buf_.data(), p, n);
    used_ = n;
  } else {
    write_direct(p, n);  // large: straight from the caller's memory
  }
}

FileDigest FileWriter::finish() {
  flush();
  int inj = steps_.next("fsync", path_);
  if (inj) fail_errno("fsync of", path_, inj);
  if (::fsync(fd_) != 0) fail_errno("fsync of", path_, errno);
  int rc = ::close(fd_);
  fd_ = -1;
  if (rc != 0) fail_errno("closing", path_, errno);
  FileDigest d;
  d.sha256 = finish_hex(sha_);
  d.bytes = bytes_;
  if (block_bytes_ > 0) {
    if (in_block_ > 0) blocks_.push_back(finish_hex(block_sha_));
    in_block_ = 0;
    d.block_bytes = block_bytes_;
    d.block_sha256 = std::move(blocks_);
  }
  return d;
}

FileDigest write_file(ProtocolSteps& steps, const std::string& path, const std::string& text) {
  FileWriter w(steps, path, text.size() + 1);
  w.write(text.data(), text.size());
  return w.finish();
}

void make_dir(ProtocolSteps& steps, const std::string& path) {
  int inj = steps.next("mkdir", path);
  if (inj) fail_errno("mkdir", path, inj);
  if (::mkdir(path.c_str(), 0755) != 0) fail_errno("mkdir", path, errno);
}

void fsync_dir(ProtocolSteps& steps, const std::string& path) {
  int inj = steps.next("fsync dir", path);
  if (inj) fail_errno("fsync of directory", path, inj);
  int fd = ::open(path.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) fail_errno("opening directory", path, errno);
  int rc = ::fsync(fd);
  int err = errno;
  ::close(fd);
  // Some file systems cannot fsync directories (EINVAL); their renames are then as durable as
  // they get.
  if (rc != 0 && err != EINVAL) fail_errno("fsync of directory", path, err);
}

void rename_path(ProtocolSteps& steps, const std::string& from, const std::string& to) {
  int inj = steps.next("rename", from + " -> " + to);
  if (inj) fail_errno("rename to '" + to + "' of", from, inj);
  if (::rename(from.c_str(), to.c_str()) != 0) fail_errno("rename to '" + to + "' of", from, errno);
}

bool remove_tree(const std::string& path) noexcept {
  std::error_code ec;
  fs::remove_all(path, ec);
  return !ec;
}

void sync_new_files(ProtocolSteps& steps, const std::string& dir,
                    std::map<std::string, FileDigest>& sums) {
  std::vector<fs::path> files, dirs;
  for (auto& e : fs::recursive_directory_iterator(dir)) {
    if (e.is_directory()) dirs.push_back(e.path());
    else if (e.is_regular_file()) files.push_back(e.path());
  }
  std::sort(files.begin(), files.end());
  for (const fs::path& f : files) {
    std::string rel = fs::relative(f, dir).string();
    if (sums.count(rel) || rel == "checksums.json") continue;
    int inj = steps.next("fsync", f.string());
    if (inj) fail_errno("fsync of", f.string(), inj);
    int fd = ::open(f.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) fail_errno("opening", f.string(), errno);
    int rc = ::fsync(fd);
    int err = errno;
    ::close(fd);
    if (rc != 0) fail_errno("fsync of", f.string(), err);
    sums[rel] = digest_file(f.string());
  }
  for (const fs::path& d : dirs) fsync_dir(steps, d.string());
}

void write_checksums(ProtocolSteps& steps, const std::string& dir,
                     const std::map<std::string, FileDigest>& sums) {
  nlohmann::json j = nlohmann::json::object();
  for (auto& [rel, d] : sums) j[rel] = {{"sha256", d.sha256}, {"bytes", d.bytes}};
  write_file(steps, dir + "/checksums.json", j.dump(2) + "\n");
  fsync_dir(steps, dir);
}

std::map<std::string, FileDigest> read_checksums(const std::string& dir) {
  const std::string path = dir + "/checksums.json";
  std::ifstream f(path, std::ios::binary);
  LOOM_CHECK(f.good(), "checkpoint '{}' has no checksums.json: not a loom checkpoint, or a write "
             "was interrupted", dir);
  std::stringstream ss;
  ss << f.rdbuf();
  std::map<std::string, FileDigest> sums;
  try {
    nlohmann::json j = nlohmann::json::parse(ss.str());
    LOOM_CHECK(j.is_object(), "'{}' is not a JSON object", path);
    for (auto& [rel, v] : j.items()) {
      LOOM_CHECK(v.is_object() && v.contains("sha256") && v["sha256"].is_string() &&
                     v.contains("bytes") && v["bytes"].is_number_unsigned(),
                 "'{}': entry '{}' needs \"sha256\" (string) and \"bytes\" (integer >= 0)", path,
                 rel);
      LOOM_CHECK(!rel.empty() && rel[0] != '/' && rel.find("..") == std::string::npos,
                 "'{}': entry '{}' is not a relative path inside the checkpoint", path, rel);
      FileDigest d;
      d.sha256 = v["sha256"].get<std::string>();
      d.bytes = v["bytes"].get<uint64_t>();
      sums[rel] = d;
    }
  } catch (const nlohmann::json::exception& e) {
    LOOM_FAIL("'{}' is not valid JSON ({})", path, e.what());
  }
  return sums;
}

namespace {

// After the switch the new checkpoint is what every reader sees; a failing fsync of its parent
// only means a power loss could still bring back the old one. Not worth failing the save over.
void fsync_after_commit(ProtocolSteps& steps, const std::string& dir) {
  try {
    fsync_dir(steps, dir);
  } catch (const std::exception& e) {
    LOOM_LOG_AT(LogLevel::warn, "checkpoint committed, but {}", e.what());
  }
}

}  // namespace

// --- versioned layout -----------------------------------------------------------------------

std::string staging_dir(const std::string& root, int64_t step) {
  return fmt::format("{}/.staging-step-{:08d}", strip_slash(root), step);
}

std::vector<std::string> read_latest(const std::string& root) {
  const std::string path = root + "/latest";
  std::ifstream f(path);
  if (!f.good()) return {};
  std::vector<std::string> names;
  std::string line;
  while (std::getline(f, line)) {
    if (line.empty()) continue;
    LOOM_CHECK(parse_step_name(line).has_value(),
               "'{}' lists '{}', which is not a checkpoint name (step-NNNNNNNN[.k]); the file "
               "was modified by hand: restore it or delete it to load the newest step-* "
               "directory", path, line);
    names.push_back(line);
  }
  return names;
}

namespace {

std::vector<std::string> step_dirs(const std::string& root) {
  std::vector<std::pair<std::pair<int64_t, int64_t>, std::string>> found;
  std::error_code ec;
  for (auto& e : fs::directory_iterator(root, ec)) {
    std::string n = e.path().filename().string();
    if (auto k = parse_step_name(n); k && e.is_directory()) found.push_back({*k, n});
  }
  std::sort(found.begin(), found.end());
  std::vector<std::string> names;
  for (auto& f : found) names.push_back(f.second);
  return names;
}

std::vector<std::string> list_names(const std::string& dir) {
  std::vector<std::string> names;
  std::error_code ec;
  for (auto& e : fs::directory_iterator(dir, ec)) names.push_back(e.path().filename().string());
  return names;
}

void make_dirs(ProtocolSteps& steps, const std::string& path) {
  std::error_code ec;
  if (fs::is_directory(path, ec)) return;
  std::string parent = parent_of(path);
  if (parent != path) make_dirs(steps, parent);
  make_dir(steps, path);
}

}  // namespace

VersionedSave begin_versioned(ProtocolSteps& steps, const std::string& root_in, int64_t step) {
  LOOM_CHECK(step >= 0, "checkpoint step {} is negative; give trainer_state a \"step\" >= 0",
             step);
  VersionedSave s;
  s.root = strip_slash(root_in);
  LOOM_CHECK(!s.root.empty(), "the checkpoint directory name is empty");
  make_dirs(steps, s.root);
  std::error_code ec;
  // A flat checkpoint in root (a run saved before sharding, now resumed) stays as it is; once
  // `latest` exists it is no longer what the root loads as.
  // Stale temporaries of interrupted saves. Step directories that `latest` does not list were
  // renamed into place but never committed: remove them too (only when `latest` exists, so
  // directories copied in by hand are adopted below instead).
  const bool has_latest = fs::exists(s.root + "/latest", ec);
  std::vector<std::string> committed = read_latest(s.root);
  for (const std::string& n : list_names(s.root)) {
    bool stale = n.rfind(".staging-", 0) == 0 || n.rfind(".trash-", 0) == 0 || n == "latest.tmp";
    if (has_latest && parse_step_name(n) &&
        std::find(committed.begin(), committed.end(), n) == committed.end())
      stale = true;
    if (stale) remove_tree(s.root + "/" + n);
  }
  std::string base = fmt::format("step-{:08d}", step);
  s.name = base;
  for (int k = 1; fs::exists(s.root + "/" + s.name, ec); ++k) s.name = fmt::format("{}.{}", base, k);
  s.staging = staging_dir(s.root, step);
  make_dir(steps, s.staging);
  return s;
}

void commit_versioned(ProtocolSteps& steps, const VersionedSave& s, int keep) {
  LOOM_CHECK(keep >= 0, "checkpoint keep = {} must be >= 0 (0 keeps every checkpoint)", keep);
  std::error_code ec;
  std::vector<std::string> list = fs::exists(s.root + "/latest", ec) ? read_latest(s.root)
                                                                     : std::vector<std::string>{};
  if (!fs::exists(s.root + "/latest", ec)) {
    // First save into this root: adopt complete step directories already there.
    for (const std::string& n : step_dirs(s.root))
      if (is_complete_dir(fs::path(s.root) / n)) list.push_back(n);
  }
  // Drop names whose directories are gone (removed by hand); they cannot be loaded anyway.
  std::erase_if(list, [&](const std::string& n) { return !fs::is_directory(s.root + "/" + n, ec); });
  list.push_back(s.name);
  std::vector<std::string> dropped;
  if (keep > 0 && list.size() > size_t(keep)) {
    dropped.assign(list.begin(), list.end() - keep);
    list.erase(list.begin(), list.end() - keep);
  }
  std::string text;
  for (auto& n : list) text += n + "\n";

  const std::string final_dir = s.root + "/" + s.name;
  const std::string tmp = s.root + "/latest.tmp";
  bool renamed = false;
  try {
    rename_path(steps, s.staging, final_dir);
    renamed = true;
    fsync_dir(steps, s.root);
    write_file(steps, tmp, text);
    rename_path(steps, tmp, s.root + "/latest");  // the commit
  } catch (...) {
    remove_tree(tmp);
    remove_tree(renamed ? final_dir : s.staging);
    throw;
  }
  fsync_after_commit(steps, s.root);
  // Pruned checkpoints are no longer listed: move each out of sight first, so that a kill
  // during the removal never leaves a half-deleted step-* directory that looks loadable.
  for (const std::string& n : dropped) {
    std::string trash = s.root + "/.trash-" + n;
    remove_tree(trash);
    if (::rename((s.root + "/" + n).c_str(), trash.c_str()) == 0) remove_tree(trash);
  }
}

// --- flat layout ----------------------------------------------------------------------------

FlatSave begin_flat(ProtocolSteps& steps, const std::string& dir_in) {
  FlatSave s;
  s.dir = strip_slash(fs::path(dir_in).lexically_normal().string());
  LOOM_CHECK(!s.dir.empty() && s.dir != "." && s.dir != "/",
             "checkpoint directory name '{}' is empty or not a directory name", dir_in);
  const std::string parent = parent_of(s.dir);
  const std::string base = fs::path(s.dir).filename().string();
  make_dirs(steps, parent);
  std::error_code ec;
  LOOM_CHECK(!fs::exists(s.dir + "/latest", ec),
             "'{}' is a directory of checkpoints (it has 'latest'); a flat checkpoint cannot "
             "replace it: save into another directory", s.dir);
  const bool dir_complete = is_complete_dir(s.dir);
  // Replacing DIR deletes what it held: only ever do that to a checkpoint.
  LOOM_CHECK(dir_complete || !fs::exists(s.dir, ec) ||
                 (fs::is_directory(s.dir, ec) && fs::is_empty(s.dir, ec)),
             "'{}' exists and is not a loom checkpoint (no checksums.json); a save would "
             "replace it: choose another directory, or remove it if it is not needed", s.dir);
  for (const std::string& n : list_names(parent)) {
    bool stale = n.rfind("." + base + ".staging-", 0) == 0 || n.rfind(base + ".tmp-", 0) == 0;
    // The old protocol's NAME.old-PID may hold the only complete copy (killed between its two
    // renames): remove it only once DIR itself is complete.
    if (dir_complete && n.rfind(base + ".old-", 0) == 0) stale = true;
    if (stale) remove_tree(parent + "/" + n);
  }
  s.staging = parent + "/." + base + ".staging-" + std::to_string(::getpid());
  make_dir(steps, s.staging);
  return s;
}

namespace {

// Once DIR is complete again, NAME.old-PID / NAME.tmp-PID of the old protocol are garbage.
void remove_old_protocol_leftovers(const std::string& dir) {
  const std::string parent = parent_of(dir), base = fs::path(dir).filename().string();
  for (const std::string& n : list_names(parent))
    if (n.rfind(base + ".old-", 0) == 0 || n.rfind(base + ".tmp-", 0) == 0)
      remove_tree(parent + "/" + n);
}

}  // namespace

void commit_flat(ProtocolSteps& steps, const FlatSave& s) {
  const std::string parent = parent_of(s.dir);
  std::error_code ec;
  bool exchanged = false;
  try {
    if (!fs::exists(s.dir, ec)) {
      rename_path(steps, s.staging, s.dir);  // the commit
    } else {
      int inj = steps.next("exchange", s.staging + " <-> " + s.dir);
      if (inj) fail_errno("renameat2(RENAME_EXCHANGE) with '" + s.dir + "' of", s.staging, inj);
      if (::renameat2(AT_FDCWD, s.staging.c_str(), AT_FDCWD, s.dir.c_str(), RENAME_EXCHANGE) ==
          0) {
        exchanged = true;  // the commit; the old checkpoint is now under the staging name
      } else if (errno == EINVAL || errno == ENOSYS) {
        // A file system without RENAME_EXCHANGE: move the old one aside under the name the old
        // protocol used (find_checkpoint recovers DIR from it if we die in between).
        std::string aside = s.dir + ".old-" + std::to_string(::getpid());
        rename_path(steps, s.dir, aside);
        try {
          rename_path(steps, s.staging, s.dir);
        } catch (...) {
          ::rename(aside.c_str(), s.dir.c_str());  // put the old one back
          throw;
        }
        fsync_after_commit(steps, parent);
        remove_tree(aside);
        remove_old_protocol_leftovers(s.dir);
        return;
      } else {
        fail_errno("renameat2(RENAME_EXCHANGE) with '" + s.dir + "' of", s.staging, errno);
      }
    }
  } catch (...) {
    remove_tree(s.staging);
    throw;
  }
  fsync_after_commit(steps, parent);
  if (exchanged) remove_tree(s.staging);
  remove_old_protocol_leftovers(s.dir);
}

// --- finding a checkpoint -------------------------------------------------------------------

std::string find_checkpoint(const std::string& path_in) {
  const std::string path = strip_slash(path_in);
  std::error_code ec;
  if (!fs::is_directory(path, ec)) {
    // The old two-rename protocol killed between its renames leaves only PATH.old-PID.
    const std::string parent = parent_of(path), base = fs::path(path).filename().string();
    if (!fs::exists(path, ec) && fs::is_directory(parent, ec)) {
      std::string best;
      fs::file_time_type best_t{};
      for (const std::string& n : list_names(parent)) {
        fs::path d = fs::path(parent) / n;
        if (n.rfind(base + ".old-", 0) != 0 || !is_complete_dir(d)) continue;
        auto t = fs::last_write_time(d / "checksums.json", ec);
        if (best.empty() || t > best_t) best = d.string(), best_t = t;
      }
      if (!best.empty()) return best;
    }
    LOOM_FAIL("checkpoint '{}' does not exist or is not a directory", path);
  }
  if (fs::exists(path + "/latest", ec)) {
    std::vector<std::string> names = read_latest(path);
    LOOM_CHECK(!names.empty(), "'{}/latest' lists no checkpoint; delete it to load the newest "
               "step-* directory", path);
    const std::string dir = path + "/" + names.back();
    LOOM_CHECK(is_complete_dir(dir),
               "'{}/latest' names '{}', but '{}' is missing or has no checksums.json (removed "
               "by hand?); delete '{}/latest' to load the newest complete step-* directory",
               path, names.back(), dir, path);
    return dir;
  }
  if (fs::exists(path + "/checksums.json", ec)) return path;
  std::vector<std::string> steps = step_dirs(path);
  for (auto it = steps.rbegin(); it != steps.rend(); ++it)
    if (is_complete_dir(fs::path(path) / *it)) return path + "/" + *it;
  if (fs::is_directory(path + "/ckpt", ec)) return find_checkpoint(path + "/ckpt");
  LOOM_FAIL("checkpoint '{}' has no checksums.json: it is not a checkpoint (no checksums.json), "
            "not a directory of checkpoints (no 'latest' or step-* directory) and not a run "
            "directory (no ckpt/); or a write was interrupted", path);
}

std::string sha256_file(const std::string& path) { return digest_file(path).sha256; }

}  // namespace loom::checkpoint
