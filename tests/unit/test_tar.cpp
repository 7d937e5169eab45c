// The tar container's headers, checked against what GNU tar and Python's tarfile read in the
// integration tests; here the parts those cannot isolate: pax record lengths at digit
// boundaries, checksums, the archive size formula.
#include <doctest/doctest.h>

#include <cstring>
#include <string>

#include "format/tar.hpp"

using namespace diskferry;

namespace {
unsigned checksum_of(const std::string& block) {
  unsigned sum = 0;
  for (size_t i = 0; i < 512; ++i)
    sum += (i >= 148 && i < 156) ? ' ' : static_cast<unsigned char>(block[i]);
  return sum;
}
}  // namespace

TEST_CASE("tar: a plain ustar header") {
  auto h = tar_member_header("vm.qcow2", 12345, 1700000000);
  REQUIRE(h.size() == 512);
  CHECK(h.substr(0, 9) == std::string("vm.qcow2\0", 9));
  CHECK(h.substr(124, 12) == std::string("00000030071\0", 12));
  CHECK(h[156] == '0');
  CHECK(h.substr(257, 6) == std::string("ustar\0", 6));
  CHECK(std::stoul(h.substr(148, 6), nullptr, 8) == checksum_of(h));
}

TEST_CASE("tar: sizes beyond 8 GiB get a pax size record and a base-256 field") {
  uint64_t size = 9663676416ull;
  auto h = tar_member_header("big.img", size, 0);
  REQUIRE(h.size() == 3 * 512);  // pax header, its records, the member's header
  CHECK(h[156] == 'x');
  std::string rec = h.substr(512, h.find('\n', 512) - 512 + 1);
  CHECK(rec == "19 size=9663676416\n");
  CHECK(std::stoul(rec) == rec.size());
  const std::string m = h.substr(1024);
  CHECK(static_cast<unsigned char>(m[124]) == 0x80);
  uint64_t v = 0;
  for (int i = 128; i < 136; ++i) v = v << 8 | static_cast<unsigned char>(m[i]);
  CHECK(v == size);
  CHECK(std::stoul(m.substr(148, 6), nullptr, 8) == checksum_of(m));
  // The largest size ustar holds needs no pax header.
  CHECK(tar_member_header("x", 077777777777ull, 0).size() == 512);
  CHECK(tar_member_header("x", 077777777777ull + 1, 0).size() == 3 * 512);
}

TEST_CASE("tar: pax record lengths count their own digits, also across a digit boundary") {
  // "LEN path=NAME\n": LEN is 2 digits up to 99 bytes, then 3.
  for (size_t n = 101; n < 400; ++n) {
    std::string name(n, 'a');
    auto h = tar_member_header(name, 1, 0);
    std::string rec = h.substr(512, h.find('\n', 512) - 512 + 1);
    CAPTURE(n);
    CHECK(std::stoul(rec) == rec.size());
    CHECK(rec.find(" path=" + name + "\n") != std::string::npos);
  }
}

TEST_CASE("tar: the archive size is headers, padded members, the end marker, whole records") {
  ContainerOptions c;
  c.tar = true;
  c.image_name = "vm.qcow2";
  c.files.push_back({"vm.ovf", std::string(700, 'x'), 0});
  // 512 + 1024 (ovf) + 512 + image padded + 1024, rounded up to 10240.
  CHECK(tar_size(c, 0) == 10240);
  CHECK(tar_size(c, 1) == 10240);
  CHECK(tar_size(c, 10240 - 512 * 6) == 10240);
  CHECK(tar_size(c, 10240 - 512 * 6 + 1) == 20480);
}

TEST_CASE("tar: member names that would escape the directory are refused") {
  for (const char* bad : {"", "/etc/passwd", "..", "../x", "a/../../x"})
    CHECK_THROWS(tar_member_header(bad, 1, 0));
  CHECK_NOTHROW(tar_member_header("dir/vm.qcow2", 1, 0));
}
