// MoE bookkeeping on the GPU, on the caller's stream (so CUDA graphs can
// capture them):
//  - vllm_moe_align_cuda: block alignment of routed pairs, per adapter slot
//    for the LoRA variant, with the exact output contract of
//    moe_align_block_size_torch (see csrc/moe_align_cpu.cpp);
//  - vllm_topk_route_cuda: softmax / sigmoid / top-k-softmax routing with
//    optional renormalisation and scaling, one warp per token.
#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cub/block/block_scan.cuh>

namespace {

constexpr int kThreads = 1024;
constexpr int kWarps = kThreads / 32;
// Pairs per thread block when the alignment is split over many blocks. One
// block's walk over its pairs is a chain of dependent global loads (about a
// microsecond per 32 pairs a warp takes): a single block over 65536 pairs
// took ~100 us, so large batches spread the walk over blocks of this many.
constexpr int kChunk = 2048;
// Up to this many pairs one block does everything in one launch; above it
// three launches (count, scan, scatter) over kChunk-pair blocks are faster.
constexpr int64_t kSingleBlockPairs = 2 * kChunk;

int64_t num_chunks(int64_t num_pairs) {
  return num_pairs <= kSingleBlockPairs ? 0 : (num_pairs + kChunk - 1) / kChunk;
}

// The expert of pair p if it is aligned in this slot, else -1.
struct PairExperts {
  const int32_t* ids;
  int64_t num_pairs;
  int top_k;
  const int32_t* token_slot;  // null: one alignment of every pair
  int num_experts;

  __device__ int operator()(int64_t p, int slot) const {
    if (p >= num_pairs) return -1;
    const int e = ids[p];
    if (e < 0 || e >= num_experts) return -1;
    if (token_slot != nullptr && token_slot[p / top_k] != slot) return -1;
    return e;
  }
};

// Warp w's contiguous run [run_lo, run_hi) of the block's pairs [lo, hi).
__device__ void warp_run(int64_t lo, int64_t hi, int warp, int64_t& run_lo, int64_t& run_hi) {
  const int64_t run = (hi - lo + kWarps - 1) / kWarps;
  run_lo = lo + warp * run;
  run_hi = run_lo + run < hi ? run_lo + run : hi;
}

// A block's pairs [lo, hi) are split into kWarps contiguous runs, one per
// warp. counts [kWarps][E] (shared) gets each (run, expert)'s count; shared
// atomics, order-free.
__device__ void count_warp_runs(const PairExperts& expert_of, int slot, int64_t lo, int64_t hi,
                                int32_t* counts) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int E = expert_of.num_experts;
  for (int i = threadIdx.x; i < kWarps * E; i += kThreads) counts[i] = 0;
  __syncthreads();
  int64_t run_lo, run_hi;
  warp_run(lo, hi, warp, run_lo, run_hi);
  for (int64_t p = run_lo + lane; p < run_hi; p += 32) {
    const int e = expert_of(p, slot);
    if (e >= 0) atomicAdd(&counts[warp * E + e], 1);
  }
  __syncthreads();
}

// Thread e < E: turns its column of counts into each run's offset within the
// block's pairs of expert e; returns the block's count of expert e (0 for
// other threads).
__device__ int offsets_over_warp_runs(int32_t* counts, int num_experts) {
  int running = 0;
  if (threadIdx.x < num_experts) {
    for (int w = 0; w < kWarps; ++w) {
      const int c = counts[w * num_experts + threadIdx.x];
      counts[w * num_experts + threadIdx.x] = running;
      running += c;
    }
  }
  return running;
}

// Writes each pair of [lo, hi) to sorted_ids[start[e] + its rank among the
// block's pairs of expert e]. Runs walk in order; lanes of a warp that share
// an expert are ranked with __match_any_sync, so an expert's pairs land in
// increasing pair order.
__device__ void scatter_warp_runs(const PairExperts& expert_of, int slot, int64_t lo, int64_t hi,
                                  int32_t* counts, const int32_t* start, int32_t* sorted_ids) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int E = expert_of.num_experts;
  int64_t run_lo, run_hi;
  warp_run(lo, hi, warp, run_lo, run_hi);
  for (int64_t base = run_lo; base < run_hi; base += 32) {
    const int64_t p = base + lane;
    const int e = p < run_hi ? expert_of(p, slot) : -1;
    const unsigned peers = __match_any_sync(0xffffffffu, e);
    if (e >= 0) {
      const int rank = __popc(peers & ((1u << lane) - 1));
      sorted_ids[start[e] + counts[warp * E + e] + rank] = static_cast<int32_t>(p);
    }
    __syncwarp();
    if (e >= 0 && lane == __ffs(peers) - 1) counts[warp * E + e] += __popc(peers);
    __syncwarp();
  }
}

// From each expert's pair count (thread e < E holds it): the padded runs'
// starts (written to start[], shared, when given), the expert id of every
// block, the sentinel-filled tail's start in total[slot]. Returns thread e's
// first slot.
__device__ int lay_out_experts(int count, int num_experts, int block_size, int32_t* expert_ids,
                               int64_t num_blocks, int32_t* total, int slot) {
  using Scan = cub::BlockScan<int, kThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  const int padded = threadIdx.x < num_experts
                         ? (count + block_size - 1) / block_size * block_size : 0;
  int first = 0, all = 0;
  Scan(scan_storage).ExclusiveSum(padded, first, all);
  if (threadIdx.x == 0) total[slot] = all;
  for (int64_t b = threadIdx.x; b < num_blocks; b += kThreads) expert_ids[b] = -1;
  __syncthreads();
  if (threadIdx.x < num_experts) {
    for (int b = first / block_size; b < (first + padded) / block_size; ++b) {
      expert_ids[b] = threadIdx.x;
    }
  }
  return first;
}

// One block per slot does all of it (small batches: one launch).
__global__ void __launch_bounds__(kThreads)
moe_align_single_block_kernel(PairExperts expert_of, int block_size, int32_t* __restrict__ sorted_ids,
                              int64_t sorted_len, int32_t* __restrict__ expert_ids,
                              int64_t num_blocks, int32_t* __restrict__ total) {
  const int slot = blockIdx.x;
  sorted_ids += slot * sorted_len;
  expert_ids += slot * num_blocks;
  const int E = expert_of.num_experts;
  extern __shared__ int32_t smem[];
  int32_t* counts = smem;               // [kWarps][E]
  int32_t* start = smem + kWarps * E;   // [E]

  count_warp_runs(expert_of, slot, 0, expert_of.num_pairs, counts);
  const int count = offsets_over_warp_runs(counts, E);
  const int first = lay_out_experts(count, E, block_size, expert_ids, num_blocks, total, slot);
  if (threadIdx.x < E) start[threadIdx.x] = first;
  for (int64_t i = threadIdx.x; i < sorted_len; i += kThreads) {
    sorted_ids[i] = static_cast<int32_t>(expert_of.num_pairs);
  }
  __syncthreads();
  scatter_warp_runs(expert_of, slot, 0, expert_of.num_pairs, counts, start, sorted_ids);
}

// Large batches, launch 1 of 3; grid (chunks, slots): each chunk's count of
// every expert into chunk_counts [slots][chunks][E], and the sentinel fill.
__global__ void __launch_bounds__(kThreads)
moe_align_count_kernel(PairExperts expert_of, int32_t* __restrict__ chunk_counts,
                       int32_t* __restrict__ sorted_ids, int64_t sorted_len) {
  const int chunk = blockIdx.x, slot = blockIdx.y;
  const int E = expert_of.num_experts;
  extern __shared__ int32_t smem[];  // [E]
  for (int e = threadIdx.x; e < E; e += kThreads) smem[e] = 0;
  __syncthreads();
  const int64_t lo = static_cast<int64_t>(chunk) * kChunk;
  for (int64_t p = lo + threadIdx.x; p < lo + kChunk; p += kThreads) {
    const int e = expert_of(p, slot);
    if (e >= 0) atomicAdd(&smem[e], 1);
  }
  int32_t* slot_sorted = sorted_ids + slot * sorted_len;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(chunk) * kThreads + threadIdx.x; i < sorted_len;
       i += stride) {
    slot_sorted[i] = static_cast<int32_t>(expert_of.num_pairs);
  }
  __syncthreads();
  int32_t* out = chunk_counts + (static_cast<int64_t>(slot) * gridDim.x + chunk) * E;
  for (int e = threadIdx.x; e < E; e += kThreads) out[e] = smem[e];
}

// Launch 2 of 3; one block per slot: chunk counts -> each chunk's first
// position for each expert (in place), the experts' layout, the total.
__global__ void __launch_bounds__(kThreads)
moe_align_scan_kernel(int num_experts, int64_t chunks, int block_size,
                      int32_t* __restrict__ chunk_counts, int32_t* __restrict__ expert_ids,
                      int64_t num_blocks, int32_t* __restrict__ total) {
  const int slot = blockIdx.x;
  const int e = threadIdx.x;
  int32_t* column = chunk_counts + slot * chunks * num_experts + e;
  int count = 0;
  if (e < num_experts) {
    for (int64_t c = 0; c < chunks; ++c) count += column[c * num_experts];
  }
  const int first = lay_out_experts(count, num_experts, block_size,
                                    expert_ids + slot * num_blocks, num_blocks, total, slot);
  if (e < num_experts) {
    int running = first;
    for (int64_t c = 0; c < chunks; ++c) {
      const int n = column[c * num_experts];
      column[c * num_experts] = running;
      running += n;
    }
  }
}

// Launch 3 of 3; grid (chunks, slots): the chunk's pairs to their places.
__global__ void __launch_bounds__(kThreads)
moe_align_scatter_kernel(PairExperts expert_of, const int32_t* __restrict__ chunk_starts,
                         int32_t* __restrict__ sorted_ids, int64_t sorted_len) {
  const int chunk = blockIdx.x, slot = blockIdx.y;
  const int E = expert_of.num_experts;
  extern __shared__ int32_t smem[];
  int32_t* counts = smem;               // [kWarps][E]
  int32_t* start = smem + kWarps * E;   // [E]
  const int64_t lo = static_cast<int64_t>(chunk) * kChunk;
  const int64_t hi = lo + kChunk < expert_of.num_pairs ? lo + kChunk : expert_of.num_pairs;
  count_warp_runs(expert_of, slot, lo, hi, counts);
  offsets_over_warp_runs(counts, E);
  const int32_t* starts = chunk_starts + (static_cast<int64_t>(slot) * gridDim.x + chunk) * E;
  for (int e = threadIdx.x; e < E; e += kThreads) start[e] = starts[e];
  __syncthreads();
  scatter_warp_runs(expert_of, slot, lo, hi, counts, start, sorted_ids + slot * sorted_len);
}

template <typename T>
__device__ __forceinline__ float to_float(T v) { return static_cast<float>(v); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }

constexpr int kMaxPerLane = 32;  // up to 1024 experts

// scoring: 0 softmax over all experts, 1 sigmoid, 2 softmax over the top-k logits
template <typename T>
__global__ void topk_route_kernel(const T* __restrict__ logits, int64_t num_tokens,
                                  int num_experts, int top_k, int scoring, bool renormalize,
                                  float scale, float* __restrict__ weights,
                                  int32_t* __restrict__ out_ids) {
  const int64_t token = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (token >= num_tokens) return;
  const T* row = logits + token * num_experts;
  float v[kMaxPerLane];
  float row_max = -INFINITY;
#pragma unroll
  for (int i = 0; i < kMaxPerLane; ++i) {
    const int e = i * 32 + lane;
    v[i] = e < num_experts ? to_float(row[e]) : -INFINITY;
    row_max = fmaxf(row_max, v[i]);
  }
  for (int o = 16; o > 0; o /= 2) row_max = fmaxf(row_max, __shfl_xor_sync(0xffffffffu, row_max, o));
  if (scoring == 0) {
    float sum = 0.f;
#pragma unroll
    for (int i = 0; i < kMaxPerLane; ++i) {
      v[i] = i * 32 + lane < num_experts ? __expf(v[i] - row_max) : 0.f;
      sum += v[i];
    }
    for (int o = 16; o > 0; o /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, o);
#pragma unroll
    for (int i = 0; i < kMaxPerLane; ++i) v[i] = i * 32 + lane < num_experts ? v[i] / sum : -1.f;
  } else if (scoring == 1) {
#pragma unroll
    for (int i = 0; i < kMaxPerLane; ++i) {
      v[i] = i * 32 + lane < num_experts ? 1.f / (1.f + __expf(-v[i])) : -1.f;
    }
  }
  float picked_sum = 0.f;
  float picked[32];
  for (int j = 0; j < top_k; ++j) {
    // the largest remaining score; ties go to the lowest expert id
    float best = -INFINITY;
    int best_e = num_experts;
#pragma unroll
    for (int i = 0; i < kMaxPerLane; ++i) {
      const int e = i * 32 + lane;
      if (e < num_experts && (v[i] > best || (v[i] == best && e < best_e))) {
        best = v[i];
        best_e = e;
      }
    }
    for (int o = 16; o > 0; o /= 2) {
      const float ob = __shfl_xor_sync(0xffffffffu, best, o);
      const int oe = __shfl_xor_sync(0xffffffffu, best_e, o);
      if (ob > best || (ob == best && oe < best_e)) {
        best = ob;
        best_e = oe;
      }
    }
    // never picked again (compile-time indices keep v in registers)
#pragma unroll
    for (int i = 0; i < kMaxPerLane; ++i) {
      if (i * 32 + lane == best_e) v[i] = -INFINITY;
    }
    picked[j] = best;
    if (lane == 0) out_ids[token * top_k + j] = best_e;
  }
  if (lane != 0) return;
  if (scoring == 2) {  // softmax over the chosen logits (the first is the largest)
    const float largest = picked[0];
    float sum = 0.f;
    for (int j = 0; j < top_k; ++j) {
      picked[j] = __expf(picked[j] - largest);
      sum += picked[j];
    }
    for (int j = 0; j < top_k; ++j) picked[j] /= sum;
  } else if (renormalize) {
    for (int j = 0; j < top_k; ++j) picked_sum += picked[j];
    if (scoring == 1) picked_sum += 1e-20f;
    for (int j = 0; j < top_k; ++j) picked[j] /= picked_sum;
  }
  for (int j = 0; j < top_k; ++j) weights[token * top_k + j] = picked[j] * scale;
}

}  // namespace

// The CUDA runtime linked into this library keeps its own current device,
// apart from torch's (device 0 unless set here): select the tensors' device
// before launching, or a rank on cuda:1 would launch onto cuda:0.
static bool use_device(int32_t device) {
  int current = -1;
  if (cudaGetDevice(&current) != cudaSuccess) return false;
  return current == device || cudaSetDevice(device) == cudaSuccess;
}

// Workspace the alignment needs, in int32 entries (0: none).
extern "C" int64_t vllm_moe_align_cuda_workspace(int64_t num_pairs, int32_t num_experts,
                                                 int32_t num_slots) {
  return num_chunks(num_pairs) * num_experts * num_slots;
}

static bool allow_shared(const void* kernel, size_t bytes) {
  return bytes <= 48 * 1024 ||
         cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                              static_cast<int>(bytes)) == cudaSuccess;
}

extern "C" int vllm_moe_align_cuda(const int32_t* ids, int64_t num_pairs, int32_t top_k,
                                   const int32_t* token_slot, int32_t num_slots,
                                   int32_t num_experts, int32_t block_size, int32_t* sorted_ids,
                                   int64_t sorted_len, int32_t* expert_ids, int64_t num_blocks,
                                   int32_t* total, int32_t* workspace, int32_t device,
                                   void* stream) {
  if (num_experts <= 0 || num_experts > kThreads || block_size <= 0 || top_k <= 0) return 1;
  if (!use_device(device)) return 5;
  const PairExperts expert_of{ids, num_pairs, top_k, token_slot, num_experts};
  const auto s = static_cast<cudaStream_t>(stream);
  const size_t run_smem = sizeof(int32_t) * (kWarps + 1) * num_experts;
  const int64_t chunks = num_chunks(num_pairs);
  if (chunks == 0) {
    if (!allow_shared(reinterpret_cast<const void*>(moe_align_single_block_kernel), run_smem)) {
      return 3;
    }
    moe_align_single_block_kernel<<<num_slots, kThreads, run_smem, s>>>(
        expert_of, block_size, sorted_ids, sorted_len, expert_ids, num_blocks, total);
  } else {
    if (workspace == nullptr) return 6;
    if (!allow_shared(reinterpret_cast<const void*>(moe_align_scatter_kernel), run_smem)) {
      return 3;
    }
    const dim3 grid(static_cast<unsigned>(chunks), static_cast<unsigned>(num_slots));
    moe_align_count_kernel<<<grid, kThreads, sizeof(int32_t) * num_experts, s>>>(
        expert_of, workspace, sorted_ids, sorted_len);
    moe_align_scan_kernel<<<num_slots, kThreads, 0, s>>>(num_experts, chunks, block_size,
                                                         workspace, expert_ids, num_blocks, total);
    moe_align_scatter_kernel<<<grid, kThreads, run_smem, s>>>(expert_of, workspace, sorted_ids,
                                                              sorted_len);
  }
  return cudaGetLastError() == cudaSuccess ? 0 : 4;
}

// dtype: 0 float32, 1 bfloat16, 2 float16
extern "C" int vllm_topk_route_cuda(const void* logits, int32_t dtype, int64_t num_tokens,
                                    int32_t num_experts, int32_t top_k, int32_t scoring,
                                    int32_t renormalize, float scale, float* weights,
                                    int32_t* ids, int32_t device, void* stream) {
  if (num_experts > 32 * kMaxPerLane || top_k > 32 || top_k > num_experts) return 1;
  if (!use_device(device)) return 5;
  if (num_tokens == 0) return 0;
  const int warps_per_block = 4;
  const dim3 grid(static_cast<unsigned>((num_tokens + warps_per_block - 1) / warps_per_block));
  const auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case 0:
      topk_route_kernel<float><<<grid, 32 * warps_per_block, 0, s>>>(
          static_cast<const float*>(logits), num_tokens, num_experts, top_k, scoring,
          renormalize != 0, scale, weights, ids);
      break;
    case 1:
      topk_route_kernel<__nv_bfloat16><<<grid, 32 * warps_per_block, 0, s>>>(
          static_cast<const __nv_bfloat16*>(logits), num_tokens, num_experts, top_k, scoring,
          renormalize != 0, scale, weights, ids);
      break;
    case 2:
      topk_route_kernel<__half><<<grid, 32 * warps_per_block, 0, s>>>(
          static_cast<const __half*>(logits), num_tokens, num_experts, top_k, scoring,
          renormalize != 0, scale, weights, ids);
      break;
    default:
      return 2;
  }
  return cudaGetLastError() == cudaSuccess ? 0 : 4;
}
