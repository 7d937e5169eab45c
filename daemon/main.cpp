// diskferryd: the backup daemon. The job queue arrives with the daemon issue; until then it
// only identifies itself, so packaging and units can already refer to it.
#include <cstdio>
#include <cstring>

#include "version.hpp"

int main(int argc, char** argv) {
  if (argc > 1 && std::strcmp(argv[1], "--version") == 0) {
    std::printf("diskferryd %s\n", DISKFERRY_VERSION);
    return 0;
  }
  std::fprintf(stderr,
               "diskferryd: the job queue is not implemented yet; use 'diskferry convert'\n");
  return 1;
}
