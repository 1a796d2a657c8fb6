"""Independent PyTorch reference of Megatron Core's MoE layer, for parity checks of `moe_layer_io`.

Written from Megatron Core's semantics (megatron/core/transformer/moe/{router,moe_utils,experts,
shared_experts,moe_layer}.py and docs/moe.md), not from libmoecore's C++: one token at a
time through plain torch ops, with autograd for every gradient.

    outputs = moe_layer_reference(config, inputs)            # f64 by default

config: a dict with Megatron-named keys (the keys of include/moecore/config.h; unknown keys are
errors, keys that do not change single-process numerics are accepted and ignored).
inputs: numpy arrays (or torch tensors) under the moe_layer_io names:
    hidden_states (S, B, H), grad_output (S, B, H), router.weight (E, H),
    experts.linear_fc1.weight (E, F1, H) with F1 = 2F for a GLU (rows [gate | up]),
    experts.linear_fc2.weight (E, H, F), optional router.expert_bias (E),
    shared_experts.linear_fc1.weight (F1s, H), shared_experts.linear_fc2.weight (H, Fs),
    shared_experts.gate_weight (1, H).
Returns numpy arrays: output (S, B, H), grad_hidden_states (S, B, H), grad.<param> for every
trainable parameter (the gradient of sum(output * grad_output) + aux losses + z-loss, loss scale 1),
probs (T, E), routing_map (T, E) u8, tokens_per_expert (E) i64, aux_loss (1), z_loss (1) and
router.expert_bias.updated (E) when the expert bias is enabled. Token t = s*B + b.

moe_layer_forward(c, x, params, S, B, ...) is the same layer as a differentiable function (output and
aux/z-loss tensors inside the caller's autograd graph), for the whole-model reference_gpt.py.

Everything is computed in `dtype` (f64 by default), including the router: the reference is the
exact math, so a parity comparison measures libmoecore's rounding, not Megatron's (Megatron itself
computes softmax/sigmoid scores in fp32 even with an fp64 router dtype).

The module also holds a dependency-free safetensors reader/writer (numpy only): read_safetensors,
write_safetensors. Importing it does not need torch; calling the reference does.
"""
import json
import math
import os
import struct
import tempfile

import numpy as np

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # the safetensors helpers still work; moe_layer_reference raises
    torch = None
    F = None

# ---------------------------------------------------------------------------------------------
# safetensors: 8-byte little-endian header length N, N bytes of JSON header
#   {"name": {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, "__metadata__": {...}}
# then the data buffer (offsets relative to its start), little-endian, row-major.
# ---------------------------------------------------------------------------------------------

_ST_TO_NP = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_NP_TO_ST = {
    np.dtype("float64"): "F64",
    np.dtype("float32"): "F32",
    np.dtype("float16"): "F16",
    np.dtype("int64"): "I64",
    np.dtype("int32"): "I32",
    np.dtype("int16"): "I16",
    np.dtype("int8"): "I8",
    np.dtype("uint8"): "U8",
    np.dtype("bool"): "BOOL",
}


def read_safetensors(path, with_dtypes=False):
    """Reads a whole safetensors file. Returns {name: np.ndarray} (file order), and with
    with_dtypes=True also {name: safetensors dtype string} and the metadata dict. BF16 is
    widened to float32. Raises ValueError on a malformed file."""
    with open(path, "rb") as f:
        blob = f.read()
    if len(blob) < 8:
        raise ValueError(f"{path}: {len(blob)} bytes, too short for a safetensors file")
    (n,) = struct.unpack("<Q", blob[:8])
    if n > len(blob) - 8:
        raise ValueError(f"{path}: header length {n} exceeds the file size {len(blob)}")
    header = json.loads(blob[8:8 + n].decode("utf-8"))
    data = memoryview(blob)[8 + n:]
    metadata = header.pop("__metadata__", {}) or {}
    tensors, dtypes = {}, {}
    for name, info in sorted(header.items(), key=lambda kv: (kv[1]["data_offsets"][0], kv[0])):
        dt, shape, (begin, end) = info["dtype"], [int(s) for s in info["shape"]], info["data_offsets"]
        if not 0 <= begin <= end <= len(data):
            raise ValueError(f"{path}: tensor '{name}' has data_offsets [{begin}, {end}] outside the "
                             f"{len(data)}-byte buffer")
        count = int(np.prod(shape, dtype=np.int64))
        raw = data[begin:end]
        if dt == "BF16":
            if len(raw) != 2 * count:
                raise ValueError(f"{path}: tensor '{name}' BF16 {shape} needs {2 * count} bytes, has {len(raw)}")
            u16 = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
            arr = u16.view(np.float32)
        elif dt in _ST_TO_NP:
            npdt = _ST_TO_NP[dt]
            if len(raw) != npdt.itemsize * count:
                raise ValueError(f"{path}: tensor '{name}' {dt} {shape} needs {npdt.itemsize * count} bytes, "
                                 f"has {len(raw)}")
            arr = np.frombuffer(raw, dtype=npdt)
        else:
            raise ValueError(f"{path}: tensor '{name}' has unsupported dtype '{dt}'")
        tensors[name] = arr.reshape(shape).copy()
        dtypes[name] = dt
    if with_dtypes:
        return tensors, dtypes, metadata
    return tensors


def write_safetensors(path, tensors, metadata=None):
    """Writes {name: array-like} (numpy arrays or CPU torch tensors) in the given order, atomically
    (temp file + rename). numpy dtypes map to F64 F32 F16 I64 I32 I16 I8 U8 BOOL."""
    header, buffers, offset = {}, [], 0
    for name, value in tensors.items():
        if torch is not None and isinstance(value, torch.Tensor):
            value = value.detach().cpu().numpy()
        arr = np.ascontiguousarray(value)
        if arr.dtype not in _NP_TO_ST:
            raise ValueError(f"write_safetensors: tensor '{name}' has dtype {arr.dtype}, which has no safetensors "
                             f"name here (use one of {sorted(str(d) for d in _NP_TO_ST)})")
        raw = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": _NP_TO_ST[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        buffers.append(raw)
        offset += len(raw)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    head += b" " * ((-len(head)) % 8)  # align the data buffer to 8 bytes, as the reference writer does
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(head)))
            f.write(head)
            for raw in buffers:
                f.write(raw)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ---------------------------------------------------------------------------------------------
# Configuration (defaults are Megatron's, as in include/moecore/config.h)
# ---------------------------------------------------------------------------------------------

CONFIG_DEFAULTS = {
    "hidden_size": 0,
    "num_moe_experts": 0,
    "moe_ffn_hidden_size": 0,
    "moe_router_topk": 2,
    "moe_router_score_function": "softmax",
    "moe_router_pre_softmax": False,
    "moe_router_topk_scaling_factor": None,
    "moe_router_num_groups": None,
    "moe_router_group_topk": None,
    "moe_router_enable_expert_bias": False,
    "moe_router_bias_update_rate": 1e-3,
    "moe_router_load_balancing_type": ["aux_loss"],
    "moe_aux_loss_coeff": [0.0],
    "moe_z_loss_coeff": None,
    "moe_input_jitter_eps": None,
    "moe_router_dtype": None,
    "moe_expert_capacity_factor": None,
    "moe_token_drop_policy": "probs",
    "moe_pad_expert_input_to_capacity": False,
    "moe_shared_expert_intermediate_size": None,
    "moe_shared_expert_gate": False,
    "gated_linear_unit": False,
    "activation_func": "gelu",
    "params_dtype": "fp32",
}
# Keys that do not change the single-process math (parallel layout, memory policy, init).
IGNORED_KEYS = {
    "seed", "init_method_std", "moe_shared_expert_overlap", "tensor_model_parallel_size",
    "context_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size",
    "expert_tensor_parallel_size", "moe_token_dispatcher_type", "sequence_parallel", "parallel_order",
    "recompute_granularity", "recompute_modules", "fine_grained_activation_offloading", "offload_modules",
}


def normalize_config(config):
    """Fills defaults, checks key names, turns scalar list keys into lists."""
    unknown = sorted(k for k in config if k not in CONFIG_DEFAULTS and k not in IGNORED_KEYS)
    if unknown:
        raise ValueError(f"reference: unknown config keys {unknown}")
    c = dict(CONFIG_DEFAULTS)
    c.update({k: v for k, v in config.items() if k in CONFIG_DEFAULTS})
    for key in ("moe_router_load_balancing_type", "moe_aux_loss_coeff"):
        if not isinstance(c[key], (list, tuple)):
            c[key] = [c[key]]
    if c["moe_input_jitter_eps"] is not None:
        raise ValueError("reference: moe_input_jitter_eps is random; parity configs must leave it unset")
    if len(c["moe_aux_loss_coeff"]) not in (1, len(c["moe_router_load_balancing_type"])):
        raise ValueError("reference: moe_aux_loss_coeff needs 1 value or one per load-balancing type")
    return c


def aux_loss_coeffs(c):
    """{type: coefficient} for the enabled (coefficient > 0) aux-loss types."""
    types, coeffs = c["moe_router_load_balancing_type"], c["moe_aux_loss_coeff"]
    if len(coeffs) == 1:
        coeffs = list(coeffs) * len(types)
    return {t: float(v) for t, v in zip(types, coeffs) if t != "none" and float(v) > 0}


def trainable_parameter_names(config):
    """The trainable parameters of a config, in moe_layer_io's canonical names."""
    c = normalize_config(config)
    names = ["router.weight", "experts.linear_fc1.weight", "experts.linear_fc2.weight"]
    if (c["moe_shared_expert_intermediate_size"] or 0) > 0:
        names += ["shared_experts.linear_fc1.weight", "shared_experts.linear_fc2.weight"]
        if c["moe_shared_expert_gate"]:
            names.append("shared_experts.gate_weight")
    return names


def parameter_shapes(config):
    """{name: shape} of every parameter moe_layer_io reads for this config (expert bias included)."""
    c = normalize_config(config)
    H, E, Fe = c["hidden_size"], c["num_moe_experts"], c["moe_ffn_hidden_size"]
    glu = 2 if c["gated_linear_unit"] else 1
    shapes = {
        "router.weight": (E, H),
        "experts.linear_fc1.weight": (E, glu * Fe, H),
        "experts.linear_fc2.weight": (E, H, Fe),
    }
    if c["moe_router_enable_expert_bias"]:
        shapes["router.expert_bias"] = (E,)
    Fs = c["moe_shared_expert_intermediate_size"] or 0
    if Fs > 0:
        shapes["shared_experts.linear_fc1.weight"] = (glu * Fs, H)
        shapes["shared_experts.linear_fc2.weight"] = (H, Fs)
        if c["moe_shared_expert_gate"]:
            shapes["shared_experts.gate_weight"] = (1, H)
    return shapes


# ---------------------------------------------------------------------------------------------
# Router (megatron/core/transformer/moe/moe_utils.py: topk_routing_with_score_function,
# group_limited_topk, apply_router_token_dropping, compute_routing_scores_for_aux_loss,
# switch_load_balancing_loss_func, z_loss_func; router.py: TopKRouter.routing)
# ---------------------------------------------------------------------------------------------

def _select_topk(values, k, num_groups, group_topk):
    """Top-k expert indices per token (T, k), optionally limited to the best `group_topk` of
    `num_groups` groups (group score = sum of the group's top-(k/group_topk) values). Also returns
    the smallest decision margin over tokens (gap between the last kept and the first rejected
    value, for the groups and for the experts): a margin near 0 means a near-tie that rounding
    could flip."""
    T, E = values.shape
    margin = math.inf
    if group_topk:
        G = num_groups
        group_scores = values.view(T, G, E // G).topk(k // group_topk, dim=-1).values.sum(dim=-1)  # (T, G)
        gs = group_scores.sort(dim=-1, descending=True)
        if group_topk < G:
            margin = min(margin, float((gs.values[:, group_topk - 1] - gs.values[:, group_topk]).min()))
        keep_group = torch.zeros(T, G, dtype=torch.bool)
        keep_group.scatter_(1, gs.indices[:, :group_topk], True)
        keep_expert = keep_group.unsqueeze(-1).expand(T, G, E // G).reshape(T, E)
        values = values.masked_fill(~keep_expert, -math.inf)
    vs = values.sort(dim=-1, descending=True)
    if k < E:
        gap = vs.values[:, k - 1] - vs.values[:, k]  # +inf where the (k+1)-th is masked
        margin = min(margin, float(gap.min()))
    return vs.indices[:, :k], margin


def _route(logits, c, expert_bias):
    """topk_routing_with_score_function: returns probs (T, E) (zero off the map, differentiable),
    routing_map (T, E) bool and the selection margin."""
    T, E = logits.shape
    k, sf = c["moe_router_topk"], c["moe_router_score_function"]
    G, g = c["moe_router_num_groups"], c["moe_router_group_topk"]
    if sf == "softmax":
        if c["moe_router_pre_softmax"]:
            scores = torch.softmax(logits, dim=-1)
            idx, margin = _select_topk(scores.detach(), k, G, g)
            probs = scores.gather(1, idx)
        else:
            idx, margin = _select_topk(logits.detach(), k, G, g)
            probs = torch.softmax(logits.gather(1, idx), dim=-1)
    elif sf in ("sigmoid", "sqrtsoftplus"):
        scores = torch.sigmoid(logits) if sf == "sigmoid" else F.softplus(logits).sqrt()
        select = scores.detach() if expert_bias is None else scores.detach() + expert_bias
        idx, margin = _select_topk(select, k, G, g)  # the bias chooses, it never weighs
        top = scores.gather(1, idx)
        probs = top / (top.sum(dim=-1, keepdim=True) + 1e-20) if k > 1 else top
    else:
        raise ValueError(f"reference: unknown moe_router_score_function '{sf}'")
    if c["moe_router_topk_scaling_factor"]:
        probs = probs * c["moe_router_topk_scaling_factor"]
    routing_probs = torch.zeros_like(logits).scatter(1, idx, probs)
    routing_map = torch.zeros(T, E, dtype=torch.bool).scatter(1, idx, True)
    return routing_probs, routing_map, margin


def expert_capacity(num_tokens, k, num_experts, capacity_factor):
    """get_capacity(num_tokens * k, E, cf) = ceil(T*k/E * cf)."""
    return int(math.ceil((num_tokens * k / num_experts) * capacity_factor))


def _apply_capacity(routing_probs, routing_map, c):
    """apply_router_token_dropping. Per expert, the kept tokens are: policy `probs`: the routed
    tokens with the largest probs; `position`: the earliest routed tokens; with padding, the
    remaining rows up to the capacity are the earliest tokens not yet kept (zero probs). Capacity
    >= T keeps every token (and with padding puts every token in every expert). Returns probs,
    final map and the probs-policy margin."""
    T, E = routing_map.shape
    cap = expert_capacity(T, c["moe_router_topk"], E, c["moe_expert_capacity_factor"])
    policy = c["moe_token_drop_policy"]
    margin = math.inf
    if cap >= T:
        keep = torch.ones(T, E, dtype=torch.bool)
    else:
        keep = torch.zeros(T, E, dtype=torch.bool)
        p = routing_probs.detach()
        for e in range(E):
            routed = [t for t in range(T) if routing_map[t, e]]
            if policy == "probs":
                routed.sort(key=lambda t: (-float(p[t, e]), t))
                if len(routed) > cap:
                    margin = min(margin, float(p[routed[cap - 1], e] - p[routed[cap], e]))
            elif policy != "position":
                raise ValueError(f"reference: unknown moe_token_drop_policy '{policy}'")
            order = routed + [t for t in range(T) if not routing_map[t, e]]
            keep[order[:cap], e] = True
    final_map = keep if c["moe_pad_expert_input_to_capacity"] else (routing_map & keep)
    return routing_probs * final_map, final_map, margin, cap


def _aux_scores(logits, c):
    """compute_routing_scores_for_aux_loss: full (normalised) scores and the plain top-k map."""
    sf, k = c["moe_router_score_function"], c["moe_router_topk"]
    if sf == "softmax":
        scores = torch.softmax(logits, dim=-1)
    else:
        s = torch.sigmoid(logits) if sf == "sigmoid" else F.softplus(logits).sqrt()
        scores = s / (s.sum(dim=-1, keepdim=True) + 1e-20)
    idx, margin = _select_topk(scores.detach(), k, None, None)
    topk_map = torch.zeros(scores.shape, dtype=torch.bool).scatter(1, idx, True)
    return scores, topk_map, margin


def _switch_loss(scores, counts, total_tokens, k, E, coeff):
    """switch_load_balancing_loss_func: coeff * E / (k * T^2) * sum_i (sum_t scores[t, i]) * c_i."""
    return (scores.sum(dim=0) * counts).sum() * (E * coeff / (k * total_tokens * total_tokens))


# ---------------------------------------------------------------------------------------------
# Experts (experts.py with moe_apply_probs_on_input=False: probs multiply the activation output,
# before fc2; unpermute is a plain sum) and shared experts (shared_experts.py)
# ---------------------------------------------------------------------------------------------

def _activation(h, c):
    name = c["activation_func"]
    if name == "gelu":
        act = F.gelu  # Megatron's default activation is torch's exact (erf) GELU
    elif name == "silu":
        act = F.silu
    elif name in ("relu2", "squared_relu"):
        def act(v):
            return F.relu(v) ** 2
    else:
        raise ValueError(f"reference: unknown activation_func '{name}'")
    if c["gated_linear_unit"]:
        gate, up = torch.chunk(h, 2, dim=-1)  # rows [gate F | up F]
        return act(gate) * up
    return act(h)


def _to_tensor(value, dtype):
    if isinstance(value, torch.Tensor):
        return value.detach().to(dtype=dtype, device="cpu").clone()
    return torch.from_numpy(np.array(value, dtype=np.float64)).to(dtype)


def moe_layer_forward(c, x, params, S, B, expert_bias=None, defer_global_aux=False, capacity_shards=None):
    """Differentiable forward of the MoE layer (router, aux/z losses, routed and shared experts),
    usable inside a larger autograd graph (tests/parity/reference_gpt.py calls it per layer and
    micro-batch).

    c: a normalize_config() dict; x: (T, H) tokens, T = S*B, token t = s*B + b (Megatron's [s, b, h]
    flattened; S and B matter for seq_aux_loss and nothing else); params: {canonical name: tensor}
    for trainable_parameter_names(c); expert_bias: (E) tensor or None.
    Returns a dict: output (T, H), aux_loss (0-d: the sum of the enabled load-balancing losses,
    coefficients included), z_loss (0-d), probs (T, E) and routing_map (T, E) bool after capacity,
    margins {decision: smallest margin}.

    global_aux_loss: Megatron's router sums the global aux loss's counts over TP x DP x CP and keeps
    their running mean over the micro-batches of a step (reset when the step's gradients are
    finalised). For one micro-batch on one rank that is the micro-batch's own counts, which is what
    happens with defer_global_aux=False (the term is inside aux_loss). With defer_global_aux=True it
    is left out of aux_loss and the dict gets global_aux = (coeff, score_sums (E) differentiable,
    counts (E) detached, T) for the caller to combine across micro-batches:
    coeff * E / (k * T_total^2) * sum_i score_sums_i * running_mean_counts_i.

    capacity_shards: None (the capacity applies to all T tokens) or a list of index lists that
    partition range(T), each in its rank's local token order: Megatron's router runs on each rank's
    local tokens (the sequence-parallel / context-parallel shard), so capacity and dropping are per
    shard. Nothing else in the layer depends on the sharding.
    """
    T, H = x.shape
    E, k = c["num_moe_experts"], c["moe_router_topk"]
    dtype = x.dtype

    # ---- router ----
    logits = x @ params["router.weight"].t()  # (T, E)
    z_loss = torch.zeros((), dtype=dtype)
    if c["moe_z_loss_coeff"] is not None:
        z_loss = c["moe_z_loss_coeff"] * (torch.logsumexp(logits, dim=-1) ** 2).mean()
    probs, routing_map, sel_margin = _route(logits, c, expert_bias)
    margins = {"selection": sel_margin}
    if c["moe_expert_capacity_factor"] is not None:
        if capacity_shards is None:
            probs, routing_map, cap_margin, _ = _apply_capacity(probs, routing_map, c)
        else:
            order = torch.tensor([t for shard in capacity_shards for t in shard], dtype=torch.int64)
            if sorted(order.tolist()) != list(range(T)):
                raise ValueError("reference: capacity_shards must partition the tokens")
            parts, cap_margin = [], math.inf
            for shard in capacity_shards:
                idx = torch.tensor(shard, dtype=torch.int64)
                p_s, m_s, margin_s, _ = _apply_capacity(probs[idx], routing_map[idx], c)
                parts.append((p_s, m_s))
                cap_margin = min(cap_margin, margin_s)
            inverse = torch.argsort(order)
            probs = torch.cat([p_s for p_s, _ in parts])[inverse]
            routing_map = torch.cat([m_s for _, m_s in parts])[inverse]
        margins["capacity"] = cap_margin
    aux_loss = torch.zeros((), dtype=dtype)
    global_aux = None
    lb = aux_loss_coeffs(c)
    if lb:
        scores, aux_map, aux_margin = _aux_scores(logits, c)
        margins["aux_topk"] = aux_margin
        for kind, coeff in lb.items():
            if kind == "global_aux_loss" and defer_global_aux:
                global_aux = (coeff, scores.sum(dim=0), aux_map.sum(dim=0).to(dtype), T)
            elif kind in ("aux_loss", "global_aux_loss"):  # global == aux for one micro-batch on one rank
                aux_loss = aux_loss + _switch_loss(scores, aux_map.sum(dim=0).to(dtype), T, k, E, coeff)
            elif kind == "seq_aux_loss":
                # Tokens t = s*B + b: viewing (S, B*E) makes each (sequence, expert) pair a column.
                seq_scores = scores.reshape(S, B * E)
                seq_counts = aux_map.reshape(S, B * E).sum(dim=0).to(dtype)
                aux_loss = aux_loss + _switch_loss(seq_scores, seq_counts, S, k, E, coeff) / B
            else:
                raise ValueError(f"reference: unknown moe_router_load_balancing_type '{kind}'")

    # ---- routed experts: each (token, expert) pair of the final map, plain sum per token ----
    w1, w2 = params["experts.linear_fc1.weight"], params["experts.linear_fc2.weight"]
    out = torch.zeros(T, H, dtype=dtype)
    for e in range(E):
        rows = routing_map[:, e].nonzero().flatten()
        if rows.numel() == 0:
            continue
        a = _activation(x[rows] @ w1[e].t(), c) * probs[rows, e].unsqueeze(-1)
        out = out.index_add(0, rows, a @ w2[e].t())

    # ---- shared expert ----
    if "shared_experts.linear_fc1.weight" in params:
        sh = _activation(x @ params["shared_experts.linear_fc1.weight"].t(), c)
        sh = sh @ params["shared_experts.linear_fc2.weight"].t()
        if "shared_experts.gate_weight" in params:
            sh = sh * torch.sigmoid(x @ params["shared_experts.gate_weight"].t())
        out = out + sh

    result = {"output": out, "aux_loss": aux_loss, "z_loss": z_loss, "probs": probs,
              "routing_map": routing_map, "margins": margins}
    if defer_global_aux:
        result["global_aux"] = global_aux
    return result


def moe_layer_reference(config, inputs, dtype=None, return_margins=False):
    """Forward + backward of the MoE layer; see the module docstring. With return_margins=True
    also returns {decision: smallest margin} (selection, aux_topk, capacity) to reject inputs
    whose discrete decisions are near-ties."""
    if torch is None:
        raise RuntimeError("reference_moe: torch is not importable")
    dtype = dtype or torch.float64
    c = normalize_config(config)
    H, E = c["hidden_size"], c["num_moe_experts"]
    hs = _to_tensor(inputs["hidden_states"], dtype)
    if hs.dim() != 3 or hs.shape[2] != H:
        raise ValueError(f"reference: hidden_states must be (S, B, {H}), got {tuple(hs.shape)}")
    S, B, _ = hs.shape
    T = S * B
    dy = _to_tensor(inputs["grad_output"], dtype).reshape(T, H)

    shapes = parameter_shapes(c)
    trainable = trainable_parameter_names(c)
    params = {}
    for name in trainable:
        if name not in inputs:
            raise ValueError(f"reference: missing parameter '{name}'")
        params[name] = _to_tensor(inputs[name], dtype)
        if tuple(params[name].shape) != tuple(shapes[name]):
            raise ValueError(f"reference: '{name}' must be {shapes[name]}, got {tuple(params[name].shape)}")
        params[name].requires_grad_(True)
    expert_bias = None
    if c["moe_router_enable_expert_bias"]:
        if c["moe_router_score_function"] == "softmax":
            raise ValueError("reference: the expert bias needs a sigmoid or sqrtsoftplus score function")
        raw = inputs.get("router.expert_bias")
        # The bias is stored in fp32 (Megatron keeps it fp32 whatever the params dtype).
        expert_bias = (_to_tensor(raw, torch.float32) if raw is not None else torch.zeros(E)).to(dtype)

    hs.requires_grad_(True)
    x = hs.reshape(T, H)
    fwd = moe_layer_forward(c, x, params, S, B, expert_bias)
    out, aux_loss, z_loss = fwd["output"], fwd["aux_loss"], fwd["z_loss"]
    probs, routing_map, margins = fwd["probs"], fwd["routing_map"], fwd["margins"]

    # ---- backward: the aux and z losses join the objective with loss scale 1 ----
    objective = (out * dy).sum() + aux_loss + z_loss
    leaves = [hs] + [params[n] for n in trainable]
    grads = torch.autograd.grad(objective, leaves, allow_unused=True)
    grads = [torch.zeros_like(l) if gr is None else gr for l, gr in zip(leaves, grads)]

    def np_(t):
        return t.detach().cpu().numpy()

    result = {
        "output": np_(out.reshape(S, B, H)),
        "grad_hidden_states": np_(grads[0]),
    }
    for name, gr in zip(trainable, grads[1:]):
        result["grad." + name] = np_(gr)
    counts = routing_map.sum(dim=0)
    result["probs"] = np_(probs)
    result["routing_map"] = np_(routing_map).astype(np.uint8)
    result["tokens_per_expert"] = np_(counts).astype(np.int64)
    result["aux_loss"] = np.array([float(aux_loss)], dtype=np.float64)
    result["z_loss"] = np.array([float(z_loss)], dtype=np.float64)
    if expert_bias is not None:
        # get_updated_expert_bias: b += rate * sign(mean(c) - c), c = the final map's counts.
        cf = counts.to(torch.float64)
        b = expert_bias.to(torch.float64) + torch.sign(cf.mean() - cf) * c["moe_router_bias_update_rate"]
        result["router.expert_bias.updated"] = np_(b)
    if return_margins:
        return result, margins
    return result


def expected_output_names(config):
    """The tensors moe_layer_io writes for a config."""
    c = normalize_config(config)
    names = ["output", "grad_hidden_states"] + ["grad." + n for n in trainable_parameter_names(c)]
    names += ["probs", "routing_map", "tokens_per_expert", "aux_loss", "z_loss"]
    if c["moe_router_enable_expert_bias"]:
        names.append("router.expert_bias.updated")
    return names
