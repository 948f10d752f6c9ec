// The streamed-weight persistent loop (issue #11 §2): every core iteration of one generated token in one
// launch, like recurrent_loop.cu, rebuilt so that the weight stream never waits for activations. It runs the
// latent loop of latentrt/recurrence.py (the one description of its rules: iteration t writes K/V slot
// t mod K, the lookup min(t mod K, n_p - 1) with `written`, checks at t >= min_steps every check_every,
// latent-diff / cosine against the state of the previous check; KL against the log-probs of the previous
// check, its coda + lm_head streamed only in the iterations that check).
//
// One CTA per SM (cooperative launch: all resident). Warp 0 streams the CTA's byte-balanced share of every
// weight matrix of an iteration (adapter W[:, :d], then per core layer Wqkv, Wo, Wfc, Wproj), r_max times,
// through the shared-memory ring of stream_ring.cuh, on the plan of stream_plan.h (split-K where a matrix
// has too few row tiles per SM). Warps 1-8 consume, and order themselves across CTAs with one monotonic
// counter (a consumer-only barrier: the producer keeps streaming the next matrices meanwhile). Phases of
// iteration t, each ended by that barrier:
//   ADAPT  acc_a = W[:, :d] s                          (GEMV; every GEMV's sums are fp32, split-K by atomics)
//   N1     h = rnd(rnd(acc_a) + term) -> hx; sum h^2   (norm statistics: each CTA its column slice, one
//   N3     xs = norm_1(hx)                              atomic per row, so no CTA reads a whole row)
//   per core layer:
//     QKV    acc_qkv = Wqkv xs
//     ATT    q, k, v from acc_qkv (rounded, qk_bias, RoPE), this position's K/V written to its slot,
//            attention over the row's positions (slot rule above) -> y: split over positions, one
//            (row, head, split) item per consumer warp of the grid, merged by the last item of each head
//            (attend_split, the default); or one (row, head) per CTA (attend, LoopArgs.split_attention 0)
//     WO     acc_o = Wo y
//     N1/N2/N3  v = rnd(hx + rnd(acc_o)); hb = norm_2(v); xs = norm_3(hb)
//     FC     acc_fc = Wfc xs                    G  g = rnd(silu(rnd(gate))) * rnd(up)
//     PROJ   acc_p = Wproj g
//     N1/N2/N3  v = rnd(hb + rnd(acc_p)); hx = norm_4(v); xs = norm_1 of the next layer
//   last layer's N1/N2 (exit): s = norm_4(v) -> state; at a check the criterion's sums -> every CTA
//   takes the same decision; rows that exit freeze (no more K/V, state or used writes).
//   KL at a check (kl_head): hx = ln_f(s), each coda layer as above (its K/V in slot 0), xs = ln_f of the
//   last, HEAD acc_logits = lm_head xs, then one CTA per row: logits, log-softmax, KL -> `active`.
// When every row has exited the consumers stop and tell the producer (shared memory); it drains the copies
// in flight and stops too. fp32 accumulators are zeroed two phases after their last reader (see `run`).
//
// Rounding follows the PyTorch reference in bf16 like recurrent_loop.cu (fp32 sums rounded to bf16 where
// the reference materialises a bf16 tensor); split-K and the atomics change the order of the fp32 sums, so
// results agree within bf16 tolerance, not bit for bit. Data written inside the launch is read through L2.
#include <climits>
#include <map>
#include <mutex>
#include <tuple>

#include "stream_attention.cuh"
#include "stream_host.cuh"
#include "stream_loop.h"
#include "stream_tensor_map.h"

namespace {

using namespace latentrt_ring;
using latentrt_device::StateSums;
using latentrt_device::warp_sum;
using latentrt_stream::Plan;

constexpr int kMaxCore = 8;
constexpr int kMaxCoda = 4;
constexpr int kOpsPerLayer = 4;
constexpr int kMaxOps = 1 + kOpsPerLayer * (kMaxCore + kMaxCoda) + 1;  // adapter, core, coda, lm_head
constexpr int kKL = 3;  // LoopArgs.criterion of KL
constexpr int kStatsRing = 4;           // norm instances whose statistics are live at once (see norm_stats)

struct Layer {
  const bf16 *n1, *n2, *n3, *n4, *qk_bias;
  bf16 *k, *v;
  int slots;
};

struct Args {
  Op ops[kMaxOps];  // adapter, per core layer qkv, wo, fc, proj; KL: per coda layer the same, lm_head
  Layer core[kMaxCore], coda[kMaxCoda];
  Ring ring;
  int B, d, H, Hkv, D, I, T, V, pos, r_max, min_steps, check_every, criterion, n_core, n_coda;
  const int64_t* pos_ptr;  // non-null: the timeline index is read here (a launch captured in a CUDA graph)
  float eps, threshold;
  const bf16* term;
  const float *cos, *sin;
  const uint8_t* valid;
  int64_t* written;
  bf16 *state, *ref_state;
  uint8_t* active;
  int64_t* used;
  const bf16* ln_f;         // KL only
  float *logits, *prev_logp;  // KL only: [B, V] the logits of each row's last check; the log-probs before
  bf16 *xs, *hx, *hb, *y, *g;                      // bf16 workspace
  float *acc_a, *acc_qkv, *acc_o, *acc_fc, *acc_p;  // fp32 sums of the GEMVs
  float* acc_logits;                                // KL only: lm_head's sums [B, V], else null
  float* stats;                                     // [kStatsRing][2][kMaxBatch] norm statistics
  float* exit_sums;                                 // [2][kMaxBatch][4] criterion sums, by iteration parity
  float* att_part;     // split attention: per item (row, head, split) m, l, then D sums (see attend_split)
  unsigned* att_count;  // split attention: [B * H] items arrived, cumulative over the launch
  int att_split_max;    // 0: attention one (row, head) per CTA (attend); else at most this many splits
  float* zero_from;                                 // the fp32 sums and counters, zeroed at the start
  size_t zero_count;
  unsigned* counter;
  Watch watch;  // status null: no watchdog
};

static_assert(sizeof(Args) <= 4096, "the launch's arguments stay within the classic 4 KB parameter space");

// The consumers' state in one CTA: ring cursor, barrier phase, norm instance, rows still running.
struct Consumer {
  Cursor cur;
  unsigned phase = 0, norm = 0;
  int pos = 0;  // the token's timeline index (from the device where the launch is captured in a graph)
  int splits = 1;  // split attention: splits per (row, head) in this launch (the same positions throughout)
};

// Every CTA's consumers have finished the phase (their writes visible) before any goes on.
__device__ __forceinline__ void sync(const Args& a, Consumer& c) { grid_step(a.counter, c.phase, &a.watch); }

// This CTA's columns [c0, c1) of a width-n row (every CTA a contiguous slice).
__device__ __forceinline__ void slice(int n, int* c0, int* c1) {
  *c0 = (int)((long long)blockIdx.x * n / gridDim.x);
  *c1 = (int)((long long)(blockIdx.x + 1) * n / gridDim.x);
}

// For every running row b: f(b, k) over this CTA's columns k of a width-d row, the sum of what it returns
// added to sums[b] (one atomic per row and CTA; sums null: none).
template <class F>
__device__ void over_slice(const Args& a, const uint8_t* act, float* sums, F f) {
  int c0, c1;
  slice(a.d, &c0, &c1);
  const int lane = lane_id();
  for (int b = consumer_warp(); b < a.B; b += kConsumerWarps) {
    if (!act[b]) continue;
    float s = 0.f;
    for (int k = c0 + lane; k < c1; k += 32) s += f(b, k);
    if (sums != nullptr) {
      s = warp_sum(s);
      if (lane == 0) atomicAdd(sums + b, s);
    }
  }
}

// Huginn's RMSNorm of value v with row statistic ss: fp32 v * rsqrt(mean(v^2) + eps), rounded, times the
// weight, rounded.
__device__ __forceinline__ float rms(float v, float ss, float eps, int d, const bf16* w, int k) {
  return rnd(rnd(v * rsqrtf(ss / d + eps)) * __bfloat162float(w[k]));
}

// Norm statistics of instance c.norm: [2][kMaxBatch] (sum of v^2, sum of norm(v)^2). The buffer of instance
// n + 2 is zeroed at instance n: its last reader (instance n - 2's N3) finished at least one barrier ago,
// and its next writer comes at least one barrier later.
__device__ float* norm_stats(const Args& a, Consumer& c) {
  float* mine = a.stats + (size_t)(c.norm % kStatsRing) * 2 * kMaxBatch;
  if (blockIdx.x == 0 && consumer_thread() < 2 * kMaxBatch)
    a.stats[(size_t)((c.norm + 2) % kStatsRing) * 2 * kMaxBatch + consumer_thread()] = 0.f;
  ++c.norm;
  return mine;
}

// The residual after a sublayer, then the pending norm and the next layer's input norm:
//   v = rnd(res + rnd(acc)) (acc null: v = res); out = norm_pend(v); xs = norm_next(out)   (three phases)
__device__ void add_norm_norm(const Args& a, Consumer& c, const uint8_t* act, const bf16* res, const float* acc,
                              const bf16* w_pend, bf16* out, const bf16* w_next) {
  float* st = norm_stats(a, c);
  const int d = a.d;
  auto v_at = [&](int b, int k) {
    const float r = ldb(res + (size_t)b * d + k);
    return acc == nullptr ? r : rnd(r + rnd(__ldcg(acc + (size_t)b * d + k)));
  };
  over_slice(a, act, st, [&](int b, int k) {
    const float v = v_at(b, k);
    return v * v;
  });
  sync(a, c);
  over_slice(a, act, st + kMaxBatch, [&](int b, int k) {
    const float x = rms(v_at(b, k), __ldcg(st + b), a.eps, d, w_pend, k);
    out[(size_t)b * d + k] = __float2bfloat16(x);
    return x * x;
  });
  sync(a, c);
  over_slice(a, act, nullptr, [&](int b, int k) {
    a.xs[(size_t)b * d + k] = __float2bfloat16(rms(ldb(out + (size_t)b * d + k), __ldcg(st + kMaxBatch + b), a.eps, d, w_next, k));
    return 0.f;
  });
  sync(a, c);
}

// One (row, head) item per CTA at a time: this position's q, k, v from the QKV sums (rounded, qk_bias,
// interleaved RoPE in fp32), its K/V written to `slot`, then attention over positions [0, pos]: warps
// take positions in turn (online softmax), merged in shared memory.
__device__ void attend(const Args& a, const Layer& L, int pos, int slot, bool use_written, const uint8_t* act,
                       float* sm) {
  const int lane = lane_id(), cw = consumer_warp(), D = a.D, H = a.H, Hkv = a.Hkv, group = H / Hkv;
  const int qkv = (H + 2 * Hkv) * D;
  const float scale = rsqrtf((float)D);
  float* sm_m = sm;
  float* sm_l = sm + kConsumerWarps;
  float* sm_acc = sm + 2 * kConsumerWarps;  // [kConsumerWarps][kMaxHeadDim]
  for (int item = blockIdx.x; item < a.B * H; item += gridDim.x) {
    const int b = item / H, h = item % H, hk = h / group;
    if (!act[b]) continue;  // uniform across the CTA
    const float* acc = a.acc_qkv + (size_t)b * qkv;
    float qf[kDims], kf[kDims], vf[kDims];
#pragma unroll
    for (int i = 0; i < kDims; ++i) {
      const int dd = lane + 32 * i;
      const bool in = dd < D;
      float q = in ? rnd(__ldcg(acc + h * D + dd)) : 0.f;
      float k = in ? rnd(__ldcg(acc + (H + hk) * D + dd)) : 0.f;
      vf[i] = in ? rnd(__ldcg(acc + (H + Hkv + hk) * D + dd)) : 0.f;
      if (in && L.qk_bias != nullptr) {
        q = rnd(q + __bfloat162float(L.qk_bias[h * D + dd]));
        k = rnd(k + __bfloat162float(L.qk_bias[(size_t)H * D + hk * D + dd]));
      }
      const float qp = __shfl_xor_sync(0xffffffffu, q, 1), kp = __shfl_xor_sync(0xffffffffu, k, 1);
      const float cs = in ? a.cos[(size_t)b * (D / 2) + dd / 2] : 0.f, sn = in ? a.sin[(size_t)b * (D / 2) + dd / 2] : 0.f;
      const float sign = (dd & 1) ? 1.f : -1.f;  // (x0, x1) -> (x0 c - x1 s, x1 c + x0 s)
      qf[i] = rnd(q * cs + sign * qp * sn);
      kf[i] = rnd(k * cs + sign * kp * sn);
    }
    if (h % group == 0 && cw == 0) {  // this position's K/V entry (one writer per KV head)
      const size_t off = ((((size_t)slot * a.B + b) * Hkv + hk) * a.T + pos) * D;
#pragma unroll
      for (int i = 0; i < kDims; ++i) {
        const int dd = lane + 32 * i;
        if (dd < D) {
          L.k[off + dd] = __float2bfloat16(kf[i]);
          L.v[off + dd] = __float2bfloat16(vf[i]);
        }
      }
    }
    float m_i = -INFINITY, l_i = 0.f, o[kDims];
#pragma unroll
    for (int i = 0; i < kDims; ++i) o[i] = 0.f;
    for (int t = cw; t <= pos; t += kConsumerWarps) {
      const bool here = t == pos;
      if (!here && !a.valid[(size_t)b * a.T + t]) continue;
      int sl = slot;
      if (use_written && !here) {
        const long long n = __ldcg(reinterpret_cast<const long long*>(a.written) + (size_t)b * a.T + t) - 1;
        sl = n < 0 ? 0 : (n < slot ? (int)n : slot);
      }
      const size_t base = ((((size_t)sl * a.B + b) * Hkv + hk) * a.T + t) * D;
      float dot = 0.f;
#pragma unroll
      for (int i = 0; i < kDims; ++i) {
        const int dd = lane + 32 * i;
        if (dd < D) dot += qf[i] * (here ? kf[i] : ldb(L.k + base + dd));
      }
      const float s = warp_sum(dot) * scale;
      const float m_new = fmaxf(m_i, s);
      const float alpha = __expf(m_i - m_new), p = __expf(s - m_new);
#pragma unroll
      for (int i = 0; i < kDims; ++i) {
        const int dd = lane + 32 * i;
        if (dd < D) o[i] = o[i] * alpha + p * (here ? vf[i] : ldb(L.v + base + dd));
      }
      l_i = l_i * alpha + p;
      m_i = m_new;
    }
    consumers_sync();  // the previous item's merge is done with the shared arrays
    if (lane == 0) {
      sm_m[cw] = m_i;
      sm_l[cw] = l_i;
    }
#pragma unroll
    for (int i = 0; i < kDims; ++i) {
      const int dd = lane + 32 * i;
      if (dd < D) sm_acc[cw * kMaxHeadDim + dd] = o[i];
    }
    consumers_sync();
    for (int dd = consumer_thread(); dd < D; dd += 32 * kConsumerWarps) {
      float m = -INFINITY;
      for (int w = 0; w < kConsumerWarps; ++w) m = fmaxf(m, sm_m[w]);
      float num = 0.f, den = 0.f;
      for (int w = 0; w < kConsumerWarps; ++w) {
        if (sm_l[w] == 0.f) continue;
        const float f = __expf(sm_m[w] - m);
        num += sm_acc[w * kMaxHeadDim + dd] * f;
        den += sm_l[w] * f;
      }
      a.y[((size_t)b * H + h) * D + dd] = __float2bfloat16(num / den);
    }
  }
}

// q, k, v of (row b, head h) at this position for one lane's 8 dimensions [d0, d0 + 8) (attend_split's
// `build`): rounded from the QKV sums, qk_bias added, interleaved RoPE in fp32 (each pair (2i, 2i + 1) lies
// within the lane's 8), as in attend.
__device__ void qkv8(const Args& a, const Layer& L, int b, int h, int d0, float* q, float* k, float* v) {
  const int D = a.D, H = a.H, Hkv = a.Hkv, hk = h / (H / Hkv);
  const float* acc = a.acc_qkv + (size_t)b * (H + 2 * Hkv) * D;
#pragma unroll
  for (int i = 0; i < kVec; i += 4) {
    const float4 qa = __ldcg(reinterpret_cast<const float4*>(acc + h * D + d0 + i));
    const float4 ka = __ldcg(reinterpret_cast<const float4*>(acc + (H + hk) * D + d0 + i));
    const float4 va = __ldcg(reinterpret_cast<const float4*>(acc + (H + Hkv + hk) * D + d0 + i));
    q[i] = rnd(qa.x), q[i + 1] = rnd(qa.y), q[i + 2] = rnd(qa.z), q[i + 3] = rnd(qa.w);
    k[i] = rnd(ka.x), k[i + 1] = rnd(ka.y), k[i + 2] = rnd(ka.z), k[i + 3] = rnd(ka.w);
    v[i] = rnd(va.x), v[i + 1] = rnd(va.y), v[i + 2] = rnd(va.z), v[i + 3] = rnd(va.w);
  }
  if (L.qk_bias != nullptr) {
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      q[i] = rnd(q[i] + __bfloat162float(L.qk_bias[h * D + d0 + i]));
      k[i] = rnd(k[i] + __bfloat162float(L.qk_bias[(size_t)H * D + hk * D + d0 + i]));
    }
  }
#pragma unroll
  for (int i = 0; i < kVec; i += 2) {  // (x0, x1) -> (x0 c - x1 s, x1 c + x0 s)
    const float cs = a.cos[(size_t)b * (D / 2) + (d0 + i) / 2], sn = a.sin[(size_t)b * (D / 2) + (d0 + i) / 2];
    const float q0 = q[i], q1 = q[i + 1], k0 = k[i], k1 = k[i + 1];
    q[i] = rnd(q0 * cs + -1.f * q1 * sn), q[i + 1] = rnd(q1 * cs + 1.f * q0 * sn);
    k[i] = rnd(k0 * cs + -1.f * k1 * sn), k[i + 1] = rnd(k1 * cs + 1.f * k0 * sn);
  }
}

// g = rnd(silu(rnd(gate)) rounded * rnd(up)) over this CTA's slice of the I gated columns.
__device__ void gate(const Args& a, const uint8_t* act) {
  int c0, c1;
  const int I = a.I;
  c0 = (int)((long long)blockIdx.x * I / gridDim.x);
  c1 = (int)((long long)(blockIdx.x + 1) * I / gridDim.x);
  for (int b = consumer_warp(); b < a.B; b += kConsumerWarps) {
    if (!act[b]) continue;
    const float* acc = a.acc_fc + (size_t)b * 2 * I;
    for (int k = c0 + lane_id(); k < c1; k += 32) {
      const float gt = rnd(__ldcg(acc + k)), up = rnd(__ldcg(acc + I + k));
      a.g[(size_t)b * I + k] = __float2bfloat16(rnd(gt / (1.f + __expf(-gt))) * up);
    }
  }
}

// Whether iteration t checks its criterion (rule 3 of latentrt/recurrence.py); the producer and the
// consumers both ask, so the KL head's matrices stream exactly in the iterations that use them.
__device__ __forceinline__ bool checks_at(const Args& a, int t) {
  return a.criterion != 0 && t >= a.min_steps && (t - a.min_steps) % a.check_every == 0;
}

// One sandwich layer's phases from xs = norm_1(hx) to acc_p = Wproj g (its four matrices: ops[0..3]);
// the norm after it is the caller's (the next layer's input, the exit, or ln_f before the head).
template <int MB>
__device__ void sandwich(const Args& a, Consumer& c, const Smem& s, const uint8_t* act, float* sm, const Layer& L,
                         const Op* ops, int slot, bool zero_adapter) {
  const int B = a.B, d = a.d;
  consume<MB>(a.ring, ops[0], s, c.cur, true, &a.watch);  // QKV
  sync(a, c);
  zero(a.acc_p, (size_t)B * d);  // last read by the previous norm after a PROJ: two barriers ago
  if (a.att_split_max > 0) {
    const AttnIO io{a.B, a.H, a.Hkv, a.D, a.T, a.valid, a.written, a.y, a.att_part, a.att_count};
    attend_split(io, L.k, L.v, c.pos, slot, L.slots > 1, act, c.splits, rsqrtf((float)a.D),
                 [&](int b, int h, int d0, float* q, float* k, float* v) { qkv8(a, L, b, h, d0, q, k, v); });
  } else
    attend(a, L, c.pos, slot, L.slots > 1, act, sm);
  sync(a, c);
  consume<MB>(a.ring, ops[1], s, c.cur, true, &a.watch);  // WO
  sync(a, c);
  add_norm_norm(a, c, act, a.hx, a.acc_o, L.n2, a.hb, L.n3);
  zero(a.acc_qkv, (size_t)B * (a.H + 2 * a.Hkv) * a.D);  // last read by ATT
  zero(a.acc_o, (size_t)B * d);                           // last read by the norm above
  if (zero_adapter) zero(a.acc_a, (size_t)B * d);
  consume<MB>(a.ring, ops[2], s, c.cur, true, &a.watch);  // FC
  sync(a, c);
  gate(a, act);
  sync(a, c);
  consume<MB>(a.ring, ops[3], s, c.cur, true, &a.watch);  // PROJ
  sync(a, c);
}

// KL at a check: ln_f -> coda -> ln_f -> lm_head on the new state, then per row (one CTA each) the
// log-softmax, KL(previous check || now) and the logits kept for rule 5; a row under the threshold exits.
template <int MB>
__device__ void kl_head(const Args& a, Consumer& c, const Smem& s, uint8_t* act, float* sm) {
  const int B = a.B, V = a.V;
  const Op* coda_ops = a.ops + 1 + kOpsPerLayer * a.n_core;
  add_norm_norm(a, c, act, a.state, nullptr, a.ln_f, a.hx, a.coda[0].n1);
  for (int j = 0; j < a.n_coda; ++j) {
    const Layer& L = a.coda[j];
    sandwich<MB>(a, c, s, act, sm, L, coda_ops + kOpsPerLayer * j, 0, false);
    add_norm_norm(a, c, act, a.hb, a.acc_p, L.n4, a.hx, j + 1 < a.n_coda ? a.coda[j + 1].n1 : a.ln_f);
    zero(a.acc_fc, (size_t)B * 2 * a.I);  // last read by G, two barriers ago
  }
  consume<MB>(a.ring, coda_ops[kOpsPerLayer * a.n_coda], s, c.cur, true, &a.watch);  // lm_head
  sync(a, c);
  for (int b = blockIdx.x; b < B; b += gridDim.x) {
    if (!act[b]) continue;  // uniform across the CTA
    const float* acc = a.acc_logits + (size_t)b * V;
    float* lg = a.logits + (size_t)b * V;
    float* prev = a.prev_logp + (size_t)b * V;
    float m = -INFINITY;
    for (int n = consumer_thread(); n < V; n += 32 * kConsumerWarps) {
      const float l = rnd(__ldcg(acc + n));
      lg[n] = l;
      m = fmaxf(m, l);
    }
    m = consumer_max(m, sm);
    float se = 0.f;
    for (int n = consumer_thread(); n < V; n += 32 * kConsumerWarps) se += __expf(lg[n] - m);
    const float lse = m + logf(consumer_sum(se, sm));
    float kl = 0.f;
    for (int n = consumer_thread(); n < V; n += 32 * kConsumerWarps) {
      const float lp = lg[n] - lse, pp = prev[n];
      kl += expf(pp) * (pp - lp);
      prev[n] = lp;
    }
    kl = consumer_sum(kl, sm);
    if (consumer_thread() == 0 && kl < a.threshold) a.active[b] = 0;
  }
  sync(a, c);
  if (consumer_thread() < B && act[consumer_thread()] && !__ldcg(a.active + consumer_thread()))
    act[consumer_thread()] = 0;
  consumers_sync();
}

// The consumers' walk: phases of every iteration in the producer's matrix order. MB: rows of the CUDA-core
// GEMV (batch <= 4); from Ring::mma_from on (batch 5, or 1 with LoopArgs.tensor_core_gemv) tensor cores.
template <int MB>
__device__ __forceinline__ void run(const Args& a, const Smem& s, uint8_t* act, float* sm, int* stop) {
  Consumer c;
  c.pos = a.pos_ptr != nullptr ? (int)__ldcg(a.pos_ptr) : a.pos;
  c.splits = latentrt_stream::attention_splits((int64_t)a.B * a.H, c.pos + 1, gridDim.x * kConsumerWarps, a.att_split_max);
  const int B = a.B, d = a.d, ct = consumer_thread();
  int any = 0;
  for (int b = 0; b < B; ++b) any |= act[b];
  if (!any) {  // nothing to run: the producer stops at once
    if (ct == 0) set_stop(stop, -1);
    return;
  }
  zero(a.zero_from, a.zero_count);
  sync(a, c);
  for (int t = 0; t < a.r_max; ++t) {
    if (blockIdx.x == 0 && ct < B && act[ct]) a.written[(size_t)ct * a.T + c.pos] = t + 1;
    // ADAPT, then h = rnd(rnd(acc_a) + term) -> hx and xs = norm_1(hx)
    consume<MB>(a.ring, a.ops[0], s, c.cur, true, &a.watch);
    sync(a, c);
    {
      float* st = norm_stats(a, c);
      over_slice(a, act, st, [&](int b, int k) {
        const float h = rnd(rnd(__ldcg(a.acc_a + (size_t)b * d + k)) + ldb(a.term + (size_t)b * d + k));
        a.hx[(size_t)b * d + k] = __float2bfloat16(h);
        return h * h;
      });
      sync(a, c);
      over_slice(a, act, nullptr, [&](int b, int k) {
        a.xs[(size_t)b * d + k] = __float2bfloat16(rms(ldb(a.hx + (size_t)b * d + k), __ldcg(st + b), a.eps, d, a.core[0].n1, k));
        return 0.f;
      });
      sync(a, c);
    }
    if (blockIdx.x == 0 && ct < 4 * kMaxBatch)  // the other parity's criterion sums: read last iteration
      a.exit_sums[(size_t)((t + 1) % 2) * 4 * kMaxBatch + ct] = 0.f;
    if (a.criterion == kKL && checks_at(a, t))  // lm_head's sums: last read by the previous check's KL phase
      zero(a.acc_logits, (size_t)B * a.V);
    for (int j = 0; j < a.n_core; ++j) {
      const Layer& L = a.core[j];
      sandwich<MB>(a, c, s, act, sm, L, a.ops + 1 + kOpsPerLayer * j, t % L.slots, j == 0);
      if (j + 1 < a.n_core) {
        add_norm_norm(a, c, act, a.hb, a.acc_p, L.n4, a.hx, a.core[j + 1].n1);
        zero(a.acc_fc, (size_t)B * 2 * a.I);  // last read by G, two barriers ago
      }
    }
    // exit: s = norm_4(rnd(hb + rnd(acc_p))) -> state; the criterion's sums at a check; the same decision in
    // every CTA
    const Layer& last = a.core[a.n_core - 1];
    const bool check = checks_at(a, t);
    float* st = norm_stats(a, c);
    float* ex = a.exit_sums + (size_t)(t % 2) * 4 * kMaxBatch;
    auto v_at = [&](int b, int k) { return rnd(ldb(a.hb + (size_t)b * d + k) + rnd(__ldcg(a.acc_p + (size_t)b * d + k))); };
    over_slice(a, act, st, [&](int b, int k) {
      const float v = v_at(b, k);
      return v * v;
    });
    sync(a, c);
    zero(a.acc_fc, (size_t)B * 2 * a.I);  // last read by G, two barriers ago
    {
      int c0, c1;
      slice(d, &c0, &c1);
      const int lane = lane_id();
      for (int b = consumer_warp(); b < B; b += kConsumerWarps) {
        if (!act[b]) continue;
        StateSums sums;
        const float ss = __ldcg(st + b);
        for (int k = c0 + lane; k < c1; k += 32) {
          const float s_new = rms(v_at(b, k), ss, a.eps, d, last.n4, k);
          sums.add(s_new, ldb(a.ref_state + (size_t)b * d + k));
          a.state[(size_t)b * d + k] = __float2bfloat16(s_new);
          if (check) a.ref_state[(size_t)b * d + k] = __float2bfloat16(s_new);
        }
        const float part[4] = {warp_sum(sums.diff), warp_sum(sums.nn), warp_sum(sums.dot), warp_sum(sums.np)};
        if (lane == 0)
          for (int i = 0; i < 4; ++i) atomicAdd(ex + 4 * b + i, part[i]);
      }
    }
    sync(a, c);
    // the decision, from the same sums in every CTA (KL: from the head below)
    if (ct < B && act[ct]) {
      const float* e = ex + 4 * ct;
      StateSums sums;
      sums.diff = __ldcg(e), sums.nn = __ldcg(e + 1), sums.dot = __ldcg(e + 2), sums.np = __ldcg(e + 3);
      const bool exits = check && sums.value(a.criterion) < a.threshold;
      if (blockIdx.x == 0) {
        a.used[ct] += 1;
        if (exits) a.active[ct] = 0;
      }
      if (exits) act[ct] = 0;
    }
    consumers_sync();
    if (a.criterion == kKL && check) kl_head<MB>(a, c, s, act, sm);
    any = 0;
    for (int b = 0; b < B; ++b) any |= act[b];
    if (!any) {  // every row has exited: the producer stops after this iteration's stages
      if (ct == 0) set_stop(stop, t);
      return;
    }
  }
}

// The producer's walk: every iteration's core matrices, and at a KL check the coda's and lm_head.
__device__ void stream_weights(const Args& a, const Smem& s, int* stop) {
  Producer p;
  const int core = 1 + kOpsPerLayer * a.n_core, head = kOpsPerLayer * a.n_coda + 1;
  for (int t = 0; t < a.r_max; ++t) {
    for (int o = 0; o < core; ++o)
      if (!produce_op(a.ops[o], a.ring, s, p, t, stop)) return drain(a.ring, s, p);
    if (a.criterion == kKL && checks_at(a, t))
      for (int o = core; o < core + head; ++o)
        if (!produce_op(a.ops[o], a.ring, s, p, t, stop)) return drain(a.ring, s, p);
  }
  drain(a.ring, s, p);
}

template <int MB>
__global__ void __launch_bounds__(kThreads, 1) stream_loop_kernel(const __grid_constant__ Args a) {
  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ float sm[2 * kConsumerWarps + kConsumerWarps * kMaxHeadDim];  // attention's merge, reductions
  __shared__ uint8_t act[kMaxBatch];
  __shared__ int stop;
  const Smem s = smem_layout(smem, a.ring);
  if (threadIdx.x < kMaxBatch) act[threadIdx.x] = threadIdx.x < a.B ? a.active[threadIdx.x] : 0;
  if (threadIdx.x == 0) stop = INT_MAX;
  ring_init(s, a.ring);  // ends with __syncthreads
  if (threadIdx.x < 32) {
    stream_weights(a, s, &stop);
    return;
  }
  run<MB>(a, s, act, sm, &stop);
}

// The smallest batch whose GEMVs run on tensor cores (LoopArgs.tensor_core_gemv: every batch).
int mma_from(const latentrt::LoopArgs& a) { return a.tensor_core_gemv ? 1 : latentrt_stream::kMmaFromBatch; }

// The ring of a launch of plan `p`: its geometry, the weight copies and the GEMV units the arguments ask for.
Ring ring_of(const latentrt::LoopArgs& a, const Plan& p) {
  Ring g{a.batch, p.tile_rows, p.k_chunk, p.stages, p.stage_input,
         a.tensor_copy ? latentrt_ring::kCopyTensor : latentrt_ring::kCopyRows};
  g.mma_from = mma_from(a);
  return g;
}

const void* kernel_for(const latentrt::LoopArgs& a) {
  if (a.batch <= 1 || a.batch >= mma_from(a)) return reinterpret_cast<const void*>(stream_loop_kernel<1>);
  return reinterpret_cast<const void*>(stream_loop_kernel<4>);  // CUDA cores, 2-4 rows (tensor cores: MB unused)
}

// The matrices of one iteration, {rows, cols}, in the producer's order (KL: the coda's and lm_head after).
std::vector<std::pair<int64_t, int64_t>> matrices(const latentrt::LoopArgs& a) {
  const int64_t d = a.d, hd = (int64_t)a.n_head * a.head_dim, qkv = (int64_t)(a.n_head + 2 * a.n_kv) * a.head_dim;
  const std::vector<std::pair<int64_t, int64_t>> layer = {{qkv, d}, {d, hd}, {2 * (int64_t)a.ffn, d}, {d, a.ffn}};
  std::vector<std::pair<int64_t, int64_t>> m = {{d, d}};
  for (size_t j = 0; j < a.core.size(); ++j) m.insert(m.end(), layer.begin(), layer.end());
  if (a.criterion == kKL) {
    for (size_t j = 0; j < a.coda.size(); ++j) m.insert(m.end(), layer.begin(), layer.end());
    m.push_back({a.vocab, d});
  }
  return m;
}

using PlanKey = std::tuple<int, int, int, int, int, int, int, int, int, int, int, bool, bool, int>;
latentrt_stream::PlanCache<PlanKey> plans;
latentrt_ring::DeviceMaps tensor_maps;  // LoopArgs.tensor_copy: the weights' maps on the device

std::string checks(const latentrt::LoopArgs& a) {
  if (a.batch < 1 || a.batch > kMaxBatch)
    return "batch " + std::to_string(a.batch) + " is outside 1.." + std::to_string(kMaxBatch);
  if (a.core.empty() || (int)a.core.size() > kMaxCore) return "1 to " + std::to_string(kMaxCore) + " core layers";
  if (a.head_dim > kMaxHeadDim || a.head_dim % 2) return "head_dim must be even and <= 128";
  if (a.n_kv < 1 || a.n_head % a.n_kv) return "n_head must be a multiple of n_kv";
  if (a.d % 8 || a.ffn % 8 || (a.n_head * a.head_dim) % 8 || a.ld_adapter % 8)
    return "widths must be multiples of 8 (16-byte rows for the bulk copies)";
  if (a.criterion < 0 || a.criterion > 3) return "unknown exit criterion";
  if (a.criterion == kKL && (a.lm_head == 0 || a.ln_f == 0 || a.vocab < 1))
    return "criterion kl needs the head weights";
  if (a.criterion == kKL && (a.coda.empty() || (int)a.coda.size() > kMaxCoda))
    return "criterion kl: 1 to " + std::to_string(kMaxCoda) + " coda layers";
  if (a.criterion == kKL && a.vocab % 8) return "criterion kl: the vocabulary must be a multiple of 8";
  if (a.check_every < 1 || a.min_steps < 0) return "check_every must be >= 1 and min_steps >= 0";
  for (const auto& L : a.core)
    if (L.slots < 1) return "every core layer needs at least one KV slot";
  return "";
}

// The plan for a launch (cached), or the reason there is none.
std::string plan_for(const latentrt::LoopArgs& a, int device, Plan* out) {
  std::string why = checks(a);
  if (!why.empty()) return why;
  const bool kl = a.criterion == kKL;
  const PlanKey key{device,     a.batch, a.d, a.n_head, a.n_kv, a.head_dim, a.ffn, (int)a.core.size(), a.ld_adapter,
                    kl ? (int)a.coda.size() : -1, kl ? a.vocab : 0, a.stage_input != 0, a.tensor_copy != 0, mma_from(a)};
  const int64_t reserve = a.tensor_copy ? latentrt_ring::kTensorRingSlack : 0;  // the tensor ring's alignment
  why = plans.get(device, kernel_for(a), key, a.batch, a.stage_input != 0, [&] { return matrices(a); }, out, reserve,
                  mma_from(a));
  if (why.empty() && a.tensor_copy) {
    const Ring g = ring_of(a, *out);
    if (out->k_chunk % g.box_k())
      return "tensor-map copies: k_chunk " + std::to_string(out->k_chunk) + " is not a multiple of the box's " +
             std::to_string(g.box_k()) + " columns";
  }
  return why;
}

// The dynamic shared memory of a launch of plan `p`: the tensor-map ring's alignment beyond the plan's.
int launch_smem(const latentrt::LoopArgs& a, const Plan& p) {
  return (int)p.smem_bytes + (a.tensor_copy ? latentrt_ring::kTensorRingSlack : 0);
}

// Workspace layout: bf16 buffers, then the fp32 ones (zeroed by the kernel at its start).
struct Layout {
  size_t xs, hx, hb, y, g, att_part, acc_a, acc_qkv, acc_o, acc_fc, acc_p, acc_logits, stats, exit_sums, att_count, end;
};
// Split attention's most splits per (row, head) for these arguments; 0: attention one (row, head) per CTA
// (asked for, or a head_dim that is not a multiple of 8, the 16-byte loads' width).
int split_max(const latentrt::LoopArgs& a) {
  if (!a.split_attention || a.head_dim % kVec) return 0;
  return latentrt_stream::attention_split_max((int64_t)a.batch * a.n_head);
}
Layout layout(const latentrt::LoopArgs& a) {
  const size_t B = a.batch, d = a.d, hd = (size_t)a.n_head * a.head_dim, I = a.ffn;
  const size_t qkv = (size_t)(a.n_head + 2 * a.n_kv) * a.head_dim;
  Layout l;
  latentrt_stream::Carver c;
  l.xs = c.take(B * d * 2);
  l.hx = c.take(B * d * 2);
  l.hb = c.take(B * d * 2);
  l.y = c.take(B * hd * 2);
  l.g = c.take(B * I * 2);
  l.att_part = c.take(B * a.n_head * (size_t)split_max(a) * (2 + a.head_dim) * 4);  // not zeroed: written before read
  l.acc_a = c.take(B * d * 4);
  l.acc_qkv = c.take(B * qkv * 4);
  l.acc_o = c.take(B * d * 4);
  l.acc_fc = c.take(B * 2 * I * 4);
  l.acc_p = c.take(B * d * 4);
  l.acc_logits = c.take(a.criterion == kKL ? B * (size_t)a.vocab * 4 : 0);
  l.stats = c.take(kStatsRing * 2 * kMaxBatch * 4);
  l.exit_sums = c.take(2 * kMaxBatch * 4 * 4);
  l.att_count = c.take(B * a.n_head * 4);
  l.end = c.at;
  return l;
}

}  // namespace

namespace latentrt {

std::string stream_loop_plan(const LoopArgs& a, int device, int* grid, int* smem_bytes) {
  Plan p;
  const std::string why = latentrt_stream::grid_of(plan_for(a, device, &p), p, grid, smem_bytes);
  if (why.empty()) *smem_bytes = launch_smem(a, p);
  return why;
}

long long stream_loop_scratch_bytes(const LoopArgs& a) { return (long long)layout(a).end; }

std::vector<int32_t> stream_loop_table(const LoopArgs& a, int device) {
  Plan p;
  std::vector<int32_t> table;
  if (!plan_for(a, device, &p).empty()) return table;
  for (const auto& op : p.ops)
    for (int64_t f : op.cta_first) table.push_back((int32_t)f);
  return table;
}

int stream_loop(const LoopArgs& h, int device, std::string* why) {
  Plan p;
  if (!plan_for(h, device, &p).empty() || h.table == 0 || h.scratch == 0 || h.barrier == 0) return 1;
  Args a{};
  a.ring = ring_of(h, p);
  a.B = h.batch;
  a.d = h.d;
  a.H = h.n_head;
  a.Hkv = h.n_kv;
  a.D = h.head_dim;
  a.I = h.ffn;
  a.T = h.max_len;
  a.pos = h.pos;
  a.pos_ptr = reinterpret_cast<const int64_t*>(h.pos_ptr);
  a.r_max = h.r_max;
  a.min_steps = h.min_steps;
  a.check_every = h.check_every;
  a.criterion = h.criterion;
  a.n_core = (int)h.core.size();
  a.n_coda = h.criterion == kKL ? (int)h.coda.size() : 0;
  a.V = h.vocab;
  a.eps = h.eps;
  a.threshold = h.threshold;
  auto bp = [](uint64_t v) { return reinterpret_cast<bf16*>(v); };
  auto layer = [&](const SandwichLayer& s) {
    return Layer{bp(s.norm_1), bp(s.norm_2), bp(s.norm_3), bp(s.norm_4), bp(s.qk_bias), bp(s.k_cache), bp(s.v_cache), s.slots};
  };
  for (int j = 0; j < a.n_core; ++j) a.core[j] = layer(h.core[j]);
  for (int j = 0; j < a.n_coda; ++j) a.coda[j] = layer(h.coda[j]);
  a.ln_f = bp(h.ln_f);
  a.logits = reinterpret_cast<float*>(h.logits);
  a.prev_logp = reinterpret_cast<float*>(h.prev_logp);
  a.term = bp(h.term);
  a.cos = reinterpret_cast<const float*>(h.cos);
  a.sin = reinterpret_cast<const float*>(h.sin);
  a.valid = reinterpret_cast<const uint8_t*>(h.valid);
  a.written = reinterpret_cast<int64_t*>(h.written);
  a.state = bp(h.state);
  a.ref_state = bp(h.ref_state);
  a.active = reinterpret_cast<uint8_t*>(h.active);
  a.used = reinterpret_cast<int64_t*>(h.used);
  const Layout l = layout(h);
  unsigned char* w = reinterpret_cast<unsigned char*>(h.scratch);
  a.xs = reinterpret_cast<bf16*>(w + l.xs);
  a.hx = reinterpret_cast<bf16*>(w + l.hx);
  a.hb = reinterpret_cast<bf16*>(w + l.hb);
  a.y = reinterpret_cast<bf16*>(w + l.y);
  a.g = reinterpret_cast<bf16*>(w + l.g);
  a.acc_a = reinterpret_cast<float*>(w + l.acc_a);
  a.acc_qkv = reinterpret_cast<float*>(w + l.acc_qkv);
  a.acc_o = reinterpret_cast<float*>(w + l.acc_o);
  a.acc_fc = reinterpret_cast<float*>(w + l.acc_fc);
  a.acc_p = reinterpret_cast<float*>(w + l.acc_p);
  a.acc_logits = a.criterion == kKL ? reinterpret_cast<float*>(w + l.acc_logits) : nullptr;
  a.stats = reinterpret_cast<float*>(w + l.stats);
  a.exit_sums = reinterpret_cast<float*>(w + l.exit_sums);
  a.att_part = reinterpret_cast<float*>(w + l.att_part);
  a.att_count = reinterpret_cast<unsigned*>(w + l.att_count);
  a.att_split_max = split_max(h);
  a.zero_from = a.acc_a;
  a.zero_count = (l.end - l.acc_a) / 4;
  a.counter = reinterpret_cast<unsigned*>(h.barrier);
  a.watch = Watch{reinterpret_cast<int*>(h.watch), h.watch_cycles};
  // the matrices: their plan, their inputs and outputs
  const int* table = reinterpret_cast<const int*>(h.table);
  const int hd = a.H * a.D;
  for (size_t o = 0; o < p.ops.size(); ++o) {
    Op& x = a.ops[o] = planned_op(p.ops[o], table + o * (p.ctas + 1));
    if (o == 0) {  // adapter: W[:, :d] of [d, 2d], input the state
      x.w = bp(h.adapter);
      x.ldw = h.ld_adapter;
      x.x = a.state;
      x.ldx = a.d;
      x.out = a.acc_a;
      continue;
    }
    const size_t layer_op = o - 1, n_core_ops = (size_t)kOpsPerLayer * a.n_core;
    if (layer_op == n_core_ops + (size_t)kOpsPerLayer * a.n_coda) {  // KL: lm_head on ln_f of the coda's output
      x.w = bp(h.lm_head), x.x = a.xs, x.ldx = a.d, x.out = a.acc_logits;
      continue;
    }
    const bool coda = layer_op >= n_core_ops;
    const size_t in_part = coda ? layer_op - n_core_ops : layer_op;
    const SandwichLayer& s = coda ? h.coda[in_part / kOpsPerLayer] : h.core[in_part / kOpsPerLayer];
    switch (in_part % kOpsPerLayer) {
      case 0:
        x.w = bp(s.wqkv), x.x = a.xs, x.ldx = a.d, x.out = a.acc_qkv;
        break;
      case 1:
        x.w = bp(s.wo), x.x = a.y, x.ldx = hd, x.out = a.acc_o;
        break;
      case 2:
        x.w = bp(s.wfc), x.x = a.xs, x.ldx = a.d, x.out = a.acc_fc;
        break;
      default:
        x.w = bp(s.wproj), x.x = a.g, x.ldx = a.I, x.out = a.acc_p;
        break;
    }
  }
  const cudaStream_t stream = reinterpret_cast<cudaStream_t>(h.stream);
  if (h.tensor_copy) {  // the producer copies tensor-map boxes: each op's `w` becomes its map (on the device)
    std::string no = latentrt_ring::use_tensor_maps(a.ops, (int)p.ops.size(), a.ring, tensor_maps, stream);
    if (!no.empty()) {
      if (why != nullptr) *why = "tensor-map copies: " + no;
      return 2;
    }
  }
  return latentrt_stream::launch_cooperative(kernel_for(h), p.ctas, kThreads, launch_smem(h, p), &a, a.counter,
                                             stream, why);
}

}  // namespace latentrt
