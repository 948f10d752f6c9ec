// Decode attention for the streamed-weight kernels (stream_loop.cu, stream_thought.cu): one query position
// per row against its K/V cache, split over positions so that every consumer warp of the grid has work.
#pragma once
#include "stream_common.cuh"

namespace latentrt_ring {

constexpr int kMaxHeadDim = 128;
constexpr int kDims = kMaxHeadDim / 32;  // head dimensions per lane in a whole-warp loop
constexpr int kVec = 8;                  // bf16 of one 16-byte load
constexpr int kUnroll = 4;               // positions per lane group whose loads are in flight together

// Where a launch's attention reads and writes: K/V [slots, B, Hkv, T, D] (plain layers: one slot), the
// padding mask [B, T], the iterations each position wrote [B, T] (looped layers' slot rule), the output y
// [B, H, D], and the split attention's partials (per item: m, l, D sums) and arrival counters [B * H].
struct AttnIO {
  int B, H, Hkv, D, T;
  const uint8_t* valid;
  const int64_t* written;
  bf16* y;
  float* part;
  unsigned* count;
};

// Decode attention of one position per row, spread over every consumer warp of the grid (issue #11: "split
// the KV range across at least as many work items as SMs, 16-byte loads"). A work item is (row, head,
// split): one warp takes `splits` consecutive positions' share of [0, pos], its lanes in groups of gs (D / 8
// rounded up to a power of two), each group one position at a time with one 16-byte load of K and of V per
// lane, kUnroll positions' loads issued before any is used; every group keeps its own online softmax,
// merged across the warp's groups by shuffles. With one split the warp writes y itself; otherwise it writes
// its (m, l, sums) partial and the last of a (row, head)'s items to arrive (a cumulative counter) merges them
// into y. `build(b, h, d0, q, k, v)` gives this position's q, k, v for the lane's 8 dimensions from [d0, d0 +
// 8); the warp holding position `pos` writes its K/V entry to `slot` (one writer per KV head), and no item
// reads that entry from memory. Earlier positions: slot `slot`, or with use_written min(slot, written - 1)
// (latentrt/kv_modes.py). Positions whose `valid` is 0 are skipped (their K/V is loaded, never used).
template <class Build>
__device__ void attend_split(const AttnIO& a, bf16* K, bf16* V, int pos, int slot, bool use_written,
                             const uint8_t* act, int splits, float scale, Build build) {
  const int lane = lane_id(), D = a.D, H = a.H, Hkv = a.Hkv, group = H / Hkv;
  const int gs = D > 64 ? 16 : (D > 32 ? 8 : 4), per_pass = 32 / gs, grp = lane / gs, d0 = kVec * (lane % gs);
  const bool has = d0 < D;
  const int n = pos + 1, chunk = (n + splits - 1) / splits;
  const int items = a.B * H * splits, warps = gridDim.x * kConsumerWarps;
  const size_t slot_stride = (size_t)a.B * Hkv * a.T * D;
  for (int item = blockIdx.x * kConsumerWarps + consumer_warp(); item < items; item += warps) {
    const int rh = item / splits, sp = item % splits, b = rh / H, h = rh % H, hk = h / group;
    if (!act[b]) continue;  // uniform across the warp
    float q[kVec] = {}, kc[kVec] = {}, vc[kVec] = {};
    if (has) build(b, h, d0, q, kc, vc);
    const int t0 = sp * chunk, t1 = min(n, t0 + chunk);
    const size_t row = ((size_t)b * Hkv + hk) * a.T;  // (b, hk)'s positions within a slot
    if (h % group == 0 && t0 <= pos && pos < t1 && grp == 0 && has) {  // this position's K/V entry
      const size_t off = slot * slot_stride + (row + pos) * D + d0;
      *reinterpret_cast<uint4*>(K + off) = pack8(kc);
      *reinterpret_cast<uint4*>(V + off) = pack8(vc);
    }
    float m = -INFINITY, l = 0.f, o[kVec] = {};
    for (int base = t0; base < t1; base += per_pass * kUnroll) {
      uint4 kr[kUnroll], vr[kUnroll];
      bool use[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {  // every load first (a masked position's K/V is loaded, not used)
        const int t = base + u * per_pass + grp;
        kr[u] = vr[u] = make_uint4(0u, 0u, 0u, 0u);
        if (t < t1 && t != pos && has) {
          int sl = slot;
          if (use_written) {
            const long long w = __ldcg(reinterpret_cast<const long long*>(a.written) + (size_t)b * a.T + t) - 1;
            sl = w < 0 ? 0 : (w < slot ? (int)w : slot);
          }
          const size_t off = sl * slot_stride + (row + t) * D + d0;
          kr[u] = __ldcg(reinterpret_cast<const uint4*>(K + off));
          vr[u] = __ldcg(reinterpret_cast<const uint4*>(V + off));
        }
        use[u] = t < t1 && (t == pos || a.valid[(size_t)b * a.T + t]);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const bool here = base + u * per_pass + grp == pos;
        float kf[kVec], vf[kVec];
        latentrt_device::unpack8(kr[u], kf);
        latentrt_device::unpack8(vr[u], vf);
        float dot = 0.f;
#pragma unroll
        for (int i = 0; i < kVec; ++i) dot += q[i] * (here ? kc[i] : kf[i]);
        for (int off = gs / 2; off > 0; off >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, off);
        if (!use[u]) continue;  // after the shuffles: every lane takes part in them
        const float s = dot * scale, m_new = fmaxf(m, s);
        const float alpha = __expf(m - m_new), p = __expf(s - m_new);
#pragma unroll
        for (int i = 0; i < kVec; ++i) o[i] = o[i] * alpha + p * (here ? vc[i] : vf[i]);
        l = l * alpha + p;
        m = m_new;
      }
    }
    for (int off = gs; off < 32; off <<= 1) {  // the warp's groups merged (every group ends with the result)
      const float m2 = __shfl_xor_sync(0xffffffffu, m, off), l2 = __shfl_xor_sync(0xffffffffu, l, off);
      const float mm = fmaxf(m, m2);
      const float f1 = m == -INFINITY ? 0.f : __expf(m - mm), f2 = m2 == -INFINITY ? 0.f : __expf(m2 - mm);
#pragma unroll
      for (int i = 0; i < kVec; ++i) o[i] = o[i] * f1 + __shfl_xor_sync(0xffffffffu, o[i], off) * f2;
      l = l * f1 + l2 * f2;
      m = mm;
    }
    bf16* y = a.y + ((size_t)b * H + h) * D;
    if (splits == 1) {  // the whole range: l > 0 (position pos is always in it)
      if (grp == 0 && has) {
        float r[kVec];
#pragma unroll
        for (int i = 0; i < kVec; ++i) r[i] = o[i] / l;
        *reinterpret_cast<uint4*>(y + d0) = pack8(r);
      }
      continue;
    }
    float* part = a.part + (size_t)item * (2 + D);
    if (grp == 0 && has) {
#pragma unroll
      for (int i = 0; i < kVec; ++i) part[2 + d0 + i] = o[i];
    }
    if (lane == 0) part[0] = m, part[1] = l;
    __threadfence();  // the partial before the count that says it is there
    __syncwarp();
    unsigned last = 0;
    if (lane == 0) last = (atomicAdd(a.count + rh, 1u) + 1u) % (unsigned)splits == 0u;
    if (!__shfl_sync(0xffffffffu, last, 0)) continue;
    __threadfence();
    const float* parts = a.part + (size_t)rh * splits * (2 + D);  // lane s: split s
    const float ms = lane < splits ? __ldcg(parts + (size_t)lane * (2 + D)) : -INFINITY;
    const float ls = lane < splits ? __ldcg(parts + (size_t)lane * (2 + D) + 1) : 0.f;
    const float mx = latentrt_device::warp_max(ms);
    const float f = ls == 0.f ? 0.f : __expf(ms - mx);
    const float den = latentrt_device::warp_sum(ls * f);
#pragma unroll
    for (int i = 0; i < kDims; ++i) {
      const int dd = lane + 32 * i;
      float num = 0.f;
      for (int sp2 = 0; sp2 < splits; ++sp2) {
        const float fs = __shfl_sync(0xffffffffu, f, sp2);
        if (dd < D && fs != 0.f) num += __ldcg(parts + (size_t)sp2 * (2 + D) + 2 + dd) * fs;
      }
      if (dd < D) y[dd] = __float2bfloat16(num / den);
    }
  }
}

}  // namespace latentrt_ring
