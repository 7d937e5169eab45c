// Prune selection as Proxmox Backup Server implements it (proxmox-backup,
// pbs-datastore/src/prune.rs: compute_prune_info + mark_selections; documented in the PBS manual,
// "Maintenance Tasks > Pruning"), so an admin's PBS intuition and its prune simulator carry over:
//
//  * Backups are walked newest first; the rules run in the order keep-last, keep-daily,
//    keep-weekly, keep-monthly (PBS's keep-hourly and keep-yearly are not offered).
//  * A rule first collects the periods of every backup an earlier rule kept, and skips backups in
//    those periods without counting them: they are left for later rules.
//  * Otherwise the first (newest) backup of a new period is kept, until the rule has kept N;
//    at the N+1st new period the rule stops.
//  * Older backups in a period the rule already kept are marked for removal there and then, so
//    later rules do not see them either (this is why daily=1, weekly=1, monthly=1 over
//    11-22, 11-29, 12-01, 12-04 (2019) keeps 11-22 for November, not 11-29: 11-29 fell in the
//    week 12-01 was kept for).
//  * What no rule marked is removed.
//
// Deliberate differences: periods are UTC (PBS uses the server's local time), and keep-last
// counts backups, not distinct timestamps (PBS's backup directories cannot share a timestamp;
// two of our backups can, and keep-last 2 must then keep both).
#include "job/retention.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <functional>
#include <map>
#include <set>

namespace diskferry {
namespace {

using std::chrono::days;
using std::chrono::floor;
using std::chrono::sys_days;
using std::chrono::year_month_day;

year_month_day utc_date(std::chrono::system_clock::time_point t) {
  return year_month_day{floor<days>(t)};
}

std::string day_of(std::chrono::system_clock::time_point t) {
  auto d = utc_date(t);
  return fmt::format("{:04}-{:02}-{:02}", static_cast<int>(d.year()),
                     static_cast<unsigned>(d.month()), static_cast<unsigned>(d.day()));
}

// ISO 8601: a week belongs to the year its Thursday falls in, so 2024-12-30 is 2025-W01 and
// 2021-01-03 is 2020-W53 (strftime's %G-W%V, which PBS uses).
std::string iso_week_of(std::chrono::system_clock::time_point t) {
  sys_days d = floor<days>(t);
  unsigned iso_weekday = std::chrono::weekday{d}.iso_encoding();  // Monday 1 .. Sunday 7
  sys_days thursday = d + days{4 - static_cast<int>(iso_weekday)};
  std::chrono::year y = year_month_day{thursday}.year();
  auto week = (thursday - sys_days{y / std::chrono::January / 1}).count() / 7 + 1;
  return fmt::format("{:04}-W{:02}", static_cast<int>(y), static_cast<long long>(week));
}

std::string month_of(std::chrono::system_clock::time_point t) {
  auto d = utc_date(t);
  return fmt::format("{:04}-{:02}", static_cast<int>(d.year()), static_cast<unsigned>(d.month()));
}

enum class Mark { None, Keep, Remove };

struct Marked {
  Backup backup;
  Mark mark = Mark::None;
  std::string reason;
};

// One pass of PBS's mark_selections. `period` maps a backup to the period it stands for; for
// keep-last every backup is its own period.
void apply_rule(std::vector<Marked>& list, unsigned keep, const char* label, bool per_backup,
                const std::function<std::string(size_t)>& period) {
  if (keep == 0) return;
  std::set<std::string> covered_earlier;
  for (size_t i = 0; i < list.size(); ++i)
    if (list[i].mark == Mark::Keep) covered_earlier.insert(period(i));

  std::map<std::string, size_t> kept;  // period -> the backup this rule keeps for it
  for (size_t i = 0; i < list.size(); ++i) {
    Marked& b = list[i];
    if (b.mark != Mark::None) continue;
    std::string p = period(i);
    if (covered_earlier.count(p)) continue;
    auto it = kept.find(p);
    if (it == kept.end()) {
      if (kept.size() >= keep) break;
      kept.emplace(p, i);
      b.mark = Mark::Keep;
      b.reason =
          per_backup ? fmt::format("{} {}", label, kept.size()) : fmt::format("{} {}", label, p);
    } else {
      b.mark = Mark::Remove;
      b.reason =
          fmt::format("{} {} keeps a newer backup ({})", label, p, list[it->second].backup.name);
    }
  }
}

}  // namespace

RetentionPlan plan_retention(std::vector<Backup> backups, const RetentionPolicy& policy) {
  std::vector<Marked> list;
  list.reserve(backups.size());
  for (auto& b : backups) list.push_back({std::move(b), Mark::None, {}});
  std::stable_sort(list.begin(), list.end(), [](const Marked& a, const Marked& b) {
    if (a.backup.time != b.backup.time) return a.backup.time > b.backup.time;
    return a.backup.name > b.backup.name;
  });

  if (!policy.keeps_something()) {
    for (auto& b : list) {
      b.mark = Mark::Keep;
      b.reason = "no retention rule set";
    }
  } else {
    auto time_of = [&](size_t i) { return list[i].backup.time; };
    apply_rule(list, policy.keep_last, "keep-last", true,
               [](size_t i) { return std::to_string(i); });
    apply_rule(list, policy.keep_daily, "daily", false,
               [&](size_t i) { return day_of(time_of(i)); });
    apply_rule(list, policy.keep_weekly, "weekly", false,
               [&](size_t i) { return iso_week_of(time_of(i)); });
    apply_rule(list, policy.keep_monthly, "monthly", false,
               [&](size_t i) { return month_of(time_of(i)); });
  }

  // The first enabled rule always keeps the newest backup, so this never fires; it is here so
  // that a future rule or a bug cannot turn a prune into the loss of the last good backup.
  if (!list.empty() && list.front().mark != Mark::Keep) {
    list.front().mark = Mark::Keep;
    list.front().reason = "newest backup";
  }

  RetentionPlan plan;
  for (auto& b : list) {
    if (b.mark == Mark::Keep) {
      plan.keep.push_back({std::move(b.backup), std::move(b.reason)});
    } else {
      plan.remove.push_back(
          {std::move(b.backup), b.mark == Mark::Remove ? std::move(b.reason) : "no rule keeps it"});
    }
  }
  return plan;
}

}  // namespace diskferry
