// A small RAII layer over the SQLite C API for lib/queue (and its tests): one connection, prepared
// statements with bound values, and a transaction that rolls back unless committed. Values only
// ever reach SQL through bind(); the only SQL text built at run time is made of constants.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

#include "util/error.hpp"

struct sqlite3;
struct sqlite3_stmt;

namespace diskferry::sqlite {

// Every SQLite failure, with a message naming the database file and the cause. Kind: Input for
// a file that is not a (valid) database, Internal for a violated constraint, Output otherwise.
class DbError : public Error {
 public:
  DbError(ErrorKind kind, const std::string& message, int code)
      : Error(kind, message), code_(code) {}
  int code() const noexcept { return code_; }  // extended SQLite result code
  // Busy or locked: another process held the lock for longer than the busy timeout.
  bool transient() const noexcept override;

 private:
  int code_;
};

class Statement;

class Db {
 public:
  // Opens (creating if missing) the database file. busy_timeout is how long a statement waits
  // for a lock held by another connection before failing with "locked by another process".
  Db(std::string path, std::chrono::milliseconds busy_timeout);
  // Statements point at their Db, so it stays where it was opened.
  Db(const Db&) = delete;
  Db& operator=(const Db&) = delete;
  ~Db();

  const std::string& path() const { return path_; }
  // For SQL that carries no values: pragmas with constant arguments, DDL, BEGIN/COMMIT.
  void exec(const std::string& sql);
  Statement prepare(std::string_view sql);
  int64_t changes() const;
  int64_t last_insert_rowid() const;
  bool in_transaction() const;

  // Throws the DbError for result code rc; `context` says what was being done.
  [[noreturn]] void fail(int rc, std::string_view context) const;

 private:
  friend class Statement;
  struct Closer {
    void operator()(sqlite3* db) const noexcept;
  };
  std::string path_;
  std::chrono::milliseconds busy_timeout_;
  std::unique_ptr<sqlite3, Closer> db_;
};

class Statement {
 public:
  Statement(Statement&&) noexcept = default;
  Statement& operator=(Statement&&) noexcept = default;
  ~Statement();

  // Parameters are numbered from 1, as in SQL (?1, ?2, ...).
  Statement& bind(int index, int64_t value);
  Statement& bind(int index, std::string_view value);
  Statement& bind(int index, std::nullopt_t);
  template <class T>
  Statement& bind(int index, const std::optional<T>& value) {
    return value ? bind(index, *value) : bind(index, std::nullopt);
  }
  // Binds the arguments to ?1, ?2, ... in order.
  template <class... Args>
  Statement& bind_all(const Args&... args) {
    int index = 0;
    (bind(++index, args), ...);
    return *this;
  }

  // True while there is a row to read, false once the statement is done.
  bool step();
  // Runs a statement that returns no rows (or whose rows do not matter).
  void run();
  void reset();

  bool is_null(int column) const;
  int64_t int64(int column) const;
  std::optional<int64_t> opt_int64(int column) const;
  std::string text(int column) const;  // "" for NULL

 private:
  friend class Db;
  Statement(Db& db, std::string_view sql);
  void check_bind(int rc, int index) const;

  struct Finalizer {
    void operator()(sqlite3_stmt* stmt) const noexcept;
  };
  Db* db_;
  std::unique_ptr<sqlite3_stmt, Finalizer> stmt_;
};

// BEGIN on construction, ROLLBACK on destruction unless commit() succeeded. Writers use
// Immediate: it takes the write lock up front (waiting up to the busy timeout), so a transaction
// never has to upgrade a read lock, which SQLite cannot wait for and fails at once.
class Transaction {
 public:
  enum class Mode { Deferred, Immediate, Exclusive };
  explicit Transaction(Db& db, Mode mode = Mode::Immediate);
  Transaction(const Transaction&) = delete;
  Transaction& operator=(const Transaction&) = delete;
  ~Transaction();
  void commit();

 private:
  Db& db_;
  bool open_ = true;
};

}  // namespace diskferry::sqlite
