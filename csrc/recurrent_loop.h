// The persistent recurrent-loop kernel (recurrent_loop.cu): host-side argument structs and launcher.
// Pointers are device addresses as integers (taken from torch tensors on the Python side).
#pragma once
#include <stdint.h>

#include <string>
#include <vector>

namespace latentrt {

// One Huginn sandwich layer: x = norm_2(x + attn(norm_1 x)); x = norm_4(x + mlp(norm_3 x)).
struct SandwichLayer {
  uint64_t norm_1 = 0, norm_2 = 0, norm_3 = 0, norm_4 = 0;  // RMSNorm weights [d]
  uint64_t wqkv = 0;                                        // [(H + 2 Hkv) D, d], rows q | k | v
  uint64_t qk_bias = 0;                                     // [2, H, D] or 0
  uint64_t wo = 0;                                          // [d, H D]
  uint64_t wfc = 0;                                         // [2 I, d], gate rows then up rows
  uint64_t wproj = 0;                                       // [d, I]
  uint64_t k_cache = 0, v_cache = 0;                        // [slots, B, Hkv, T, D] contiguous
  int slots = 1;                                            // core layers: kv slots; plain layers: 1
};

// Everything one launch needs: one generated token, up to r_max core iterations for B sequences.
struct LoopArgs {
  int batch = 1, d = 0, n_head = 0, n_kv = 0, head_dim = 0, ffn = 0, max_len = 0, vocab = 0;
  int pos = 0;        // timeline index of the token (its K/V entries)
  int r_max = 0, min_steps = 0, check_every = 1;  // checks after iterations t >= min_steps, every check_every
  int criterion = 0;  // 0 none, 1 latent-diff, 2 cosine, 3 kl (head + KL per iteration, in the kernel)
  float eps = 1e-6f, threshold = 0.f;
  std::vector<SandwichLayer> core, coda;
  uint64_t adapter = 0;     // W[:, :d] (bf16), row stride ld_adapter
  int ld_adapter = 0;
  uint64_t term = 0;        // [B, d] bf16: W[:, d:] e + bias, computed once per token
  uint64_t ln_f = 0, lm_head = 0;  // criterion 3 only
  uint64_t cos = 0, sin = 0;       // [B, D/2] fp32 RoPE rows of the token
  uint64_t valid = 0;              // [B, T] uint8
  uint64_t written = 0;            // [B, T] int64: iterations each position wrote
  uint64_t state = 0;              // [B, d] bf16: initial state in, final state out
  uint64_t ref_state = 0;          // [B, d] bf16: the initial state in; the state of the last check
  uint64_t active = 0;             // [B] uint8: alive in, still running out
  uint64_t used = 0;               // [B] int64: iterations run (zeroed by the caller)
  uint64_t logits = 0, prev_logp = 0;  // [B, V] fp32 (criterion 3): exit logits out, KL state
  uint64_t scratch = 0;            // workspace: loop_scratch_elems() bf16 (stream_loop: its scratch bytes)
  uint64_t table = 0;              // stream_loop only: the plan's tile runs (stream_loop_table), on the device
  uint64_t pos_ptr = 0;            // stream_loop only: int64 [1] on the device holding `pos` (then `pos` is unused)
  uint64_t watch = 0;              // stream_loop only: int32[8] in pinned host memory for the watchdog, or 0
  long long watch_cycles = 4000000000LL;  // a consumer wait longer than this trips the watchdog (~2 s)
  int split_attention = 1;         // stream_loop only: attention split over positions (1), or per CTA (0)
  int stage_input = 1;             // stream_loop only: each stage's input chunk in shared memory (1) or from L2 (0)
  int tensor_copy = 0;             // stream_loop only: weights copied as 2D tensor-map boxes (1) or row segments (0)
  int tensor_core_gemv = 0;        // stream_loop only: every batch's GEMVs on tensor cores (1), or from batch 5 (0)
  uint64_t barrier = 0;            // 2 x uint32, zeroed once; self-resetting
  int barrier_mode = 0;            // 0 cooperative-groups grid sync, 1 counters in global memory
  uint64_t stream = 0;
};

// Shared-memory bytes, workspace elements and the largest grid that can be co-resident; "" when it
// fits, else the reason it does not (the caller falls back to Triton and logs it).
std::string loop_plan(const LoopArgs& a, int device, int* grid, int* smem_bytes);
long long loop_scratch_elems(const LoopArgs& a);
// 0 launched, 1 unsupported (see loop_plan), 2 CUDA error.
int latent_loop(const LoopArgs& a, int device);

}  // namespace latentrt
