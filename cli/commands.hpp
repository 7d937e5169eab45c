// Each command registers its options on the app and returns the function that runs it.
#pragma once

#include <CLI/CLI.hpp>
#include <functional>

namespace diskferry::cli {

using Run = std::function<int()>;

Run add_convert(CLI::App& app);
Run add_measure(CLI::App& app);
Run add_test_remote(CLI::App& app);
// The queue (jobs.cpp).
Run add_enqueue(CLI::App& app);
Run add_list(CLI::App& app);
Run add_show(CLI::App& app);
Run add_cancel(CLI::App& app);
Run add_retry(CLI::App& app);
Run add_prune(CLI::App& app);
Run add_check_config(CLI::App& app);
Run add_status(CLI::App& app);
// What is on a remote (verify.cpp).
Run add_verify(CLI::App& app);
Run add_ls(CLI::App& app);

}  // namespace diskferry::cli
