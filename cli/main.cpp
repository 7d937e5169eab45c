// diskferry: the command-line front end. Parses arguments, calls the library, prints.
#include <fmt/format.h>
#include <CLI/CLI.hpp>
#include <csignal>
#include <cstdio>
#include <string>
#include <utility>
#include <vector>

#include "commands.hpp"
#include "util/error.hpp"
#include "version.hpp"

int main(int argc, char** argv) {
  // A closed pipe downstream (`| head`) is a write error to report, not a silent death.
  std::signal(SIGPIPE, SIG_IGN);
  CLI::App app{"diskferry: stream VM disk images into qcow2/VHDX backups, no temporary disk"};
  app.set_version_flag("--version", std::string("diskferry ") + DISKFERRY_VERSION);
  app.require_subcommand(1);
  std::vector<std::pair<std::string, diskferry::cli::Run>> cmds;
  cmds.emplace_back("convert", diskferry::cli::add_convert(app));
  cmds.emplace_back("measure", diskferry::cli::add_measure(app));
  cmds.emplace_back("test-remote", diskferry::cli::add_test_remote(app));
  cmds.emplace_back("enqueue", diskferry::cli::add_enqueue(app));
  cmds.emplace_back("list", diskferry::cli::add_list(app));
  cmds.emplace_back("show", diskferry::cli::add_show(app));
  cmds.emplace_back("cancel", diskferry::cli::add_cancel(app));
  cmds.emplace_back("retry", diskferry::cli::add_retry(app));
  cmds.emplace_back("prune", diskferry::cli::add_prune(app));
  cmds.emplace_back("check-config", diskferry::cli::add_check_config(app));
  cmds.emplace_back("status", diskferry::cli::add_status(app));
  cmds.emplace_back("verify", diskferry::cli::add_verify(app));
  cmds.emplace_back("ls", diskferry::cli::add_ls(app));
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForVersion& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    fmt::print(stderr, "diskferry: {}\nRun 'diskferry --help' or 'diskferry COMMAND --help'.\n",
               e.what());
    return 2;
  }
  try {
    for (auto& [name, run] : cmds)
      if (app.got_subcommand(name)) return run();
  } catch (const diskferry::Error& e) {
    fmt::print(stderr, "diskferry: {}\n", e.what());
    return e.kind() == diskferry::ErrorKind::Usage ? 2 : 1;
  } catch (const std::exception& e) {
    fmt::print(stderr, "diskferry: {}\n", e.what());
    return 1;
  }
  return 2;
}
