// eval/sandbox.cpp: process chain that contains one untrusted program.
//
// Glossary: A = first child (own process group; creates the namespaces and the read-only mount
// view), B = A's child, pid 1 of the new pid namespace (mounts a fresh /proc, reaps, reports the
// program's wait status), C = B's child, which sets rlimits, drops to the slot's uid and execs
// the program. The harness (parent) reads C's stdout/stderr through pipes, enforces the wall
// clock, and kills A's process group on timeout; A's death kills B (PR_SET_PDEATHSIG) and B's
// death kills every process in the pid namespace, so nothing the program started survives.
//
// Between fork() and execve() the children only make system calls on data the parent prepared
// (no allocation, no locks): the parent is multi-threaded, and another worker thread may hold
// the malloc lock at the moment of the fork.
#include "eval/sandbox.h"

#include <fcntl.h>
#include <grp.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>

#include "core/error.h"

namespace loom::eval {

namespace fs = std::filesystem;

namespace {

// What the child chain reports on fd 3. Fixed size and under PIPE_BUF, so one write() is atomic.
struct StatusRecord {
  char kind = 0;  // 'E': a set-up step failed (value = errno); 'S': program wait status;
                  // 'B': pid of the namespace's init (B) as seen by the parent
  int32_t value = 0;
  char what[96] = {};  // the step that failed
};

void write_record(int fd, char kind, int value, const char* what) {
  StatusRecord r;
  r.kind = kind;
  r.value = value;
  size_t i = 0;
  for (; what != nullptr && what[i] != 0 && i + 1 < sizeof r.what; ++i) r.what[i] = what[i];
  r.what[i] = 0;
  ssize_t n = write(fd, &r, sizeof r);
  (void)n;  // nothing more a dying child can do
}

constexpr int kStatusFd = 3;

[[noreturn]] void child_fail(const char* what) {
  write_record(kStatusFd, 'E', errno, what);
  _exit(127);
}

// Everything the children need, prepared before fork() so they never allocate.
struct Prepared {
  std::vector<char*> argv;  // null-terminated
  std::vector<char*> envp;  // null-terminated
  const char* dir = nullptr;
  std::vector<const char*> writable;     // sandbox dir + extra_writable
  std::vector<const char*> mountpoints;  // every mount to remount read-only
  SandboxLimits limits;
  mode_t umask_bits = 022;
  bool isolated = false;
  uid_t uid = 0;
  int cgroup_fds[2] = {-1, -1};  // cgroup.procs of the run's cpu and pids cgroups (>= 10)
  pid_t harness_pid = 0;         // the process that forks A (A checks it is still its parent)
  // Fault injection for tests (LOOM_TEST_SANDBOX_PAUSE="a:MS" or "b:MS"): A or B sleeps MS
  // milliseconds before its PR_SET_PDEATHSIG, so a test can kill the parent in that window.
  char pause_in = 0;
  timespec pause{0, 0};
};

// /proc/self/mounts escapes blanks and backslashes as \ooo.
std::string unescape_mount_path(const std::string& s) {
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '\\' && i + 3 < s.size()) {
      int v = 0;
      bool ok = true;
      for (size_t j = 1; j <= 3; ++j) {
        if (s[i + j] < '0' || s[i + j] > '7') ok = false;
        else v = v * 8 + (s[i + j] - '0');
      }
      if (ok) {
        out.push_back(char(v));
        i += 3;
        continue;
      }
    }
    out.push_back(s[i]);
  }
  return out;
}

std::vector<std::string> read_mountpoints() {
  std::ifstream in("/proc/self/mounts");
  LOOM_CHECK(in.good(), "cannot read /proc/self/mounts: the sandbox needs /proc to list the mounts "
                        "it makes read-only");
  std::vector<std::string> points;
  std::string line;
  while (std::getline(in, line)) {
    std::istringstream ls(line);
    std::string device, point;
    ls >> device >> point;
    if (!point.empty()) points.push_back(unescape_mount_path(point));
  }
  return points;
}

void set_limit(int resource, int64_t soft, int64_t hard, const char* what) {
  struct rlimit rl;
  rl.rlim_cur = rlim_t(soft);
  rl.rlim_max = rlim_t(hard);
  if (setrlimit(resource, &rl) != 0) child_fail(what);
}

// C: limits, identity, exec. Never returns.
[[noreturn]] void run_program(const Prepared& p) {
  const SandboxLimits& l = p.limits;
  set_limit(RLIMIT_CPU, l.cpu_seconds, l.cpu_seconds + 1, "setrlimit(RLIMIT_CPU)");
  set_limit(RLIMIT_AS, l.address_space_bytes, l.address_space_bytes, "setrlimit(RLIMIT_AS)");
  set_limit(RLIMIT_NPROC, l.max_processes, l.max_processes, "setrlimit(RLIMIT_NPROC)");
  set_limit(RLIMIT_FSIZE, l.max_file_bytes, l.max_file_bytes, "setrlimit(RLIMIT_FSIZE)");
  set_limit(RLIMIT_NOFILE, l.max_open_files, l.max_open_files, "setrlimit(RLIMIT_NOFILE)");
  set_limit(RLIMIT_CORE, 0, 0, "setrlimit(RLIMIT_CORE)");
  umask(p.umask_bits);
  if (chdir(p.dir) != 0) child_fail("chdir to the sandbox dir");
  if (p.isolated) {
    if (setgroups(0, nullptr) != 0) child_fail("setgroups");
    if (setgid(p.uid) != 0) child_fail("setgid");
    if (setuid(p.uid) != 0) child_fail("setuid");
  }
  if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) child_fail("prctl(PR_SET_NO_NEW_PRIVS)");
  // The status pipe must not be writable by the program (it could forge a passing status).
  if (fcntl(kStatusFd, F_SETFD, FD_CLOEXEC) != 0) child_fail("fcntl(FD_CLOEXEC)");
  execve(p.argv[0], p.argv.data(), p.envp.data());
  child_fail("execve");
}

// B: pid 1 of the namespace when isolated. Reaps everything, reports C's status, exits; its
// exit makes the kernel kill whatever C left behind. `life_r`: the read end of a pipe whose only
// write end A holds.
[[noreturn]] void run_init(const Prepared& p, int life_r) {
  if (p.pause_in == 'b') nanosleep(&p.pause, nullptr);
  prctl(PR_SET_PDEATHSIG, SIGKILL);
  // A parent that died before the prctl above sends no signal: a sandbox whose harness was
  // killed at that moment (loom eval under SIGKILL, then --resume) would run its program to the
  // end with no wall clock, holding the slot's uid. B cannot ask getppid() (A is outside its pid
  // namespace), so it looks at the pipe: A gone means end of file.
  pollfd alive{life_r, POLLIN, 0};
  if (poll(&alive, 1, 0) != 0) _exit(126);  // no data is ever written: any event is A's exit
  close(life_r);
  if (p.isolated) {
    // A /proc for this pid namespace: the program sees only its own processes.
    if (mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY, nullptr) != 0)
      child_fail("mount /proc for the new pid namespace");
  }
  const pid_t c = fork();
  if (c < 0) child_fail("fork (program)");
  if (c == 0) run_program(p);
  int st = 0;
  for (;;) {
    const pid_t w = waitpid(-1, &st, 0);
    if (w == c) break;
    if (w < 0 && errno != EINTR) child_fail("waitpid (program)");
  }
  write_record(kStatusFd, 'S', st, "");
  _exit(0);
}

unsigned long statvfs_to_mount_flags(unsigned long f) {
  unsigned long m = 0;
  if (f & ST_NOSUID) m |= MS_NOSUID;
  if (f & ST_NODEV) m |= MS_NODEV;
  if (f & ST_NOEXEC) m |= MS_NOEXEC;
  if (f & ST_NOATIME) m |= MS_NOATIME;
  if (f & ST_NODIRATIME) m |= MS_NODIRATIME;
  if (f & ST_RELATIME) m |= MS_RELATIME;
  return m;
}

// A: own process group, namespaces and the read-only view. Never returns.
[[noreturn]] void run_child_a(const Prepared& p, int null_fd, int out_fd, int err_fd,
                              int status_fd) {
  setpgid(0, 0);
  if (p.pause_in == 'a') nanosleep(&p.pause, nullptr);
  prctl(PR_SET_PDEATHSIG, SIGKILL);
  if (getppid() != p.harness_pid) _exit(126);  // the harness died before the prctl (see run_init)
  if (dup2(status_fd, kStatusFd) < 0) _exit(126);
  // Join the run's cgroups first ("0" = the writer): B, C and all they start inherit them.
  for (int fd : p.cgroup_fds)
    if (fd >= 0 && write(fd, "0", 1) != 1) child_fail("join the sample's cgroup");
  if (dup2(null_fd, 0) < 0 || dup2(out_fd, 1) < 0 || dup2(err_fd, 2) < 0) child_fail("dup2");
  // Other worker threads' pipes were inherited by fork(); holding them would delay their EOF.
  if (close_range(kStatusFd + 1, ~0U, 0) != 0) child_fail("close_range");
  if (p.isolated) {
    if (unshare(CLONE_NEWNET | CLONE_NEWNS | CLONE_NEWPID) != 0)
      child_fail("unshare(CLONE_NEWNET|CLONE_NEWNS|CLONE_NEWPID)");
    // Private first, so nothing below propagates back to the host's mounts.
    if (mount(nullptr, "/", nullptr, MS_REC | MS_PRIVATE, nullptr) != 0)
      child_fail("mount(/, MS_REC|MS_PRIVATE)");
    // Bind mounts of the writable places come before the read-only remounts: a bind mount
    // copies the flags of the mount it comes from, so binding later would give a read-only one.
    for (const char* w : p.writable)
      if (mount(w, w, nullptr, MS_BIND | MS_REC, nullptr) != 0)
        child_fail("bind-mount of a writable sandbox path");
    for (const char* m : p.mountpoints) {
      struct statvfs sv;
      if (statvfs(m, &sv) != 0) continue;  // a mount point hidden by a later mount
      const unsigned long keep = statvfs_to_mount_flags(sv.f_flag);
      if (mount(nullptr, m, nullptr, MS_REMOUNT | MS_BIND | MS_RDONLY | keep, nullptr) != 0) {
        if (errno == ENOENT || errno == EACCES) continue;  // vanished or not ours to change
        child_fail("remount read-only");
      }
    }
  }
  int life[2];
  if (pipe2(life, O_CLOEXEC) != 0) child_fail("pipe2 (life)");
  const pid_t b = fork();
  if (b < 0) child_fail("fork (init)");
  if (b == 0) {
    close(life[1]);
    run_init(p, life[0]);
  }
  close(life[0]);  // A keeps life[1] open until it exits
  // The parent kills B (not A) on timeout: A's waitpid below then returns only once the whole
  // pid namespace is gone, so "A exited" means "nothing of the program is left".
  write_record(kStatusFd, 'B', int32_t(b), "");
  int st = 0;
  while (waitpid(b, &st, 0) < 0 && errno == EINTR) {
  }
  _exit(0);
}

void append_capped(std::string& dst, const char* buf, size_t n, int64_t keep) {
  if (int64_t(dst.size()) >= keep) return;
  const size_t room = size_t(keep - int64_t(dst.size()));
  dst.append(buf, std::min(room, n));
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

struct Fd {
  int fd = -1;
  Fd() = default;
  explicit Fd(int f) : fd(f) {}
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  ~Fd() { reset(); }
  void reset() {
    if (fd >= 0) close(fd);
    fd = -1;
  }
};

bool write_text(const std::string& path, const std::string& text) {
  const int fd = open(path.c_str(), O_WRONLY | O_CLOEXEC);
  if (fd < 0) return false;
  const bool ok = write(fd, text.data(), text.size()) == ssize_t(text.size());
  close(fd);
  return ok;
}

std::string read_text(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// This process's cgroup path in the hierarchy whose /proc/self/cgroup line matches: "0::" for
// v2, or a v1 line whose controller list holds `controller`.
std::string own_cgroup_path(const std::string& controller) {
  std::ifstream in("/proc/self/cgroup");
  std::string line;
  while (std::getline(in, line)) {
    const size_t a = line.find(':'), b = line.find(':', a + 1);
    if (a == std::string::npos || b == std::string::npos) continue;
    const std::string list = line.substr(a + 1, b - a - 1);
    const std::string path = line.substr(b + 1);
    if (controller.empty() ? line.rfind("0::", 0) == 0
                           : ("," + list + ",").find("," + controller + ",") != std::string::npos)
      return path == "/" ? std::string() : path;
  }
  return {};
}

bool can_make_child(const std::string& root) {
  const std::string probe = fmt::format("{}/loom-probe-{}", root, getpid());
  if (mkdir(probe.c_str(), 0755) != 0) return false;
  rmdir(probe.c_str());
  return true;
}

// One run's cgroups: made before the fork, joined by child A, removed after the run.
struct RunCgroups {
  std::vector<std::string> dirs;
  Fd procs[2];
  ~RunCgroups() {
    for (auto& f : procs) f.reset();
    for (const auto& d : dirs)
      for (int i = 0; i < 50 && rmdir(d.c_str()) != 0 && errno == EBUSY; ++i) usleep(2000);
  }
};

// CPU seconds (user + system, including reaped children) of every live process of the run:
// those in the pid namespace with inode `ns_inode` when isolated, else those in process group
// `pgid`. A process's reaped children are in its cutime/cstime, so each CPU second is counted
// once, by whoever holds it now.
double run_cpu_seconds(ino_t ns_inode, pid_t pgid) {
  static const double kTick = double(sysconf(_SC_CLK_TCK));
  double ticks = 0;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator("/proc", ec)) {
    const std::string name = e.path().filename().string();
    if (name.empty() || name[0] < '0' || name[0] > '9') continue;
    if (ns_inode != 0) {
      struct stat st;
      if (stat((e.path() / "ns" / "pid").c_str(), &st) != 0 || st.st_ino != ns_inode) continue;
    }
    const std::string stat_text = read_text((e.path() / "stat").string());
    const size_t close_paren = stat_text.rfind(')');
    if (close_paren == std::string::npos) continue;
    std::istringstream fields(stat_text.substr(close_paren + 2));
    // Fields from 3 on: state ppid pgrp session tty_nr tpgid flags minflt cminflt majflt
    // cmajflt utime stime cutime cstime
    std::string state;
    long long ppid = 0, pgrp = 0, skip = 0, ut = 0, st_ = 0, cut = 0, cst = 0;
    fields >> state >> ppid >> pgrp;
    for (int i = 0; i < 8; ++i) fields >> skip;
    fields >> ut >> st_ >> cut >> cst;
    if (!fields) continue;
    if (ns_inode == 0 && pgrp != pgid) continue;
    ticks += double(ut + st_ + cut + cst);
  }
  return ticks / kTick;
}

}  // namespace

SandboxLimits untrusted_run_limits(double seconds) {
  SandboxLimits l;
  l.cpu_timeout_seconds = seconds;
  l.wall_seconds = 3 * seconds;
  l.cpu_seconds = int64_t(std::ceil(seconds)) + 1;  // per process; the sample total decides
  l.max_processes = 32;
  l.max_pids = 32;
  l.cpu_quota_cores = 1.0;
  return l;
}

void Sandbox::detect_cgroups() {
  cgroup_mode_.clear();
  if (geteuid() != 0) return;
  // v2: our cgroup must already delegate cpu and pids to its children.
  if (fs::exists("/sys/fs/cgroup/cgroup.controllers")) {
    const std::string base = "/sys/fs/cgroup" + own_cgroup_path("");
    std::string sub = " " + read_text(base + "/cgroup.subtree_control") + " ";
    std::replace(sub.begin(), sub.end(), '\n', ' ');
    if (sub.find(" cpu ") != std::string::npos && sub.find(" pids ") != std::string::npos &&
        can_make_child(base)) {
      cgroup_mode_ = "v2";
      cgroup_cpu_root_ = cgroup_pids_root_ = base;
      return;
    }
  }
  // v1: separate cpu and pids hierarchies.
  for (const char* cpu_mount : {"/sys/fs/cgroup/cpu", "/sys/fs/cgroup/cpu,cpuacct"}) {
    const std::string cpu_root = cpu_mount + own_cgroup_path("cpu");
    const std::string pids_root = "/sys/fs/cgroup/pids" + own_cgroup_path("pids");
    if (fs::exists(cpu_root + "/cpu.cfs_quota_us") && fs::exists(pids_root + "/cgroup.procs") &&
        can_make_child(cpu_root) && can_make_child(pids_root)) {
      cgroup_mode_ = "v1";
      cgroup_cpu_root_ = cpu_root;
      cgroup_pids_root_ = pids_root;
      return;
    }
  }
}

Sandbox Sandbox::create(const Config& config) {
  LOOM_CHECK(config.max_slots > 0 && config.uid_base > 1000,
             "sandbox uid_base={} max_slots={}: need uid_base > 1000 and max_slots > 0",
             config.uid_base, config.max_slots);
  std::string why;
  if (geteuid() != 0) {
    why = fmt::format("not running as root (euid={}): network, mount and pid namespaces and the "
                      "uid switch need root",
                      geteuid());
  } else {
    // Probe the whole chain once with a trivial program.
    Sandbox probe(config, true, "isolated");
    std::error_code ec;
    const fs::path parent = fs::temp_directory_path(ec);
    LOOM_CHECK(!ec, "no temporary directory for the sandbox probe: {}", ec.message());
    char tmpl_buf[4096];
    std::snprintf(tmpl_buf, sizeof tmpl_buf, "%s/loom-sandbox-probe-XXXXXX", parent.c_str());
    LOOM_CHECK(mkdtemp(tmpl_buf) != nullptr, "mkdtemp({}) failed: {}", tmpl_buf,
               std::strerror(errno));
    const fs::path root = tmpl_buf;
    fs::permissions(root, fs::perms(0711));
    SandboxResult r;
    try {
      SandboxSpec spec;
      spec.argv = {"/bin/true"};
      spec.env = {"PATH=/usr/bin:/bin"};
      spec.dir = probe.make_dir(root, 0);
      spec.limits.wall_seconds = 10;
      r = probe.run(spec, 0);
    } catch (const Error& e) {
      r.setup_error = e.what();
    }
    fs::remove_all(root, ec);
    if (r.setup_error.empty() && r.exit_code == 0 && !r.timed_out) {
      probe.detect_cgroups();
      probe.description_ += probe.cgroup_mode_.empty()
                                ? "; no writable cgroups: CPU-time timeout and rlimits only"
                                : "; per-run cgroup " + probe.cgroup_mode_ +
                                      " (CPU quota, pids limit)";
      return probe;
    }
    why = r.setup_error.empty() ? fmt::format("probe /bin/true exited with {}", r.exit_code)
                                : r.setup_error;
  }
  LOOM_CHECK(config.allow_unisolated,
             "cannot isolate generated programs here ({}). Run as root on a kernel that allows "
             "unshare(CLONE_NEWNET|CLONE_NEWNS|CLONE_NEWPID), or pass --allow-network to run "
             "them WITHOUT network, filesystem and uid isolation",
             why);
  Sandbox unisolated(config, false,
                     "UNISOLATED (" + why + "): programs can use the network and write outside "
                     "their directory; only rlimits, a process group and the timeout apply");
  unisolated.detect_cgroups();
  return unisolated;
}

uid_t Sandbox::uid_for_slot(int slot) const {
  LOOM_CHECK(slot >= 0 && slot < config_.max_slots, "sandbox slot {} out of range [0, {})", slot,
             config_.max_slots);
  return config_.uid_base + uid_t(slot);
}

fs::path Sandbox::make_dir(const fs::path& parent, int slot) const {
  std::string tmpl = (parent / "sbXXXXXX").string();
  LOOM_CHECK(mkdtemp(tmpl.data()) != nullptr, "mkdtemp({}) failed: {}", tmpl,
             std::strerror(errno));
  const fs::path dir = tmpl;
  if (isolated_) {
    const uid_t uid = uid_for_slot(slot);
    LOOM_CHECK(chown(dir.c_str(), uid, uid) == 0, "chown({}, {}) failed: {}", dir.string(), uid,
               std::strerror(errno));
  }
  return dir;
}

void Sandbox::give_to_slot(const fs::path& dir, int slot) const {
  if (!isolated_) return;
  const uid_t uid = uid_for_slot(slot);
  auto give = [&](const fs::path& p) {
    LOOM_CHECK(lchown(p.c_str(), uid, uid) == 0, "lchown({}, {}) failed: {}", p.string(), uid,
               std::strerror(errno));
  };
  give(dir);
  for (const auto& e : fs::recursive_directory_iterator(dir)) give(e.path());
}

SandboxResult Sandbox::run(const SandboxSpec& spec, int slot) const {
  LOOM_CHECK(!spec.argv.empty() && !spec.argv[0].empty() && spec.argv[0][0] == '/',
             "sandbox argv[0] must be an absolute path, got '{}'",
             spec.argv.empty() ? std::string() : spec.argv[0]);
  LOOM_CHECK(spec.dir.is_absolute() && fs::is_directory(spec.dir),
             "sandbox dir '{}' must be an existing absolute directory", spec.dir.string());
  const auto t0 = std::chrono::steady_clock::now();
  SandboxResult res;

  // Prepare every byte the children will touch.
  std::vector<std::string> argv_store = spec.argv, env_store = spec.env;
  const std::string dir_store = spec.dir.string();
  std::vector<std::string> writable_store{dir_store};
  for (const auto& w : spec.extra_writable) writable_store.push_back(w.string());
  std::vector<std::string> mount_store;
  if (isolated_) mount_store = read_mountpoints();
  Prepared p;
  for (auto& s : argv_store) p.argv.push_back(s.data());
  p.argv.push_back(nullptr);
  for (auto& s : env_store) p.envp.push_back(s.data());
  p.envp.push_back(nullptr);
  p.dir = dir_store.c_str();
  for (auto& s : writable_store) p.writable.push_back(s.c_str());
  for (auto& s : mount_store) p.mountpoints.push_back(s.c_str());
  p.limits = spec.limits;
  p.umask_bits = spec.umask;
  p.isolated = isolated_;
  p.uid = isolated_ ? uid_for_slot(slot) : 0;

  // The run's own cgroups (CPU quota, pids limit) where they can be made.
  RunCgroups cg;
  const SandboxLimits& lim = spec.limits;
  if (!cgroup_mode_.empty() && (lim.cpu_quota_cores > 0 || lim.max_pids > 0)) {
    const std::string name = fmt::format(
        "loom-sb-{}-{}-{}", getpid(), slot,
        std::chrono::steady_clock::now().time_since_epoch().count());
    const bool v2 = cgroup_mode_ == "v2";
    const std::string cpu_dir = cgroup_cpu_root_ + "/" + name;
    const std::string pids_dir = v2 ? cpu_dir : cgroup_pids_root_ + "/" + name;
    for (const std::string& d : v2 ? std::vector<std::string>{cpu_dir}
                                   : std::vector<std::string>{cpu_dir, pids_dir}) {
      LOOM_CHECK(mkdir(d.c_str(), 0755) == 0, "cannot create the sandbox cgroup '{}': {}", d,
                 std::strerror(errno));
      cg.dirs.push_back(d);
    }
    constexpr int64_t kPeriodUs = 100000;
    if (lim.cpu_quota_cores > 0) {
      const int64_t quota = std::max<int64_t>(1000, int64_t(lim.cpu_quota_cores * kPeriodUs));
      const bool ok = v2 ? write_text(cpu_dir + "/cpu.max", fmt::format("{} {}", quota, kPeriodUs))
                         : write_text(cpu_dir + "/cpu.cfs_period_us", std::to_string(kPeriodUs)) &&
                               write_text(cpu_dir + "/cpu.cfs_quota_us", std::to_string(quota));
      LOOM_CHECK(ok, "cannot set the CPU quota of sandbox cgroup '{}': {}", cpu_dir,
                 std::strerror(errno));
    }
    if (lim.max_pids > 0)
      LOOM_CHECK(write_text(pids_dir + "/pids.max", std::to_string(lim.max_pids)),
                 "cannot set pids.max of sandbox cgroup '{}': {}", pids_dir, std::strerror(errno));
    auto open_procs = [&](const std::string& dir, Fd& fd) {
      const int raw = open((dir + "/cgroup.procs").c_str(), O_WRONLY | O_CLOEXEC);
      LOOM_CHECK(raw >= 0, "cannot open '{}/cgroup.procs': {}", dir, std::strerror(errno));
      // Above the fds child A rearranges (0-3), so its dup2 calls cannot clobber it.
      fd.fd = fcntl(raw, F_DUPFD_CLOEXEC, 10);
      close(raw);
      LOOM_CHECK(fd.fd >= 0, "fcntl(F_DUPFD_CLOEXEC) failed: {}", std::strerror(errno));
    };
    open_procs(cpu_dir, cg.procs[0]);
    if (!v2) open_procs(pids_dir, cg.procs[1]);
    p.cgroup_fds[0] = cg.procs[0].fd;
    p.cgroup_fds[1] = cg.procs[1].fd;
  }

  int out_p[2], err_p[2], st_p[2];
  LOOM_CHECK(pipe2(out_p, O_CLOEXEC) == 0, "pipe2 failed: {}", std::strerror(errno));
  Fd out_r(out_p[0]), out_w(out_p[1]);
  LOOM_CHECK(pipe2(err_p, O_CLOEXEC) == 0, "pipe2 failed: {}", std::strerror(errno));
  Fd err_r(err_p[0]), err_w(err_p[1]);
  LOOM_CHECK(pipe2(st_p, O_CLOEXEC) == 0, "pipe2 failed: {}", std::strerror(errno));
  Fd st_r(st_p[0]), st_w(st_p[1]);
  Fd null_fd(open("/dev/null", O_RDONLY | O_CLOEXEC));
  LOOM_CHECK(null_fd.fd >= 0, "open(/dev/null) failed: {}", std::strerror(errno));

  p.harness_pid = getpid();
  if (const char* e = std::getenv("LOOM_TEST_SANDBOX_PAUSE")) {
    const std::string v = e;
    LOOM_CHECK(v.size() > 2 && (v[0] == 'a' || v[0] == 'b') && v[1] == ':' &&
                   v.find_first_not_of("0123456789", 2) == std::string::npos && v.size() < 9,
               "LOOM_TEST_SANDBOX_PAUSE='{}': expected a:MS or b:MS (milliseconds, a test "
               "fault injection)",
               v);
    const long ms = std::stol(v.substr(2));
    p.pause_in = v[0];
    p.pause = {ms / 1000, (ms % 1000) * 1000000L};
  }
  const pid_t pid = fork();
  LOOM_CHECK(pid >= 0, "fork failed: {}", std::strerror(errno));
  if (pid == 0) run_child_a(p, null_fd.fd, out_w.fd, err_w.fd, st_w.fd);
  setpgid(pid, pid);  // also done by the child; whichever runs first wins the race
  out_w.reset();
  err_w.reset();
  st_w.reset();
  null_fd.reset();
  fcntl(out_r.fd, F_SETFL, O_NONBLOCK);
  fcntl(err_r.fd, F_SETFL, O_NONBLOCK);

  const auto deadline = t0 + std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                                 std::chrono::duration<double>(spec.limits.wall_seconds));
  fcntl(st_r.fd, F_SETFL, O_NONBLOCK);
  std::vector<StatusRecord> records;
  pid_t init_pid = -1;
  auto read_records = [&] {
    StatusRecord rec;
    while (read(st_r.fd, &rec, sizeof rec) == ssize_t(sizeof rec)) {
      if (rec.kind == 'B') init_pid = pid_t(rec.value);
      records.push_back(rec);
    }
  };
  bool exited = false;
  std::chrono::steady_clock::time_point exited_at;
  auto next_cpu_check = t0;
  ino_t ns_inode = 0;  // the run's pid namespace (isolated), once init has reported its pid
  char buf[65536];
  auto drain = [&](Fd& fd, std::string& keep, int64_t& total) {
    for (;;) {
      const ssize_t n = read(fd.fd, buf, sizeof buf);
      if (n > 0) {
        append_capped(keep, buf, size_t(n), spec.limits.output_keep_bytes);
        total += n;
        if (res.out_bytes + res.err_bytes > spec.limits.output_kill_bytes) return;
        continue;
      }
      if (n == 0) fd.reset();  // EOF
      return;                  // EAGAIN or error: try again after poll
    }
  };
  for (;;) {
    if (!exited) {
      // WNOWAIT: A stays a zombie, so its pid (= the group id) cannot be reused before killpg.
      siginfo_t si{};
      if (waitid(P_PID, id_t(pid), &si, WEXITED | WNOHANG | WNOWAIT) == 0 && si.si_pid == pid) {
        exited = true;
        exited_at = std::chrono::steady_clock::now();
      }
    }
    const auto now = std::chrono::steady_clock::now();
    if (exited && out_r.fd < 0 && err_r.fd < 0) break;
    // Unisolated, a daemon the program left may hold the pipes open: give it 200 ms, no more.
    if (exited && now - exited_at > std::chrono::milliseconds(200)) break;
    if (!exited && now >= deadline) {
      res.timed_out = true;
      break;
    }
    // The sample's CPU time, every 50 ms: the timeout that neighbours cannot cause.
    if (!exited && lim.cpu_timeout_seconds > 0 && now >= next_cpu_check) {
      next_cpu_check = now + std::chrono::milliseconds(50);
      if (isolated_ && ns_inode == 0 && init_pid > 0) {
        struct stat st;
        if (stat(fmt::format("/proc/{}/ns/pid", init_pid).c_str(), &st) == 0) ns_inode = st.st_ino;
      }
      if (!isolated_ || ns_inode != 0) {
        res.cpu_seconds = std::max(res.cpu_seconds, run_cpu_seconds(ns_inode, pid));
        if (res.cpu_seconds >= lim.cpu_timeout_seconds) {
          res.timed_out = true;
          res.cpu_timeout = true;
          break;
        }
      }
    }
    pollfd fds[2];
    nfds_t nf = 0;
    if (out_r.fd >= 0) fds[nf++] = {out_r.fd, POLLIN, 0};
    if (err_r.fd >= 0) fds[nf++] = {err_r.fd, POLLIN, 0};
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - now).count();
    const int wait_ms = int(std::clamp<int64_t>(left, 1, 20));
    if (nf > 0) poll(fds, nf, wait_ms);
    else usleep(useconds_t(wait_ms) * 1000);
    if (out_r.fd >= 0) drain(out_r, res.out, res.out_bytes);
    if (err_r.fd >= 0) drain(err_r, res.err, res.err_bytes);
    read_records();
    if (res.out_bytes + res.err_bytes > spec.limits.output_kill_bytes) {
      res.output_limit = true;
      break;
    }
  }
  read_records();
  if (!exited) {
    if (isolated_ && init_pid > 0) {
      // Killing init tears the namespace down; A reaps init and exits only after that.
      kill(init_pid, SIGKILL);
      siginfo_t si{};
      while (waitid(P_PID, id_t(pid), &si, WEXITED | WNOWAIT) < 0 && errno == EINTR) {
      }
    }
  }
  // Kill the group (A and B, and C unless it left the group). A is still an unreaped zombie or
  // alive, so the group id cannot have been reused.
  kill(-pid, SIGKILL);
  int a_status = 0;
  struct rusage ru {};
  while (wait4(pid, &a_status, 0, &ru) < 0 && errno == EINTR) {
  }
  // A's usage includes everything it reaped: init, which reaped the whole namespace.
  const double a_cpu = double(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
                       1e-6 * double(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec);
  res.cpu_seconds = std::max(res.cpu_seconds, a_cpu);
  if (out_r.fd >= 0) drain(out_r, res.out, res.out_bytes);
  if (err_r.fd >= 0) drain(err_r, res.err, res.err_bytes);
  read_records();

  // The child chain's verdict: a set-up error from any step wins over the program's status
  // (a failed execve also makes the program "exit 127").
  const StatusRecord* error = nullptr;
  const StatusRecord* status = nullptr;
  for (const StatusRecord& r : records) {
    if (r.kind == 'E' && error == nullptr) error = &r;
    if (r.kind == 'S') status = &r;
  }
  res.wall_seconds = seconds_since(t0);
  if (error != nullptr) {
    res.setup_error = fmt::format("sandbox set-up failed at {}: {} (argv[0]={})", error->what,
                                  std::strerror(error->value), spec.argv[0]);
  } else if (status != nullptr) {
    const int st = status->value;
    if (WIFEXITED(st)) res.exit_code = WEXITSTATUS(st);
    else if (WIFSIGNALED(st)) res.term_signal = WTERMSIG(st);
  } else if (!res.timed_out && !res.output_limit) {
    res.setup_error = "sandbox init ended without reporting the program's status";
  }
  return res;
}

}  // namespace loom::eval
