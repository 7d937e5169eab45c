#include "journal_log.hpp"

#include <spdlog/sinks/base_sink.h>
#include <spdlog/sinks/stdout_sinks.h>
#include <spdlog/spdlog.h>
#include <sys/stat.h>
#include <syslog.h>
#include <systemd/sd-journal.h>

#include <cstdio>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <string_view>

namespace diskferry {
namespace {

thread_local LogContext t_context;

int priority(spdlog::level::level_enum l) {
  switch (l) {
    case spdlog::level::trace:
    case spdlog::level::debug:
      return LOG_DEBUG;
    case spdlog::level::info:
      return LOG_INFO;
    case spdlog::level::warn:
      return LOG_WARNING;
    case spdlog::level::err:
      return LOG_ERR;
    case spdlog::level::critical:
      return LOG_CRIT;
    default:
      return LOG_INFO;
  }
}

// spdlog's own systemd_sink (1.10 in Debian 12) sends MESSAGE and PRIORITY only; the job fields
// are what makes the journal useful for a backup daemon, so this sink adds them.
class JournalSink final : public spdlog::sinks::base_sink<std::mutex> {
 public:
  explicit JournalSink(std::string ident) : ident_(std::move(ident)) {}

 protected:
  void sink_it_(const spdlog::details::log_msg& msg) override {
    std::string_view text(msg.payload.data(), msg.payload.size());
    const LogContext& c = t_context;
    int prio = priority(msg.level);
    if (c.job_id) {
      sd_journal_send("MESSAGE=%.*s", static_cast<int>(text.size()), text.data(), "PRIORITY=%d",
                      prio, "SYSLOG_IDENTIFIER=%s", ident_.c_str(), "JOB_ID=%lld",
                      static_cast<long long>(c.job_id), "SOURCE=%s", c.source.c_str(), "REMOTE=%s",
                      c.remote.c_str(), nullptr);
    } else {
      sd_journal_send("MESSAGE=%.*s", static_cast<int>(text.size()), text.data(), "PRIORITY=%d",
                      prio, "SYSLOG_IDENTIFIER=%s", ident_.c_str(), nullptr);
    }
  }
  void flush_() override {}

 private:
  std::string ident_;
};

}  // namespace

ScopedLogContext::ScopedLogContext(LogContext c) {
  t_context = std::move(c);
}
ScopedLogContext::~ScopedLogContext() {
  t_context = {};
}

bool stderr_is_journal() {
  const char* js = std::getenv("JOURNAL_STREAM");
  if (!js || !*js) return false;
  unsigned long long dev = 0, ino = 0;
  if (std::sscanf(js, "%llu:%llu", &dev, &ino) != 2) return false;
  struct stat st {};
  if (::fstat(2, &st) != 0) return false;
  return st.st_dev == dev && st.st_ino == ino;
}

void setup_logging(const std::string& ident) {
  if (stderr_is_journal()) {
    auto logger = std::make_shared<spdlog::logger>(ident, std::make_shared<JournalSink>(ident));
    spdlog::set_default_logger(logger);
    return;
  }
  spdlog::set_default_logger(spdlog::stderr_logger_mt(ident));
  spdlog::set_pattern("%Y-%m-%d %H:%M:%S %l: %v");
}

}  // namespace diskferry
