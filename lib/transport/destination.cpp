#include "transport/destination.hpp"

#include "util/error.hpp"

namespace diskferry {
namespace {

class SingleDestination final : public Destination {
 public:
  SingleDestination(std::string name, std::unique_ptr<Sink> sink)
      : name_(std::move(name)), sink_(std::move(sink)) {}
  const std::string& name() const override { return name_; }
  std::unique_ptr<Sink> open_attempt() override {
    if (!sink_) throw Error(ErrorKind::Internal, name_ + ": destination opened twice");
    return std::move(sink_);
  }

 private:
  std::string name_;
  std::unique_ptr<Sink> sink_;
};

}  // namespace

std::unique_ptr<Destination> make_single_destination(std::string name, std::unique_ptr<Sink> sink) {
  return std::make_unique<SingleDestination>(std::move(name), std::move(sink));
}

}  // namespace diskferry
