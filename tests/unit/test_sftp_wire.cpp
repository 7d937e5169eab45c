#include <doctest/doctest.h>

#include <stdlib.h>

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "transport/sftp/ssh_identities.hpp"
#include "transport/sftp/wire.hpp"

using namespace diskferry;
using namespace diskferry::sftp;

namespace {

std::vector<std::byte> body_of(const std::vector<std::byte>& packet) {
  return std::vector<std::byte>(packet.begin() + 4, packet.end());
}

}  // namespace

TEST_CASE("a WRITE request is laid out as the draft says") {
  std::vector<std::byte> data{std::byte{1}, std::byte{2}, std::byte{3}};
  PacketWriter w(kWrite, 7);
  w.str("h1").u64(0x10000).bytes(data);
  const auto& p = w.finish();
  REQUIRE(p.size() == 4 + 1 + 4 + (4 + 2) + 8 + (4 + 3));
  CHECK(get_be32(p.data()) == p.size() - 4);
  CHECK(std::to_integer<int>(p[4]) == kWrite);
  CHECK(get_be32(p.data() + 5) == 7);
  CHECK(get_be64(p.data() + 15) == 0x10000);
}

TEST_CASE("replies round-trip through the framer and the parser") {
  PacketFramer f;
  PacketWriter status(static_cast<PacketType>(kStatus), 42);
  status.u32(kPermissionDenied).str("denied").str("en");
  PacketWriter handle(static_cast<PacketType>(kHandle), 43);
  handle.str("HANDLE");
  PacketWriter version(static_cast<PacketType>(kVersion), std::nullopt);
  version.u32(3).str("posix-rename@openssh.com").str("1").str("limits@openssh.com").str("1");
  std::vector<std::byte> stream;
  for (auto* w : {&status, &handle, &version}) {
    const auto& p = w->finish();
    stream.insert(stream.end(), p.begin(), p.end());
  }
  // Feed one byte at a time: packets must come out whole and in order.
  std::vector<Reply> got;
  for (std::byte b : stream) {
    f.feed(Bytes(&b, 1));
    while (auto body = f.next()) got.push_back(parse_reply(*body));
  }
  REQUIRE(got.size() == 3);
  CHECK(got[0].type == kStatus);
  CHECK(*got[0].id == 42);
  CHECK(got[0].status == kPermissionDenied);
  CHECK(got[0].message == "denied");
  CHECK(std::string(reinterpret_cast<const char*>(got[1].data.data()), got[1].data.size()) ==
        "HANDLE");
  CHECK(got[2].version == 3);
  REQUIRE(got[2].extensions.size() == 2);
  CHECK(got[2].extensions[1].first == "limits@openssh.com");
}

TEST_CASE("status without message is accepted (some v3 servers)") {
  PacketWriter w(static_cast<PacketType>(kStatus), 1);
  w.u32(kOk);
  auto r = parse_reply(body_of(w.finish()));
  CHECK(r.status == kOk);
  CHECK(r.message.empty());
}

TEST_CASE("hostile replies are protocol errors, not crashes") {
  auto bad = [](std::vector<std::byte> body) { CHECK_THROWS_AS(parse_reply(body), ProtocolError); };
  bad({});
  bad({std::byte{kStatus}, std::byte{0}});                                       // truncated id
  bad({std::byte{99}, std::byte{0}, std::byte{0}, std::byte{0}, std::byte{1}});  // unknown type
  PacketWriter h(static_cast<PacketType>(kHandle), 1);
  h.u32(1000);  // claims a 1000-byte handle, has none
  bad(body_of(h.finish()));
  PacketWriter n(static_cast<PacketType>(kName), 1);
  n.u32(0xffffffff);  // absurd name count
  bad(body_of(n.finish()));

  PacketFramer f;
  std::byte huge[4] = {std::byte{0x7f}, std::byte{0xff}, std::byte{0xff}, std::byte{0xff}};
  f.feed(huge);
  CHECK_THROWS_AS(f.next(), ProtocolError);
  PacketFramer z;
  std::byte zero[4] = {};
  z.feed(zero);
  CHECK_THROWS_AS(z.next(), ProtocolError);
}

TEST_CASE("an oversized length field is reported as too large, before any byte of the body") {
  // A hostile server announcing 100 MiB: refused at once, naming the length and the limit, not
  // after buffering (or waiting for) the body.
  PacketFramer f;
  std::vector<std::byte> hdr(9);
  put_be32(hdr.data(), 100u << 20);
  hdr[4] = std::byte{kStatus};
  f.feed(hdr);
  std::string what;
  try {
    f.next();
  } catch (const ProtocolError& e) {
    what = e.what();
  }
  CHECK(what == "malformed SFTP reply: packet length 104857600 is too large (limit 1048576)");
  // The largest allowed length is just waited for.
  PacketFramer ok;
  put_be32(hdr.data(), kMaxPacket);
  ok.feed(hdr);
  CHECK_FALSE(ok.next().has_value());
  PacketFramer z;
  std::byte zero[4] = {};
  z.feed(zero);
  CHECK_THROWS_WITH_AS(z.next(), "malformed SFTP reply: packet length 0", ProtocolError);
}

TEST_CASE("attributes: size and permissions both ways") {
  Attrs a;
  a.size = 123456789012ull;
  a.permissions = 0644;
  PacketWriter w(static_cast<PacketType>(kAttrs), 5);
  w.attrs(a);
  auto r = parse_reply(body_of(w.finish()));
  CHECK(r.attrs.size == a.size);
  CHECK(r.attrs.permissions == a.permissions);
  CHECK_FALSE(r.attrs.uid.has_value());
}

TEST_CASE("IdentityFile entries are those of the Host and Match blocks that apply") {
  char dir_template[] = "/tmp/df-sshcfg-XXXXXX";
  REQUIRE(::mkdtemp(dir_template) != nullptr);
  std::string dir = dir_template;
  std::string inc = dir + "/inc.conf";
  std::string cfg = dir + "/config";
  {
    std::ofstream(inc) << "Host box*\n  IdentityFile /k/included\n";
    // An Include under a Host that does not apply is skipped, as in ssh; a Host line in the
    // included file decides for the lines after the Include too.
    std::ofstream(cfg) << "IdentityFile /k/global\n"
                          "Include "
                       << inc
                       << "\n"
                          "Host box1 !box2\n  IdentityFile=/k/%r@%h:%p\n"
                          "Host other\n  IdentityFile /k/other\n  Include "
                       << inc
                       << "\n"
                          "Match host \"box?\"\n  IdentityFile \"/k/with space\"\n"
                          "Match exec true\n  IdentityFile /k/exec\n"
                          "Host *\n  IdentityFile ~/k/home\n";
  }
  SshTarget box1{"box1", "10.0.0.1", "u1", 23};
  CHECK(config_identity_files(cfg, box1) ==
        std::vector<std::string>{"/k/global", "/k/included", "/k/u1@10.0.0.1:23", "/k/with space",
                                 ssh_home() + "/k/home"});
  SshTarget box2{"box2", "box2", "u", 22};
  CHECK(config_identity_files(cfg, box2) == std::vector<std::string>{"/k/global", "/k/included",
                                                                     "/k/with space",
                                                                     ssh_home() + "/k/home"});
  CHECK(config_identity_files(dir + "/missing", box1).empty());
  std::filesystem::remove_all(dir);
}
