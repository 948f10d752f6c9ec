// stream_probe.cu: the probe that decides issue #11's kernel design. Can one persistent kernel stream a
// Huginn-0125 core iteration's weights (1.58 GB: adapter + 4 x QKV / Wo / fc / proj) at >= 85% of the
// same run's copy bandwidth while every matrix waits for the previous one's outputs, at batch 1, 8, 16 and
// 32, on the plan of csrc/stream_plan.h (tiles, split-K, ring stages)?
//
// One CTA per SM. Warp 0 is the producer: it walks the CTA's tiles of every matrix in execution order and
// copies each k-chunk of a tile (tile_rows row segments, one cp.async.bulk each, evict-first) into the
// next free stage of a shared-memory ring, completing on the stage's "full" mbarrier; it waits only for a
// free stage ("empty" mbarrier), never for activations. Warps 1-8 consume: before a matrix they wait until
// every CTA has finished the previous one (a monotonic counter in global memory, release / acquire), then
// per stage they multiply the staged weights with the batch's input chunk: CUDA-core dot products up to
// batch 4, mma.sync m16n8k16 (weights as M, the batch as N) above; a tile's sums go out with a store, or
// atomics where the matrix is split along K. The input chunk is staged in shared memory once per stage
// (`input=staged`, the kernels' default), or read from L2 by every consumer warp (`input=l2`: 8 reads of
// each chunk a stage at batch <= 4, tile_rows / 16 on the tensor-core path).
//
// First the consumers' barrier alone (us per barrier over every SM). Modes per batch: consume 0 (the stream
// alone: consumers release stages untouched) / 1; wait 0 / 1 (the dependency counter: one barrier before
// each matrix, 17 an iteration); the copy (below); the stages the plan's, or fewer. Beside them the copy
// bandwidth of a 4 GiB buffer, the floor's denominator (benchmarks/suites.py: bytes read + written per
// second). Decided by earlier runs and dropped from the list: the stage count and the 50 barriers of an
// iteration of csrc/stream_loop.cu (2026-12-04: neither matters on row copies), the input read from L2 by
// every warp (slower from batch 4), and the barrier kernel's no-ring `ldg` pattern (0.85 TB/s).
// 2026-12-04's two H200 runs decided the stream (benchmarks/RESULTS.md): 2D tensor-map copies (`copy=tensor`)
// stream alone at 3.4-3.7 TB/s where one cp.async.bulk per row segment reaches 0.9-2.4 (packed stage images
// and a deeper input prefetch were slower and are gone), and without any input refill (`input=fixed`) the
// consumers still run at half the tensor stream's rate. The lines now ask what bounds the consumers:
// `copy=tensor` consuming (the consumers reading the tensor-map boxes; swizzled on the tensor-core path;
// checked), and `copy=none` (nothing copied: each stage's barrier completes at once and the consumers
// multiply the ring as it stands, sums not checked), their own ceiling; and tensor consuming on other stage
// shapes (k-chunks 256 / 1024 at batch 1 and 4, tiles 64 x 128 and 32 x 512 at batch 8, 32 x 256 at 32):
// whether the consumers pay per stage or per byte. Beside them the row-copy baseline.
// 2026-12-04's third run (RESULTS.md): the consumers alone reach only what they reach behind row copies
// (1.74 TB/s at batch 1) and tensor copies slow them; so first a clocked run per ring (`probe-clock` lines:
// cycles a stage that one consumer warp waits for a full stage, for its staged input, multiplies; that the
// producer waits for a free stage and issues), and the producer without its stop-word atomics (`nostop`)
// and consumers that spin on test_wait (`test_wait`), timed.
// Correctness first: each configuration is run once on zeroed outputs and sampled rows of every matrix
// are compared with a host dot product of the same bf16 values (rel. error < 1e-2), then timed.
//
// Build (no GPU needed): nvcc -std=c++17 -O3 -Icsrc -gencode=arch=compute_90a,code=sm_90a
//   benchmarks/probes/stream_probe.cu -o stream_probe            (tools/ptxas_check.py checks spills)
// Run: ./stream_probe [iterations per launch, default 8]; one line per configuration (`probe ...`).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "stream_ring.cuh"
#include "stream_tensor_map.h"

namespace {

using namespace latentrt_ring;
using latentrt_stream::OpPlan;
using latentrt_stream::Plan;
using latentrt_stream::plan_stream;

constexpr int kMaxOps = 24;

struct Args {
  Op ops[kMaxOps];
  Ring ring;
  int n_ops, iters, consume;
  int wait;  // 0: none; 1: one barrier before each matrix
  int nostop;  // 1: the producer never polls the stop word (the kernels poll it twice a stage, with atomics)
  unsigned* counter;  // monotonic: one arrival per CTA per barrier; zeroed before each launch
  StageClock* clocks;  // PROF kernels: one per CTA (stream_ring.cuh), zeroed before the launch
};

template <int MB, int COPY, bool PROF>
__global__ void __launch_bounds__(kThreads, 1) stream_kernel(const __grid_constant__ Args a) {
  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ int stop;  // never set: the probe runs every iteration
  __shared__ StageClock clk;  // PROF: this CTA's clock (consumer and producer fields, one writer each)
  const Smem s = smem_layout(smem, a.ring);
  if (threadIdx.x == 0) stop = 1 << 30;
  if (PROF && threadIdx.x == 0) clk = StageClock{};
  ring_init(s, a.ring);
  if (threadIdx.x < 32) {
    produce<PROF>(a.ops, a.n_ops, a.ring, s, a.iters, a.nostop ? nullptr : &stop, &clk);
    if (PROF && threadIdx.x == 0) {
      a.clocks[blockIdx.x].empty_wait = clk.empty_wait;
      a.clocks[blockIdx.x].issue = clk.issue;
      a.clocks[blockIdx.x].issued = clk.issued;
    }
    return;
  }
  Cursor cur;
  unsigned arrivals = 0;
  for (int it = 0; it < a.iters; ++it)
    for (int o = 0; o < a.n_ops; ++o) {
      if (a.wait && arrivals > 0) wait_for(a.counter, arrivals * gridDim.x);
      consume_op<MB, COPY, PROF>(a.ring, a.ops[o], s, cur, a.consume, nullptr, &clk);
      if (a.wait) {
        arrive(a.counter);  // this CTA's outputs of the matrix are written (release)
        ++arrivals;
      }
    }
  if (PROF && threadIdx.x == 32) {
    StageClock& out = a.clocks[blockIdx.x];
    out.full_wait = clk.full_wait, out.input_wait = clk.input_wait, out.input_issue = clk.input_issue;
    out.compute = clk.compute;
    out.finish = clk.finish, out.stages = clk.stages, out.tiles = clk.tiles;
  }
}

// The consumers' barrier alone (stream_loop.cu's `sync`: arrive, then wait for every CTA's arrival), n times:
// its cost decides how many of them an iteration can afford (the streamed loop has 50 per Huginn
// iteration; the ring hides a wait only while it is shorter than the ring's bytes take to stream).
__global__ void __launch_bounds__(kThreads, 1) barrier_kernel(unsigned* counter, int n) {
  if (threadIdx.x < 32) return;  // no producer: only the consumers' ordering is timed
  for (int i = 1; i <= n; ++i) {
    arrive(counter);
    wait_for(counter, (unsigned)i * gridDim.x);
  }
}

// ---------------------------------------------------------------- host
__host__ __device__ inline float value_at(uint64_t seed, uint64_t i) {  // reproducible pseudo-random in [-1, 1)
  uint64_t z = seed * 0x9E3779B97F4A7C15ull + i;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return (float)(z >> 40) / (float)(1ull << 23) - 1.f;
}

__global__ void fill(bf16* p, size_t n, uint64_t seed, float scale) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
    p[i] = __float2bfloat16(value_at(seed, i) * scale);
}

float host_bf16(float v) { return __bfloat162float(__float2bfloat16(v)); }

#define CHECK(x)                                                                                 \
  do {                                                                                           \
    cudaError_t e_ = (x);                                                                        \
    if (e_ != cudaSuccess) {                                                                     \
      std::printf("probe error: %s at line %d: %s\n", #x, __LINE__, cudaGetErrorString(e_));   \
      std::exit(2);                                                                              \
    }                                                                                            \
  } while (0)

template <int COPY, bool PROF>
const void* kernel_of(const Ring& g) {
  if (g.mma()) return reinterpret_cast<const void*>(stream_kernel<1, COPY, PROF>);  // mma path: MB unused
  if (g.batch <= 1) return reinterpret_cast<const void*>(stream_kernel<1, COPY, PROF>);
  return reinterpret_cast<const void*>(stream_kernel<4, COPY, PROF>);
}
// the consumers read rows unless the producer copied tensor-map boxes (copy=none: rows, as they stand)
const void* kernel_for(const Ring& g, bool prof) {
  if (prof) return g.copy == kCopyTensor ? kernel_of<kCopyTensor, true>(g) : kernel_of<kCopyRows, true>(g);
  return g.copy == kCopyTensor ? kernel_of<kCopyTensor, false>(g) : kernel_of<kCopyRows, false>(g);
}

}  // namespace

int main(int argc, char** argv) {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // each line reaches the log as measured, even if a timeout kills us
  const int iters = argc > 1 ? std::atoi(argv[1]) : 8;
  const int d = 5280, ffn = 17920, layers = 4;
  int dev = 0, sms = 0, optin = 0;
  CHECK(cudaGetDevice(&dev));
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, dev));
  std::printf("probe device %s, %d SMs, %d B shared memory per block, L2 %d MB\n", prop.name, sms, optin,
              prop.l2CacheSize >> 20);
  cudaEvent_t e0, e1;
  CHECK(cudaEventCreate(&e0));
  CHECK(cudaEventCreate(&e1));
  // the best of `reps` timed runs of run(rep) in ms, the first left out (warm-up); a launch error fails here
  auto best_ms = [&](int reps, auto run) {
    float best = 1e30f;
    for (int rep = 0; rep < reps; ++rep) {
      CHECK(cudaEventRecord(e0));
      run(rep);
      CHECK(cudaEventRecord(e1));
      CHECK(cudaEventSynchronize(e1));
      CHECK(cudaGetLastError());
      float ms;
      CHECK(cudaEventElapsedTime(&ms, e0, e1));
      if (rep > 0) best = std::fmin(best, ms);
    }
    return best;
  };

  // the floor's denominator: device-to-device copies of two 4 GiB sources in turn (read + write)
  for (size_t gib : {4, 0}) {
    const size_t n = gib ? gib << 30 : 256ull << 20;
    unsigned char *s0, *s1, *dst;
    CHECK(cudaMalloc(&s0, n));
    CHECK(cudaMalloc(&s1, n));
    CHECK(cudaMalloc(&dst, n));
    CHECK(cudaMemset(s0, 1, n));
    CHECK(cudaMemset(s1, 2, n));
    const float best =
        best_ms(6, [&](int rep) { CHECK(cudaMemcpyAsync(dst, rep % 2 ? s1 : s0, n, cudaMemcpyDeviceToDevice)); });
    std::printf("probe copy bytes=%zu TB/s=%.3f\n", n, 2.0 * n / (best * 1e-3) / 1e12);
    CHECK(cudaFree(s0));
    CHECK(cudaFree(s1));
    CHECK(cudaFree(dst));
  }

  {  // the consumers' barrier across every SM, alone
    unsigned* counter;
    CHECK(cudaMalloc(&counter, 4));
    const int n = 2000;
    const float best = best_ms(4, [&](int) {
      CHECK(cudaMemsetAsync(counter, 0, 4));
      barrier_kernel<<<sms, kThreads>>>(counter, n);  // one CTA per SM (one fits; all resident)
    });
    std::printf("probe barrier ctas=%d us_per_barrier=%.2f (the streamed loop: 50 per Huginn iteration)\n", sms,
                best * 1e3 / n);
    CHECK(cudaFree(counter));
  }

  std::vector<std::pair<int64_t, int64_t>> mats = {{d, d}};
  for (int l = 0; l < layers; ++l) mats.insert(mats.end(), {{3 * d, d}, {d, d}, {2 * ffn, d}, {d, ffn}});
  const int n_ops = (int)mats.size();
  std::vector<bf16*> weights(n_ops);
  size_t total = 0;
  for (int o = 0; o < n_ops; ++o) {
    const size_t n = (size_t)mats[o].first * mats[o].second;
    CHECK(cudaMalloc(&weights[o], n * 2));
    fill<<<1024, 256>>>(weights[o], n, 100 + o, 0.05f);
    total += n * 2;
  }
  bf16* x;
  CHECK(cudaMalloc(&x, (size_t)kMaxBatch * ffn * 2));
  fill<<<256, 256>>>(x, (size_t)kMaxBatch * ffn, 7, 1.f);
  float* outs;
  size_t out_elems = 0;
  for (auto& m : mats) out_elems += (size_t)kMaxBatch * m.first;
  CHECK(cudaMalloc(&outs, out_elems * 4));
  unsigned* counter;
  CHECK(cudaMalloc(&counter, 4));
  int* firsts;
  CHECK(cudaMalloc(&firsts, (size_t)n_ops * (sms + 1) * 4));
  StageClock* clocks;
  CHECK(cudaMalloc(&clocks, sms * sizeof(StageClock)));
  CHECK(cudaDeviceSynchronize());
  std::printf("probe weights bytes=%zu per iteration, %d matrices, %d iterations per launch\n", total, n_ops, iters);

  int failures = 0;
  struct Config {
    int batch, stages, consume, wait, staged;  // staged: 1 staged, 2 fixed (unchecked), 3 ranged
    int copy = kCopyRows;                           // RingCopy (stream_ring.cuh)
    int tile_rows = 0, k_chunk = 0;                 // 0: the plan's
    int prof = 0;                                   // 1: also a clocked run: where a stage's cycles go
    int nostop = 0;                                 // 1: the producer never polls the stop word
    int test_wait = 0;                              // 1: consumers spin on test_wait (Ring::test_wait)
    int mma_from = latentrt_stream::kMmaFromBatch;  // 1: mma.sync consumers at batch 1-4 too (Ring::mma)
  };
  std::vector<Config> configs;
  // 2026-12-04 (fourth run): the clocks put 75-80% of a stage in the consumers' own instructions (1221 cycles
  // at batch 1, 1624 at 8, the same with nothing copied); the producer's stop-word polls and try_wait's
  // suspension cost nothing measurable (the nostop / test_wait options, kept, not run). The consumers were
  // rewritten (shared-memory loads by address, loads ahead of the math): the same clocked runs say what that
  // changed, batch 32 added; then the row ring with wider stages (1024 columns at batch 1 and 4, 512 at 8),
  // clocked at batch 1: how much of a stage's cost is fixed once the loads overlap. New clock: input_issue,
  // issuing the next stage's input chunk (untimed before; with nothing copied, a fixed input instead of one
  // staged each stage ran 29% faster at batch 1 and 30% at 8: that part of a stage went unclocked).
  for (int batch : {1, 8, 32})
    for (int copy : {kCopyRows, kCopyTensor, kCopyNone}) {
      Config c{batch, 0, 1, 1, 1, copy};
      c.prof = 1;
      if (batch != 32 || copy == kCopyRows) configs.push_back(c);
    }
  for (int batch : {1, 4}) {
    Config c{batch, 6, 1, 1, 1, kCopyRows, 16, 1024};
    c.prof = batch == 1;
    configs.push_back(c);
  }
  configs.push_back({8, 6, 1, 1, 1, kCopyRows, 32, 512});
  // the input staged once per column range a CTA covers (input=ranged: one staging and two consumer barriers
  // an op instead of one of each a stage), against the per-stage staging above and the unstaged ceiling
  // (input=fixed); clocked at batch 1
  for (int batch : {1, 4, 8}) {
    Config c{batch, 0, 1, 1, 3, kCopyRows};
    c.prof = batch == 1;
    configs.push_back(c);
  }
  // (added 2026-12-05, CPU only) tensor cores at batch 1 and 4: one mma.sync m16n8k16 multiplies a 16 x 16
  // weight block (512 bytes) by the batch padded to 8 columns, its A fragment one ldmatrix.x4. cuobjdump -sass
  // of this probe at batch 1: a k-step is ~16 warp instructions per 512 weight bytes (LDSM, HMMA, two
  // predicated LDS for the B fragment, the rest the loop's address arithmetic and branch), where the dot
  // products take ~30 (60 a lane per 32 weight bytes: 3 LDS.128, 28 bf16 unpacks, 8 FMUL, 8 FFMA, 8 FADD,
  // 5 others; 69 before dot8 unpacked by shift and mask); and a k-step's chain is LDSM -> HMMA instead of
  // LDS -> unpack -> FMUL -> FFMA -> FADDs.
  // The 7 padded columns cost nothing the stream pays for. Consuming behind row copies and tensor-map boxes (128-byte swizzled, as at batch 8;
  // checked) and with nothing copied (the ceiling), batch 1 clocked: against the CUDA-core lines above at
  // the same ring. If the consumers stop being the bound, the faster tensor-map stream is what they wait on.
  for (int batch : {1, 4})
    for (int copy : {kCopyRows, kCopyTensor, kCopyNone}) {
      Config c{batch, 0, 1, copy != kCopyNone, 1, copy};
      c.mma_from = 1;
      c.prof = batch == 1;
      configs.push_back(c);
    }
  for (int batch : {1, 4, 8, 16, 32}) {
    // the baseline of the kernels' ring (rows), alone and consuming with a wait before each matrix
    configs.push_back({batch, 0, 0, 0, 1});
    configs.push_back({batch, 0, 1, 1, 1});
    // tensor-map copies: alone, consuming (checked) with and without the waits, and without input refills
    configs.push_back({batch, 0, 0, 0, 1, kCopyTensor});
    configs.push_back({batch, 0, 1, 1, 1, kCopyTensor});
    configs.push_back({batch, 0, 1, 0, 1, kCopyTensor});
    configs.push_back({batch, 0, 1, 0, 2, kCopyTensor});
    // the consumers alone (nothing copied), with the input staged each stage and without
    configs.push_back({batch, 0, 1, 0, 1, kCopyNone});
    configs.push_back({batch, 0, 1, 0, 2, kCopyNone});
  }
  // a shallower ring on tensor copies (the row copies' rate did not depend on the stages; a faster stream may)
  for (int batch : {1, 8}) configs.push_back({batch, 4, 1, 1, 1, kCopyTensor});
  // other stage shapes on tensor copies, consuming with the waits: does the consumers' cost follow the stages
  // (a fixed cost per stage: wider k-chunks amortise it) or the bytes?
  for (int batch : {1, 4})
    for (int kc : {256, 1024}) configs.push_back({batch, 0, 1, 1, 1, kCopyTensor, 16, kc});
  configs.push_back({8, 0, 1, 1, 1, kCopyTensor, 64, 128});
  configs.push_back({8, 0, 1, 1, 1, kCopyTensor, 32, 512});
  configs.push_back({32, 0, 1, 1, 1, kCopyTensor, 32, 256});
  if (tensor_map_encoder() == nullptr)
    std::printf("probe copy=tensor unavailable: no cuTensorMapEncodeTiled from the driver\n");
  CUtensorMap* maps;  // copy=tensor: one per matrix, in global memory (64-byte aligned)
  CHECK(cudaMalloc(&maps, (size_t)n_ops * sizeof(CUtensorMap)));
  for (const Config& cf : configs) {
    const Plan p = plan_stream(mats, cf.batch, sms, optin, cf.tile_rows, cf.k_chunk, cf.staged != 0, cf.mma_from);
    if (!p.reason.empty()) {
      std::printf("probe batch=%d plan refused: %s\n", cf.batch, p.reason.c_str());
      continue;
    }
    Args a{};
    a.n_ops = n_ops;
    a.ring = Ring{cf.batch, p.tile_rows, p.k_chunk, cf.stages ? std::min(cf.stages, p.stages) : p.stages, cf.staged,
                  cf.copy, cf.test_wait};
    a.ring.mma_from = cf.mma_from;
    int64_t input_bytes = p.input_bytes;  // ranged: one buffer of the widest column range, rows padded as
    if (cf.staged == 3) {                 // the per-stage chunks are (conflict-free mma B fragments)
      int64_t widest = 0;
      for (const OpPlan& op : p.ops)
        for (int sp = 0; sp < op.split_k; ++sp) {
          int64_t c0, c1;
          latentrt_stream::split_cols(op.cols, op.split_k, sp, &c0, &c1);
          widest = std::max(widest, c1 - c0);
        }
      a.ring.input_cols = (int)((widest + 63) / 64 * 64 + kInputPad);
      input_bytes = (int64_t)cf.batch * a.ring.input_cols * 2;
      const int64_t fixed_bytes = p.smem_bytes - p.input_bytes - (int64_t)p.stages * p.stage_bytes;
      a.ring.stages = (int)std::min<int64_t>(a.ring.stages, (optin - fixed_bytes - input_bytes) / p.stage_bytes);
      if (a.ring.stages < 2) {
        std::printf("probe batch=%d input=ranged skipped: %lld B of input\n", cf.batch, (long long)input_bytes);
        continue;
      }
    }
    const int64_t smem_bytes = p.smem_bytes - p.input_bytes - (int64_t)(p.stages - a.ring.stages) * p.stage_bytes +
                               input_bytes;
    a.consume = cf.consume;
    a.wait = cf.wait;
    a.counter = counter;
    std::vector<int> host_first;
    size_t out_at = 0;
    for (int o = 0; o < n_ops; ++o) {
      const OpPlan& op = p.ops[o];
      for (int64_t f : op.cta_first) host_first.push_back((int)f);
      Op& planned = a.ops[o] = planned_op(op, firsts + (size_t)o * (sms + 1));
      planned.w = weights[o], planned.x = x, planned.ldx = ffn, planned.out = outs + out_at;
      out_at += (size_t)kMaxBatch * op.rows;
    }
    CHECK(cudaMemcpy(firsts, host_first.data(), host_first.size() * 4, cudaMemcpyHostToDevice));
    if (cf.copy == kCopyTensor) {  // the tensor maps of this plan's boxes (stream_tensor_map.h)
      if (tensor_map_encoder() == nullptr) continue;
      std::vector<CUtensorMap> host_maps(n_ops);
      bool encoded = true;
      for (int o = 0; o < n_ops; ++o) {
        const std::string why = encode_weight_map(&host_maps[o], weights[o], mats[o].first, mats[o].second,
                                                  mats[o].second, a.ring);
        if (!why.empty()) {
          std::printf("probe batch=%d copy=tensor: matrix %d: %s\n", cf.batch, o, why.c_str());
          encoded = false;
          break;
        }
        a.ops[o].w = reinterpret_cast<const bf16*>(maps + o);
      }
      if (!encoded) continue;
      CHECK(cudaMemcpy(maps, host_maps.data(), n_ops * sizeof(CUtensorMap), cudaMemcpyHostToDevice));
    }
    a.nostop = cf.nostop;
    a.clocks = clocks;
    const void* kernel = kernel_for(a.ring, false);
    // tensor copies: the ring moves up to 1 KB to its 1024-byte alignment (stream_ring.cuh: smem_layout)
    const int smem = (int)smem_bytes + (cf.copy == kCopyTensor ? 1024 : 0);
    if (smem > optin) {
      std::printf("probe batch=%d copy=tensor skipped: %d B of shared memory\n", cf.batch, smem);
      continue;
    }
    CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    auto launch = [&](int n_iters) {
      a.iters = n_iters;
      CHECK(cudaMemsetAsync(counter, 0, 4));
      void* params[] = {&a};
      CHECK(cudaLaunchCooperativeKernel(kernel, dim3(sms), dim3(kThreads), params, smem, 0));
    };
    // correctness: one iteration on zeroed outputs, sampled rows of every matrix against the host
    double worst = 0;
    const bool checked = cf.consume && cf.staged != 2 && cf.copy != kCopyNone;
    if (checked) {
      CHECK(cudaMemset(outs, 0, out_elems * 4));
      launch(1);
      CHECK(cudaDeviceSynchronize());
      for (int o = 0; o < n_ops; ++o) {
        const int rows = (int)mats[o].first, cols = (int)mats[o].second;
        for (int row : {0, 1, rows / 2 + 3, rows - 1}) {
          for (int b : {0, cf.batch - 1}) {
            double ref = 0, mag = 0;
            for (int k = 0; k < cols; ++k) {
              const double wv = host_bf16(value_at(100 + o, (uint64_t)row * cols + k) * 0.05f);
              const double xv = host_bf16(value_at(7, (uint64_t)b * ffn + k));  // x rows are ffn wide
              ref += wv * xv;
              mag += std::fabs(wv * xv);
            }
            float got;
            CHECK(cudaMemcpy(&got, a.ops[o].out + (size_t)b * rows + row, 4, cudaMemcpyDeviceToHost));
            worst = std::fmax(worst, std::fabs(got - ref) / (mag + 1e-6));
          }
        }
      }
    }
    const int barriers = cf.wait * n_ops;  // per iteration
    const float best = best_ms(4, [&](int) { launch(iters); });
    const double us = best * 1e3 / iters;
    const bool ok = !checked || worst < 1e-2;
    failures += !ok;
    if (cf.prof) {  // one clocked launch (its own kernel: clock reads in the loops), averaged over the CTAs
      const void* clocked = kernel_for(a.ring, true);
      CHECK(cudaFuncSetAttribute(clocked, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
      CHECK(cudaMemset(clocks, 0, sms * sizeof(StageClock)));
      a.iters = iters;
      CHECK(cudaMemsetAsync(counter, 0, 4));
      void* params[] = {&a};
      CHECK(cudaLaunchCooperativeKernel(clocked, dim3(sms), dim3(kThreads), params, smem, 0));
      CHECK(cudaDeviceSynchronize());
      std::vector<StageClock> host(sms);
      CHECK(cudaMemcpy(host.data(), clocks, sms * sizeof(StageClock), cudaMemcpyDeviceToHost));
      StageClock t{};
      for (const StageClock& h : host) {
        t.full_wait += h.full_wait, t.input_wait += h.input_wait, t.input_issue += h.input_issue;
        t.compute += h.compute, t.finish += h.finish;
        t.stages += h.stages, t.tiles += h.tiles, t.empty_wait += h.empty_wait, t.issue += h.issue;
        t.issued += h.issued;
      }
      const double st = (double)std::max(1ll, t.stages), is = (double)std::max(1ll, t.issued);
      std::printf(
          "probe-clock batch=%d gemv=%s copy=%s tile_rows=%d k_chunk=%d cycles_per_stage: consumer full_wait=%.0f "
          "input_wait=%.0f input_issue=%.0f compute=%.0f finish=%.0f (per tile %.0f, %.1f stages a tile) | "
          "producer empty_wait=%.0f issue=%.0f | stages=%lld issued=%lld\n",
          cf.batch, a.ring.mma() ? "mma" : "fma", cf.copy == kCopyTensor ? "tensor" : (cf.copy == kCopyNone ? "none" : "rows"),
          a.ring.tile_rows,
          a.ring.k_chunk, t.full_wait / st, t.input_wait / st, t.input_issue / st, t.compute / st, t.finish / st,
          t.finish / (double)std::max(1ll, t.tiles), st / (double)std::max(1ll, t.tiles), t.empty_wait / is,
          t.issue / is, t.stages, t.issued);
    }
    std::printf(
        "probe batch=%d mode=%s input=%s stages=%d consume=%d wait=%d barriers=%d tile_rows=%d k_chunk=%d "
        "us_per_iteration=%.1f TB/s=%.3f max_rel_err=%.2e %s%s%s\n",
        cf.batch, a.ring.mma() ? "ring-mma" : "ring-fma", cf.staged == 2 ? "fixed" : (cf.staged == 3 ? "ranged" : "staged"), a.ring.stages, cf.consume, cf.wait, barriers,
        a.ring.tile_rows, a.ring.k_chunk, us, total / (us * 1e-6) / 1e12, worst,
        checked || !cf.consume ? (ok ? "ok" : "WRONG") : "unchecked",
        cf.copy == kCopyTensor ? (a.ring.swizzled() ? " copy=tensor swizzle=128B" : " copy=tensor")
                               : (cf.copy == kCopyNone ? " copy=none" : ""),
        cf.nostop ? " nostop" : (cf.test_wait ? " test_wait" : ""));
  }
  std::printf("probe done, %d wrong\n", failures);
  return failures ? 1 : 0;
}
