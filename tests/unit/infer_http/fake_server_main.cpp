// tests/unit/infer_http/fake_server_main.cpp: the real HttpServer over the scripted FakeService,
// as a process, for the clients that test the server from outside (the openai client test, the
// load test's self-check). Prints "PORT <n>" once it listens; SIGTERM/SIGINT drain and exit 0,
// as `loom serve` does.
//   infer_http_fake_server [--port N] [--step-ms MS] [--context N] [--api-key K]
#include <signal.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "infer/http/server.h"
#include "unit/infer_http/fake_service.h"

int main(int argc, char** argv) {
  loom::infer::testing::FakeService::Options fo;
  fo.context = 4096;
  loom::infer::ServerOptions so;
  so.port = 0;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string k = argv[i];
    if (k == "--port") so.port = std::atoi(argv[i + 1]);
    else if (k == "--step-ms") fo.step_ms = std::atoi(argv[i + 1]);
    else if (k == "--context") fo.context = std::atoll(argv[i + 1]);
    else if (k == "--api-key") so.api_key = argv[i + 1];
    else {
      std::fprintf(stderr, "unknown option %s\n", argv[i]);
      return 2;
    }
  }
  sigset_t stop;
  sigemptyset(&stop);
  sigaddset(&stop, SIGTERM);
  sigaddset(&stop, SIGINT);
  pthread_sigmask(SIG_BLOCK, &stop, nullptr);
  loom::infer::testing::FakeService service(fo);
  loom::infer::HttpServer server(service, so);
  server.start();
  std::printf("PORT %d\n", server.port());
  std::fflush(stdout);
  int sig = 0;
  sigwait(&stop, &sig);
  server.shutdown(true);
  return 0;
}
