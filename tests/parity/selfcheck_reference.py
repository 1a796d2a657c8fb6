#!/usr/bin/python3
"""Self-checks of the PyTorch reference (reference_moe.py), runnable by hand:

    /usr/bin/python3 tests/parity/selfcheck_reference.py

- autograd gradients of J = sum(output * grad_output) + aux losses + z-loss against central finite
  differences of J in f64, for every input tensor (a spread sample of elements), on several configs;
- uniform logits give aux_loss == coeff exactly (aux_loss, seq_aux_loss, global_aux_loss; softmax
  and sigmoid scores), whatever the tie-breaking of the top-k;
- routing invariants: probs rows sum to 1 (softmax, times the scaling factor), k entries per token,
  tokens_per_expert = column sums, capacity and padding row counts, the expert-bias update;
- safetensors write/read round trip for every dtype.
Exit 0 when everything holds, 1 otherwise, 77 when torch is not importable.
"""
import os
import sys
import tempfile

try:
    import numpy as np
    import torch
except ImportError as e:
    print(f"selfcheck_reference: {e} ({sys.executable}) - skipping (exit 77)")
    sys.exit(77)

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference_moe as ref  # noqa: E402
import run_parity  # noqa: E402

FD_EPS = 1e-6
FD_TOL = 1e-6  # |fd - an| <= FD_TOL * max(1, |fd|, |an|)
FD_SAMPLES = 24  # elements probed per tensor, spread evenly

failures = []


def check(cond, what):
    print(("  ok    " if cond else "  FAIL  ") + what)
    if not cond:
        failures.append(what)


def objective(cfg, inputs):
    r = ref.moe_layer_reference(cfg, inputs)
    dy = np.asarray(inputs["grad_output"], dtype=np.float64)
    return float((r["output"] * dy).sum() + r["aux_loss"][0] + r["z_loss"][0])


def fd_check(name, overrides, S=4, B=2):
    cfg = run_parity.make_config(overrides)
    _, inputs, _, margins = run_parity.find_separated_inputs(cfg, S, B, 7)
    # f64 copies: the finite differences perturb them.
    inputs = {k: np.array(v, dtype=np.float64) if k != "router.expert_bias" else v for k, v in inputs.items()}
    an = ref.moe_layer_reference(cfg, inputs)
    worst = 0.0
    for tname in ["hidden_states"] + ref.trainable_parameter_names(cfg):
        x = inputs[tname]
        g = an["grad_hidden_states" if tname == "hidden_states" else "grad." + tname]
        flat_idx = np.unique(np.linspace(0, x.size - 1, FD_SAMPLES).astype(np.int64))
        for fi in flat_idx:
            idx = np.unravel_index(fi, x.shape)
            old = x[idx]
            x[idx] = old + FD_EPS
            jp = objective(cfg, inputs)
            x[idx] = old - FD_EPS
            jm = objective(cfg, inputs)
            x[idx] = old
            fd = (jp - jm) / (2 * FD_EPS)
            err = abs(fd - g[idx]) / max(1.0, abs(fd), abs(g[idx]))
            worst = max(worst, err)
            if err > FD_TOL:
                check(False, f"{name}: d J / d {tname}{list(idx)}: autograd {g[idx]:.10g}, finite diff {fd:.10g}")
                return
    check(True, f"{name}: gradients match finite differences (worst scaled error {worst:.1e}, "
                f"min decision margin {min(margins.values()):.2e})")


def uniform_aux_check():
    for sf in ("softmax", "sigmoid", "sqrtsoftplus"):
        for kind in ("aux_loss", "seq_aux_loss", "global_aux_loss"):
            coeff = 0.37
            cfg = run_parity.make_config({"moe_router_score_function": sf, "moe_router_topk": 3,
                                          "moe_router_load_balancing_type": kind, "moe_aux_loss_coeff": coeff})
            inputs = run_parity.make_inputs(cfg, 5, 3, 11)
            inputs["router.weight"] = np.zeros_like(inputs["router.weight"])  # logits all zero
            r = ref.moe_layer_reference(cfg, inputs)
            check(abs(r["aux_loss"][0] - coeff) <= 1e-12 * coeff,
                  f"uniform logits, {sf}, {kind}: aux_loss {r['aux_loss'][0]:.15g} == coeff {coeff}")


def invariant_checks():
    T_of = {}
    for name, overrides, S, B in run_parity.CONFIGS:
        cfg = run_parity.make_config(overrides)
        c = ref.normalize_config(cfg)
        _, inputs, r, _ = run_parity.find_separated_inputs(cfg, S, B, 5000)
        T, E, k = S * B, c["num_moe_experts"], c["moe_router_topk"]
        T_of[name] = T
        m, p = r["routing_map"].astype(bool), r["probs"]
        ok = np.array_equal(r["tokens_per_expert"], m.sum(axis=0)) and np.all(p[~m] == 0)
        cf = c["moe_expert_capacity_factor"]
        if cf is None:
            ok &= bool(np.all(m.sum(axis=1) == k))
            if c["moe_router_score_function"] == "softmax" and not c["moe_router_pre_softmax"]:
                ok &= bool(np.allclose(p.sum(axis=1), c["moe_router_topk_scaling_factor"] or 1.0, rtol=1e-12))
            if c["moe_router_score_function"] != "softmax" and k > 1:
                ok &= bool(np.allclose(p.sum(axis=1), c["moe_router_topk_scaling_factor"] or 1.0, rtol=1e-12))
        else:
            cap = ref.expert_capacity(T, k, E, cf)
            if c["moe_pad_expert_input_to_capacity"]:
                ok &= bool(np.all(m.sum(axis=0) == min(cap, T)))
            else:
                ok &= bool(np.all(m.sum(axis=0) <= cap)) and bool(np.all(m.sum(axis=1) <= k))
        if c["moe_router_enable_expert_bias"]:
            cnt = m.sum(axis=0).astype(np.float64)
            want = inputs["router.expert_bias"].astype(np.float64) + np.sign(cnt.mean() - cnt) * \
                c["moe_router_bias_update_rate"]
            ok &= bool(np.allclose(r["router.expert_bias.updated"], want, rtol=0, atol=1e-15))
        check(ok, f"{name}: routing invariants (counts, zero off the map, k per token / capacity, probs sums)")

    # The capacity rules by hand on a tiny case: 4 tokens, 2 experts, k=1, cf=1 -> cap 2.
    probs = torch.tensor([[0.9, 0.0], [0.6, 0.0], [0.8, 0.0], [0.0, 0.7]], dtype=torch.float64)
    rmap = probs > 0
    for policy, pad, want in [
        ("probs", False, [[1, 0], [0, 0], [1, 0], [0, 1]]),
        ("position", False, [[1, 0], [1, 0], [0, 0], [0, 1]]),
        ("probs", True, [[1, 1], [0, 0], [1, 0], [0, 1]]),       # expert 1 padded with token 0
        ("position", True, [[1, 1], [1, 0], [0, 0], [0, 1]]),
    ]:
        c = ref.normalize_config({"hidden_size": 1, "num_moe_experts": 2, "moe_ffn_hidden_size": 1,
                                  "moe_router_topk": 1, "moe_router_pre_softmax": True,
                                  "moe_expert_capacity_factor": 1.0, "moe_token_drop_policy": policy,
                                  "moe_pad_expert_input_to_capacity": pad})
        p2, m2, _, cap = ref._apply_capacity(probs, rmap, c)
        check(cap == 2 and m2.to(torch.int64).tolist() == want and bool(torch.all(p2[~m2] == 0)),
              f"capacity by hand: policy {policy}, pad {pad}: map {m2.to(torch.int64).tolist()}")


def safetensors_roundtrip():
    rng = np.random.default_rng(3)
    tensors = {
        "f64": rng.standard_normal((2, 3)),
        "f32": rng.standard_normal((4,)).astype(np.float32),
        "f16": rng.standard_normal((3, 1)).astype(np.float16),
        "i64": np.arange(-3, 3, dtype=np.int64).reshape(2, 3),
        "i32": np.arange(5, dtype=np.int32),
        "u8": np.array([[0, 1, 255]], dtype=np.uint8),
        "bool": np.array([True, False, True]),
        "empty": np.zeros((0, 4), dtype=np.float32),
        "scalar1": np.array([1.5], dtype=np.float32),
    }
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "t.safetensors")
        ref.write_safetensors(path, tensors, {"k": "v"})
        back, dtypes, meta = ref.read_safetensors(path, with_dtypes=True)
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
        ok = meta == {"k": "v"} and set(back) == set(tensors) and n % 8 == 0 and os.listdir(d) == ["t.safetensors"]
        for k, v in tensors.items():
            ok &= back[k].dtype == v.dtype and back[k].shape == v.shape and np.array_equal(back[k], v)
        check(ok, f"safetensors round trip of {len(tensors)} tensors ({sorted(set(dtypes.values()))})")


def main():
    torch.set_num_threads(1)
    print("finite-difference gradient checks (f64):")
    fd_check("softmax top-2 swiglu + aux + z", {**run_parity.AUX, "moe_z_loss_coeff": 0.1})
    fd_check("pre-softmax top-1 + aux", {**run_parity.AUX, "moe_router_topk": 1, "moe_router_pre_softmax": True})
    named = {name: overrides for name, overrides, _, _ in run_parity.CONFIGS}
    fd_check("sigmoid top-4, bias, groups, scale 2.5 + aux", named["sigmoid_top4_bias_groups_scale"])
    fd_check("sqrtsoftplus top-2 + seq aux (B=3)", {"moe_router_score_function": "sqrtsoftplus",
                                                    "moe_router_load_balancing_type": "seq_aux_loss",
                                                    "moe_aux_loss_coeff": 0.1}, S=3, B=3)
    fd_check("pad to capacity + shared expert gate, gelu",
             {**run_parity.AUX, "moe_expert_capacity_factor": 1.0, "moe_pad_expert_input_to_capacity": True,
              "moe_shared_expert_intermediate_size": 6, "moe_shared_expert_gate": True,
              "gated_linear_unit": False, "activation_func": "gelu"})
    fd_check("relu2, capacity position", {**run_parity.AUX, "gated_linear_unit": False,
                                          "activation_func": "relu2", "moe_expert_capacity_factor": 1.0,
                                          "moe_token_drop_policy": "position"})
    print("aux loss with uniform logits:")
    uniform_aux_check()
    print("routing invariants:")
    invariant_checks()
    print("safetensors:")
    safetensors_roundtrip()
    if failures:
        print(f"\nSELFCHECK FAILED ({len(failures)})")
        return 1
    print("\nSELFCHECK OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
