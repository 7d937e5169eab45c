// Each command registers its options on the app and returns the function that runs it.
#pragma once

#include <CLI/CLI.hpp>
#include <functional>

namespace diskferry::cli {

using Run = std::function<int()>;

Run add_convert(CLI::App& app);
Run add_measure(CLI::App& app);
Run add_test_remote(CLI::App& app);

}  // namespace diskferry::cli
