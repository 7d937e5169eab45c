#include "pipeline/checksum.hpp"

#include <fmt/format.h>
#include <openssl/evp.h>
#include <algorithm>
#include <array>
#include <cctype>

#include "util/error.hpp"

namespace diskferry {
namespace {

struct FreeCtx {
  void operator()(EVP_MD_CTX* c) const { EVP_MD_CTX_free(c); }
};
using Ctx = std::unique_ptr<EVP_MD_CTX, FreeCtx>;

Ctx new_sha256() {
  Ctx c(EVP_MD_CTX_new());
  if (!c || EVP_DigestInit_ex(c.get(), EVP_sha256(), nullptr) != 1)
    throw Error(ErrorKind::Internal, "OpenSSL: cannot initialise SHA-256");
  return c;
}

std::string finish_hex(EVP_MD_CTX* c) {
  std::array<unsigned char, EVP_MAX_MD_SIZE> md{};
  unsigned len = 0;
  if (EVP_DigestFinal_ex(c, md.data(), &len) != 1)
    throw Error(ErrorKind::Internal, "OpenSSL: SHA-256 failed");
  std::string hex;
  for (unsigned i = 0; i < len; ++i) hex += fmt::format("{:02x}", md[i]);
  return hex;
}

class Sha256Sink final : public FilterSink {
 public:
  Sha256Sink(std::unique_ptr<Sink> inner, std::string* digest)
      : FilterSink(std::move(inner)), ctx_(new_sha256()), digest_(digest) {}

  void write(Bytes d) override {
    EVP_DigestUpdate(ctx_.get(), d.data(), d.size());
    FilterSink::write(d);
  }
  void write_zeros(uint64_t n) override {
    static const std::array<std::byte, 256 * 1024> zeros{};
    for (uint64_t left = n; left > 0;) {
      size_t k = static_cast<size_t>(std::min<uint64_t>(left, zeros.size()));
      EVP_DigestUpdate(ctx_.get(), zeros.data(), k);
      left -= k;
    }
    FilterSink::write_zeros(n);
  }
  void rewrite(uint64_t offset, Bytes d) override {
    valid_ = false;
    FilterSink::rewrite(offset, d);
  }
  void commit() override {
    if (valid_) {
      std::string hex = finish_hex(ctx_.get());
      if (digest_) *digest_ = hex;
      inner().set_sha256(hex);
    }
    FilterSink::commit();
  }

 private:
  Ctx ctx_;
  std::string* digest_;
  bool valid_ = true;
};

}  // namespace

std::unique_ptr<Sink> make_sha256_sink(std::unique_ptr<Sink> inner, std::string* digest) {
  return std::make_unique<Sha256Sink>(std::move(inner), digest);
}

std::string sha256_hex(Bytes data) {
  Ctx c = new_sha256();
  EVP_DigestUpdate(c.get(), data.data(), data.size());
  return finish_hex(c.get());
}

struct Sha256::Ctx {
  diskferry::Ctx ctx = new_sha256();
};

Sha256::Sha256() : c_(std::make_unique<Ctx>()) {}
Sha256::~Sha256() = default;

void Sha256::update(Bytes data) {
  EVP_DigestUpdate(c_->ctx.get(), data.data(), data.size());
}

std::string Sha256::hex() {
  return finish_hex(c_->ctx.get());
}

std::optional<std::string> parse_sha256_sidecar(const std::string& text, const std::string& name,
                                                std::string& why) {
  auto nl = text.find('\n');
  std::string line = text.substr(0, nl);
  if (line.size() < 66 || line[64] != ' ' || (line[65] != ' ' && line[65] != '*')) {
    why = "is not in sha256sum format";
    return std::nullopt;
  }
  std::string hex = line.substr(0, 64);
  if (!std::all_of(hex.begin(), hex.end(), [](char c) { return std::isxdigit(c) != 0; })) {
    why = "does not start with a SHA-256";
    return std::nullopt;
  }
  if (line.substr(66) != name) {
    why = fmt::format("names {}, not {}", line.substr(66), name);
    return std::nullopt;
  }
  std::transform(hex.begin(), hex.end(), hex.begin(), [](char c) { return std::tolower(c); });
  return hex;
}

}  // namespace diskferry
