#!/usr/bin/python3
"""Parity test: libmoecore's `moe_gpt_io` (one training step's forward + backward of a whole MoE GPT
model) against the independent PyTorch reference (reference_gpt.py, Megatron Core semantics, f64).

    /usr/bin/python3 tests/parity/run_parity_gpt.py --exe build/examples/moe_gpt_io [--only NAME] [--keep DIR]
        [--np N --mpiexec PATH [--mpiexec-arg=--oversubscribe] [--parallel KEY=VALUE ...]]
    /usr/bin/python3 tests/parity/run_parity_gpt.py --self-test   # the harness against the f32 reference

For every config below: seeded inputs whose discrete routing decisions (top-k, aux-loss top-k,
capacity ranking) have a margin >= MIN_MARGIN in every MoE layer and micro-batch of the reference
run (routing depends on the whole model, so the margins come from the full forward); the config and
IN files are written, moe_gpt_io runs, and every tensor of its OUT file is compared:
  - float tensors (loss F64, logits and grad.* F32): |ours - ref| <= atol + rtol*|ref| elementwise,
    atol = atol_scale * max|ref| per tensor; fp32 parameters: rtol 1e-4, atol_scale 1e-5. Reason: an
    f32 implementation of this 2-3 layer model (norms, attention softmax, routing, cross entropy and
    their backward; sums of <= 64 terms) lands ~1e-6 relative from the exact result (the f32 run of
    the reference itself, --self-test, and libmoecore's CPU build both use at most ~0.15 of it);
    atol covers cancellation in gradient entries much smaller than their tensor's largest;
  - tokens_per_expert.<i> (I64): bit-exact, dtype included;
  - the set of tensor names must be exactly the contract's (no missing, no extra).
Witness checks make sure each config exercises what it is named after (e.g. RoPE changes the
logits, the loss mask and the micro-batch split change the gradients, the seq-aux and z losses reach
the router's gradient), so a missing feature cannot pass.
Bad inputs (missing parameter, wrong shape, token id >= vocab_size, unknown config key,
num_attention_heads not divisible by num_query_groups, ...) must make moe_gpt_io exit non-zero with a
message on stderr naming the culprit and write no output file.

With --np N the tool runs as `MPIEXEC -n N [args] EXE ...` and every config gets the --parallel
overrides (e.g. --parallel tensor_model_parallel_size=2 --parallel expert_model_parallel_size=2);
the data-parallel size DP = N / (TP*CP*PP) enters the reference (its micro-batches are the DP
replicas' micro-batches; only global_aux_loss tells the two apart), and so do TP and CP through the
config: with a capacity factor, Megatron applies the capacity per rank's local tokens (the TP x CP
shard), which the reference models. Configs the layout cannot split are skipped and listed.

Exit status: 0 all pass, 1 any mismatch, 2 usage error, 77 torch is not importable (CTest skip).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

try:
    import numpy as np
    import torch
except ImportError as e:
    print(f"run_parity_gpt: {e} ({sys.executable}): torch and numpy are needed - skipping (exit 77)")
    sys.exit(77)

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference_gpt as gref  # noqa: E402
import reference_moe as mref  # noqa: E402

MIN_MARGIN = 1e-3  # smallest allowed gap at any discrete routing decision (logit/score units)
SEED_TRIES = 300
# (rtol, atol_scale) per params dtype. fp32: f32 compute through the model lands ~1e-6 relative from the
# exact result (observed tol_use <= 0.15), atol for cancellation; fp64: outputs are rounded to f32.
TOL = {"fp32": (1e-4, 1e-5), "fp64": (1e-6, 1e-7)}
TOOL_TIMEOUT_S = 120

# ---------------------------------------------------------------------------------------------
# Configs: (name, overrides, B, mask). Base: 2 layers, H=16, nh=4 (hd=4), V=64, S=8, dense F=32,
# 8 experts of F=12, softmax top-2, swiglu, aux loss 0.1, RMSNorm, RoPE, tied embeddings.
# ---------------------------------------------------------------------------------------------
BASE = {
    "num_layers": 2, "hidden_size": 16, "num_attention_heads": 4, "vocab_size": 64, "seq_length": 8,
    "ffn_hidden_size": 32, "normalization": "RMSNorm", "position_embedding_type": "rope",
    "num_moe_experts": 8, "moe_ffn_hidden_size": 12, "moe_router_topk": 2,
    "gated_linear_unit": True, "activation_func": "silu",
    "moe_router_load_balancing_type": "aux_loss", "moe_aux_loss_coeff": 0.1,
}
NO_LB = {"moe_router_load_balancing_type": "none", "moe_aux_loss_coeff": 0.0}

CONFIGS = [
    ("tied_rmsnorm_rope", {}, 4, "ones"),
    ("untied_layernorm_learned", {"normalization": "LayerNorm", "position_embedding_type": "learned_absolute",
                                  "untie_embeddings_and_output_weights": True, "num_moe_experts": 4,
                                  "gated_linear_unit": False, "activation_func": "gelu",
                                  "layernorm_epsilon": 1e-6}, 2, "ones"),
    # hd = 8 != H/nh, so linear_proj is (16, 32); rotary on 4 of the 8 dims; LayerNorm q/k norms (bias).
    ("gqa_qk_layernorm_rope_half", {"num_query_groups": 2, "kv_channels": 8, "qk_layernorm": True,
                                    "rotary_percent": 0.5, "rotary_base": 500, "normalization": "LayerNorm"},
     4, "ones"),
    ("dense_moe_list_3layers", {"num_layers": 3, "moe_layer_freq": [0, 1, 0], "ffn_hidden_size": 24}, 4, "ones"),
    ("mask_holes_M2", {"num_microbatches": 2, "moe_router_topk": 3}, 4, "holes"),
    ("sigmoid_seq_aux_z_bias", {"moe_router_score_function": "sigmoid", "moe_router_enable_expert_bias": True,
                                "moe_router_load_balancing_type": "seq_aux_loss", "moe_aux_loss_coeff": 0.3,
                                "moe_z_loss_coeff": 0.05}, 4, "ones"),
    ("shared_expert_gate_freq2", {"num_layers": 3, "moe_layer_freq": 2, "moe_shared_expert_intermediate_size": 20,
                                  "moe_shared_expert_gate": True, "num_moe_experts": 4}, 2, "ones"),
    ("capacity_M2", {"moe_expert_capacity_factor": 1.0, "moe_token_drop_policy": "probs", "num_microbatches": 2},
     4, "ones"),
    ("global_aux_M2", {"moe_router_load_balancing_type": "global_aux_loss", "moe_aux_loss_coeff": 0.5,
                       "num_microbatches": 2, "moe_z_loss_coeff": 0.01}, 4, "holes"),
]

# Witnesses: (config, description, config overrides, input edit, tensor, kind). The reference with
# the change must differ from the reference without it on `tensor`: 'continuous' by more than 10x the
# comparison tolerance, 'discrete' in at least one entry. Input edits are functions of the inputs.


def _untie(inputs):
    out = dict(inputs)
    out["output_layer.weight"] = inputs["embedding.word_embeddings.weight"].copy()
    return out


def _drop(*prefixes_or_suffixes):
    def edit(inputs):
        return {k: v for k, v in inputs.items() if not any(s in k for s in prefixes_or_suffixes)}
    return edit


def _zero(name):
    def edit(inputs):
        out = dict(inputs)
        out[name] = np.zeros_like(inputs[name])
        return out
    return edit


WITNESSES = [
    ("tied_rmsnorm_rope", "output layer shares the embedding's gradient",
     {"untie_embeddings_and_output_weights": True}, _untie, "grad.embedding.word_embeddings.weight", "continuous"),
    ("tied_rmsnorm_rope", "RoPE changes the logits", {"rotary_base": 100}, None, "logits", "continuous"),
    ("tied_rmsnorm_rope", "aux-loss gradient", NO_LB, None, "grad.decoder.layers.1.mlp.router.weight",
     "continuous"),
    ("untied_layernorm_learned", "position embeddings matter", {}, _zero("embedding.position_embeddings.weight"),
     "logits", "continuous"),
    ("untied_layernorm_learned", "layernorm_epsilon matters", {"layernorm_epsilon": 1e-1}, None, "logits",
     "continuous"),
    ("gqa_qk_layernorm_rope_half", "qk_layernorm matters", {"qk_layernorm": False}, _drop("k_layernorm", "q_layernorm"),
     "logits", "continuous"),
    ("gqa_qk_layernorm_rope_half", "rotary_percent matters", {"rotary_percent": 1.0}, None, "logits", "continuous"),
    ("mask_holes_M2", "the loss mask matters", {}, _drop("loss_mask"), "grad.embedding.word_embeddings.weight",
     "continuous"),
    ("mask_holes_M2", "the micro-batch split matters", {"num_microbatches": 1}, None,
     "grad.decoder.layers.0.self_attention.linear_qkv.weight", "continuous"),
    ("sigmoid_seq_aux_z_bias", "seq-aux gradient", {"moe_router_load_balancing_type": "none",
                                                    "moe_aux_loss_coeff": 0.0},
     None, "grad.decoder.layers.1.mlp.router.weight", "continuous"),
    ("sigmoid_seq_aux_z_bias", "seq-aux differs from aux", {"moe_router_load_balancing_type": "aux_loss"}, None,
     "grad.decoder.layers.0.mlp.router.weight", "continuous"),
    ("sigmoid_seq_aux_z_bias", "z-loss gradient", {"moe_z_loss_coeff": None}, None,
     "grad.decoder.layers.0.mlp.router.weight", "continuous"),
    ("sigmoid_seq_aux_z_bias", "expert bias changes the routing", {"moe_router_enable_expert_bias": False},
     _drop("router.expert_bias"), "logits", "continuous"),
    ("shared_expert_gate_freq2", "gate matters", {"moe_shared_expert_gate": False}, _drop("gate_weight"), "logits",
     "continuous"),
    ("capacity_M2", "tokens are dropped", {"moe_expert_capacity_factor": None}, None, "tokens_per_expert.0",
     "discrete"),
    ("global_aux_M2", "running-mean counts differ from per-micro-batch aux",
     {"moe_router_load_balancing_type": "aux_loss"}, None, "grad.decoder.layers.0.mlp.router.weight", "continuous"),
]


def make_config(overrides, parallel=None):
    cfg = dict(BASE)
    cfg.update(overrides)
    cfg.update(parallel or {})
    return {k: v for k, v in cfg.items() if v is not None}


def params_dtype(cfg):
    return cfg.get("params_dtype", "fp32")


def find_separated_inputs(cfg, B, mask, base_seed, dp=1):
    """The first seed whose reference routing decisions, in every MoE layer and micro-batch, all have
    margin >= MIN_MARGIN."""
    worst = None
    for seed in range(base_seed, base_seed + SEED_TRIES):
        inputs = gref.make_inputs(cfg, B, seed, mask=mask, data_parallel_size=dp)
        result, margins = gref.gpt_reference(cfg, inputs, return_margins=True, data_parallel_size=dp)
        low = min(margins.values()) if margins else float("inf")
        worst = low if worst is None else max(worst, low)
        if low >= MIN_MARGIN:
            return seed, inputs, result, margins
    raise RuntimeError(f"no seed in [{base_seed}, {base_seed + SEED_TRIES}) gives routing margins >= {MIN_MARGIN} "
                       f"(best {worst:.2e})")


def tool_command(args):
    if args.self_test:
        return [sys.executable, os.path.abspath(__file__), "--emulate-tool"]
    exe = [os.path.abspath(args.exe)]
    if args.np:
        return [args.mpiexec, "-n", str(args.np)] + list(args.mpiexec_arg) + exe
    return exe


def run_tool(cmd, cfg_path, in_path, out_path):
    try:
        proc = subprocess.run(cmd + ["--config", cfg_path, "--in", in_path, "--out", out_path],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=TOOL_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return None, "", f"timed out after {TOOL_TIMEOUT_S} s"
    return proc.returncode, proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")


def expected_dtype(name):
    if name.startswith("tokens_per_expert."):
        return "I64"
    if name == "loss":
        return "F64"
    return "F32"


def compare(name, ours, ours_dtype, want, pdt):
    """One row of the table: (status, shape, max_abs, rel, tol_frac, note)."""
    shape = tuple(want.shape)
    if tuple(ours.shape) != shape:
        return "FAIL", shape, np.nan, np.nan, np.nan, f"shape {tuple(ours.shape)}, expected {shape}"
    if ours_dtype != expected_dtype(name):
        return "FAIL", shape, np.nan, np.nan, np.nan, f"dtype {ours_dtype}, expected {expected_dtype(name)}"
    if expected_dtype(name) == "I64":
        diff = np.abs(ours.astype(np.int64) - want.astype(np.int64))
        bad = int((diff != 0).sum())
        note = "" if bad == 0 else f"{bad} entries differ: ours {ours.tolist()}, ref {want.tolist()}"
        return ("ok" if bad == 0 else "FAIL"), shape, float(diff.max(initial=0)), np.nan, np.nan, note
    rtol, atol_scale = TOL[pdt]
    o, w = ours.astype(np.float64), want.astype(np.float64)
    if not np.all(np.isfinite(o)):
        return "FAIL", shape, np.nan, np.nan, np.nan, f"{int((~np.isfinite(o)).sum())} non-finite values"
    scale = float(np.abs(w).max(initial=0.0))
    atol = atol_scale * max(scale, 1e-30)
    err = np.abs(o - w)
    frac = err / (atol + rtol * np.abs(w))
    worst = np.unravel_index(int(np.argmax(frac)), frac.shape) if frac.size else ()
    max_abs = float(err.max(initial=0.0))
    rel = max_abs / scale if scale > 0 else max_abs
    tol_frac = float(frac.max(initial=0.0))
    note = ""
    if tol_frac > 1:
        note = f"worst at {list(worst)}: ours {o[worst]:.8g}, ref {w[worst]:.8g}"
    return ("ok" if tol_frac <= 1 else "FAIL"), shape, max_abs, rel, tol_frac, note


def check_witness(cfg, inputs, base_result, overrides, edit, tensor, kind, pdt, dp):
    cfg2 = make_config({**{k: v for k, v in cfg.items()}, **overrides})
    for k, v in overrides.items():
        if v is None:
            cfg2.pop(k, None)
    inputs2 = edit(inputs) if edit else inputs
    other = gref.gpt_reference(cfg2, inputs2, data_parallel_size=dp)
    a, b = base_result[tensor].astype(np.float64), other[tensor].astype(np.float64)
    if kind == "discrete":
        n = int((a != b).sum())
        return n > 0, f"{n} entries differ"
    rtol, atol_scale = TOL[pdt]
    scale = float(np.abs(a).max(initial=0.0))
    tol = atol_scale * scale + rtol * scale
    d = float(np.abs(a - b).max(initial=0.0))
    return d > 10 * tol, f"max diff {d:.3g} vs 10x tol {10 * tol:.3g}"


TOKENS = ("tokens", "token id")  # a message naming the input or the offending id names the culprit
LABELS = ("labels", "label id")


def bad_input_cases(good_cfg, good_inputs):
    """(name, cfg, inputs, words: the message must contain one of them). good_cfg: tied, RoPE, 2 MoE
    layers."""
    V = good_cfg["vocab_size"]
    cases = []
    inp = dict(good_inputs)
    del inp["decoder.layers.1.mlp.router.weight"]
    cases.append(("missing parameter", good_cfg, inp, "decoder.layers.1.mlp.router.weight"))
    inp = dict(good_inputs)
    name = "decoder.layers.0.self_attention.linear_qkv.weight"
    inp[name] = np.zeros((inp[name].shape[0] + 4, inp[name].shape[1]), dtype=np.float32)
    cases.append(("wrong parameter shape", good_cfg, inp, name))
    inp = dict(good_inputs)
    name = "decoder.layers.0.mlp.experts.linear_fc1.weight"
    inp[name] = inp[name][:-1]
    cases.append(("wrong expert count", good_cfg, inp, name))
    inp = dict(good_inputs)
    inp["tokens"] = inp["tokens"].copy()
    inp["tokens"][1, 3] = V
    cases.append(("token id >= vocab_size", good_cfg, inp, TOKENS))
    inp = dict(good_inputs)
    inp["tokens"] = inp["tokens"].copy()
    inp["tokens"][0, 0] = -1
    cases.append(("negative token id", good_cfg, inp, TOKENS))
    inp = dict(good_inputs)
    inp["labels"] = inp["labels"].copy()
    inp["labels"][0, 5] = V + 7
    cases.append(("label id >= vocab_size", good_cfg, inp, LABELS))
    inp = dict(good_inputs)
    inp["labels"] = inp["labels"][:, :-1].copy()
    cases.append(("labels shape differs from tokens", good_cfg, inp, LABELS))
    inp = dict(good_inputs)
    inp["loss_mask"] = np.ones((good_inputs["tokens"].shape[0], good_cfg["seq_length"] + 1), dtype=np.float32)
    cases.append(("wrong loss_mask shape", good_cfg, inp, "loss_mask"))
    inp = dict(good_inputs)
    del inp["tokens"]
    cases.append(("missing tokens", good_cfg, inp, TOKENS))
    inp = dict(good_inputs)
    inp["output_layer.weight"] = good_inputs["embedding.word_embeddings.weight"].copy()
    cases.append(("output_layer.weight with tied embeddings", good_cfg, inp, "output_layer.weight"))
    cases.append(("unknown config key", {**good_cfg, "rotary_bass": 10000}, good_inputs, "rotary_bass"))
    cases.append(("num_attention_heads % num_query_groups != 0", {**good_cfg, "num_query_groups": 3}, good_inputs,
                  "num_query_groups"))
    cases.append(("batch not divisible by num_microbatches", {**good_cfg, "num_microbatches": 3}, good_inputs,
                  "num_microbatches"))
    return [(case, c, i, (w,) if isinstance(w, str) else w) for case, c, i, w in cases]


def layout_problem(cfg, B, np_, dp):
    """Why a parallel layout cannot run this config (None when it can)."""
    m, c = gref.normalize_gpt_config(cfg)
    tp = cfg.get("tensor_model_parallel_size", 1)
    cp = cfg.get("context_parallel_size", 1)
    pp = cfg.get("pipeline_model_parallel_size", 1)
    ep = cfg.get("expert_model_parallel_size", 1)
    etp = cfg.get("expert_tensor_parallel_size", tp)
    if B % (dp * m["num_microbatches"]):
        return f"B={B} is not divisible by DP*M = {dp}*{m['num_microbatches']}"
    if m["num_query_groups"] % tp or m["num_attention_heads"] % tp:
        return f"heads/groups {m['num_attention_heads']}/{m['num_query_groups']} not divisible by TP={tp}"
    if m["vocab_size"] % tp or m["ffn_hidden_size"] % tp:
        return f"vocab_size/ffn_hidden_size not divisible by TP={tp}"
    parts = tp * (2 * cp if cp > 1 else 1)
    if m["seq_length"] % parts:
        return f"seq_length {m['seq_length']} not divisible by TP*(2*CP if CP > 1) = {parts}"
    if m["num_layers"] % pp:
        return f"num_layers {m['num_layers']} not divisible by PP={pp}"
    if c is not None:
        if c["num_moe_experts"] % ep or c["moe_ffn_hidden_size"] % etp:
            return f"experts {c['num_moe_experts']} / moe_ffn_hidden_size not divisible by EP={ep} / ETP={etp}"
        if np_ % (ep * etp * pp):
            return f"world {np_} not divisible by EP*ETP*PP = {ep * etp * pp}"
    return None


def emulate_tool(argv):
    """--emulate-tool --config C --in I --out O: behaves like moe_gpt_io with the reference run in
    f32 (for --self-test: exercises the harness and shows the tolerance headroom of an f32 run)."""
    ap = argparse.ArgumentParser(prog="moe_gpt_io (emulated)")
    ap.add_argument("--config", required=True)
    ap.add_argument("--in", dest="inp", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    try:
        with open(a.config) as f:
            cfg = json.load(f)
        inputs = mref.read_safetensors(a.inp)
        r = gref.gpt_reference(cfg, inputs, dtype=torch.float32)
    except (ValueError, OSError, KeyError) as e:
        print(f"moe_gpt_io (emulated): error: {e}", file=sys.stderr)
        return 1
    out = {}
    for name in gref.expected_output_names(cfg):
        want = {"F64": np.float64, "F32": np.float32, "I64": np.int64}[expected_dtype(name)]
        out[name] = np.asarray(r[name]).astype(want)
    mref.write_safetensors(a.out, out)
    return 0


def parse_parallel(items):
    layout = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--parallel {item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        if key not in mref.IGNORED_KEYS:
            raise ValueError(f"--parallel {key}: not a parallel-layout key ({sorted(mref.IGNORED_KEYS)})")
        try:
            layout[key] = json.loads(value)
        except json.JSONDecodeError:
            layout[key] = value
    return layout


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--emulate-tool":
        return emulate_tool(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--exe", help="path to moe_gpt_io")
    ap.add_argument("--self-test", action="store_true",
                    help="no tool: run the harness against the reference computed in f32")
    ap.add_argument("--only", action="append", default=[], help="run only configs whose name contains this")
    ap.add_argument("--keep", help="write the config/IN/OUT/reference files here and keep them")
    ap.add_argument("--no-bad-inputs", action="store_true", help="skip the bad-input checks")
    ap.add_argument("--np", type=int, default=0, help="run the tool under MPI with this many ranks")
    ap.add_argument("--mpiexec", default="mpiexec", help="MPI launcher (with --np)")
    ap.add_argument("--mpiexec-arg", action="append", default=[],
                    help="extra launcher argument, e.g. --mpiexec-arg=--oversubscribe (repeatable)")
    ap.add_argument("--parallel", action="append", default=[],
                    help="KEY=VALUE parallel-layout key added to every config (repeatable)")
    args = ap.parse_args()
    if bool(args.exe) == bool(args.self_test):
        print("run_parity_gpt: give exactly one of --exe PATH or --self-test", file=sys.stderr)
        return 2
    if args.exe:
        exe = os.path.abspath(args.exe)
        if not (os.path.isfile(exe) and os.access(exe, os.X_OK)):
            print(f"run_parity_gpt: --exe {args.exe} is not an executable file", file=sys.stderr)
            return 2
    try:
        layout = parse_parallel(args.parallel)
    except ValueError as e:
        print(f"run_parity_gpt: {e}", file=sys.stderr)
        return 2
    if args.np < 0 or (args.np and args.self_test):
        print("run_parity_gpt: --np must be positive and needs --exe", file=sys.stderr)
        return 2
    if args.np and shutil.which(args.mpiexec) is None:
        print(f"run_parity_gpt: --mpiexec {args.mpiexec} not found", file=sys.stderr)
        return 2
    world = args.np or 1
    model_ranks = (layout.get("tensor_model_parallel_size", 1) * layout.get("context_parallel_size", 1)
                   * layout.get("pipeline_model_parallel_size", 1))
    if world % model_ranks:
        print(f"run_parity_gpt: {world} ranks are not a multiple of TP*CP*PP = {model_ranks}", file=sys.stderr)
        return 2
    dp = world // model_ranks
    cmd = tool_command(args)

    work = os.path.abspath(args.keep) if args.keep else tempfile.mkdtemp(prefix="moe_gpt_parity_")
    os.makedirs(work, exist_ok=True)
    failures, rows, skipped = [], [], []
    try:
        configs = [c for c in CONFIGS if not args.only or any(s in c[0] for s in args.only)]
        if not configs:
            print(f"run_parity_gpt: --only {args.only} matches no config ({[c[0] for c in CONFIGS]})",
                  file=sys.stderr)
            return 2
        for index, (name, overrides, B, mask) in enumerate(configs):
            cfg = make_config(overrides, layout)
            pdt = params_dtype(cfg)
            problem = layout_problem(cfg, B, world, dp)
            if problem:
                skipped.append(f"{name}: {problem}")
                continue
            try:
                seed, inputs, want, margins = find_separated_inputs(cfg, B, mask, 1000 * (CONFIGS.index(
                    (name, overrides, B, mask)) + 1), dp)
            except RuntimeError as e:
                failures.append(f"{name}: {e}")
                continue
            for wname, desc, wover, wedit, wtensor, wkind in WITNESSES:
                if wname == name:
                    ok, detail = check_witness(cfg, inputs, want, wover, wedit, wtensor, wkind, pdt, dp)
                    rows.append((name, f"witness: {desc}", "", np.nan, np.nan, np.nan, "ok" if ok else "FAIL",
                                 detail))
                    if not ok:
                        failures.append(f"{name}: witness '{desc}' failed ({detail}): the config does not "
                                        f"exercise what it is named after")
            d = os.path.join(work, name)
            os.makedirs(d, exist_ok=True)
            cfg_path, in_path, out_path = (os.path.join(d, f) for f in ("config.json", "in.safetensors",
                                                                         "out.safetensors"))
            with open(cfg_path, "w") as f:
                json.dump(cfg, f, indent=1)
            mref.write_safetensors(in_path, inputs, {"producer": "tests/parity/run_parity_gpt.py", "seed": seed})
            if args.keep:
                mref.write_safetensors(os.path.join(d, "reference.safetensors"),
                                       {k: want[k] for k in gref.expected_output_names(cfg)},
                                       {"producer": "tests/parity/reference_gpt.py (f64)", "seed": seed,
                                        "min_margin": min(margins.values()) if margins else "none"})
            if os.path.exists(out_path):
                os.unlink(out_path)
            rc, out, err = run_tool(cmd, cfg_path, in_path, out_path)
            if rc != 0 or not os.path.exists(out_path):
                failures.append(f"{name}: moe_gpt_io exited {rc}: {err.strip()[-800:]}")
                rows.append((name, "(moe_gpt_io)", "", np.nan, np.nan, np.nan, "FAIL", f"exit {rc}"))
                continue
            try:
                got, got_dtypes, _ = mref.read_safetensors(out_path, with_dtypes=True)
            except (ValueError, OSError, KeyError) as e:
                failures.append(f"{name}: cannot read the OUT file: {e}")
                continue
            expected = gref.expected_output_names(cfg)
            missing = [n for n in expected if n not in got]
            extra = [n for n in got if n not in expected]
            if missing or extra:
                failures.append(f"{name}: output names differ: missing {missing}, unexpected {extra}")
            for tname in expected:
                if tname not in got:
                    rows.append((name, tname, "", np.nan, np.nan, np.nan, "FAIL", "missing"))
                    continue
                status, shape, max_abs, rel, frac, note = compare(tname, got[tname], got_dtypes[tname],
                                                                  want[tname], pdt)
                rows.append((name, tname, "x".join(map(str, shape)), max_abs, rel, frac, status, note))
                if status != "ok":
                    failures.append(f"{name}: {tname}: {note}")

        if not args.no_bad_inputs and not args.only:
            name, overrides, B, mask = CONFIGS[0]
            cfg = make_config(overrides, layout)
            _, good_inputs, _, _ = find_separated_inputs(cfg, B, mask, 1000, dp)
            for i, (case, bcfg, binputs, words) in enumerate(bad_input_cases(cfg, good_inputs)):
                d = os.path.join(work, f"bad_{i}")
                os.makedirs(d, exist_ok=True)
                out_dir = os.path.join(d, "out")
                shutil.rmtree(out_dir, ignore_errors=True)
                os.makedirs(out_dir)
                cfg_path, in_path = os.path.join(d, "config.json"), os.path.join(d, "in.safetensors")
                out_path = os.path.join(out_dir, "out.safetensors")
                with open(cfg_path, "w") as f:
                    json.dump(bcfg, f, indent=1)
                mref.write_safetensors(in_path, binputs)
                rc, out, err = run_tool(cmd, cfg_path, in_path, out_path)
                left = os.listdir(out_dir)
                problems = []
                if rc is None:
                    problems.append(err)
                elif rc == 0:
                    problems.append("exit status 0")
                if not any(w in err for w in words):
                    problems.append(f"stderr names none of {list(words)}: {err.strip()[-300:]!r}")
                if left:
                    problems.append(f"left files {left}")
                status = "ok" if not problems else "FAIL"
                last = err.strip().splitlines()[-1][:110] if err.strip() else ""
                rows.append(("bad input", case, "", np.nan, np.nan, np.nan, status,
                             f"exit {rc}: {last}" if not problems else "; ".join(problems)))
                if problems:
                    failures.append(f"bad input '{case}': " + "; ".join(problems))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    def fmt(v):
        return "-" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.2e}"

    tool = "the f32 reference (--self-test)" if args.self_test else " ".join(cmd)
    print(f"moe_gpt_io parity: tool {tool}; DP = {dp}" + (f", layout {layout}" if layout else ""))
    print(f"{'config':28} {'tensor':58} {'shape':10} {'max_abs':>9} {'rel':>9} {'tol_use':>9}  status")
    for cname, tname, shape, max_abs, rel, frac, status, note in rows:
        line = f"{cname:28} {tname:58} {shape:10} {fmt(max_abs):>9} {fmt(rel):>9} {fmt(frac):>9}  {status}"
        print(line + (f"  {note}" if note else ""))
    print("\nrel = max|ours-ref| / max|ref|; tol_use = max |ours-ref| / (atol + rtol|ref|) (<= 1 passes);"
          f" fp32: rtol {TOL['fp32'][0]}, atol {TOL['fp32'][1]}*max|ref|; tokens_per_expert bit-exact.")
    if skipped:
        print(f"\nskipped ({len(skipped)}), the parallel layout cannot split them:")
        for s in skipped:
            print("  - " + s)
    if failures:
        print(f"\nPARITY FAILED ({len(failures)}):")
        for f_ in failures:
            print("  - " + f_)
        return 1
    if not rows:
        print("\nPARITY: nothing was compared")
        return 1
    print(f"\nPARITY OK: {len(rows)} checks")
    return 0


if __name__ == "__main__":
    sys.exit(main())
