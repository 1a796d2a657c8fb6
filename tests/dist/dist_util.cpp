#include "dist/dist_util.h"

#include <cstdio>

#include "moecore/backend.h"

namespace moe::dist {

namespace {

// On ranks other than 0: print failed assertions with the rank, nothing else.
class FailurePrinter : public ::testing::EmptyTestEventListener {
 public:
  explicit FailurePrinter(int rank) : rank_(rank) {}
  void OnTestPartResult(const ::testing::TestPartResult& r) override {
    if (!r.failed()) return;
    std::fprintf(stderr, "[world rank %d] %s:%d: Failure\n%s\n", rank_, r.file_name() ? r.file_name() : "?",
                 r.line_number(), r.summary());
  }
  void OnTestEnd(const ::testing::TestInfo& info) override {
    if (info.result()->Failed())
      std::fprintf(stderr, "[world rank %d] FAILED %s.%s\n", rank_, info.test_suite_name(), info.name());
  }

 private:
  int rank_;
};

}  // namespace

int run_dist_tests(int argc, char** argv) {
  std::shared_ptr<Communicator> w = mpi_world();
  set_num_threads(1);
  ::testing::InitGoogleTest(&argc, argv);
  if (w->rank() != 0) {
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
    listeners.Append(new FailurePrinter(w->rank()));
  }
  int rc = RUN_ALL_TESTS();
  try {
    Tensor worst = Tensor::from_vector(std::vector<int32_t>{rc}, {1});
    w->all_reduce(worst, ReduceOp::max);
    int agreed = worst.to_vector<int32_t>()[0];
    if (w->rank() == 0 && agreed != rc) std::fprintf(stderr, "a test failed on another rank (see above)\n");
    rc = agreed;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "[world rank %d] could not agree on the result: %s\n", w->rank(), e.what());
    rc = rc ? rc : 1;
  }
  return rc;
}

}  // namespace moe::dist
