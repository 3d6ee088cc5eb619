// Block alignment of routed (token, expert) pairs on the CPU, one call per
// slot. Output contract (bit for bit the same as moe_align_block_size_torch):
// experts ascending; within an expert, pairs in increasing pair index;
// padding and the unused tail hold the sentinel num_pairs; expert_ids has
// one entry per block, -1 for unused blocks; pairs of expert -1 are dropped;
// with token_slot, only pairs whose token runs with `slot` are kept.
#include <cstdint>
#include <vector>

extern "C" int vllm_moe_align_cpu(const int32_t* ids, int64_t num_pairs, int32_t top_k,
                                  const int32_t* token_slot, int32_t slot, int32_t num_experts,
                                  int32_t block_size, int32_t* sorted_ids, int64_t sorted_len,
                                  int32_t* expert_ids, int64_t num_blocks, int32_t* total) {
  if (num_experts <= 0 || block_size <= 0 || top_k <= 0) return 1;
  std::vector<int64_t> count(num_experts, 0);
  auto expert_of = [&](int64_t p) -> int32_t {
    int32_t e = ids[p];
    if (e < 0 || e >= num_experts) return -1;
    if (token_slot != nullptr && token_slot[p / top_k] != slot) return -1;
    return e;
  };
  for (int64_t p = 0; p < num_pairs; ++p) {
    int32_t e = expert_of(p);
    if (e >= 0) ++count[e];
  }
  std::vector<int64_t> next(num_experts, 0);  // where the expert's next pair goes
  int64_t offset = 0;
  for (int32_t e = 0; e < num_experts; ++e) {
    next[e] = offset;
    offset += (count[e] + block_size - 1) / block_size * block_size;
  }
  if (offset > sorted_len || offset / block_size > num_blocks) return 2;
  for (int64_t i = 0; i < sorted_len; ++i) sorted_ids[i] = static_cast<int32_t>(num_pairs);
  for (int64_t b = 0; b < num_blocks; ++b) expert_ids[b] = -1;
  for (int32_t e = 0; e < num_experts; ++e) {
    int64_t first = next[e] / block_size;
    int64_t blocks = (count[e] + block_size - 1) / block_size;
    for (int64_t b = first; b < first + blocks; ++b) expert_ids[b] = e;
  }
  for (int64_t p = 0; p < num_pairs; ++p) {
    int32_t e = expert_of(p);
    if (e >= 0) sorted_ids[next[e]++] = static_cast<int32_t>(p);
  }
  *total = static_cast<int32_t>(offset);
  return 0;
}
