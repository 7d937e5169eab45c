#include "pipeline/convert.hpp"

#include <fmt/format.h>
#include <thread>
#include <vector>

#include "pipeline/checksum.hpp"
#include "pipeline/progress.hpp"
#include "util/error.hpp"
#include "util/size.hpp"

namespace diskferry {
namespace {

// Counts what the format writer hands on, i.e. the image size before outer compression.
class CountingFilter final : public FilterSink {
 public:
  using FilterSink::FilterSink;
  void write(Bytes d) override {
    FilterSink::write(d);
    n_ += d.size();
  }
  void write_zeros(uint64_t n) override {
    FilterSink::write_zeros(n);
    n_ += n;
  }
  uint64_t position() const override { return n_; }

 private:
  uint64_t n_ = 0;
};

// Runs one pass of the source through `fn(offset, bytes)`; returns the source size.
template <class Fn>
uint64_t run_pass(Source& source, uint32_t unit, Progress& progress, Fn&& fn,
                  const ConvertOptions* o = nullptr, bool writing = false) {
  auto pass = source.open_pass(unit);
  std::vector<std::byte> buf(unit);
  while (auto c = pass->next(buf)) {
    fn(c->offset, Bytes(buf.data(), c->length));
    progress.update(pass->consumed());
    if (o && o->on_progress) o->on_progress(pass->consumed(), source.input_bytes(), writing);
  }
  progress.done(pass->consumed());
  return pass->size();
}

bool use_single_pass(const FormatWriter& writer, const Source& source, const Destination& dest,
                     Sink& sink, const ConvertOptions& o) {
  if (!writer.needs_header_fixup()) return true;
  bool rewrite_ok = sink.supports_rewrite() && o.compress.codec == StreamCodec::None;
  if (!rewrite_ok) return false;
  // A planned layout lets the checksum be computed as the bytes go out and never writes out of
  // order; where the destination prefers that, the second read of the source is worth it.
  return !(dest.prefers_planned() && source.rereadable());
}

ConvertResult convert_once(Source& source, Destination& dest, const ConvertOptions& o) {
  auto writer = make_writer(o.writer);
  std::unique_ptr<Sink> raw = dest.open_attempt();
  bool single = use_single_pass(*writer, source, dest, *raw, o);
  std::string fmt_name = format_name(o.writer.format);
  if (!single && !source.rereadable())
    throw Error(ErrorKind::Usage,
                fmt::format("cannot stream {} from {} to {}{}: the {} header must hold the "
                            "offsets of tables written after the data, so it needs either a second "
                            "read of the source (give a file, not a pipe) or one rewrite of the "
                            "header at the end (write to a file or an SFTP server other than "
                            "rclone{})",
                            fmt_name, source.name(), dest.name(),
                            o.compress.codec != StreamCodec::None ? " compressed" : "", fmt_name,
                            o.compress.codec != StreamCodec::None ? ", without --compress" : ""));

  ConvertResult r;
  r.single_pass = single;
  if (o.wrap_destination) raw = o.wrap_destination(std::move(raw));
  if (dest.wants_sha256()) raw = make_sha256_sink(std::move(raw), &r.sha256);
  auto queued = make_queued_sink(std::move(raw));
  Sink* out = queued.get();
  auto counted = std::make_unique<CountingFilter>(
      make_compressing_sink(o.compress, std::move(queued), o.threads));
  CountingFilter& sink = *counted;

  if (!single) {
    Progress p(o.progress, "planning", source.input_bytes());
    uint64_t size = run_pass(
        source, writer->unit(), p, [&](uint64_t off, Bytes d) { writer->plan(off, d); }, &o);
    writer->end_plan(size);
    if (o.compress.codec == StreamCodec::None) sink.expect_size(writer->planned_size());
  }
  Progress p(o.progress, single ? "converting" : "writing", source.input_bytes());
  writer->begin(sink, !single);
  uint64_t size = run_pass(
      source, writer->unit(), p, [&](uint64_t off, Bytes d) { writer->write(off, d); }, &o, true);
  writer->finish(size);
  r.virtual_size = virtual_disk_size(size);
  r.image_bytes = sink.position();
  sink.commit();
  r.output_bytes = out->position();
  return r;
}

}  // namespace

ConvertResult convert(Source& source, Destination& dest, const ConvertOptions& o) {
  auto delay = o.retry_delay;
  for (int attempt = 1;; ++attempt) {
    try {
      ConvertResult r = convert_once(source, dest, o);
      r.attempts = attempt;
      r.resent_bytes = dest.resent_bytes();
      return r;
    } catch (const Error& e) {
      if (!e.transient() || !dest.resumable() || o.caller_retries) throw;
      if (!source.rereadable()) {
        dest.give_up();
        throw Error(e.kind(),
                    fmt::format("{}; cannot resume: {} cannot be read a second time "
                                "(give a file instead of a pipe to make uploads resumable)",
                                e.what(), source.name()));
      }
      if (attempt > o.retries) {
        dest.give_up();
        throw Error(e.kind(), fmt::format("{} (gave up after {} attempt{})", e.what(), attempt,
                                          attempt == 1 ? "" : "s"));
      }
      if (o.on_retry)
        o.on_retry(fmt::format("{}; retrying in {:g} s (attempt {} of {}), resuming at {}",
                               e.what(), std::chrono::duration<double>(delay).count(), attempt + 1,
                               o.retries + 1, format_size(dest.resume_offset())));
      std::this_thread::sleep_for(delay);
      delay = std::min(delay * 2, o.max_retry_delay);
    }
  }
}

ConvertResult convert(Source& source, std::unique_ptr<Sink> dest, const ConvertOptions& o) {
  auto d = make_single_destination("output", std::move(dest));
  return convert(source, *d, o);
}

ConvertResult measure(Source& source, const ConvertOptions& o) {
  auto writer = make_writer(o.writer);
  ConvertResult r;
  if (o.compress.codec != StreamCodec::None) {
    // The compressed size is only known by compressing: run the real pipeline into a counter.
    return convert(source, make_counting_sink(), o);
  }
  Progress p(o.progress, "measuring", source.input_bytes());
  uint64_t size =
      run_pass(source, writer->unit(), p, [&](uint64_t off, Bytes d) { writer->plan(off, d); });
  writer->end_plan(size);
  r.virtual_size = virtual_disk_size(size);
  r.image_bytes = r.output_bytes = writer->planned_size();
  return r;
}

}  // namespace diskferry
