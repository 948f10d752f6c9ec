// The streamed-weight ring (issue #11: "the weight stream never waits for activations; only the consumers
// do"), shared by the kernel (stream_loop.cu) and the probe that measures it (benchmarks/probes/stream_probe.cu).
// The plan (tiles, split-K, k-chunks, stages, each CTA's run of tiles) is csrc/stream_plan.h's.
//
// One CTA per SM. Warp 0 produces: it walks the CTA's tiles of every matrix in execution order, `iters`
// times, and copies each k-chunk of a tile (tile_rows row segments, one cp.async.bulk each, or with
// Ring::copy kCopyTensor a few 2D tensor-map boxes; L2 evict-first) into the next free stage of a
// shared-memory ring, completing on the stage's "full" mbarrier. It waits only
// for a free stage ("empty" mbarrier), never for activations. Warps 1..kConsumerWarps consume: per stage,
// the staged weights times the batch's input chunk (CUDA-core dot products up to batch 4, mma.sync
// m16n8k16 with the weights as M and the batch as N above), a tile's sums stored, or added with atomics
// where the matrix is split along K. The input chunk is copied from L2 once per stage into a double-buffered
// shared-memory buffer by the consumers (cp.async: the next stage's chunk lands while this one is
// multiplied; `Ring::stage_input`), or, with stage_input 0, read from L2 by every warp itself. Consumers order themselves across CTAs with a monotonic counter
// in global memory (`arrive` / `wait_for`: release / acquire); the producer never joins it.
//
// Early stop: the consumers set the CTA's `stop` word (shared memory) to the last iteration they finish; the
// producer stops issuing stages of later iterations, then waits until its copies in flight have landed
// (`drain`), so no bulk copy writes shared memory after its CTA has exited.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "device_utils.cuh"
#include "stream_plan.h"

namespace latentrt_ring {

using bf16 = __nv_bfloat16;
using latentrt_stream::kConsumerWarps;
using latentrt_stream::kInputPad;
using latentrt_stream::kMaxBatch;
using latentrt_stream::kMaxStages;
using latentrt_stream::kRowPad;

constexpr int kThreads = 32 * (1 + kConsumerWarps);
constexpr int kMaxNTiles = kMaxBatch / 8;  // the batch in the mma's 8-wide N tiles

// One matrix product of the stream: out[b, row] (+)= sum_k w[row, k] x[b, k] over the batch's rows.
struct Op {
  const bf16* w;  // [rows, ldw], its first cols columns used
  const bf16* x;  // [batch, ldx] input, its first cols columns
  float* out;     // [batch, rows] fp32 (atomics where split_k > 1: zeroed before)
  int rows, cols, ldw, ldx, split_k, row_tiles;
  const int* cta_first;  // [ctas + 1]: CTA c streams tiles [cta_first[c], cta_first[c + 1])
};

// A planned matrix's Op (stream_plan.h's OpPlan: shape, split-K, row tiles), its CTAs' tile runs at
// `cta_first` (device memory); the caller sets the weights, input and output (and ldw, if the weights are a
// slice of wider rows).
inline Op planned_op(const latentrt_stream::OpPlan& op, const int* cta_first) {
  Op x{};
  x.rows = (int)op.rows;
  x.cols = (int)op.cols;
  x.ldw = x.cols;
  x.split_k = op.split_k;
  x.row_tiles = (int)op.row_tiles;
  x.cta_first = cta_first;
  return x;
}

// How the producer fills a stage. The kernels copy rows; the other two are the probe's (2026-12-04's H200
// run: one copy per row segment bounds the stream alone at 0.9-2.4 TB/s, tensor-map boxes reach 3.4-3.7).
enum RingCopy : int {
  kCopyRows = 0,    // one cp.async.bulk per weight-row segment into padded rows (row_stride)
  kCopyTensor = 1,  // 2D tensor-map boxes from the weights in place (`w`: the matrix's CUtensorMap in global
                    // memory), unpadded: box_k columns x tile_rows each; on the tensor-core path 64-column
                    // boxes with the 128-byte swizzle, so ldmatrix's 8 rows hit 8 different bank groups
  kCopyNone = 2,    // nothing copied: a stage's full barrier completes at once (the consumers' own ceiling;
                    // they multiply whatever the ring holds: wrong sums)
};

// The ring's geometry (the plan's), the batch, and whether each stage's input chunk is staged in shared
// memory (the plan's stage_input; its buffers then follow the ring). Probe-only settings (the kernels leave
// them 0): stage_input 2 (`input=fixed`) multiplies every stage by the first input buffer as it stands, never
// refilled (wrong sums: the consumers' cost without the input's per-stage L2 round trip); `copy` (RingCopy);
// `test_wait`.
struct Ring {
  int batch, tile_rows, k_chunk, stages;
  int stage_input = 0;
  int copy = kCopyRows;
  int test_wait = 0;  // probe-only: 1: consumers poll a full stage with mbarrier.test_wait (never suspended)
  int input_cols = 0;  // stage_input 3 (probe-only, ranged): elements per staged row (widest range, padded)
  int mma_from = latentrt_stream::kMmaFromBatch;  // the plan's: batches from here multiply on tensor cores
  __host__ __device__ bool mma() const { return batch >= mma_from; }
  __host__ __device__ bool swizzled() const { return copy == kCopyTensor && mma(); }
  __host__ __device__ int box_k() const { return swizzled() ? 64 : (k_chunk < 256 ? k_chunk : 256); }
  __host__ __device__ int row_stride() const { return copy == kCopyTensor ? k_chunk * 2 : k_chunk * 2 + kRowPad; }
  __host__ __device__ int stage_bytes() const { return tile_rows * row_stride(); }
  // elements per staged input row: a k-chunk (stage_input 1) or a CTA's whole column range of an op (3)
  __host__ __device__ int input_stride() const { return stage_input == 3 ? input_cols : k_chunk + kInputPad; }
};

// The byte offset in a stage of columns [e, e + 8) of tile row r (e a multiple of 8): padded rows, or (COPY
// kCopyTensor) box e / box_k's row r, its 16-byte chunk XOR (r % 8) where swizzled (the box's base 1024-byte
// aligned: smem_layout aligns the ring, and every box is a multiple of 8 rows x 128 bytes).
template <int COPY>
__device__ __forceinline__ int stage_offset(const Ring& g, int r, int e) {
  if constexpr (COPY == kCopyTensor) {
    const int bk = g.box_k(), box = e / bk, chunk = (e - box * bk) >> 3;
    return (box * g.tile_rows + r) * bk * 2 + ((g.swizzled() ? chunk ^ (r & 7) : chunk) << 4);
  } else {
    return r * g.row_stride() + e * 2;
  }
}

// ---------------------------------------------------------------- PTX wrappers
__device__ __forceinline__ uint32_t smem_u32(const void* p) { return (uint32_t)__cvta_generic_to_shared(p); }
__device__ __forceinline__ void mbar_init(uint64_t* b, unsigned n) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_u32(b)), "r"(n));
}
__device__ __forceinline__ void mbar_expect_tx(uint64_t* b, unsigned bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_u32(b)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint64_t* b) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_u32(b)) : "memory");
}
// Whether the phase of `parity` has completed: try_wait may first suspend the thread a while (SUSPEND, the
// kernels'), test_wait returns at once (the probe's test_wait lines time what the suspension costs).
template <bool SUSPEND = true>
__device__ __forceinline__ bool mbar_try_wait(uint64_t* b, unsigned parity) {
  uint32_t done;
  if constexpr (SUSPEND)
    asm volatile("{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}"
                 : "=r"(done) : "r"(smem_u32(b)), "r"(parity) : "memory");
  else
    asm volatile("{\n .reg .pred p;\n mbarrier.test_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}"
                 : "=r"(done) : "r"(smem_u32(b)), "r"(parity) : "memory");
  return done != 0;
}
__device__ __forceinline__ void mbar_wait(uint64_t* b, unsigned parity) {
  while (!mbar_try_wait(b, parity)) {
  }
}
__device__ __forceinline__ uint64_t evict_first() {
  uint64_t p;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(p));
  return p;
}
// A box of a 2D tensor map (columns x, rows y onward) into shared memory, completing on `bar` (copy=tensor).
__device__ __forceinline__ void tensor_copy_2d(void* dst, const void* map, int x, int y, uint64_t* bar, uint64_t pol) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes.L2::cache_hint"
      " [%0], [%1, {%2, %3}], [%4], %5;" ::"r"(smem_u32(dst)),
      "l"(map), "r"(x), "r"(y), "r"(smem_u32(bar)), "l"(pol)
      : "memory");
}
__device__ __forceinline__ void bulk_copy(void* dst, const void* src, unsigned bytes, uint64_t* bar, uint64_t pol) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1], %2, [%3], %4;" ::"r"(
          smem_u32(dst)),
      "l"(src), "r"(bytes), "r"(smem_u32(bar)), "l"(pol)
      : "memory");
}
// The consumer warps' own barrier (named barrier 1; the producer never joins it).
__device__ __forceinline__ void consumers_sync() { asm volatile("bar.sync 1, %0;" ::"r"(32 * kConsumerWarps) : "memory"); }
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}
__device__ __forceinline__ uint64_t evict_last() {
  uint64_t p;
  asm volatile("createpolicy.fractional.L2::evict_last.b64 %0, 1.0;" : "=l"(p));
  return p;
}
// 16 bytes global -> shared, asynchronously (L2 only: no stale L1 line of a buffer rewritten in the launch),
// with the L2 policy `pol`; cp_async_wait_all() waits for this thread's copies.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, uint64_t pol) {
  asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2;" ::"r"(smem_u32(dst)), "l"(src), "l"(pol)
               : "memory");
}
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;" ::: "memory"); }
__device__ __forceinline__ void mma_bf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
// Shared-memory loads by a 32-bit shared address. A generic pointer that crossed consume_op's call (not
// inlined) has lost its state space: the compiler emits generic loads (LD), slower than LDS and kept in
// program order behind their branches; the probe's stage clocks put 75-80% of a stage in these consumers
// (2026-12-04). Volatile: never moved above the mbarrier wait that makes the stage readable.
__device__ __forceinline__ uint4 lds128(uint32_t at) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(at));
  return v;
}
__device__ __forceinline__ uint32_t lds32(uint32_t at) {
  uint32_t v;
  asm volatile("ld.shared.u32 %0, [%1];" : "=r"(v) : "r"(at));
  return v;
}
// (unpack8: eight bf16 as floats, an input's columns converted once for both of a warp's rows. It keeps the
// intrinsic: with bf16x2_floats the streamed kernels' bodies, which unpack with it too, spill at MB 4.)
using latentrt_device::unpack8;
// (the sum starts from the first pair, not from 0.f + it: the compiler may not drop that add, as 0.f + -0.f
// is +0.f; added to an accumulator that starts at +0.f, the two give the same sums)
__device__ __forceinline__ float dot8(uint4 w, const float (&x)[8]) {
  const uint32_t w2[4] = {w.x, w.y, w.z, w.w};
  float lo, hi;
  latentrt_device::bf16x2_floats(w2[0], lo, hi);
  float s = lo * x[0] + hi * x[1];
#pragma unroll
  for (int j = 1; j < 4; ++j) {
    latentrt_device::bf16x2_floats(w2[j], lo, hi);
    s += lo * x[2 * j] + hi * x[2 * j + 1];
  }
  return s;
}

// ---------------------------------------------------------------- shared memory layout
// mbarriers (full, empty), then (128-byte aligned) the consumers' tile reduction buffer, then the ring, then
// the staged input's two buffers: the plan's smem_bytes (stream_plan.h) counts the same.
struct Smem {
  uint64_t* full;
  uint64_t* empty;
  float* red;
  unsigned char* ring;
  bf16* input;  // [2][batch][input_stride] (stage_input)
};
__device__ inline Smem smem_layout(unsigned char* base, const Ring& g) {
  Smem s;
  s.full = reinterpret_cast<uint64_t*>(base);
  s.empty = s.full + kMaxStages;
  s.red = reinterpret_cast<float*>(base + 2 * kMaxStages * 8 + 128);
  s.ring = reinterpret_cast<unsigned char*>(s.red) + kConsumerWarps * 16 * ((g.batch + 7) / 8 * 8) * 4;
  if (g.copy == kCopyTensor) s.ring += (1024 - (smem_u32(s.ring) & 1023)) & 1023;  // (the probe adds 1 KB)
  s.input = reinterpret_cast<bf16*>(s.ring + (size_t)g.stages * g.stage_bytes());
  return s;
}
// Called by every thread of the CTA before the roles split: ring zeroed (no stale NaN under a narrow last
// k-step), barriers initialised.
__device__ inline void ring_init(const Smem& s, const Ring& g) {
  const int bytes = g.stages * g.stage_bytes();
  for (int i = threadIdx.x; i < bytes / 16; i += blockDim.x) reinterpret_cast<uint4*>(s.ring)[i] = uint4{};
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  // ordinary stores before the copy engine's
  if (threadIdx.x == 0) {
    for (int i = 0; i < g.stages; ++i) {
      mbar_init(&s.full[i], 1);
      mbar_init(&s.empty[i], kConsumerWarps);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
}

// ---------------------------------------------------------------- the watchdog
// A consumer wait that outlasts `cycles` is a hang (a dependency scheme's likeliest bug): the waiting thread
// writes what it waited for to `status` (host-mapped pinned memory, so it survives the dead context) and
// traps, so the launch fails with a diagnosis instead of running into the caller's timeout. status[0]: 1 a
// counter wait (status[1] phase, [2] CTA, [3] arrivals seen, [4] awaited), 2 a stage wait ([2] CTA, [3]
// warp, [4] ring slot, [5] parity). status null: no watchdog.
struct Watch {
  int* status;
  long long cycles;
};
// (static: each kernel's translation unit has its own copy)
static __device__ __noinline__ void watch_trip(const Watch* w, int code, int a, int b, int c, int d, int e) {
  volatile int* st = w->status;
  if (atomicCAS(w->status, 0, code) == 0) {  // the first to trip tells its story
    st[1] = a;
    st[2] = b;
    st[3] = c;
    st[4] = d;
    st[5] = e;
  }
  __threadfence_system();
  __trap();
}
// Wait for bars[slot]'s phase of `parity` to complete.
__device__ __forceinline__ void mbar_wait_watched(uint64_t* bars, unsigned slot, unsigned parity, const Watch* w) {
  if (w == nullptr || w->status == nullptr) return mbar_wait(&bars[slot], parity);
  const long long t0 = clock64();
  while (!mbar_try_wait(&bars[slot], parity))
    if (clock64() - t0 > w->cycles)
      watch_trip(w, 2, 0, (int)blockIdx.x, (int)threadIdx.x / 32 - 1, (int)slot, (int)parity);
}

// ---------------------------------------------------------------- the tiles
struct Tile {
  int row0, rows, c0, c1;
};
__device__ __forceinline__ Tile tile_at(const Op& op, int R, int t) {
  const int rt = t % op.row_tiles, s = t / op.row_tiles;
  int64_t c0, c1;
  latentrt_stream::split_cols(op.cols, op.split_k, s, &c0, &c1);
  return Tile{rt * R, min(R, op.rows - rt * R), (int)c0, (int)c1};
}

// A position in the ring: the stage slot and the parity of its current use.
struct Cursor {
  unsigned slot = 0, phase = 0;
  __device__ void next(int stages) {
    if (++slot == (unsigned)stages) {
      slot = 0;
      phase ^= 1;
    }
  }
};

// Where a CTA's ring cycles go (the probe's `prof` lines, stream_probe.cu): clock64 intervals added by one
// consumer (warp 1, lane 0) and the producer's lane 0, each to its own fields, in shared memory. The kernels
// never time (the PROF template arguments default to false: no clock reads, no stores).
struct StageClock {
  long long full_wait, input_wait, input_issue, compute, finish, stages, tiles;  // consumer warp 1
  long long empty_wait, issue, issued;                              // the producer
};

// ---------------------------------------------------------------- the producer warp
// The producer's position: ring cursor and stages issued so far.
struct Producer {
  Cursor cur;
  unsigned issued = 0;
  uint64_t pol;
  __device__ Producer() : pol(evict_first()) {}
};

// The consumers' stop word (shared memory): written and read with atomics, so the producer's polling and the
// consumers' one write are ordered without a barrier the producer would have to join (and racecheck agrees).
__device__ __forceinline__ int stop_word(int* stop) { return atomicAdd(stop, 0); }
__device__ __forceinline__ void set_stop(int* stop, int last_iteration) { atomicExch(stop, last_iteration); }

// Issue every stage of this CTA's tiles of `op`, a matrix of iteration `it`. `stop` (shared memory, written
// by the consumers): the last iteration they run; returns false, issuing nothing more, once it is below it.
// `stop` null (the probe's nostop lines): never polled. PROF: time the waits and the issue into `clk`.
template <bool PROF = false>
__device__ inline bool produce_op(const Op& op, const Ring& g, const Smem& s, Producer& p, int it,
                                  int* stop, StageClock* clk = nullptr) {
  const int lane = threadIdx.x % 32, R = g.tile_rows, kc = g.k_chunk, row_stride = g.row_stride();
  for (int t = op.cta_first[blockIdx.x]; t < op.cta_first[blockIdx.x + 1]; ++t) {
    const Tile tl = tile_at(op, R, t);
    for (int k0 = tl.c0; k0 < tl.c1; k0 += kc) {
      const int w = min(kc, tl.c1 - k0);
      long long t0 = 0;
      if constexpr (PROF) t0 = clock64();
      if (p.issued >= (unsigned)g.stages)
        while (!mbar_try_wait(&s.empty[p.cur.slot], p.cur.phase ^ 1))
          if (stop != nullptr && stop_word(stop) < it) return false;
      if constexpr (PROF) {
        const long long t1 = clock64();
        if (lane == 0) clk->empty_wait += t1 - t0;
        t0 = t1;
      }
      if (stop != nullptr && stop_word(stop) < it) return false;
      unsigned char* st = s.ring + (size_t)p.cur.slot * g.stage_bytes();
      if (g.copy == kCopyTensor) {  // boxes of tile rows x box_k columns (full boxes: zeros past the edge)
        const int box_k = g.box_k(), boxes = (w + box_k - 1) / box_k;
        if (lane == 0) {
          mbar_expect_tx(&s.full[p.cur.slot], (unsigned)(boxes * R * box_k * 2));
          for (int i = 0; i < boxes; ++i)
            tensor_copy_2d(st + (size_t)i * R * box_k * 2, op.w, k0 + i * box_k, tl.row0, &s.full[p.cur.slot], p.pol);
        }
        __syncwarp();
      } else if (g.copy == kCopyNone) {
        if (lane == 0) mbar_arrive(&s.full[p.cur.slot]);
        __syncwarp();
      } else {
        if (lane == 0) mbar_expect_tx(&s.full[p.cur.slot], (unsigned)(tl.rows * w * 2));
        __syncwarp();
        for (int r = lane; r < tl.rows; r += 32)
          bulk_copy(st + (size_t)r * row_stride, op.w + (size_t)(tl.row0 + r) * op.ldw + k0, (unsigned)(w * 2),
                    &s.full[p.cur.slot], p.pol);
      }
      if constexpr (PROF) {
        if (lane == 0) clk->issue += clock64() - t0, ++clk->issued;
      }
      ++p.issued;
      p.cur.next(g.stages);
    }
  }
  return true;
}

// Before the CTA may exit: the last stages issued (at most one per slot) have landed.
__device__ inline void drain(const Ring& g, const Smem& s, const Producer& p) {
  for (unsigned j = p.issued > (unsigned)g.stages ? p.issued - g.stages : 0; j < p.issued; ++j)
    mbar_wait(&s.full[j % g.stages], (j / g.stages) & 1);
}

// `iters` passes over ops[0 .. n_ops), then drain.
template <bool PROF = false>
__device__ inline void produce(const Op* ops, int n_ops, const Ring& g, const Smem& s, int iters,
                               int* stop, StageClock* clk = nullptr) {
  Producer p;
  for (int it = 0; it < iters; ++it)
    for (int o = 0; o < n_ops; ++o)
      if (!produce_op<PROF>(ops[o], g, s, p, it, stop, clk)) return drain(g, s, p);
  drain(g, s, p);
}

// ---------------------------------------------------------------- consumers
// The batch's input columns [k0, k0 + w) of `op` into a staged buffer ([batch][input_stride]), 16 bytes per
// consumer thread at a time, asynchronously: readable after cp_async_wait_all() and a consumers' barrier.
// Activations are read by every CTA, weights once: evict-last for these, evict-first for the weights.
__device__ inline void stage_input_chunk(const Ring& g, const Op& op, int k0, int w, bf16* buf) {
  // (a stage's per-thread cost, paid every stage: no integer division where the batch is 1 or a row's
  // 16-byte pieces a power of two, the common k-chunks; the fields read once)
  const int per_row = w / 8, stride = g.input_stride(), batch = g.batch, n = batch * per_row;
  const bool pow2 = (per_row & (per_row - 1)) == 0;
  const int shift = __ffs(per_row) - 1;
  const bf16* x = op.x + k0;
  const int64_t ldx = op.ldx;
  const uint64_t pol = evict_last();
  for (int i = threadIdx.x - 32; i < n; i += 32 * kConsumerWarps) {
    const int b = batch == 1 ? 0 : (pow2 ? i >> shift : i / per_row), c = (i - b * per_row) * 8;
    cp_async16(buf + (size_t)b * stride + c, x + b * ldx + c, pol);
  }
}

// Batch <= 4: warp cw owns rows cw, cw + 8 of the tile (tile_rows 16); lanes walk 8 columns each. STAGED: the
// input chunk in shared memory (stage_input), else read from L2. COPY: the stage's layout (stage_offset).
// The Ring's fields in registers, the loads by shared address and without a branch between them (a short last
// tile's rows past its end read its last row, and finish_fma drops their sums), two column steps unrolled:
// each warp has its loads of both rows in flight at once instead of one dependent load after another.
template <int MB, int COPY, bool STAGED>
__device__ __forceinline__ void fma_columns(const Ring& g, const Op& op, const Tile& tl, const unsigned char* st, int k0,
                                            int w, float (&acc)[2][MB], const bf16* staged) {
  const Ring r = g;
  const int lane = threadIdx.x % 32, cw = threadIdx.x / 32 - 1, in_stride = r.input_stride();
  const int row0 = min(cw, tl.rows - 1), row1 = min(cw + 8, tl.rows - 1);
  const uint32_t ring = smem_u32(st), x_at = STAGED ? smem_u32(staged) : 0u;
#pragma unroll 2
  for (int e = lane * 8; e < w; e += 256) {
    float xf[MB][8];
#pragma unroll
    for (int b = 0; b < MB; ++b) {
      uint4 xv = uint4{};
      if (MB == 1 || b < r.batch)
        xv = STAGED ? lds128(x_at + (uint32_t)(b * in_stride + e) * 2)
                    : __ldcg(reinterpret_cast<const uint4*>(op.x + (size_t)b * op.ldx + k0 + e));
      unpack8(xv, xf[b]);
    }
    const uint4 w0 = lds128(ring + stage_offset<COPY>(r, row0, e)), w1 = lds128(ring + stage_offset<COPY>(r, row1, e));
#pragma unroll
    for (int b = 0; b < MB; ++b) {
      acc[0][b] += dot8(w0, xf[b]);
      acc[1][b] += dot8(w1, xf[b]);
    }
  }
}

template <int MB, int COPY>
__device__ __forceinline__ void consume_fma(const Ring& g, const Op& op, const Tile& tl, const unsigned char* st,
                                            int k0, int w, float (&acc)[2][MB], const bf16* staged) {
  if (staged != nullptr)
    fma_columns<MB, COPY, true>(g, op, tl, st, k0, w, acc, staged);
  else
    fma_columns<MB, COPY, false>(g, op, tl, st, k0, w, acc, staged);
}

template <int MB>
__device__ void finish_fma(const Ring& g, const Op& op, const Tile& tl, float (&acc)[2][MB]) {
  const int lane = threadIdx.x % 32, cw = threadIdx.x / 32 - 1;
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int b = 0; b < MB; ++b) {
      float v = acc[i][b];
#pragma unroll
      for (int m = 16; m > 0; m >>= 1) v += __shfl_xor_sync(0xffffffffu, v, m);
      const int r = cw + 8 * i;
      if (lane == 0 && b < g.batch && r < tl.rows) {
        float* dst = op.out + (size_t)b * op.rows + tl.row0 + r;
        if (op.split_k > 1)
          atomicAdd(dst, v);
        else
          *dst = v;
      }
      acc[i][b] = 0.f;
    }
}

// Batch > 4: R / 16 row blocks x (8 / (R / 16)) k-groups of warps; each warp: mma over its k-steps, for
// every 8-wide slice of the batch (NT of them: 1, 2 or 4, the last masked where the batch is not a multiple
// of 8); a tile's partial sums are reduced across k-groups in shared memory. STAGED: the input chunk in shared
// memory (stage_input, read by shared address), else read from L2. As fma_columns: the Ring's fields in
// registers, a k-step's loads ahead of its mma instructions with no branch between them, two k-steps unrolled.
template <int COPY, bool STAGED, int NT>
__device__ __forceinline__ void mma_columns(const Ring& g, const Op& op, const unsigned char* st, int k0, int w,
                                            float (&c)[kMaxNTiles][4], const bf16* staged) {
  const Ring r = g;
  const int lane = threadIdx.x % 32, cw = threadIdx.x / 32 - 1, row_stride = r.row_stride();
  const int blocks = r.tile_rows / 16, groups = kConsumerWarps / blocks, rb = cw % blocks, kg = cw / blocks;
  const int in_stride = r.input_stride();
  const int a_row = rb * 16 + (lane % 8) + ((lane / 8) % 2) * 8;  // this lane's ldmatrix row (and 8 columns)
  const unsigned char* a_base = st + (size_t)a_row * row_stride + (lane / 16) * 16;
  const uint32_t x_at = STAGED ? smem_u32(staged) : 0u;
#pragma unroll 2
  for (int ks = kg; ks * 16 < w; ks += groups) {
    const int kk = ks * 16 + (lane % 4) * 2, k = k0 + kk;
    uint32_t b[NT][2];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const int n = nt * 8 + lane / 4;
      b[nt][0] = b[nt][1] = 0;
      if (STAGED) {  // (row stride input_stride: the 8 n x 4 lanes hit 32 banks)
        const uint32_t xr = x_at + (uint32_t)(n * in_stride) * 2;
        if (n < r.batch && kk < w) b[nt][0] = lds32(xr + kk * 2);
        if (n < r.batch && kk + 8 < w) b[nt][1] = lds32(xr + (kk + 8) * 2);
      } else {
        const bf16* xr = op.x + (size_t)n * op.ldx;
        if (n < r.batch && k < op.cols) b[nt][0] = __ldcg(reinterpret_cast<const unsigned*>(xr + k));
        if (n < r.batch && k + 8 < op.cols) b[nt][1] = __ldcg(reinterpret_cast<const unsigned*>(xr + k + 8));
      }
    }
    uint32_t af[4];
    ldmatrix_x4(af, COPY == kCopyTensor ? st + stage_offset<COPY>(r, a_row, ks * 16 + (lane / 16) * 8) : a_base + ks * 32);
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) mma_bf16(c[nt], af, b[nt][0], b[nt][1]);
  }
}

template <int COPY, bool STAGED>
__device__ __forceinline__ void mma_tiles(const Ring& g, const Op& op, const unsigned char* st, int k0, int w,
                                          float (&c)[kMaxNTiles][4], const bf16* staged) {
  static_assert(kMaxNTiles == 4, "mma_tiles dispatches 1, 2 or 4 batch tiles");
  const int n_tiles = (g.batch + 7) / 8;
  if (n_tiles == 1)
    mma_columns<COPY, STAGED, 1>(g, op, st, k0, w, c, staged);
  else if (n_tiles == 2)
    mma_columns<COPY, STAGED, 2>(g, op, st, k0, w, c, staged);
  else
    mma_columns<COPY, STAGED, 4>(g, op, st, k0, w, c, staged);
}

template <int COPY>
__device__ __forceinline__ void consume_mma(const Ring& g, const Op& op, const unsigned char* st, int k0, int w,
                                            float (&c)[kMaxNTiles][4], const bf16* staged) {
  if (staged != nullptr)
    mma_tiles<COPY, true>(g, op, st, k0, w, c, staged);
  else
    mma_tiles<COPY, false>(g, op, st, k0, w, c, staged);
}

__device__ inline void finish_mma(const Ring& g, const Op& op, const Tile& tl, float (&c)[kMaxNTiles][4],
                                  float* red) {
  const int lane = threadIdx.x % 32, cw = threadIdx.x / 32 - 1;
  const int blocks = g.tile_rows / 16, groups = kConsumerWarps / blocks;
  const int n_tiles = (g.batch + 7) / 8, NB = n_tiles * 8;
  // red[warp][16 rows][NB]: C fragment (row lane/4 (+8), column 2 (lane % 4) (+1))
#pragma unroll
  for (int nt = 0; nt < kMaxNTiles; ++nt) {
    if (nt >= n_tiles) break;
    float* base = red + (size_t)cw * 16 * NB;
    const int r = lane / 4, col = nt * 8 + (lane % 4) * 2;
    base[r * NB + col] = c[nt][0];
    base[r * NB + col + 1] = c[nt][1];
    base[(r + 8) * NB + col] = c[nt][2];
    base[(r + 8) * NB + col + 1] = c[nt][3];
#pragma unroll
    for (int j = 0; j < 4; ++j) c[nt][j] = 0.f;
  }
  consumers_sync();
  for (int i = threadIdx.x - 32; i < g.tile_rows * g.batch; i += 32 * kConsumerWarps) {
    const int row = i / g.batch, b = i % g.batch, rb = row / 16;
    if (row >= tl.rows) continue;
    float v = 0.f;
    for (int gg = 0; gg < groups; ++gg) v += red[(size_t)(gg * blocks + rb) * 16 * NB + (row % 16) * NB + b];
    float* dst = op.out + (size_t)b * op.rows + tl.row0 + row;
    if (op.split_k > 1)
      atomicAdd(dst, v);
    else
      *dst = v;
  }
  consumers_sync();  // red is reused by the next tile
}

// One op's share of this CTA: every stage of its tiles from the ring (in the producer's order), multiplied
// and written out. MB: the CUDA-core path's rows (batch <= 4); from Ring::mma_from on, tensor cores.
// With stage_input, stage i's input chunk was copied during stage i - 1 (the first one before the loop) into
// buffer i % 2; one consumers' barrier a stage makes it readable and frees the other buffer for stage i + 1.
// Not inlined: one copy per MB instead of one per call site (a kernel has 5-7), which halves the extension's
// build (stream_loop.cu: 50 s -> 15 s in ptxas) at the cost of one call per op and its arguments in local
// memory (64-168 bytes of stack, no spills). COPY: how the producer filled the stages (the kernels: rows).
template <int MB, int COPY = kCopyRows, bool PROF = false>
__device__ __noinline__ void consume_op(const Ring& g, const Op& op, const Smem& s, Cursor& cur, bool compute = true,
                           const Watch* watch = nullptr, StageClock* clk = nullptr) {
  const int lane = threadIdx.x % 32;
  const bool timer = PROF && threadIdx.x == 32;  // warp 1's lane 0 keeps the consumers' clock
  long long tc = 0;
  const bool mma = g.mma(), staged = g.stage_input == 1 && compute;
  const bool ranged = g.stage_input == 3 && compute;  // the probe's input=ranged: one staging per column range
  const bf16* fixed = g.stage_input == 2 ? s.input : nullptr;  // the probe's input=fixed
  int range0 = -1, range1 = -1;                               // ranged: the columns s.input holds
  const int t0 = op.cta_first[blockIdx.x], t1 = op.cta_first[blockIdx.x + 1];
  const size_t buf_elems = (size_t)g.batch * g.input_stride();
  float acc[2][MB] = {};
  float c[kMaxNTiles][4] = {};
  int buf = 0;
  if (staged && t0 < t1) {
    consumers_sync();  // every warp is done with the buffers of the previous op
    const Tile first = tile_at(op, g.tile_rows, t0);
    stage_input_chunk(g, op, first.c0, min(g.k_chunk, first.c1 - first.c0), s.input);
  }
  for (int t = t0; t < t1; ++t) {
    const Tile tl = tile_at(op, g.tile_rows, t);
    if (ranged && (tl.c0 != range0 || tl.c1 != range1)) {  // the tile's whole column range, once
      if (timer) tc = clock64();
      consumers_sync();  // every warp is done with the range before
      stage_input_chunk(g, op, tl.c0, tl.c1 - tl.c0, s.input);
      cp_async_wait_all();
      consumers_sync();
      range0 = tl.c0, range1 = tl.c1;
      if (timer) clk->input_wait += clock64() - tc;
    }
    for (int k0 = tl.c0; k0 < tl.c1; k0 += g.k_chunk) {
      const int w = min(g.k_chunk, tl.c1 - k0);
      const bf16* x = ranged ? s.input + (k0 - tl.c0) : fixed;
      if (timer) tc = clock64();
      if (staged) {
        cp_async_wait_all();
        consumers_sync();  // this stage's chunk is readable; every warp is done with the other buffer
        if (timer) {
          const long long now = clock64();
          clk->input_wait += now - tc;
          tc = now;
        }
        x = s.input + buf * buf_elems;
        bf16* next = s.input + (buf ^ 1) * buf_elems;
        if (k0 + g.k_chunk < tl.c1) {  // the next stage: this tile's next chunk, or the next tile's first
          stage_input_chunk(g, op, k0 + g.k_chunk, min(g.k_chunk, tl.c1 - k0 - g.k_chunk), next);
        } else if (t + 1 < t1) {
          const Tile nt = tile_at(op, g.tile_rows, t + 1);
          stage_input_chunk(g, op, nt.c0, min(g.k_chunk, nt.c1 - nt.c0), next);
        }
        buf ^= 1;
        if (timer) clk->input_issue += clock64() - tc;  // issuing the next stage's chunk
      }
      if (timer) tc = clock64();
      if (g.test_wait)
        while (!mbar_try_wait<false>(&s.full[cur.slot], cur.phase)) {
        }
      else
        mbar_wait_watched(s.full, cur.slot, cur.phase, watch);
      if (timer) {
        const long long now = clock64();
        clk->full_wait += now - tc;
        tc = now;
      }
      const unsigned char* st = s.ring + (size_t)cur.slot * g.stage_bytes();
      if (compute) {
        if (mma)
          consume_mma<COPY>(g, op, st, k0, w, c, x);
        else
          consume_fma<MB, COPY>(g, op, tl, st, k0, w, acc, x);
      }
      __syncwarp();
      if (lane == 0) mbar_arrive(&s.empty[cur.slot]);
      if (timer) clk->compute += clock64() - tc, ++clk->stages;
      cur.next(g.stages);
    }
    if (timer) tc = clock64();
    if (compute) {
      if (mma)
        finish_mma(g, op, tl, c, s.red);
      else
        finish_fma<MB>(g, op, tl, acc);
    }
    if (timer) clk->finish += clock64() - tc, ++clk->tiles;
  }
}

// consume_op with the stage layout the ring's producer writes (Ring::copy, the same for every CTA and op): both
// layouts are compiled once each per MB (consume_op is not inlined), the kernel itself once.
template <int MB>
__device__ __forceinline__ void consume(const Ring& g, const Op& op, const Smem& s, Cursor& cur, bool compute = true,
                                        const Watch* watch = nullptr) {
  if (g.copy == kCopyTensor)
    consume_op<MB, kCopyTensor>(g, op, s, cur, compute, watch);
  else
    consume_op<MB, kCopyRows>(g, op, s, cur, compute, watch);
}

// ---------------------------------------------------------------- ordering across CTAs (consumers only)
// This CTA's consumers are done with a phase: their global writes become visible, then one arrival.
__device__ inline void arrive(unsigned* counter) {
  __threadfence();
  consumers_sync();
  if (threadIdx.x == 32) asm volatile("red.release.gpu.global.add.u32 [%0], 1;" ::"l"(counter) : "memory");
}
// Until `target` arrivals (every CTA's for each phase so far) have been counted; `phase` names it to the
// watchdog.
__device__ inline void wait_for(unsigned* counter, unsigned target, const Watch* watch = nullptr, int phase = 0) {
  if (threadIdx.x == 32) {
    const bool watched = watch != nullptr && watch->status != nullptr;
    const long long t0 = watched ? clock64() : 0;
    unsigned v;
    for (;;) {
      asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(counter) : "memory");
      if (v >= target) break;
      if (watched && clock64() - t0 > watch->cycles) watch_trip(watch, 1, phase, (int)blockIdx.x, (int)v, (int)target, 0);
    }
  }
  consumers_sync();
}

}  // namespace latentrt_ring
