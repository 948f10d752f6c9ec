// The streamed-weight thought loop (issue #11 §2, "Coconut thoughts ... through the same machinery"): k
// continuous thoughts of a prompt in one launch, like thought_loop.cu (the same arguments, ThoughtLoopArgs,
// and the same arithmetic: its rounding points are this kernel's spec), rebuilt on the streamed ring of
// stream_loop.cu so the weight stream never waits for activations.
//
// One CTA per SM (cooperative launch). Warp 0 streams the CTA's byte-balanced share of every GPT-2 layer's
// c_attn, c_proj, c_fc and mlp c_proj (Conv1D weights transposed to [out, in] by the backend), k times,
// through the ring (stream_ring.cuh, on the plan of stream_plan.h). Warps 1-8 consume. A thought at timeline
// index pos = pos0 + j takes, per layer, five consumer steps (the counter barrier of stream_common.cuh):
//   QKV   each CTA stages the layer's input itself (LayerNorm of a whole row is cheap at GPT-2's widths, so no
//         step is spent on it): x = the previous layer's residual + its MLP output (rounded as
//         thought_loop.cu), or for layer 0 the feedback ln_f(h) + wpe[position + j]; xs = ln_1(x) into the
//         CTA's own buffer; then acc_qkv = c_attn xs                                  (GEMV, fp32 sums)
//   ATT   q, k, v = rnd(acc + bias); this position's K/V written; attention over [0, pos] split over every
//         consumer warp (stream_attention.cuh) -> y
//   PROJ  acc_o = c_proj y
//   FC    each CTA stages x2 = x + rnd(acc_o + bias) and ln_2(x2); acc_fc = c_fc ln_2(x2)
//   OUT   each CTA stages g = gelu(rnd(acc_fc + bias)) over the whole row; acc_mo = mlp.c_proj g
// The hidden state of thought j (before ln_f) is x2 + rnd(acc_mo + bias) of the last layer, written to
// out[:, j] at the start of thought j + 1 (the last one after the loop). Block 0 keeps the residual rows
// (x_a, x_b) for the other CTAs.
// An answer token (`embeds`, `lm_head`: issue #11 §2 "answer tokens through the same machinery") is the same
// walk with k = 1: layer 0's input is the token's embedding + wpe (no feedback), and after the last layer
//   HEAD  each CTA stages ln_f(hidden state) itself; logits = lm_head . ln_f(h)                (GEMV, fp32)
// with the LM head streamed after the layers; the launch's end is the head's only barrier. The timeline index
// may live on the device (`pos_ptr`) and the table be uploaded once (`table_uploaded`), so one CUDA graph
// replays a whole answer token. fp32 sums are zeroed two steps after their last reader (split-K adds by
// atomics); their order of addition differs from thought_loop.cu's, so results agree within bf16
// tolerance, not bit for bit.
#include <climits>
#include <tuple>
#include <vector>

#include "stream_attention.cuh"
#include "stream_host.cuh"
#include "stream_thought.h"
#include "thought_loop.h"

namespace {

using namespace latentrt_ring;
using latentrt_stream::Plan;

constexpr int kOpsPerLayer = 4;  // c_attn, attn c_proj, c_fc, mlp c_proj
constexpr int kMaxLayers = 48;
constexpr int kMaxThoughtBatch = 16;  // each CTA stages [batch, ffn] of GELU output in its own buffer
constexpr int kMaxWidth = 2048;       // a row staged in shared memory for its LayerNorm

struct Gpt2Layer {
  const bf16 *ln1_w, *ln1_b, *attn_b, *proj_b, *ln2_w, *ln2_b, *fc_b, *out_b;
  bf16 *k, *v;  // [B, H, T, D]
  float scale;
};

struct Args {
  Ring ring;
  const Op* ops;            // [n_layers * 4] in the launch's device table
  const Gpt2Layer* layers;  // [n_layers] in the same table
  int B, d, H, D, I, T, k, pos0, n_layers, att_split_max;
  float eps;
  const bf16 *ln_f_w, *ln_f_b, *wpe;
  const int64_t* positions;  // [B] model position of the first thought
  const int64_t* pos_ptr;    // non-null: pos0 is read here (a launch captured in a CUDA graph)
  const bf16* h_in;          // [B, d] hidden state (before ln_f) feeding the first thought
  const bf16* embeds;        // non-null: [B, d] token embeddings, the first position's input (an answer token)
  bf16* out;                 // [B, k, d] every thought's hidden state (before ln_f)
  float* logits;             // non-null: [B, V] the LM head's sums over ln_f of the last hidden state
  int V;
  const uint8_t *valid, *active;
  bf16 *x_a, *x_b, *y;    // residual rows (block 0 writes them), attention output
  bf16 *xs_cta, *g_cta;   // per CTA: ln(x) [B, d] and gelu(fc) [B, I], each CTA's GEMV input
  float *acc_qkv, *acc_o, *acc_fc, *acc_mo;
  float* att_part;
  unsigned* att_count;
  float* zero_from;  // the fp32 sums and counters, zeroed at the start
  size_t zero_count;
  unsigned* counter;
  Watch watch;
};

struct Consumer {
  Cursor cur;
  unsigned phase = 0;
  int splits = 1;
};

__device__ __forceinline__ void step(const Args& a, Consumer& c) { grid_step(a.counter, c.phase, &a.watch); }

__device__ __forceinline__ float gelu_tanh(float x) {
  return 0.5f * x * (1.f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x)));
}

// LayerNorm of the CTA's staged row (fp32 copies of bf16 values) in place: fp32 statistics, (x - mean) *
// rstd * w + b rounded once (as torch and thought_loop.cu's layer_norm_row).
__device__ void layer_norm_row(float* row, int d, const bf16* w, const bf16* bias, float eps, float* sm) {
  float s = 0.f;
  for (int k = consumer_thread(); k < d; k += 32 * kConsumerWarps) s += row[k];
  const float mean = consumer_sum(s, sm) / d;
  float v = 0.f;
  for (int k = consumer_thread(); k < d; k += 32 * kConsumerWarps) v += (row[k] - mean) * (row[k] - mean);
  const float rstd = rsqrtf(consumer_sum(v, sm) / d + eps);
  for (int k = consumer_thread(); k < d; k += 32 * kConsumerWarps)
    row[k] = rnd((row[k] - mean) * rstd * __bfloat162float(w[k]) + __bfloat162float(bias[k]));
  consumers_sync();
}

// Row b of the residual after layer `prev` (x2 + rnd(acc_mo + bias)) into the CTA's `row`; block 0 also
// stores it (bf16) to `keep` when that is non-null (a position's hidden state, out[b, j]).
__device__ void load_residual(const Args& a, int b, const Gpt2Layer& prev, float* row, bf16* keep) {
  for (int k = consumer_thread(); k < a.d; k += 32 * kConsumerWarps) {
    const size_t at = (size_t)b * a.d + k;
    row[k] = rnd(ldb(a.x_b + at) + rnd(__ldcg(a.acc_mo + at) + __bfloat162float(prev.out_b[k])));
    if (keep != nullptr && blockIdx.x == 0) keep[k] = __float2bfloat16(row[k]);
  }
  consumers_sync();
}

// Where block 0 stores row b's hidden state of position j (before ln_f).
__device__ __forceinline__ bf16* hidden_out(const Args& a, int b, int j) { return a.out + ((size_t)b * a.k + j) * a.d; }

// The input of layer i of position j, staged by every CTA for itself: the residual x (layer 0: the feedback
// ln_f(h) + wpe[position + j] of the previous position's hidden state h, or for an answer token its
// embedding + wpe[position]) -> x_a (block 0), ln_1(x) -> its xs.
__device__ void stage_input(const Args& a, int j, int i, float* row, float* sm) {
  const int d = a.d;
  const bool first = i == 0 && j == 0;
  const Gpt2Layer& prev = a.layers[i == 0 ? a.n_layers - 1 : i - 1];  // whose MLP output is added
  bf16* xs = a.xs_cta + (size_t)blockIdx.x * a.B * d;
  for (int b = 0; b < a.B; ++b) {
    if (first) {
      const bf16* src = (a.embeds != nullptr ? a.embeds : a.h_in) + (size_t)b * d;
      for (int k = consumer_thread(); k < d; k += 32 * kConsumerWarps) row[k] = ldb(src + k);
      consumers_sync();
    } else {
      load_residual(a, b, prev, row, i == 0 ? hidden_out(a, b, j - 1) : nullptr);
    }
    if (i == 0) {  // this position's input embedding: a thought's feedback ln_f(h), or a token's embedding
      if (!(first && a.embeds != nullptr)) layer_norm_row(row, d, a.ln_f_w, a.ln_f_b, a.eps, sm);
      const bf16* pe = a.wpe + (size_t)(a.positions[b] + j) * d;
      for (int k = consumer_thread(); k < d; k += 32 * kConsumerWarps) row[k] = rnd(row[k] + __bfloat162float(pe[k]));
      consumers_sync();
    }
    if (blockIdx.x == 0)
      for (int k = consumer_thread(); k < d; k += 32 * kConsumerWarps) a.x_a[(size_t)b * d + k] = __float2bfloat16(row[k]);
    layer_norm_row(row, d, a.layers[i].ln1_w, a.layers[i].ln1_b, a.eps, sm);
    for (int k = consumer_thread(); k < d; k += 32 * kConsumerWarps) xs[(size_t)b * d + k] = __float2bfloat16(row[k]);
    consumers_sync();
  }
}

// After attention: x2 = x + rnd(acc_o + bias) -> x_b (block 0), ln_2(x2) -> the CTA's xs.
__device__ void stage_mlp_input(const Args& a, const Gpt2Layer& L, float* row, float* sm) {
  const int d = a.d;
  bf16* xs = a.xs_cta + (size_t)blockIdx.x * a.B * d;
  for (int b = 0; b < a.B; ++b) {
    for (int k = consumer_thread(); k < d; k += 32 * kConsumerWarps) {
      const size_t at = (size_t)b * d + k;
      row[k] = rnd(ldb(a.x_a + at) + rnd(__ldcg(a.acc_o + at) + __bfloat162float(L.proj_b[k])));
      if (blockIdx.x == 0) a.x_b[at] = __float2bfloat16(row[k]);
    }
    consumers_sync();
    layer_norm_row(row, d, L.ln2_w, L.ln2_b, a.eps, sm);
    for (int k = consumer_thread(); k < d; k += 32 * kConsumerWarps) xs[(size_t)b * d + k] = __float2bfloat16(row[k]);
    consumers_sync();
  }
}

// g = gelu(rnd(acc_fc + bias)) over every column, into the CTA's own buffer (its c_proj tiles may need any).
__device__ void stage_gelu(const Args& a, const Gpt2Layer& L) {
  bf16* g = a.g_cta + (size_t)blockIdx.x * a.B * a.I;
  for (int e = consumer_thread(); e < a.B * a.I; e += 32 * kConsumerWarps)
    g[e] = __float2bfloat16(gelu_tanh(rnd(__ldcg(a.acc_fc + e) + __bfloat162float(L.fc_b[e % a.I]))));
  consumers_sync();
}

// One matrix of the stream; `x_cta`: its input is this CTA's own staged buffer (that many elements a CTA).
template <int MB>
__device__ void gemv(const Args& a, Consumer& c, const Smem& s, int o, size_t x_cta) {
  Op op = a.ops[o];
  op.x += (size_t)blockIdx.x * x_cta;
  consume<MB>(a.ring, op, s, c.cur, true, &a.watch);
}

// After the last position: its hidden state -> out (block 0); with an LM head every CTA stages ln_f of it
// into its xs, the head's input.
__device__ void stage_head(const Args& a, float* row, float* sm) {
  const bool head = a.logits != nullptr;
  if (!head && blockIdx.x != 0) return;
  bf16* xs = a.xs_cta + (size_t)blockIdx.x * a.B * a.d;
  for (int b = 0; b < a.B; ++b) {
    load_residual(a, b, a.layers[a.n_layers - 1], row, hidden_out(a, b, a.k - 1));
    if (!head) continue;
    layer_norm_row(row, a.d, a.ln_f_w, a.ln_f_b, a.eps, sm);
    for (int k = consumer_thread(); k < a.d; k += 32 * kConsumerWarps) xs[(size_t)b * a.d + k] = __float2bfloat16(row[k]);
    consumers_sync();
  }
}

template <int MB>
__device__ __forceinline__ void run(const Args& a, const Smem& s, const uint8_t* act, float* row, float* sm) {
  Consumer c;
  const int B = a.B, d = a.d, H = a.H, D = a.D;
  const int pos0 = a.pos_ptr != nullptr ? (int)__ldcg(a.pos_ptr) : a.pos0;
  const int head = kOpsPerLayer * a.n_layers;  // the LM head's op, when there is one
  c.splits = latentrt_stream::attention_splits((int64_t)B * H, pos0 + a.k, gridDim.x * kConsumerWarps,
                                               a.att_split_max);  // the longest thought's positions
  zero(a.zero_from, a.zero_count);
  if (a.logits != nullptr && a.ops[head].split_k > 1) zero(a.logits, (size_t)B * a.V);  // split-K adds
  step(a, c);
  const AttnIO io{B, H, H, D, a.T, a.valid, nullptr, a.y, a.att_part, a.att_count};
  for (int j = 0; j < a.k; ++j) {
    const int pos = pos0 + j;
    for (int i = 0; i < a.n_layers; ++i) {
      const Gpt2Layer& L = a.layers[i];
      const int o = kOpsPerLayer * i;
      stage_input(a, j, i, row, sm);
      zero(a.acc_fc, (size_t)B * a.I);  // last read by stage_gelu, one step ago
      gemv<MB>(a, c, s, o, (size_t)B * d);  // QKV
      step(a, c);
      zero(a.acc_mo, (size_t)B * d);  // last read by stage_input, one step ago
      attend_split(io, L.k, L.v, pos, 0, false, act, c.splits, L.scale,
                   [&](int b, int h, int d0, float* q, float* k, float* v) {
                     const float* acc = a.acc_qkv + (size_t)b * 3 * d + h * D + d0;
                     const bf16* bias = L.attn_b + h * D + d0;
#pragma unroll
                     for (int e = 0; e < kVec; ++e) {
                       q[e] = rnd(__ldcg(acc + e) + __bfloat162float(bias[e]));
                       k[e] = rnd(__ldcg(acc + d + e) + __bfloat162float(bias[d + e]));
                       v[e] = rnd(__ldcg(acc + 2 * d + e) + __bfloat162float(bias[2 * d + e]));
                     }
                   });
      step(a, c);
      zero(a.acc_qkv, (size_t)B * 3 * d);  // last read by the attention, one step ago
      gemv<MB>(a, c, s, o + 1, 0);         // PROJ
      step(a, c);
      stage_mlp_input(a, L, row, sm);
      gemv<MB>(a, c, s, o + 2, (size_t)B * d);  // FC
      step(a, c);
      zero(a.acc_o, (size_t)B * d);  // last read by stage_mlp_input, one step ago
      stage_gelu(a, L);
      gemv<MB>(a, c, s, o + 3, (size_t)B * a.I);  // OUT
      step(a, c);
    }
  }
  stage_head(a, row, sm);
  if (a.logits != nullptr) gemv<MB>(a, c, s, head, (size_t)B * d);  // HEAD: the launch's end is its barrier
}

// The producer's walk: every position's layers, then the LM head if any, in the consumers' order.
__device__ void stream_weights(const Args& a, const Smem& s, int* stop) {
  Producer p;
  const int n = kOpsPerLayer * a.n_layers;
  for (int j = 0; j < a.k; ++j)
    for (int o = 0; o < n; ++o)
      if (!produce_op(a.ops[o], a.ring, s, p, j, stop)) return drain(a.ring, s, p);
  if (a.logits != nullptr) produce_op(a.ops[n], a.ring, s, p, a.k, stop);
  drain(a.ring, s, p);
}

template <int MB>
__global__ void __launch_bounds__(kThreads, 1) stream_thought_kernel(const __grid_constant__ Args a) {
  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ float row[kMaxWidth];
  __shared__ float sm[kConsumerWarps];
  __shared__ uint8_t act[kMaxBatch];
  __shared__ int stop;
  const Smem s = smem_layout(smem, a.ring);
  if (threadIdx.x < kMaxBatch) act[threadIdx.x] = threadIdx.x < a.B ? a.active[threadIdx.x] : 0;
  if (threadIdx.x == 0) stop = INT_MAX;  // every thought runs: the producer never stops early
  ring_init(s, a.ring);                  // ends with __syncthreads
  if (threadIdx.x < 32) {
    stream_weights(a, s, &stop);
    return;
  }
  run<MB>(a, s, act, row, sm);
}

const void* kernel_for(int batch) {
  if (batch <= 1) return reinterpret_cast<const void*>(stream_thought_kernel<1>);
  if (batch <= 4) return reinterpret_cast<const void*>(stream_thought_kernel<4>);
  return reinterpret_cast<const void*>(stream_thought_kernel<1>);  // tensor cores: MB unused
}

// Ops of a launch: four per layer, then the LM head of an answer token.
size_t n_ops(const latentrt::ThoughtLoopArgs& a) { return a.layers.size() * kOpsPerLayer + (a.lm_head != 0); }

// The matrices of one position, {rows, cols}, in the producer's order (the LM head last).
std::vector<std::pair<int64_t, int64_t>> matrices(const latentrt::ThoughtLoopArgs& a) {
  const int64_t d = a.d, I = a.ffn;
  std::vector<std::pair<int64_t, int64_t>> m;
  for (size_t i = 0; i < a.layers.size(); ++i) m.insert(m.end(), {{3 * d, d}, {d, d}, {I, d}, {d, I}});
  if (a.lm_head != 0) m.push_back({a.vocab, d});
  return m;
}

std::string checks(const latentrt::ThoughtLoopArgs& a) {
  if (a.batch < 1 || a.batch > kMaxThoughtBatch)
    return "batch " + std::to_string(a.batch) + " is outside 1.." + std::to_string(kMaxThoughtBatch);
  if (a.layers.empty() || (int)a.layers.size() > kMaxLayers) return "1 to " + std::to_string(kMaxLayers) + " layers";
  if (a.n_head * a.head_dim != a.d || a.head_dim > kMaxHeadDim || a.head_dim % kVec)
    return "head_dim must be d / n_head, a multiple of 8 and <= 128";
  if (a.d % 8 || a.ffn % 8) return "widths must be multiples of 8 (16-byte rows for the bulk copies)";
  if (a.d > kMaxWidth) return "d must be <= " + std::to_string(kMaxWidth);
  if (a.n_thoughts < 1) return "nothing to run";
  if (a.lm_head != 0 && a.vocab < 1) return "an LM head needs vocab >= 1";
  return "";
}

using PlanKey = std::tuple<int, int, int, int, int, int, bool>;
latentrt_stream::PlanCache<PlanKey> plans;

// The plan on `device` (cached), or with `sms` > 0 for that many SMs and `smem` bytes of shared memory
// without asking a device (host-side tests).
std::string plan_for(const latentrt::ThoughtLoopArgs& a, int device, Plan* out, int sms = 0, int64_t smem = 0) {
  std::string why = checks(a);
  if (!why.empty()) return why;
  if (sms > 0) {
    *out = latentrt_stream::plan_stream(matrices(a), a.batch, sms, smem, 0, 0, a.stage_input != 0);
    return out->reason;
  }
  const PlanKey key{device, a.batch, a.d, a.ffn, (int)a.layers.size(), a.lm_head != 0 ? a.vocab : 0, a.stage_input != 0};
  return plans.get(device, kernel_for(a.batch), key, a.batch, a.stage_input != 0, [&] { return matrices(a); }, out);
}

// Workspace: bf16 rows, the CTAs' own inputs, split attention's partials, then the fp32 sums and the
// attention's counters (zeroed by the kernel at its start).
struct Layout {
  size_t x_a, x_b, y, xs_cta, g_cta, att_part, acc_qkv, acc_o, acc_fc, acc_mo, att_count, end;
};
int split_max(const latentrt::ThoughtLoopArgs& a) { return latentrt_stream::attention_split_max((int64_t)a.batch * a.n_head); }
Layout layout(const latentrt::ThoughtLoopArgs& a, int ctas) {
  const size_t B = a.batch, d = a.d, I = a.ffn;
  Layout l;
  latentrt_stream::Carver c;
  l.x_a = c.take(B * d * 2);
  l.x_b = c.take(B * d * 2);
  l.y = c.take(B * d * 2);
  l.xs_cta = c.take((size_t)ctas * B * d * 2);
  l.g_cta = c.take((size_t)ctas * B * I * 2);
  l.att_part = c.take(B * a.n_head * (size_t)split_max(a) * (2 + a.head_dim) * 4);
  l.acc_qkv = c.take(B * 3 * d * 4);
  l.acc_o = c.take(B * d * 4);
  l.acc_fc = c.take(B * I * 4);
  l.acc_mo = c.take(B * d * 4);
  l.att_count = c.take(B * a.n_head * 4);
  l.end = c.at;
  return l;
}

// The launch's device table: the ops (their tile runs pointing into the table), the layers, the runs.
size_t table_ops(const latentrt::ThoughtLoopArgs& a) { return n_ops(a) * sizeof(Op); }
size_t table_layers(const latentrt::ThoughtLoopArgs& a) { return a.layers.size() * sizeof(Gpt2Layer); }
size_t table_runs(const latentrt::ThoughtLoopArgs& a, int ctas) { return n_ops(a) * (size_t)(ctas + 1) * sizeof(int32_t); }

bf16* bp(uint64_t v) { return reinterpret_cast<bf16*>(v); }

// The kernel's arguments: the host's, the workspace carved from `scratch`, the table's parts in `layer_table`.
Args make_args(const latentrt::ThoughtLoopArgs& h, const Plan& p) {
  const Layout l = layout(h, p.ctas);
  unsigned char* w = reinterpret_cast<unsigned char*>(h.scratch);
  Args a{};
  a.ring = Ring{h.batch, p.tile_rows, p.k_chunk, p.stages, p.stage_input};
  a.ops = reinterpret_cast<const Op*>(h.layer_table);
  a.layers = reinterpret_cast<const Gpt2Layer*>(h.layer_table + table_ops(h));
  a.B = h.batch;
  a.d = h.d;
  a.H = h.n_head;
  a.D = h.head_dim;
  a.I = h.ffn;
  a.T = h.max_len;
  a.k = h.n_thoughts;
  a.pos0 = h.pos;
  a.n_layers = (int)h.layers.size();
  a.att_split_max = split_max(h);
  a.eps = h.eps;
  a.ln_f_w = bp(h.ln_f_w);
  a.ln_f_b = bp(h.ln_f_b);
  a.wpe = bp(h.wpe);
  a.positions = reinterpret_cast<const int64_t*>(h.positions);
  a.pos_ptr = reinterpret_cast<const int64_t*>(h.pos_ptr);
  a.h_in = bp(h.h);
  a.embeds = bp(h.embeds);
  a.out = bp(h.out);
  a.logits = h.lm_head != 0 ? reinterpret_cast<float*>(h.logits) : nullptr;
  a.V = h.vocab;
  a.valid = reinterpret_cast<const uint8_t*>(h.valid);
  a.active = reinterpret_cast<const uint8_t*>(h.active);
  a.x_a = reinterpret_cast<bf16*>(w + l.x_a);
  a.x_b = reinterpret_cast<bf16*>(w + l.x_b);
  a.y = reinterpret_cast<bf16*>(w + l.y);
  a.xs_cta = reinterpret_cast<bf16*>(w + l.xs_cta);
  a.g_cta = reinterpret_cast<bf16*>(w + l.g_cta);
  a.att_part = reinterpret_cast<float*>(w + l.att_part);
  a.acc_qkv = reinterpret_cast<float*>(w + l.acc_qkv);
  a.acc_o = reinterpret_cast<float*>(w + l.acc_o);
  a.acc_fc = reinterpret_cast<float*>(w + l.acc_fc);
  a.acc_mo = reinterpret_cast<float*>(w + l.acc_mo);
  a.att_count = reinterpret_cast<unsigned*>(w + l.att_count);
  a.zero_from = a.acc_qkv;
  a.zero_count = (l.end - l.acc_qkv) / 4;
  a.counter = reinterpret_cast<unsigned*>(h.barrier);
  a.watch = Watch{reinterpret_cast<int*>(h.watch), h.watch_cycles};
  return a;
}

// The table's bytes for the plan `p` and the arguments `a` (make_args: its buffers' device addresses).
std::vector<uint8_t> make_table(const latentrt::ThoughtLoopArgs& h, const Plan& p, const Args& a) {
  const size_t ops_n = n_ops(h), runs_at = table_ops(h) + table_layers(h);
  std::vector<uint8_t> table(runs_at + table_runs(h, p.ctas));
  Op* ops = reinterpret_cast<Op*>(table.data());
  Gpt2Layer* layers = reinterpret_cast<Gpt2Layer*>(table.data() + table_ops(h));
  int32_t* runs = reinterpret_cast<int32_t*>(table.data() + runs_at);
  for (size_t o = 0; o < ops_n; ++o) {
    const auto& op = p.ops[o];
    for (int c = 0; c <= p.ctas; ++c) runs[o * (p.ctas + 1) + c] = (int32_t)op.cta_first[c];
    Op& x = ops[o] = planned_op(op, reinterpret_cast<const int*>(h.layer_table + runs_at + o * (p.ctas + 1) * sizeof(int32_t)));
    if (o == h.layers.size() * kOpsPerLayer) {  // the LM head on every CTA's own ln_f(h)
      x.w = bp(h.lm_head), x.x = a.xs_cta, x.ldx = h.d, x.out = a.logits;
      continue;
    }
    const latentrt::Gpt2LayerArgs& s = h.layers[o / kOpsPerLayer];
    switch (o % kOpsPerLayer) {  // inputs of the CTAs' own buffers: the kernel offsets them per CTA
      case 0:
        x.w = bp(s.attn_w), x.x = a.xs_cta, x.ldx = h.d, x.out = a.acc_qkv;
        break;
      case 1:
        x.w = bp(s.proj_w), x.x = a.y, x.ldx = h.d, x.out = a.acc_o;
        break;
      case 2:
        x.w = bp(s.fc_w), x.x = a.xs_cta, x.ldx = h.d, x.out = a.acc_fc;
        break;
      default:
        x.w = bp(s.out_w), x.x = a.g_cta, x.ldx = h.ffn, x.out = a.acc_mo;
        break;
    }
  }
  for (size_t i = 0; i < h.layers.size(); ++i) {
    const latentrt::Gpt2LayerArgs& s = h.layers[i];
    layers[i] = Gpt2Layer{bp(s.ln_1_w), bp(s.ln_1_b), bp(s.attn_b), bp(s.proj_b), bp(s.ln_2_w), bp(s.ln_2_b),
                          bp(s.fc_b),   bp(s.out_b),  bp(s.k_cache), bp(s.v_cache), s.scale};
  }
  return table;
}

}  // namespace

namespace latentrt {

std::string stream_thought_plan(const ThoughtLoopArgs& a, int device, int* grid, int* smem_bytes) {
  Plan p;
  return latentrt_stream::grid_of(plan_for(a, device, &p), p, grid, smem_bytes);
}

long long stream_thought_scratch_bytes(const ThoughtLoopArgs& a, int ctas) { return (long long)layout(a, ctas).end; }

long long stream_thought_table_bytes(const ThoughtLoopArgs& a, int ctas) {
  return (long long)(table_ops(a) + table_layers(a) + table_runs(a, ctas));
}

std::vector<uint8_t> stream_thought_table(const ThoughtLoopArgs& a, int device, int sms, long long smem_optin) {
  Plan p;
  if (!plan_for(a, device, &p, sms, smem_optin).empty() || a.layer_table == 0 || a.scratch == 0) return {};
  return make_table(a, p, make_args(a, p));
}

int stream_thought(const ThoughtLoopArgs& h, int device, std::string* why) {
  Plan p;
  if (!plan_for(h, device, &p).empty() || h.layer_table == 0 || h.scratch == 0 || h.barrier == 0 ||
      (h.lm_head != 0 && h.logits == 0))
    return 1;
  Args a = make_args(h, p);
  const cudaStream_t stream = reinterpret_cast<cudaStream_t>(h.stream);
  if (!h.table_uploaded) {
    const std::vector<uint8_t> table = make_table(h, p, a);
    // pageable source: the copy is staged before cudaMemcpyAsync returns, so `table` may go out of scope
    const cudaError_t err = cudaMemcpyAsync(reinterpret_cast<void*>(h.layer_table), table.data(), table.size(),
                                            cudaMemcpyHostToDevice, stream);
    if (err != cudaSuccess) return latentrt_stream::cuda_failed(err, why);
  }
  return latentrt_stream::launch_cooperative(kernel_for(h.batch), p.ctas, kThreads, (int)p.smem_bytes, &a, a.counter, stream, why);
}

}  // namespace latentrt
