// checkpoint/commit.h: the crash-proof commit protocol every checkpoint save goes through.
//
// A save stages everything in a hidden directory, fsyncs every file and the directory, and then
// makes ONE atomic switch (a rename(2)). A SIGKILL or power loss at any point leaves either the
// previous checkpoint or the new one, never a half one; a failed step (e.g. ENOSPC) removes what
// the save had staged and leaves the previous checkpoint as it was. Two layouts use it:
//
// Versioned (ShardedWriter, the training format):
//   DIR/step-00000012/       one complete checkpoint (a second save of the same step gets
//                            step-00000012.1, .2, ...)
//   DIR/latest               the committed checkpoints, oldest first, one name a line; the last
//                            line is the newest. Replaced by rename(2): THE commit point.
//   DIR/.staging-*/          a save in progress          } removed by the next save
//   DIR/.trash-*/, latest.tmp  interrupted clean-up        }
//   A step directory that `latest` does not list is an interrupted save (killed between its
//   rename and the pointer's): it is never loaded and the next save removes it. A flat
//   checkpoint's files already in DIR (an old run resumed and saved again) are left alone; DIR
//   loads as its `latest` from the first versioned save on.
// Flat (save_checkpoint, the pre-sharding format): DIR itself is the checkpoint. It is staged in
//   the sibling PARENT/.NAME.staging-PID/ and switched in by renameat2(RENAME_EXCHANGE) (a plain
//   rename when DIR does not exist yet), so DIR always names a complete checkpoint; the old
//   content, now under the staging name, is removed afterwards (or by the next save).
//
// Protocol steps and fault injection. Every mkdir, file create, write(2) call, fsync, rename and
// exchange of a save is one numbered step, counted from 1 in each save on each rank
// (ProtocolSteps; LOOM_CKPT_TRACE lists them). A versioned save of one rank-0 process, in order:
//   [mkdir DIR and missing parents] mkdir staging | shard: create, write(s), fsync | block sums:
//   create, write, fsync | index.json, config.toml, trainer_state.json: create, write, fsync each
//   | per extra file: fsync; per extra subdirectory: fsync dir | checksums.json: create, write,
//   fsync | fsync staging | rename staging -> step-N | fsync DIR | latest.tmp: create, write,
//   fsync | rename latest.tmp -> latest (THE SWITCH) | fsync DIR
// Other ranks count only their shard and block-sum steps. The flat save: [mkdir parents] mkdir
// staging | model.safetensors, optimizer.safetensors, config.toml, trainer_state.json: create,
// write(s), fsync each | extras | checksums.json | fsync staging | exchange (THE SWITCH) | fsync
// parent. For tests:
//   LOOM_CKPT_KILL_AT=K     raise SIGKILL just before step K
//   LOOM_CKPT_FAIL_AT=K     make step K fail with ENOSPC (as a full disk would)
//   either may be "R:K": only on the process whose rank (in the writer's group) is R
//   LOOM_CKPT_TRACE=1       print "ckpt step K: <what> <path>" to stderr for every step
// Removals (of stale temporaries, pruned checkpoints, a failed save's staging) are not counted:
// they only ever touch directories no reader loads.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace loom::checkpoint {

// Counts protocol steps and applies the fault-injection environment (read once, at
// construction). One per save; not thread-safe.
class ProtocolSteps {
 public:
  explicit ProtocolSteps(int rank = 0);
  // Counts one step. Raises SIGKILL if it is the kill step; returns ENOSPC if it is the failing
  // step (the caller must then act as if the system call had failed with it), else 0.
  int next(const char* what, const std::string& path);
  int64_t count() const { return n_; }

 private:
  int rank_;
  int64_t n_ = 0;
  int64_t kill_at_ = -1, fail_at_ = -1;
  bool trace_ = false;
};

struct FileDigest {
  std::string sha256;  // lower-case hex
  uint64_t bytes = 0;
  // With FileWriter's block_bytes > 0: the SHA-256 of each block_bytes-sized block (the last
  // one shorter), so a reader can verify only the blocks it reads.
  uint64_t block_bytes = 0;
  std::vector<std::string> block_sha256;
};

// Lower-case hex of a SHA-256 digest of `n` bytes.
std::string sha256_hex(const void* data, size_t n);
// Hex SHA-256 of a file's bytes.
std::string sha256_file(const std::string& path);

// Hex SHA-256 and size of a file (streamed through a 1 MiB buffer). Throws naming the file.
FileDigest digest_file(const std::string& path);

// Writes one file of a save: create, write(2) (each call one step), fsync, close. Bytes are
// hashed as they go out. Small writes are gathered in a buffer of `buffer_bytes`; large ones go
// to write(2) straight from the caller's memory (in chunks of at most 64 MiB), so saving never
// copies a tensor. Errors throw loom::Error naming the file, the call and the errno string.
class FileWriter {
 public:
  // block_bytes > 0: also hash every block of that many bytes (FileDigest::block_sha256).
  FileWriter(ProtocolSteps& steps, std::string path, size_t buffer_bytes = size_t(4) << 20,
             uint64_t block_bytes = 0);
  ~FileWriter();  // closes an unfinished file (no fsync); the caller removes the staging dir
  FileWriter(const FileWriter&) = delete;
  FileWriter& operator=(const FileWriter&) = delete;

  void write(const void* data, size_t n);
  // Flushes, fsyncs and closes; returns the file's digest.
  FileDigest finish();
  uint64_t bytes() const { return bytes_; }
  const std::string& path() const { return path_; }

 private:
  void write_direct(const char* p, size_t n);
  void flush();

  ProtocolSteps& steps_;
  std::string path_;
  int fd_ = -1;
  std::vector<char> buf_;
  size_t used_ = 0;
  uint64_t bytes_ = 0;
  void* sha_ = nullptr;  // EVP_MD_CTX of the whole file
  void* block_sha_ = nullptr;  // EVP_MD_CTX of the current block
  uint64_t block_bytes_ = 0, in_block_ = 0;
  std::vector<std::string> blocks_;
  void hash(const char* p, size_t n);
};

// A whole small file (text) through FileWriter.
FileDigest write_file(ProtocolSteps& steps, const std::string& path, const std::string& text);

// Each is one step; failures throw loom::Error naming the call, the path(s) and the errno string.
void make_dir(ProtocolSteps& steps, const std::string& path);         // mkdir (parent must exist)
void fsync_dir(ProtocolSteps& steps, const std::string& path);
void rename_path(ProtocolSteps& steps, const std::string& from, const std::string& to);
// Not counted; never throws (best effort clean-up): false if something could not be removed.
bool remove_tree(const std::string& path) noexcept;

// Makes files someone else wrote under `dir` (e.g. a caller's extra files) part of the save:
// fsyncs every regular file not yet in `sums` (one step each) and adds its digest, and fsyncs
// every subdirectory. Paths in `sums` are relative to `dir`.
void sync_new_files(ProtocolSteps& steps, const std::string& dir,
                    std::map<std::string, FileDigest>& sums);
// Writes dir/checksums.json ({"file": {"sha256": .., "bytes": ..}}) and fsyncs `dir`.
void write_checksums(ProtocolSteps& steps, const std::string& dir,
                     const std::map<std::string, FileDigest>& sums);
// Reads dir/checksums.json; throws naming it if it is missing or malformed.
std::map<std::string, FileDigest> read_checksums(const std::string& dir);

// --- versioned layout -----------------------------------------------------------------------

// The committed checkpoint names listed in DIR/latest, oldest first ({} if there is none).
// Throws naming the file if it lists a name that is not a plain step directory name.
std::vector<std::string> read_latest(const std::string& root);

// A save in progress into root: created by begin_versioned (which first removes stale staging,
// trash, latest.tmp and uncommitted step directories), committed by commit_versioned.
// The staging directory of a save of `step` into root (the same on every rank).
std::string staging_dir(const std::string& root, int64_t step);
struct VersionedSave {
  std::string root;     // DIR
  std::string staging;  // DIR/.staging-step-N-PID
  std::string name;     // step-0000000N[.k]: the name it will be committed under
};
// mkdir -p root (each created level a step), clean up, mkdir staging.
VersionedSave begin_versioned(ProtocolSteps& steps, const std::string& root, int64_t step);
// staging fully written and fsynced (files and the staging dir itself): rename it to root/name,
// fsync root, write latest.tmp (list + name), rename it to latest (the commit), fsync root, then
// prune to the newest `keep` (0: keep all). On failure before the switch it removes what it made
// and rethrows; the previous checkpoint stays as it was.
void commit_versioned(ProtocolSteps& steps, const VersionedSave& save, int keep);

// --- flat layout ----------------------------------------------------------------------------

struct FlatSave {
  std::string dir;      // the checkpoint directory
  std::string staging;  // PARENT/.NAME.staging-PID
};
// mkdir -p parent, remove stale staging siblings (and the old protocol's NAME.tmp-* / NAME.old-*
// when DIR is complete), mkdir staging.
FlatSave begin_flat(ProtocolSteps& steps, const std::string& dir);
// staging fully written and fsynced: switch it in (rename or RENAME_EXCHANGE), fsync parent,
// remove the old content.
void commit_flat(ProtocolSteps& steps, const FlatSave& save);

// --- finding a checkpoint -------------------------------------------------------------------

// The directory of the checkpoint to load for `path`: a checkpoint directory itself (it has
// checksums.json), a versioned root (its `latest`, or without one its newest step-* directory
// holding checksums.json), or a run directory holding ckpt/ (either of the above). A flat DIR
// lost by the old two-rename protocol (DIR missing, DIR.old-PID complete) is found too. Throws
// naming the path and what was looked for otherwise.
std::string find_checkpoint(const std::string& path);

}  // namespace loom::checkpoint
