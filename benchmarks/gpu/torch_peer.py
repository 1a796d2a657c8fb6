#!/usr/bin/env python3
"""The PyTorch peer of gpu_bench: the same measurements in eager PyTorch on the same GPU, bf16.

    python3 benchmarks/gpu/torch_peer.py --json peer.jsonl          # on the GPU machine
    /usr/bin/python3 benchmarks/gpu/torch_peer.py --device cpu --quick   # smoke test anywhere

What it times (names are the row keys gpu_bench writes too; merge_table.py joins on them):
  copy        dst.copy_(src), 512 MiB bf16.
  dense       torch.mm 8192^3 bf16 (A @ B^T).
  permute     Megatron Core's unfused permute: the token rows and their probs gathered with
              index_select in expert-major order (tokens ascending within an expert, the order a
              stable sort by expert gives); the index is built once, outside the timing, as
              gpu_bench builds its row_id_map outside.
  unpermute   Megatron's unfused unpermute: zeros(T, H) then index_add_ of the rows.
  grouped.<mode>.<layer>.<fc1|fc2>
              fwd / dgrad / wgrad of the expert GEMMs with the same uneven rows per expert:
              'sequential' = a Python loop of one torch.mm per expert (SequentialMLP's GEMMs),
              'grouped_mm' = one torch._grouped_mm (2D x 3D with offsets; 2D x 2D for wgrad), and
              the equal-FLOP dense torch.mm for the peer's own fraction.
  layer.<mixtral|deepseek>
              the MoE layer forward + autograd backward, written the way Megatron Core runs it:
              router (fp32 logits; softmax top-k, or sigmoid + expert bias + group-limited top-k
              with probs normalised over the k; the switch aux loss / seq aux loss through
              autograd), permute as above, experts, probs multiplied after the activation,
              unpermute by index_add_, the shared expert added. Experts either as
              'sequential' = SequentialMLP (torch.split by tokens per expert, a Python loop over
              per-expert weight tensors with F.linear, torch.cat) or 'grouped_mm' = the same layer
              with stacked weights and torch._grouped_mm. Parameter grads are set to None before
              each step (the peer's best case: no accumulation kernels).
Timing: CUDA events around each sample after warm-up, the median of the samples (host clock on
--device cpu). torch._grouped_mm is looked up with hasattr and each use is guarded: where it is
missing or fails, the record carries the error and the table shows n/a.

--json PATH writes one JSON object per line. Exit 77 when torch (or, for --device cuda, a GPU)
is missing.
"""
import argparse
import json
import math
import statistics
import sys
import time


# ---- shapes: the same as gpu_bench.cpp (keep the two in step) ---------------------------------------
def layer_shapes(quick):
    mix = dict(name="mixtral", T=4096, H=4096, F=14336, E=8, k=2, sigmoid=False, num_groups=0, group_topk=0,
               shared_F=0, balancing="aux_loss", aux_coeff=1e-2)
    ds = dict(name="deepseek", T=4096, H=7168, F=2048, E=32, k=8, sigmoid=True, num_groups=8, group_topk=4,
              shared_F=2048, balancing="seq_aux_loss", aux_coeff=1e-4)
    if quick:
        mix.update(T=64, H=64, F=128)
        ds.update(T=64, H=64, F=32, shared_F=32)
    return [mix, ds]


def expert_rows(n_rows, E):
    """Uneven rows per expert summing to n_rows: weights 1 +- 0.25 by a sine (as gpu_bench.cpp)."""
    w = [1.0 + 0.25 * math.sin(1.7 * e + 0.3) for e in range(E)]
    s = 0.0
    for x in w:
        s += x
    rows = [int(math.floor(n_rows * x / s)) for x in w]
    rows[0] += n_rows - sum(rows)
    return rows


def token_experts(t, E, k):
    """The k distinct experts of token t for the permute benchmark (as gpu_bench.cpp)."""
    h = (t * 2654435761) & 0xFFFFFFFF
    start = h % E
    step = 2 * ((h >> 8) % (E // 2)) + 1
    return [(start + j * step) % E for j in range(k)]


def layer_flops(s):
    """GEMM FLOPs of one forward + backward, counted as gpu_bench.cpp counts them."""
    T, H, F, E, k = s["T"], s["H"], s["F"], s["E"], s["k"]
    f = 3.0 * 2.0 * T * k * H * (2 * F + F)
    if s["shared_F"]:
        f += 3.0 * 2.0 * T * H * 3 * s["shared_F"]
    return f + 3.0 * 2.0 * T * H * E


# ---- timing -------------------------------------------------------------------------------------------
class Timer:
    def __init__(self, torch, device):
        self.torch, self.cuda = torch, device.type == "cuda"

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def run(self, fn, warmup, repeat, inner=1):
        """Median and min ms per call of fn(i) over `repeat` samples of `inner` calls, after warm-up."""
        call = 0
        for _ in range(warmup):
            fn(call)
            call += 1
        self.sync()
        per_call = []
        for _ in range(repeat):
            if self.cuda:
                start = self.torch.cuda.Event(enable_timing=True)
                stop = self.torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(inner):
                    fn(call)
                    call += 1
                stop.record()
                stop.synchronize()
                ms = start.elapsed_time(stop)
            else:
                t0 = time.perf_counter()
                for _ in range(inner):
                    fn(call)
                    call += 1
                ms = (time.perf_counter() - t0) * 1e3
            per_call.append(ms / inner)
        return statistics.median(per_call), min(per_call), repeat, inner


class Results:
    def __init__(self, path, device_name):
        self.f = open(path, "w") if path else None
        self.device_name = device_name
        self.rows = []

    def add(self, rec):
        rec = dict(source="torch", device=self.device_name, **rec)
        self.rows.append(rec)
        if self.f:
            self.f.write(json.dumps(rec) + "\n")
            self.f.flush()
        if rec["kind"] != "device":
            if rec.get("ms") is None:
                print("  %-58s %-10s n/a: %s" % (rec["label"], rec["variant"], rec.get("error", "")), flush=True)
            else:
                rate = ("%9.2f GB/s" % rec["gbps"]) if "gbps" in rec else ("%9.2f TFLOP/s" % rec["tflops"])
                print("  %-58s %-10s %10.4f ms %s" % (rec["label"], rec["variant"], rec["ms"], rate), flush=True)

    def close(self):
        if self.f:
            self.f.close()


def timed(timer, fn, warmup, repeat, inner=1):
    ms, ms_min, samples, inner = timer.run(fn, warmup, repeat, inner)
    return dict(ms=ms, ms_min=ms_min, samples=samples, inner=inner)


def failed(exc):
    msg = "%s: %s" % (type(exc).__name__, str(exc).strip().splitlines()[0] if str(exc).strip() else "")
    return dict(ms=None, error=msg[:300])


# ---- the benchmarks -----------------------------------------------------------------------------------
class Peer:
    def __init__(self, torch, args):
        import torch.nn.functional as F
        self.torch, self.F, self.a = torch, F, args
        self.dev = torch.device(args.device)
        self.dtype = {"bf16": torch.bfloat16, "f32": torch.float32}[args.dtype]
        self.es = torch.empty((), dtype=self.dtype).element_size()
        self.timer = Timer(torch, self.dev)
        self.grouped_mm = getattr(torch, "_grouped_mm", None)

    def warmup(self, d):
        return self.a.warmup if self.a.warmup is not None else (0 if self.a.quick else d)

    def repeat(self, d):
        return self.a.repeat if self.a.repeat is not None else (1 if self.a.quick else d)

    def inner(self, d):
        return 1 if self.a.quick else d

    def rand(self, *shape, scale=1.0, seed=0):
        g = self.torch.Generator(device=self.dev)
        g.manual_seed(seed)
        return (self.torch.rand(*shape, generator=g, device=self.dev, dtype=self.torch.float32) * 2 - 1).mul_(
            scale).to(self.dtype)

    # -- copy and the dense reference --
    def copy(self, res):
        n = (1 << 19) if self.a.quick else (1 << 28)
        src, dst = self.rand(n, seed=1), self.torch.empty(n, dtype=self.dtype, device=self.dev)
        t = timed(self.timer, lambda i: dst.copy_(src), self.warmup(3), self.repeat(20), self.inner(5))
        b = 2.0 * n * self.es
        res.add(dict(kind="copy", name="copy", variant="torch", label="copy D2D %d MiB (copy_)" % (n * self.es >> 20),
                     bytes=b, gbps=b / (t["ms"] * 1e-3) * 1e-9, **t))

    def dense(self, res):
        n = 256 if self.a.quick else 8192
        A, B = self.rand(n, n, seed=2), self.rand(n, n, seed=3)
        C = self.torch.empty(n, n, dtype=self.dtype, device=self.dev)
        t = timed(self.timer, lambda i: self.torch.mm(A, B.t(), out=C), self.warmup(3), self.repeat(10))
        f = 2.0 * n * n * n
        res.add(dict(kind="dense_gemm", name="dense", variant="torch", label="dense GEMM %d^3 (torch.mm)" % n,
                     flops=f, tflops=f / (t["ms"] * 1e-3) * 1e-12, M=n, N=n, K=n, **t))

    # -- permute / unpermute (Megatron's unfused path) --
    def permute(self, res):
        torch = self.torch
        s = layer_shapes(self.a.quick)[0]
        T, H, E, k = s["T"], s["H"], s["E"], s["k"]
        routing_map = torch.zeros(T, E, dtype=torch.bool)
        for t in range(T):
            for e in token_experts(t, E, k):
                routing_map[t, e] = True
        routing_map = routing_map.to(self.dev)
        probs = routing_map.to(torch.float32) / k  # (T, E) f32
        # Megatron's permute index: masked_select over the transposed map = expert-major, tokens ascending
        rm_t = routing_map.t().contiguous()  # (E, T)
        sorted_indices = torch.arange(T, device=self.dev).unsqueeze(0).expand(E, -1).masked_select(rm_t)  # (N)
        expert_of_row = torch.arange(E, device=self.dev).unsqueeze(1).expand(E, T).masked_select(rm_t)  # (N)
        prob_index = sorted_indices * E + expert_of_row  # (N): flat (t, e) of each row
        N = int(sorted_indices.numel())
        sets = 3  # rotate buffers so repeated calls do not run out of L2
        tokens = [self.rand(T, H, seed=10 + i) for i in range(sets)]
        rows = [self.rand(N, H, seed=20 + i) for i in range(sets)]
        flat_probs = probs.reshape(-1)
        label = "T%d H%d top%d E%d %s" % (T, H, k, E, self.a.dtype)

        def do_permute(i):
            j = i % sets
            tokens[j].index_select(0, sorted_indices)
            flat_probs.index_select(0, prob_index)

        def do_unpermute(i):
            j = i % sets
            out = torch.zeros(T, H, dtype=self.dtype, device=self.dev)
            out.index_add_(0, sorted_indices, rows[j])

        t = timed(self.timer, do_permute, self.warmup(5), self.repeat(20), self.inner(20))
        b = 2.0 * N * H * self.es + 4.0 * T * E * 2 + 4.0 * N
        res.add(dict(kind="permute", name="permute", variant="torch", label="permute %s (index_select)" % label,
                     bytes=b, gbps=b / (t["ms"] * 1e-3) * 1e-9, **t))
        t = timed(self.timer, do_unpermute, self.warmup(5), self.repeat(20), self.inner(20))
        b = 1.0 * N * H * self.es + 1.0 * T * H * self.es + 4.0 * T * E
        res.add(dict(kind="unpermute", name="unpermute", variant="torch",
                     label="unpermute %s (index_add_)" % label, bytes=b, gbps=b / (t["ms"] * 1e-3) * 1e-9, **t))

    # -- grouped GEMM --
    def grouped_gemm(self, res):
        for s in layer_shapes(self.a.quick):
            rows = expert_rows(s["T"] * s["k"], s["E"])
            for matrix, N, K in (("fc1", 2 * s["F"], s["H"]), ("fc2", s["H"], s["F"])):
                self.grouped_case(res, s, matrix, rows, N, K)  # its tensors are freed on return

    def grouped_case(self, res, s, matrix, rows, N, K):
        """fwd / dgrad / wgrad of one expert GEMM: weights (G, N, K), M = sum(rows) routed rows."""
        torch = self.torch
        M, G = sum(rows), s["E"]
        X = self.rand(M, K, seed=31)
        W = self.rand(G, N, K, scale=0.02, seed=32)
        Y = self.rand(M, N, seed=33)
        starts = [sum(rows[:g]) for g in range(G)]
        offs = torch.tensor([starts[g] + rows[g] for g in range(G)], dtype=torch.int32, device=self.dev)
        flops = 2.0 * M * N * K
        for mode in ("fwd", "dgrad", "wgrad"):
            name = "grouped.%s.%s.%s" % (mode, s["name"], matrix)
            label = "grouped %s %s %s G%d M%d N%d K%d" % (mode, s["name"], matrix, G, M, N, K)
            if mode == "fwd":
                out = torch.empty(M, N, dtype=self.dtype, device=self.dev)

                def seq(i, out=out):
                    for g in range(G):
                        a, b = starts[g], starts[g] + rows[g]
                        if b > a:
                            torch.mm(X[a:b], W[g].t(), out=out[a:b])

                def gmm(i):
                    return self.grouped_mm(X, W.transpose(-2, -1), offs=offs)

                def dense(i, out=out):
                    torch.mm(X, W[0].t(), out=out)
            elif mode == "dgrad":
                out = torch.empty(M, K, dtype=self.dtype, device=self.dev)

                def seq(i, out=out):
                    for g in range(G):
                        a, b = starts[g], starts[g] + rows[g]
                        if b > a:
                            torch.mm(Y[a:b], W[g], out=out[a:b])

                def gmm(i):
                    return self.grouped_mm(Y, W, offs=offs)

                def dense(i, out=out):
                    torch.mm(Y, W[0], out=out)
            else:
                out = torch.empty(G, N, K, dtype=self.dtype, device=self.dev)
                dout = torch.empty(N, K, dtype=self.dtype, device=self.dev)

                def seq(i, out=out):
                    for g in range(G):
                        a, b = starts[g], starts[g] + rows[g]
                        if b > a:
                            torch.mm(Y[a:b].t(), X[a:b], out=out[g])
                        else:
                            out[g].zero_()

                def gmm(i):
                    return self.grouped_mm(Y.t(), X, offs=offs)

                def dense(i, dout=dout):
                    torch.mm(Y.t(), X, out=dout)
            common = dict(kind="grouped_gemm", name=name, label=label, flops=flops, mode=mode, G=G, M=M, N=N,
                          K=K, rows_per_expert=rows)
            td = timed(self.timer, dense, self.warmup(3), self.repeat(10))
            dense_tf = flops / (td["ms"] * 1e-3) * 1e-12
            t = timed(self.timer, seq, self.warmup(3), self.repeat(10))
            tf = flops / (t["ms"] * 1e-3) * 1e-12
            res.add(dict(variant="sequential", tflops=tf, dense_ms=td["ms"], dense_tflops=dense_tf,
                         fraction=tf / dense_tf, fraction_of="dense", **common, **t))
            res.add(dict(variant="grouped_mm", **common, **self.try_grouped(gmm, flops, dense_tf)))

    def try_grouped(self, fn, flops, dense_tf):
        if self.grouped_mm is None:
            return dict(ms=None, error="torch %s has no torch._grouped_mm" % self.torch.__version__)
        try:
            t = timed(self.timer, fn, self.warmup(3), self.repeat(10))
        except Exception as exc:  # unsupported dtype / device / layout: report n/a, keep going
            return failed(exc)
        tf = flops / (t["ms"] * 1e-3) * 1e-12
        return dict(tflops=tf, fraction=tf / dense_tf, fraction_of="dense", **t)

    # -- the layer --
    def layer(self, res):
        for s in layer_shapes(self.a.quick):
            for variant in ("sequential", "grouped_mm"):
                name, label = "layer." + s["name"], "layer fwd+bwd %s (%s)" % (s["name"], variant)
                common = dict(kind="layer", name=name, variant=variant, label=label, flops=layer_flops(s))
                if variant == "grouped_mm" and self.grouped_mm is None:
                    res.add(dict(common, ms=None,
                                 error="torch %s has no torch._grouped_mm" % self.torch.__version__))
                    continue
                try:
                    layer = MegatronStyleLayer(self, s, variant)
                    x = self.rand(s["T"], s["H"], seed=41)
                    dout = self.rand(s["T"], s["H"], scale=1e-2, seed=42)
                    t = timed(self.timer, lambda i: layer.step(x, dout), self.warmup(3), self.repeat(10))
                    t["tflops"] = common["flops"] / (t["ms"] * 1e-3) * 1e-12
                    if layer.last_counts is not None:  # known on the host on the sequential path only
                        t["tokens_per_expert"] = layer.last_counts
                    if self.dev.type == "cuda":
                        t["peak_bytes"] = int(self.torch.cuda.max_memory_allocated())
                except Exception as exc:
                    if variant == "sequential":
                        raise
                    t = failed(exc)
                res.add(dict(common, **t))
                layer = x = dout = None
                if self.dev.type == "cuda":
                    self.torch.cuda.empty_cache()
                    self.torch.cuda.reset_peak_memory_stats()


class MegatronStyleLayer:
    """One MoE layer in eager PyTorch following Megatron Core's code path (no EP, no TP)."""

    def __init__(self, peer, s, variant):
        torch, self.F = peer.torch, peer.F
        self.torch, self.s, self.variant, self.peer = torch, s, variant, peer
        dev = peer.dev
        H, F, E = s["H"], s["F"], s["E"]
        std = 0.02

        def param(*shape, seed):
            return torch.nn.Parameter(peer.rand(*shape, scale=std * math.sqrt(3.0), seed=seed))

        self.router_w = param(E, H, seed=50)  # (E, H) params dtype; the router GEMM runs in fp32
        self.expert_bias = torch.zeros(E, dtype=torch.float32, device=dev) if s["sigmoid"] else None
        self.local_tokens_per_expert = torch.zeros(E, dtype=torch.float32, device=dev)
        if variant == "sequential":  # SequentialMLP: one weight tensor per expert
            self.fc1 = [param(2 * F, H, seed=100 + e) for e in range(E)]  # (2F, H): rows [gate | up]
            self.fc2 = [param(H, F, seed=200 + e) for e in range(E)]  # (H, F)
            expert_params = self.fc1 + self.fc2
        else:  # stacked for torch._grouped_mm
            self.w1 = param(E, 2 * F, H, seed=100)  # (E, 2F, H)
            self.w2 = param(E, H, F, seed=200)  # (E, H, F)
            expert_params = [self.w1, self.w2]
        self.params = [self.router_w] + expert_params
        if s["shared_F"]:
            Fs = s["shared_F"]
            self.shared_fc1 = param(2 * Fs, H, seed=300)
            self.shared_fc2 = param(H, Fs, seed=301)
            self.params += [self.shared_fc1, self.shared_fc2]
        self.last_counts = None

    def swiglu(self, h):
        g, u = h.chunk(2, dim=-1)
        return self.F.silu(g) * u

    def router(self, x):
        """probs (T, E) f32 zero off the map, routing_map (T, E) bool, aux loss (scalar)."""
        torch, F, s = self.torch, self.F, self.s
        T, E, k = x.shape[0], s["E"], s["k"]
        logits = F.linear(x.float(), self.router_w.float())  # (T, E) fp32 (moe_router_dtype fp32)
        if s["sigmoid"]:
            scores = torch.sigmoid(logits)
            for_routing = scores + self.expert_bias  # the bias chooses, it does not weigh
            if s["num_groups"]:
                G, g = s["num_groups"], s["group_topk"]
                group_scores = for_routing.view(T, G, E // G).topk(k // g, dim=-1)[0].sum(dim=-1)  # (T, G)
                group_idx = torch.topk(group_scores, k=g, dim=-1, sorted=False)[1]
                group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
                score_mask = group_mask.unsqueeze(-1).expand(T, G, E // G).reshape(T, E)
                for_routing = for_routing.masked_fill(~score_mask.bool(), float("-inf"))
            top_indices = torch.topk(for_routing, k=k, dim=-1)[1]  # (T, k)
            top = torch.gather(scores, 1, top_indices)
            top = top / (top.sum(dim=-1, keepdim=True) + 1e-20) if k > 1 else top
            aux_scores = scores / (scores.sum(dim=-1, keepdim=True) + 1e-20)
        else:  # softmax after top-k
            top, top_indices = torch.topk(logits, k=k, dim=-1)
            top = torch.softmax(top, dim=-1, dtype=torch.float32)
            aux_scores = torch.softmax(logits, dim=-1, dtype=torch.float32)
        probs = torch.zeros_like(logits).scatter(1, top_indices, top)  # (T, E)
        routing_map = torch.zeros_like(logits, dtype=torch.int32).scatter(1, top_indices, 1).bool()  # (T, E)
        # switch load-balancing loss over the whole (single) sequence: aux_loss and seq_aux_loss agree
        # for one sequence; counts from a plain top-k of the aux scores
        aux_idx = torch.topk(aux_scores, k=k, dim=-1)[1]
        aux_map = torch.zeros_like(logits).scatter(1, aux_idx, 1.0)
        aux = torch.sum(aux_scores.sum(dim=0) * aux_map.sum(dim=0)) * (E * s["aux_coeff"] / (k * T * T))
        if self.expert_bias is not None:
            self.local_tokens_per_expert += routing_map.sum(dim=0)
        return probs, routing_map, aux

    def forward(self, x):
        torch, F, s = self.torch, self.F, self.s
        T, H, E = x.shape[0], x.shape[1], s["E"]
        probs, routing_map, aux = self.router(x)
        # permute (Megatron's unfused moe_utils.permute): expert-major rows, tokens ascending
        rm_t = routing_map.t().contiguous()  # (E, T)
        sorted_indices = torch.arange(T, device=x.device).unsqueeze(0).expand(E, -1).masked_select(rm_t)  # (N)
        permuted_probs = probs.t().contiguous().masked_select(rm_t)  # (N) f32
        permuted = x.index_select(0, sorted_indices)  # (N, H)
        tokens_per_expert = rm_t.sum(dim=1)  # (E)
        if self.variant == "sequential":
            counts = tokens_per_expert.tolist()
            self.last_counts = counts
            outs = []
            for e, (xe, pe) in enumerate(zip(torch.split(permuted, counts), torch.split(permuted_probs, counts))):
                h = F.linear(xe, self.fc1[e])  # (n_e, 2F)
                a = self.swiglu(h)
                a = (a * pe.unsqueeze(-1)).to(x.dtype)  # probs after the activation
                outs.append(F.linear(a, self.fc2[e]))  # (n_e, H)
            y = torch.cat(outs, dim=0)  # (N, H)
        else:
            offs = torch.cumsum(tokens_per_expert, dim=0).to(torch.int32)  # (E) end row of each expert
            h = self.peer.grouped_mm(permuted, self.w1.transpose(-2, -1), offs=offs)  # (N, 2F)
            a = (self.swiglu(h) * permuted_probs.unsqueeze(-1)).to(x.dtype)
            y = self.peer.grouped_mm(a, self.w2.transpose(-2, -1), offs=offs)  # (N, H)
            self.last_counts = None
        # unpermute (Megatron's unfused path): scatter-add the rows back to their tokens
        out = torch.zeros(T, H, dtype=y.dtype, device=y.device).index_add_(0, sorted_indices, y)
        if s["shared_F"]:
            out = out + F.linear(self.swiglu(F.linear(x, self.shared_fc1)), self.shared_fc2)
        return out, aux

    def step(self, x, dout):
        for p in self.params:
            p.grad = None
        xin = x.detach().requires_grad_(True)
        out, aux = self.forward(xin)
        self.torch.autograd.backward([out, aux], [dout, self.torch.ones_like(aux)])
        return out, xin


def reference_grouped_mm(torch):
    """torch._grouped_mm's semantics written as a loop of matmuls (for --selfcheck where torch has
    none): a (M, K) x b (G, K, N) -> (M, N), rows [offs[g-1], offs[g]) through b[g]; and
    a (N, M) x b (M, K) -> (G, N, K), the columns of a / rows of b in group g multiplied."""

    def grouped_mm(a, b, offs=None):
        ends = [int(v) for v in offs.tolist()]
        starts = [0] + ends[:-1]
        if a.dim() == 2 and b.dim() == 3:
            return torch.cat([a[s:e] @ b[g] for g, (s, e) in enumerate(zip(starts, ends))], dim=0)
        if a.dim() == 2 and b.dim() == 2:
            return torch.stack([a[:, s:e] @ b[s:e] for s, e in zip(starts, ends)], dim=0)
        raise ValueError("reference_grouped_mm: unsupported operand ranks %d, %d" % (a.dim(), b.dim()))

    return grouped_mm


def selfcheck(torch, a):
    """The two expert paths of the peer must compute the same layer: SequentialMLP with per-expert
    weights against the stacked weights through torch._grouped_mm (or its loop reference where torch
    has none), same parameters and inputs; outputs and every gradient compared. Also checks each
    grouped-GEMM call form against a per-expert loop. Returns the number of failed comparisons."""
    peer = Peer(torch, a)
    if peer.grouped_mm is None:
        peer.grouped_mm = reference_grouped_mm(torch)
        print("selfcheck: torch has no _grouped_mm; checking against its loop reference")
    tol = 3e-2 if peer.dtype == torch.bfloat16 else 1e-4
    bad = 0

    def check(what, got, want):
        nonlocal bad
        err = float((got.float() - want.float()).norm() / (want.float().norm() + 1e-30))
        ok = err <= tol and bool(torch.isfinite(got).all())
        bad += 0 if ok else 1
        print("  %-44s rel err %.2e %s" % (what, err, "ok" if ok else "FAILED (tol %.0e)" % tol))

    # grouped GEMM call forms
    G, K, N = 4, 32, 48
    rows = [5, 0, 11, 16]
    M = sum(rows)
    offs = torch.tensor([sum(rows[:g + 1]) for g in range(G)], dtype=torch.int32, device=peer.dev)
    X, W, Y = peer.rand(M, K, seed=1), peer.rand(G, N, K, seed=2), peer.rand(M, N, seed=3)
    starts = [sum(rows[:g]) for g in range(G)]
    fwd = torch.cat([X[s:s + m] @ W[g].t() for g, (s, m) in enumerate(zip(starts, rows))])
    dgrad = torch.cat([Y[s:s + m] @ W[g] for g, (s, m) in enumerate(zip(starts, rows))])
    wgrad = torch.stack([Y[s:s + m].t() @ X[s:s + m] for s, m in zip(starts, rows)])
    check("grouped_mm fwd  X W^T", peer.grouped_mm(X, W.transpose(-2, -1), offs=offs), fwd)
    check("grouped_mm dgrad dY W", peer.grouped_mm(Y, W, offs=offs), dgrad)
    check("grouped_mm wgrad dY^T X", peer.grouped_mm(Y.t(), X, offs=offs), wgrad)

    for s in layer_shapes(True):
        seq = MegatronStyleLayer(peer, s, "sequential")
        gmm = MegatronStyleLayer(peer, s, "grouped_mm")
        with torch.no_grad():  # the same parameters in both layouts
            gmm.router_w.copy_(seq.router_w)
            gmm.w1.copy_(torch.stack(list(seq.fc1)))
            gmm.w2.copy_(torch.stack(list(seq.fc2)))
            if s["shared_F"]:
                gmm.shared_fc1.copy_(seq.shared_fc1)
                gmm.shared_fc2.copy_(seq.shared_fc2)
        x = peer.rand(s["T"], s["H"], seed=41)
        dout = peer.rand(s["T"], s["H"], scale=1e-2, seed=42)
        out_s, x_s = seq.step(x, dout)
        out_g, x_g = gmm.step(x, dout)
        n = s["name"]
        check(n + " output", out_g, out_s)
        check(n + " input grad", x_g.grad, x_s.grad)
        check(n + " router weight grad", gmm.router_w.grad, seq.router_w.grad)
        check(n + " fc1 weight grads", gmm.w1.grad, torch.stack([p.grad for p in seq.fc1]))
        check(n + " fc2 weight grads", gmm.w2.grad, torch.stack([p.grad for p in seq.fc2]))
        if s["shared_F"]:
            check(n + " shared fc1 grad", gmm.shared_fc1.grad, seq.shared_fc1.grad)
        # the permute / experts / unpermute path against a plain loop over experts of the same routing
        with torch.no_grad():
            probs, routing_map, _ = seq.router(x)
            naive = torch.zeros(s["T"], s["H"], dtype=torch.float32, device=peer.dev)
            for e in range(s["E"]):
                idx = routing_map[:, e].nonzero().flatten()
                h = seq.swiglu(peer.F.linear(x[idx].float(), seq.fc1[e].float()))
                naive[idx] += peer.F.linear(h * probs[idx, e:e + 1], seq.fc2[e].float())
            if s["shared_F"]:
                naive += peer.F.linear(seq.swiglu(peer.F.linear(x.float(), seq.shared_fc1.float())),
                                       seq.shared_fc2.float())
        check(n + " output vs a loop over experts", out_s, naive)
        # every token reaches k distinct experts and the rows per expert add up to T*k
        counts = seq.last_counts
        if sum(counts) != s["T"] * s["k"]:
            bad += 1
            print("  %s: rows per expert sum to %d, expected %d: FAILED" % (n, sum(counts), s["T"] * s["k"]))
    print("selfcheck: %s" % ("ok" if bad == 0 else "%d comparison(s) FAILED" % bad))
    return bad


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (a smoke test)")
    p.add_argument("--dtype", choices=["bf16", "f32"], default=None, help="default: bf16 on cuda, f32 on cpu")
    p.add_argument("--quick", action="store_true", help="tiny shapes, one timed iteration")
    p.add_argument("--json", default=None, help="write one JSON object per measurement here")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--repeat", type=int, default=None)
    p.add_argument("--selfcheck", action="store_true",
                   help="check the peer's two expert paths against each other (tiny shapes) and exit")
    p.add_argument("--only", default="copy,permute,gemm,layer",
                   help="comma-separated subset of copy, permute, gemm, layer")
    a = p.parse_args(argv)
    if a.dtype is None:
        a.dtype = "f32" if a.device == "cpu" else "bf16"
    a.only = [w for w in a.only.split(",") if w]
    for w in a.only:
        if w not in ("copy", "permute", "gemm", "layer"):
            p.error("--only takes copy, permute, gemm, layer; got %r" % w)
    return a


def main(argv):
    a = parse_args(argv)
    try:
        import torch
    except ImportError:
        print("SKIP: torch_peer: torch is not importable by %s" % sys.executable)
        return 77
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        print("SKIP: torch_peer: torch %s sees no CUDA device" % torch.__version__)
        return 77
    if a.selfcheck:
        torch.manual_seed(1234)
        return 1 if selfcheck(torch, a) else 0
    dev = torch.device(a.device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print("torch_peer on %s: torch %s, %s%s, torch._grouped_mm %s" % (
        name, torch.__version__, a.dtype, ", --quick" if a.quick else "",
        "present" if hasattr(torch, "_grouped_mm") else "absent"), flush=True)
    if dev.type == "cpu":
        print("note: --device cpu is a smoke test of this script, not a benchmark", flush=True)
    torch.manual_seed(1234)
    res = Results(a.json, name)
    res.add(dict(kind="device", name="device", variant="torch", label=name, torch=torch.__version__,
                 dtype=a.dtype, quick=a.quick, has_grouped_mm=hasattr(torch, "_grouped_mm")))
    peer = Peer(torch, a)
    with torch.no_grad():
        if "copy" in a.only or "permute" in a.only:
            peer.copy(res)
        if "permute" in a.only:
            peer.permute(res)
        if "gemm" in a.only or "layer" in a.only:
            peer.dense(res)
        if "gemm" in a.only:
            peer.grouped_gemm(res)
    if "layer" in a.only:
        peer.layer(res)
    res.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
