#!/usr/bin/python3
"""The PyTorch peer of moe_gpt_bench: a Megatron-style MoE GPT model in eager PyTorch, timed.

    /usr/bin/python3 benchmarks/peers/torch_moe_gpt.py --preset mixtral-cpu --threads 2
    /usr/bin/python3 benchmarks/peers/torch_moe_gpt.py --num-layers 2 --hidden-size 1024 \
        --num-attention-heads 8 --group-query-attention --num-query-groups 2 \
        --moe-ffn-hidden-size 2816 --num-moe-experts 8 --moe-router-topk 2 --vocab-size 16384 \
        --seq-length 1024 --micro-batch-size 1 --normalization RMSNorm --position-embedding-type rope \
        --untie-embeddings-and-output-weights --swiglu --iters 3 --warmup 1 --threads 2

The same model as libmoecore's MoEGPTModel (Megatron Core's GPTModel with the local spec), the same
flags and presets as moe_gpt_bench, in plain modules, fp32, forward then autograd backward of
lm loss + the router aux losses, activations [s, b, h] as in Megatron:
  embedding  nn.Embedding (+ learned positions when --position-embedding-type learned_absolute)
  norms      RMSNorm written out (x·rsqrt(mean(x²) + eps)·w) or nn.LayerNorm
  attention  linear_qkv (nn.Linear, rows grouped per query group [q × r | k | v] as Megatron's),
             optional q/k norm over hd, rotary embedding on the first rd dims (rotate-half, Megatron's
             non-interleaved form), then Megatron's local DotProductAttention: keys and values
             repeat_interleave'd to the query heads, scores by baddbmm (scale 1/sqrt(hd)), the causal
             mask filled, softmax, bmm with the values — or F.scaled_dot_product_attention(is_causal)
             where the installed torch has it (not Debian's 1.13) — then linear_proj.
  MLP        MoE layers as torch_moe_layer.py (router softmax / sigmoid + expert bias + group-limited
             top-k, switch aux loss; permute by a stable sort + index_select; Megatron's SequentialMLP
             loop over per-expert fc1/fc2 with swiglu and probs; index_add_ combine; shared expert);
             dense layers (--moe-layer-freq 0 entries) a swiglu MLP of --ffn-hidden-size.
  head       final norm, output layer (nn.Linear, or the word embedding when tied), F.cross_entropy
             (mean over the b·S tokens = Megatron's Σ mask·ce / Σ mask with every token in the loss).
Parameter gradients are allocated before the first step (zeros) and accumulate, like libmoecore's.

Prints a table, then `sgemm_gflops=... efficiency=... rss_peak_bytes=...` and, as the last line,
`tokens_per_s=<x> gflops=<y> peak_bytes=<z>` (peak_bytes = the resident-set high-water mark growth
over the steps, as torch_moe_layer.py measures it; gflops = the model's FLOPs counted as Megatron-LM
counts them, exactly as moe_gpt_bench counts them, per second).

--smoke runs one tiny step; without torch it exits 77 (reported as skipped).
"""
import argparse
import contextlib
import math
import os
import statistics
import sys
import time

from peer_proc import blas_in_use, cpu_model, reset_rss_peak, rss_now, rss_peak


PRESETS = {
    # Mixtral-like: GQA 8 heads / 2 groups (hd 128), 8 experts top-2 in every layer.
    "mixtral-cpu": dict(num_layers=2, hidden_size=1024, num_attention_heads=8, num_query_groups=2,
                        kv_channels=None, qk_layernorm=False, ffn_hidden_size=2816, moe_layer_freq="1",
                        moe_ffn_hidden_size=2816, num_moe_experts=8, moe_router_topk=2,
                        moe_router_score_function="softmax", moe_router_enable_expert_bias=False,
                        moe_router_num_groups=None, moe_router_group_topk=None,
                        moe_shared_expert_intermediate_size=None, vocab_size=16384, seq_length=1024,
                        micro_batch_size=1, rotary_base=1e6),
    # DeepSeek-like: a dense first layer, then fine-grained MoE (64 experts top-6, sigmoid + bias,
    # 8 groups / top-3, shared expert); 16 heads of 64 with q/k norm.
    "deepseek-cpu": dict(num_layers=3, hidden_size=1024, num_attention_heads=16, num_query_groups=None,
                         kv_channels=64, qk_layernorm=True, ffn_hidden_size=2816, moe_layer_freq="0,1,1",
                         moe_ffn_hidden_size=512, num_moe_experts=64, moe_router_topk=6,
                         moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
                         moe_router_num_groups=8, moe_router_group_topk=3,
                         moe_shared_expert_intermediate_size=1024, vocab_size=16384, seq_length=512,
                         micro_batch_size=2, rotary_base=10000.0),
    # --smoke: a dense layer and an MoE layer, GQA, rope, q/k norm (moe_gpt_bench's smoke model).
    "smoke": dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, kv_channels=None,
                  qk_layernorm=True, ffn_hidden_size=128, moe_layer_freq="0,1", moe_ffn_hidden_size=64,
                  num_moe_experts=4, moe_router_topk=2, moe_router_score_function="softmax",
                  moe_router_enable_expert_bias=False, moe_router_num_groups=None, moe_router_group_topk=None,
                  moe_shared_expert_intermediate_size=None, vocab_size=256, seq_length=32, micro_batch_size=2,
                  rotary_base=10000.0),
}
COMMON = dict(normalization="RMSNorm", layernorm_epsilon=1e-5, position_embedding_type="rope", rotary_percent=1.0,
              untie_embeddings_and_output_weights=True, moe_aux_loss_coeff=1e-2, moe_router_bias_update_rate=1e-3,
              init_method_std=0.02)


def str2bool(v):
    t = str(v).strip().lower()
    if t in ("true", "1", "yes"):
        return True
    if t in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError("expected a boolean (true/false), got %r" % v)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    S = argparse.SUPPRESS  # flags not given stay out of the namespace: the preset decides
    p.add_argument("--preset", choices=["mixtral-cpu", "deepseek-cpu"], default=None)
    for name, typ in [("num-layers", int), ("hidden-size", int), ("num-attention-heads", int),
                      ("num-query-groups", int), ("kv-channels", int), ("ffn-hidden-size", int),
                      ("moe-ffn-hidden-size", int), ("num-moe-experts", int), ("moe-router-topk", int),
                      ("moe-router-num-groups", int), ("moe-router-group-topk", int),
                      ("moe-shared-expert-intermediate-size", int), ("vocab-size", int), ("seq-length", int),
                      ("micro-batch-size", int), ("rotary-base", float), ("rotary-percent", float),
                      ("layernorm-epsilon", float), ("moe-aux-loss-coeff", float),
                      ("moe-router-bias-update-rate", float), ("init-method-std", float),
                      ("moe-layer-freq", str)]:
        p.add_argument("--" + name, type=typ, default=S)
    p.add_argument("--normalization", choices=["RMSNorm", "LayerNorm"], default=S)
    p.add_argument("--position-embedding-type", choices=["rope", "learned_absolute"], default=S)
    p.add_argument("--moe-router-score-function", choices=["softmax", "sigmoid"], default=S)
    for name in ["qk-layernorm", "untie-embeddings-and-output-weights", "moe-router-enable-expert-bias"]:
        p.add_argument("--" + name, type=str2bool, nargs="?", const=True, default=S)
    p.add_argument("--swiglu", action="store_true", help="accepted; swiglu is the default here")
    p.add_argument("--group-query-attention", action="store_true", help="accepted; --num-query-groups decides")
    p.add_argument("--disable-bias-linear", action="store_true", help="accepted; there are no linear biases")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--sgemm-reps", type=int, default=0,
                   help="calls of torch's dense SGEMM at moe_gpt_bench's reference shape (0: skip)")
    p.add_argument("--bf16", action="store_true", help="forward under torch.autocast(cpu, bfloat16)")
    p.add_argument("--smoke", action="store_true", help="one tiny step; exit 77 without torch")
    a = p.parse_args(argv)
    cfg = dict(COMMON)
    cfg.update(PRESETS[a.preset or ("smoke" if a.smoke else "mixtral-cpu")])
    for k, v in vars(a).items():
        if k in cfg or k in ("micro_batch_size",):
            cfg[k] = v
    if a.smoke:
        a.iters, a.warmup = 1, 0
    c = argparse.Namespace(**cfg)
    c.preset = a.preset or ("smoke" if a.smoke else "custom")  # "custom": the mixtral-cpu values, then the flags
    for k in ("iters", "warmup", "threads", "sgemm_reps", "smoke", "bf16"):
        setattr(c, k, getattr(a, k))
    # Derived values, as libmoecore's config derives them.
    c.num_query_groups = c.num_query_groups or c.num_attention_heads
    c.kv_channels = c.kv_channels or c.hidden_size // c.num_attention_heads
    c.moe_ffn_hidden_size = c.moe_ffn_hidden_size or c.ffn_hidden_size
    f = [int(x) for x in str(c.moe_layer_freq).strip("[]() ").split(",") if x.strip()]
    if len(f) == c.num_layers and c.num_layers > 1:
        c.moe_pattern = [x != 0 for x in f]
    elif len(f) == 1:
        c.moe_pattern = [(i % f[0] == 0) if f[0] >= 1 else bool(f[0]) for i in range(c.num_layers)]
    else:
        p.error("--moe-layer-freq: one integer N or num_layers comma-separated 0/1 entries, got %r" % c.moe_layer_freq)
    if (c.moe_router_num_groups is None) != (c.moe_router_group_topk is None):
        p.error("--moe-router-num-groups and --moe-router-group-topk go together")
    if c.num_attention_heads % c.num_query_groups:
        p.error("--num-attention-heads must be a multiple of --num-query-groups")
    return c


def model_flops(c):
    """The model's FLOPs per step, Megatron-LM's num_floating_point_operations (transformer_flops):
    the same count as bench::model_flops in benchmarks/bench_common.h."""
    H, S, b, L = c.hidden_size, c.seq_length, c.micro_batch_size, c.num_layers
    T = b * S
    q, kv = c.kv_channels * c.num_attention_heads, c.kv_channels * c.num_query_groups
    moe_layers = sum(c.moe_pattern)
    f = 3.0  # swiglu
    Fs = c.moe_shared_expert_intermediate_size or 0
    mlp = T * 6.0 * H * (c.ffn_hidden_size * f * (L - moe_layers)
                         + (c.moe_router_topk * c.moe_ffn_hidden_size * f + Fs * f) * moe_layers)
    attn = T * 6.0 * (H * (q + 2 * kv) + q * H) * L
    core = b * S * S * 6.0 * q * L
    logits = T * 6.0 * H * c.vocab_size
    return mlp + attn + core + logits


def build(c, torch):
    """The model's modules (closures over torch)."""
    nn, F = torch.nn, torch.nn.functional
    H, nh, ng, hd = c.hidden_size, c.num_attention_heads, c.num_query_groups, c.kv_channels
    r = nh // ng
    std = c.init_method_std

    def init_(m, s=std):
        for p in m.parameters():
            nn.init.normal_(p, 0.0, s)
        return m

    class RMSNorm(nn.Module):
        def __init__(self, d, eps):
            super().__init__()
            self.eps = eps
            self.weight = nn.Parameter(torch.ones(d))

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight

    def norm(d):
        if c.normalization == "RMSNorm":
            return RMSNorm(d, c.layernorm_epsilon)
        return nn.LayerNorm(d, eps=c.layernorm_epsilon)

    rd = int(hd * c.rotary_percent) if c.position_embedding_type == "rope" else 0
    if rd:
        inv_freq = 1.0 / (c.rotary_base ** (torch.arange(0, rd, 2, dtype=torch.float64) / rd))
        ang = torch.outer(torch.arange(c.seq_length, dtype=torch.float64), inv_freq)  # (S, rd/2)
        ang = torch.cat([ang, ang], dim=-1).float()[:, None, None, :]  # (S, 1, 1, rd)
        rope_cos, rope_sin = ang.cos(), ang.sin()

    def rope(t):  # t (S, b, heads, hd): Megatron's _apply_rotary_pos_emb_bshd, non-interleaved
        t_rot, t_pass = t[..., :rd], t[..., rd:]
        x1, x2 = t_rot.chunk(2, dim=-1)
        t_rot = t_rot * rope_cos + torch.cat([-x2, x1], dim=-1) * rope_sin
        return torch.cat([t_rot, t_pass], dim=-1) if t_pass.shape[-1] else t_rot

    has_sdpa = hasattr(F, "scaled_dot_product_attention")
    S = c.seq_length
    causal = torch.triu(torch.ones(S, S, dtype=torch.bool), diagonal=1)  # True: masked

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear_qkv = init_(nn.Linear(H, (nh + 2 * ng) * hd, bias=False))
            self.linear_proj = init_(nn.Linear(nh * hd, H, bias=False), std / math.sqrt(2.0 * c.num_layers))
            self.q_norm = norm(hd) if c.qk_layernorm else None
            self.k_norm = norm(hd) if c.qk_layernorm else None

        def forward(self, x):  # x (S, b, H)
            s, b, _ = x.shape
            qkv = self.linear_qkv(x).view(s, b, ng, (r + 2) * hd)
            q, k, v = torch.split(qkv, [r * hd, hd, hd], dim=-1)
            q = q.reshape(s, b, nh, hd)
            if self.q_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            if rd:
                q, k = rope(q), rope(k)
            if has_sdpa:
                qb, kb, vb = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # (b, heads, s, hd)
                if r > 1:
                    kb, vb = kb.repeat_interleave(r, dim=1), vb.repeat_interleave(r, dim=1)
                o = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True)  # (b, nh, s, hd)
                o = o.permute(2, 0, 1, 3).reshape(s, b, nh * hd)
            else:  # Megatron's local DotProductAttention
                if r > 1:
                    k, v = k.repeat_interleave(r, dim=2), v.repeat_interleave(r, dim=2)
                qb = q.reshape(s, b * nh, hd).transpose(0, 1)  # (b·nh, s, hd)
                kb = k.reshape(s, b * nh, hd).transpose(0, 1)
                vb = v.reshape(s, b * nh, hd).transpose(0, 1)
                scores = torch.baddbmm(torch.empty(b * nh, s, s), qb, kb.transpose(1, 2), beta=0.0,
                                       alpha=1.0 / math.sqrt(hd))
                probs = torch.softmax(scores.masked_fill(causal, float("-inf")), dim=-1)
                o = torch.bmm(probs, vb)  # (b·nh, s, hd)
                o = o.view(b, nh, s, hd).permute(2, 0, 1, 3).reshape(s, b, nh * hd)
            return self.linear_proj(o)

    def swiglu(h):
        g, u = h.chunk(2, dim=-1)
        return F.silu(g) * u

    class MLP(nn.Module):
        def __init__(self, width):
            super().__init__()
            self.fc1 = init_(nn.Linear(H, 2 * width, bias=False))
            self.fc2 = init_(nn.Linear(width, H, bias=False), std / math.sqrt(2.0 * c.num_layers))

        def forward(self, x):
            return self.fc2(swiglu(self.fc1(x)))

    E, k = c.num_moe_experts, c.moe_router_topk
    sigmoid = c.moe_router_score_function == "sigmoid"

    class MoE(nn.Module):
        """torch_moe_layer.py's layer: router, permute, SequentialMLP, combine, shared expert."""

        def __init__(self):
            super().__init__()
            self.router = nn.Parameter(torch.randn(E, H) * std)
            self.register_buffer("expert_bias", torch.zeros(E) if c.moe_router_enable_expert_bias else None)
            self.local_counts = torch.zeros(E)
            Fw = c.moe_ffn_hidden_size
            self.fc1 = nn.ParameterList([nn.Parameter(torch.randn(2 * Fw, H) * std) for _ in range(E)])
            self.fc2 = nn.ParameterList([nn.Parameter(torch.randn(H, Fw) * std / math.sqrt(2.0 * c.num_layers))
                                         for _ in range(E)])
            Fs = c.moe_shared_expert_intermediate_size
            self.shared = MLP(Fs) if Fs else None

        def route(self, x):
            T = x.shape[0]
            logits = F.linear(x, self.router)  # (T, E)
            if sigmoid:
                scores = torch.sigmoid(logits)
                sel = scores + self.expert_bias if self.expert_bias is not None else scores
                if c.moe_router_num_groups:
                    G, g = c.moe_router_num_groups, c.moe_router_group_topk
                    gscores = sel.view(T, G, E // G).topk(k // g, dim=-1).values.sum(-1)  # (T, G)
                    gidx = gscores.topk(g, dim=-1).indices
                    gmask = torch.zeros(T, G, dtype=torch.bool).scatter_(1, gidx, True)
                    smask = gmask.unsqueeze(-1).expand(T, G, E // G).reshape(T, E)
                    sel = sel.masked_fill(~smask, float("-inf"))
                idx = sel.topk(k, dim=-1).indices
                top = scores.gather(1, idx)
                probs = top / (top.sum(-1, keepdim=True) + 1e-20) if k > 1 else top
                aux_scores = scores / (scores.sum(-1, keepdim=True) + 1e-20)
            else:
                top, idx = logits.topk(k, dim=-1)
                probs = torch.softmax(top, dim=-1)
                aux_scores = torch.softmax(logits, dim=-1)
            aux_idx = aux_scores.topk(k, dim=-1).indices
            counts = torch.bincount(aux_idx.flatten(), minlength=E).to(aux_scores.dtype)
            aux = (aux_scores.sum(0) * counts).sum() * (E * c.moe_aux_loss_coeff / (k * T * T))
            return probs, idx, aux

        def forward(self, x3):  # x3 (S, b, H): tokens t = s·b + bi
            x = x3.reshape(-1, H)
            T = x.shape[0]
            probs, idx, aux = self.route(x)
            flat_e = idx.flatten()
            order = torch.sort(flat_e, stable=True).indices
            token_of_row = order // k
            rows = x.index_select(0, token_of_row)
            row_probs = probs.flatten().index_select(0, order)
            tokens_per_expert = torch.bincount(flat_e, minlength=E)
            if self.expert_bias is not None:
                self.local_counts.add_(tokens_per_expert.to(self.local_counts.dtype))
            splits = tokens_per_expert.tolist()
            outs = []
            for e, (xe, pe) in enumerate(zip(torch.split(rows, splits), torch.split(row_probs, splits))):
                h = F.linear(xe, self.fc1[e])
                outs.append(F.linear(swiglu(h) * pe.unsqueeze(-1), self.fc2[e]))
            y = torch.cat(outs, dim=0)
            out = torch.zeros(T, H, dtype=y.dtype).index_add_(0, token_of_row, y)
            if self.shared is not None:
                out = out + self.shared(x)
            return out.view_as(x3), aux

        def finish_step(self):
            if self.expert_bias is not None:
                self.expert_bias.add_(c.moe_router_bias_update_rate * torch.sign(self.local_counts.mean() - self.local_counts))
                self.local_counts.zero_()

    class Layer(nn.Module):
        def __init__(self, moe):
            super().__init__()
            self.input_layernorm = norm(H)
            self.self_attention = Attention()
            self.pre_mlp_layernorm = norm(H)
            self.mlp = MoE() if moe else MLP(c.ffn_hidden_size)
            self.is_moe = moe

        def forward(self, h):
            h = h + self.self_attention(self.input_layernorm(h))
            if self.is_moe:
                m, aux = self.mlp(self.pre_mlp_layernorm(h))
            else:
                m, aux = self.mlp(self.pre_mlp_layernorm(h)), None
            return h + m, aux

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.word_embeddings = init_(nn.Embedding(c.vocab_size, H))
            self.position_embeddings = (init_(nn.Embedding(c.seq_length, H))
                                        if c.position_embedding_type == "learned_absolute" else None)
            self.layers = nn.ModuleList([Layer(m) for m in c.moe_pattern])
            self.final_layernorm = norm(H)
            self.output_layer = (init_(nn.Linear(H, c.vocab_size, bias=False))
                                 if c.untie_embeddings_and_output_weights else None)

        def forward(self, tokens, labels):  # (b, S) each
            h = self.word_embeddings(tokens.t())  # (S, b, H)
            if self.position_embeddings is not None:
                h = h + self.position_embeddings.weight[: tokens.shape[1]].unsqueeze(1)
            auxes = []
            for layer in self.layers:
                h, aux = layer(h)
                if aux is not None:
                    auxes.append(aux)
            h = self.final_layernorm(h)
            w = self.output_layer.weight if self.output_layer is not None else self.word_embeddings.weight
            logits = F.linear(h, w)  # (S, b, V)
            lm = F.cross_entropy(logits.view(-1, c.vocab_size), labels.t().reshape(-1))
            return lm, auxes

        def finish_step(self):
            for layer in self.layers:
                if layer.is_moe:
                    layer.mlp.finish_step()

    return GPT(), has_sdpa


def main(argv):
    c = parse_args(argv)
    if c.threads > 0:  # before torch loads OpenBLAS: its pthread pool reads this once
        os.environ["OPENBLAS_NUM_THREADS"] = str(c.threads)
        os.environ["OMP_NUM_THREADS"] = str(c.threads)
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        print("torch_moe_gpt: torch is not importable by %s: skipped" % sys.executable)
        return 77 if c.smoke else 2
    if c.threads > 0:
        torch.set_num_threads(c.threads)
    torch.manual_seed(1234)

    model, has_sdpa = build(c, torch)
    n_params = 0
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # allocated up front, like libmoecore's gradients
        n_params += p.numel()
    b, S, V = c.micro_batch_size, c.seq_length, c.vocab_size
    T = b * S
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, V, (b, S), generator=gen)
    labels = torch.randint(0, V, (b, S), generator=gen)

    try:  # free heap pages left by the setup go back to the OS, so the growth counts every page
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    def autocast():  # --bf16: the GEMMs in bf16 (oneDNN), parameters and gradients f32
        return torch.autocast("cpu", dtype=torch.bfloat16) if c.bf16 else contextlib.nullcontext()

    rss_reset = reset_rss_peak()
    rss_base = rss_now()
    t_fwd, t_bwd, t_step = [], [], []
    loss_first = loss_last = aux_value = 0.0
    for it in range(c.warmup + c.iters):
        t0 = time.perf_counter()
        with autocast():
            lm, auxes = model(tokens, labels)
            total = lm + sum(auxes) if auxes else lm
        t1 = time.perf_counter()
        total.backward()
        t2 = time.perf_counter()
        model.finish_step()
        if it == 0:
            loss_first = float(lm)
        loss_last, aux_value = float(lm), float(sum(auxes)) if auxes else 0.0
        del lm, auxes, total
        if it < c.warmup:
            continue
        t_fwd.append(t1 - t0)
        t_bwd.append(t2 - t1)
        t_step.append(t2 - t0)
    peak = rss_peak() - rss_base if rss_reset else -1

    step = statistics.median(t_step)
    flops = model_flops(c)
    tokens_per_s = T / step
    gflops = flops / step * 1e-9
    ref = 0.0
    if c.sgemm_reps > 0:  # torch's own dense SGEMM at moe_gpt_bench's reference shape (the MoE layer's)
        A = torch.randn(T * c.moe_router_topk, c.hidden_size)
        B = torch.randn(3 * c.moe_ffn_hidden_size, c.hidden_size)
        ts = []
        for rep in range(c.sgemm_reps + 1):
            s0 = time.perf_counter()
            with autocast():
                F.linear(A, B)
            if rep:
                ts.append(time.perf_counter() - s0)
        ref = 2.0 * A.shape[0] * B.shape[0] * c.hidden_size / statistics.median(ts) * 1e-9

    moe_layers = sum(c.moe_pattern)
    print("torch_moe_gpt  torch %s; threads %d (interop %d); attention: %s; BLAS: %s" % (
        torch.__version__, torch.get_num_threads(), torch.get_num_interop_threads(),
        "scaled_dot_product_attention" if has_sdpa else "explicit softmax (baddbmm, bmm)",
        ", ".join(blas_in_use()) or "?"))
    print("cpu: %s" % cpu_model())
    print("precision: %s" % ("bf16 (autocast)" if c.bf16 else "fp32"))
    print("config: %s L=%d (MoE %d) H=%d heads=%d groups=%d hd=%d%s %s %s%s V=%d %s S=%d b=%d" % (
        c.preset, c.num_layers, moe_layers, c.hidden_size, c.num_attention_heads, c.num_query_groups,
        c.kv_channels, " qk-norm" if c.qk_layernorm else "", c.normalization, c.position_embedding_type,
        " ffn=%d" % c.ffn_hidden_size if moe_layers < c.num_layers else "", V,
        "untied" if c.untie_embeddings_and_output_weights else "tied", S, b))
    print("moe: F=%d E=%d k=%d score=%s%s%s%s act=glu-silu aux=%g" % (
        c.moe_ffn_hidden_size, c.num_moe_experts, c.moe_router_topk, c.moe_router_score_function,
        "+bias" if c.moe_router_enable_expert_bias else "",
        " groups=%d/%d" % (c.moe_router_num_groups, c.moe_router_group_topk) if c.moe_router_num_groups else "",
        " shared=%d" % c.moe_shared_expert_intermediate_size if c.moe_shared_expert_intermediate_size else "",
        c.moe_aux_loss_coeff))
    print("%-28s %14s" % ("metric", "value"))
    print("%-28s %14.1f" % ("parameters (M)", n_params * 1e-6))
    print("%-28s %14d" % ("measured steps", c.iters))
    print("%-28s %14.2f" % ("forward ms (median)", statistics.median(t_fwd) * 1e3))
    print("%-28s %14.2f" % ("backward ms (median)", statistics.median(t_bwd) * 1e3))
    print("%-28s %14.2f" % ("step ms (median)", step * 1e3))
    print("%-28s %14s" % ("step ms (each)", " ".join("%d" % round(t * 1e3) for t in t_step)))
    print("%-28s %14.1f" % ("tokens/s", tokens_per_s))
    print("%-28s %14.3f" % ("model GFLOP per step", flops * 1e-9))
    print("%-28s %14.2f" % ("GFLOP/s", gflops))
    if ref > 0:
        print("%-28s %14.2f" % ("torch dense SGEMM GFLOP/s", ref))
    print("%-28s %14.1f MiB" % ("max RSS growth", peak / 2**20))
    print("%-28s %14.6f" % ("lm loss (first step)", loss_first))
    print("%-28s %14.6f" % ("lm loss (last step)", loss_last))
    print("%-28s %14.6f" % ("aux loss (last, sum layers)", aux_value))
    print("sgemm_gflops=%.3f efficiency=%.4f rss_peak_bytes=%d" % (ref, gflops / ref if ref > 0 else 0.0, peak))
    print("tokens_per_s=%.2f gflops=%.3f peak_bytes=%d" % (tokens_per_s, gflops, peak))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
