// moe_layer_io end to end: inputs written with our safetensors writer, the real executable run as a
// child process, its outputs compared with the layer driven directly; bad inputs exit non-zero,
// say why, and write nothing.
#include <gtest/gtest.h>

#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>

#include "common/test_util.h"
#include "moecore/moecore.h"

#ifndef MOE_LAYER_IO_EXE
#define MOE_LAYER_IO_EXE ""
#endif
#ifndef MOE_MPIEXEC
#define MOE_MPIEXEC ""
#endif

using namespace moe;

namespace {

std::string tmpdir() {
  static std::string d = [] {
    std::string p = ::testing::TempDir() + "moe_layer_io_" + std::to_string(getpid());
    mkdir(p.c_str(), 0755);
    return p;
  }();
  return d;
}

bool exists(const std::string& p) {
  struct stat st;
  return stat(p.c_str(), &st) == 0;
}

struct ToolRun {
  int status;
  std::string output;
};

ToolRun run_tool(const std::string& args) {
  std::string log = tmpdir() + "/log.txt";
  std::string cmd = std::string(MOE_LAYER_IO_EXE) + " " + args + " > " + log + " 2>&1";
  int rc = std::system(cmd.c_str());
  std::ifstream f(log);
  std::string text((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  return {WIFEXITED(rc) ? WEXITSTATUS(rc) : -1, text};
}

MoEConfig small_config() {
  MoEConfig c;
  c.hidden_size = 8;
  c.num_moe_experts = 4;
  c.moe_ffn_hidden_size = 6;
  c.moe_router_topk = 2;
  c.gated_linear_unit = true;
  c.activation_func = "silu";
  c.moe_aux_loss_coeff = {0.01};
  c.moe_z_loss_coeff = 0.001;
  c.moe_shared_expert_intermediate_size = 4;
  c.moe_shared_expert_gate = true;
  c.init_method_std = 0.4;
  return c;
}

void write_text(const std::string& path, const std::string& text) {
  std::ofstream f(path);
  f << text;
}

class LayerIo : public ::testing::Test {
 protected:
  void SetUp() override {
    if (std::string(MOE_LAYER_IO_EXE).empty()) GTEST_SKIP() << "built without examples";
    cfg = small_config();
    cfg_path = tmpdir() + "/cfg.json";
    in_path = tmpdir() + "/in.safetensors";
    out_path = tmpdir() + "/out.safetensors";
    std::remove(out_path.c_str());
    write_text(cfg_path, config_to_json(cfg));
    // Parameters from a layer with another seed, so the tool must load them rather than init its own.
    MoEConfig other = cfg;
    other.seed = 99;
    MoELayer src(other, Device::cpu());
    inputs.emplace_back("hidden_states", test::randn({S, B, cfg.hidden_size}, DType::f32, 1));
    inputs.emplace_back("grad_output", test::randn({S, B, cfg.hidden_size}, DType::f32, 2));
    for (Parameter* p : src.parameters())
      if (p->trainable) inputs.emplace_back(p->name, p->value);
    save_safetensors(in_path, inputs);
  }
  const int64_t S = 8, B = 2;
  MoEConfig cfg;
  std::string cfg_path, in_path, out_path;
  std::vector<std::pair<std::string, Tensor>> inputs;
};

TEST_F(LayerIo, MatchesTheLayerDrivenDirectly) {
  ToolRun r = run_tool("--config " + cfg_path + " --in " + in_path + " --out " + out_path);
  ASSERT_EQ(r.status, 0) << r.output;
  SafetensorsFile out = load_safetensors(out_path);

  MoELayer layer(cfg, Device::cpu());
  for (auto& [name, t] : inputs) {
    if (Parameter* p = layer.find_parameter(name)) load_shard(*p, t);
  }
  ForwardContext ctx;
  ctx.seq_length = S;
  ctx.batch_size = B;
  Tensor y = layer.forward(inputs[0].second, ctx);
  RoutingSummary routing = layer.last_routing();
  Tensor dx = layer.backward(inputs[1].second);

  EXPECT_TRUE(test::bit_equal(out.at("output"), y));
  EXPECT_TRUE(test::bit_equal(out.at("grad_hidden_states"), dx));
  for (Parameter* p : layer.parameters()) {
    if (p->trainable) {
      EXPECT_TRUE(test::bit_equal(out.at("grad." + p->name), p->grad)) << p->name;
    }
  }
  EXPECT_TRUE(test::bit_equal(out.at("probs"), routing.probs));
  EXPECT_TRUE(test::bit_equal(out.at("routing_map"), routing.routing_map));
  EXPECT_EQ(out.at("tokens_per_expert").to_vector<int64_t>(), routing.tokens_per_expert);
  EXPECT_EQ(out.at("aux_loss").to_vector<float>()[0], static_cast<float>(routing.aux_loss));
  EXPECT_EQ(out.at("z_loss").to_vector<float>()[0], static_cast<float>(routing.z_loss));
  EXPECT_GT(routing.aux_loss, 0.0);
  EXPECT_FALSE(out.contains("router.expert_bias.updated"));
}

TEST_F(LayerIo, ExpertBiasUpdateIsWritten) {
  cfg.moe_router_score_function = "sigmoid";
  cfg.moe_router_enable_expert_bias = true;
  cfg.moe_router_bias_update_rate = 0.125;
  write_text(cfg_path, config_to_json(cfg));
  ToolRun r = run_tool("--config " + cfg_path + " --in " + in_path + " --out " + out_path);
  ASSERT_EQ(r.status, 0) << r.output;
  SafetensorsFile out = load_safetensors(out_path);
  std::vector<int64_t> c = out.at("tokens_per_expert").to_vector<int64_t>();
  std::vector<float> b = out.at("router.expert_bias.updated").to_vector<float>();
  double mean = 0;
  for (int64_t v : c) mean += static_cast<double>(v) / static_cast<double>(c.size());
  for (size_t e = 0; e < c.size(); ++e) {
    float want = mean > c[e] ? 0.125f : (mean < c[e] ? -0.125f : 0.0f);
    EXPECT_EQ(b[e], want) << "expert " << e;
  }
}

TEST_F(LayerIo, BadInputsFailClearlyAndWriteNothing) {
  // A missing parameter.
  std::vector<std::pair<std::string, Tensor>> missing(inputs.begin(), inputs.end() - 1);
  std::string bad_in = tmpdir() + "/missing.safetensors";
  save_safetensors(bad_in, missing);
  ToolRun r = run_tool("--config " + cfg_path + " --in " + bad_in + " --out " + out_path);
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("missing parameter"), std::string::npos) << r.output;
  EXPECT_FALSE(exists(out_path));

  // A parameter of the wrong shape.
  std::vector<std::pair<std::string, Tensor>> wrong = inputs;
  for (auto& [n, t] : wrong) {
    if (n == "router.weight") t = Tensor::zeros({cfg.num_moe_experts + 1, cfg.hidden_size}, DType::f32);
  }
  save_safetensors(bad_in, wrong);
  r = run_tool("--config " + cfg_path + " --in " + bad_in + " --out " + out_path);
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("router.weight"), std::string::npos) << r.output;
  EXPECT_FALSE(exists(out_path));

  // An unknown config key.
  std::string bad_cfg = tmpdir() + "/bad.json";
  write_text(bad_cfg, "{\"hidden_size\": 8, \"num_moe_experts\": 4, \"moe_ffn_hidden_sise\": 6}");
  r = run_tool("--config " + bad_cfg + " --in " + in_path + " --out " + out_path);
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("moe_ffn_hidden_sise"), std::string::npos) << r.output;
  EXPECT_FALSE(exists(out_path));

  // An unexpected tensor, and a missing input file.
  std::vector<std::pair<std::string, Tensor>> extra = inputs;
  extra.emplace_back("experts.linear_fc3.weight", Tensor::zeros({1}, DType::f32));
  save_safetensors(bad_in, extra);
  r = run_tool("--config " + cfg_path + " --in " + bad_in + " --out " + out_path);
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.output.find("experts.linear_fc3.weight"), std::string::npos) << r.output;
  r = run_tool("--config " + cfg_path + " --in " + tmpdir() + "/nope.safetensors --out " + out_path);
  EXPECT_NE(r.status, 0);
  EXPECT_FALSE(exists(out_path));
}

// Under mpirun: layouts with DP = 1 write what one process writes (parameter gradients divided by
// CP, Megatron's mean over the DP·CP replicas).
TEST_F(LayerIo, UnderMpirunMatchesOneProcess) {
  if (std::string(MOE_MPIEXEC).empty()) GTEST_SKIP() << "built without MPI";
  ToolRun r = run_tool("--config " + cfg_path + " --in " + in_path + " --out " + out_path);
  ASSERT_EQ(r.status, 0) << r.output;
  SafetensorsFile ref = load_safetensors(out_path);
  struct Case {
    int np;
    int64_t tp, cp, ep, etp;
    const char* dispatcher;
  };
  const Case cases[] = {{2, 2, 1, 2, 1, "alltoall"}, {4, 2, 2, 4, 1, "alltoall"}, {4, 4, 1, 2, 2, "allgather"}};
  for (const Case& c : cases) {
    SCOPED_TRACE("np " + std::to_string(c.np) + " tp " + std::to_string(c.tp) + " cp " + std::to_string(c.cp) +
                 " ep " + std::to_string(c.ep) + " etp " + std::to_string(c.etp) + " " + c.dispatcher);
    MoEConfig pc = cfg;
    pc.moe_ffn_hidden_size = 8;
    pc.moe_shared_expert_intermediate_size = 8;
    pc.tensor_model_parallel_size = c.tp;
    pc.context_parallel_size = c.cp;
    pc.expert_model_parallel_size = c.ep;
    pc.expert_tensor_parallel_size = c.etp;
    pc.moe_token_dispatcher_type = c.dispatcher;
    MoEConfig sc = pc;  // the same model on one process
    sc.tensor_model_parallel_size = sc.context_parallel_size = sc.expert_model_parallel_size = 1;
    sc.expert_tensor_parallel_size = 1;
    // Inputs for this model width: parameters of a seed-99 layer.
    MoEConfig other = sc;
    other.seed = 99;
    MoELayer src(other, Device::cpu());
    std::vector<std::pair<std::string, Tensor>> in{inputs[0], inputs[1]};
    for (Parameter* p : src.parameters())
      if (p->trainable) in.emplace_back(p->name, p->value);
    std::string pin = tmpdir() + "/in_mpi.safetensors", pcfg = tmpdir() + "/cfg_mpi.json";
    std::string scfg = tmpdir() + "/cfg_one.json", sout = tmpdir() + "/out_one.safetensors";
    save_safetensors(pin, in);
    write_text(pcfg, config_to_json(pc));
    write_text(scfg, config_to_json(sc));
    std::remove(out_path.c_str());
    ToolRun one_run = run_tool("--config " + scfg + " --in " + pin + " --out " + sout);
    ASSERT_EQ(one_run.status, 0) << one_run.output;
    std::string env = "OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1 ";
    std::string cmd = env + MOE_MPIEXEC + std::string(" -n ") + std::to_string(c.np) +
                      " --oversubscribe --allow-run-as-root --bind-to none " + MOE_LAYER_IO_EXE + " --config " + pcfg +
                      " --in " + pin + " --out " + out_path + " > " + tmpdir() + "/mpi_log.txt 2>&1";
    int rc = std::system(cmd.c_str());
    std::ifstream log(tmpdir() + "/mpi_log.txt");
    std::string text((std::istreambuf_iterator<char>(log)), std::istreambuf_iterator<char>());
    ASSERT_TRUE(WIFEXITED(rc) && WEXITSTATUS(rc) == 0) << text;
    SafetensorsFile got = load_safetensors(out_path), want = load_safetensors(sout);
    ASSERT_EQ(got.names.size(), want.names.size());
    for (const std::string& n : want.names) {
      ASSERT_TRUE(got.contains(n)) << n;
      if (n == "routing_map" || n == "tokens_per_expert") {
        EXPECT_TRUE(test::bit_equal(got.at(n), want.at(n))) << n;
        continue;
      }
      double scale = n.rfind("grad.", 0) == 0 && n != "grad_hidden_states" ? 1.0 / static_cast<double>(c.cp) : 1.0;
      std::vector<double> w = test::to_f64(want.at(n));
      for (double& v : w) v *= scale;
      EXPECT_TRUE(test::all_close(test::to_f64(got.at(n)), w, 1e-6, 1e-4)) << n;
    }
  }
}

}  // namespace
