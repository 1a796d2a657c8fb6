// Token permutation on CUDA (docs/moe.md): routing counts, the row map, permute / unpermute and
// the chunk sort of the all-to-all dispatcher.
//
// Rows are expert-major with the token index ascending within an expert. permute and chunk_sort move
// raw bytes in the widest word (16/8/4/2/1 bytes) that divides the row size and the alignment of
// every base pointer, so they are bit-exact for every dtype. unpermute sums a token's copies in
// expert order in the compute type (f32 for f32/bf16/f16, f64 for f64), the first copy initialising
// the sum as on the CPU, with IEEE round-to-nearest multiplies and adds (no FMA contraction) so the
// result repeats the CPU's bits. Offsets are 64-bit throughout (row · H may exceed 2^31).
//
// Kernels validate nothing (the Tensor wrappers do); a row id outside [0, N) is skipped instead of
// writing out of bounds (the CPU backend reports it as an error).
#include <type_traits>
#include <vector>

#include "kernels/cuda/common.cuh"
#include "kernels/cuda/cuda_kernels.h"

namespace moe {

// Dynamic shared memory of the per-token kernels.
extern __shared__ __align__(16) unsigned char g_permute_smem[];

namespace {

using namespace cuda;

constexpr int kTile = 32;           // experts per tile of the counting / row-map kernels
constexpr int kCountRows = 8;       // token rows per block of the counting kernel
constexpr int kTokThreads = 128;    // threads per token block (permute / unpermute)
constexpr int kSortWarps = 4;       // rows (one warp each) per block of chunk_sort

// ---------------------------------------------------------------------------------------------
// routing_counts: block (32 experts, 8 token rows); per-thread partial counts over a grid-strided set
// of tokens, reduced over the rows in shared memory, then one integer atomicAdd per expert and block
// (integer sums: the result does not depend on the order).
__global__ void __launch_bounds__(kTile * kCountRows)
    routing_counts_kernel(const uint8_t* __restrict__ map, int64_t T, int64_t E, unsigned long long* counts) {
  __shared__ unsigned long long part[kCountRows][kTile];
  const int x = threadIdx.x, y = threadIdx.y;
  const int64_t e = blockIdx.x * int64_t(kTile) + x;
  unsigned long long n = 0;
  if (e < E)
    for (int64_t t = blockIdx.y * int64_t(kCountRows) + y; t < T; t += int64_t(gridDim.y) * kCountRows)
      n += map[t * E + e] != 0;
  part[y][x] = n;
  __syncthreads();
  if (y == 0 && e < E) {
    unsigned long long s = 0;
    for (int r = 0; r < kCountRows; ++r) s += part[r][x];
    if (s) atomicAdd(counts + e, s);
  }
}

// permute_index, count → scan → scatter over chunks of kRankChunk tokens (common.cuh):
//   count:   block (chunk c, 32 experts) counts its chunk's routed tokens per expert;
//   scan:    chunk_scan_kernel turns the counts into each chunk's first row per expert (offsets[e]
//            plus the routed tokens of expert e in earlier chunks);
//   scatter: block (chunk c, 32 experts) walks its chunk in tiles of 32 tokens. A tile is staged
//            transposed in shared memory; warp w ranks expert column w of the tile with a ballot
//            (lane = token), carrying the running row in a register; the results go back coalesced.
// Every pass has chunks × ceil(E/32) blocks, so 1M tokens spread over the whole GPU.
__global__ void __launch_bounds__(kTile * kTile)
    rowmap_count_kernel(const uint8_t* __restrict__ map, int64_t T, int64_t E, int32_t* __restrict__ counts) {
  __shared__ int part[kTile][kTile + 1];  // [token row][expert]
  const int x = threadIdx.x, y = threadIdx.y;
  const int64_t c = blockIdx.x;
  const int64_t e = blockIdx.y * int64_t(kTile) + x;
  const int64_t t0 = c * kRankChunk, t1 = t0 + kRankChunk < T ? t0 + kRankChunk : T;
  int n = 0;
  if (e < E)
    for (int64_t t = t0 + y; t < t1; t += kTile) n += map[t * E + e] != 0;
  part[y][x] = n;
  __syncthreads();
  if (y == 0 && e < E) {
    int sum = 0;
    for (int r = 0; r < kTile; ++r) sum += part[r][x];
    counts[c * E + e] = sum;
  }
}

__global__ void __launch_bounds__(kTile * kTile)
    rowmap_scatter_kernel(const uint8_t* __restrict__ map, const int32_t* __restrict__ bases,
                          int32_t* __restrict__ row_id_map, int64_t T, int64_t E) {
  __shared__ uint8_t flag[kTile][kTile + 1];  // [token in tile][expert in tile]
  __shared__ int32_t row[kTile][kTile + 1];
  const int x = threadIdx.x, y = threadIdx.y;
  const int64_t c = blockIdx.x;
  const int64_t e = blockIdx.y * int64_t(kTile) + x;   // expert of this thread in the load / store phase
  const int64_t ey = blockIdx.y * int64_t(kTile) + y;  // expert column of warp y in the scan phase
  const int64_t t0 = c * kRankChunk, t1 = t0 + kRankChunk < T ? t0 + kRankChunk : T;
  int32_t carry = ey < E ? bases[c * E + ey] : 0;  // the next row of expert column y
  for (int64_t base = t0; base < t1; base += kTile) {
    const int64_t t = base + y;
    const bool inside = t < t1 && e < E;
    flag[y][x] = inside ? (map[t * E + e] != 0) : 0;
    __syncthreads();
    // Scan phase: warp y takes expert column y; lane x is token base + x.
    const unsigned ballot = __ballot_sync(0xffffffffu, flag[x][y] != 0);
    row[x][y] = carry + __popc(ballot & lanes_below());
    carry += __popc(ballot);
    __syncthreads();
    // Store phase: thread (x, y) reads only its own slots, so the next tile may overwrite the others
    // after the next barrier.
    if (inside) row_id_map[t * E + e] = flag[y][x] ? row[y][x] : -1;
  }
}

// ---------------------------------------------------------------------------------------------
// The routed (row, expert) pairs of token t in expert order, compacted into shared memory by a block
// scan. Returns the count (the same in every thread; a barrier follows the last write).
__device__ int gather_routes(const int32_t* __restrict__ rid_row, int64_t E, int64_t N, int* rows, int* experts,
                             int* scan_smem) {
  int count = 0;
  for (int64_t base = 0; base < E; base += blockDim.x) {
    const int64_t e = base + threadIdx.x;
    const int r = e < E ? rid_row[e] : -1;
    const bool on = r >= 0 && r < N;
    int total = 0;
    const int pos = block_exclusive_scan(on ? 1 : 0, scan_smem, total);
    if (on) {
      rows[count + pos] = r;
      experts[count + pos] = static_cast<int>(e);
    }
    count += total;
  }
  __syncthreads();
  return count;
}

// permute: one block per token; every word of the input row is read once and written to each of the
// token's k output rows. out_probs[r] = probs[t, e] as raw bits (P = uint32_t / uint64_t). Row ids
// in [N, N + N2) write the second output out2 (and out_probs2) at row − N.
template <class W, class P>
__global__ void __launch_bounds__(kTokThreads)
    permute_kernel(const int32_t* __restrict__ row_id_map, const W* __restrict__ in, W* __restrict__ out,
                   W* __restrict__ out2, const P* __restrict__ probs, P* __restrict__ out_probs,
                   P* __restrict__ out_probs2, int64_t E, int64_t N, int64_t N2, int64_t words) {
  __shared__ int scan_smem[kTokThreads / kWarp + 1];
  int* rows = reinterpret_cast<int*>(g_permute_smem);
  int* experts = rows + E;
  const int64_t t = blockIdx.x;
  const int n = gather_routes(row_id_map + t * E, E, N + N2, rows, experts, scan_smem);
  if (n == 0) return;
  const W* src = in + t * words;
  for (int64_t v = threadIdx.x; v < words; v += blockDim.x) {
    const W w = src[v];
    for (int j = 0; j < n; ++j) {
      const int64_t r = rows[j];
      (r < N ? out + r * words : out2 + (r - N) * words)[v] = w;
    }
  }
  if (probs)
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
      const int64_t r = rows[j];
      (r < N ? out_probs[r] : out_probs2[r - N]) = probs[t * E + experts[j]];
    }
}

// unpermute: one block per token; out[t] = Σ_j w_j · in[row_j] over the token's routes in expert
// order. VP elements per thread step (16-byte packs when the row allows, else 1). Row ids in
// [N, N + N2) read the second input in2 (and weights2) at row − N.
template <class T, int VP>
struct alignas(sizeof(T) * VP) Pack {
  T v[VP];
};

template <class T, int VP, class Wt>
__global__ void __launch_bounds__(kTokThreads)
    unpermute_kernel(const int32_t* __restrict__ row_id_map, const T* __restrict__ in, const T* __restrict__ in2,
                     T* __restrict__ out, const Wt* __restrict__ weights, const Wt* __restrict__ weights2, int64_t E,
                     int64_t N, int64_t N2, int64_t H) {
  using A = acc_t<T>;
  using PackT = Pack<T, VP>;
  __shared__ int scan_smem[kTokThreads / kWarp + 1];
  int* rows = reinterpret_cast<int*>(g_permute_smem);
  int* experts = rows + E;
  const int64_t t = blockIdx.x;
  const int n = gather_routes(row_id_map + t * E, E, N + N2, rows, experts, scan_smem);
  const int64_t packs = H / VP;
  PackT* dst = reinterpret_cast<PackT*>(out + t * H);
  for (int64_t v = threadIdx.x; v < packs; v += blockDim.x) {
    PackT o;
    if (n == 0) {  // an unrouted token gets zeros
      for (int i = 0; i < VP; ++i) o.v[i] = from_acc<T>(A(0));
    } else {
      // The first copy initialises the sum (one unweighted copy comes back bit-exact, -0 included).
      A acc[VP] = {};
      for (int j = 0; j < n; ++j) {
        const int64_t r = rows[j];
        const PackT x = reinterpret_cast<const PackT*>(r < N ? in + r * H : in2 + (r - N) * H)[v];
        A w = A(1);
        if constexpr (!std::is_void_v<Wt>) w = static_cast<A>(r < N ? weights[r] : weights2[r - N]);
        for (int i = 0; i < VP; ++i) {
          const A xv = std::is_void_v<Wt> ? to_acc(x.v[i]) : mul_rn(w, to_acc(x.v[i]));
          acc[i] = j == 0 ? xv : add_rn(acc[i], xv);
        }
      }
      for (int i = 0; i < VP; ++i) o.v[i] = from_acc<T>(acc[i]);
    }
    dst[v] = o;
  }
}

// probs_grad[t, e] = row_values[row(t, e)] for routed (t, e), else 0 (raw values); rows from N on
// read vals2 at row − N.
template <class P>
__global__ void scatter_rows_kernel(const int32_t* __restrict__ row_id_map, const P* __restrict__ vals,
                                    const P* __restrict__ vals2, P* __restrict__ probs_grad, int64_t n, int64_t N,
                                    int64_t N2) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = row_id_map[i];
    probs_grad[i] = (r < 0 || r >= N + N2) ? P(0) : r < N ? vals[r] : vals2[r - N];
  }
}

// ---------------------------------------------------------------------------------------------
// chunk_sort: one warp per output row. table = [out_start (C + 1) | src_start (C)]: output chunk j
// holds rows [out_start[j], out_start[j+1]) taken from input rows starting at src_start[j].
template <class W, class P>
__global__ void __launch_bounds__(kSortWarps * kWarp)
    chunk_sort_kernel(const int64_t* __restrict__ table, int64_t C, const W* __restrict__ in, W* __restrict__ out,
                      const P* __restrict__ probs, P* __restrict__ out_probs, int64_t N, int64_t words) {
  const int lane = threadIdx.x % kWarp;
  const int64_t r = blockIdx.x * int64_t(kSortWarps) + threadIdx.x / kWarp;
  if (r >= N) return;
  const int64_t* out_start = table;
  const int64_t* src_start = table + C + 1;
  // The last j with out_start[j] <= r (empty chunks share their start with the next one, so this is
  // the non-empty chunk that holds r).
  int64_t lo = 0, hi = C - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (out_start[mid] <= r)
      lo = mid;
    else
      hi = mid - 1;
  }
  const int64_t src = src_start[lo] + (r - out_start[lo]);
  const W* s = in + src * words;
  W* d = out + r * words;
  for (int64_t v = lane; v < words; v += kWarp) d[v] = s[v];
  if (probs && lane == 0) out_probs[r] = probs[src];
}

// Calls f(TypeTag<P>{}) with P the raw-bits type of the prob dtype (uint32_t for f32, uint64_t for
// f64), or with TypeTag<uint32_t> when there are no probs (the kernel then never touches them).
template <class F>
void dispatch_prob_bits(DType dt, bool present, const char* op, F&& f) {
  if (!present) {
    f(TypeTag<uint32_t>{});
    return;
  }
  switch (dt) {
    case DType::f32: f(TypeTag<uint32_t>{}); return;
    case DType::f64: f(TypeTag<uint64_t>{}); return;
    default: break;
  }
  MOE_THROW(ErrorCode::not_supported, op, ": prob dtype must be f32 or f64 on the CUDA backend, got ", dtype_name(dt));
}

size_t route_smem(int64_t E, const char* op) {
  const size_t bytes = static_cast<size_t>(E) * 2 * sizeof(int);
  MOE_CHECK_CODE(bytes <= 160 * 1024, ErrorCode::not_supported, op, ": ", E,
                 " experts need more shared memory per token block than the CUDA kernel supports");
  return bytes;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
void cuda_routing_counts(const RoutingCountsArgs& a, const ExecCtx& ctx) {
  DeviceGuard g(ctx);
  if (a.E == 0) return;
  MOE_CUDA_CHECK(cudaMemsetAsync(a.counts, 0, static_cast<size_t>(a.E) * sizeof(int64_t), stream_of(ctx)));
  if (a.T == 0) return;
  const int64_t gy = std::min<int64_t>(ceil_div(a.T, kCountRows * 16), 1024);  // ≥ 16 tokens per thread
  const dim3 grid(static_cast<unsigned>(ceil_div(a.E, kTile)), static_cast<unsigned>(gy));
  routing_counts_kernel<<<grid, dim3(kTile, kCountRows), 0, stream_of(ctx)>>>(
      a.routing_map, a.T, a.E, reinterpret_cast<unsigned long long*>(a.counts));
  MOE_CUDA_CHECK_LAUNCH("routing_counts_kernel");
}

void cuda_permute_index(const PermuteIndexArgs& a, const ExecCtx& ctx) {
  DeviceGuard g(ctx);
  if (a.T == 0 || a.E == 0) return;
  const char* op = "permute_index";
  MOE_CHECK_CODE(a.T <= 0x7fffffffLL, ErrorCode::not_supported, op, ": ", a.T,
                 " tokens exceed the CUDA kernel's 32-bit row ids");
  MOE_CHECK_CODE(ceil_div(a.E, kTile) <= 65535, ErrorCode::not_supported, op, ": ", a.E,
                 " experts exceed the CUDA grid (65535 tiles of 32)");
  // The device copy of the offsets when the wrapper made one, else upload the host table.
  Scratch up(ctx, a.expert_offsets ? 0 : static_cast<size_t>(a.E) * sizeof(int64_t));
  const int64_t* offsets = a.expert_offsets;
  if (!offsets) {
    upload(ctx, up, a.expert_offsets_host, static_cast<size_t>(a.E) * sizeof(int64_t));
    offsets = up.as<int64_t>();
  }
  const int64_t nchunks = ceil_div(a.T, kRankChunk);
  Scratch counts(ctx, static_cast<size_t>(nchunks * a.E) * sizeof(int32_t));
  Scratch bases(ctx, static_cast<size_t>(nchunks * a.E) * sizeof(int32_t));
  const dim3 grid(static_cast<unsigned>(nchunks), static_cast<unsigned>(ceil_div(a.E, kTile)));
  rowmap_count_kernel<<<grid, dim3(kTile, kTile), 0, stream_of(ctx)>>>(a.routing_map, a.T, a.E,
                                                                         counts.as<int32_t>());
  MOE_CUDA_CHECK_LAUNCH("rowmap_count_kernel");
  chunk_scan_kernel<int32_t><<<grid_rows(a.E, op), kScanThreads, 0, stream_of(ctx)>>>(
      counts.as<int32_t>(), nchunks, a.E, offsets, bases.as<int32_t>(), nullptr);
  MOE_CUDA_CHECK_LAUNCH("chunk_scan_kernel");
  rowmap_scatter_kernel<<<grid, dim3(kTile, kTile), 0, stream_of(ctx)>>>(a.routing_map, bases.as<int32_t>(),
                                                                           a.row_id_map, a.T, a.E);
  MOE_CUDA_CHECK_LAUNCH("rowmap_scatter_kernel");
}

void cuda_permute(const PermuteArgs& a, const ExecCtx& ctx) {
  DeviceGuard g(ctx);
  const char* op = "permute";
  if (a.T == 0 || a.N + a.N2 == 0) return;
  const size_t row_bytes = static_cast<size_t>(a.H) * dtype_size(a.dtype);
  const int wb = copy_word_bytes(row_bytes, {a.in, a.out, a.out2});
  const int64_t words = static_cast<int64_t>(row_bytes) / wb;
  const size_t smem = route_smem(a.E, op);
  dispatch_prob_bits(a.prob_dtype, a.probs != nullptr, op, [&](auto ptag) {
    using P = typename decltype(ptag)::type;
    dispatch_word(wb, [&](auto wtag) {
      using W = typename decltype(wtag)::type;
      set_smem(permute_kernel<W, P>, smem, op);
      permute_kernel<W, P><<<grid_rows(a.T, op), kTokThreads, smem, stream_of(ctx)>>>(
          a.row_id_map, static_cast<const W*>(a.in), static_cast<W*>(a.out), static_cast<W*>(a.out2),
          static_cast<const P*>(a.probs), static_cast<P*>(a.out_probs), static_cast<P*>(a.out_probs2), a.E, a.N,
          a.N2, words);
      MOE_CUDA_CHECK_LAUNCH("permute_kernel");
    });
  });
}

void cuda_unpermute(const UnpermuteArgs& a, const ExecCtx& ctx) {
  DeviceGuard g(ctx);
  const char* op = "unpermute";
  MOE_CHECK(a.out == nullptr || a.in != nullptr || a.N * a.H == 0, op, ": out is given but in is null");
  MOE_CHECK(a.out == nullptr || a.in2 != nullptr || a.N2 * a.H == 0, op, ": out and ", a.N2,
            " rows of in2 are given but in2 is null");
  if (a.out && a.T > 0 && a.H > 0) {
    const size_t smem = route_smem(a.E, op);
    dispatch_float(a.dtype, op, [&](auto tag) {
      using T = typename decltype(tag)::type;
      constexpr int kVec = 16 / sizeof(T);
      const size_t row_bytes = static_cast<size_t>(a.H) * sizeof(T);
      const bool vec = copy_word_bytes(row_bytes, {a.in, a.in2, a.out}) == 16;
      auto launch = [&](auto vtag, auto wtag) {
        constexpr int VP = decltype(vtag)::value;
        using Wt = typename decltype(wtag)::type;
        set_smem(unpermute_kernel<T, VP, Wt>, smem, op);
        unpermute_kernel<T, VP, Wt><<<grid_rows(a.T, op), kTokThreads, smem, stream_of(ctx)>>>(
            a.row_id_map, static_cast<const T*>(a.in), static_cast<const T*>(a.in2), static_cast<T*>(a.out),
            static_cast<const Wt*>(a.row_weights), static_cast<const Wt*>(a.row_weights2), a.E, a.N, a.N2, a.H);
        MOE_CUDA_CHECK_LAUNCH("unpermute_kernel");
      };
      auto with_weights = [&](auto vtag) {
        if (!a.row_weights && !a.row_weights2) {  // either may be null when its input has no rows
          launch(vtag, TypeTag<void>{});
          return;
        }
        dispatch_f32_f64(a.prob_dtype, op, "row_weights", [&](auto wtag) { launch(vtag, wtag); });
      };
      if (vec)
        with_weights(std::integral_constant<int, kVec>{});
      else
        with_weights(std::integral_constant<int, 1>{});
    });
  }
  if (a.probs_grad && a.T * a.E > 0) {
    dispatch_prob_bits(a.prob_dtype, true, op, [&](auto ptag) {
      using P = typename decltype(ptag)::type;
      const int64_t n = a.T * a.E;
      scatter_rows_kernel<P><<<grid_for(n, 256), 256, 0, stream_of(ctx)>>>(
          a.row_id_map, static_cast<const P*>(a.row_values), static_cast<const P*>(a.row_values2),
          static_cast<P*>(a.probs_grad), n, a.N, a.N2);
      MOE_CUDA_CHECK_LAUNCH("scatter_rows_kernel");
    });
  }
}

// Chunk offsets are computed on the host from the host split sizes and order, uploaded as one small
// table, and every output row finds its chunk by binary search.
void cuda_chunk_sort(const ChunkSortArgs& a, const ExecCtx& ctx) {
  DeviceGuard g(ctx);
  const char* op = "chunk_sort";
  const int64_t C = a.num_chunks;
  if (a.N == 0 || C == 0) return;
  std::vector<int64_t> table(static_cast<size_t>(2 * C + 1));
  std::vector<int64_t> in_start(static_cast<size_t>(C));
  for (int64_t c = 0, row = 0; c < C; ++c) {
    in_start[static_cast<size_t>(c)] = row;
    row += a.split_sizes_host[c];
  }
  int64_t row = 0;
  for (int64_t j = 0; j < C; ++j) {
    const int64_t c = a.sorted_idxs_host[j];
    table[static_cast<size_t>(j)] = row;                          // out_start[j]
    table[static_cast<size_t>(C + 1 + j)] = in_start[static_cast<size_t>(c)];  // src_start[j]
    row += a.split_sizes_host[c];
  }
  table[static_cast<size_t>(C)] = row;  // = N
  Scratch dev_table(ctx, table.size() * sizeof(int64_t));
  upload(ctx, dev_table, table.data(), table.size() * sizeof(int64_t));
  const size_t row_bytes = static_cast<size_t>(a.H) * dtype_size(a.dtype);
  const int wb = copy_word_bytes(row_bytes, {a.in, a.out});
  const int64_t words = static_cast<int64_t>(row_bytes) / wb;
  dispatch_prob_bits(a.prob_dtype, a.probs != nullptr, op, [&](auto ptag) {
    using P = typename decltype(ptag)::type;
    dispatch_word(wb, [&](auto wtag) {
      using W = typename decltype(wtag)::type;
      chunk_sort_kernel<W, P><<<grid_rows(ceil_div(a.N, kSortWarps), op), kSortWarps * kWarp, 0, stream_of(ctx)>>>(
          dev_table.as<int64_t>(), C, static_cast<const W*>(a.in), static_cast<W*>(a.out),
          static_cast<const P*>(a.probs), static_cast<P*>(a.out_probs), a.N, words);
      MOE_CUDA_CHECK_LAUNCH("chunk_sort_kernel");
    });
  });
}

}  // namespace moe
