#include "pipeline/convert.hpp"

#include <fmt/format.h>
#include <vector>

#include "pipeline/progress.hpp"
#include "util/error.hpp"

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
uint64_t run_pass(Source& source, uint32_t unit, Progress& progress, Fn&& fn) {
  auto pass = source.open_pass(unit);
  std::vector<std::byte> buf(unit);
  while (auto c = pass->next(buf)) {
    fn(c->offset, Bytes(buf.data(), c->length));
    progress.update(pass->consumed());
  }
  progress.done(pass->consumed());
  return pass->size();
}

}  // namespace

ConvertResult convert(Source& source, std::unique_ptr<Sink> dest, const ConvertOptions& o) {
  auto writer = make_writer(o.writer);
  bool rewrite_ok = dest->supports_rewrite() && o.compress.codec == StreamCodec::None;
  bool single = !writer->needs_header_fixup() || rewrite_ok;
  std::string fmt_name = format_name(o.writer.format);
  if (!single && !source.rereadable())
    throw Error(ErrorKind::Usage,
                fmt::format("cannot stream {} from {} to a pipe{}: the {} header must hold the "
                            "offsets of tables written after the data, so it needs either a second "
                            "read of the source (give a file, not a pipe) or one rewrite of the "
                            "header at the end (write to a file or SFTP{})",
                            fmt_name, source.name(),
                            o.compress.codec != StreamCodec::None ? " or compressed" : "", fmt_name,
                            o.compress.codec != StreamCodec::None ? ", without --compress" : ""));

  ConvertResult r;
  r.single_pass = single;
  auto queued = make_queued_sink(std::move(dest));
  Sink* out = queued.get();
  auto counted = std::make_unique<CountingFilter>(
      make_compressing_sink(o.compress, std::move(queued), o.threads));
  CountingFilter& sink = *counted;

  if (!single) {
    Progress p(o.progress, "planning", source.input_bytes());
    uint64_t size =
        run_pass(source, writer->unit(), p, [&](uint64_t off, Bytes d) { writer->plan(off, d); });
    writer->end_plan(size);
  }
  Progress p(o.progress, single ? "converting" : "writing", source.input_bytes());
  writer->begin(sink, !single);
  uint64_t size =
      run_pass(source, writer->unit(), p, [&](uint64_t off, Bytes d) { writer->write(off, d); });
  writer->finish(size);
  r.virtual_size = virtual_disk_size(size);
  r.image_bytes = sink.position();
  sink.commit();
  r.output_bytes = out->position();
  return r;
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
