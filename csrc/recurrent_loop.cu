// The persistent recurrent-loop kernel: all core iterations of one generated token in one launch. It runs the
// latent loop of latentrt/recurrence.py (the one description of its rules) on the device.
//
// One block per SM (cooperative launch, so every block is resident) walks a fixed sequence of phases,
// separated by grid-wide barriers; every phase spreads its work over all warps of the grid:
//   iteration t:  adapter GEMV (W[:, :d] s + the token's precomputed W[:, d:] e term)
//     per core layer:  QKV GEMV (norm_1 in the prologue; qk_bias + RoPE + K/V slot write in the epilogue)
//                      -> decode attention (slot rule min(t mod K, n_p - 1)) -> Wo GEMV
//                      -> gated fc GEMV (residual + norm_2 + norm_3 in the prologue, silu * up after)
//                      -> proj GEMV (its residual + norm_4 is folded into the next prologue)
//     exit phase:      new state, used += 1; at a check (rule 3 of latentrt/recurrence.py: t >= min_steps and
//                      (t - min_steps) % check_every == 0) the latent-diff / cosine test against the state of
//                      the previous check (ref_state) -> sequences that exit freeze
//     (criterion kl:   at a check, coda layers + ln_f + lm_head + log-softmax KL, also in the kernel)
// Norm prologues are computed redundantly by every block into shared memory (B x d bf16): cheaper than
// a barrier. The host does nothing until the kernel ends; iterations used per sequence go to `used`.
//
// Rounding follows the PyTorch reference in bf16: products accumulate in fp32 and are rounded to bf16
// where the reference materialises a bf16 tensor (see kernels/ for the same rules in Triton).
// Data written inside the launch is read with ld.global.cg (L2), never through the incoherent L1.
#include "loop_common.cuh"
#include "recurrent_loop.h"

namespace {

using namespace latentrt_loop;
constexpr int kMaxCore = 8;
constexpr int kMaxCoda = 4;

struct Layer {
  const bf16 *n1, *n2, *n3, *n4, *wqkv, *qk_bias, *wo, *wfc, *wproj;
  bf16 *k, *v;
  int slots;
};

struct Args {
  int B, d, H, Hkv, D, I, T, V, pos, r_max, min_steps, check_every, criterion, n_core, n_coda, ld_adapter;
  float eps, threshold;
  Layer core[kMaxCore], coda[kMaxCoda];
  const bf16 *adapter, *term, *ln_f, *lm_head;
  const float *cos, *sin;
  const uint8_t* valid;
  int64_t* written;
  bf16* state;
  bf16* ref_state;  // the state at the previous check (latent-diff / cosine compare against it)
  uint8_t* active;
  int64_t* used;
  float *logits, *prev_logp;
  bf16 *h_a, *h_b, *q, *y, *o, *g, *mo;  // workspace
  unsigned* barrier;
  int barrier_mode;
};

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
    // exit phase: the new state (norm_4 of the last layer), iterations used, latent-diff / cosine at a check
    const bool check = a.criterion != 0 && t >= a.min_steps && (t - a.min_steps) % a.check_every == 0;
    if (blockIdx.x == 0) {  // one block: B rows of d elements
      for (int b = 0; b < B; ++b) {
        if (!act[b]) continue;
        latentrt_device::StateSums sums;
        float ss = 0.f;
        for (int k = threadIdx.x; k < d; k += blockDim.x) {
          const float x = rnd(ld(src + (size_t)b * d + k) + ld(add + (size_t)b * d + k));
          ss += x * x;
        }
        const float r = rsqrtf(block_sum(ss, red) / d + a.eps);
        for (int k = threadIdx.x; k < d; k += blockDim.x) {
          const float x = rnd(ld(src + (size_t)b * d + k) + ld(add + (size_t)b * d + k));
          const float s_new = rnd(rnd(x * r) * __bfloat162float(w_pend[k]));
          sums.add(s_new, ld(a.ref_state + (size_t)b * d + k));
          a.state[(size_t)b * d + k] = __float2bfloat16(s_new);
          if (check) a.ref_state[(size_t)b * d + k] = __float2bfloat16(s_new);
        }
        sums.diff = block_sum(sums.diff, red);
        sums.nn = block_sum(sums.nn, red);
        sums.dot = block_sum(sums.dot, red);
        sums.np = block_sum(sums.np, red);
        if (threadIdx.x == 0) {
          a.used[b] += 1;
          if (check && sums.value(a.criterion) < a.threshold) a.active[b] = 0;
        }
      }
    }
    grid_sync(a);
    if (a.criterion != 3 || !check) continue;
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
      if (threadIdx.x == 0 && kl < a.threshold) a.active[b] = 0;
    }
    grid_sync(a);
  }
}


// The instantiation for a batch: per-row accumulators live in registers, so fewer rows, fewer registers.
const void* kernel_for(int batch) {
  if (batch <= 1) return reinterpret_cast<const void*>(latent_loop_kernel<1>);
  if (batch <= 4) return reinterpret_cast<const void*>(latent_loop_kernel<4>);
  if (batch <= 8) return reinterpret_cast<const void*>(latent_loop_kernel<8>);
  return reinterpret_cast<const void*>(latent_loop_kernel<16>);
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
  if (a.batch < 1 || a.batch > kMaxB)
    return "batch " + std::to_string(a.batch) + " is outside 1.." + std::to_string(kMaxB);
  if ((int)a.core.size() > kMaxCore || (int)a.coda.size() > kMaxCoda) return "too many layers";
  if (a.head_dim > kMaxHeadDim || a.head_dim % 2) return "head_dim must be even and <= 128";
  if (a.n_kv < 1 || a.n_head % a.n_kv) return "n_head must be a multiple of n_kv";
  if (a.d % 8 || a.ffn % 8 || (a.n_head * a.head_dim) % 8 || a.ld_adapter % 8)
    return "widths must be multiples of 8 (16-byte loads)";
  if (a.criterion == 3 && (a.lm_head == 0 || a.ln_f == 0)) return "criterion kl needs the head weights";
  if (a.check_every < 1 || a.min_steps < 0) return "check_every must be >= 1 and min_steps >= 0";
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
  a.check_every = h.check_every;
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
  a.ref_state = reinterpret_cast<bf16*>(h.ref_state);
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

}  // namespace latentrt
