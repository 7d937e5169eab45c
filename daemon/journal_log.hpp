// Where diskferryd's log goes: the systemd journal, with the job's fields, when stderr is the
// journal (systemd sets JOURNAL_STREAM); stderr with timestamps otherwise.
#pragma once

#include <cstdint>
#include <string>

namespace diskferry {

// The job a worker thread is running, attached to every log record that thread writes, so
// `journalctl -u diskferryd JOB_ID=42` or `SOURCE=web01` selects one job's lines.
struct LogContext {
  int64_t job_id = 0;  // 0: none
  std::string source, remote;
};

// Sets the calling thread's context for its lifetime, then clears it.
class ScopedLogContext {
 public:
  explicit ScopedLogContext(LogContext c);
  ~ScopedLogContext();
  ScopedLogContext(const ScopedLogContext&) = delete;
  ScopedLogContext& operator=(const ScopedLogContext&) = delete;
};

// True when stderr is the journal stream systemd gave this process (the device and inode in
// JOURNAL_STREAM are stderr's): then native journal records replace stderr lines.
bool stderr_is_journal();

// Installs the default spdlog logger named `ident`: journal records (MESSAGE, PRIORITY,
// SYSLOG_IDENTIFIER, JOB_ID, SOURCE, REMOTE) when stderr_is_journal(), else stderr lines.
void setup_logging(const std::string& ident);

}  // namespace diskferry
