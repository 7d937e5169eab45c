#include "config/config.hpp"

#include <fcntl.h>
#include <fmt/format.h>
#include <sys/stat.h>
#include <unistd.h>
#include <yaml-cpp/eventhandler.h>
#include <yaml-cpp/yaml.h>
#include <algorithm>
#include <cctype>
#include <cerrno>
#include <charconv>
#include <cstdint>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <initializer_list>
#include <map>
#include <optional>
#include <sstream>
#include <string_view>
#include <utility>

#include "snapshot/snapshot.hpp"
#include "util/duration.hpp"
#include "util/error.hpp"
#include "util/fd.hpp"

namespace diskferry {
namespace {

namespace fs = std::filesystem;
using std::chrono::seconds;
using std::chrono::system_clock;

constexpr std::string_view kDefaultTimeFormat = "%Y%m%dT%H%M%SZ";
constexpr size_t kMaxConfigBytes = 1 << 20;

// ---------------------------------------------------------------------------------------------
// Name templates

// {time:...} takes only conversions that print a fixed number of digits: a rendered name can then
// be read back by match_name, and does not depend on the locale the daemon happens to run in.
constexpr std::string_view kSupportedTime = "%Y %m %d %H %M %S %j %s %F %T %%";

struct Piece {
  enum Kind { Literal, Source, Ext, Field } kind = Literal;
  std::string text;  // Literal
  char field = 0;    // Field: one of Y m d H M S j s
};

struct Template {
  std::vector<Piece> pieces;
  bool has_time = false;
  bool has(char field) const {
    return std::any_of(pieces.begin(), pieces.end(),
                       [&](const Piece& p) { return p.kind == Piece::Field && p.field == field; });
  }
};

void add_literal(std::vector<Piece>& out, std::string_view text) {
  if (!out.empty() && out.back().kind == Piece::Literal)
    out.back().text += text;
  else
    out.push_back({Piece::Literal, std::string(text), 0});
}

void parse_time_format(std::string_view f, std::vector<Piece>& out) {
  for (size_t i = 0; i < f.size(); ++i) {
    if (f[i] != '%') {
      add_literal(out, f.substr(i, 1));
      continue;
    }
    if (i + 1 == f.size())
      throw Error(ErrorKind::Usage, "'%' at the end of {time:...} (write %% for a literal %)");
    char c = f[++i];
    if (c == '%') {
      add_literal(out, "%");
    } else if (c == 'F') {
      parse_time_format("%Y-%m-%d", out);
    } else if (c == 'T') {
      parse_time_format("%H:%M:%S", out);
    } else if (std::string_view("YmdHMSjs").find(c) != std::string_view::npos) {
      out.push_back({Piece::Field, {}, c});
    } else {
      std::string shown = std::isprint(static_cast<unsigned char>(c)) ? std::string(1, c) : "?";
      throw Error(ErrorKind::Usage,
                  fmt::format("%{} is not supported in {{time:...}} (supported: {})", shown,
                              kSupportedTime));
    }
  }
}

// Throws Error(Usage) saying what is wrong, without naming the template (callers do).
Template parse_template(std::string_view t) {
  Template out;
  for (size_t i = 0; i < t.size(); ++i) {
    if (t[i] == '}') throw Error(ErrorKind::Usage, "'}' without a matching '{'");
    if (t[i] != '{') {
      add_literal(out.pieces, t.substr(i, 1));
      continue;
    }
    size_t close = t.find('}', i);
    if (close == std::string_view::npos)
      throw Error(ErrorKind::Usage, "'{' without a matching '}'");
    std::string_view inner = t.substr(i + 1, close - i - 1);
    if (inner == "source") {
      out.pieces.push_back({Piece::Source, {}, 0});
    } else if (inner == "ext") {
      out.pieces.push_back({Piece::Ext, {}, 0});
    } else if (inner == "time") {
      parse_time_format(kDefaultTimeFormat, out.pieces);
      out.has_time = true;
    } else if (inner.substr(0, 5) == "time:") {
      if (inner.size() == 5)
        throw Error(ErrorKind::Usage,
                    fmt::format("{{time:}} needs a format, e.g. {{time:{}}}", kDefaultTimeFormat));
      parse_time_format(inner.substr(5), out.pieces);
      out.has_time = true;
    } else {
      bool plain = std::all_of(inner.begin(), inner.end(), [](char c) {
        return std::isprint(static_cast<unsigned char>(c)) != 0;
      });
      throw Error(ErrorKind::Usage,
                  fmt::format("unknown placeholder {{{}}} (known: {{source}}, {{time:FORMAT}}, "
                              "{{ext}}; literal braces are not allowed)",
                              plain && inner.size() <= 40 ? inner : "..."));
    }
    i = close;
  }
  return out;
}

std::string extension(const SourceConf& s) {
  // asis keeps the image's own kind: web01.qcow2 backs up as ….qcow2.zst.
  if (s.format == ImageFormat::Asis) {
    std::string e = fs::path(s.path).extension().string();
    return (e.size() > 1 ? e.substr(1) : std::string("img")) + s.compress.extension();
  }
  return format_name(s.format) + s.compress.extension();
}

int field_width(char f) {
  switch (f) {
    case 'Y':
      return 4;
    case 'j':
      return 3;
    case 's':
      return 0;  // as many digits as it takes
    default:
      return 2;
  }
}

std::string render(const Template& t, const SourceConf& s, system_clock::time_point when) {
  std::time_t tt = system_clock::to_time_t(when);
  std::tm tm{};
  if (!gmtime_r(&tt, &tm)) throw Error(ErrorKind::Internal, "render_name: time out of range");
  std::string out;
  for (const Piece& p : t.pieces) {
    switch (p.kind) {
      case Piece::Literal:
        out += p.text;
        break;
      case Piece::Source:
        out += s.name;
        break;
      case Piece::Ext:
        out += extension(s);
        break;
      case Piece::Field: {
        long long v = 0;
        switch (p.field) {
          case 'Y':
            v = tm.tm_year + 1900LL;
            break;
          case 'm':
            v = tm.tm_mon + 1;
            break;
          case 'd':
            v = tm.tm_mday;
            break;
          case 'H':
            v = tm.tm_hour;
            break;
          case 'M':
            v = tm.tm_min;
            break;
          case 'S':
            v = tm.tm_sec;
            break;
          case 'j':
            v = tm.tm_yday + 1;
            break;
          case 's':
            v = static_cast<long long>(tt);
            break;
        }
        out += fmt::format("{:0{}}", v, field_width(p.field));
        break;
      }
    }
  }
  return out;
}

// Times a name can carry: system_clock counts nanoseconds in 64 bits, which ends in 2262.
constexpr long long kMaxYear = 2200;
constexpr long long kMaxEpoch = 7258118400;  // 2200-01-01T00:00:00Z

std::optional<system_clock::time_point> match(const Template& t, const SourceConf& s,
                                              std::string_view name) {
  // Indexed by the field letter.
  long long value[128] = {};
  bool seen[128] = {};
  auto at = [](char f) { return static_cast<unsigned char>(f) & 127; };
  size_t pos = 0;
  auto literal = [&](std::string_view lit) {
    if (name.substr(pos, lit.size()) != lit) return false;
    pos += lit.size();
    return true;
  };
  for (const Piece& p : t.pieces) {
    if (p.kind == Piece::Literal && !literal(p.text)) return std::nullopt;
    if (p.kind == Piece::Source && !literal(s.name)) return std::nullopt;
    if (p.kind == Piece::Ext && !literal(extension(s))) return std::nullopt;
    if (p.kind != Piece::Field) continue;
    size_t width = static_cast<size_t>(field_width(p.field));
    size_t end = pos;
    while (end < name.size() && (width == 0 || end - pos < width) &&
           std::isdigit(static_cast<unsigned char>(name[end])))
      ++end;
    if (end == pos || (width && end - pos != width) || end - pos > 12) return std::nullopt;
    long long v = 0;
    std::from_chars(name.data() + pos, name.data() + end, v);
    pos = end;
    if (seen[at(p.field)] && value[at(p.field)] != v) return std::nullopt;
    seen[at(p.field)] = true;
    value[at(p.field)] = v;
  }
  if (pos != name.size()) return std::nullopt;

  auto get = [&](char f, long long fallback) { return seen[at(f)] ? value[at(f)] : fallback; };
  long long epoch = 0;
  if (seen[at('s')]) {
    epoch = value[at('s')];
  } else {
    long long year = get('Y', 1970), mon = get('m', 1), day = get('d', 1), yday = get('j', 0);
    long long hour = get('H', 0), min = get('M', 0), sec = get('S', 0);
    if (year < 1970 || year >= kMaxYear || mon < 1 || mon > 12 || day < 1 || day > 31 ||
        yday > 366 || hour > 23 || min > 59 || sec > 60)
      return std::nullopt;
    std::tm tm{};
    tm.tm_year = static_cast<int>(year - 1900);
    // timegm normalises day 33 of January to February 2nd, which is how %j becomes a date.
    bool by_yday = seen[at('j')] && !seen[at('m')] && !seen[at('d')];
    tm.tm_mon = by_yday ? 0 : static_cast<int>(mon - 1);
    tm.tm_mday = by_yday ? static_cast<int>(yday) : static_cast<int>(day);
    tm.tm_hour = static_cast<int>(hour);
    tm.tm_min = static_cast<int>(min);
    tm.tm_sec = static_cast<int>(sec);
    epoch = timegm(&tm);
  }
  if (epoch < 0 || epoch > kMaxEpoch) return std::nullopt;
  auto when = system_clock::from_time_t(static_cast<std::time_t>(epoch));
  // Fields that disagree (%d with %j, 02-30, a leap second) parse but would render differently.
  if (render(t, s, when) != name) return std::nullopt;
  return when;
}

// A fixed instant to render sample names with when checking a template.
system_clock::time_point sample_time() {
  return system_clock::from_time_t(1704164645);  // 2024-01-02T03:04:05Z
}

// ---------------------------------------------------------------------------------------------
// Reading YAML

// Messages stay one line whatever the file holds.
std::string printable(std::string_view s) {
  std::string out;
  for (char c : s) {
    auto u = static_cast<unsigned char>(c);
    if (u < 0x20 || u == 0x7f)
      out += fmt::format("\\x{:02x}", u);
    else
      out += c;
  }
  return out;
}

std::string in_quotes(std::string_view s) {
  constexpr size_t kMax = 80;
  if (s.size() > kMax) return "\"" + printable(s.substr(0, kMax)) + "...\"";
  return "\"" + printable(s) + "\"";
}

struct Doc {
  std::string file;
  std::string base_dir;
};

[[noreturn]] void fail(const Doc& d, int line, std::string_view key, std::string_view what) {
  if (key.empty())
    throw Error(ErrorKind::Usage, fmt::format("{}:{}: {}", d.file, line, printable(what)));
  throw Error(ErrorKind::Usage,
              fmt::format("{}:{}: {}: {}", d.file, line, printable(key), printable(what)));
}

int line_of(const YAML::Node& n, int fallback) {
  YAML::Mark m = n.Mark();
  return m.is_null() ? fallback : m.line + 1;
}

std::string describe(const YAML::Node& n) {
  switch (n.Type()) {
    case YAML::NodeType::Scalar:
      return in_quotes(n.Scalar());
    case YAML::NodeType::Sequence:
      return "a list";
    case YAML::NodeType::Map:
      return "a mapping";
    default:
      return "nothing";
  }
}

// What the reused parsers say after their command-line prefix ("--bwlimit 'TEXT': "), which
// would only confuse someone editing a file.
std::string without_prefix(const std::string& message, const std::string& prefix) {
  return message.rfind(prefix, 0) == 0 ? message.substr(prefix.size()) : message;
}

// One value from the file and where it is.
struct Value {
  const Doc* doc = nullptr;
  YAML::Node node;
  std::string key;  // "sources.web01.path"
  int line = 1;

  [[noreturn]] void fail(std::string_view what) const { diskferry::fail(*doc, line, key, what); }

  const std::string& scalar(std::string_view expected) const {
    if (!node.IsScalar()) {
      if (node.IsNull())
        fail(fmt::format("expected {}, got nothing (give a value or remove the key)", expected));
      fail(fmt::format("expected {}, got {}", expected, describe(node)));
    }
    return node.Scalar();
  }
  std::string text(std::string_view expected = "a string") const {
    const std::string& s = scalar(expected);
    if (s.empty()) fail("empty (remove the key for the default)");
    return s;
  }
};

struct Entry {
  std::string name;
  Value value;
};

// The pairs of a mapping, with keys checked to be plain and given once. A key with nothing
// under it reads as an empty mapping.
std::vector<Entry> entries(const Doc& d, const YAML::Node& node, const std::string& key, int line,
                           std::string_view what) {
  std::vector<Entry> out;
  std::map<std::string, int, std::less<>> first_line;
  if (node.IsNull()) return out;
  if (!node.IsMap()) {
    std::string msg = fmt::format("expected {}, got {}", what, describe(node));
    fail(d, line_of(node, line), key, msg);
  }
  for (const auto& pair : node) {
    const YAML::Node& k = pair.first;
    int kline = line_of(k, line);
    if (!k.IsScalar())
      fail(d, kline, key, fmt::format("keys must be plain names, not {}", describe(k)));
    std::string name = k.Scalar();
    std::string path = key.empty() ? name : key + "." + name;
    if (name == "<<")
      fail(d, kline, path,
           "YAML merge keys are not supported (repeat the keys, or alias a whole value with *)");
    auto [first, inserted] = first_line.emplace(name, kline);
    if (!inserted)
      fail(d, kline, path, fmt::format("given twice (first at line {})", first->second));
    out.push_back({name, Value{&d, pair.second, path, kline}});
  }
  return out;
}

// Optimal string alignment distance: a swapped pair of letters is one typo, not two.
size_t edit_distance(std::string_view a, std::string_view b) {
  std::vector<std::vector<size_t>> d(a.size() + 1, std::vector<size_t>(b.size() + 1));
  for (size_t i = 0; i <= a.size(); ++i) d[i][0] = i;
  for (size_t j = 0; j <= b.size(); ++j) d[0][j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    for (size_t j = 1; j <= b.size(); ++j) {
      size_t cost = a[i - 1] == b[j - 1] ? 0 : 1;
      d[i][j] = std::min({d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + cost});
      if (i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1])
        d[i][j] = std::min(d[i][j], d[i - 2][j - 2] + 1);
    }
  }
  return d[a.size()][b.size()];
}

std::string join(const std::vector<std::string>& v) {
  std::string out;
  for (const auto& s : v) out += (out.empty() ? "" : ", ") + s;
  return out;
}

std::string unknown_key(std::string_view key, std::initializer_list<std::string_view> allowed) {
  std::string folded;
  for (char c : key.substr(0, 64))
    folded += c == '-' ? '_' : static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  std::string_view best;
  size_t best_d = SIZE_MAX;
  std::vector<std::string> all;
  for (std::string_view a : allowed) {
    all.emplace_back(a);
    size_t dist = edit_distance(folded, a);
    if (dist < best_d) {
      best_d = dist;
      best = a;
    }
  }
  if (key.size() <= 64 && best_d <= (key.size() <= 4 ? 1u : 2u))
    return fmt::format("unknown key (did you mean {}?)", best);
  return fmt::format("unknown key (expected one of: {})", join(all));
}

// A mapping with a fixed set of keys; anything else is most likely a typo, and silently
// ignoring it would run backups with a default the user meant to change.
class MapReader {
 public:
  MapReader(const Doc& d, const Value& v, std::initializer_list<std::string_view> allowed,
            std::string_view what)
      : at_(v), entries_(entries(d, v.node, v.key, v.line, what)) {
    for (const Entry& e : entries_)
      if (std::find(allowed.begin(), allowed.end(), e.name) == allowed.end())
        e.value.fail(unknown_key(e.name, allowed));
  }

  std::optional<Value> get(std::string_view name) const {
    for (const Entry& e : entries_)
      if (e.name == name) {
        // A missing value is marked where the next token starts, often the next line.
        Value v = e.value;
        if (!v.node.IsNull()) v.line = line_of(v.node, v.line);
        return v;
      }
    return std::nullopt;
  }
  Value required(std::string_view name, std::string_view what) const {
    if (auto v = get(name)) return *v;
    at_.fail(fmt::format("missing {}: {}", name, what));
  }

 private:
  Value at_;
  std::vector<Entry> entries_;
};

int integer(const Value& v, int lo, int hi) {
  const std::string& s = v.scalar("a number");
  int n = 0;
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), n);
  if (ec != std::errc() || p != s.data() + s.size() || n < lo || n > hi)
    v.fail(fmt::format("expected a whole number from {} to {}, got {}", lo, hi, in_quotes(s)));
  return n;
}

constexpr std::string_view kDurationExamples = "60, 30s, 5m, 2h or 1d";

seconds check_range(const Value& v, seconds d, seconds lo, seconds hi) {
  if (d < lo || d > hi)
    v.fail(fmt::format("{} is out of range ({} to {})", format_duration(d), format_duration(lo),
                       format_duration(hi)));
  return d;
}

seconds duration(const Value& v, seconds lo, seconds hi) {
  const std::string& s = v.scalar("a duration");
  auto d = parse_duration(s);
  if (!d)
    v.fail(fmt::format("expected a duration such as {}, got {}", kDurationExamples, in_quotes(s)));
  return check_range(v, *d, lo, hi);
}

std::string path_value(const Value& v) {
  std::string s = v.text("a path");
  for (char c : s)
    if (static_cast<unsigned char>(c) < 0x20) v.fail("control character in the path");
  // Nobody expands ~ for the daemon; a literal directory named "~" is never what was meant.
  if (s[0] == '~')
    v.fail(fmt::format("{}: ~ is not expanded here; give the full path", in_quotes(s)));
  while (s.size() > 1 && s.back() == '/') s.pop_back();
  fs::path p(s);
  if (p.is_relative()) p = fs::path(v.doc->base_dir) / p;
  return p.lexically_normal().string();
}

RateSchedule rate_value(const Value& v) {
  std::string s = v.text("a rate such as 20M, off or \"08:00,5M 23:00,off\"");
  try {
    return parse_bwlimit(s);
  } catch (const Error& e) {
    v.fail(without_prefix(e.what(), "--bwlimit '" + s + "': "));
  }
}

// The names of remotes and sources become file names (snapshots, the default template) and
// appear in logs and the database; keep them to characters that need no quoting anywhere.
void check_name(const Doc& d, const Entry& e, std::string_view what) {
  bool ok =
      !e.name.empty() && e.name.size() <= 100 && e.name[0] != '.' &&
      std::all_of(e.name.begin(), e.name.end(), [](char c) {
        return std::isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '_' || c == '-';
      });
  if (!ok)
    fail(d, e.value.line, e.value.key,
         fmt::format("{} names are letters, digits, '.', '_' and '-' (not starting with '.', at "
                     "most 100), got {}",
                     what, in_quotes(e.name)));
}

RemoteConf read_remote(const Doc& d, const Entry& e) {
  MapReader m(d, e.value, {"url", "identity", "known_hosts", "ssh_config", "bwlimit", "streams"},
              "the remote's settings (url, identity, ...)");
  RemoteConf r;
  r.name = e.name;
  r.origin = fmt::format("{}:{}", d.file, e.value.line);
  Value url = m.required("url", "sftp://USER@HOST[:PORT]/PATH");
  std::string text = url.text("an sftp:// URL");
  try {
    r.url = sftp::parse_url(text);
  } catch (const Error& err) {
    url.fail(err.what());
  }
  if (auto v = m.get("identity")) r.identity = path_value(*v);
  if (auto v = m.get("known_hosts")) r.known_hosts = path_value(*v);
  if (auto v = m.get("ssh_config")) r.ssh_config = path_value(*v);
  if (auto v = m.get("bwlimit")) r.bwlimit = rate_value(*v);
  if (auto v = m.get("streams")) r.streams = integer(*v, 1, 16);
  return r;
}

Retention read_retention(const Doc& d, const Value& v) {
  MapReader m(d, v, {"keep_last", "keep_daily", "keep_weekly", "keep_monthly"},
              "a mapping such as {keep_last: 7, keep_daily: 7}");
  Retention r;
  constexpr int kMax = 100000;
  if (auto k = m.get("keep_last")) r.keep_last = integer(*k, 0, kMax);
  if (auto k = m.get("keep_daily")) r.keep_daily = integer(*k, 0, kMax);
  if (auto k = m.get("keep_weekly")) r.keep_weekly = integer(*k, 0, kMax);
  if (auto k = m.get("keep_monthly")) r.keep_monthly = integer(*k, 0, kMax);
  return r;
}

Retries read_retries(const Doc& d, const Value& v) {
  MapReader m(d, v, {"max_attempts", "backoff"},
              "a mapping such as {max_attempts: 5, backoff: \"30s..30m\"}");
  Retries r;
  if (auto a = m.get("max_attempts")) r.max_attempts = integer(*a, 1, 100);
  if (auto b = m.get("backoff")) {
    const std::string& s = b->scalar("a duration or MIN..MAX");
    size_t dots = s.find("..");
    auto lo = parse_duration(s.substr(0, dots));
    auto hi = dots == std::string::npos ? lo : parse_duration(s.substr(dots + 2));
    if (!lo || !hi)
      b->fail(
          fmt::format("expected MIN..MAX, e.g. \"30s..30m\" (or one duration such as {}), "
                      "got {}",
                      kDurationExamples, in_quotes(s)));
    check_range(*b, *lo, seconds(1), seconds(86400));
    check_range(*b, *hi, seconds(1), seconds(86400));
    if (*lo > *hi)
      b->fail(fmt::format("the minimum {} is above the maximum {}", format_duration(*lo),
                          format_duration(*hi)));
    r.backoff_min = *lo;
    r.backoff_max = *hi;
  }
  return r;
}

Hooks read_hooks(const Doc& d, const Value& v) {
  MapReader m(d, v, {"pre_snapshot", "post_snapshot", "timeout"},
              "a mapping such as {pre_snapshot: \"...\", post_snapshot: \"...\"}");
  Hooks h;
  if (auto c = m.get("pre_snapshot")) h.pre_snapshot = c->text("a shell command");
  if (auto c = m.get("post_snapshot")) h.post_snapshot = c->text("a shell command");
  if (auto t = m.get("timeout")) h.timeout = duration(*t, seconds(1), seconds(86400));
  return h;
}

// `base`: what is in force where this mapping has no key (the global notify: for a source). An
// empty command turns off one that `base` has.
Notify read_notify(const Doc& d, const Value& v, const Notify& base) {
  MapReader m(d, v, {"on_success", "on_failure", "timeout"},
              "a mapping such as {on_failure: \"...\", on_success: \"...\"}");
  Notify n = base;
  if (auto c = m.get("on_success")) n.on_success = c->scalar("a shell command (\"\" for none)");
  if (auto c = m.get("on_failure")) n.on_failure = c->scalar("a shell command (\"\" for none)");
  if (auto t = m.get("timeout")) n.timeout = duration(*t, seconds(1), seconds(3600));
  return n;
}

// Everything a template must give so that every backup gets a name of its own, below the
// remote's directory, that retention can recognise. Throws Error(Usage) with the reason; adds
// what is merely risky to `warnings`.
void check_template(const SourceConf& s, std::vector<std::string>& warnings) {
  Template t = parse_template(s.name_template);
  auto bad = [](const std::string& why) { throw Error(ErrorKind::Usage, why); };
  if (!t.has_time)
    bad("has no {time:...}: every backup needs a name of its own (the default is "
        "\"{source}/{source}-{time:%Y%m%dT%H%M%SZ}.{ext}\")");
  bool epoch = t.has('s');
  if (!epoch && !(t.has('Y') && ((t.has('m') && t.has('d')) || t.has('j'))))
    bad("{time:...} must give at least the date: year, month and day (e.g. %Y%m%d, %F or %s)");
  if (!epoch && !(t.has('H') && t.has('M')))
    warnings.push_back(fmt::format(
        "backups less than {} apart get the same name, and the later replaces the earlier "
        "(add {} to {{time:...}})",
        t.has('H') ? "an hour" : "a day", t.has('H') ? "%M" : "%H%M"));

  std::string name = render(t, s, sample_time());
  std::string example = fmt::format(" (renders as {})", in_quotes(name));
  if (name.empty()) bad("renders as an empty name");
  if (name[0] == '/') bad("is an absolute path; names are relative to the remote's URL" + example);
  for (char c : name)
    if (static_cast<unsigned char>(c) < 0x20 || c == 0x7f) bad("contains a control character");
  std::string_view rest(name);
  for (;;) {
    size_t slash = rest.find('/');
    std::string_view part = rest.substr(0, slash);
    if (part.empty()) bad("has an empty path component" + example);
    if (part == "." || part == "..")
      bad("has a '.' or '..' component; backups must stay below the remote's URL" + example);
    if (part.size() > 255) bad("has a path component longer than 255 bytes");
    if (slash == std::string_view::npos) break;
    rest.remove_prefix(slash + 1);
  }
  // The upload is NAME.partial until it is complete and its checksum is NAME.sha256; a name
  // ending like either would be mistaken for one.
  if (rest.size() + 8 > 255) bad("has a file name longer than 247 bytes (NAME.partial must fit)");
  for (std::string_view suffix : {".partial", ".sha256"})
    if (rest.size() >= suffix.size() && rest.substr(rest.size() - suffix.size()) == suffix)
      bad(fmt::format("ends in {}, which diskferry uses for its own files", suffix) + example);
  if (!match(t, s, name))
    bad("names it renders cannot be read back for retention (digits right after %s?)" + example);
}

// format: and compress: of a source or of one of its extra_outputs.
void read_output(const MapReader& m, ImageFormat& format, StreamCompression& compress,
                 ClusterCodec& cluster_codec) {
  if (auto v = m.get("format")) {
    std::string f = v->text("qcow2, vhdx, raw or asis");
    try {
      format = parse_format(f);
    } catch (const Error&) {
      v->fail(fmt::format("expected qcow2, vhdx, raw or asis, got {}", in_quotes(f)));
    }
  }
  if (auto v = m.get("compress")) {
    std::string c = v->text("a compression");
    if (c == "qcow2-zstd" || c == "qcow2-zlib") {
      if (format != ImageFormat::Qcow2)
        v->fail(fmt::format("{} compresses clusters inside a qcow2 image, but format is {}", c,
                            format_name(format)));
      cluster_codec = c == "qcow2-zstd" ? ClusterCodec::Zstd : ClusterCodec::Deflate;
      compress = StreamCompression{};  // the image stays directly usable
    } else {
      std::string codec = c.substr(0, c.find(':'));
      if (codec != "none" && codec != "zstd" && codec != "gzip" && codec != "gz")
        v->fail(fmt::format(
            "expected none, zstd[:LEVEL], gzip[:LEVEL], qcow2-zstd or qcow2-zlib, got {}",
            in_quotes(c)));
      try {
        compress = StreamCompression::parse(c);
      } catch (const Error& err) {
        v->fail(without_prefix(err.what(), "--compress '" + c + "': "));
      }
    }
  }
}

// name_line: where the name template is (or the source, for the default), for later checks.
SourceConf read_source(const Doc& d, const Entry& e, const Config& conf,
                       std::vector<std::string>& warnings, int& name_line) {
  const std::map<std::string, RemoteConf>& remotes = conf.remotes;
  MapReader m(d, e.value,
              {"path", "snapshot", "snapshot_dir", "format", "compress", "remote", "name",
               "retention", "retries", "hooks", "notify", "verify", "extra_outputs"},
              "the source's settings (path, remote, ...)");
  SourceConf s;
  s.name = e.name;
  s.origin = fmt::format("{}:{}", d.file, e.value.line);
  Value path = m.required("path", "the disk image to back up");
  s.path = path_value(path);
  s.path_line = path.line;
  s.snapshot_line = e.value.line;

  if (auto v = m.get("snapshot")) {
    s.snapshot_line = v->line;
    std::string mode = v->text("reflink or none");
    if (mode == "reflink")
      s.snapshot = SnapshotMode::Reflink;
    else if (mode == "none")
      s.snapshot = SnapshotMode::None;
    else
      v->fail(fmt::format("expected reflink or none, got {}", in_quotes(mode)));
  }
  if (auto v = m.get("snapshot_dir")) {
    if (s.snapshot == SnapshotMode::None) v->fail("only used with snapshot: reflink");
    s.snapshot_dir = path_value(*v);
  } else if (s.snapshot == SnapshotMode::Reflink) {
    // Beside the image: a reflink copy must be on the same filesystem.
    s.snapshot_dir = (fs::path(s.path).parent_path() / ".diskferry-snapshots").string();
  }

  read_output(m, s.format, s.compress, s.cluster_codec);
  Value remote = m.required("remote", "the name of a remote under remotes:");
  s.remote = remote.text("a remote's name");
  if (!remotes.count(s.remote)) {
    std::vector<std::string> names;
    for (const auto& [name, r] : remotes) names.push_back(name);
    remote.fail(
        names.empty()
            ? fmt::format("no remote named {} (no remotes are defined)", in_quotes(s.remote))
            : fmt::format("no remote named {} (defined: {})", in_quotes(s.remote), join(names)));
  }

  name_line = e.value.line;
  std::string name_key = e.value.key + ".name";
  if (auto v = m.get("name")) {
    s.name_template = v->text("a name template");
    name_line = v->line;
  }
  std::vector<std::string> template_warnings;
  try {
    check_template(s, template_warnings);
  } catch (const Error& err) {
    fail(d, name_line, name_key, err.what());
  }
  for (const auto& w : template_warnings)
    warnings.push_back(fmt::format("{}:{}: {}: {}", d.file, name_line, name_key, w));

  if (auto v = m.get("extra_outputs")) {
    if (!v->node.IsSequence() || v->node.size() == 0)
      v->fail("expected a list of outputs, e.g. [{format: vhdx}, {format: raw, compress: gzip}]");
    for (size_t i = 0; i < v->node.size(); ++i) {
      Value item{v->doc, v->node[i], fmt::format("{}[{}]", v->key, i),
                 line_of(v->node[i], v->line)};
      MapReader om(d, item, {"format", "compress"}, "an output's settings (format, compress)");
      om.required("format", "qcow2, vhdx or raw");
      OutputConf o;
      read_output(om, o.format, o.compress, o.cluster_codec);
      if (o.format == ImageFormat::Asis || s.format == ImageFormat::Asis)
        item.fail("format asis (the file's own bytes) cannot share a read with other outputs");
      s.extra_outputs.push_back(o);
    }
    if (s.name_template.find("{ext}") == std::string::npos)
      v->fail("the source's name has no {ext}: its outputs would get the same name");
    for (size_t i = 0; i < s.output_count(); ++i)
      for (size_t j = 0; j < i; ++j)
        if (extension(s.output(i)) == extension(s.output(j)))
          v->fail(
              fmt::format("two outputs would both be named .{} (give each its own format "
                          "or compression)",
                          extension(s.output(i))));
  }

  if (auto v = m.get("retention")) s.retention = read_retention(d, *v);
  if (auto v = m.get("retries")) s.retries = read_retries(d, *v);
  if (auto v = m.get("hooks")) s.hooks = read_hooks(d, *v);
  s.notify = conf.notify;
  if (auto v = m.get("notify")) s.notify = read_notify(d, *v, conf.notify);
  if (auto v = m.get("verify")) {
    std::string mode = v->text("after_upload or none");
    if (mode == "after_upload")
      s.verify_after_upload = true;
    else if (mode != "none")
      v->fail(fmt::format("expected after_upload or none, got {}", in_quotes(mode)));
  }
  return s;
}

// Retention of one source must never see another source's backups as its own.
void check_collisions(const Doc& d, const Config& c, const std::map<std::string, int>& name_lines) {
  struct Rendered {
    const SourceConf* source;
    Template t;
    std::string sample;
    std::string url;
  };
  std::vector<Rendered> all;
  for (const auto& [name, s] : c.sources) {
    Template t = parse_template(s.name_template);
    std::string sample = render(t, s, sample_time());
    all.push_back({&s, std::move(t), std::move(sample), c.remotes.at(s.remote).url.str()});
  }
  for (size_t i = 0; i < all.size(); ++i) {
    for (size_t j = i + 1; j < all.size(); ++j) {
      const Rendered& x = all[i];
      const Rendered& y = all[j];
      if (x.url != y.url) continue;
      if (match(y.t, *y.source, x.sample) || match(x.t, *x.source, y.sample))
        fail(d, name_lines.at(y.source->name), "sources." + y.source->name + ".name",
             fmt::format("its backups could not be told apart from those of sources.{} on the "
                         "same remote (put {{source}} in the name)",
                         x.source->name));
    }
  }
}

Config build(const Doc& d, const YAML::Node& root) {
  Config c;
  c.path = d.file;
  Value top{&d, root, "", 1};
  MapReader m(d, top,
              {"state_dir", "workers", "bwlimit", "lease", "stall_timeout", "metrics_dir", "notify",
               "remotes", "sources"},
              "a mapping of settings (state_dir, remotes, sources, ...)");
  c.state_dir = "/var/lib/diskferry";
  if (auto v = m.get("state_dir")) c.state_dir = path_value(*v);
  if (auto v = m.get("workers")) c.workers = integer(*v, 1, 64);
  if (auto v = m.get("bwlimit")) c.bwlimit = rate_value(*v);
  if (auto v = m.get("lease")) c.lease = duration(*v, seconds(10), seconds(86400));
  if (auto v = m.get("stall_timeout")) c.stall_timeout = duration(*v, seconds(1), seconds(3600));
  if (auto v = m.get("metrics_dir")) c.metrics_dir = path_value(*v);
  if (auto v = m.get("notify")) c.notify = read_notify(d, *v, Notify{});

  if (auto v = m.get("remotes")) {
    for (const Entry& e :
         entries(d, v->node, v->key, v->line, "a mapping of remote names to their settings")) {
      check_name(d, e, "remote");
      c.remotes.emplace(e.name, read_remote(d, e));
    }
  }
  std::map<std::string, int> name_lines;
  if (auto v = m.get("sources")) {
    for (const Entry& e :
         entries(d, v->node, v->key, v->line, "a mapping of source names to their settings")) {
      check_name(d, e, "source");
      int name_line = 0;
      SourceConf s = read_source(d, e, c, c.warnings, name_line);
      name_lines[e.name] = name_line;
      c.sources.emplace(e.name, std::move(s));
    }
  }
  check_collisions(d, c, name_lines);
  if (c.sources.empty())
    c.warnings.push_back(
        fmt::format("{}: no sources are configured: nothing will be backed up", d.file));
  return c;
}

// Sees where each YAML document starts, and nothing else.
struct DocumentCounter final : YAML::EventHandler {
  int documents = 0;
  YAML::Mark first, second;
  void OnDocumentStart(const YAML::Mark& m) override {
    if (++documents == 1)
      first = m;
    else if (documents == 2)
      second = m;
  }
  void OnDocumentEnd() override {}
  void OnNull(const YAML::Mark&, YAML::anchor_t) override {}
  void OnAlias(const YAML::Mark&, YAML::anchor_t) override {}
  void OnScalar(const YAML::Mark&, const std::string&, YAML::anchor_t,
                const std::string&) override {}
  void OnSequenceStart(const YAML::Mark&, const std::string&, YAML::anchor_t,
                       YAML::EmitterStyle::value) override {}
  void OnSequenceEnd() override {}
  void OnMapStart(const YAML::Mark&, const std::string&, YAML::anchor_t,
                  YAML::EmitterStyle::value) override {}
  void OnMapEnd() override {}
};

}  // namespace

Config parse_config(const std::string& text, const std::string& path, const std::string& base_dir) {
  Doc d{path, base_dir};
  try {
    // Not YAML::LoadAll: yaml-cpp 0.7 loops forever (allocating) on a stray ',' outside any
    // collection, where each call yields another empty document without reading on (found by
    // fuzz_config). Counting documents with a bound and a progress check avoids it.
    DocumentCounter counter;
    std::istringstream in(text);
    YAML::Parser parser(in);
    for (int i = 0; i < 2 && parser.HandleNextDocument(counter); ++i) {
    }
    if (counter.documents > 1) {
      if (counter.second.pos <= counter.first.pos)
        fail(d, counter.first.line + 1, "", "invalid YAML: a token outside any mapping or list");
      fail(d, counter.second.line + 1, "",
           "a second YAML document (after ---); the configuration is one document");
    }
    return build(d, YAML::Load(text));
  } catch (const YAML::Exception& e) {
    // Syntax errors; the readers above check types first, so conversions do not throw.
    if (e.mark.is_null()) fail(d, 1, "", "invalid YAML: " + e.msg);
    fail(d, e.mark.line + 1, "", "invalid YAML: " + e.msg);
  }
}

Config load_config(const std::string& path) {
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) throw_errno(ErrorKind::Usage, path, "cannot open", errno);
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) throw_errno(ErrorKind::Usage, path, "cannot stat", errno);
  if (!S_ISREG(st.st_mode)) throw Error(ErrorKind::Usage, path + ": not a regular file");
  std::string text;
  char buf[65536];
  for (;;) {
    ssize_t n = ::read(fd.get(), buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) throw_errno(ErrorKind::Usage, path, "cannot read", errno);
    if (n == 0) break;
    text.append(buf, static_cast<size_t>(n));
    if (text.size() > kMaxConfigBytes)
      throw Error(ErrorKind::Usage, path + ": larger than 1 MiB; is this the configuration file?");
  }

  std::error_code ec;
  fs::path absolute = fs::absolute(path, ec);
  if (ec) absolute = path;
  Config c = parse_config(text, path, absolute.parent_path().string());

  // Hooks in this file run as commands with the daemon's rights (usually root), so whoever may
  // change the file may run anything.
  std::vector<std::string> warnings;
  if (st.st_mode & S_IWOTH)
    warnings.push_back(fmt::format(
        "{}: writable by everyone (mode {:04o}): anyone can change the hooks, which run as "
        "commands; chmod o-w",
        path, st.st_mode & 07777));
  if (::geteuid() == 0 && st.st_uid != 0)
    warnings.push_back(fmt::format(
        "{}: owned by uid {}, not root, while the daemon runs as root: that user can change the "
        "hooks, which run as root",
        path, st.st_uid));
  // Hook and notify commands are where a webhook token or a password ends up.
  bool commands = !c.notify.on_success.empty() || !c.notify.on_failure.empty();
  for (const auto& [name, s] : c.sources)
    commands = commands || !s.hooks.pre_snapshot.empty() || !s.hooks.post_snapshot.empty() ||
               !s.notify.on_success.empty() || !s.notify.on_failure.empty();
  if ((st.st_mode & S_IROTH) && commands)
    warnings.push_back(fmt::format(
        "{}: readable by everyone (mode {:04o}) and holds hook or notify commands, which often "
        "carry tokens or passwords; chmod o-r",
        path, st.st_mode & 07777));
  struct stat dir {};
  std::string parent = absolute.parent_path().string();
  if (::stat(parent.c_str(), &dir) == 0 && (dir.st_mode & S_IWOTH) && !(dir.st_mode & S_ISVTX))
    warnings.push_back(fmt::format(
        "{}: its directory {} is writable by everyone: anyone can replace the file", path, parent));
  c.warnings.insert(c.warnings.begin(), warnings.begin(), warnings.end());
  return c;
}

DiskCheck check_sources_on_disk(const Config& c) {
  DiskCheck out;
  auto at = [&](int line, const SourceConf& s, std::string_view key, std::string_view what) {
    return fmt::format("{}:{}: sources.{}.{}: {}", c.path, line, s.name, key, what);
  };
  struct Seen {
    const SourceConf* source;
    std::string path;
    std::optional<std::pair<dev_t, ino_t>> file;
  };
  std::vector<Seen> seen;
  for (const auto& [name, s] : c.sources) {
    Seen me{&s, fs::path(s.path).lexically_normal().string(), std::nullopt};
    struct stat st {};
    if (::stat(s.path.c_str(), &st) == 0) {
      me.file = std::pair(st.st_dev, st.st_ino);
    } else if (errno == ENOENT || errno == ENOTDIR) {
      out.warnings.push_back(at(s.path_line, s, "path",
                                fmt::format("{} does not exist (yet?); its backups fail until "
                                            "it does",
                                            s.path)));
    } else {
      out.warnings.push_back(at(s.path_line, s, "path",
                                fmt::format("{}: cannot stat: {}", s.path, std::strerror(errno))));
    }
    // The first source it repeats is enough to name.
    for (const Seen& other : seen) {
      const SourceConf& o = *other.source;
      if (other.path == me.path) {
        out.errors.push_back(at(s.path_line, s, "path",
                                fmt::format("{} is also the path of sources.{} (line {}): one "
                                            "disk, backed up twice under two names",
                                            s.path, o.name, o.path_line)));
        break;
      }
      if (me.file && other.file == me.file) {
        out.errors.push_back(at(s.path_line, s, "path",
                                fmt::format("{} is the same file as {}, the path of sources.{} "
                                            "(line {}): one disk, backed up twice under two names",
                                            s.path, o.path, o.name, o.path_line)));
        break;
      }
    }
    seen.push_back(std::move(me));
    if (s.snapshot == SnapshotMode::Reflink && seen.back().file) {
      std::string why = reflink_obstacle(s.path, s.snapshot_dir);
      if (!why.empty()) out.errors.push_back(at(s.snapshot_line, s, "snapshot", why));
    }
  }
  return out;
}

std::string render_name(const SourceConf& source, system_clock::time_point when) {
  try {
    return render(parse_template(source.name_template), source, when);
  } catch (const Error& e) {
    if (e.kind() != ErrorKind::Usage) throw;
    throw Error(ErrorKind::Usage,
                fmt::format("name template {}: {}", in_quotes(source.name_template), e.what()));
  }
}

std::optional<system_clock::time_point> match_name(const SourceConf& source,
                                                   const std::string& relative_path) {
  return match(parse_template(source.name_template), source, relative_path);
}

}  // namespace diskferry
