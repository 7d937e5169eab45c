#include "queue/sqlite.hpp"

#include <fmt/format.h>
#include <sqlite3.h>
#include <algorithm>
#include <climits>
#include <cstring>

namespace diskferry::sqlite {

namespace {

int primary(int rc) {
  return rc & 0xff;
}

}  // namespace

bool DbError::transient() const noexcept {
  return primary(code_) == SQLITE_BUSY || primary(code_) == SQLITE_LOCKED;
}

void Db::Closer::operator()(sqlite3* db) const noexcept {
  // _v2: if a statement were still alive the connection closes when it is finalized, instead
  // of failing and leaking the handle.
  sqlite3_close_v2(db);
}

Db::Db(std::string path, std::chrono::milliseconds busy_timeout)
    : path_(std::move(path)), busy_timeout_(busy_timeout) {
  sqlite3* raw = nullptr;
  // NOMUTEX: callers serialise use of a connection themselves (Queue holds a mutex), so
  // SQLite's own per-call locking would be paid for nothing.
  int rc = sqlite3_open_v2(
      path_.c_str(), &raw,
      SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX | SQLITE_OPEN_EXRESCODE,
      nullptr);
  db_.reset(raw);  // a handle comes back even when opening fails, and must be closed
  if (!raw) throw DbError(ErrorKind::Output, path_ + ": cannot open: out of memory", rc);
  if (rc != SQLITE_OK) fail(rc, "cannot open");
  sqlite3_extended_result_codes(raw, 1);
  const auto ms = std::clamp<int64_t>(busy_timeout_.count(), 0, INT_MAX);
  sqlite3_busy_timeout(raw, static_cast<int>(ms));
}

Db::~Db() = default;

void Db::exec(const std::string& sql) {
  char* message = nullptr;
  int rc = sqlite3_exec(db_.get(), sql.c_str(), nullptr, nullptr, &message);
  sqlite3_free(message);  // the same text stays available from sqlite3_errmsg for fail()
  if (rc != SQLITE_OK) fail(rc, sql);
}

Statement Db::prepare(std::string_view sql) {
  return Statement(*this, sql);
}

int64_t Db::changes() const {
  return sqlite3_changes64(db_.get());
}

int64_t Db::last_insert_rowid() const {
  return sqlite3_last_insert_rowid(db_.get());
}

bool Db::in_transaction() const {
  return sqlite3_get_autocommit(db_.get()) == 0;
}

void Db::fail(int rc, std::string_view context) const {
  const std::string message = db_ ? sqlite3_errmsg(db_.get()) : sqlite3_errstr(rc);
  // Only for failures that come from the OS: otherwise the errno may be stale.
  const int sys = db_ ? sqlite3_system_errno(db_.get()) : 0;
  const bool from_os = primary(rc) == SQLITE_CANTOPEN || primary(rc) == SQLITE_IOERR;
  const std::string os = from_os && sys != 0 ? fmt::format(" ({})", std::strerror(sys)) : "";
  // The SQL is for whoever debugs a failure, after the part a user reads; keep it short.
  std::string where(context.substr(0, 60));
  std::replace(where.begin(), where.end(), '\n', ' ');
  if (context.size() > 60) where += "...";
  switch (primary(rc)) {
    case SQLITE_BUSY:
      throw DbError(ErrorKind::Output,
                    fmt::format("{}: the database is locked by another process (gave up after "
                                "waiting {} ms)",
                                path_, busy_timeout_.count()),
                    rc);
    case SQLITE_NOTADB:
    case SQLITE_CORRUPT:
      throw DbError(ErrorKind::Input,
                    fmt::format("{}: not a valid SQLite database, or corrupt: {} [{}]", path_,
                                message, where),
                    rc);
    case SQLITE_CONSTRAINT:
      throw DbError(ErrorKind::Internal, fmt::format("{}: {} [{}]", path_, message, where), rc);
    case SQLITE_CANTOPEN:
      throw DbError(ErrorKind::Output, fmt::format("{}: cannot open: {}{}", path_, message, os),
                    rc);
    default:
      throw DbError(ErrorKind::Output, fmt::format("{}: {}{} [{}]", path_, message, os, where), rc);
  }
}

void Statement::Finalizer::operator()(sqlite3_stmt* stmt) const noexcept {
  sqlite3_finalize(stmt);
}

Statement::Statement(Db& db, std::string_view sql) : db_(&db) {
  sqlite3_stmt* raw = nullptr;
  int rc =
      sqlite3_prepare_v3(db.db_.get(), sql.data(), static_cast<int>(sql.size()), 0, &raw, nullptr);
  stmt_.reset(raw);
  if (rc != SQLITE_OK) db.fail(rc, sql);
  // Whitespace or a comment compiles to no statement; that is a bug in the caller's SQL.
  if (!raw) throw DbError(ErrorKind::Internal, db.path() + ": empty SQL statement", SQLITE_MISUSE);
}

Statement::~Statement() = default;

void Statement::check_bind(int rc, int index) const {
  if (rc != SQLITE_OK)
    db_->fail(rc, fmt::format("binding ?{} of {}", index, sqlite3_sql(stmt_.get())));
}

Statement& Statement::bind(int index, int64_t value) {
  check_bind(sqlite3_bind_int64(stmt_.get(), index, value), index);
  return *this;
}

Statement& Statement::bind(int index, std::string_view value) {
  // TRANSIENT: SQLite copies the text, so the caller's string may go away before step().
  // A null data pointer would bind NULL, not "" (an empty string_view may have one).
  const char* data = value.data() ? value.data() : "";
  check_bind(
      sqlite3_bind_text64(stmt_.get(), index, data, value.size(), SQLITE_TRANSIENT, SQLITE_UTF8),
      index);
  return *this;
}

Statement& Statement::bind(int index, std::nullopt_t) {
  check_bind(sqlite3_bind_null(stmt_.get(), index), index);
  return *this;
}

bool Statement::step() {
  int rc = sqlite3_step(stmt_.get());
  if (rc == SQLITE_ROW) return true;
  if (rc == SQLITE_DONE) return false;
  db_->fail(rc, sqlite3_sql(stmt_.get()));
}

void Statement::run() {
  while (step()) {
  }
}

void Statement::reset() {
  sqlite3_reset(stmt_.get());  // its result code repeats the last step's, already reported
  sqlite3_clear_bindings(stmt_.get());
}

bool Statement::is_null(int column) const {
  return sqlite3_column_type(stmt_.get(), column) == SQLITE_NULL;
}

int64_t Statement::int64(int column) const {
  return sqlite3_column_int64(stmt_.get(), column);
}

std::optional<int64_t> Statement::opt_int64(int column) const {
  if (is_null(column)) return std::nullopt;
  return int64(column);
}

std::string Statement::text(int column) const {
  const auto* data = sqlite3_column_text(stmt_.get(), column);
  if (!data) return {};
  // Bytes after text(): the conversion to text may change the size.
  const int size = sqlite3_column_bytes(stmt_.get(), column);
  return std::string(reinterpret_cast<const char*>(data), static_cast<size_t>(size));
}

Transaction::Transaction(Db& db, Mode mode) : db_(db) {
  switch (mode) {
    case Mode::Deferred:
      db_.exec("BEGIN DEFERRED");
      break;
    case Mode::Immediate:
      db_.exec("BEGIN IMMEDIATE");
      break;
    case Mode::Exclusive:
      db_.exec("BEGIN EXCLUSIVE");
      break;
  }
}

Transaction::~Transaction() {
  // Some errors (I/O, full disk, busy during commit) already rolled SQLite back; a second
  // ROLLBACK would only fail. Nothing can be reported from a destructor anyway.
  if (!open_ || !db_.in_transaction()) return;
  try {
    db_.exec("ROLLBACK");
  } catch (const DbError&) {
  }
}

void Transaction::commit() {
  db_.exec("COMMIT");
  open_ = false;
}

}  // namespace diskferry::sqlite
