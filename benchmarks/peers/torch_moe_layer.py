#!/usr/bin/python3
"""The PyTorch peer of moe_layer_bench: a Megatron-style MoE layer in eager PyTorch, timed.

    /usr/bin/python3 benchmarks/peers/torch_moe_layer.py --hidden-size 1024 \
        --moe-ffn-hidden-size 2816 --num-moe-experts 8 --moe-router-topk 2 --num-tokens 2048 \
        --iters 5 --warmup 1 --threads 2

What it runs per step (fp32, forward then autograd backward), the way Megatron Core's CPU-capable
path does it:
  router   logits = F.linear(x, W_r); softmax (top-k of the logits, softmax over the k) or sigmoid
           (+ expert bias for the choice only, optional group-limited top-k, probs normalised over
           the k); the switch aux loss (full softmax / normalised sigmoid scores times the counts of
           a plain top-k, coefficient 1e-2), its gradient through autograd with the output's.
  permute  a stable sort of the (token, slot) pairs by expert (expert-major, tokens ascending),
           then index_select of the token rows and of their probs.
  experts  Megatron's SequentialMLP: torch.split by tokens per expert, a Python loop over experts,
           each with its own fc1 (F1, H) and fc2 (H, F) parameter tensors (F.linear), swiglu, the
           probs multiplied in after the activation, torch.cat.
  combine  zeros(T, H).index_add_(0, token_of_row, rows).
  shared   a dense MLP over every token, added.
The gradient of the output is a fixed random tensor (autograd.backward(out, dout)); parameter
gradients are allocated before the first step (zeros) and accumulate, like libmoecore's.

Prints a table, then `sgemm_gflops=... efficiency=... rss_peak_bytes=...` and, as the last line,
`tokens_per_s=<x> gflops=<y> peak_bytes=<z>`. peak_bytes is the resident-set high-water mark
over the steps above the resident set before the first forward (VmHWM after a reset through
/proc/self/clear_refs, malloc_trim first): the same measure moe_layer_bench reports as
rss_peak_bytes. FLOPs are the
layer's GEMM FLOPs, counted exactly as moe_layer_bench counts them.

--bf16 runs the forward under torch.autocast("cpu", dtype=torch.bfloat16) (the GEMMs in bf16 through
oneDNN, parameters and their gradients f32), the mixed precision a PyTorch user gets on the CPU; the
reference rate is then torch's bf16 matmul at the same shape.

--smoke runs one tiny step; without torch it exits 77 (reported as skipped).
"""
import contextlib
import argparse
import os
import statistics
import sys
import time

from peer_proc import blas_in_use, reset_rss_peak, rss_now, rss_peak


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden-size", type=int, default=1024)
    p.add_argument("--moe-ffn-hidden-size", type=int, default=2816)
    p.add_argument("--num-moe-experts", type=int, default=8)
    p.add_argument("--moe-router-topk", type=int, default=2)
    p.add_argument("--moe-router-score-function", choices=["softmax", "sigmoid"], default="softmax")
    p.add_argument("--moe-router-num-groups", type=int, default=None)
    p.add_argument("--moe-router-group-topk", type=int, default=None)
    p.add_argument("--moe-router-enable-expert-bias", action="store_true")
    p.add_argument("--moe-router-bias-update-rate", type=float, default=1e-3)
    p.add_argument("--moe-shared-expert-intermediate-size", type=int, default=None)
    p.add_argument("--moe-aux-loss-coeff", type=float, default=1e-2)
    p.add_argument("--swiglu", action="store_true", help="accepted; swiglu is the default here")
    p.add_argument("--num-tokens", type=int, default=2048)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--bf16", action="store_true", help="forward under torch.autocast(cpu, bfloat16)")
    p.add_argument("--sgemm-reps", type=int, default=0,
                   help="calls of torch's dense SGEMM at the reference shape (0: skip)")
    p.add_argument("--smoke", action="store_true", help="one tiny step; exit 77 without torch")
    a = p.parse_args(argv)
    if a.smoke:
        a.hidden_size, a.moe_ffn_hidden_size, a.num_moe_experts, a.moe_router_topk = 32, 64, 4, 2
        a.num_tokens, a.iters, a.warmup = 64, 1, 0
    if (a.moe_router_num_groups is None) != (a.moe_router_group_topk is None):
        p.error("--moe-router-num-groups and --moe-router-group-topk go together")
    return a


def layer_gemm_flops(a):
    """GEMM FLOPs of one forward + backward: the same count as benchmarks/bench_common.h."""
    H, F, T, k, E = a.hidden_size, a.moe_ffn_hidden_size, a.num_tokens, a.moe_router_topk, a.num_moe_experts
    f = 6.0 * T * k * H * (2 * F + F)
    if a.moe_shared_expert_intermediate_size:
        Fs = a.moe_shared_expert_intermediate_size
        f += 6.0 * T * H * (2 * Fs + Fs)
    return f + 6.0 * T * H * E


def main(argv):
    a = parse_args(argv)
    if a.threads > 0:  # before torch loads OpenBLAS: its pthread pool reads this once
        os.environ["OPENBLAS_NUM_THREADS"] = str(a.threads)
        os.environ["OMP_NUM_THREADS"] = str(a.threads)
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        print("torch_moe_layer: torch is not importable by %s: skipped" % sys.executable)
        return 77 if a.smoke else 2
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    torch.manual_seed(1234)

    H, Fw, E, k, T = a.hidden_size, a.moe_ffn_hidden_size, a.num_moe_experts, a.moe_router_topk, a.num_tokens
    sigmoid = a.moe_router_score_function == "sigmoid"
    std = 0.02

    def param(*shape):
        t = torch.nn.Parameter(torch.randn(*shape) * std)
        t.grad = torch.zeros_like(t)  # allocated up front, like libmoecore's gradients
        return t

    router_w = param(E, H)
    expert_bias = torch.zeros(E) if a.moe_router_enable_expert_bias else None
    fc1 = [param(2 * Fw, H) for _ in range(E)]  # one tensor per expert, rows [gate | up]
    fc2 = [param(H, Fw) for _ in range(E)]
    Fs = a.moe_shared_expert_intermediate_size
    shared_fc1 = param(2 * Fs, H) if Fs else None
    shared_fc2 = param(H, Fs) if Fs else None
    x = torch.randn(T, H).requires_grad_(True)
    dout = torch.randn(T, H) * 1e-2
    local_counts = torch.zeros(E)

    def swiglu(h):
        g, u = h.chunk(2, dim=-1)
        return F.silu(g) * u

    def router(x):
        logits = F.linear(x, router_w)  # (T, E)
        if sigmoid:
            scores = torch.sigmoid(logits)
            sel = scores + expert_bias if expert_bias is not None else scores
            if a.moe_router_num_groups:
                G, g = a.moe_router_num_groups, a.moe_router_group_topk
                gscores = sel.view(T, G, E // G).topk(k // g, dim=-1).values.sum(-1)  # (T, G)
                gidx = gscores.topk(g, dim=-1).indices
                gmask = torch.zeros(T, G, dtype=torch.bool).scatter_(1, gidx, True)
                smask = gmask.unsqueeze(-1).expand(T, G, E // G).reshape(T, E)
                sel = sel.masked_fill(~smask, float("-inf"))
            idx = sel.topk(k, dim=-1).indices  # (T, k)
            top = scores.gather(1, idx)
            probs = top / (top.sum(-1, keepdim=True) + 1e-20) if k > 1 else top
            aux_scores = scores / (scores.sum(-1, keepdim=True) + 1e-20)
        else:
            top, idx = logits.topk(k, dim=-1)
            probs = torch.softmax(top, dim=-1)
            aux_scores = torch.softmax(logits, dim=-1)
        # switch aux loss: counts of a plain top-k over the aux scores
        aux_idx = aux_scores.topk(k, dim=-1).indices
        counts = torch.bincount(aux_idx.flatten(), minlength=E).to(aux_scores.dtype)
        aux = (aux_scores.sum(0) * counts).sum() * (E * a.moe_aux_loss_coeff / (k * T * T))
        return probs, idx, aux

    def layer(x):
        probs, idx, aux = router(x)
        # permute: stable expert-major sort of the (token, slot) pairs, then index_select
        flat_e = idx.flatten()  # (T·k) expert of pair t·k + j
        order = torch.sort(flat_e, stable=True).indices
        token_of_row = order // k
        rows = x.index_select(0, token_of_row)  # (N, H)
        row_probs = probs.flatten().index_select(0, order)  # (N)
        tokens_per_expert = torch.bincount(flat_e, minlength=E)
        if expert_bias is not None:
            local_counts.add_(tokens_per_expert.to(local_counts.dtype))
        splits = tokens_per_expert.tolist()
        # experts: SequentialMLP, one parameter tensor per expert
        outs = []
        for e, (xe, pe) in enumerate(zip(torch.split(rows, splits), torch.split(row_probs, splits))):
            h = F.linear(xe, fc1[e])
            ae = swiglu(h) * pe.unsqueeze(-1)
            outs.append(F.linear(ae, fc2[e]))
        y = torch.cat(outs, dim=0)  # (N, H)
        # combine: index_add back to the tokens
        out = torch.zeros(T, H, dtype=y.dtype).index_add_(0, token_of_row, y)
        if Fs:
            out = out + F.linear(swiglu(F.linear(x, shared_fc1)), shared_fc2)
        return out, aux

    def finish_step():
        if expert_bias is not None:
            expert_bias.add_(a.moe_router_bias_update_rate * torch.sign(local_counts.mean() - local_counts))
            local_counts.zero_()

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16) if a.bf16 else contextlib.nullcontext()

    x.grad = torch.zeros_like(x)
    try:  # free heap pages left by the setup go back to the OS, so the growth counts every page
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    rss_reset = reset_rss_peak()
    rss_base = rss_now()
    t_fwd, t_bwd, t_step = [], [], []
    aux_value = 0.0
    for it in range(a.warmup + a.iters):
        t0 = time.perf_counter()
        with autocast():
            out, aux = layer(x)
        t1 = time.perf_counter()
        torch.autograd.backward([out, aux], [dout, torch.ones(())])
        t2 = time.perf_counter()
        finish_step()
        aux_value = float(aux)
        del out, aux
        if it < a.warmup:
            continue
        t_fwd.append(t1 - t0)
        t_bwd.append(t2 - t1)
        t_step.append(t2 - t0)
    peak = rss_peak() - rss_base if rss_reset else -1

    step = statistics.median(t_step)
    flops = layer_gemm_flops(a)
    tokens_per_s = T / step
    gflops = flops / step * 1e-9
    ref = 0.0
    if a.sgemm_reps > 0:  # torch's own dense SGEMM at the reference shape of bench_common.h
        A = torch.randn(T * k, H)
        B = torch.randn(3 * Fw, H)
        ts = []
        for r in range(a.sgemm_reps + 1):
            s0 = time.perf_counter()
            with autocast():
                F.linear(A, B)
            if r:
                ts.append(time.perf_counter() - s0)
        ref = 2.0 * T * k * H * 3 * Fw / statistics.median(ts) * 1e-9

    print("torch_moe_layer  torch %s; threads %d (interop %d); BLAS: %s" % (
        torch.__version__, torch.get_num_threads(), torch.get_num_interop_threads(),
        ", ".join(blas_in_use()) or "?"))
    print("precision: %s" % ("bf16 (autocast)" if a.bf16 else "fp32"))
    print("config: H=%d F=%d E=%d k=%d score=%s%s%s%s act=glu-silu aux=%g T=%d" % (
        H, Fw, E, k, a.moe_router_score_function, "+bias" if expert_bias is not None else "",
        " groups=%d/%d" % (a.moe_router_num_groups, a.moe_router_group_topk) if a.moe_router_num_groups else "",
        " shared=%d" % Fs if Fs else "", a.moe_aux_loss_coeff, T))
    print("%-28s %14s" % ("metric", "value"))
    print("%-28s %14d" % ("measured steps", a.iters))
    print("%-28s %14.2f" % ("forward ms (median)", statistics.median(t_fwd) * 1e3))
    print("%-28s %14.2f" % ("backward ms (median)", statistics.median(t_bwd) * 1e3))
    print("%-28s %14.2f" % ("step ms (median)", step * 1e3))
    print("%-28s %14.1f" % ("tokens/s", tokens_per_s))
    print("%-28s %14.3f" % ("GEMM GFLOP per step", flops * 1e-9))
    print("%-28s %14.2f" % ("GFLOP/s", gflops))
    if ref > 0:
        print("%-28s %14.2f" % ("torch dense SGEMM GFLOP/s", ref))
    print("%-28s %14.1f MiB" % ("max RSS growth", peak / 2**20))
    print("%-28s %14.6f" % ("aux loss (last step)", aux_value))
    print("sgemm_gflops=%.3f efficiency=%.4f rss_peak_bytes=%d" % (ref, gflops / ref if ref > 0 else 0.0, peak))
    print("tokens_per_s=%.2f gflops=%.3f peak_bytes=%d" % (tokens_per_s, gflops, peak))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
