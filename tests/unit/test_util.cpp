#include <doctest/doctest.h>

#include <string>
#include <vector>

#include "util/bytes.hpp"
#include "util/crc32c.hpp"
#include "util/error.hpp"
#include "util/size.hpp"

using namespace diskferry;

TEST_CASE("parse_size accepts plain numbers and binary suffixes") {
  CHECK(parse_size("512", "x") == 512);
  CHECK(parse_size("64K", "x") == 65536);
  CHECK(parse_size("64k", "x") == 65536);
  CHECK(parse_size("32M", "x") == 32u << 20);
  CHECK(parse_size("32MiB", "x") == 32u << 20);
  CHECK(parse_size("1.5G", "x") == 3ull << 29);
  CHECK(parse_size("2T", "x") == 2ull << 40);
}

TEST_CASE("parse_size rejects what is not a size, naming the option") {
  for (const char* bad : {"", "K", "12Q", "1.3", "-5", "5 M", "64KX"}) {
    CAPTURE(bad);
    try {
      parse_size(bad, "--cluster-size");
      FAIL("accepted");
    } catch (const Error& e) {
      CHECK(e.kind() == ErrorKind::Usage);
      CHECK(std::string(e.what()).find("--cluster-size") != std::string::npos);
    }
  }
}

TEST_CASE("format_size") {
  CHECK(format_size(100) == "100 B");
  CHECK(format_size(1536) == "1.5 KiB");
  CHECK(format_size(8ull << 30) == "8.0 GiB");
}

TEST_CASE("crc32c matches the Castagnoli check value") {
  std::string s = "123456789";
  CHECK(crc32c(Bytes(reinterpret_cast<const std::byte*>(s.data()), s.size())) == 0xE3069283u);
  CHECK(crc32c(Bytes{}) == 0u);
}

TEST_CASE("is_zero finds a single set byte anywhere") {
  for (size_t n : {0u, 1u, 15u, 16u, 17u, 4096u, 65536u}) {
    std::vector<std::byte> v(n);
    CHECK(is_zero(v));
    for (size_t i : {size_t{0}, n / 2, n ? n - 1 : 0}) {
      if (!n) continue;
      v[i] = std::byte{1};
      CHECK_FALSE(is_zero(v));
      v[i] = std::byte{0};
    }
  }
}

TEST_CASE("endian helpers round-trip") {
  std::byte b[8];
  put_be64(b, 0x0102030405060708ull);
  CHECK(std::to_integer<int>(b[0]) == 1);
  CHECK(get_be64(b) == 0x0102030405060708ull);
  put_le64(b, 0x0102030405060708ull);
  CHECK(std::to_integer<int>(b[0]) == 8);
  CHECK(get_le64(b) == 0x0102030405060708ull);
  put_be32(b, 0xdeadbeef);
  CHECK(get_be32(b) == 0xdeadbeefu);
  put_le32(b, 0xdeadbeef);
  CHECK(get_le32(b) == 0xdeadbeefu);
}
