// A peer that dies (SIGKILL) while the others are inside an operation with it. Run under mpiexec by
// tests/dist/dead_peer_check.sh (np 3, MOE_COMM_TIMEOUT_S from CTest):
//
//   test_dead_peer <all_to_all_v | all_reduce | send_recv> <rc-dir>
//
// Every rank builds a fresh group ('ep', 'dp_cp' or 'pp'), meets its peers once, then the last rank
// kills itself with SIGKILL a moment after the others entered the operation (a dispatch's
// all-to-all-v, a gradient all-reduce, or a pipeline stage's send/recv with the dead stage). A
// survivor must get a communication error; it prints the error and how long it waited to stderr,
// writes the exit status it is about to use into <rc-dir>/rc.<rank> (Open MPI's mpiexec drops the
// ranks' statuses under --enable-recovery) and exits with it at once (std::_Exit): 1 on the expected
// error, 3 when the operation completed without the dead rank, 4 on any other error.
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "moecore/comm.h"
#include "moecore/error.h"
#include "moecore/tensor.h"

namespace {

[[noreturn]] void finish(const std::string& rc_dir, int rank, int code, const std::string& line) {
  std::fprintf(stderr, "[r%d] dead_peer: %s; exiting with status %d\n", rank, line.c_str(), code);
  std::fflush(stderr);
  std::ofstream(rc_dir + "/rc." + std::to_string(rank)) << code << "\n";
  // No MPI_Finalize: it is collective in Open MPI, and a peer that is stuck rather than dead would
  // keep it waiting (programs on run_main.h call MPI_Abort instead).
  std::_Exit(code);
}

}  // namespace

int main(int argc, char** argv) {
  using namespace moe;
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s <all_to_all_v|all_reduce|send_recv> <rc-dir>\n", argv[0]);
    return 2;
  }
  const std::string op = argv[1], rc_dir = argv[2];
  if (op != "all_to_all_v" && op != "all_reduce" && op != "send_recv") {
    std::fprintf(stderr, "test_dead_peer: unknown operation '%s' (expected all_to_all_v, all_reduce or send_recv)\n",
                 op.c_str());
    return 2;
  }
  std::shared_ptr<Communicator> world = mpi_world();
  const int me = world->rank(), n = world->size(), victim = n - 1;
  const std::string group = op == "all_to_all_v" ? "ep" : op == "all_reduce" ? "dp_cp" : "pp";
  std::shared_ptr<Communicator> g = world->split(0, me, group);
  g->barrier();  // everyone is alive here
  if (me == victim) {
    // Die while the others are inside the operation.
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    std::raise(SIGKILL);
  }
  const auto t0 = std::chrono::steady_clock::now();
  auto waited = [&] {
    return std::to_string(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count()) + " s";
  };
  try {
    if (op == "all_to_all_v") {
      std::vector<int64_t> rows(static_cast<size_t>(n), 64);
      Tensor in = Tensor::zeros({64 * n, 256}, DType::bf16);   // (64·n, 256) bf16: a dispatch's rows
      Tensor out = Tensor::zeros({64 * n, 256}, DType::bf16);  // (64·n, 256) bf16
      g->all_to_all_v(in, rows, out, rows);
    } else if (op == "all_reduce") {
      Tensor grads = Tensor::zeros({1 << 16}, DType::f32);  // (65536) f32: a gradient bucket
      g->all_reduce(grads);
    } else {
      // A pipeline stage next to the dead one: sends its activations, receives the gradients.
      Tensor act = Tensor::zeros({16, 64}, DType::f32);    // (16, 64) f32
      Tensor grad = Tensor::zeros({16, 64}, DType::f32);   // (16, 64) f32
      g->batch_send_recv({P2POp{P2POp::Kind::send, act, victim}, P2POp{P2POp::Kind::recv, grad, victim}});
    }
  } catch (const Error& e) {
    std::fprintf(stderr, "%s\n", e.what());
    finish(rc_dir, me, e.code() == ErrorCode::communication ? 1 : 4, op + " failed after " + waited());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "[r%d] unexpected exception: %s\n", me, e.what());
    finish(rc_dir, me, 4, op + " failed after " + waited());
  }
  finish(rc_dir, me, 3, op + " completed without rank " + std::to_string(victim) + " after " + waited());
}
