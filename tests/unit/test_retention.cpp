#include <doctest/doctest.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "job/retention.hpp"

using namespace diskferry;

namespace {

// "2019-12-04T11:59:15Z" -> a backup named so, at that UTC time.
Backup at(const std::string& iso) {
  int y = 0, mo = 0, d = 0, h = 0, mi = 0, s = 0;
  REQUIRE(std::sscanf(iso.c_str(), "%d-%d-%dT%d:%d:%dZ", &y, &mo, &d, &h, &mi, &s) == 6);
  using namespace std::chrono;
  sys_days day = year{y} / mo / d;
  return {iso, day + hours{h} + minutes{mi} + seconds{s}};
}

std::vector<Backup> list(std::initializer_list<const char*> isos) {
  std::vector<Backup> v;
  for (const char* s : isos) v.push_back(at(s));
  return v;
}

std::vector<std::string> names(const std::vector<RetentionDecision>& ds) {
  std::vector<std::string> v;
  for (const auto& d : ds) v.push_back(d.backup.name);
  std::sort(v.begin(), v.end());
  return v;
}

std::string reason_of(const RetentionPlan& p, const std::string& name) {
  for (const auto* side : {&p.keep, &p.remove})
    for (const auto& d : *side)
      if (d.backup.name == name) return d.reason;
  return "(not in plan)";
}

RetentionPolicy policy(unsigned last, unsigned daily, unsigned weekly, unsigned monthly) {
  return {last, daily, weekly, monthly};
}

using Names = std::vector<std::string>;

}  // namespace

TEST_SUITE("retention") {
  // The vectors of proxmox-backup's tests/prune.rs (test_prune_simple), minus hourly/yearly.
  TEST_CASE("PBS test_prune_simple: keep-last, keep-daily, keep-weekly, keep-monthly") {
    auto orig = list({"2019-12-02T11:59:15Z", "2019-12-03T11:59:15Z", "2019-12-04T11:59:15Z",
                      "2019-12-04T12:59:15Z"});
    auto removed = [&](RetentionPolicy p) { return names(plan_retention(orig, p).remove); };

    CHECK(removed(policy(4, 0, 0, 0)) == Names{});
    CHECK(removed(policy(3, 0, 0, 0)) == Names{"2019-12-02T11:59:15Z"});
    CHECK(removed(policy(2, 0, 0, 0)) == Names{"2019-12-02T11:59:15Z", "2019-12-03T11:59:15Z"});
    CHECK(removed(policy(1, 0, 0, 0)) ==
          Names{"2019-12-02T11:59:15Z", "2019-12-03T11:59:15Z", "2019-12-04T11:59:15Z"});
    CHECK(removed(policy(2, 2, 0, 0)) == Names{});
    CHECK(removed(policy(0, 3, 0, 0)) == Names{"2019-12-04T11:59:15Z"});
    CHECK(removed(policy(0, 2, 0, 0)) == Names{"2019-12-02T11:59:15Z", "2019-12-04T11:59:15Z"});
    // All in one ISO week (Mon 12-02 .. Wed 12-04) and one month: a single backup stays.
    Names all_but_newest{"2019-12-02T11:59:15Z", "2019-12-03T11:59:15Z", "2019-12-04T11:59:15Z"};
    CHECK(removed(policy(0, 0, 5, 0)) == all_but_newest);
    CHECK(removed(policy(0, 1, 5, 0)) == all_but_newest);
    CHECK(removed(policy(0, 0, 0, 6)) == all_but_newest);
    CHECK(removed(policy(0, 0, 5, 6)) == all_but_newest);
  }

  // test_prune_simple2: each rule skips the periods earlier rules covered, and backups an
  // earlier rule removed are invisible to later ones.
  TEST_CASE("PBS test_prune_simple2: rules hand over to each other") {
    auto orig = list({"2018-11-15T11:59:15Z", "2019-11-15T11:59:15Z", "2019-11-21T11:59:15Z",
                      "2019-11-22T11:59:15Z", "2019-11-29T11:59:15Z", "2019-12-01T11:59:15Z",
                      "2019-12-02T11:59:15Z", "2019-12-03T11:59:15Z", "2019-12-04T11:59:15Z"});
    auto kept = [&](RetentionPolicy p) { return names(plan_retention(orig, p).keep); };

    CHECK(kept(policy(0, 1, 0, 0)) == Names{"2019-12-04T11:59:15Z"});
    CHECK(kept(policy(1, 1, 0, 0)) == Names{"2019-12-03T11:59:15Z", "2019-12-04T11:59:15Z"});
    CHECK(kept(policy(0, 1, 1, 0)) == Names{"2019-12-01T11:59:15Z", "2019-12-04T11:59:15Z"});
    // 11-29 is in 2019-W48 with 12-01, which weekly kept, so weekly removed it and monthly keeps
    // 11-22 for November.
    auto p = plan_retention(orig, policy(0, 1, 1, 1));
    CHECK(names(p.keep) ==
          Names{"2019-11-22T11:59:15Z", "2019-12-01T11:59:15Z", "2019-12-04T11:59:15Z"});
    CHECK(reason_of(p, "2019-12-04T11:59:15Z") == "daily 2019-12-04");
    CHECK(reason_of(p, "2019-12-01T11:59:15Z") == "weekly 2019-W48");
    CHECK(reason_of(p, "2019-11-22T11:59:15Z") == "monthly 2019-11");
    CHECK(reason_of(p, "2019-11-29T11:59:15Z") ==
          "weekly 2019-W48 keeps a newer backup (2019-12-01T11:59:15Z)");
    CHECK(reason_of(p, "2018-11-15T11:59:15Z") == "no rule keeps it");
  }

  TEST_CASE("reasons name the rule and the period; lists are newest first") {
    auto p =
        plan_retention(list({"2026-11-28T10:00:00Z", "2026-11-30T09:00:00Z", "2026-11-30T22:00:00Z",
                             "2026-11-29T10:00:00Z", "2026-12-01T01:00:00Z"}),
                       policy(2, 2, 0, 0));
    REQUIRE(p.keep.size() == 4);
    CHECK(p.keep[0].backup.name == "2026-12-01T01:00:00Z");
    CHECK(p.keep[0].reason == "keep-last 1");
    CHECK(p.keep[1].backup.name == "2026-11-30T22:00:00Z");
    CHECK(p.keep[1].reason == "keep-last 2");
    // 12-01 and 11-30 are covered by keep-last, so daily starts at 11-29 and does not count them.
    CHECK(p.keep[2].reason == "daily 2026-11-29");
    CHECK(p.keep[3].reason == "daily 2026-11-28");
    REQUIRE(p.remove.size() == 1);
    CHECK(p.remove[0].backup.name == "2026-11-30T09:00:00Z");
    // Skipped by daily (its day was covered by keep-last), then nothing else wanted it.
    CHECK(p.remove[0].reason == "no rule keeps it");
  }

  TEST_CASE("earlier rules' periods are skipped without being counted") {
    auto p = plan_retention(
        list({"2026-03-05T01:00:00Z", "2026-03-05T02:00:00Z", "2026-03-05T03:00:00Z",
              "2026-03-04T01:00:00Z", "2026-03-03T01:00:00Z", "2026-03-02T01:00:00Z"}),
        policy(3, 2, 0, 0));
    CHECK(names(p.keep) == Names{"2026-03-03T01:00:00Z", "2026-03-04T01:00:00Z",
                                 "2026-03-05T01:00:00Z", "2026-03-05T02:00:00Z",
                                 "2026-03-05T03:00:00Z"});
    CHECK(names(p.remove) == Names{"2026-03-02T01:00:00Z"});
  }

  TEST_CASE("periods without backups do not count (gaps)") {
    auto backups = list({"2026-01-01T05:00:00Z", "2026-01-05T05:00:00Z", "2026-01-20T05:00:00Z",
                         "2026-01-20T04:00:00Z"});
    auto p = plan_retention(backups, policy(0, 3, 0, 0));
    CHECK(names(p.keep) ==
          Names{"2026-01-01T05:00:00Z", "2026-01-05T05:00:00Z", "2026-01-20T05:00:00Z"});
    CHECK(reason_of(p, "2026-01-20T04:00:00Z") ==
          "daily 2026-01-20 keeps a newer backup (2026-01-20T05:00:00Z)");

    // Monthly over a year with only three months that have backups: all three are kept.
    auto m = plan_retention(
        list({"2025-02-10T00:00:00Z", "2025-07-01T00:00:00Z", "2025-12-31T23:59:59Z"}),
        policy(0, 0, 0, 12));
    CHECK(m.remove.empty());
    CHECK(reason_of(m, "2025-12-31T23:59:59Z") == "monthly 2025-12");
  }

  TEST_CASE("ISO weeks across year boundaries") {
    // 2024-12-30 (Mon) .. 2025-01-05 (Sun) is 2025-W01; 2024-12-29 (Sun) ends 2024-W52.
    auto p = plan_retention(list({"2025-01-01T12:00:00Z", "2024-12-30T12:00:00Z",
                                  "2024-12-29T12:00:00Z", "2024-12-23T12:00:00Z"}),
                            policy(0, 0, 2, 0));
    CHECK(names(p.keep) == Names{"2024-12-29T12:00:00Z", "2025-01-01T12:00:00Z"});
    CHECK(reason_of(p, "2025-01-01T12:00:00Z") == "weekly 2025-W01");
    CHECK(reason_of(p, "2024-12-29T12:00:00Z") == "weekly 2024-W52");
    CHECK(reason_of(p, "2024-12-30T12:00:00Z") ==
          "weekly 2025-W01 keeps a newer backup (2025-01-01T12:00:00Z)");

    // 53-week years: 2021-01-03 (Sun) is 2020-W53, 2027-01-03 (Sun) is 2026-W53, and the
    // Monday after each starts week 1.
    auto w = [](const char* iso) {
      return reason_of(plan_retention({at(iso)}, policy(0, 0, 1, 0)), iso);
    };
    CHECK(w("2021-01-03T23:59:59Z") == "weekly 2020-W53");
    CHECK(w("2021-01-04T00:00:00Z") == "weekly 2021-W01");
    CHECK(w("2027-01-01T00:00:00Z") == "weekly 2026-W53");
    CHECK(w("2027-01-04T00:00:00Z") == "weekly 2027-W01");
    CHECK(w("2026-01-01T00:00:00Z") == "weekly 2026-W01");  // a Thursday
    CHECK(w("2008-12-29T00:00:00Z") == "weekly 2009-W01");
    CHECK(w("2010-01-03T00:00:00Z") == "weekly 2009-W53");

    // 2024-12-30 and 2025-01-01 share an ISO week but not a calendar month: monthly keeps both.
    auto m =
        plan_retention(list({"2025-01-01T12:00:00Z", "2024-12-30T12:00:00Z"}), policy(0, 0, 0, 2));
    CHECK(m.remove.empty());
  }

  TEST_CASE("periods are UTC") {
    auto p =
        plan_retention(list({"2026-11-30T23:59:59Z", "2026-12-01T00:00:00Z"}), policy(0, 2, 0, 0));
    CHECK(reason_of(p, "2026-11-30T23:59:59Z") == "daily 2026-11-30");
    CHECK(reason_of(p, "2026-12-01T00:00:00Z") == "daily 2026-12-01");
  }

  TEST_CASE("ties: same timestamp, ordered by name, whatever the input order") {
    std::vector<Backup> a{at("2026-05-05T05:05:05Z"), at("2026-05-05T05:05:05Z")};
    a[0].name = "vm-a";
    a[1].name = "vm-b";
    std::vector<Backup> b{a[1], a[0]};
    for (auto* input : {&a, &b}) {
      auto one = plan_retention(*input, policy(1, 0, 0, 0));
      CHECK(names(one.keep) == Names{"vm-b"});
      CHECK(names(one.remove) == Names{"vm-a"});
      // keep-last counts backups, not distinct timestamps (unlike PBS, where they cannot tie).
      CHECK(plan_retention(*input, policy(2, 0, 0, 0)).remove.empty());
      auto daily = plan_retention(*input, policy(0, 5, 0, 0));
      CHECK(names(daily.keep) == Names{"vm-b"});
      CHECK(reason_of(daily, "vm-a") == "daily 2026-05-05 keeps a newer backup (vm-b)");
    }
  }

  TEST_CASE("a policy with every rule off keeps everything") {
    auto backups = list({"2020-01-01T00:00:00Z", "2021-01-01T00:00:00Z", "2022-01-01T00:00:00Z"});
    auto p = plan_retention(backups, RetentionPolicy{});
    CHECK(p.remove.empty());
    CHECK(p.keep.size() == 3);
    CHECK(p.keep[0].reason == "no retention rule set");
    CHECK(plan_retention({}, policy(1, 1, 1, 1)).keep.empty());
  }

  TEST_CASE("the newest backup is always kept; keep and remove partition the input") {
    std::mt19937 rng(20261201);
    auto base = std::chrono::sys_days{std::chrono::year{2024} / 1 / 1};
    for (int round = 0; round < 500; ++round) {
      std::vector<Backup> in;
      int n = std::uniform_int_distribution<int>(1, 40)(rng);
      for (int i = 0; i < n; ++i) {
        auto offset = std::chrono::hours{std::uniform_int_distribution<int>(0, 24 * 800)(rng)};
        in.push_back({"b" + std::to_string(i), base + offset});
      }
      auto r = [&] { return std::uniform_int_distribution<unsigned>(0, 4)(rng); };
      RetentionPolicy pol = policy(r(), r(), r(), r());
      CAPTURE(round);
      auto p = plan_retention(in, pol);
      auto newest = std::max_element(in.begin(), in.end(), [](const Backup& x, const Backup& y) {
        return x.time != y.time ? x.time < y.time : x.name < y.name;
      });
      REQUIRE_FALSE(p.keep.empty());
      CHECK(p.keep.front().backup.name == newest->name);
      CHECK(p.keep.size() + p.remove.size() == in.size());
      std::set<std::string> seen;
      for (const auto* side : {&p.keep, &p.remove})
        for (const auto& d : *side) CHECK(seen.insert(d.backup.name).second);
      CHECK(seen.size() == in.size());
      if (!pol.keeps_something()) CHECK(p.remove.empty());
      // Each rule keeps at most its count.
      CHECK(p.keep.size() <= pol.keep_last + pol.keep_daily + pol.keep_weekly + pol.keep_monthly +
                                 (pol.keeps_something() ? 0 : in.size()));
    }
  }
}
