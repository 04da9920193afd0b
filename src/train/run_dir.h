// train/run_dir.h: what `loom train` may do to its run directory (--out DIR).
//
// A run directory holds metrics.jsonl, loss.svg and ckpt*/ of one run. These functions keep a
// second command from destroying it:
//   check_run_dir_free     refuses to start a fresh run over an existing one unless the user
//                          says --resume (continue it) or --overwrite (replace it).
//   RunDirLock             an exclusive flock on DIR/.loom.lock held for the whole run, so a
//                          second `loom train` on the same directory refuses instead of both
//                          writing the same files. The kernel drops the lock when the process
//                          dies (kill -9 included): a stale lock file never blocks a restart.
//   truncate_metrics       on resume, cuts metrics.jsonl back to the resumed step so steps
//                          between the checkpoint and a crash are not listed twice.
#pragma once

#include <cstdint>
#include <string>

namespace loom::train {

// Throws loom::Error naming `run_dir` if it already holds a run (metrics.jsonl or a ckpt*
// entry) and neither `resuming` nor `overwrite` is set. A missing or empty directory, or one
// holding only the lock file, is free. Reads only; safe to call on every rank.
void check_run_dir_free(const std::string& run_dir, bool resuming, bool overwrite);

// Creates `run_dir` if needed and takes an exclusive, non-blocking flock on run_dir/.loom.lock
// (the file records the holder's pid and host for the message). Throws loom::Error naming the
// directory and the holder if another process holds it. Take it on one process per run (world
// rank 0): ranks of one job would otherwise lock each other out. Movable, not copyable; the
// destructor releases the lock (the file stays, harmlessly).
class RunDirLock {
 public:
  RunDirLock() = default;
  explicit RunDirLock(const std::string& run_dir);
  ~RunDirLock();
  RunDirLock(RunDirLock&& other) noexcept;
  RunDirLock& operator=(RunDirLock&& other) noexcept;
  RunDirLock(const RunDirLock&) = delete;
  RunDirLock& operator=(const RunDirLock&) = delete;
  bool held() const { return fd_ >= 0; }

 private:
  int fd_ = -1;
};

// The call `loom train` makes before training: check_run_dir_free on every rank, and the lock on
// the rank with `take_lock` (world rank 0, or the only process). Returns the lock to hold.
RunDirLock claim_run_dir(const std::string& run_dir, bool resuming, bool overwrite,
                         bool take_lock);

// Rewrites `path` (a metrics.jsonl) keeping the lines before the first one whose "step" is
// greater than `step`, and dropping a torn last line (a write cut by a kill). Atomic (temporary
// file, then rename); a missing file is left missing. Returns the number of lines removed.
int64_t truncate_metrics(const std::string& path, int64_t step);

}  // namespace loom::train
