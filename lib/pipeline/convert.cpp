#include "pipeline/convert.hpp"

#include <fmt/format.h>
#include <algorithm>
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
                     Sink& sink, const OutputSpec& spec) {
  // A container's header holds the image's size, which only a plan gives before the first byte.
  if (spec.container.tar) return false;
  if (!writer.needs_header_fixup()) return true;
  bool rewrite_ok = sink.supports_rewrite() && spec.compress.codec == StreamCodec::None;
  if (!rewrite_ok) return false;
  // A device the largest possible image would not fit: a plan gives the exact size, checked
  // before the first byte is written.
  if (auto cap = sink.capacity(); cap && source.known_size() && source.rereadable() &&
                                  writer.max_size(*source.known_size()) > *cap)
    return false;
  // A planned layout lets the checksum be computed as the bytes go out and never writes out of
  // order; where the destination prefers that, the second read of the source is worth it.
  return !(dest.prefers_planned() && source.rereadable());
}

// One output during one attempt: its writer and the stages down to its destination.
struct Run {
  size_t index = 0;  // into the outputs
  const Output* out = nullptr;
  std::unique_ptr<FormatWriter> writer;
  std::unique_ptr<Sink> chain;    // the outermost stage owns the rest
  CountingFilter* top = nullptr;  // what the writer writes to, once made
  Sink* queued = nullptr;         // its position is what reached the destination
  bool single = false;
  bool plan_pass = false;  // plan() sees the planning pass (else the plan is known or unneeded)
  ConvertResult r;
  std::exception_ptr error;

  bool active() const { return !error; }
  void fail(std::exception_ptr e) noexcept {
    if (error) return;
    error = e;
    if (chain) {
      chain->abort();
      chain.reset();
    }
    top = nullptr;
    queued = nullptr;
  }
  // The stages above the compression, once the image size is known where a container needs it.
  void make_top(uint64_t image_bytes) {
    if (top) return;
    if (out->spec.container.tar)
      chain = make_tar_sink(out->spec.container, image_bytes, std::move(chain));
    auto counted = std::make_unique<CountingFilter>(std::move(chain));
    top = counted.get();
    chain = std::move(counted);
  }
};

// Lets the destination refuse an output it cannot hold before anything is sent; with outer
// compression the image's size is only a bound, worth a warning at most.
void announce_size(Run& run) {
  if (run.out->spec.compress.codec == StreamCodec::None)
    run.top->expect_size(run.writer->planned_size());
  else
    run.top->expect_at_most(run.writer->planned_size());
}

std::string cannot_stream_message(const Source& source, const Destination& dest,
                                  const OutputSpec& spec) {
  std::string fmt_name = format_name(spec.writer.format);
  bool compressed = spec.compress.codec != StreamCodec::None;
  if (spec.container.tar)
    return fmt::format(
        "cannot put {} from {} into a tar container on {}: the tar header holds the image's size, "
        "which is known before its first byte only by reading the source twice (give a file, "
        "not a pipe)",
        fmt_name, source.name(), dest.name());
  return fmt::format(
      "cannot stream {} from {} to {}{}: the {} header must hold the offsets of tables written "
      "after the data, so it needs either a second read of the source (give a file, not a pipe) "
      "or one rewrite of the header at the end (write to a file or an SFTP server other than "
      "rclone{})",
      fmt_name, source.name(), dest.name(), compressed ? " compressed" : "", fmt_name,
      compressed ? ", without --compress" : "");
}

// Calls fn(run) for every active run, turning a run's failure into its error so the others go on.
template <class Fn>
void each_active(std::vector<std::unique_ptr<Run>>& runs, Fn&& fn) {
  for (auto& run : runs) {
    if (!run->active()) continue;
    try {
      fn(*run);
    } catch (...) {
      run->fail(std::current_exception());
    }
  }
}

bool any_active(const std::vector<std::unique_ptr<Run>>& runs) {
  for (auto& run : runs)
    if (run->active()) return true;
  return false;
}

// Feeds a unit to a writer in pieces of the writer's own unit (passes use the largest one).
template <class Fn>
void in_units(uint32_t unit, uint64_t offset, Bytes data, Fn&& fn) {
  for (size_t at = 0; at < data.size(); at += unit)
    fn(offset + at, data.subspan(at, std::min<size_t>(unit, data.size() - at)));
}

// One attempt at the outputs listed in `pending`. Every run comes back with its result or error.
std::vector<std::unique_ptr<Run>> attempt(Source& source, const std::vector<Output>& outputs,
                                          const std::vector<size_t>& pending,
                                          const ConvertOptions& o) {
  std::vector<std::unique_ptr<Run>> runs;
  for (size_t i : pending) {
    auto run = std::make_unique<Run>();
    run->index = i;
    run->out = &outputs[i];
    runs.push_back(std::move(run));
  }
  each_active(runs, [&](Run& run) {
    const OutputSpec& spec = run.out->spec;
    Destination& dest = *run.out->dest;
    run.writer = make_writer(spec.writer);
    std::unique_ptr<Sink> raw = dest.open_attempt();
    run.single = use_single_pass(*run.writer, source, dest, *raw, spec);
    if (!run.single) {
      if (!run.writer->needs_header_fixup() && source.known_size())
        run.writer->end_plan(*source.known_size());
      else if (source.rereadable())
        run.plan_pass = true;
      else
        throw Error(ErrorKind::Usage, cannot_stream_message(source, dest, spec));
    }
    // Raw of a known size is exactly that size: a device too small is refused before writing.
    if (run.single && raw->capacity() && !run.writer->needs_header_fixup() && source.known_size() &&
        spec.compress.codec == StreamCodec::None)
      raw->expect_size(run.writer->max_size(*source.known_size()));
    run.r.single_pass = run.single;
    if (o.wrap_destination) raw = o.wrap_destination(std::move(raw));
    if (dest.wants_sha256()) raw = make_sha256_sink(std::move(raw), &run.r.sha256);
    auto queued = make_queued_sink(std::move(raw));
    run.queued = queued.get();
    run.chain = make_compressing_sink(spec.compress, std::move(queued), o.threads);
    if (run.single) {
      run.make_top(0);
      // A raw image (or -O asis) of a source of known size has a known size too.
      if (!run.writer->needs_header_fixup() && source.known_size() && !spec.container.tar) {
        run.writer->end_plan(*source.known_size());
        announce_size(run);
      }
    }
  });

  uint32_t unit = 0;
  for (auto& run : runs)
    if (run->active()) unit = std::max(unit, run->writer->unit());
  try {
    bool planning = false;
    for (auto& run : runs) planning |= run->active() && run->plan_pass;
    if (planning) {
      Progress p(o.progress, "planning", source.input_bytes());
      uint64_t size = run_pass(
          source, unit, p,
          [&](uint64_t off, Bytes d) {
            each_active(runs, [&](Run& run) {
              if (run.plan_pass)
                in_units(run.writer->unit(), off, d,
                         [&](uint64_t o2, Bytes d2) { run.writer->plan(o2, d2); });
            });
          },
          &o);
      each_active(runs, [&](Run& run) {
        if (run.plan_pass) run.writer->end_plan(size);
      });
    }
    each_active(runs, [&](Run& run) {
      if (run.single) return;
      run.make_top(run.writer->planned_size());
      announce_size(run);
    });
    if (!any_active(runs)) return runs;

    bool all_single = true;
    for (auto& run : runs) all_single &= !run->active() || run->single;
    each_active(runs, [&](Run& run) { run.writer->begin(*run.top, !run.single); });
    Progress p(o.progress, all_single ? "converting" : "writing", source.input_bytes());
    uint64_t size = run_pass(
        source, unit, p,
        [&](uint64_t off, Bytes d) {
          each_active(runs, [&](Run& run) {
            in_units(run.writer->unit(), off, d,
                     [&](uint64_t o2, Bytes d2) { run.writer->write(o2, d2); });
          });
        },
        &o, true);
    each_active(runs, [&](Run& run) {
      run.writer->finish(size);
      run.r.virtual_size = virtual_disk_size(size);
      run.r.image_bytes = run.top->position();
      run.top->commit();
      run.r.output_bytes = run.queued->position();
    });
  } catch (...) {
    // The source (or the caller's progress callback) failed: every output ends with it.
    auto e = std::current_exception();
    for (auto& run : runs) run->fail(e);
  }
  return runs;
}

}  // namespace

std::vector<OutputOutcome> convert_many(Source& source, const std::vector<Output>& outputs,
                                        const ConvertOptions& o) {
  std::vector<OutputOutcome> outcomes(outputs.size());
  std::vector<size_t> pending;
  for (size_t i = 0; i < outputs.size(); ++i) pending.push_back(i);
  auto delay = o.retry_delay;
  for (int n = 1; !pending.empty(); ++n) {
    auto runs = attempt(source, outputs, pending, o);
    pending.clear();
    std::vector<std::string> retry_notes;
    for (auto& run : runs) {
      Destination& dest = *run->out->dest;
      OutputOutcome& out = outcomes[run->index];
      if (!run->error) {
        out.result = std::move(run->r);
        out.result.attempts = n;
        out.result.resent_bytes = dest.resent_bytes();
        continue;
      }
      try {
        std::rethrow_exception(run->error);
      } catch (const Error& e) {
        if (!e.transient() || !dest.resumable() || o.caller_retries) {
          out.error = run->error;
        } else if (!source.rereadable()) {
          dest.give_up();
          out.error = std::make_exception_ptr(
              Error(e.kind(), fmt::format("{}; cannot resume: {} cannot be read a second time "
                                          "(give a file instead of a pipe to make uploads "
                                          "resumable)",
                                          e.what(), source.name())));
        } else if (n > o.retries) {
          dest.give_up();
          out.error =
              std::make_exception_ptr(Error(e.kind(), fmt::format("{} (gave up after {} attempt{})",
                                                                  e.what(), n, n == 1 ? "" : "s")));
        } else {
          pending.push_back(run->index);
          retry_notes.push_back(
              fmt::format("{}; retrying in {:g} s (attempt {} of {}), resuming at {}", e.what(),
                          std::chrono::duration<double>(delay).count(), n + 1, o.retries + 1,
                          format_size(dest.resume_offset())));
        }
      } catch (...) {
        out.error = run->error;
      }
    }
    if (pending.empty()) break;
    if (o.on_retry)
      for (auto& m : retry_notes) o.on_retry(m);
    std::this_thread::sleep_for(delay);
    delay = std::min(delay * 2, o.max_retry_delay);
  }
  return outcomes;
}

ConvertResult convert(Source& source, Destination& dest, const ConvertOptions& o) {
  std::vector<Output> outputs{{o.output(), &dest}};
  auto outcomes = convert_many(source, outputs, o);
  if (outcomes[0].error) std::rethrow_exception(outcomes[0].error);
  return outcomes[0].result;
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
  if (o.container.tar) r.output_bytes = tar_size(o.container, r.image_bytes);
  return r;
}

}  // namespace diskferry
