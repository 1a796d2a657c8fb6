"""Independent PyTorch reference of a Megatron Core MoE GPT model, for parity checks of `moe_gpt_io`.

Written from Megatron Core's semantics (megatron/core/models/gpt/gpt_model.py with the local layer
spec: language_module.py, common/embeddings/{language_model_embedding,rotary_pos_embedding,
rope_utils}.py, transformer/{transformer_block,transformer_layer,attention,dot_product_attention,
mlp}.py, pretrain_gpt.py's loss and the pipeline schedule's micro-batch averaging), not from
libmoecore's C++. Plain torch ops, full-matrix attention, autograd for every gradient; the MoE layers
are reference_moe.moe_layer_forward.

    outputs = gpt_reference(config, inputs)            # f64 by default

config: Megatron-named keys. Model keys (defaults as Megatron's TransformerConfig / GPTModel):
    num_layers, hidden_size H, num_attention_heads nh, num_query_groups ng (nh),
    kv_channels hd (H // nh), ffn_hidden_size (4H, the dense MLP width), vocab_size V,
    seq_length S, normalization ("LayerNorm" | "RMSNorm"), layernorm_epsilon (1e-5),
    position_embedding_type ("learned_absolute" | "rope"), rotary_base (10000),
    rotary_percent (1.0), qk_layernorm (False), untie_embeddings_and_output_weights (False),
    moe_layer_freq (1: int N -> layer i is MoE iff i % N == 0, or a 0/1 list per layer),
    num_microbatches M (1);
  plus every key reference_moe.normalize_config accepts (MoE keys, params_dtype, and the parallel
  sizes, which do not change the numbers). moe_ffn_hidden_size 0/absent means ffn_hidden_size.
  num_moe_experts 0/absent makes every layer dense. Unknown keys are errors. Of the parallel sizes
  only tensor_model_parallel_size and context_parallel_size matter, and only with a capacity factor
  (see router_shards).
inputs (numpy arrays or torch tensors): tokens (B, S) int, labels (B, S) int, optional loss_mask
  (B, S) (ones), and every parameter under its canonical name (parameter_shapes(config));
  decoder.layers.<i>.mlp.router.expert_bias is optional (zeros) and only with the expert bias.
Returns numpy arrays:
  loss (1) f64               mean over the micro-batches of the masked-mean cross entropy
  logits (B, S, V)           in the reference dtype
  grad.<param>               dJ/dparam for every parameter except router.expert_bias (tied
                             embeddings: one gradient, the sum of the input and output uses)
  tokens_per_expert.<i> (E)  i64, per MoE layer i (counted over all layers), summed over micro-batches

The model, per micro-batch of b = B/M sequences (tokens (b, S)):
  h = word_embeddings[tokens] (+ position_embeddings[s] for learned_absolute), laid out (S, b, H);
  every layer: h = h + linear_proj(attention(norm1(h))); h = h + mlp(norm2(h)), mlp dense or MoE;
  final norm; logits = h W_out^T, W_out = the word embeddings unless untied; per-token cross
  entropy; lm = sum(mask * ce) / sum(mask).
  Norms: RMSNorm x * rsqrt(mean(x^2) + eps) * w; LayerNorm (x - mean) * rsqrt(var + eps) * w + b
  with the biased variance; every norm (input, pre-MLP, q/k, final) has a bias with LayerNorm.
  Attention: qkv = x W_qkv^T viewed (S, b, ng, (nh/ng + 2) hd); each group's slice is
  [nh/ng query heads | 1 key head | 1 value head]; query head j of group g is head g*(nh/ng) + j and
  attends with group g's key and value. With qk_layernorm every q and k head is normalised over hd
  (before the rotary embedding). RoPE, not interleaved, on the first rd = int(hd * rotary_percent)
  dims of q and k: inv_freq_i = base^(-2i/rd), angle = s * inv_freq, emb = [angle, angle],
  x <- x cos(emb) + rotate_half(x) sin(emb), rotate_half([x1, x2]) = [-x2, x1]; the other hd - rd
  dims pass through. Scores q k^T / sqrt(hd), causal, softmax; context heads concatenated in head
  order (S, b, nh*hd), then linear_proj. No biases in linear layers, no dropout.
  Dense MLP: fc2(act(fc1(x))) with the experts' activation_func / gated_linear_unit
  (GLU: fc1 rows [gate | up], act(gate) * up).
  MoE layer: the tokens of the micro-batch in Megatron's order t = s*b + bi (seq_aux_loss sees
  b sequences), exactly the layer of reference_moe.py: its aux, seq-aux and z losses are computed
  over the micro-batch's tokens.
Objective: with M micro-batches (contiguous B/M rows each) and DP data-parallel replicas
(data_parallel_size, contiguous B/DP rows each, split into M micro-batches; 1 for a single process):
  J = 1/(DP*M) * sum over (replica, micro-batch) of [lm + sum over MoE layers (aux + z)],
which is the pipeline schedule's per-micro-batch mean lm / M with MoEAuxLossAutoScaler's loss scale
1/M, then the data-parallel mean of the gradients. global_aux_loss follows Megatron's router: the
counts of micro-batch m are summed over the replicas' m-th micro-batches and the loss of micro-batch
m uses the running mean of those sums over micro-batches 1..m of the step, with T = DP * tokens per
micro-batch; for M = 1, DP = 1 it is the plain aux loss, as in reference_moe.py.
Capacity: Megatron's router runs on each rank's local tokens, so with moe_expert_capacity_factor the
capacity ceil(T_local * k / E * cf) and the dropping are per TP x CP shard of the micro-batch
(router_shards); every other quantity of the layer is the same in any layout.

Everything is computed in `dtype` (f64 by default): the reference is the exact math, so a parity
comparison measures the tool's rounding. Megatron computes RoPE frequencies, softmax and the cross
entropy in fp32; that is the same math.
"""
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference_moe as moe_ref  # noqa: E402

torch = moe_ref.torch

# Model keys and their defaults (None: required, or derived from other keys).
MODEL_DEFAULTS = {
    "num_layers": None,
    "num_attention_heads": None,
    "num_query_groups": None,
    "kv_channels": None,
    "ffn_hidden_size": None,
    "vocab_size": None,
    "seq_length": None,
    "normalization": "LayerNorm",
    "layernorm_epsilon": 1e-5,
    "position_embedding_type": "learned_absolute",
    "rotary_base": 10000,
    "rotary_percent": 1.0,
    "qk_layernorm": False,
    "untie_embeddings_and_output_weights": False,
    "moe_layer_freq": 1,
    "num_microbatches": 1,
}
REQUIRED_KEYS = ("num_layers", "hidden_size", "num_attention_heads", "vocab_size", "seq_length")


def _positive_int(value, key):
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"reference: {key} must be a positive integer, got {value!r}")
    return value


def normalize_gpt_config(config):
    """Splits and checks a model config. Returns (m, c): m the model keys with defaults and derived
    values filled (plus 'moe_pattern', one 0/1 per layer, and 'rotary_dim'), c the MoE layer config
    (reference_moe.normalize_config) or None when the model has no experts."""
    moe_keys = set(moe_ref.CONFIG_DEFAULTS) | set(moe_ref.IGNORED_KEYS)
    unknown = sorted(k for k in config if k not in MODEL_DEFAULTS and k not in moe_keys)
    if unknown:
        raise ValueError(f"reference: unknown config keys {unknown}")
    for key in REQUIRED_KEYS:
        if config.get(key) is None:
            raise ValueError(f"reference: config key {key} is required")
        _positive_int(config[key], key)
    m = dict(MODEL_DEFAULTS)
    m.update({k: v for k, v in config.items() if k in MODEL_DEFAULTS})
    H, nh = config["hidden_size"], m["num_attention_heads"]
    m["hidden_size"] = H
    if m["num_query_groups"] is None:
        m["num_query_groups"] = nh
    ng = _positive_int(m["num_query_groups"], "num_query_groups")
    if nh % ng != 0:
        raise ValueError(f"reference: num_attention_heads ({nh}) must be divisible by num_query_groups ({ng})")
    if m["kv_channels"] is None:
        if H % nh != 0:
            raise ValueError(f"reference: hidden_size ({H}) must be divisible by num_attention_heads ({nh}) "
                             f"when kv_channels is not set")
        m["kv_channels"] = H // nh
    hd = _positive_int(m["kv_channels"], "kv_channels")
    if m["ffn_hidden_size"] is None:
        m["ffn_hidden_size"] = 4 * H
    _positive_int(m["ffn_hidden_size"], "ffn_hidden_size")
    _positive_int(m["num_microbatches"], "num_microbatches")
    if m["normalization"] not in ("LayerNorm", "RMSNorm"):
        raise ValueError(f"reference: normalization must be 'LayerNorm' or 'RMSNorm', got {m['normalization']!r}")
    if m["position_embedding_type"] not in ("learned_absolute", "rope"):
        raise ValueError(f"reference: position_embedding_type must be 'learned_absolute' or 'rope', "
                         f"got {m['position_embedding_type']!r}")
    if m["position_embedding_type"] == "rope":
        rp = float(m["rotary_percent"])
        if not 0.0 < rp <= 1.0:
            raise ValueError(f"reference: rotary_percent must be in (0, 1], got {rp}")
        rd = hd if rp >= 1.0 else int(hd * rp)  # RotaryEmbedding: dim = int(kv_channels * rotary_percent)
        if rd <= 0 or rd % 2:
            raise ValueError(f"reference: the rotary dimension int(kv_channels * rotary_percent) = {rd} must be "
                             f"even and positive")
        m["rotary_dim"] = rd
    L = m["num_layers"]
    freq = m["moe_layer_freq"]
    E = config.get("num_moe_experts") or 0
    if isinstance(freq, bool):
        raise ValueError(f"reference: moe_layer_freq must be an int or a list, got {freq!r}")
    if isinstance(freq, int):
        pattern = [1 if i % _positive_int(freq, "moe_layer_freq") == 0 else 0 for i in range(L)]
    elif isinstance(freq, (list, tuple)):
        if len(freq) != L or any(v not in (0, 1) or isinstance(v, bool) for v in freq):
            raise ValueError(f"reference: moe_layer_freq as a list needs num_layers ({L}) entries of 0/1, "
                             f"got {list(freq)}")
        pattern = [int(v) for v in freq]
    else:
        raise ValueError(f"reference: moe_layer_freq must be an int or a list, got {freq!r}")
    m["moe_pattern"] = pattern if E > 0 else [0] * L
    m["tp"] = _positive_int(config.get("tensor_model_parallel_size", 1), "tensor_model_parallel_size")
    m["cp"] = _positive_int(config.get("context_parallel_size", 1), "context_parallel_size")
    c = None
    if E > 0:
        moe_cfg = {k: v for k, v in config.items() if k in moe_keys}
        if not moe_cfg.get("moe_ffn_hidden_size"):
            moe_cfg["moe_ffn_hidden_size"] = m["ffn_hidden_size"]
        c = moe_ref.normalize_config(moe_cfg)
        if c["moe_expert_capacity_factor"] is not None and (m["tp"] > 1 or m["cp"] > 1):
            parts = m["tp"] * (2 * m["cp"] if m["cp"] > 1 else 1)
            if m["seq_length"] % parts:
                raise ValueError(f"reference: seq_length ({m['seq_length']}) must split into {parts} router shards "
                                 f"(tensor_model_parallel_size x 2*context_parallel_size)")
    else:
        # The dense MLPs still take the activation keys.
        c_act = dict(moe_ref.CONFIG_DEFAULTS)
        c_act.update({k: v for k, v in config.items() if k in moe_ref.CONFIG_DEFAULTS})
        m["_act"] = c_act
    return m, c


def _act_config(m, c):
    return c if c is not None else m["_act"]


def moe_layers(config):
    """Indices of the MoE layers."""
    m, _ = normalize_gpt_config(config)
    return [i for i, v in enumerate(m["moe_pattern"]) if v]


def parameter_shapes(config):
    """{canonical name: shape} of every parameter moe_gpt_io reads for this config, in model order
    (router.expert_bias included, although it is optional and not trainable)."""
    m, c = normalize_gpt_config(config)
    H, V, S = m["hidden_size"], m["vocab_size"], m["seq_length"]
    nh, ng, hd = m["num_attention_heads"], m["num_query_groups"], m["kv_channels"]
    ln = m["normalization"] == "LayerNorm"
    glu = 2 if _act_config(m, c)["gated_linear_unit"] else 1
    Fd = m["ffn_hidden_size"]
    shapes = {"embedding.word_embeddings.weight": (V, H)}
    if m["position_embedding_type"] == "learned_absolute":
        shapes["embedding.position_embeddings.weight"] = (S, H)

    def norm(prefix, n):
        shapes[prefix + ".weight"] = (n,)
        if ln:
            shapes[prefix + ".bias"] = (n,)

    for i in range(m["num_layers"]):
        p = f"decoder.layers.{i}."
        norm(p + "input_layernorm", H)
        shapes[p + "self_attention.linear_qkv.weight"] = ((nh + 2 * ng) * hd, H)
        if m["qk_layernorm"]:
            norm(p + "self_attention.q_layernorm", hd)
            norm(p + "self_attention.k_layernorm", hd)
        shapes[p + "self_attention.linear_proj.weight"] = (H, nh * hd)
        norm(p + "pre_mlp_layernorm", H)
        if m["moe_pattern"][i]:
            for name, shape in moe_ref.parameter_shapes(c).items():
                shapes[p + "mlp." + name] = shape
        else:
            shapes[p + "mlp.linear_fc1.weight"] = (glu * Fd, H)
            shapes[p + "mlp.linear_fc2.weight"] = (H, Fd)
    norm("decoder.final_layernorm", H)
    if m["untie_embeddings_and_output_weights"]:
        shapes["output_layer.weight"] = (V, H)
    return shapes


def trainable_parameter_names(config):
    """Every parameter with a gradient in OUT (all but the expert bias), in model order."""
    return [n for n in parameter_shapes(config) if not n.endswith("router.expert_bias")]


def expected_output_names(config):
    """The tensors moe_gpt_io writes for a config."""
    names = ["loss", "logits"] + ["grad." + n for n in trainable_parameter_names(config)]
    names += [f"tokens_per_expert.{i}" for i in moe_layers(config)]
    return names


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------

def _norm(x, p, prefix, m):
    """RMSNorm or LayerNorm over the last dim (Megatron's WrappedTorchNorm / FusedLayerNorm)."""
    eps = float(m["layernorm_epsilon"])
    w = p[prefix + ".weight"]
    if m["normalization"] == "RMSNorm":
        return x * torch.rsqrt((x * x).mean(dim=-1, keepdim=True) + eps) * w
    mu = x.mean(dim=-1, keepdim=True)
    xc = x - mu
    var = (xc * xc).mean(dim=-1, keepdim=True)  # biased variance, as torch.nn.LayerNorm
    return xc * torch.rsqrt(var + eps) * w + p[prefix + ".bias"]


def _rotate_half(x):
    x1, x2 = torch.chunk(x, 2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rope(x, m):
    """x (S, b, heads, hd): rotary embedding on the first rotary_dim dims, position s = 0..S-1."""
    S, rd = x.shape[0], m["rotary_dim"]
    dtype = x.dtype
    inv_freq = 1.0 / (float(m["rotary_base"]) ** (torch.arange(0, rd, 2, dtype=dtype) / rd))
    angle = torch.outer(torch.arange(S, dtype=dtype), inv_freq)  # (S, rd/2)
    emb = torch.cat((angle, angle), dim=-1)[:, None, None, :]  # (S, 1, 1, rd)
    xr, xpass = x[..., :rd], x[..., rd:]
    xr = xr * torch.cos(emb) + _rotate_half(xr) * torch.sin(emb)
    return torch.cat((xr, xpass), dim=-1)


def _attention(x, p, prefix, m):
    """SelfAttention + DotProductAttention (causal) + linear_proj; x (S, b, H) -> (S, b, H)."""
    S, b, H = x.shape
    nh, ng, hd = m["num_attention_heads"], m["num_query_groups"], m["kv_channels"]
    qpg = nh // ng
    qkv = x @ p[prefix + "linear_qkv.weight"].t()  # (S, b, (nh + 2 ng) hd)
    qkv = qkv.reshape(S, b, ng, (qpg + 2) * hd)
    q, k, v = torch.split(qkv, [qpg * hd, hd, hd], dim=3)
    q = q.reshape(S, b, nh, hd)  # head g*qpg + j = group g, query j
    if m["qk_layernorm"]:
        q = _norm(q, p, prefix + "q_layernorm", m)
        k = _norm(k, p, prefix + "k_layernorm", m)
    if m["position_embedding_type"] == "rope":
        q = _rope(q, m)
        k = _rope(k, m)
    k = k.repeat_interleave(qpg, dim=2)  # (S, b, nh, hd): head h uses group h // qpg
    v = v.repeat_interleave(qpg, dim=2)
    qh, kh, vh = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # (b, nh, S, hd)
    scores = (qh @ kh.transpose(-1, -2)) / math.sqrt(hd)  # (b, nh, S, S)
    causal = torch.ones(S, S, dtype=torch.bool).triu(diagonal=1)
    scores = scores.masked_fill(causal, -math.inf)
    probs = torch.softmax(scores, dim=-1)
    ctx = (probs @ vh).permute(2, 0, 1, 3).reshape(S, b, nh * hd)  # heads concatenated in order
    return ctx @ p[prefix + "linear_proj.weight"].t()


def _dense_mlp(x, p, prefix, act_cfg):
    h = moe_ref._activation(x @ p[prefix + "linear_fc1.weight"].t(), act_cfg)
    return h @ p[prefix + "linear_fc2.weight"].t()


def _to_tensor(value, dtype):
    if isinstance(value, torch.Tensor):
        return value.detach().to(dtype=dtype, device="cpu").clone()
    return torch.from_numpy(np.array(value, dtype=np.float64)).to(dtype)


def _integer_array(inputs, name, shape, V):
    if name not in inputs:
        raise ValueError(f"reference: missing input '{name}'")
    value = inputs[name]
    arr = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    if arr.dtype.kind not in "iu":
        raise ValueError(f"reference: '{name}' must be an integer tensor, got {arr.dtype}")
    if arr.ndim != 2 or arr.shape[1] != shape[1] or (shape[0] is not None and arr.shape[0] != shape[0]):
        raise ValueError(f"reference: '{name}' must be (B, {shape[1]}), got {arr.shape}")
    if arr.size and (arr.min() < 0 or arr.max() >= V):
        raise ValueError(f"reference: '{name}' holds ids outside [0, vocab_size = {V}): "
                         f"min {arr.min()}, max {arr.max()}")
    return torch.from_numpy(arr.astype(np.int64))


def prepare(config, inputs, dtype, data_parallel_size=1):
    """Checks config and inputs (as moe_gpt_io must). Returns (m, c, params, expert_biases, tokens,
    labels, mask) with params as leaf tensors requiring grad."""
    m, c = normalize_gpt_config(config)
    S, V = m["seq_length"], m["vocab_size"]
    tokens = _integer_array(inputs, "tokens", (None, S), V)
    B = tokens.shape[0]
    labels = _integer_array(inputs, "labels", (B, S), V)
    if "loss_mask" in inputs:
        mask = _to_tensor(inputs["loss_mask"], dtype)
        if tuple(mask.shape) != (B, S):
            raise ValueError(f"reference: 'loss_mask' must be ({B}, {S}), got {tuple(mask.shape)}")
    else:
        mask = torch.ones(B, S, dtype=dtype)
    n_mb = m["num_microbatches"] * data_parallel_size
    if B == 0 or B % n_mb != 0:
        raise ValueError(f"reference: the batch of {B} sequences does not split into num_microbatches "
                         f"({m['num_microbatches']}) x data-parallel replicas ({data_parallel_size})")
    shapes = parameter_shapes(config)
    known = set(shapes) | {"tokens", "labels", "loss_mask"}
    unexpected = sorted(n for n in inputs if n not in known)
    if unexpected:
        raise ValueError(f"reference: unexpected input tensors {unexpected}")
    params, biases = {}, {}
    for name, shape in shapes.items():
        if name.endswith("router.expert_bias"):
            raw = inputs.get(name)
            if raw is not None and tuple(np.shape(raw)) != tuple(shape):
                raise ValueError(f"reference: '{name}' must be {shape}, got {tuple(np.shape(raw))}")
            # fp32 like Megatron's expert bias, zeros when absent
            biases[name] = (_to_tensor(raw, torch.float32) if raw is not None
                            else torch.zeros(shape, dtype=torch.float32)).to(dtype)
            continue
        if name not in inputs:
            raise ValueError(f"reference: missing parameter '{name}'")
        t = _to_tensor(inputs[name], dtype)
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"reference: '{name}' must be {shape}, got {tuple(t.shape)}")
        params[name] = t.requires_grad_(True)
    if c is not None and c["moe_router_enable_expert_bias"] and c["moe_router_score_function"] == "softmax":
        raise ValueError("reference: the expert bias needs a sigmoid or sqrtsoftplus score function")
    return m, c, params, biases, tokens, labels, mask


def router_shards(S, b, tp, cp):
    """The tokens t = s*b + bi of a micro-batch (S, b) on each (CP rank, TP rank), in that rank's local
    order, or None for one rank. Megatron's layout: CP splits the sequence into 2*CP chunks and CP
    rank r holds chunks r and 2*CP-1-r (load balancing for the causal mask); sequence parallelism
    then gives TP rank t the t-th contiguous S_local/TP positions of the local sequence. TP > 1 is
    taken to mean sequence parallelism (libmoecore turns it on with TP; older Megatron required it
    with MoE, current Megatron only warns, and without it every TP rank routes all local tokens)."""
    if tp == 1 and cp == 1:
        return None
    if cp > 1:
        chunk = S // (2 * cp)
        local = [list(range(r * chunk, (r + 1) * chunk)) + list(range((2 * cp - 1 - r) * chunk, (2 * cp - r) * chunk))
                 for r in range(cp)]
    else:
        local = [list(range(S))]
    shards = []
    for seq in local:
        per = len(seq) // tp
        for t in range(tp):
            shards.append([s * b + bi for s in seq[t * per:(t + 1) * per] for bi in range(b)])
    return shards


def _micro_batch_forward(m, c, p, biases, tokens):
    """One micro-batch: tokens (b, S) -> logits (S, b, V) and per MoE layer the moe_layer_forward
    dict."""
    b, S = tokens.shape
    h = p["embedding.word_embeddings.weight"][tokens]  # (b, S, H)
    if m["position_embedding_type"] == "learned_absolute":
        h = h + p["embedding.position_embeddings.weight"][torch.arange(S)].unsqueeze(0)
    h = h.transpose(0, 1)  # (S, b, H)
    H = h.shape[-1]
    moe_out = {}
    for i in range(m["num_layers"]):
        pre = f"decoder.layers.{i}."
        h = h + _attention(_norm(h, p, pre + "input_layernorm", m), p, pre + "self_attention.", m)
        x = _norm(h, p, pre + "pre_mlp_layernorm", m)
        if m["moe_pattern"][i]:
            lp = {n: p[pre + "mlp." + n] for n in moe_ref.trainable_parameter_names(c)}
            bias = biases.get(pre + "mlp.router.expert_bias") if c["moe_router_enable_expert_bias"] else None
            shards = (router_shards(S, b, m["tp"], m["cp"]) if c["moe_expert_capacity_factor"] is not None
                      else None)
            r = moe_ref.moe_layer_forward(c, x.reshape(S * b, H), lp, S, b, bias, defer_global_aux=True,
                                          capacity_shards=shards)
            moe_out[i] = r
            h = h + r["output"].reshape(S, b, H)
        else:
            h = h + _dense_mlp(x, p, pre + "mlp.", _act_config(m, c))
    h = _norm(h, p, "decoder.final_layernorm", m)
    w_out = p["output_layer.weight" if m["untie_embeddings_and_output_weights"]
              else "embedding.word_embeddings.weight"]
    return h @ w_out.t(), moe_out


def gpt_forward(config, inputs, dtype=None, data_parallel_size=1):
    """The whole step's forward. Returns a dict of tensors: J (0-d, the objective), lm (list of
    per-micro-batch lm losses), logits (B, S, V), tokens_per_expert {layer: (E) i64},
    aux / z / global_aux {layer: list per micro-batch of 0-d tensors}, margins {name: float},
    params (the leaves)."""
    if torch is None:
        raise RuntimeError("reference_gpt: torch is not importable")
    dtype = dtype or torch.float64
    m, c, p, biases, tokens, labels, mask = prepare(config, inputs, dtype, data_parallel_size)
    B, S = tokens.shape
    M, DP = m["num_microbatches"], data_parallel_size
    n_mb = M * DP
    b = B // n_mb
    lm, logits_all = [], []
    per_mb = []  # per micro-batch (in replica-major order j = r*M + mi): moe dicts
    for j in range(n_mb):
        rows = slice(j * b, (j + 1) * b)
        logits, moe_out = _micro_batch_forward(m, c, p, biases, tokens[rows])
        logits = logits.transpose(0, 1)  # (b, S, V)
        ce = torch.logsumexp(logits, dim=-1) - logits.gather(-1, labels[rows].unsqueeze(-1)).squeeze(-1)
        mk = mask[rows]
        # Megatron divides by clamp(num_tokens, min=1): an all-masked micro-batch contributes 0.
        denom = mk.sum()
        if float(denom) == 0.0:
            denom = torch.ones((), dtype=dtype)
        lm.append((ce * mk).sum() / denom)
        logits_all.append(logits)
        per_mb.append(moe_out)

    J = sum(lm)
    margins, tokens_per_expert = {}, {}
    aux, z, gaux = {}, {}, {}
    for i in [i for i, v in enumerate(m["moe_pattern"]) if v]:
        E, k = c["num_moe_experts"], c["moe_router_topk"]
        aux[i] = [per_mb[j][i]["aux_loss"] for j in range(n_mb)]
        z[i] = [per_mb[j][i]["z_loss"] for j in range(n_mb)]
        J = J + sum(aux[i]) + sum(z[i])
        tokens_per_expert[i] = sum(per_mb[j][i]["routing_map"].sum(dim=0) for j in range(n_mb)).to(torch.int64)
        for j in range(n_mb):
            for key, val in per_mb[j][i]["margins"].items():
                name = f"layer{i}.{key}"
                margins[name] = min(margins.get(name, math.inf), val)
        if per_mb[0][i].get("global_aux") is not None:
            # Megatron's router: counts summed over the replicas' mi-th micro-batches (the TP x DP x CP
            # reduction), running mean over mi = 0..M-1, T = DP * tokens per micro-batch.
            gaux[i] = [None] * n_mb
            running = torch.zeros(E, dtype=dtype)
            for mi in range(M):
                js = [r * M + mi for r in range(DP)]
                running = running + sum(per_mb[j][i]["global_aux"][2] for j in js)
                mean_counts = running / (mi + 1)
                for j in js:
                    coeff, score_sums, _, T = per_mb[j][i]["global_aux"]
                    T_total = T * DP
                    gaux[i][j] = (score_sums * mean_counts).sum() * (E * coeff / (k * T_total * T_total))
            J = J + sum(gaux[i])
    J = J / n_mb
    return {"J": J, "lm": lm, "logits": torch.cat(logits_all, dim=0), "tokens_per_expert": tokens_per_expert,
            "aux": aux, "z": z, "global_aux": gaux, "margins": margins, "params": p}


def gpt_objective(config, inputs, dtype=None, data_parallel_size=1):
    """J as a float (for finite differences)."""
    with torch.no_grad():
        return float(gpt_forward(config, inputs, dtype, data_parallel_size)["J"])


def gpt_reference(config, inputs, dtype=None, return_margins=False, data_parallel_size=1, return_details=False):
    """Forward + backward of the model over the whole step; see the module docstring. With
    return_margins=True also returns {layer<i>.<decision>: smallest margin over the micro-batches}
    (selection, aux_topk, capacity) to reject inputs whose discrete routing decisions are near-ties.
    return_details=True adds J (1), lm (n_mb) and, per MoE layer i, aux_loss.<i>, z_loss.<i>,
    global_aux_loss.<i> (n_mb each, as they enter J before the 1/n_mb) to the result."""
    dtype = dtype or torch.float64
    fwd = gpt_forward(config, inputs, dtype, data_parallel_size)
    p = fwd["params"]
    names = list(p)
    grads = torch.autograd.grad(fwd["J"], [p[n] for n in names], allow_unused=True)

    def np_(t):
        return t.detach().cpu().numpy()

    lm = torch.stack(fwd["lm"])
    result = {"loss": np.array([float(lm.mean())], dtype=np.float64), "logits": np_(fwd["logits"])}
    for n, g in zip(names, grads):
        result["grad." + n] = np_(g) if g is not None else np.zeros(tuple(p[n].shape))
    for i, cnt in fwd["tokens_per_expert"].items():
        result[f"tokens_per_expert.{i}"] = np_(cnt).astype(np.int64)
    if return_details:
        result["J"] = np.array([float(fwd["J"])])
        result["lm"] = np_(lm.detach()).astype(np.float64)
        for key, src in (("aux_loss", fwd["aux"]), ("z_loss", fwd["z"]), ("global_aux_loss", fwd["global_aux"])):
            for i, vals in src.items():
                result[f"{key}.{i}"] = np.array([float(v) for v in vals])
    if return_margins:
        return result, fwd["margins"]
    return result


# ---------------------------------------------------------------------------------------------
# Seeded inputs
# ---------------------------------------------------------------------------------------------

def _weight_std(fan_in):
    """N(0, std^2) weights: 1.2/sqrt(fan_in) kept in [0.2, 0.5], so every linear layer's output
    is O(1) and router logits spread enough for non-trivial routing."""
    return min(0.5, max(0.2, 1.2 / math.sqrt(fan_in)))


def make_inputs(config, B, seed, mask="ones", data_parallel_size=1):
    """Seeded inputs for moe_gpt_io: tokens/labels (B, S) i64 uniform over the vocabulary,
    parameters in params_dtype (f32 by default; the expert bias always f32): norm weights 1 + 0.2 N,
    norm biases 0.1 N, embeddings 0.5 N, linear weights _weight_std(fan_in) N, expert bias
    U(-0.1, 0.1). mask: 'ones' (no loss_mask tensor), 'holes' (about 30% zeros, at least one 1 per
    micro-batch and different counts across micro-batches), or an array."""
    m, c = normalize_gpt_config(config)
    rng = np.random.default_rng(seed)
    S, V = m["seq_length"], m["vocab_size"]
    pdt = np.float64 if _act_config(m, c).get("params_dtype") == "fp64" else np.float32
    inputs = {
        "tokens": rng.integers(0, V, size=(B, S), dtype=np.int64),
        "labels": rng.integers(0, V, size=(B, S), dtype=np.int64),
    }
    if isinstance(mask, str) and mask == "holes":
        n_mb = m["num_microbatches"] * data_parallel_size
        b = B // n_mb
        while True:
            holes = (rng.random((B, S)) >= 0.3).astype(np.float32)
            sums = [holes[j * b:(j + 1) * b].sum() for j in range(n_mb)]
            if min(sums) >= 1 and (n_mb == 1 or len(set(sums)) > 1) and holes.min() == 0:
                break
        inputs["loss_mask"] = holes
    elif not (isinstance(mask, str) and mask == "ones"):
        inputs["loss_mask"] = np.asarray(mask, dtype=np.float32)
    for name, shape in parameter_shapes(config).items():
        leaf = name.rsplit(".", 1)[-1]
        if name.endswith("router.expert_bias"):
            inputs[name] = rng.uniform(-0.1, 0.1, shape).astype(np.float32)
        elif "layernorm" in name:
            if leaf == "weight":
                inputs[name] = (1.0 + 0.2 * rng.standard_normal(shape)).astype(pdt)
            else:
                inputs[name] = (0.1 * rng.standard_normal(shape)).astype(pdt)
        elif name.startswith("embedding."):
            inputs[name] = (0.5 * rng.standard_normal(shape)).astype(pdt)
        else:
            inputs[name] = (_weight_std(shape[-1]) * rng.standard_normal(shape)).astype(pdt)
    return inputs
