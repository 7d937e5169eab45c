#include "image/layout.hpp"

#include <fmt/format.h>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <sstream>

#include "util/error.hpp"

namespace diskferry {

std::vector<Extent> parse_rbd_layout(const std::string& text, const std::string& name) {
  nlohmann::json doc;
  try {
    doc = nlohmann::json::parse(text);
  } catch (const nlohmann::json::parse_error& e) {
    throw Error(ErrorKind::Usage,
                fmt::format("{}: not valid JSON at byte {} (expected `rbd diff --format=json` "
                            "output)",
                            name, e.byte));
  } catch (const nlohmann::json::exception&) {
    // e.g. a number too large for any integer or double (found by fuzz_layout)
    throw Error(ErrorKind::Usage,
                fmt::format("{}: not valid JSON: a number is out of range", name));
  }
  if (!doc.is_array())
    throw Error(ErrorKind::Usage, fmt::format("{}: expected a JSON array of {{\"offset\", "
                                              "\"length\", \"exists\"}} objects",
                                              name));
  std::vector<Extent> out;
  for (size_t i = 0; i < doc.size(); ++i) {
    const auto& e = doc[i];
    auto bad = [&](const std::string& why) {
      return Error(ErrorKind::Usage, fmt::format("{}: entry {}: {}", name, i, why));
    };
    if (!e.is_object()) throw bad("not an object");
    auto number = [&](const char* key) -> uint64_t {
      auto it = e.find(key);
      if (it == e.end()) throw bad(fmt::format("missing \"{}\"", key));
      if (!it->is_number_unsigned())
        throw bad(fmt::format("\"{}\" is not a non-negative integer", key));
      return it->get<uint64_t>();
    };
    uint64_t off = number("offset"), len = number("length");
    if (len > std::numeric_limits<uint64_t>::max() - off) throw bad("offset + length overflows");
    bool exists = true;
    if (auto it = e.find("exists"); it != e.end()) {
      if (it->is_boolean())
        exists = it->get<bool>();
      else if (it->is_string() && (*it == "true" || *it == "false"))
        exists = (*it == "true");
      else
        throw bad("\"exists\" must be \"true\" or \"false\"");
    }
    if (exists && len) out.push_back({off, len});
  }
  return out;
}

std::vector<Extent> read_rbd_layout(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw_errno(ErrorKind::Usage, path, "cannot read layout file", errno);
  std::ostringstream ss;
  ss << in.rdbuf();
  return parse_rbd_layout(ss.str(), path);
}

}  // namespace diskferry
