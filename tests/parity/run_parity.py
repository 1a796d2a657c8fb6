#!/usr/bin/python3
"""Parity test: libmoecore's `moe_layer_io` against the independent PyTorch reference
(reference_moe.py, Megatron Core semantics, f64).

    /usr/bin/python3 tests/parity/run_parity.py --exe build/examples/moe_layer_io [--only NAME] [--keep DIR]

For every config below: seeded random inputs whose discrete decisions (top-k, group choice,
aux-loss top-k, capacity ranking) all have a margin >= MIN_MARGIN, so f32 rounding cannot flip them;
the IN file is written, moe_layer_io runs, and every tensor of its OUT file is compared with the
reference:
  - float tensors: |ours - ref| <= atol + rtol*|ref| elementwise, atol = atol_scale * max|ref|;
    f32 compute (params fp32): rtol 1e-4, atol_scale 1e-5 (~1000 ulps: f32 sums of <= 24 terms,
    cancellation covered by atol); fp64 params: rtol 1e-6, atol_scale 1e-7 (outputs are rounded to
    f32 on the way out, 6e-8 relative);
  - routing_map (U8) and tokens_per_expert (I64): bit-exact, dtype included;
  - the set of tensor names must be exactly the contract's (no missing, no extra).
Witness checks make sure each config exercises what it is named after (e.g. the aux-loss gradient
is > 10x the tolerance, the expert bias changes the routing), so a missing feature cannot pass.
Bad inputs (missing parameter, wrong shape, unknown config key, ...) must make moe_layer_io exit
non-zero with a message naming the culprit and write no output file.

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
    import torch  # noqa: F401  (the reference needs it)
except ImportError as e:
    print(f"run_parity: {e} ({sys.executable}): torch and numpy are needed - skipping (exit 77)")
    sys.exit(77)

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference_moe as ref  # noqa: E402

MIN_MARGIN = 1e-3  # smallest allowed gap at any discrete decision (logit/score units)
SEED_TRIES = 300
TOL = {"fp32": (1e-4, 1e-5), "fp64": (1e-6, 1e-7)}  # (rtol, atol_scale) per params dtype
EXACT = {"routing_map": "U8", "tokens_per_expert": "I64"}

# ---------------------------------------------------------------------------------------------
# Configs: (name, overrides, S, B). Base: H=16, E=8, F=12, softmax top-2.
# ---------------------------------------------------------------------------------------------
BASE = {"hidden_size": 16, "num_moe_experts": 8, "moe_ffn_hidden_size": 12, "moe_router_topk": 2,
        "gated_linear_unit": True, "activation_func": "silu"}
SWIGLU = {"gated_linear_unit": True, "activation_func": "silu"}
AUX = {"moe_router_load_balancing_type": "aux_loss", "moe_aux_loss_coeff": 0.1}
NO_AUX = {"moe_router_load_balancing_type": "none", "moe_aux_loss_coeff": 0.0}

CONFIGS = [
    ("softmax_top2_swiglu", {**SWIGLU, **AUX}, 8, 2),
    ("pre_softmax_top1", {**AUX, "moe_router_topk": 1, "moe_router_pre_softmax": True}, 8, 2),
    ("sigmoid_top4_bias_groups_scale", {
        **AUX, "moe_aux_loss_coeff": 1.0, "moe_router_score_function": "sigmoid", "moe_router_topk": 4,
        "moe_router_enable_expert_bias": True, "moe_router_bias_update_rate": 1e-3,
        "moe_router_num_groups": 4, "moe_router_group_topk": 2, "moe_router_topk_scaling_factor": 2.5}, 8, 2),
    ("sigmoid_top2_bias", {**NO_AUX, "moe_router_score_function": "sigmoid",
                           "moe_router_enable_expert_bias": True, "moe_router_bias_update_rate": 0.01}, 8, 2),
    ("sigmoid_top1", {**AUX, "moe_router_score_function": "sigmoid", "moe_router_topk": 1}, 8, 2),
    ("sqrtsoftplus_top2", {**AUX, "moe_router_score_function": "sqrtsoftplus"}, 8, 2),
    # 2 groups of 4 experts, keep 1: the group choice and the top-2 inside it both matter.
    ("softmax_groups", {**AUX, "moe_router_num_groups": 2, "moe_router_group_topk": 1}, 8, 2),
    ("seq_aux_loss_B3", {"moe_router_load_balancing_type": "seq_aux_loss", "moe_aux_loss_coeff": 0.3}, 8, 3),
    ("global_aux_loss", {"moe_router_load_balancing_type": "global_aux_loss", "moe_aux_loss_coeff": 0.5}, 8, 2),
    ("aux_plus_seq_aux", {"moe_router_load_balancing_type": ["aux_loss", "seq_aux_loss"],
                          "moe_aux_loss_coeff": [0.1, 0.3]}, 4, 3),
    ("z_loss", {**NO_AUX, "moe_z_loss_coeff": 0.1}, 8, 2),
    ("capacity_probs", {**AUX, "moe_expert_capacity_factor": 1.0, "moe_token_drop_policy": "probs"}, 8, 2),
    ("capacity_position", {**AUX, "moe_expert_capacity_factor": 1.0, "moe_token_drop_policy": "position"}, 8, 2),
    ("pad_capacity_probs", {**AUX, "moe_expert_capacity_factor": 1.0, "moe_pad_expert_input_to_capacity": True},
     8, 2),
    ("pad_capacity_position", {**AUX, "moe_expert_capacity_factor": 1.5, "moe_token_drop_policy": "position",
                               "moe_pad_expert_input_to_capacity": True}, 8, 2),
    ("capacity_ge_T", {**AUX, "moe_expert_capacity_factor": 4.0}, 8, 2),
    ("pad_capacity_ge_T", {**AUX, "moe_expert_capacity_factor": 5.0, "moe_pad_expert_input_to_capacity": True},
     8, 2),
    ("shared_expert_gate", {**AUX, "moe_shared_expert_intermediate_size": 20, "moe_shared_expert_gate": True},
     8, 2),
    ("gelu_non_glu", {**AUX, "gated_linear_unit": False, "activation_func": "gelu"}, 8, 2),
    ("geglu", {**AUX, "gated_linear_unit": True, "activation_func": "gelu"}, 8, 2),
    ("relu2_non_glu", {**AUX, "gated_linear_unit": False, "activation_func": "relu2"}, 8, 2),
    ("router_dtype_fp64", {**AUX, "moe_router_dtype": "fp64", "moe_z_loss_coeff": 0.05}, 8, 2),
    ("params_fp64", {**AUX, "params_dtype": "fp64", "moe_z_loss_coeff": 0.05,
                     "moe_shared_expert_intermediate_size": 20, "moe_shared_expert_gate": True}, 8, 2),
]

# Witnesses: (config name, description, config overrides, inputs to drop, tensor, kind). The
# reference with the overrides must differ from the reference without them on `tensor`:
# 'continuous' by more than 10x the comparison tolerance, 'discrete' in at least one entry.
NO_LB = {"moe_router_load_balancing_type": "none", "moe_aux_loss_coeff": 0.0}
WITNESSES = [
    ("softmax_top2_swiglu", "aux-loss gradient", NO_LB, [], "grad.router.weight", "continuous"),
    ("pre_softmax_top1", "aux-loss gradient", NO_LB, [], "grad.router.weight", "continuous"),
    ("sigmoid_top4_bias_groups_scale", "expert bias changes the routing",
     {"moe_router_enable_expert_bias": False}, ["router.expert_bias"], "routing_map", "discrete"),
    ("sigmoid_top4_bias_groups_scale", "group limit changes the routing",
     {"moe_router_num_groups": None, "moe_router_group_topk": None}, [], "routing_map", "discrete"),
    ("sigmoid_top4_bias_groups_scale", "aux-loss gradient", NO_LB, [], "grad.router.weight", "continuous"),
    ("sigmoid_top2_bias", "expert bias changes the routing",
     {"moe_router_enable_expert_bias": False}, ["router.expert_bias"], "routing_map", "discrete"),
    ("softmax_groups", "group limit changes the routing",
     {"moe_router_num_groups": None, "moe_router_group_topk": None}, [], "routing_map", "discrete"),
    ("seq_aux_loss_B3", "seq-aux differs from aux", {"moe_router_load_balancing_type": "aux_loss"}, [],
     "aux_loss", "continuous"),
    ("seq_aux_loss_B3", "seq-aux gradient", NO_LB, [], "grad.router.weight", "continuous"),
    ("global_aux_loss", "global-aux gradient", NO_LB, [], "grad.router.weight", "continuous"),
    ("aux_plus_seq_aux", "second aux type counts",
     {"moe_router_load_balancing_type": "aux_loss", "moe_aux_loss_coeff": 0.1}, [], "grad.router.weight",
     "continuous"),
    ("z_loss", "z-loss gradient", {"moe_z_loss_coeff": None}, [], "grad.router.weight", "continuous"),
    ("capacity_probs", "tokens are dropped", {"moe_expert_capacity_factor": None}, [], "routing_map",
     "discrete"),
    ("capacity_position", "tokens are dropped", {"moe_expert_capacity_factor": None}, [], "routing_map",
     "discrete"),
    ("capacity_position", "position differs from probs policy", {"moe_token_drop_policy": "probs"}, [],
     "routing_map", "discrete"),
    ("pad_capacity_probs", "padding adds rows", {"moe_pad_expert_input_to_capacity": False}, [],
     "routing_map", "discrete"),
    ("pad_capacity_position", "padding adds rows", {"moe_pad_expert_input_to_capacity": False}, [],
     "routing_map", "discrete"),
    ("pad_capacity_ge_T", "padding adds rows", {"moe_pad_expert_input_to_capacity": False}, [],
     "routing_map", "discrete"),
    ("shared_expert_gate", "gate matters", {"moe_shared_expert_gate": False}, ["shared_experts.gate_weight"],
     "output", "continuous"),
    ("router_dtype_fp64", "z-loss gradient", {"moe_z_loss_coeff": None}, [], "grad.router.weight", "continuous"),
]


def make_config(overrides):
    cfg = dict(BASE)
    cfg.update(overrides)
    return cfg


def make_inputs(cfg, S, B, seed):
    """Seeded inputs: hidden_states, grad_output f32; parameters in the params dtype. Scales keep
    logits ~N(0, 1) and activations O(1)."""
    c = ref.normalize_config(cfg)
    rng = np.random.default_rng(seed)
    pdt = np.float64 if c["params_dtype"] == "fp64" else np.float32
    H = c["hidden_size"]
    inputs = {
        "hidden_states": rng.standard_normal((S, B, H)).astype(np.float32),
        "grad_output": rng.standard_normal((S, B, H)).astype(np.float32),
    }
    for name, shape in ref.parameter_shapes(c).items():
        if name == "router.expert_bias":
            inputs[name] = rng.uniform(-0.1, 0.1, shape).astype(np.float32)  # fp32 always
        else:
            fan_in = shape[-1]
            inputs[name] = (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(pdt)
    return inputs


def find_separated_inputs(cfg, S, B, base_seed):
    """The first seed whose reference decisions all have margin >= MIN_MARGIN."""
    for seed in range(base_seed, base_seed + SEED_TRIES):
        inputs = make_inputs(cfg, S, B, seed)
        result, margins = ref.moe_layer_reference(cfg, inputs, return_margins=True)
        if min(margins.values()) >= MIN_MARGIN:
            return seed, inputs, result, margins
    raise RuntimeError(f"no seed in [{base_seed}, {base_seed + SEED_TRIES}) gives margins >= {MIN_MARGIN}")


def run_tool(exe, cfg_path, in_path, out_path, timeout=120):
    proc = subprocess.run([exe, "--config", cfg_path, "--in", in_path, "--out", out_path],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout)
    return proc.returncode, proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")


def compare(name, ours, ours_dtype, want, params_dtype):
    """One row of the table: (status, shape, max_abs, rel, tol_frac, note)."""
    shape = tuple(want.shape)
    if tuple(ours.shape) != shape:
        return "FAIL", shape, np.nan, np.nan, np.nan, f"shape {tuple(ours.shape)}, expected {shape}"
    if name in EXACT:
        if ours_dtype != EXACT[name]:
            return "FAIL", shape, np.nan, np.nan, np.nan, f"dtype {ours_dtype}, expected {EXACT[name]}"
        diff = np.abs(ours.astype(np.int64) - want.astype(np.int64))
        bad = int((diff != 0).sum())
        note = "" if bad == 0 else f"{bad} entries differ, first at {np.argwhere(diff != 0)[0].tolist()}"
        return ("ok" if bad == 0 else "FAIL"), shape, float(diff.max(initial=0)), np.nan, np.nan, note
    if ours_dtype != "F32":
        return "FAIL", shape, np.nan, np.nan, np.nan, f"dtype {ours_dtype}, expected F32"
    rtol, atol_scale = TOL[params_dtype]
    o, w = ours.astype(np.float64), want.astype(np.float64)
    scale = float(np.abs(w).max(initial=0.0))
    atol = atol_scale * max(scale, 1e-30)
    err = np.abs(o - w)
    bound = atol + rtol * np.abs(w)
    if not np.all(np.isfinite(o)):
        return "FAIL", shape, np.nan, np.nan, np.nan, "non-finite values"
    frac = err / bound
    worst = np.unravel_index(int(np.argmax(frac)), frac.shape) if frac.size else ()
    max_abs = float(err.max(initial=0.0))
    rel = max_abs / scale if scale > 0 else max_abs
    tol_frac = float(frac.max(initial=0.0))
    note = ""
    if tol_frac > 1:
        note = f"worst at {list(worst)}: ours {o[worst]:.8g}, ref {w[worst]:.8g}"
    return ("ok" if tol_frac <= 1 else "FAIL"), shape, max_abs, rel, tol_frac, note


def check_witness(cfg, inputs, base_result, overrides, drop, tensor, kind, params_dtype):
    cfg2 = dict(cfg)
    cfg2.update(overrides)
    cfg2 = {k: v for k, v in cfg2.items() if v is not None}
    inputs2 = {k: v for k, v in inputs.items() if k not in drop}
    other = ref.moe_layer_reference(cfg2, inputs2)
    a, b = base_result[tensor].astype(np.float64), other[tensor].astype(np.float64)
    if kind == "discrete":
        n = int((a != b).sum())
        return n > 0, f"{n} entries differ"
    rtol, atol_scale = TOL[params_dtype]
    scale = float(np.abs(a).max(initial=0.0))
    tol = atol_scale * scale + rtol * scale
    d = float(np.abs(a - b).max(initial=0.0))
    return d > 10 * tol, f"max diff {d:.3g} vs 10x tol {10 * tol:.3g}"


def bad_input_cases(good_cfg, good_inputs):
    """(name, cfg, inputs, word the message must contain)."""
    cases = []
    inp = dict(good_inputs)
    del inp["experts.linear_fc2.weight"]
    cases.append(("missing parameter", good_cfg, inp, "experts.linear_fc2.weight"))
    inp = dict(good_inputs)
    E, H = inp["router.weight"].shape
    inp["router.weight"] = np.zeros((E, H + 1), dtype=np.float32)
    cases.append(("wrong parameter shape", good_cfg, inp, "router.weight"))
    inp = dict(good_inputs)
    inp["grad_output"] = inp["grad_output"][:-1]
    cases.append(("wrong grad_output shape", good_cfg, inp, "grad_output"))
    inp = dict(good_inputs)
    inp["hidden_states"] = np.zeros(inp["hidden_states"].shape[:2] + (H + 2,), dtype=np.float32)
    cases.append(("wrong hidden size", good_cfg, inp, "hidden_states"))
    inp = dict(good_inputs)
    del inp["hidden_states"]
    cases.append(("missing hidden_states", good_cfg, inp, "hidden_states"))
    inp = dict(good_inputs)
    inp["bogus.weight"] = np.zeros((2,), dtype=np.float32)
    cases.append(("unexpected tensor", good_cfg, inp, "bogus.weight"))
    cases.append(("unknown config key", {**good_cfg, "moe_router_topkk": 2}, good_inputs, "moe_router_topkk"))
    cases.append(("invalid config value", {**good_cfg, "moe_router_topk": 1, "moe_router_pre_softmax": False},
                  good_inputs, "moe_router_pre_softmax"))
    return cases


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--exe", required=True, help="path to moe_layer_io")
    ap.add_argument("--only", action="append", default=[], help="run only configs whose name contains this")
    ap.add_argument("--keep", help="write the config/IN/OUT files here and keep them")
    ap.add_argument("--no-bad-inputs", action="store_true", help="skip the bad-input checks")
    args = ap.parse_args()
    exe = os.path.abspath(args.exe)
    if not (os.path.isfile(exe) and os.access(exe, os.X_OK)):
        print(f"run_parity: --exe {args.exe} is not an executable file", file=sys.stderr)
        return 2

    work = os.path.abspath(args.keep) if args.keep else tempfile.mkdtemp(prefix="moe_parity_")
    os.makedirs(work, exist_ok=True)
    failures = []
    rows = []
    try:
        configs = [c for c in CONFIGS if not args.only or any(s in c[0] for s in args.only)]
        for index, (name, overrides, S, B) in enumerate(configs):
            cfg = make_config(overrides)
            pdt = ref.normalize_config(cfg)["params_dtype"]
            try:
                seed, inputs, want, margins = find_separated_inputs(cfg, S, B, 1000 * (index + 1))
            except RuntimeError as e:
                failures.append(f"{name}: {e}")
                continue
            for wname, desc, wover, wdrop, wtensor, wkind in WITNESSES:
                if wname == name:
                    ok, detail = check_witness(cfg, inputs, want, wover, wdrop, wtensor, wkind, pdt)
                    if not ok:
                        failures.append(f"{name}: witness '{desc}' failed ({detail}): the config does not "
                                        f"exercise what it is named after")
            d = os.path.join(work, name)
            os.makedirs(d, exist_ok=True)
            cfg_path, in_path, out_path = (os.path.join(d, f) for f in ("config.json", "in.safetensors",
                                                                         "out.safetensors"))
            with open(cfg_path, "w") as f:
                json.dump(cfg, f, indent=1)
            ref.write_safetensors(in_path, inputs, {"producer": "tests/parity/run_parity.py", "seed": seed})
            if os.path.exists(out_path):
                os.unlink(out_path)
            rc, out, err = run_tool(exe, cfg_path, in_path, out_path)
            if rc != 0 or not os.path.exists(out_path):
                failures.append(f"{name}: moe_layer_io exited {rc}: {err.strip()[-800:]}")
                rows.append((name, "(moe_layer_io)", "", np.nan, np.nan, np.nan, "FAIL", f"exit {rc}"))
                continue
            got, got_dtypes, _ = ref.read_safetensors(out_path, with_dtypes=True)
            expected = ref.expected_output_names(cfg)
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
            cfg = make_config(CONFIGS[0][1])
            _, good_inputs, _, _ = find_separated_inputs(cfg, 8, 2, 1000)
            for i, (case, bcfg, binputs, word) in enumerate(bad_input_cases(cfg, good_inputs)):
                d = os.path.join(work, f"bad_{i}")
                os.makedirs(d, exist_ok=True)
                out_dir = os.path.join(d, "out")
                shutil.rmtree(out_dir, ignore_errors=True)
                os.makedirs(out_dir)
                cfg_path, in_path = os.path.join(d, "config.json"), os.path.join(d, "in.safetensors")
                out_path = os.path.join(out_dir, "out.safetensors")
                with open(cfg_path, "w") as f:
                    json.dump(bcfg, f, indent=1)
                ref.write_safetensors(in_path, binputs)
                rc, out, err = run_tool(exe, cfg_path, in_path, out_path)
                left = os.listdir(out_dir)
                problems = []
                if rc == 0:
                    problems.append("exit status 0")
                if word not in err:
                    problems.append(f"stderr does not name '{word}': {err.strip()[-300:]!r}")
                if left:
                    problems.append(f"left files {left}")
                status = "ok" if not problems else "FAIL"
                rows.append(("bad input", case, "", np.nan, np.nan, np.nan, status,
                             f"exit {rc}: {err.strip().splitlines()[-1][:110] if err.strip() else ''}"
                             if not problems else "; ".join(problems)))
                if problems:
                    failures.append(f"bad input '{case}': " + "; ".join(problems))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    def fmt(v):
        return "-" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.2e}"

    print(f"{'config':32} {'tensor':36} {'shape':10} {'max_abs':>9} {'rel':>9} {'tol_use':>9}  status")
    for cname, tname, shape, max_abs, rel, frac, status, note in rows:
        line = f"{cname:32} {tname:36} {shape:10} {fmt(max_abs):>9} {fmt(rel):>9} {fmt(frac):>9}  {status}"
        print(line + (f"  {note}" if note else ""))
    print("\nrel = max|ours-ref| / max|ref|; tol_use = max |ours-ref| / (atol + rtol|ref|) (<= 1 passes);"
          f" fp32: rtol {TOL['fp32'][0]}, atol {TOL['fp32'][1]}*max|ref|; fp64 params: rtol {TOL['fp64'][0]},"
          f" atol {TOL['fp64'][1]}*max|ref|; routing_map, tokens_per_expert bit-exact.")
    if failures:
        print(f"\nPARITY FAILED ({len(failures)}):")
        for f_ in failures:
            print("  - " + f_)
        return 1
    print(f"\nPARITY OK: {len(rows)} checks")
    return 0


if __name__ == "__main__":
    sys.exit(main())
