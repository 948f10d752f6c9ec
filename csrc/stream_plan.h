// The host-side plan of a streamed-weight persistent kernel (issue #11: "the weight stream never waits for
// activations; only the consumers do"). Host C++ only: no CUDA in here, so the planner is tested without a
// GPU (tests/test_stream_plan.py, through the extension's `stream_plan`) and shared by the probe
// (benchmarks/probes/stream_probe.cu) and the kernel built on it.
//
// (The header is also included by CUDA code; split_cols and attention_splits are compiled for the device.)
//
// One core iteration reads a fixed sequence of weight matrices (row-major [rows, cols], each read once).
// Each matrix is cut into tiles of `tile_rows` rows x a range of columns (split-K: `split_k` column ranges
// whose partial sums are added by atomics), and a tile into k-chunks of `k_chunk` columns: one k-chunk of
// one tile is one ring stage (tile_rows row segments, one bulk copy each). Every persistent CTA owns a
// contiguous run of each matrix's tiles, cut so that every CTA streams about the same bytes; its producer
// warp copies its stages in execution order into a ring of `stages` shared-memory buffers and waits only
// for a free buffer, while its consumer warps wait for the previous op's outputs and then for the stage.
//
// The batch's input chunk of a stage, x[:, k-chunk], is copied once per stage from L2 into a double-buffered
// shared-memory buffer (`stage_input`; issue #11: "the input staged per K-chunk ... so no weight row re-reads
// x from L2"): the next stage's chunk lands while the consumers multiply the current one. Without it (the
// `l2` input, kept for the probe's A/B) every consumer warp reads the chunk from L2 itself: 8 times a stage
// on the CUDA-core path, tile_rows / 16 times on the tensor-core path.
//
// Choices, each from a count rather than a guess:
//   tile_rows: the input chunk's bytes relative to the stage's weight bytes are batch / tile_rows: 16 rows
//              up to batch 4 (CUDA-core dot products), 32 up to 16, 64 up to 32 (tensor cores, the batch as
//              the mma's N side);
//   k_chunk:   a stage of about kStageTarget bytes (the bulk copies of one stage in flight together);
//   split_k:   the smallest split whose byte balance over the CTAs is within kBalance (Wo, the adapter and
//              proj have 5280 rows = 330 tiles of 16 for 132 SMs: 2.5 per CTA unsplit), else the best one up
//              to kMaxSplit ranges of at least kMinSplitCols columns (GPT-2's 768-wide matrices are too
//              small to balance over 132 CTAs: there the dependency waits cost more than the imbalance);
//   stages:    as many as the shared memory left after the consumers' reduction buffer allows (<= 8).
#pragma once
#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#if defined(__CUDACC__)
#define LRT_HOST_DEVICE __host__ __device__
#else
#define LRT_HOST_DEVICE
#endif

namespace latentrt_stream {

constexpr int kMaxBatch = 32;
constexpr int kConsumerWarps = 8;
constexpr int kMmaFromBatch = 5;  // batches from here multiply on tensor cores (mma_from: the probe lowers it)
constexpr int64_t kStageTarget = 16384;  // bytes of weights per ring stage
constexpr int kRowPad = 16;              // bytes after each staged row segment (no ldmatrix bank conflicts)
constexpr int kInputPad = 8;             // elements after each staged input row (conflict-free B fragments)
constexpr int kMaxStages = 8;
constexpr double kBalance = 1.05;  // largest CTA's bytes / mean, accepted without a further split
constexpr int kMaxSplit = 16;
constexpr int64_t kSplitAlign = 16;  // split boundaries at multiples of 16 columns (an mma k-step, 32 bytes)
constexpr int64_t kMinSplitCols = 256;  // no split range narrower than this (a stage's row segment)
constexpr int kElem = 2;  // bf16 weights

struct OpPlan {
  int64_t rows = 0, cols = 0;
  int64_t row_tiles = 0;   // ceil(rows / tile_rows)
  int split_k = 1;         // column ranges per row tile
  double balance = 0;      // largest CTA's bytes / mean bytes
  std::vector<int64_t> cta_first;  // CTA c streams tiles [cta_first[c], cta_first[c + 1])
  int64_t tiles() const { return row_tiles * split_k; }
};

struct Plan {
  std::string reason;  // empty when the plan is usable
  int batch = 0, ctas = 0, tile_rows = 0, k_chunk = 0, stages = 0;
  bool tensor_cores = false;  // batch >= mma_from: mma.sync consumers, else CUDA-core dot products
  bool stage_input = true;   // the input chunk staged in shared memory per stage (else read from L2)
  int64_t stage_bytes = 0;   // shared memory of one stage (rows padded)
  int64_t reduce_bytes = 0;  // the consumer warps' partial sums of one tile (fp32)
  int64_t input_bytes = 0;   // the staged input: two buffers of batch x (k_chunk + kInputPad) elements
  int64_t smem_bytes = 0;    // dynamic shared memory of a CTA
  std::vector<OpPlan> ops;
};

// The columns [first, last) of split s of an op: `split` ranges cut at multiples of kSplitAlign columns
// (also compiled for the device: the kernel walks the same ranges the host planned).
LRT_HOST_DEVICE inline int64_t split_edge(int64_t cols, int split, int64_t i) {
  if (i >= split) return cols;
  const int64_t e = cols * i / split / kSplitAlign * kSplitAlign;
  return e < cols ? e : cols;
}
LRT_HOST_DEVICE inline void split_cols(int64_t cols, int split, int64_t s, int64_t* first, int64_t* last) {
  *first = split_edge(cols, split, s);
  *last = split_edge(cols, split, s + 1);
}

// Attention split over positions (stream_loop.cu's split attention; also compiled for the device, which
// chooses per launch). A work item is one (row, head, split) for one consumer warp; `heads` (row, head) pairs,
// `positions` keys, `warps` consumer warps in the grid. The split count minimises the rounds of items times
// an item's cost (its positions plus a fixed cost: q / k / v from the QKV sums, the partial written and
// merged), with at least kMinSplitPositions positions a split and at most `split_max` splits.
constexpr int kMaxAttentionSplits = 32;  // a warp merges a (row, head)'s splits, one per lane
constexpr int kMinSplitPositions = 16;
constexpr int kItemPositions = 8;   // an item's fixed cost, in positions
constexpr int kSplitWarps = 2048;   // more consumer warps than any device's grid has (the workspace's bound)
LRT_HOST_DEVICE inline int attention_splits(int64_t heads, int positions, int warps, int split_max) {
  if (heads < 1 || positions < 1 || warps < 1 || split_max <= 1) return 1;
  const int by_length = (positions + kMinSplitPositions - 1) / kMinSplitPositions;
  const int most = split_max < by_length ? split_max : by_length;
  int best = 1;
  int64_t best_cost = -1;
  for (int s = 1; s <= most; ++s) {
    const int64_t rounds = (heads * s + warps - 1) / warps;
    const int64_t cost = rounds * ((positions + s - 1) / s + kItemPositions);
    if (best_cost < 0 || cost < best_cost) best = s, best_cost = cost;
  }
  return best;
}
// The most splits a launch may choose for `heads` (row, head) pairs (sizes the partials' workspace): enough
// to give twice the warps of any grid an item, at most kMaxAttentionSplits.
LRT_HOST_DEVICE inline int attention_split_max(int64_t heads) {
  if (heads < 1) return 1;
  const int64_t s = (2 * (int64_t)kSplitWarps + heads - 1) / heads;
  return s < 1 ? 1 : (s > kMaxAttentionSplits ? kMaxAttentionSplits : (int)s);
}

// Tile t of an op: row tile t % row_tiles, split t / row_tiles (a CTA's run covers neighbouring rows of one
// column range, so consecutive stages read neighbouring rows). Its stages: ceil(width / k_chunk) k-chunks.
inline int64_t tile_bytes(const OpPlan& op, int tile_rows, int64_t t) {
  const int64_t rt = t % op.row_tiles, s = t / op.row_tiles;
  const int64_t rows = std::min<int64_t>(tile_rows, op.rows - rt * tile_rows);
  int64_t c0, c1;
  split_cols(op.cols, op.split_k, s, &c0, &c1);
  return rows * (c1 - c0) * kElem;
}

// Cut an op's tiles into contiguous runs of about equal bytes, one per CTA; returns the balance (the
// largest run's bytes / the mean).
inline double assign(OpPlan& op, int tile_rows, int ctas) {
  const int64_t n = op.tiles();
  std::vector<int64_t> prefix(n + 1, 0);
  for (int64_t t = 0; t < n; ++t) prefix[t + 1] = prefix[t] + tile_bytes(op, tile_rows, t);
  const double total = (double)prefix[n];
  op.cta_first.assign(ctas + 1, n);
  op.cta_first[0] = 0;
  // CTA c starts at the first tile whose start lies at or after c / ctas of the bytes
  int64_t t = 0;
  for (int c = 1; c < ctas; ++c) {
    const double target = total * c / ctas;
    while (t < n && (double)prefix[t] + 0.5 * (prefix[t + 1] - prefix[t]) < target) ++t;
    op.cta_first[c] = t;
  }
  int64_t most = 0;
  for (int c = 0; c < ctas; ++c) most = std::max(most, prefix[op.cta_first[c + 1]] - prefix[op.cta_first[c]]);
  return total > 0 ? most / (total / ctas) : 1.0;
}

// The bytes of the staged input's two buffers (stage_input), or 0.
inline int64_t input_buffer_bytes(bool stage_input, int batch, int k_chunk) {
  return stage_input ? 2 * (int64_t)batch * (k_chunk + kInputPad) * kElem : 0;
}

// The plan for `mats` ({rows, cols} in execution order) at `batch` rows of input, over `ctas` persistent
// CTAs with `smem_optin` bytes of shared memory each. tile_rows / k_chunk 0: chosen as above. mma_from: the
// smallest batch on tensor cores (the kernels' kMmaFromBatch; the probe times mma.sync at batch 1 and 4 too).
inline Plan plan_stream(const std::vector<std::pair<int64_t, int64_t>>& mats, int batch, int ctas,
                        int64_t smem_optin, int tile_rows = 0, int k_chunk = 0, bool stage_input = true,
                        int mma_from = kMmaFromBatch) {
  Plan p;
  p.batch = batch;
  p.ctas = ctas;
  p.stage_input = stage_input;
  if (batch < 1 || batch > kMaxBatch) {
    p.reason = "batch " + std::to_string(batch) + " is outside 1.." + std::to_string(kMaxBatch);
    return p;
  }
  if (ctas < 1) {
    p.reason = "no CTAs";
    return p;
  }
  if (mats.empty()) {
    p.reason = "no matrices";
    return p;
  }
  p.tensor_cores = batch >= mma_from;
  p.tile_rows = tile_rows > 0 ? tile_rows : (batch <= 4 ? 16 : (batch <= 16 ? 32 : 64));
  if (p.tile_rows % 16 || p.tile_rows > 128) {
    p.reason = "tile_rows must be a multiple of 16 up to 128, got " + std::to_string(p.tile_rows);
    return p;
  }
  if (!p.tensor_cores && p.tile_rows != 16) {  // consume_fma: 8 consumer warps x 2 rows each
    p.reason = "the CUDA-core path (batch " + std::to_string(batch) + " < " + std::to_string(mma_from) +
               ") takes tile_rows 16, got " + std::to_string(p.tile_rows);
    return p;
  }
  p.k_chunk = k_chunk > 0 ? k_chunk : (int)std::max<int64_t>(64, kStageTarget / (p.tile_rows * kElem));
  if (p.k_chunk % 16) {
    p.reason = "k_chunk must be a multiple of 16 (mma k-steps, 16-byte copies), got " + std::to_string(p.k_chunk);
    return p;
  }
  for (const auto& m : mats) {
    if (m.first < 1 || m.second < 1 || m.second % 8) {
      p.reason = "a matrix of " + std::to_string(m.first) + " x " + std::to_string(m.second) +
                 ": columns must be a positive multiple of 8 (16-byte row segments)";
      return p;
    }
  }
  p.stage_bytes = (int64_t)p.tile_rows * (p.k_chunk * kElem + kRowPad);
  // each consumer warp's partial sums of a tile's 16-row block x batch, reduced across warps at a tile's end
  p.reduce_bytes = (int64_t)kConsumerWarps * 16 * ((batch + 7) / 8 * 8) * 4;  // the batch in 8-wide mma tiles
  p.input_bytes = input_buffer_bytes(stage_input, batch, p.k_chunk);
  const int64_t barriers = 2 * kMaxStages * 8 + 128;  // full/empty mbarriers; the rest 128-byte aligned
  const int64_t room = smem_optin - p.reduce_bytes - p.input_bytes - barriers;
  p.stages = (int)std::min<int64_t>(kMaxStages, room > 0 ? room / p.stage_bytes : 0);
  if (p.stages < 2) {
    p.reason = "a ring of two " + std::to_string(p.stage_bytes) + "-byte stages, the " +
               std::to_string(p.reduce_bytes) + "-byte reduction and the " + std::to_string(p.input_bytes) +
               "-byte input do not fit in " + std::to_string(smem_optin) + " bytes of shared memory";
    return p;
  }
  p.smem_bytes = barriers + p.reduce_bytes + p.stages * p.stage_bytes + p.input_bytes;
  for (const auto& m : mats) {
    OpPlan op;
    op.rows = m.first;
    op.cols = m.second;
    op.row_tiles = (op.rows + p.tile_rows - 1) / p.tile_rows;
    const int64_t max_split = std::max<int64_t>(1, std::min<int64_t>(kMaxSplit, op.cols / kMinSplitCols));
    OpPlan best;
    for (int s = 1; s <= max_split; ++s) {
      op.split_k = s;
      op.balance = assign(op, p.tile_rows, ctas);
      if (best.row_tiles == 0 || op.balance < best.balance - 1e-9) best = op;
      if (op.balance <= kBalance) break;
    }
    p.ops.push_back(best);
  }
  return p;
}

}  // namespace latentrt_stream
