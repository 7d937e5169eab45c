// Typed errors carrying the context a user needs: which thing, and why.
#pragma once

#include <stdexcept>
#include <string>
#include <string_view>

namespace diskferry {

// The class of failure decides exit codes and (later) retry policy.
enum class ErrorKind {
  Usage,     // bad option or argument
  Input,     // source missing, unreadable, truncated or corrupt
  Output,    // destination unwritable, full, or failing
  Format,    // a request the format cannot represent
  Internal,  // a broken invariant in diskferry itself
};

class Error : public std::runtime_error {
 public:
  Error(ErrorKind kind, const std::string& message) : std::runtime_error(message), kind_(kind) {}
  ErrorKind kind() const noexcept { return kind_; }
  // Whether trying again may succeed (a dropped connection, an unreachable host), as opposed to
  // a failure that repeats (permission denied, disk full, bad input).
  virtual bool transient() const noexcept { return false; }

 private:
  ErrorKind kind_;
};

// "THING: WHAT: strerror(err)"
[[noreturn]] void throw_errno(ErrorKind kind, std::string_view thing, std::string_view what,
                              int err);

}  // namespace diskferry
