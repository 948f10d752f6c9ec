// The persistent latent-loop kernel: all core iterations of one generated token in one launch.
//
// One block per SM (cooperative launch, so every block is resident) walks a fixed sequence of phases,
// separated by grid-wide barriers; every phase spreads its work over all warps of the grid:
//   iteration t:  adapter GEMV (W[:, :d] s + the token's precomputed W[:, d:] e term)
//     per core layer:  QKV GEMV (norm_1 in the prologue; qk_bias + RoPE + K/V slot write in the epilogue)
//                      -> decode attention (slot rule min(t mod K, n_p - 1)) -> Wo GEMV
//                      -> gated fc GEMV (residual + norm_2 + norm_3 in the prologue, silu * up after)
//                      -> proj GEMV (its residual + norm_4 is folded into the next prologue)
//     exit phase:      new state, used += 1, latent-diff / cosine test -> sequences that exit freeze
//     (criterion kl:   coda layers + ln_f + lm_head + log-softmax KL, also in the kernel)
// Norm prologues are computed redundantly by every block into shared memory (B x d bf16): cheaper than
// a barrier. The host does nothing until the kernel ends; iterations used per sequence go to `used`.
//
// Rounding follows the PyTorch reference in bf16: products accumulate in fp32 and are rounded to bf16
// where the reference materialises a bf16 tensor (see kernels/ for the same rules in Triton).
// Data written inside the launch is read with ld.global.cg (L2), never through the incoherent L1.
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

#include "device_utils.cuh"
#include "latent_loop.h"

namespace cg = cooperative_groups;
using bf16 = __nv_bfloat16;

namespace {

using latentrt_device::kWarp;
constexpr int kThreads = 512;
constexpr int kWarps = kThreads / kWarp;
constexpr int kMaxB = 16;
constexpr int kMaxCore = 8;
constexpr int kMaxCoda = 4;
constexpr int kMaxHeadDim = 128;

struct Layer {
  const bf16 *n1, *n2, *n3, *n4, *wqkv, *qk_bias, *wo, *wfc, *wproj;
  bf16 *k, *v;
  int slots;
};

struct Args {
  int B, d, H, Hkv, D, I, T, V, pos, r_max, min_steps, criterion, n_core, n_coda, ld_adapter;
  float eps, threshold;
  Layer core[kMaxCore], coda[kMaxCoda];
  const bf16 *adapter, *term, *ln_f, *lm_head;
  const float *cos, *sin;
  const uint8_t* valid;
  int64_t* written;
  bf16* state;
  uint8_t* active;
  int64_t* used;
  float *logits, *prev_logp;
  bf16 *h_a, *h_b, *q, *y, *o, *g, *mo;  // workspace
  unsigned* barrier;
  int barrier_mode;
};

using latentrt_device::unpack8;
using latentrt_device::warp_max;
using latentrt_device::warp_sum;

__device__ __forceinline__ float rnd(float v) { return __bfloat162float(__float2bfloat16(v)); }
__device__ __forceinline__ float ld(const bf16* p) { return __bfloat162float(__ldcg(p)); }

// Sum over the block (all threads get the result). `red` holds kWarps floats.
__device__ float block_sum(float v, float* red) {
  v = warp_sum(v);
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  __syncthreads();  // red may still be read from a previous call
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float t = 0.f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) t += red[w];
  return t;
}

__device__ float block_max(float v, float* red) {
  v = warp_max(v);
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float t = -INFINITY;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) t = fmaxf(t, red[w]);
  return t;
}

// Grid-wide barrier: cooperative groups, or an arrival counter + generation word in global memory.
template <class A>
__device__ void grid_sync(const A& a) {
  if (a.barrier_mode == 0) {
    cg::this_grid().sync();
    return;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    unsigned* count = a.barrier;
    volatile unsigned* gen = a.barrier + 1;
    const unsigned g = *gen;
    __threadfence();  // this block's writes are visible before it arrives
    if (atomicAdd(count, 1u) == gridDim.x - 1) {
      atomicExch(count, 0u);
      __threadfence();
      atomicAdd(a.barrier + 1, 1u);
    } else {
      while (*gen == g) __nanosleep(20);
    }
    __threadfence();
  }
  __syncthreads();
}

// Rows of the next GEMV's input, staged in shared memory by every block (B x d bf16):
//   x = a (+ add), rounded; if w_pend: x = rms_norm(x, w_pend) (block 0 writes it to out, the new
//   residual); xs = rms_norm(x, w_next). Huginn's RMSNorm: fp32 x * rsqrt(mean(x^2) + eps), rounded,
//   times the weight, rounded.
__device__ void stage(const Args& a, const bf16* src, const bf16* add, const bf16* w_pend, const bf16* w_next,
                      bf16* out, bf16* xs, float* red) {
  const int d = a.d;
  for (int b = 0; b < a.B; ++b) {
    bf16* row = xs + (size_t)b * d;
    float ss = 0.f;
    for (int k = threadIdx.x; k < d; k += blockDim.x) {
      float x = ld(src + (size_t)b * d + k);
      if (add != nullptr) x = rnd(x + ld(add + (size_t)b * d + k));
      row[k] = __float2bfloat16(x);
      ss += x * x;
    }
    float r = rsqrtf(block_sum(ss, red) / d + a.eps);
    if (w_pend != nullptr) {
      float ss2 = 0.f;
      for (int k = threadIdx.x; k < d; k += blockDim.x) {
        float x = rnd(rnd(__bfloat162float(row[k]) * r) * __bfloat162float(w_pend[k]));
        row[k] = __float2bfloat16(x);
        if (blockIdx.x == 0 && out != nullptr) out[(size_t)b * d + k] = __float2bfloat16(x);
        ss2 += x * x;
      }
      r = rsqrtf(block_sum(ss2, red) / d + a.eps);
    }
    for (int k = threadIdx.x; k < d; k += blockDim.x)
      row[k] = __float2bfloat16(rnd(rnd(__bfloat162float(row[k]) * r) * __bfloat162float(w_next[k])));
  }
  __syncthreads();
}

// Skinny GEMV over the grid: each warp owns groups of NC weight rows (rows(grp, c)) and computes their
// dot products with the B input rows (staged xs, or global xg with row stride ldx), streaming W once with
// 16-byte loads; lane 0 hands the fp32 sums to the epilogue. K must be a multiple of 8.
template <int MB, int NC, class A, class Rows, class Epi>
__device__ void gemv(const A& a, const bf16* W, int ldw, int groups, int K, const bf16* xs, const bf16* xg,
                     int ldx, Rows rows, Epi epi) {
  const int lane = threadIdx.x % kWarp;
  const int nw = gridDim.x * kWarps;
  for (int grp = blockIdx.x * kWarps + threadIdx.x / kWarp; grp < groups; grp += nw) {
    const bf16* wr[NC];
#pragma unroll
    for (int c = 0; c < NC; ++c) wr[c] = W + (size_t)rows(grp, c) * ldw;
    float acc[NC][MB];
#pragma unroll
    for (int c = 0; c < NC; ++c)
#pragma unroll
      for (int b = 0; b < MB; ++b) acc[c][b] = 0.f;
#pragma unroll 2
    for (int k = lane * 8; k < K; k += kWarp * 8) {
      float wf[NC][8];
#pragma unroll
      for (int c = 0; c < NC; ++c) unpack8(__ldg(reinterpret_cast<const uint4*>(wr[c] + k)), wf[c]);
#pragma unroll
      for (int b = 0; b < MB; ++b) {
        if (b < a.B) {
          const uint4 xv = xs != nullptr ? *reinterpret_cast<const uint4*>(xs + (size_t)b * K + k)
                                         : __ldcg(reinterpret_cast<const uint4*>(xg + (size_t)b * ldx + k));
          float xf[8];
          unpack8(xv, xf);
#pragma unroll
          for (int c = 0; c < NC; ++c)
#pragma unroll
            for (int j = 0; j < 8; ++j) acc[c][b] += wf[c][j] * xf[j];
        }
      }
    }
#pragma unroll
    for (int b = 0; b < MB; ++b)
#pragma unroll
      for (int c = 0; c < NC; ++c)
        if (b < a.B) acc[c][b] = warp_sum(acc[c][b]);
    if (lane == 0) epi(grp, acc);
  }
}

struct Row1 {
  __device__ int operator()(int g, int) const { return g; }
};
struct RowPair {  // adjacent rows (a RoPE pair)
  __device__ int operator()(int g, int c) const { return 2 * g + c; }
};
struct RowGate {  // gate row g and up row g + I
  int I;
  __device__ int operator()(int g, int c) const { return g + c * I; }
};

// One query per (sequence, head) over positions [0, pos]: online softmax per warp, merged in shared memory.
// K/V [slots, B, Hkv, T, D]; with use_written the key of position p comes from slot min(slot, n_p - 1).
template <class A>
__device__ void attention(const A& a, const bf16* K, const bf16* V, int pos, int slot, bool use_written,
                          const uint8_t* act, float scale, float* smem) {
  float* sm_m = smem;
  float* sm_l = smem + kWarps;
  float* sm_acc = smem + 2 * kWarps;  // [kWarps][kMaxHeadDim]
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int D = a.D, group = a.H / a.Hkv, length = pos + 1;
  for (int item = blockIdx.x; item < a.B * a.H; item += gridDim.x) {
    const int b = item / a.H, h = item % a.H, hk = h / group;
    if (!act[b]) continue;  // uniform across the block
    float qf[kMaxHeadDim / kWarp], acc[kMaxHeadDim / kWarp];
#pragma unroll
    for (int i = 0; i < kMaxHeadDim / kWarp; ++i) {
      const int dd = lane + i * kWarp;
      qf[i] = dd < D ? ld(a.q + ((size_t)b * a.H + h) * D + dd) : 0.f;
      acc[i] = 0.f;
    }
    float m_i = -INFINITY, l_i = 0.f;
    for (int t = warp; t < length; t += kWarps) {
      if (!(a.valid[(size_t)b * a.T + t] || t == pos)) continue;
      int sl = slot;
      if (use_written && t != pos) {
        const long long n = __ldcg(reinterpret_cast<const long long*>(a.written) + (size_t)b * a.T + t) - 1;
        sl = n < 0 ? 0 : (n < slot ? (int)n : slot);
      }
      const size_t base = ((((size_t)sl * a.B + b) * a.Hkv + hk) * a.T + t) * D;
      float dot = 0.f;
#pragma unroll
      for (int i = 0; i < kMaxHeadDim / kWarp; ++i) {
        const int dd = lane + i * kWarp;
        if (dd < D) dot += qf[i] * ld(K + base + dd);
      }
      const float s = warp_sum(dot) * scale;
      const float m_new = fmaxf(m_i, s);
      const float alpha = __expf(m_i - m_new), p = __expf(s - m_new);
#pragma unroll
      for (int i = 0; i < kMaxHeadDim / kWarp; ++i) {
        const int dd = lane + i * kWarp;
        if (dd < D) acc[i] = acc[i] * alpha + p * ld(V + base + dd);
      }
      l_i = l_i * alpha + p;
      m_i = m_new;
    }
    __syncthreads();  // the previous item's merge is done with the shared arrays
    if (lane == 0) {
      sm_m[warp] = m_i;
      sm_l[warp] = l_i;
    }
#pragma unroll
    for (int i = 0; i < kMaxHeadDim / kWarp; ++i) {
      const int dd = lane + i * kWarp;
      if (dd < D) sm_acc[warp * kMaxHeadDim + dd] = acc[i];
    }
    __syncthreads();
    for (int dd = threadIdx.x; dd < D; dd += blockDim.x) {
      float m = -INFINITY;
      for (int w = 0; w < kWarps; ++w) m = fmaxf(m, sm_m[w]);
      float num = 0.f, den = 0.f;
      for (int w = 0; w < kWarps; ++w) {
        if (sm_l[w] == 0.f) continue;
        const float f = __expf(sm_m[w] - m);
        num += sm_acc[w * kMaxHeadDim + dd] * f;
        den += sm_l[w] * f;
      }
      a.y[((size_t)b * a.H + h) * D + dd] = __float2bfloat16(num / den);
    }
  }
}

// One sandwich layer. On entry the residual is pending as norm(src + add) with w_pend (or src itself
// when w_pend is null); on exit it is pending as norm_4(h_b + mo).
template <int MB>
__device__ void sandwich(const Args& a, const Layer& L, int slot, bool use_written, const bf16* src,
                         const bf16* add, const bf16* w_pend, const uint8_t* act, bf16* xs, float* red) {
  const int B = a.B, d = a.d, H = a.H, Hkv = a.Hkv, D = a.D, T = a.T, pos = a.pos;
  stage(a, src, add, w_pend, L.n1, a.h_a, xs, red);
  const bf16* res = w_pend != nullptr ? a.h_a : src;
  // QKV: rows q (H D) | k (Hkv D) | v (Hkv D), in RoPE pairs
  gemv<MB, 2>(a, L.wqkv, d, (H + 2 * Hkv) * D / 2, d, xs, nullptr, 0, RowPair{},
          [&](int grp, auto& acc) {
            const int n = 2 * grp;
            const int region = n < H * D ? 0 : (n < (H + Hkv) * D ? 1 : 2);
            const int local = n - (region == 0 ? 0 : (region == 1 ? H * D : (H + Hkv) * D));
            const int head = local / D, dd = local % D;
#pragma unroll
            for (int b = 0; b < MB; ++b) {
              if (b >= B || !act[b]) continue;
              float v0 = rnd(acc[0][b]), v1 = rnd(acc[1][b]);
              if (region < 2 && L.qk_bias != nullptr) {
                const bf16* bias = L.qk_bias + (size_t)region * H * D + head * D + dd;
                v0 = rnd(v0 + __bfloat162float(bias[0]));
                v1 = rnd(v1 + __bfloat162float(bias[1]));
              }
              if (region < 2) {  // interleaved RoPE in fp32
                const float c = a.cos[(size_t)b * (D / 2) + dd / 2], s = a.sin[(size_t)b * (D / 2) + dd / 2];
                const float r0 = rnd(v0 * c - v1 * s), r1 = rnd(v1 * c + v0 * s);
                v0 = r0;
                v1 = r1;
              }
              if (region == 0) {
                a.q[(size_t)b * H * D + n] = __float2bfloat16(v0);
                a.q[(size_t)b * H * D + n + 1] = __float2bfloat16(v1);
              } else {
                bf16* cache = region == 1 ? L.k : L.v;
                const size_t off = ((((size_t)slot * B + b) * Hkv + head) * T + pos) * D + dd;
                cache[off] = __float2bfloat16(v0);
                cache[off + 1] = __float2bfloat16(v1);
              }
            }
          });
  grid_sync(a);
  attention(a, L.k, L.v, pos, slot, use_written, act, rsqrtf((float)D), red + kWarps);
  grid_sync(a);
  gemv<MB, 1>(a, L.wo, H * D, d, H * D, nullptr, a.y, H * D, Row1{}, [&](int n, auto& acc) {
    #pragma unroll
    for (int b = 0; b < MB; ++b)
      if (b < B && act[b]) a.o[(size_t)b * d + n] = __float2bfloat16(acc[0][b]);
  });
  grid_sync(a);
  stage(a, res, a.o, L.n2, L.n3, a.h_b, xs, red);
  gemv<MB, 2>(a, L.wfc, d, a.I, d, xs, nullptr, 0, RowGate{a.I}, [&](int n, auto& acc) {
#pragma unroll
    for (int b = 0; b < MB; ++b) {
      if (b >= B || !act[b]) continue;
      const float gt = rnd(acc[0][b]), up = rnd(acc[1][b]);
      a.g[(size_t)b * a.I + n] = __float2bfloat16(rnd(gt / (1.f + __expf(-gt))) * up);
    }
  });
  grid_sync(a);
  gemv<MB, 1>(a, L.wproj, a.I, d, a.I, nullptr, a.g, a.I, Row1{}, [&](int n, auto& acc) {
    #pragma unroll
    for (int b = 0; b < MB; ++b)
      if (b < B && act[b]) a.mo[(size_t)b * d + n] = __float2bfloat16(acc[0][b]);
  });
  grid_sync(a);
}

template <int MB>
__global__ void __launch_bounds__(kThreads, 1) latent_loop_kernel(const Args a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16* xs = reinterpret_cast<bf16*>(smem_raw);  // B x d staged rows
  __shared__ float red[kWarps + 2 * kWarps + kWarps * kMaxHeadDim];
  __shared__ uint8_t act[kMaxB];
  const int B = a.B, d = a.d;
  for (int t = 0; t < a.r_max; ++t) {
    if (threadIdx.x < kMaxB) act[threadIdx.x] = threadIdx.x < B ? __ldcg(a.active + threadIdx.x) : 0;
    __syncthreads();
    int any = 0;
    for (int b = 0; b < B; ++b) any |= act[b];
    if (!any) break;  // every sequence has exited (the same decision in every block)
    if (blockIdx.x == 0 && threadIdx.x < B && act[threadIdx.x]) a.written[(size_t)threadIdx.x * a.T + a.pos] = t + 1;
    // adapter: h_a = W[:, :d] s + term
    gemv<MB, 1>(a, a.adapter, a.ld_adapter, d, d, nullptr, a.state, d, Row1{}, [&](int n, auto& acc) {
      #pragma unroll
    for (int b = 0; b < MB; ++b)
        if (b < B && act[b]) a.h_a[(size_t)b * d + n] = __float2bfloat16(rnd(acc[0][b]) + ld(a.term + (size_t)b * d + n));
    });
    grid_sync(a);
    const bf16 *src = a.h_a, *add = nullptr, *w_pend = nullptr;
    for (int j = 0; j < a.n_core; ++j) {
      const Layer& L = a.core[j];
      sandwich<MB>(a, L, t % L.slots, L.slots > 1, src, add, w_pend, act, xs, red);
      src = a.h_b;
      add = a.mo;
      w_pend = L.n4;
    }
    // exit phase: the new state (norm_4 of the last layer), iterations used, latent-diff / cosine
    if (blockIdx.x == 0) {  // one block: B rows of d elements
      for (int b = 0; b < B; ++b) {
        if (!act[b]) continue;
        float diff = 0.f, nn = 0.f, dot = 0.f, np = 0.f;
        float ss = 0.f;
        for (int k = threadIdx.x; k < d; k += blockDim.x) {
          const float x = rnd(ld(src + (size_t)b * d + k) + ld(add + (size_t)b * d + k));
          ss += x * x;
        }
        const float r = rsqrtf(block_sum(ss, red) / d + a.eps);
        for (int k = threadIdx.x; k < d; k += blockDim.x) {
          const float x = rnd(ld(src + (size_t)b * d + k) + ld(add + (size_t)b * d + k));
          const float s_new = rnd(rnd(x * r) * __bfloat162float(w_pend[k]));
          const float s_old = ld(a.state + (size_t)b * d + k);
          diff += (s_new - s_old) * (s_new - s_old);
          nn += s_new * s_new;
          dot += s_new * s_old;
          np += s_old * s_old;
          a.state[(size_t)b * d + k] = __float2bfloat16(s_new);
        }
        diff = block_sum(diff, red);
        nn = block_sum(nn, red);
        dot = block_sum(dot, red);
        np = block_sum(np, red);
        if (threadIdx.x == 0) {
          a.used[b] += 1;
          float crit = INFINITY;
          if (a.criterion == 1) crit = sqrtf(diff) / sqrtf(nn);
          if (a.criterion == 2) crit = 1.f - dot / fmaxf(sqrtf(nn) * sqrtf(np), 1e-8f);
          if (t + 1 >= a.min_steps && crit < a.threshold) a.active[b] = 0;
        }
      }
    }
    grid_sync(a);
    if (a.criterion != 3) continue;
    // kl: coda + ln_f + lm_head on the new state, then KL(prev || cur) per sequence
    src = a.state;
    add = nullptr;
    w_pend = a.ln_f;
    for (int j = 0; j < a.n_coda; ++j) {
      const Layer& L = a.coda[j];
      sandwich<MB>(a, L, 0, false, src, add, w_pend, act, xs, red);
      src = a.h_b;
      add = a.mo;
      w_pend = L.n4;
    }
    stage(a, src, add, w_pend, a.ln_f, nullptr, xs, red);
    gemv<MB, 1>(a, a.lm_head, d, a.V, d, xs, nullptr, 0, Row1{}, [&](int n, auto& acc) {
      #pragma unroll
    for (int b = 0; b < MB; ++b)
        if (b < B && act[b]) a.logits[(size_t)b * a.V + n] = rnd(acc[0][b]);
    });
    grid_sync(a);
    for (int b = blockIdx.x; b < B; b += gridDim.x) {
      if (!act[b]) continue;
      const float* lg = a.logits + (size_t)b * a.V;
      float* prev = a.prev_logp + (size_t)b * a.V;
      float m = -INFINITY;
      for (int n = threadIdx.x; n < a.V; n += blockDim.x) m = fmaxf(m, __ldcg(lg + n));
      m = block_max(m, red);
      float se = 0.f;
      for (int n = threadIdx.x; n < a.V; n += blockDim.x) se += __expf(__ldcg(lg + n) - m);
      const float lse = m + logf(block_sum(se, red));
      float kl = 0.f;
      for (int n = threadIdx.x; n < a.V; n += blockDim.x) {
        const float lp = __ldcg(lg + n) - lse, pp = prev[n];
        kl += expf(pp) * (pp - lp);
        prev[n] = lp;
      }
      kl = block_sum(kl, red);
      if (threadIdx.x == 0 && t + 1 >= a.min_steps && kl < a.threshold) a.active[b] = 0;
    }
    grid_sync(a);
  }
}


// ------------------------------------------------------------------ Coconut: k continuous thoughts, one launch
// Each thought is a full pass of the GPT-2 layers at a new position whose input is ln_f(h) + wpe[pos] of the
// previous position's hidden state h (before ln_f). LayerNorm with biases, GELU (tanh) MLP, Conv1D weights
// passed transposed ([out, in], prepared once by the backend) so the same GEMV streams them.
struct Gpt2Layer {
  const bf16 *ln1_w, *ln1_b, *attn_w, *attn_b, *proj_w, *proj_b, *ln2_w, *ln2_b, *fc_w, *fc_b, *out_w, *out_b;
  bf16 *k, *v;  // this layer's cache [B, H, T, D]
  float scale;
};

struct ThoughtArgs {
  int B, d, H, Hkv, D, I, T, k, pos0, n_layers;
  float eps;
  const Gpt2Layer* layers;  // table in device memory
  const bf16 *ln_f_w, *ln_f_b, *wpe;
  const int64_t* positions;  // [B] model position of the first thought
  const bf16* h_in;          // [B, d] hidden state (before ln_f) of the position before the first thought
  bf16* out;                 // [B, k, d] hidden state (before ln_f) of every thought
  const uint8_t* valid;      // [B, T]
  const int64_t* written;    // unused (plain layers), for attention()'s interface
  const uint8_t* active;     // [B]
  bf16 *x_a, *x_b, *q, *y, *o, *g, *mo;
  unsigned* barrier;
  int barrier_mode;
};

// LayerNorm of a staged row in place: fp32 statistics, (x - mean) * rstd * w + b rounded once (as torch).
__device__ void layer_norm_row(bf16* row, int d, const bf16* w, const bf16* bias, float eps, float* red) {
  float s = 0.f;
  for (int k = threadIdx.x; k < d; k += blockDim.x) s += __bfloat162float(row[k]);
  const float mean = block_sum(s, red) / d;
  float v = 0.f;
  for (int k = threadIdx.x; k < d; k += blockDim.x) {
    const float c = __bfloat162float(row[k]) - mean;
    v += c * c;
  }
  const float rstd = rsqrtf(block_sum(v, red) / d + eps);
  for (int k = threadIdx.x; k < d; k += blockDim.x)
    row[k] = __float2bfloat16((__bfloat162float(row[k]) - mean) * rstd * __bfloat162float(w[k]) +
                              __bfloat162float(bias[k]));
}

// Staged GEMV input for a thought: x = src (+ add), rounded [block 0 writes it to out_a, row stride lda];
// with feedback x = ln_f(x) + wpe[position + j] [block 0 writes it to out_b]; xs = LayerNorm(x; wn, bn).
__device__ void stage_ln(const ThoughtArgs& a, const bf16* src, const bf16* add, bf16* out_a, int lda, bool feedback,
                         int j, bf16* out_b, const bf16* wn, const bf16* bn, bf16* xs, float* red) {
  const int d = a.d;
  for (int b = 0; b < a.B; ++b) {
    bf16* row = xs + (size_t)b * d;
    for (int k = threadIdx.x; k < d; k += blockDim.x) {
      float x = ld(src + (size_t)b * d + k);
      if (add != nullptr) x = rnd(x + ld(add + (size_t)b * d + k));
      row[k] = __float2bfloat16(x);
      if (blockIdx.x == 0 && out_a != nullptr) out_a[(size_t)b * lda + k] = __float2bfloat16(x);
    }
    if (feedback) {
      layer_norm_row(row, d, a.ln_f_w, a.ln_f_b, a.eps, red);
      const bf16* pe = a.wpe + (size_t)(a.positions[b] + j) * d;
      for (int k = threadIdx.x; k < d; k += blockDim.x) {
        const bf16 x = __float2bfloat16(__bfloat162float(row[k]) + __bfloat162float(pe[k]));
        row[k] = x;
        if (blockIdx.x == 0) out_b[(size_t)b * d + k] = x;
      }
    }
    layer_norm_row(row, d, wn, bn, a.eps, red);
  }
  __syncthreads();
}

__device__ __forceinline__ float gelu_tanh(float x) {
  return 0.5f * x * (1.f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x)));
}

template <int MB>
__global__ void __launch_bounds__(kThreads, 1) thought_loop_kernel(const ThoughtArgs a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16* xs = reinterpret_cast<bf16*>(smem_raw);
  __shared__ float red[kWarps + 2 * kWarps + kWarps * kMaxHeadDim];
  __shared__ uint8_t act[kMaxB];
  if (threadIdx.x < kMaxB) act[threadIdx.x] = threadIdx.x < a.B ? a.active[threadIdx.x] : 0;
  __syncthreads();
  const int B = a.B, d = a.d, I = a.I;
  for (int j = 0; j < a.k; ++j) {
    const int pos = a.pos0 + j;
    for (int i = 0; i < a.n_layers; ++i) {
      const Gpt2Layer L = a.layers[i];
      if (i == 0)  // feedback: the previous position's hidden state -> this thought's residual input
        stage_ln(a, j == 0 ? a.h_in : a.x_b, j == 0 ? nullptr : a.mo, j == 0 ? nullptr : a.out + (size_t)(j - 1) * d,
                 a.k * d, true, j, a.x_a, L.ln1_w, L.ln1_b, xs, red);
      else
        stage_ln(a, a.x_b, a.mo, a.x_a, d, false, j, nullptr, L.ln1_w, L.ln1_b, xs, red);
      gemv<MB, 1>(a, L.attn_w, d, 3 * d, d, xs, nullptr, 0, Row1{}, [&](int n, auto& acc) {
        const int part = n / d, local = n % d, head = local / a.D, dd = local % a.D;
        const float bias = __bfloat162float(L.attn_b[n]);
#pragma unroll
        for (int b = 0; b < MB; ++b) {
          if (b >= B || !act[b]) continue;
          const bf16 v = __float2bfloat16(acc[0][b] + bias);
          if (part == 0)
            a.q[(size_t)b * d + local] = v;
          else
            (part == 1 ? L.k : L.v)[(((size_t)b * a.H + head) * a.T + pos) * a.D + dd] = v;
        }
      });
      grid_sync(a);
      attention(a, L.k, L.v, pos, 0, false, act, L.scale, red + kWarps);
      grid_sync(a);
      gemv<MB, 1>(a, L.proj_w, d, d, d, nullptr, a.y, d, Row1{}, [&](int n, auto& acc) {
        const float bias = __bfloat162float(L.proj_b[n]);
#pragma unroll
        for (int b = 0; b < MB; ++b)
          if (b < B && act[b]) a.o[(size_t)b * d + n] = __float2bfloat16(acc[0][b] + bias);
      });
      grid_sync(a);
      stage_ln(a, a.x_a, a.o, a.x_b, d, false, j, nullptr, L.ln2_w, L.ln2_b, xs, red);
      gemv<MB, 1>(a, L.fc_w, d, I, d, xs, nullptr, 0, Row1{}, [&](int n, auto& acc) {
        const float bias = __bfloat162float(L.fc_b[n]);
#pragma unroll
        for (int b = 0; b < MB; ++b)
          if (b < B && act[b]) a.g[(size_t)b * I + n] = __float2bfloat16(gelu_tanh(rnd(acc[0][b] + bias)));
      });
      grid_sync(a);
      gemv<MB, 1>(a, L.out_w, I, d, I, nullptr, a.g, I, Row1{}, [&](int n, auto& acc) {
        const float bias = __bfloat162float(L.out_b[n]);
#pragma unroll
        for (int b = 0; b < MB; ++b)
          if (b < B && act[b]) a.mo[(size_t)b * d + n] = __float2bfloat16(acc[0][b] + bias);
      });
      grid_sync(a);
    }
  }
  if (blockIdx.x == 0)  // the last thought's hidden state
    for (int b = 0; b < B; ++b)
      for (int k = threadIdx.x; k < d; k += blockDim.x)
        a.out[((size_t)b * a.k + a.k - 1) * d + k] =
            __float2bfloat16(rnd(ld(a.x_b + (size_t)b * d + k) + ld(a.mo + (size_t)b * d + k)));
}

// The instantiation for a batch: per-row accumulators live in registers, so fewer rows, fewer registers.
const void* kernel_for(int batch) {
  if (batch <= 1) return reinterpret_cast<const void*>(latent_loop_kernel<1>);
  if (batch <= 4) return reinterpret_cast<const void*>(latent_loop_kernel<4>);
  if (batch <= 8) return reinterpret_cast<const void*>(latent_loop_kernel<8>);
  return reinterpret_cast<const void*>(latent_loop_kernel<16>);
}

const void* thought_kernel_for(int batch) {
  if (batch <= 1) return reinterpret_cast<const void*>(thought_loop_kernel<1>);
  if (batch <= 4) return reinterpret_cast<const void*>(thought_loop_kernel<4>);
  if (batch <= 8) return reinterpret_cast<const void*>(thought_loop_kernel<8>);
  return reinterpret_cast<const void*>(thought_loop_kernel<16>);
}

// Grid and shared memory for a cooperative launch of `kernel`, whose every block stages the batch's rows of
// width d in bf16 (smem = batch x d x 2 bytes); "" when it fits.
std::string cooperative_plan(const void* kernel, int batch, int d, int device, int* grid, int* smem_bytes) {
  const int smem = batch * d * 2;
  int sms = 0, optin = 0, coop = 0;  // single attributes: cheap, unlike cudaGetDeviceProperties
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, device) != cudaSuccess)
    return "cannot read device attributes";
  cudaFuncAttributes attr;
  if (cudaFuncGetAttributes(&attr, kernel) != cudaSuccess) return "cannot read the kernel's attributes";
  if (smem + (int)attr.sharedSizeBytes > optin)
    return "staged rows (" + std::to_string(smem) + " B) exceed the shared memory per block (" +
           std::to_string(optin) + " B)";
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem) != cudaSuccess)
    return "cannot opt in to " + std::to_string(smem) + " B of shared memory";
  int per_sm = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem) != cudaSuccess || per_sm < 1)
    return "the kernel does not fit on an SM (registers or shared memory)";
  if (!coop) return "the device does not support cooperative launches";
  *grid = sms;  // one block per SM: every block resident, all SMs streaming weights
  *smem_bytes = smem;
  return "";
}

void to_layer(const latentrt::SandwichLayer& s, Layer* l) {
  auto p = [](uint64_t v) { return reinterpret_cast<bf16*>(v); };
  *l = Layer{p(s.norm_1), p(s.norm_2), p(s.norm_3), p(s.norm_4), p(s.wqkv), p(s.qk_bias),
             p(s.wo),     p(s.wfc),    p(s.wproj),  p(s.k_cache), p(s.v_cache), s.slots};
}

}  // namespace

namespace latentrt {

long long loop_scratch_elems(const LoopArgs& a) {
  const long long B = a.batch, d = a.d, hd = (long long)a.n_head * a.head_dim;
  return B * (4 * d + 2 * hd + a.ffn);  // h_a h_b o mo | q y | g
}

std::string loop_plan(const LoopArgs& a, int device, int* grid, int* smem_bytes) {
  if (a.batch < 1 || a.batch > kMaxB) return "batch " + std::to_string(a.batch) + " > " + std::to_string(kMaxB);
  if ((int)a.core.size() > kMaxCore || (int)a.coda.size() > kMaxCoda) return "too many layers";
  if (a.head_dim > kMaxHeadDim || a.head_dim % 2) return "head_dim must be even and <= 128";
  if (a.n_head % a.n_kv) return "n_head must be a multiple of n_kv";
  if (a.d % 8 || a.ffn % 8 || (a.n_head * a.head_dim) % 8 || a.ld_adapter % 8)
    return "widths must be multiples of 8 (16-byte loads)";
  if (a.criterion == 3 && (a.lm_head == 0 || a.ln_f == 0)) return "criterion kl needs the head weights";
  return cooperative_plan(kernel_for(a.batch), a.batch, a.d, device, grid, smem_bytes);
}

int latent_loop(const LoopArgs& h, int device) {
  int grid = 0, smem = 0;
  if (!loop_plan(h, device, &grid, &smem).empty()) return 1;
  Args a;
  a.B = h.batch;
  a.d = h.d;
  a.H = h.n_head;
  a.Hkv = h.n_kv;
  a.D = h.head_dim;
  a.I = h.ffn;
  a.T = h.max_len;
  a.V = h.vocab;
  a.pos = h.pos;
  a.r_max = h.r_max;
  a.min_steps = h.min_steps;
  a.criterion = h.criterion;
  a.n_core = (int)h.core.size();
  a.n_coda = (int)h.coda.size();
  a.ld_adapter = h.ld_adapter;
  a.eps = h.eps;
  a.threshold = h.threshold;
  for (int i = 0; i < a.n_core; ++i) to_layer(h.core[i], &a.core[i]);
  for (int i = 0; i < a.n_coda; ++i) to_layer(h.coda[i], &a.coda[i]);
  a.adapter = reinterpret_cast<const bf16*>(h.adapter);
  a.term = reinterpret_cast<const bf16*>(h.term);
  a.ln_f = reinterpret_cast<const bf16*>(h.ln_f);
  a.lm_head = reinterpret_cast<const bf16*>(h.lm_head);
  a.cos = reinterpret_cast<const float*>(h.cos);
  a.sin = reinterpret_cast<const float*>(h.sin);
  a.valid = reinterpret_cast<const uint8_t*>(h.valid);
  a.written = reinterpret_cast<int64_t*>(h.written);
  a.state = reinterpret_cast<bf16*>(h.state);
  a.active = reinterpret_cast<uint8_t*>(h.active);
  a.used = reinterpret_cast<int64_t*>(h.used);
  a.logits = reinterpret_cast<float*>(h.logits);
  a.prev_logp = reinterpret_cast<float*>(h.prev_logp);
  bf16* w = reinterpret_cast<bf16*>(h.scratch);
  const size_t Bd = (size_t)h.batch * h.d, Bhd = (size_t)h.batch * h.n_head * h.head_dim;
  a.h_a = w;
  a.h_b = w + Bd;
  a.o = w + 2 * Bd;
  a.mo = w + 3 * Bd;
  a.q = w + 4 * Bd;
  a.y = a.q + Bhd;
  a.g = a.y + Bhd;
  a.barrier = reinterpret_cast<unsigned*>(h.barrier);
  a.barrier_mode = h.barrier_mode;
  void* params[] = {&a};
  const cudaError_t err = cudaLaunchCooperativeKernel(kernel_for(h.batch), dim3(grid),
                                                      dim3(kThreads), params, smem,
                                                      reinterpret_cast<cudaStream_t>(h.stream));
  return err == cudaSuccess ? 0 : 2;
}

long long thought_scratch_elems(const ThoughtLoopArgs& a) {
  const long long B = a.batch, d = a.d;
  return B * (6 * d + a.ffn);  // x_a x_b q y o mo | g
}

long long thought_table_bytes(const ThoughtLoopArgs& a) { return (long long)a.layers.size() * sizeof(Gpt2Layer); }

std::string thought_plan(const ThoughtLoopArgs& a, int device, int* grid, int* smem_bytes) {
  if (a.batch < 1 || a.batch > kMaxB) return "batch " + std::to_string(a.batch) + " > " + std::to_string(kMaxB);
  if (a.head_dim > kMaxHeadDim || a.n_head * a.head_dim != a.d) return "head_dim must be d / n_head <= 128";
  if (a.d % 8 || a.ffn % 8) return "widths must be multiples of 8 (16-byte loads)";
  if (a.n_thoughts < 1 || a.layers.empty()) return "nothing to run";
  return cooperative_plan(thought_kernel_for(a.batch), a.batch, a.d, device, grid, smem_bytes);
}

int thought_loop(const ThoughtLoopArgs& h, int device) {
  int grid = 0, smem = 0;
  if (!thought_plan(h, device, &grid, &smem).empty()) return 1;
  auto bp = [](uint64_t v) { return reinterpret_cast<bf16*>(v); };
  std::vector<Gpt2Layer> table;
  for (const auto& l : h.layers)
    table.push_back(Gpt2Layer{bp(l.ln_1_w), bp(l.ln_1_b), bp(l.attn_w), bp(l.attn_b), bp(l.proj_w), bp(l.proj_b),
                              bp(l.ln_2_w), bp(l.ln_2_b), bp(l.fc_w), bp(l.fc_b), bp(l.out_w), bp(l.out_b),
                              bp(l.k_cache), bp(l.v_cache), l.scale});
  const cudaStream_t stream = reinterpret_cast<cudaStream_t>(h.stream);
  // pageable source: the copy is staged before cudaMemcpyAsync returns, so `table` may go out of scope
  if (cudaMemcpyAsync(reinterpret_cast<void*>(h.layer_table), table.data(), table.size() * sizeof(Gpt2Layer),
                      cudaMemcpyHostToDevice, stream) != cudaSuccess)
    return 2;
  ThoughtArgs a;
  a.B = h.batch;
  a.d = h.d;
  a.H = a.Hkv = h.n_head;
  a.D = h.head_dim;
  a.I = h.ffn;
  a.T = h.max_len;
  a.k = h.n_thoughts;
  a.pos0 = h.pos;
  a.n_layers = (int)h.layers.size();
  a.eps = h.eps;
  a.layers = reinterpret_cast<const Gpt2Layer*>(h.layer_table);
  a.ln_f_w = bp(h.ln_f_w);
  a.ln_f_b = bp(h.ln_f_b);
  a.wpe = bp(h.wpe);
  a.positions = reinterpret_cast<const int64_t*>(h.positions);
  a.h_in = bp(h.h);
  a.out = bp(h.out);
  a.valid = reinterpret_cast<const uint8_t*>(h.valid);
  a.written = nullptr;
  a.active = reinterpret_cast<const uint8_t*>(h.active);
  bf16* w = bp(h.scratch);
  const size_t Bd = (size_t)h.batch * h.d;
  a.x_a = w;
  a.x_b = w + Bd;
  a.q = w + 2 * Bd;
  a.y = w + 3 * Bd;
  a.o = w + 4 * Bd;
  a.mo = w + 5 * Bd;
  a.g = w + 6 * Bd;
  a.barrier = reinterpret_cast<unsigned*>(h.barrier);
  a.barrier_mode = h.barrier_mode;
  void* params[] = {&a};
  return cudaLaunchCooperativeKernel(thought_kernel_for(h.batch), dim3(grid), dim3(kThreads), params, smem, stream) ==
                 cudaSuccess
             ? 0
             : 2;
}

}  // namespace latentrt
