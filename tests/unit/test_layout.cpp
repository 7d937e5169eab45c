#include <doctest/doctest.h>

#include "format/alloc_runs.hpp"
#include "image/layout.hpp"
#include "util/error.hpp"

using namespace diskferry;

TEST_CASE("rbd diff layout: exists true/false, strings or booleans") {
  auto v = parse_rbd_layout(
      R"([{"offset":0,"length":4194304,"exists":"true"},
          {"offset":4194304,"length":4194304,"exists":"false"},
          {"offset":8388608,"length":100,"exists":true},
          {"offset":9000000,"length":0,"exists":"true"}])",
      "l.json");
  REQUIRE(v.size() == 2);
  CHECK(v[0].offset == 0);
  CHECK(v[0].length == 4194304);
  CHECK(v[1].offset == 8388608);
}

TEST_CASE("rbd diff layout: malformed input names the file and the entry") {
  CHECK_THROWS_WITH_AS(parse_rbd_layout("[", "l.json"), doctest::Contains("l.json"), Error);
  CHECK_THROWS_WITH_AS(parse_rbd_layout("{}", "l.json"), doctest::Contains("array"), Error);
  CHECK_THROWS_WITH_AS(parse_rbd_layout(R"([1])", "l.json"), doctest::Contains("entry 0"), Error);
  CHECK_THROWS_WITH_AS(
      parse_rbd_layout(R"([{"offset":0,"length":1},{"offset":-1,"length":1}])", "l.json"),
      doctest::Contains("entry 1"), Error);
  CHECK_THROWS_WITH_AS(parse_rbd_layout(R"([{"offset":18446744073709551615,"length":2}])", "l"),
                       doctest::Contains("overflows"), Error);
  CHECK_THROWS_WITH_AS(parse_rbd_layout(R"([{"offset":0,"length":1,"exists":"maybe"}])", "l"),
                       doctest::Contains("exists"), Error);
}

TEST_CASE("AllocRuns keeps runs and walks them in order") {
  AllocRuns r;
  for (uint64_t i : {1, 2, 3, 7, 8, 100}) r.add(i);
  CHECK(r.total() == 6);
  REQUIRE(r.runs().size() == 3);
  CHECK(r.runs()[0].count == 3);
  AllocRuns::Cursor c(r);
  std::vector<uint64_t> seen;
  while (auto v = c.peek()) {
    seen.push_back(*v);
    c.advance();
  }
  CHECK(seen == std::vector<uint64_t>{1, 2, 3, 7, 8, 100});
}
