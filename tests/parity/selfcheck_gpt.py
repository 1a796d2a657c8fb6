#!/usr/bin/python3
"""Self-checks of the MoE GPT reference (reference_gpt.py), runnable by hand:

    /usr/bin/python3 tests/parity/selfcheck_gpt.py [--quick]

- autograd gradients of the step objective J against central finite differences of J in f64, for
  a spread sample of elements of every parameter, on tiny configs covering tied/untied embeddings,
  RMSNorm/LayerNorm, RoPE (full and partial)/learned positions, GQA + qk_layernorm, dense + MoE
  layer patterns, a loss mask with holes, several micro-batches and data-parallel replicas, softmax
  and sigmoid routers (expert bias, capacity, shared expert with gate) and every aux-loss kind;
- the forward against a second, loop-based numpy implementation written from the same semantics
  (token by token, head by head, pairwise rotary rotation), whose MoE layers are
  reference_moe.moe_layer_reference on the layer input: logits, per-micro-batch lm losses, every
  MoE layer's aux and z losses, tokens per expert, and J;
- hand values: all-zero weights give uniform logits, so loss = ln V, and J = ln V + per MoE layer
  (aux coeff + z coeff * ln(E)^2);
- global_aux_loss: micro-batch 1 equals the layer reference's aux loss, micro-batch 2 uses the
  running mean of the counts (recomputed by hand from the router scores), and with data-parallel
  replicas the replicas' terms add up to the single-batch global aux loss;
- without global_aux_loss, DP replicas x M micro-batches equal a single process with DP*M;
- the bad inputs of run_parity_gpt.py are rejected by the reference too, naming the culprit, and
  every parity config's outputs carry exactly the contract's names;
- the parity harness itself (run_parity_gpt.py --self-test: the f32 reference plays the tool),
  unless --quick.
Exit 0 when everything holds, 1 otherwise, 77 when torch is not importable.
"""
import math
import os
import subprocess
import sys

try:
    import numpy as np
    import torch
except ImportError as e:
    print(f"selfcheck_gpt: {e} ({sys.executable}) - skipping (exit 77)")
    sys.exit(77)

sys.dont_write_bytecode = True  # no __pycache__ in the source tree
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import reference_gpt as gref  # noqa: E402
import reference_moe as mref  # noqa: E402
import run_parity_gpt as rp  # noqa: E402

FD_EPS = 1e-6
FD_TOL = 1e-6  # |fd - an| <= FD_TOL * max(1, |fd|, |an|)
FD_SAMPLES = 5  # elements probed per tensor, spread evenly
LOOP_TOL = 1e-10  # relative, f64 against f64

failures = []


def check(cond, what):
    print(("  ok    " if cond else "  FAIL  ") + what)
    if not cond:
        failures.append(what)


# Tiny configs: H=8, nh=2 (hd=4), V=16, S=4, 4 experts of F=6, dense F=12.
TINY = {
    "num_layers": 2, "hidden_size": 8, "num_attention_heads": 2, "vocab_size": 16, "seq_length": 4,
    "ffn_hidden_size": 12, "num_moe_experts": 4, "moe_ffn_hidden_size": 6, "moe_router_topk": 2,
    "gated_linear_unit": True, "activation_func": "silu",
    "moe_router_load_balancing_type": "aux_loss", "moe_aux_loss_coeff": 0.1,
}
TINY_CASES = [
    # (name, overrides, B, mask, dp)
    ("tied, RMSNorm, RoPE, 2 MoE layers, aux + z, mask holes",
     {"normalization": "RMSNorm", "position_embedding_type": "rope", "moe_z_loss_coeff": 0.1}, 2, "holes", 1),
    ("untied, LayerNorm, learned, dense+MoE [0,1], gelu, seq-aux, M=2, mask holes",
     {"untie_embeddings_and_output_weights": True, "moe_layer_freq": [0, 1], "gated_linear_unit": False,
      "activation_func": "gelu", "moe_router_load_balancing_type": "seq_aux_loss", "moe_aux_loss_coeff": 0.3,
      "num_microbatches": 2}, 4, "holes", 1),
    ("GQA 4/2, hd 4, LayerNorm qk_layernorm, rotary 0.5, sigmoid + bias, shared gate, capacity",
     {"num_attention_heads": 4, "num_query_groups": 2, "kv_channels": 4, "qk_layernorm": True,
      "normalization": "LayerNorm", "position_embedding_type": "rope", "rotary_percent": 0.5,
      "moe_router_score_function": "sigmoid", "moe_router_enable_expert_bias": True,
      "moe_shared_expert_intermediate_size": 5, "moe_shared_expert_gate": True,
      "moe_expert_capacity_factor": 1.0}, 2, "ones", 1),
    ("RMSNorm qk_layernorm, RoPE, MoE [1,0], relu2, global aux, M=2",
     {"normalization": "RMSNorm", "qk_layernorm": True, "position_embedding_type": "rope", "moe_layer_freq": 2,
      "gated_linear_unit": False, "activation_func": "relu2", "moe_router_load_balancing_type": "global_aux_loss",
      "moe_aux_loss_coeff": 0.5, "num_microbatches": 2}, 4, "holes", 1),
    ("global aux + aux, M=2, DP=2, pre-softmax top-1",
     {"normalization": "RMSNorm", "position_embedding_type": "rope", "moe_router_topk": 1,
      "moe_router_pre_softmax": True, "moe_router_load_balancing_type": ["global_aux_loss", "aux_loss"],
      "moe_aux_loss_coeff": [0.5, 0.2], "num_microbatches": 2}, 8, "holes", 2),
]


def tiny_config(overrides):
    cfg = dict(TINY)
    cfg.update(overrides)
    return cfg


def separated(cfg, B, mask, seed, dp):
    """First seed >= `seed` whose routing margins are >= run_parity_gpt.MIN_MARGIN."""
    for s in range(seed, seed + rp.SEED_TRIES):
        inputs = gref.make_inputs(cfg, B, s, mask=mask, data_parallel_size=dp)
        _, margins = gref.gpt_reference(cfg, inputs, return_margins=True, data_parallel_size=dp)
        if not margins or min(margins.values()) >= rp.MIN_MARGIN:
            return inputs, (min(margins.values()) if margins else math.inf)
    raise RuntimeError(f"no separated seed for {cfg}")


# ---------------------------------------------------------------------------------------------
# Finite differences
# ---------------------------------------------------------------------------------------------

def fd_check(name, cfg, B, mask, dp):
    inputs, margin = separated(cfg, B, mask, 7, dp)
    inputs = {k: (np.array(v, dtype=np.float64) if v.dtype.kind == "f" and not k.endswith("expert_bias") else v)
              for k, v in inputs.items()}
    an = gref.gpt_reference(cfg, inputs, data_parallel_size=dp)
    worst, probes = 0.0, 0
    for pname in gref.trainable_parameter_names(cfg):
        x = inputs[pname]
        g = an["grad." + pname]
        flat_idx = set(np.linspace(0, x.size - 1, FD_SAMPLES).astype(np.int64).tolist())
        if pname == "embedding.word_embeddings.weight":  # rows of tokens used as inputs, too
            flat_idx |= {int(inputs["tokens"].flat[0]) * x.shape[1] + 1, int(inputs["tokens"].flat[-1]) * x.shape[1]}
        for fi in sorted(flat_idx):
            idx = np.unravel_index(fi, x.shape)
            old = x[idx]
            x[idx] = old + FD_EPS
            jp = gref.gpt_objective(cfg, inputs, data_parallel_size=dp)
            x[idx] = old - FD_EPS
            jm = gref.gpt_objective(cfg, inputs, data_parallel_size=dp)
            x[idx] = old
            fd = (jp - jm) / (2 * FD_EPS)
            err = abs(fd - g[idx]) / max(1.0, abs(fd), abs(g[idx]))
            worst = max(worst, err)
            probes += 1
            if err > FD_TOL:
                check(False, f"{name}: dJ/d {pname}{list(idx)}: autograd {g[idx]:.10g}, finite diff {fd:.10g}")
                return
    check(True, f"{name}: {probes} gradient entries match finite differences (worst scaled error {worst:.1e}, "
                f"min routing margin {margin:.2e})")


# ---------------------------------------------------------------------------------------------
# A second forward, token by token in numpy
# ---------------------------------------------------------------------------------------------

def _np_norm(v, w, b, kind, eps):
    if kind == "RMSNorm":
        return v / math.sqrt(float(np.dot(v, v)) / v.size + eps) * w
    mu = v.sum() / v.size
    var = float(((v - mu) ** 2).sum()) / v.size
    return (v - mu) / math.sqrt(var + eps) * w + b


def _np_act(h, name, glu):
    def act(u):
        if name == "silu":
            return u / (1.0 + np.exp(-u))
        if name == "gelu":
            return 0.5 * u * (1.0 + np.vectorize(math.erf)(u / math.sqrt(2.0)))
        if name in ("relu2", "squared_relu"):
            return np.maximum(u, 0.0) ** 2
        raise ValueError(name)
    if glu:
        half = h.shape[-1] // 2
        return act(h[..., :half]) * h[..., half:]
    return act(h)


def _np_rope(v, s, rd, base):
    out = v.copy()
    half = rd // 2
    for i in range(half):
        theta = s * base ** (-2.0 * i / rd)
        a, b = v[i], v[i + half]
        out[i] = a * math.cos(theta) - b * math.sin(theta)
        out[i + half] = b * math.cos(theta) + a * math.sin(theta)
    return out


def loop_forward(cfg, inputs, dp=1):
    """Returns logits (B, S, V), lm (n_mb), aux/z (layer -> n_mb list, from moe_layer_reference),
    gaux (layer -> n_mb list, by hand), tokens_per_expert (layer -> (E)), J."""
    m, c = gref.normalize_gpt_config(cfg)
    P = {k: np.asarray(v, dtype=np.float64) for k, v in inputs.items() if k not in ("tokens", "labels")}
    tokens, labels = np.asarray(inputs["tokens"]), np.asarray(inputs["labels"])
    B, S = tokens.shape
    mask = P.get("loss_mask", np.ones((B, S)))
    H, V, L = m["hidden_size"], m["vocab_size"], m["num_layers"]
    nh, ng, hd = m["num_attention_heads"], m["num_query_groups"], m["kv_channels"]
    qpg = nh // ng
    kind, eps = m["normalization"], float(m["layernorm_epsilon"])
    ln = kind == "LayerNorm"
    act_name = (c or m["_act"])["activation_func"]
    glu = (c or m["_act"])["gated_linear_unit"]
    M = m["num_microbatches"]
    n_mb = M * dp
    b = B // n_mb

    def norm(v, prefix):
        return _np_norm(v, P[prefix + ".weight"], P[prefix + ".bias"] if ln else None, kind, eps)

    logits_all = np.zeros((B, S, V))
    lm = []
    aux = {i: [] for i in range(L) if m["moe_pattern"][i]}
    z = {i: [] for i in aux}
    parts = {i: [] for i in aux}  # (score sums (E), counts (E), T) per micro-batch, for global aux
    moe_in = {i: [] for i in aux}  # the layer's input (S, b, H) per micro-batch
    tpe = {i: 0 for i in aux}
    for j in range(n_mb):
        tok, lab, mk = tokens[j * b:(j + 1) * b], labels[j * b:(j + 1) * b], mask[j * b:(j + 1) * b]
        h = np.zeros((S, b, H))
        for s in range(S):
            for bi in range(b):
                h[s, bi] = P["embedding.word_embeddings.weight"][tok[bi, s]]
                if m["position_embedding_type"] == "learned_absolute":
                    h[s, bi] += P["embedding.position_embeddings.weight"][s]
        for i in range(L):
            pre = f"decoder.layers.{i}."
            wqkv = P[pre + "self_attention.linear_qkv.weight"]
            q = np.zeros((S, b, nh, hd))
            k = np.zeros((S, b, ng, hd))
            v = np.zeros((S, b, ng, hd))
            for s in range(S):
                for bi in range(b):
                    row = wqkv @ norm(h[s, bi], pre + "input_layernorm")
                    for g in range(ng):
                        base = g * (qpg + 2) * hd
                        for jq in range(qpg):
                            q[s, bi, g * qpg + jq] = row[base + jq * hd: base + (jq + 1) * hd]
                        k[s, bi, g] = row[base + qpg * hd: base + (qpg + 1) * hd]
                        v[s, bi, g] = row[base + (qpg + 1) * hd: base + (qpg + 2) * hd]
                    if m["qk_layernorm"]:
                        for hh in range(nh):
                            q[s, bi, hh] = norm(q[s, bi, hh], pre + "self_attention.q_layernorm")
                        for g in range(ng):
                            k[s, bi, g] = norm(k[s, bi, g], pre + "self_attention.k_layernorm")
                    if m["position_embedding_type"] == "rope":
                        for hh in range(nh):
                            q[s, bi, hh] = _np_rope(q[s, bi, hh], s, m["rotary_dim"], float(m["rotary_base"]))
                        for g in range(ng):
                            k[s, bi, g] = _np_rope(k[s, bi, g], s, m["rotary_dim"], float(m["rotary_base"]))
            ctx = np.zeros((S, b, nh * hd))
            for bi in range(b):
                for hh in range(nh):
                    g = hh // qpg
                    for s in range(S):
                        sc = np.array([np.dot(q[s, bi, hh], k[t, bi, g]) / math.sqrt(hd) for t in range(s + 1)])
                        w = np.exp(sc - sc.max())
                        w /= w.sum()
                        ctx[s, bi, hh * hd:(hh + 1) * hd] = sum(w[t] * v[t, bi, g] for t in range(s + 1))
            for s in range(S):
                for bi in range(b):
                    h[s, bi] = h[s, bi] + P[pre + "self_attention.linear_proj.weight"] @ ctx[s, bi]
            xn = np.zeros((S, b, H))
            for s in range(S):
                for bi in range(b):
                    xn[s, bi] = norm(h[s, bi], pre + "pre_mlp_layernorm")
            if m["moe_pattern"][i]:
                moe_in[i].append(xn.copy())
                layer_in = {"hidden_states": xn, "grad_output": np.zeros((S, b, H))}
                for name in mref.parameter_shapes(c):
                    if pre + "mlp." + name in P:
                        layer_in[name] = P[pre + "mlp." + name]
                r = mref.moe_layer_reference(c, layer_in)
                h = h + r["output"]
                # The layer reference treats global_aux_loss as aux_loss of its own tokens; keep its
                # non-global terms here and redo the global one by hand below.
                lb = mref.aux_loss_coeffs(c)
                if "global_aux_loss" in lb:
                    c_ng = dict(c)
                    c_ng["moe_router_load_balancing_type"] = [t for t in lb if t != "global_aux_loss"] or ["none"]
                    c_ng["moe_aux_loss_coeff"] = [lb[t] for t in lb if t != "global_aux_loss"] or [0.0]
                    aux[i].append(mref.moe_layer_reference(c_ng, layer_in)["aux_loss"][0])
                    logits = xn.reshape(S * b, H) @ P[pre + "mlp.router.weight"].T
                    E, kk = c["num_moe_experts"], c["moe_router_topk"]
                    sf = c["moe_router_score_function"]
                    if sf == "softmax":
                        e = np.exp(logits - logits.max(axis=1, keepdims=True))
                        scores = e / e.sum(axis=1, keepdims=True)
                    else:
                        sraw = 1 / (1 + np.exp(-logits)) if sf == "sigmoid" else np.sqrt(np.log1p(np.exp(logits)))
                        scores = sraw / (sraw.sum(axis=1, keepdims=True) + 1e-20)
                    counts = np.zeros(E)
                    for t in range(S * b):
                        for e_ in np.argsort(-scores[t], kind="stable")[:kk]:
                            counts[e_] += 1
                    parts[i].append((lb["global_aux_loss"], scores.sum(axis=0), counts, S * b))
                else:
                    aux[i].append(r["aux_loss"][0])
                z[i].append(r["z_loss"][0])
                tpe[i] = tpe[i] + r["tokens_per_expert"]
            else:
                for s in range(S):
                    for bi in range(b):
                        a = _np_act(P[pre + "mlp.linear_fc1.weight"] @ xn[s, bi], act_name, glu)
                        h[s, bi] = h[s, bi] + P[pre + "mlp.linear_fc2.weight"] @ a
        w_out = P["output_layer.weight" if m["untie_embeddings_and_output_weights"]
                  else "embedding.word_embeddings.weight"]
        num = 0.0
        for s in range(S):
            for bi in range(b):
                lg = w_out @ norm(h[s, bi], "decoder.final_layernorm")
                logits_all[j * b + bi, s] = lg
                mx = lg.max()
                ce = mx + math.log(np.exp(lg - mx).sum()) - lg[lab[bi, s]]
                num += mk[bi, s] * ce
        lm.append(num / mk.sum())
    gaux = {}
    for i in aux:
        if parts[i]:
            E, kk = c["num_moe_experts"], c["moe_router_topk"]
            gaux[i] = [0.0] * n_mb
            for mi in range(M):
                js = [r * M + mi for r in range(dp)]
                counts_so_far = sum(parts[i][jj][2] for mi2 in range(mi + 1) for jj in [r * M + mi2 for r in range(dp)])
                mean = counts_so_far / (mi + 1)
                for jj in js:
                    coeff, ssum, _, T = parts[i][jj]
                    gaux[i][jj] = coeff * E / (kk * (dp * T) ** 2) * float(np.dot(ssum, mean))
    J = (sum(lm) + sum(sum(aux[i]) + sum(z[i]) for i in aux) + sum(sum(g) for g in gaux.values())) / n_mb
    return {"logits": logits_all, "lm": lm, "aux": aux, "z": z, "gaux": gaux, "tpe": tpe, "J": J, "moe_in": moe_in}


def rel_err(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


def loop_check(name, cfg, B, mask, dp):
    inputs, _ = separated(cfg, B, mask, 21, dp)
    r = gref.gpt_reference(cfg, inputs, return_details=True, data_parallel_size=dp)
    lp = loop_forward(cfg, inputs, dp)
    errs = {"logits": rel_err(r["logits"], lp["logits"]), "lm": rel_err(r["lm"], lp["lm"]),
            "loss": rel_err(r["loss"], [np.mean(lp["lm"])]), "J": rel_err(r["J"], [lp["J"]])}
    ok_tpe = True
    for i in lp["aux"]:
        errs[f"z.{i}"] = rel_err(r[f"z_loss.{i}"], lp["z"][i]) if np.any(lp["z"][i]) else \
            float(np.abs(r[f"z_loss.{i}"]).max())
        if np.any(lp["aux"][i]):
            errs[f"aux.{i}"] = rel_err(r[f"aux_loss.{i}"], lp["aux"][i])
        if i in lp["gaux"]:
            errs[f"global_aux.{i}"] = rel_err(r[f"global_aux_loss.{i}"], lp["gaux"][i])
        ok_tpe &= np.array_equal(r[f"tokens_per_expert.{i}"], lp["tpe"][i])
    worst = max(errs, key=errs.get)
    check(ok_tpe and errs[worst] <= LOOP_TOL,
          f"{name}: loop forward agrees (worst relative error {errs[worst]:.1e} in {worst}; "
          f"{len(errs)} quantities; tokens_per_expert {'equal' if ok_tpe else 'DIFFER'})")
    return inputs, r, lp


# ---------------------------------------------------------------------------------------------
# Hand values, global aux, DP equivalence, bad inputs, names
# ---------------------------------------------------------------------------------------------

def zero_weights_check():
    for norm_kind in ("RMSNorm", "LayerNorm"):
        cfg = tiny_config({"normalization": norm_kind, "moe_z_loss_coeff": 0.05, "moe_layer_freq": [1, 1],
                           "num_microbatches": 2})
        inputs = gref.make_inputs(cfg, 4, 3, mask="holes")
        for k in list(inputs):
            if k in ("tokens", "labels", "loss_mask"):
                continue
            if k.endswith("layernorm.weight"):
                continue  # keep the norm weights (any value: the normed vectors are zero)
            inputs[k] = np.zeros_like(inputs[k])
        r = gref.gpt_reference(cfg, inputs, return_details=True)
        V, E = cfg["vocab_size"], cfg["num_moe_experts"]
        want_J = math.log(V) + 2 * (0.1 + 0.05 * math.log(E) ** 2)
        check(abs(r["loss"][0] - math.log(V)) <= 1e-14 and abs(r["J"][0] - want_J) <= 1e-13
              and np.all(r["logits"] == 0),
              f"zero weights, {norm_kind}: logits 0, loss {r['loss'][0]:.15g} == ln V, J {r['J'][0]:.15g} == "
              f"ln V + 2 (aux 0.1 + z 0.05 ln(E)^2) = {want_J:.15g}")


def global_aux_checks():
    _, overrides, B, mask, dp = TINY_CASES[3]  # global aux, M=2, MoE layer 0
    cfg = tiny_config(overrides)
    inputs, r, lp = loop_check("global aux, M=2 (again, for the hand checks)", cfg, B, mask, dp)
    # Micro-batch 1 of M=2 is a lone micro-batch: its global aux loss is the plain aux loss.
    b = B // cfg["num_microbatches"]
    first = {k: (v[:b] if k in ("tokens", "labels", "loss_mask") else v) for k, v in inputs.items()}
    r1 = gref.gpt_reference({**cfg, "num_microbatches": 1}, first, return_details=True)
    a, want = r["global_aux_loss.0"][0], r1["global_aux_loss.0"][0]
    check(abs(a - want) <= 1e-14 * abs(want),
          f"global aux: micro-batch 1 of M=2 equals a lone micro-batch ({a:.12g} vs {want:.12g})")
    # Micro-batch 2 uses the running mean of the counts (recomputed by hand in loop_forward) ...
    hand = lp["gaux"][0][1]
    check(abs(r["global_aux_loss.0"][1] - hand) <= 1e-12 * abs(hand),
          f"global aux: micro-batch 2 uses the running mean of the counts ({r['global_aux_loss.0'][1]:.12g} "
          f"vs hand {hand:.12g})")
    # ... which differs from its own counts (otherwise this check would not see the accumulation).
    second = {k: (v[b:] if k in ("tokens", "labels", "loss_mask") else v) for k, v in inputs.items()}
    own = gref.gpt_reference({**cfg, "num_microbatches": 1}, second, return_details=True)["global_aux_loss.0"][0]
    check(abs(own - hand) > 1e-6 * abs(hand),
          f"global aux: micro-batch 2 alone would give {own:.12g} (the accumulation is visible)")
    # DP: the replicas' terms add up to the single-batch global aux loss (counts summed, T = DP*T).
    cfg1 = {**cfg, "num_microbatches": 1}
    rd = gref.gpt_reference(cfg1, inputs, return_details=True, data_parallel_size=2)
    rf = gref.gpt_reference(cfg1, inputs, return_details=True)
    tot = float(rd["global_aux_loss.0"].sum())
    check(abs(tot - rf["global_aux_loss.0"][0]) <= 1e-12 * abs(tot),
          f"global aux, DP=2 x M=1: replica terms sum {tot:.12g} == single batch {rf['global_aux_loss.0'][0]:.12g}")
    # Hence, with global aux, DP=2 x M=1 is not one process with 2 micro-batches (Megatron's behaviour).
    r2 = gref.gpt_reference({**cfg, "num_microbatches": 2}, inputs)
    name = "grad.decoder.layers.0.mlp.router.weight"
    d = rel_err(rd[name], r2[name])
    check(d > 1e-6, f"global aux: DP=2 x M=1 differs from M=2 in one process (router grad relative "
                    f"difference {d:.1e}), as in Megatron")


def capacity_shard_checks():
    shards = gref.router_shards(8, 1, 2, 2)
    check(shards == [[0, 1], [6, 7], [2, 3], [4, 5]],
          f"router shards S=8, b=1, TP=2, CP=2 (CP chunks r and 2CP-1-r, then TP halves): {shards}")
    shards = gref.router_shards(4, 2, 2, 1)
    check(shards == [[0, 1, 2, 3], [4, 5, 6, 7]], f"router shards S=4, b=2, TP=2: {shards}")
    check(gref.router_shards(4, 2, 1, 1) is None, "router shards with TP = CP = 1: none")
    # MoE layer 0 first, so its input does not depend on the capacity; dense layer 1 after it.
    cfg = tiny_config({"normalization": "RMSNorm", "position_embedding_type": "rope", "moe_layer_freq": [1, 0],
                       "moe_expert_capacity_factor": 1.0, "tensor_model_parallel_size": 2,
                       "num_microbatches": 2, "moe_router_topk": 1, "moe_router_pre_softmax": True})
    fd_check("capacity per TP shard (TP=2), M=2, top-1", cfg, 4, "holes", 1)
    inputs, _ = separated(cfg, 4, "holes", 41, 1)
    r = gref.gpt_reference(cfg, inputs)
    cfg1 = {k: v for k, v in cfg.items() if k != "tensor_model_parallel_size"}
    lp = loop_forward(cfg1, inputs)
    c = gref.normalize_gpt_config(cfg)[1]
    counts = 0
    for xn in lp["moe_in"][0]:  # per micro-batch (S, b, H): TP rank t holds positions [t S/2, (t+1) S/2)
        half = xn.shape[0] // 2
        for t in range(2):
            layer_in = {"hidden_states": xn[t * half:(t + 1) * half], "grad_output": np.zeros_like(xn[:half])}
            for name in mref.parameter_shapes(c):
                layer_in[name] = inputs["decoder.layers.0.mlp." + name]
            counts = counts + mref.moe_layer_reference(c, layer_in)["tokens_per_expert"]
    r1 = gref.gpt_reference(cfg1, inputs)
    check(np.array_equal(r["tokens_per_expert.0"], counts) and not np.array_equal(r1["tokens_per_expert.0"], counts),
          f"capacity per TP shard: counts {r['tokens_per_expert.0'].tolist()} == the layer reference per shard, "
          f"!= one shard per micro-batch {r1['tokens_per_expert.0'].tolist()}")
    # Without a capacity factor the layout changes nothing.
    cfg2 = {k: v for k, v in cfg.items() if k != "moe_expert_capacity_factor"}
    cfg3 = {**cfg2, "context_parallel_size": 2}
    cfg3.pop("tensor_model_parallel_size")
    a, b, d = (gref.gpt_reference(x, inputs) for x in (cfg1 | {"moe_expert_capacity_factor": None}, cfg2, cfg3))
    same = all(np.array_equal(a[k], b[k]) and np.array_equal(a[k], d[k]) for k in a)
    check(same, "without a capacity factor, TP=2 or CP=2 in the config changes no output")


def dp_equivalence_check():
    name, overrides, B, mask, dp = TINY_CASES[1]  # seq-aux, M=2, mask holes
    cfg = tiny_config(overrides)
    inputs, _ = separated(cfg, B, mask, 31, 1)
    a = gref.gpt_reference(cfg, inputs)
    b = gref.gpt_reference({**cfg, "num_microbatches": 1}, inputs, data_parallel_size=2)
    worst = max(rel_err(b[k], a[k]) for k in a if k.startswith(("grad.", "logits", "loss")))
    same_tpe = all(np.array_equal(a[k], b[k]) for k in a if k.startswith("tokens_per_expert"))
    check(set(a) == set(b) and worst <= 1e-13 and same_tpe,
          f"DP=2 x M=1 equals M=2 without global aux (worst relative difference {worst:.1e})")


def bad_input_check():
    name, overrides, B, mask = rp.CONFIGS[0]
    cfg = rp.make_config(overrides)
    inputs = gref.make_inputs(cfg, B, 1000, mask=mask)
    for case, bcfg, binputs, words in rp.bad_input_cases(cfg, inputs):
        try:
            gref.gpt_reference(bcfg, binputs)
            check(False, f"bad input '{case}': the reference accepted it")
        except ValueError as e:
            check(any(w in str(e) for w in words), f"bad input '{case}': rejected, naming one of {list(words)}: {e}")


def names_check():
    for name, overrides, B, mask in rp.CONFIGS:
        cfg = rp.make_config(overrides)
        r = gref.gpt_reference(cfg, gref.make_inputs(cfg, B, 5, mask=mask))
        want = gref.expected_output_names(cfg)
        shapes = gref.parameter_shapes(cfg)
        ok = list(r) == want and all(r["grad." + n].shape == tuple(shapes[n])
                                     for n in gref.trainable_parameter_names(cfg))
        ok &= r["logits"].shape == (B, cfg["seq_length"], cfg["vocab_size"]) and r["loss"].shape == (1,)
        check(ok, f"{name}: outputs are exactly the contract's {len(want)} names and shapes")


def harness_check():
    proc = subprocess.run([sys.executable, os.path.join(HERE, "run_parity_gpt.py"), "--self-test"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600)
    text = proc.stdout.decode(errors="replace")
    tail = [line for line in text.splitlines() if line.startswith("PARITY")]
    uses = []
    for line in text.splitlines():
        parts = line.split()
        if parts and parts[-1] == "ok" and len(parts) >= 6:
            try:
                uses.append(float(parts[-2]))
            except ValueError:
                pass
    check(proc.returncode == 0, f"run_parity_gpt.py --self-test (the f32 reference as the tool): exit "
                                f"{proc.returncode}, {tail[-1] if tail else text[-500:]}; largest tolerance use "
                                f"{max(uses) if uses else float('nan'):.2f}")


def main():
    torch.set_num_threads(1)
    quick = "--quick" in sys.argv[1:]
    print("finite-difference gradient checks (f64):")
    for name, overrides, B, mask, dp in TINY_CASES:
        fd_check(name, tiny_config(overrides), B, mask, dp)
    print("forward against the loop-based numpy implementation:")
    for name, overrides, B, mask, dp in TINY_CASES:
        loop_check(name, tiny_config(overrides), B, mask, dp)
    print("hand values:")
    zero_weights_check()
    print("global aux loss and data parallelism:")
    global_aux_checks()
    dp_equivalence_check()
    print("capacity per router shard (TP x CP):")
    capacity_shard_checks()
    print("bad inputs and output names:")
    bad_input_check()
    names_check()
    if not quick:
        print("parity harness:")
        harness_check()
    if failures:
        print(f"\nSELFCHECK FAILED ({len(failures)})")
        return 1
    print("\nSELFCHECK OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
