// apps/loom/cli.h: how a subcommand joins the `loom` binary.
//
// Each apps/loom/cmd_*.cpp registers itself with LOOM_REGISTER_COMMAND(name, adder); `adder`
// receives the root CLI::App and adds its subcommand (use subcommand_path() for nested ones such
// as `eval loss` and `eval humaneval-x`, so two files can share the `eval` parent). The callback
// of a subcommand sets ctx.exit_code. loom::Error thrown from a callback is printed by main() as
// "error: <message>" and the process exits with status 1.
#pragma once

#include <CLI/CLI.hpp>

#include <cstdlib>
#include <string>

namespace loom::comm {
class ProcessGroup;
}

namespace loom::cli {

struct Context {
  int exit_code = 0;
};

using CommandAdder = void (*)(CLI::App& root, Context& ctx);

struct CommandRegistration {
  CommandRegistration(const char* name, CommandAdder adder);
};

// Returns the subcommand `name` of `parent`, creating it (with `description`) if missing.
CLI::App* subcommand_path(CLI::App& parent, const std::string& name,
                          const std::string& description);

// True when an MPI launcher (Open MPI's mpirun, or a PMI-based one such as srun) started us.
inline bool launched_by_mpi() {
  return std::getenv("OMPI_COMM_WORLD_SIZE") || std::getenv("PMI_SIZE") || std::getenv("PMIX_RANK");
}

// `loom calibrate`'s measurement (cmd_calibrate.cpp): measures this host, and the collectives
// over `world` when it is valid (a collective over it), and writes the cluster file `out` from
// world rank 0. `loom train --auto` calls it when its cluster file is missing.
void calibrate_to_file(const std::string& out, bool quick, const loom::comm::ProcessGroup& world);

}  // namespace loom::cli

#define LOOM_REGISTER_COMMAND(name, adder) \
  static ::loom::cli::CommandRegistration loom_cli_registration_##name(#name, adder)
