// Token permutation on the CPU (docs/moe.md): routing counts, the row map, permute / unpermute and
// the chunk sort of the all-to-all dispatcher.
//
// Rows are expert-major with the token index ascending within an expert. Data movement copies bytes
// (memcpy per row), so permute and chunk_sort are bit-exact for every storage dtype. unpermute sums
// a token's copies in expert order in the compute type (f32 for f32/bf16/f16, f64 for f64).
// Parallel loops split tokens (or fixed blocks of tokens) across threads; every output element is
// produced by exactly one iteration in a fixed order, so results do not depend on the thread count.
// The unweighted sums (the layer's combine) run 16 lanes at a time: sum_rows_f32, and for bf16
// sum_rows_bf16 (widened to f32 by a shift, summed in f32, rounded back like float_to_bf16), each
// compiled for AVX-512, AVX2 and plain x86-64 with the same bits.
#include <algorithm>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "kernels/cpu/cpu_kernels.h"
#include "kernels/cpu/dispatch.h"

namespace moe {

using cpu::acc_t;
using cpu::from_acc;
using cpu::to_acc;

namespace {

// Work below this many bytes stays on one thread (an OpenMP fork costs a few microseconds).
constexpr int64_t kParallelBytes = int64_t{1} << 16;
// Tokens per block of the two-pass row-map build. Fixed, so the blocking (and the result) does not
// depend on the thread count.
constexpr int64_t kTokenBlock = 4096;

// Calls f(P{}) with P an unsigned integer of the prob element's width (probs are copied as bits),
// or f(nullptr) when there are no probs.
template <class F>
void dispatch_prob_bits(DType dt, bool present, const char* op, F&& f) {
  if (!present) return f(nullptr);
  switch (dt) {
    case DType::f32: return f(uint32_t{});
    case DType::f64: return f(uint64_t{});
    default: break;
  }
  MOE_THROW(ErrorCode::not_supported, op, ": prob dtype must be f32 or f64, got ", dtype_name(dt));
}

// Calls f(W{}) with W the prob dtype's C++ type (f32 or f64).
template <class F>
void dispatch_prob(DType dt, const char* op, F&& f) {
  switch (dt) {
    case DType::f32: return f(float{});
    case DType::f64: return f(double{});
    default: break;
  }
  MOE_THROW(ErrorCode::not_supported, op, ": prob dtype must be f32 or f64, got ", dtype_name(dt));
}

// counts (nb, E): routed tokens of each expert in each block of kTokenBlock tokens.
std::vector<int64_t> block_counts(const uint8_t* map, int64_t T, int64_t E, int64_t nb) {
  std::vector<int64_t> counts(static_cast<size_t>(nb * E), 0);
#pragma omp parallel for schedule(static) if (T * E > kParallelBytes)
  for (int64_t b = 0; b < nb; ++b) {
    int64_t* c = counts.data() + b * E;
    int64_t t1 = std::min(T, (b + 1) * kTokenBlock);
    for (int64_t t = b * kTokenBlock; t < t1; ++t) {
      const uint8_t* m = map + t * E;
      for (int64_t e = 0; e < E; ++e) c[e] += m[e] != 0;
    }
  }
  return counts;
}

}  // namespace

void cpu_routing_counts(const RoutingCountsArgs& a, const ExecCtx&) {
  int64_t nb = (a.T + kTokenBlock - 1) / kTokenBlock;
  std::vector<int64_t> bc = block_counts(a.routing_map, a.T, a.E, nb);
  for (int64_t e = 0; e < a.E; ++e) a.counts[e] = 0;
  for (int64_t b = 0; b < nb; ++b)
    for (int64_t e = 0; e < a.E; ++e) a.counts[e] += bc[static_cast<size_t>(b * a.E + e)];
}

// Two passes over blocks of tokens: count each block's rows per expert, then give every block its
// starting row per expert (the expert's offset plus the rows of earlier blocks) and number its
// routed (t, e) in token order.
void cpu_permute_index(const PermuteIndexArgs& a, const ExecCtx&) {
  const int64_t T = a.T, E = a.E;
  int64_t nb = (T + kTokenBlock - 1) / kTokenBlock;
  std::vector<int64_t> start = block_counts(a.routing_map, T, E, nb);  // (nb, E), becomes the start rows
  for (int64_t e = 0; e < E; ++e) {
    int64_t row = a.expert_offsets_host[e];
    for (int64_t b = 0; b < nb; ++b) {
      int64_t& s = start[static_cast<size_t>(b * E + e)];
      int64_t c = s;
      s = row;
      row += c;
    }
  }
#pragma omp parallel for schedule(static) if (T * E > kParallelBytes)
  for (int64_t b = 0; b < nb; ++b) {
    int64_t* cursor = start.data() + b * E;
    int64_t t1 = std::min(T, (b + 1) * kTokenBlock);
    for (int64_t t = b * kTokenBlock; t < t1; ++t) {
      const uint8_t* m = a.routing_map + t * E;
      int32_t* rid = a.row_id_map + t * E;
      for (int64_t e = 0; e < E; ++e) rid[e] = m[e] ? static_cast<int32_t>(cursor[e]++) : -1;
    }
  }
}

// out[row(t, e)] = in[t] (a memcpy of the row's bytes); out_probs[row(t, e)] = probs[t, e] (bits).
// Checks on the way that every row id is below N (+ N2) and that exactly N (+ N2_written) (t, e)
// are routed, so a map that does not match `out` fails instead of writing out of bounds or leaving
// rows unset. Row ids from N on write out2 / out_probs2 at row id − N.
void cpu_permute(const PermuteArgs& a, const ExecCtx&) {
  const int64_t T = a.T, E = a.E, N = a.N, NT = a.N + a.N2;
  const size_t row_bytes = static_cast<size_t>(a.H) * dtype_size(a.dtype);
  const char* in = static_cast<const char*>(a.in);  // (T, H)
  char* out = static_cast<char*>(a.out);            // (N, H)
  char* out2 = static_cast<char*>(a.out2);          // (N2, H)
  int64_t routed = 0, bad = 0;
  dispatch_prob_bits(a.prob_dtype, a.probs != nullptr, "permute", [&](auto ptag) {
    using P = decltype(ptag);
    constexpr bool kProbs = !std::is_same_v<P, std::nullptr_t>;
    int64_t n_routed = 0, n_bad = 0;  // locals: OpenMP reductions cannot name lambda captures
#pragma omp parallel for schedule(static) reduction(+ : n_routed, n_bad) \
    if (T * static_cast<int64_t>(row_bytes) > kParallelBytes)
    for (int64_t t = 0; t < T; ++t) {
      const int32_t* rid = a.row_id_map + t * E;
      for (int64_t e = 0; e < E; ++e) {
        int64_t r = rid[e];
        if (r < 0) continue;
        ++n_routed;
        if (r >= NT) {
          ++n_bad;
          continue;
        }
        const bool first = r < N;
        if (row_bytes)
          std::memcpy(first ? out + r * row_bytes : out2 + (r - N) * row_bytes, in + t * row_bytes, row_bytes);
        if constexpr (kProbs)
          (first ? static_cast<P*>(a.out_probs)[r] : static_cast<P*>(a.out_probs2)[r - N]) =
              static_cast<const P*>(a.probs)[t * E + e];
      }
    }
    routed = n_routed;
    bad = n_bad;
  });
  MOE_CHECK(bad == 0, "permute: ", bad, " entries of row_id_map point past the ", NT, " output rows");
  MOE_CHECK(routed == N + a.N2_written, "permute: row_id_map routes ", routed, " (token, expert) pairs but out has ",
            N, " rows", a.N2 ? " and the map should name " : "", a.N2 ? std::to_string(a.N2_written) : "",
            a.N2 ? " rows of out2" : "");
}

// Rounds the compute value to storage. bf16 uses a branch-free copy of float_to_bf16 (round to
// nearest even, NaN stays NaN) so the row loops vectorise; the bits are the same.
template <class T_, class A>
inline T_ store_as(A v) {
  if constexpr (std::is_same_v<T_, bf16>) {
    uint32_t u;
    std::memcpy(&u, &v, 4);
    uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    uint32_t nan = (u >> 16) | 0x40u;
    // |v| is NaN when its bits exceed infinity's; compared as int32 (both below 2^31), which SSE2 has.
    bool is_nan = static_cast<int32_t>(u & 0x7fffffffu) > static_cast<int32_t>(0x7f800000u);
    return bf16{static_cast<uint16_t>(is_nan ? nan : rounded)};
  } else {
    return from_acc<T_>(v);
  }
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MOE_PERM_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MOE_PERM_CLONES
#endif
// Vectors are passed only to always-inlined code (no call ABI involved).
#pragma GCC diagnostic ignored "-Wpsabi"

// o (H) = src[0] + src[1] + ... + src[n-1] in f32, in that order (n ≥ 2), 16 lanes at a time with
// GCC/Clang vector extensions: every source row streams once, the sum stays in registers. The
// same additions in the same order as the scalar loop, so the same bits.
MOE_PERM_CLONES void sum_rows_f32(const float* const* src, size_t n, float* o, int64_t H) {
  typedef float vf __attribute__((vector_size(64)));
  constexpr int64_t kL = 16;
  int64_t h = 0;
  for (; h + kL <= H; h += kL) {
    vf acc, x;
    std::memcpy(&acc, src[0] + h, sizeof acc);
    for (size_t j = 1; j < n; ++j) {
      std::memcpy(&x, src[j] + h, sizeof x);
      acc += x;
    }
    std::memcpy(o + h, &acc, sizeof acc);
  }
  for (; h < H; ++h) {
    float a = src[0][h];
    for (size_t j = 1; j < n; ++j) a += src[j][h];
    o[h] = a;
  }
}

// o (H) = bf16(src[0] + src[1] + ... + src[n-1]) with the sum in f32, in that order (n ≥ 1), 16
// lanes at a time: a bf16 widens exactly to f32 (its bits shifted up by 16), and the sum rounds back
// with store_as<bf16>'s branch-free round to nearest even (NaN stays NaN, quieted), lane by lane.
// The same values, additions and rounding as the scalar loop, so the same bits (n = 1 included).
MOE_PERM_CLONES void sum_rows_bf16(const bf16* const* src, size_t n, bf16* o, int64_t H) {
  typedef float vf __attribute__((vector_size(64)));
  typedef uint32_t vu __attribute__((vector_size(64)));
  typedef int32_t vi __attribute__((vector_size(64)));
  typedef uint16_t vh __attribute__((vector_size(32)));
  constexpr int64_t kL = 16;
  int64_t h = 0;
  for (; h + kL <= H; h += kL) {
    vh b;
    vu u;
    vf acc, x;
    std::memcpy(&b, src[0] + h, sizeof b);
    u = __builtin_convertvector(b, vu) << 16;
    std::memcpy(&acc, &u, sizeof acc);
    for (size_t j = 1; j < n; ++j) {
      std::memcpy(&b, src[j] + h, sizeof b);
      u = __builtin_convertvector(b, vu) << 16;
      std::memcpy(&x, &u, sizeof x);
      acc += x;
    }
    std::memcpy(&u, &acc, sizeof u);
    const vu rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    const vu nan = (u >> 16) | 0x40u;
    const vu is_nan = reinterpret_cast<vu>(reinterpret_cast<vi>(u & 0x7fffffffu) > 0x7f800000);
    const vh r = __builtin_convertvector((nan & is_nan) | (rounded & ~is_nan), vh);
    std::memcpy(static_cast<void*>(o + h), &r, sizeof r);
  }
  for (; h < H; ++h) {
    float a = bf16_to_float(src[0][h]);
    for (size_t j = 1; j < n; ++j) a += bf16_to_float(src[j][h]);
    o[h] = store_as<bf16>(a);
  }
}

// out[t] = Σ_e w · in[row(t, e)] over routed e in expert order, accumulated in the compute type.
// The first routed copy initialises the sum (so one unweighted copy comes back bit-exact, -0 too);
// an unrouted token gets zeros. One or two copies (top-1, top-2) take a single fused pass over
// the row; more go through a cache-resident accumulator chunk by chunk, in the same order.
// Scatter mode (probs_grad): probs_grad[t, e] = row_values[row(t, e)], zero where unrouted.
// Two inputs: row ids below N read in / row_weights / row_values, the N2 after them in2 / row_weights2 /
// row_values2 (only the source pointer differs, so the sums and their order are those of one input).
void cpu_unpermute(const UnpermuteArgs& a, const ExecCtx&) {
  const int64_t T = a.T, E = a.E, H = a.H, N = a.N, NT = a.N + a.N2;
  constexpr int64_t kChunk = 1024;
  int64_t bad = 0;
  if (a.out) {
    cpu::dispatch_float(a.dtype, "unpermute", [&](auto tag) {
      using T_ = decltype(tag);
      using A = acc_t<T_>;
      const T_* in = static_cast<const T_*>(a.in);    // (N, H)
      const T_* in2 = static_cast<const T_*>(a.in2);  // (N2, H), rows N .. N + N2 − 1
      T_* out = static_cast<T_*>(a.out);              // (T, H)
      auto run = [&](auto wtag) {
        using W = decltype(wtag);
        constexpr bool kWeights = !std::is_same_v<W, std::nullptr_t>;
        const W* w = nullptr;   // (N)
        const W* w2 = nullptr;  // (N2)
        if constexpr (kWeights) {
          w = static_cast<const W*>(a.row_weights);
          w2 = static_cast<const W*>(a.row_weights2);
        }
        int64_t n_bad = 0;
#pragma omp parallel reduction(+ : n_bad) if (T * H * static_cast<int64_t>(sizeof(T_)) > kParallelBytes)
        {
          std::vector<const T_*> src(static_cast<size_t>(E));  // the token's routed rows, expert order
          std::vector<A> wt(static_cast<size_t>(E), A(1));      // and their weights
          std::vector<A> acc(static_cast<size_t>(kChunk));
#pragma omp for schedule(static)
          for (int64_t t = 0; t < T; ++t) {
            const int32_t* rid = a.row_id_map + t * E;
            size_t n = 0;
            for (int64_t e = 0; e < E; ++e) {
              int64_t r = rid[e];
              if (r < 0) continue;
              if (r >= NT) {
                ++n_bad;
                continue;
              }
              if (r < N) {
                src[n] = in + r * H;
                if constexpr (kWeights) wt[n] = static_cast<A>(w[r]);
              } else {
                src[n] = in2 + (r - N) * H;
                if constexpr (kWeights) wt[n] = static_cast<A>(w2[r - N]);
              }
              ++n;
            }
            // Term j of the sum at column h: w_j · x_j[h] (just x_j[h] without weights).
            auto term = [&](size_t j, int64_t h) {
              if constexpr (kWeights)
                return wt[j] * to_acc(src[j][h]);
              else
                return to_acc(src[j][h]);
            };
            T_* o = out + t * H;
            if constexpr (std::is_same_v<T_, float> && !kWeights) {  // the layer's combine: plain f32 sums
              if (n >= 2) {
                sum_rows_f32(src.data(), n, o, H);
                continue;
              }
            }
            if constexpr (std::is_same_v<T_, bf16> && !kWeights) {  // the same in bf16, summed in f32
              if (n >= 1) {
                sum_rows_bf16(src.data(), n, o, H);
                continue;
              }
            }
            if (n == 0) {
              if (H) std::memset(static_cast<void*>(o), 0, static_cast<size_t>(H) * sizeof(T_));
            } else if (n == 1) {
              for (int64_t h = 0; h < H; ++h) o[h] = store_as<T_>(term(0, h));
            } else if (n == 2) {
              for (int64_t h = 0; h < H; ++h) o[h] = store_as<T_>(term(0, h) + term(1, h));
            } else {
              for (int64_t h0 = 0; h0 < H; h0 += kChunk) {
                const int64_t c = std::min(kChunk, H - h0);
                A* s = acc.data();
                for (int64_t i = 0; i < c; ++i) s[i] = term(0, h0 + i);
                for (size_t j = 1; j < n; ++j)
                  for (int64_t i = 0; i < c; ++i) s[i] += term(j, h0 + i);
                for (int64_t i = 0; i < c; ++i) o[h0 + i] = store_as<T_>(s[i]);
              }
            }
          }
        }
        bad += n_bad;
      };
      if (a.row_weights || a.row_weights2)  // either may be null when its input has no rows
        dispatch_prob(a.prob_dtype, "unpermute", run);
      else
        run(nullptr);
    });
  }
  if (a.probs_grad) {
    dispatch_prob(a.prob_dtype, "unpermute", [&](auto ptag) {
      using P = decltype(ptag);
      const P* vals = static_cast<const P*>(a.row_values);    // (N)
      const P* vals2 = static_cast<const P*>(a.row_values2);  // (N2)
      P* pg = static_cast<P*>(a.probs_grad);                  // (T, E)
      int64_t n_bad = 0;
#pragma omp parallel for schedule(static) reduction(+ : n_bad) if (T * E > kParallelBytes)
      for (int64_t t = 0; t < T; ++t) {
        for (int64_t e = 0; e < E; ++e) {
          int64_t r = a.row_id_map[t * E + e];
          if (r >= NT) ++n_bad;
          pg[t * E + e] = r < 0 || r >= NT ? P(0) : r < N ? vals[r] : vals2[r - N];
        }
      }
      bad += n_bad;
    });
  }
  MOE_CHECK(bad == 0, "unpermute: ", bad, " entries of row_id_map point past the ", NT, " input rows");
}

// Chunk c (split_sizes[c] rows starting at the sum of the earlier sizes) goes to the output after
// the chunks that precede it in sorted_idxs. Chunks are cut into pieces of about 1 MiB so that a
// few large chunks still spread over the threads.
void cpu_chunk_sort(const ChunkSortArgs& a, const ExecCtx&) {
  const int64_t C = a.num_chunks;
  const size_t row_bytes = static_cast<size_t>(a.H) * dtype_size(a.dtype);
  const size_t prob_bytes = a.probs ? dtype_size(a.prob_dtype) : 0;
  std::vector<int64_t> src_row(static_cast<size_t>(C));
  for (int64_t c = 0, row = 0; c < C; ++c) {
    src_row[static_cast<size_t>(c)] = row;
    row += a.split_sizes_host[c];
  }
  struct Piece {
    int64_t src, dst, rows;
  };
  const int64_t piece_rows = std::max<int64_t>(1, static_cast<int64_t>((size_t{1} << 20) / std::max<size_t>(row_bytes, 1)));
  std::vector<Piece> pieces;
  for (int64_t i = 0, dst = 0; i < C; ++i) {
    int64_t c = a.sorted_idxs_host[i];
    int64_t n = a.split_sizes_host[c], src = src_row[static_cast<size_t>(c)];
    for (int64_t p = 0; p < n; p += piece_rows) pieces.push_back({src + p, dst + p, std::min(piece_rows, n - p)});
    dst += n;
  }
  const char* in = static_cast<const char*>(a.in);
  char* out = static_cast<char*>(a.out);
  const char* probs = static_cast<const char*>(a.probs);
  char* out_probs = static_cast<char*>(a.out_probs);
  const int64_t np = static_cast<int64_t>(pieces.size());
#pragma omp parallel for schedule(static) if (a.N * static_cast<int64_t>(row_bytes) > kParallelBytes)
  for (int64_t i = 0; i < np; ++i) {
    const Piece& p = pieces[static_cast<size_t>(i)];
    if (row_bytes)
      std::memcpy(out + p.dst * row_bytes, in + p.src * row_bytes, static_cast<size_t>(p.rows) * row_bytes);
    if (prob_bytes)
      std::memcpy(out_probs + p.dst * prob_bytes, probs + p.src * prob_bytes, static_cast<size_t>(p.rows) * prob_bytes);
  }
}

}  // namespace moe
