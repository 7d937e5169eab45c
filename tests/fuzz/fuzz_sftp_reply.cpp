// libFuzzer target: the SFTP reply framer and parser (bytes from a remote server).
#include <cstddef>
#include <cstdint>

#include "transport/sftp/wire.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace diskferry;
  auto in = Bytes(reinterpret_cast<const std::byte*>(data), size);
  try {
    // As a stream of packets, split at a fuzzer-chosen point to exercise reassembly.
    sftp::PacketFramer f;
    size_t cut = size ? data[0] % (size + 1) : 0;
    f.feed(in.first(cut));
    while (auto b = f.next()) sftp::parse_reply(*b);
    f.feed(in.subspan(cut));
    while (auto b = f.next()) sftp::parse_reply(*b);
  } catch (const sftp::ProtocolError&) {
  }
  try {
    sftp::parse_reply(in);  // and as one packet body
  } catch (const sftp::ProtocolError&) {
  }
  return 0;
}
