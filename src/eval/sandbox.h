// eval/sandbox.h: runs one untrusted program (a compiler or a generated program) contained.
//
// Glossary
//   slot      a small integer naming a worker; each slot runs as its own unprivileged uid
//             (uid_base + slot), so limits counted per uid (processes) and kill(-1, ...) never
//             reach another worker's program.
//   sandbox dir  a fresh directory owned by the slot's uid: the program's working directory,
//             HOME and TMPDIR, and (when isolated) the only writable place in its filesystem view.
//   isolated  running as root with new network, mount and pid namespaces (see below); otherwise
//             "unisolated": rlimits, a process group and the timeout only.
//
// Contract of Sandbox::run (isolated mode), for every program:
//   - its own process group, killed as a whole on wall-clock timeout or output overflow;
//   - a new pid namespace whose init is ours: when the program exits or is killed, every process
//     it started (daemons, fork bombs, setsid escapees) is killed by the kernel;
//   - a new network namespace (loopback down, no interfaces): every connect() fails;
//   - a new mount namespace in which every mount is read-only except the sandbox dir and the
//     spec's extra_writable paths, and /proc shows only the sandbox's processes;
//   - uid/gid uid_base + slot, no supplementary groups, no_new_privs;
//   - rlimits on CPU seconds, address space, processes (per uid), file size, core dumps (0);
//   - where cgroups can be created (v2 with cpu and pids delegated, or v1 cpu and pids
//     hierarchies writable by root): its own cgroup with a CPU bandwidth quota and a pids limit,
//     joined before anything of the program runs;
//   - timeout by the CPU time of all its processes (cpu_timeout_seconds) and by wall clock;
//   - stdin is /dev/null; stdout and stderr are read by the caller, the first
//     limits.output_keep_bytes of each kept, and the group killed once the total passes
//     limits.output_kill_bytes (reported as output_limit);
//   - a fixed environment (spec.env only; nothing is inherited).
// Failure behaviour: set-up errors inside the child (mount, setuid, execve of a missing binary)
// come back as SandboxResult::setup_error, never as an exception; a Sandbox that cannot isolate
// is refused at creation unless the caller allowed unisolated runs. Thread-safe: run() may be
// called from several threads at once with different slots.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

namespace loom::eval {

struct SandboxLimits {
  double wall_seconds = 10.0;              // wall clock, then SIGKILL to the whole group
  // > 0: CPU seconds of the whole sample (every process it started, running or reaped) at
  // which it is killed and reported as timed out (cpu_timeout). Checked every ~50 ms. With it,
  // a sample slowed down by busy neighbours is not timed out, and wall_seconds is the backstop
  // for samples that sleep or deadlock (untrusted_run_limits sets it to 3x).
  double cpu_timeout_seconds = 0.0;
  int64_t cpu_seconds = 10;                // RLIMIT_CPU per process (SIGXCPU, then SIGKILL)
  int64_t address_space_bytes = int64_t(4) << 30;  // RLIMIT_AS per process
  int64_t max_processes = 128;             // RLIMIT_NPROC: processes+threads of the slot's uid
  // Where the sandbox can create cgroups (Sandbox::cgroups()): the whole sample's CPU bandwidth
  // in cores (cpu.max / cpu.cfs_quota_us; 0 = unlimited) and its task count (pids.max; 0 =
  // unlimited). Without cgroups only the rlimits and cpu_timeout_seconds apply.
  double cpu_quota_cores = 0.0;
  int64_t max_pids = 0;
  int64_t max_file_bytes = int64_t(64) << 20;      // RLIMIT_FSIZE: largest file it may write
  int64_t max_open_files = 1024;           // RLIMIT_NOFILE
  int64_t output_keep_bytes = 64 << 10;    // bytes kept per stream
  int64_t output_kill_bytes = 16 << 20;    // stdout+stderr total that kills the group
};

// Limits for one untrusted program given `seconds` of CPU: timeout by the sample's CPU time,
// wall-clock backstop at 3x, RLIMIT_NPROC and pids.max 32 (processes and threads), one core of
// CPU bandwidth. One sample's fork bomb or busy loop then cannot push a neighbour past its
// limit. Callers adjust address_space_bytes per language.
SandboxLimits untrusted_run_limits(double seconds);

struct SandboxSpec {
  std::vector<std::string> argv;           // argv[0] must be an absolute path
  std::vector<std::string> env;            // "KEY=VALUE"; the whole environment
  std::filesystem::path dir;               // sandbox dir (absolute, exists, see make_dir)
  std::vector<std::filesystem::path> extra_writable;  // e.g. a shared compiler cache
  SandboxLimits limits;
  mode_t umask = 022;
};

struct SandboxResult {
  int exit_code = -1;          // valid when term_signal == 0 and !timed_out
  int term_signal = 0;         // signal that ended the program, 0 if it exited
  bool timed_out = false;      // wall-clock limit or cpu_timeout_seconds hit
  bool cpu_timeout = false;    // timed_out by cpu_timeout_seconds (not the wall clock)
  double cpu_seconds = 0.0;    // CPU time of the whole sample (user + system, all processes)
  bool output_limit = false;   // output_kill_bytes passed
  std::string out;             // first output_keep_bytes of stdout
  std::string err;             // first output_keep_bytes of stderr
  int64_t out_bytes = 0;       // total stdout bytes seen
  int64_t err_bytes = 0;
  double wall_seconds = 0.0;
  std::string setup_error;     // non-empty: the sandbox could not start the program
};

class Sandbox {
 public:
  struct Config {
    // Run without namespaces and uid switch when they are unavailable (not root, or unshare
    // refused). Generated code can then reach the network and write wherever this process can.
    bool allow_unisolated = false;
    uid_t uid_base = 61000;
    int max_slots = 64;
  };

  // Probes whether isolation works here (forks a child that tries the namespaces). Throws
  // loom::Error naming the reason when it does not and allow_unisolated is false.
  static Sandbox create(const Config& config);

  bool isolated() const { return isolated_; }
  // Whether per-run cgroups (CPU quota, pids limit) can be created here: "v1", "v2" or "" (none).
  const std::string& cgroups() const { return cgroup_mode_; }
  // One line for logs and reports: the mode and, when unisolated, why.
  const std::string& describe() const { return description_; }
  uid_t uid_for_slot(int slot) const;

  // Creates a fresh empty directory under `parent` owned by the slot's uid (mode 0700).
  std::filesystem::path make_dir(const std::filesystem::path& parent, int slot) const;
  // Gives every file under `dir` (recursively) to the slot's uid; no-op when unisolated.
  void give_to_slot(const std::filesystem::path& dir, int slot) const;

  SandboxResult run(const SandboxSpec& spec, int slot) const;

 private:
  Sandbox(const Config& config, bool isolated, std::string description)
      : config_(config), isolated_(isolated), description_(std::move(description)) {}
  void detect_cgroups();
  Config config_;
  bool isolated_ = false;
  std::string description_;
  std::string cgroup_mode_;          // "v1", "v2" or ""
  std::string cgroup_cpu_root_;      // where per-run cpu cgroups are made
  std::string cgroup_pids_root_;     // where per-run pids cgroups are made (v2: same as cpu)
};

}  // namespace loom::eval
