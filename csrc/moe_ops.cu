// MoE bookkeeping on the GPU, one kernel launch per op, on the caller's
// stream (so CUDA graphs can capture them):
//  - vllm_moe_align_cuda: block alignment of routed pairs (one thread block
//    per adapter slot for the LoRA variant), with the exact output contract
//    of moe_align_block_size_torch (see csrc/moe_align_cpu.cpp);
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

// Pairs are split into kWarps contiguous chunks, one per warp. Counting
// (shared atomics, order-free) gives each (chunk, expert) its count; an
// exclusive scan over chunks then experts gives each chunk the first slot of
// its pairs of each expert; the scatter walks every chunk in order, ranking
// lanes of one warp that share an expert with __match_any_sync, so pairs of
// an expert land in increasing pair order.
__global__ void __launch_bounds__(kThreads)
moe_align_kernel(const int32_t* __restrict__ ids, int64_t num_pairs, int top_k,
                 const int32_t* __restrict__ token_slot, int num_experts, int block_size,
                 int32_t* __restrict__ sorted_ids, int64_t sorted_len,
                 int32_t* __restrict__ expert_ids, int64_t num_blocks,
                 int32_t* __restrict__ total) {
  const int slot = blockIdx.x;
  sorted_ids += slot * sorted_len;
  expert_ids += slot * num_blocks;
  extern __shared__ int32_t smem[];
  int32_t* counts = smem;                               // [kWarps][E]
  int32_t* start = smem + kWarps * num_experts;         // [E]
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  for (int i = threadIdx.x; i < kWarps * num_experts; i += kThreads) counts[i] = 0;
  __syncthreads();

  auto expert_of = [&](int64_t p) -> int {
    if (p >= num_pairs) return -1;
    int e = ids[p];
    if (e < 0 || e >= num_experts) return -1;
    if (token_slot != nullptr && token_slot[p / top_k] != slot) return -1;
    return e;
  };
  const int64_t chunk = (num_pairs + kWarps - 1) / kWarps;
  const int64_t lo = warp * chunk;
  const int64_t hi = lo + chunk < num_pairs ? lo + chunk : num_pairs;
  for (int64_t p = lo + lane; p < hi; p += 32) {
    int e = expert_of(p);
    if (e >= 0) atomicAdd(&counts[warp * num_experts + e], 1);
  }
  __syncthreads();

  // thread e: offsets of each chunk within expert e, and e's padded size
  int padded = 0;
  if (threadIdx.x < num_experts) {
    int running = 0;
    for (int w = 0; w < kWarps; ++w) {
      int c = counts[w * num_experts + threadIdx.x];
      counts[w * num_experts + threadIdx.x] = running;
      running += c;
    }
    padded = (running + block_size - 1) / block_size * block_size;
  }
  using Scan = cub::BlockScan<int, kThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  int first = 0, all = 0;
  Scan(scan_storage).ExclusiveSum(padded, first, all);
  if (threadIdx.x < num_experts) start[threadIdx.x] = first;
  if (threadIdx.x == 0) total[slot] = all;

  for (int64_t i = threadIdx.x; i < sorted_len; i += kThreads) {
    sorted_ids[i] = static_cast<int32_t>(num_pairs);
  }
  for (int64_t b = threadIdx.x; b < num_blocks; b += kThreads) expert_ids[b] = -1;
  __syncthreads();
  if (threadIdx.x < num_experts) {
    for (int b = first / block_size; b < (first + padded) / block_size; ++b) {
      expert_ids[b] = threadIdx.x;
    }
  }

  for (int64_t base = lo; base < hi; base += 32) {
    const int64_t p = base + lane;
    const int e = p < hi ? expert_of(p) : -1;
    const unsigned peers = __match_any_sync(0xffffffffu, e);
    if (e >= 0) {
      const int rank = __popc(peers & ((1u << lane) - 1));
      sorted_ids[start[e] + counts[warp * num_experts + e] + rank] = static_cast<int32_t>(p);
    }
    __syncwarp();
    if (e >= 0 && lane == __ffs(peers) - 1) counts[warp * num_experts + e] += __popc(peers);
    __syncwarp();
  }
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

extern "C" int vllm_moe_align_cuda(const int32_t* ids, int64_t num_pairs, int32_t top_k,
                                   const int32_t* token_slot, int32_t num_slots,
                                   int32_t num_experts, int32_t block_size, int32_t* sorted_ids,
                                   int64_t sorted_len, int32_t* expert_ids, int64_t num_blocks,
                                   int32_t* total, int32_t device, void* stream) {
  if (num_experts <= 0 || num_experts > kThreads || block_size <= 0 || top_k <= 0) return 1;
  if (!use_device(device)) return 5;
  const size_t smem = sizeof(int32_t) * (kWarps + 1) * num_experts;
  if (smem > 48 * 1024) {
    if (cudaFuncSetAttribute(moe_align_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(smem)) != cudaSuccess) {
      return 3;
    }
  }
  moe_align_kernel<<<num_slots, kThreads, smem, static_cast<cudaStream_t>(stream)>>>(
      ids, num_pairs, top_k, token_slot, num_experts, block_size, sorted_ids, sorted_len,
      expert_ids, num_blocks, total);
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
