// The persistent thought-loop kernel (thought_loop.cu): host-side argument structs and launcher.
// Pointers are device addresses as integers (taken from torch tensors on the Python side).
#pragma once
#include <stdint.h>

#include <string>
#include <vector>

namespace latentrt {

// One GPT-2 layer for the Coconut thought loop; Conv1D weights transposed to [out, in] (bf16, contiguous).
struct Gpt2LayerArgs {
  uint64_t ln_1_w = 0, ln_1_b = 0, attn_w = 0, attn_b = 0, proj_w = 0, proj_b = 0;
  uint64_t ln_2_w = 0, ln_2_b = 0, fc_w = 0, fc_b = 0, out_w = 0, out_b = 0;
  uint64_t k_cache = 0, v_cache = 0;  // [B, H, T, D]
  float scale = 1.f;                  // attention scale of this layer
};

// k continuous thoughts for B sequences in one launch (every sequence thinks at the same timeline entries).
struct ThoughtLoopArgs {
  int batch = 1, d = 0, n_head = 0, head_dim = 0, ffn = 0, max_len = 0, n_thoughts = 0;
  int pos = 0;  // timeline index of the first thought
  float eps = 1e-5f;
  std::vector<Gpt2LayerArgs> layers;
  uint64_t ln_f_w = 0, ln_f_b = 0, wpe = 0;
  uint64_t positions = 0;  // [B] int64: model position of the first thought
  uint64_t h = 0;          // [B, d] bf16: hidden state (before ln_f) feeding the first thought
  uint64_t out = 0;        // [B, k, d] bf16: every thought's hidden state (before ln_f)
  uint64_t valid = 0;      // [B, T] uint8
  uint64_t active = 0;     // [B] uint8
  uint64_t layer_table = 0;  // device buffer of thought_table_bytes() bytes
  uint64_t scratch = 0;      // bf16 workspace, thought_scratch_elems() elements
  uint64_t barrier = 0;
  int barrier_mode = 0;
  uint64_t watch = 0;                     // stream_thought only: int32[8] pinned host memory for the watchdog, or 0
  long long watch_cycles = 4000000000LL;  // stream_thought only: a consumer wait longer than this trips it
  // stream_thought only, an answer token (issue #11 §2): `embeds` [B, d] bf16 token embeddings make the first
  // position an ordinary token (input embeds + wpe, no feedback; `h` unused); `lm_head` [vocab, d] bf16 adds
  // the LM head after the last position: `logits` [B, vocab] fp32 = lm_head . ln_f(last hidden state), the
  // sums before torch's bf16 rounding of the product (the caller rounds).
  uint64_t embeds = 0, lm_head = 0, logits = 0;
  int vocab = 0;
  uint64_t pos_ptr = 0;         // stream_thought only: int64 device scalar holding `pos` (a captured launch)
  bool table_uploaded = false;  // stream_thought only: `layer_table` holds stream_thought_table()'s bytes
  int stage_input = 1;          // stream_thought only: each stage's input chunk in shared memory (1) or from L2 (0)
  uint64_t stream = 0;
};

std::string thought_plan(const ThoughtLoopArgs& a, int device, int* grid, int* smem_bytes);
long long thought_scratch_elems(const ThoughtLoopArgs& a);
long long thought_table_bytes(const ThoughtLoopArgs& a);
int thought_loop(const ThoughtLoopArgs& a, int device);

}  // namespace latentrt
