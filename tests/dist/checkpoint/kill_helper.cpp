// tests/dist/checkpoint/kill_helper.cpp: the save a multi-rank kill test interrupts.
//   kill_helper save DIR VERSION   (under mpirun) each rank saves its dealt pieces of VERSION
//   kill_helper check DIR          (one process, no MPI) prints the version DIR loads as, after
//                                  checking every tensor against that version bit for bit;
//                                  exits 1 on any mismatch or error
#include <cstdio>
#include <deque>
#include <string>

#include "checkpoint/sharded.h"
#include "comm/mpi_runtime.h"
#include "comm/process_group.h"
#include "unit/checkpoint/ck_helpers.h"

using namespace loom::checkpoint;
using namespace loom::checkpoint::test;

namespace {
const char* kKinds[] = {"weights", "m", "v"};
}

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: kill_helper save DIR VERSION | check DIR\n");
    return 2;
  }
  const std::string mode = argv[1], dir = argv[2];
  try {
    if (mode == "save") {
      loom::comm::MpiRuntime mpi(&argc, &argv);
      loom::comm::GroupOptions o;
      o.timeout_s = 20;
      loom::comm::ProcessGroup g = loom::comm::ProcessGroup::world(o);
      const int version = std::stoi(argv[3]);
      std::deque<std::vector<float>> bufs;
      ShardedWriter w(dir, &g);
      for (const char* kind : kKinds)
        for (const TestTensor& t : test_tensors()) {
          std::vector<float> full = logical_values(version, kind, t);
          std::vector<PieceSpec> pieces = layout_pieces("rows:2:2", t);
          for (size_t j = 0; j < pieces.size(); ++j)
            if (int(j % size_t(g.size())) == g.rank()) {
              bufs.push_back(reference_slice(pieces[j], full));
              w.add(kind, pieces[j], bufs.back().data());
            }
        }
      w.commit("", {{"step", version}, {"version", version}});
      return 0;
    }
    ShardedReader r(dir);
    r.verify_all();
    const int version = r.trainer_state()["version"].get<int>();
    for (const char* layout : {"whole", "cols:2:3"})
      for (const char* kind : kKinds)
        for (const TestTensor& t : test_tensors())
          for (const PieceSpec& p : layout_pieces(layout, t)) {
            std::vector<float> got(size_t(p.hi - p.lo));
            r.read(kind, p, got.data());
            if (!same_bits(got, reference_slice(p, logical_values(version, kind, t)))) {
              std::fprintf(stderr, "version %d: %s %s differs\n", version, kind, t.name.c_str());
              return 1;
            }
          }
    std::printf("%d\n", version);
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "kill_helper %s: %s\n", mode.c_str(), e.what());
    return 1;
  }
}
