// Fuzz target: the Megatron command-line parser (parse_megatron_args). The input is the argument
// list, one argument per line.
#include "fuzz/fuzz.h"
#include "moecore/error.h"
#include "moecore/training.h"

namespace {

void one(const uint8_t* data, size_t size) {
  std::vector<std::string> argv;
  std::string cur;
  for (size_t i = 0; i < size; ++i) {
    if (data[i] == '\n') {
      argv.push_back(cur);
      cur.clear();
    } else {
      cur += static_cast<char>(data[i]);
    }
  }
  if (!cur.empty()) argv.push_back(cur);
  moe::MoEConfig model = moe::megatron_model_defaults();
  try {
    (void)moe::parse_megatron_args(argv, model);
  } catch (const moe::Error&) {
  }
}

std::string lines(const std::vector<std::string>& args) {
  std::string s;
  for (const std::string& a : args) s += a + "\n";
  return s;
}

void write_seeds(const std::string& dir) {
  // scripts/run_main.sh's command line (the README's first command).
  moe::fuzz::write_file(
      dir + "/run_main.txt",
      lines({"--num-layers", "4", "--hidden-size", "128", "--num-attention-heads", "4", "--group-query-attention",
             "--num-query-groups", "2", "--seq-length", "128", "--max-position-embeddings", "128", "--ffn-hidden-size",
             "256", "--num-experts", "8", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "256",
             "--moe-router-load-balancing-type", "aux_loss", "--moe-aux-loss-coeff", "1e-2",
             "--moe-token-dispatcher-type", "alltoall", "--swiglu", "--normalization", "RMSNorm",
             "--position-embedding-type", "rope", "--disable-bias-linear", "--attention-dropout", "0",
             "--hidden-dropout", "0", "--micro-batch-size", "4", "--global-batch-size", "16", "--train-iters", "400",
             "--lr", "3e-3", "--min-lr", "3e-4", "--lr-decay-style", "cosine", "--lr-warmup-iters", "40",
             "--weight-decay", "0.01", "--clip-grad", "1.0", "--data-path", "data/fortunes_text_document", "--split",
             "98,2,0", "--eval-interval", "100", "--eval-iters", "4", "--log-interval", "50"}));
  moe::fuzz::write_file(
      dir + "/layer_freq.txt",
      lines({"--num-layers", "8", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
             "--max-position-embeddings", "32", "--num-experts", "4", "--moe-router-topk", "1", "--moe-layer-freq",
             "([0]+[1]*3)*2", "--disable-bias-linear", "--attention-dropout", "0", "--hidden-dropout", "0",
             "--micro-batch-size", "2", "--global-batch-size", "4", "--train-samples", "64", "--lr", "1e-3",
             "--lr-decay-style", "WSD", "--lr-wsd-decay-style", "linear", "--lr-wsd-decay-iters", "4",
             "--data-path", "data/x", "--bf16", "--use-distributed-optimizer"}));
}

}  // namespace

moe::fuzz::Target moe::fuzz::fuzz_target() {
  return {"megatron_args", one,
          {"\n", "--", "--num-experts\n", "--moe-layer-freq\n", "[1]*3+[0]\n", "(", ")", "*", "+", "[", "]",
           "--lr-decay-style\n", "--global-batch-size\n", "--micro-batch-size\n", "--train-iters\n",
           "--train-samples\n", "--data-path\n", "--split\n", "--load\n", "--save\n", "--fp16\n", "--bf16\n",
           "--seq-length\n", "0\n", "-1\n", "1e400\n", "nan\n", "9223372036854775807\n"},
          write_seeds};
}
