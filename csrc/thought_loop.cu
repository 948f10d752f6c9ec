// The persistent thought-loop kernel: k Coconut continuous thoughts of a prompt in one cooperative launch.
// Each thought is a full pass of the GPT-2 layers at a new position whose input is ln_f(h) + wpe[pos] of the
// previous position's hidden state h (before ln_f). LayerNorm with biases, GELU (tanh) MLP, Conv1D weights
// passed transposed ([out, in], prepared once by the backend) so the same GEMV streams them.
#include "loop_common.cuh"
#include "thought_loop.h"

namespace {

using namespace latentrt_loop;

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

const void* thought_kernel_for(int batch) {
  if (batch <= 1) return reinterpret_cast<const void*>(thought_loop_kernel<1>);
  if (batch <= 4) return reinterpret_cast<const void*>(thought_loop_kernel<4>);
  if (batch <= 8) return reinterpret_cast<const void*>(thought_loop_kernel<8>);
  return reinterpret_cast<const void*>(thought_loop_kernel<16>);
}

}  // namespace

namespace latentrt {

long long thought_scratch_elems(const ThoughtLoopArgs& a) {
  const long long B = a.batch, d = a.d;
  return B * (6 * d + a.ffn);  // x_a x_b q y o mo | g
}

long long thought_table_bytes(const ThoughtLoopArgs& a) { return (long long)a.layers.size() * sizeof(Gpt2Layer); }

std::string thought_plan(const ThoughtLoopArgs& a, int device, int* grid, int* smem_bytes) {
  if (a.batch < 1 || a.batch > kMaxB)
    return "batch " + std::to_string(a.batch) + " is outside 1.." + std::to_string(kMaxB);
  if (a.head_dim > kMaxHeadDim || a.n_head * a.head_dim != a.d) return "head_dim must be d / n_head <= 128";
  if (a.d % 8 || a.ffn % 8) return "widths must be multiples of 8 (16-byte loads)";
  if (a.n_thoughts < 1 || a.layers.empty()) return "nothing to run";
  if (a.embeds || a.lm_head || a.pos_ptr || a.table_uploaded)
    return "answer tokens, device-held positions and prepared tables run on stream_thought only";
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
