"""The parts every grouped expert GEMM kernel shares: which tile of which
expert a program computes, and how its result is stored.

Grids cover the static worst case (so CUDA graphs can capture them): a
program whose block lies past the real padded length, or belongs to an
expert of another rank (id -1), is inactive and must return at once.
Output rows are indexed by (token, expert) pair; GEMM 1 gathers its input
row ``pair // top_k`` (the token), GEMM 2 reads row ``pair``. The kernels
take top_k as a constexpr: a 64-bit division by a runtime value is a
branchy software routine per row (600 -> 456 instructions in a decode-size
GEMM on the H100), on the path to the first activation load.
"""
import triton
import triton.language as tl


@triton.jit
def moe_tile(pid, num_padded_pairs, num_pairs_post_padded_ptr, expert_ids_ptr,
             sorted_pair_ids_ptr, num_valid_pairs, top_k, N,
             GATHER_ROWS: tl.constexpr, BLOCK_SIZE_M: tl.constexpr,
             BLOCK_SIZE_N: tl.constexpr, GROUP_SIZE_M: tl.constexpr):
    """-> (active, expert, pair, pair_mask, row, offs_n, n_mask) for program ``pid``."""
    num_pid_m = tl.cdiv(num_padded_pairs, BLOCK_SIZE_M)
    num_pid_n = tl.cdiv(N, BLOCK_SIZE_N)
    # Consecutive programs walk GROUP_SIZE_M row blocks before moving to the
    # next column block, so one expert's weight tile is reused from L2.
    num_pid_in_group = GROUP_SIZE_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_SIZE_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_SIZE_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    active = (pid_m * BLOCK_SIZE_M < tl.load(num_pairs_post_padded_ptr)) & (expert != -1)
    offs_m = pid_m * BLOCK_SIZE_M + tl.arange(0, BLOCK_SIZE_M)
    pair = tl.load(sorted_pair_ids_ptr + offs_m).to(tl.int64)
    pair_mask = pair < num_valid_pairs
    if GATHER_ROWS:
        row = pair // top_k
    else:
        row = pair
    offs_n = pid_n * BLOCK_SIZE_N + tl.arange(0, BLOCK_SIZE_N)
    n_mask = offs_n < N
    return active, expert, pair, pair_mask, row, offs_n, n_mask


@triton.jit
def moe_tile_store(acc, c_ptr, bias_ptr, topk_weights_ptr, expert, pair, pair_mask, offs_n,
                   n_mask, stride_cm, stride_cn, stride_bias_e, stride_bias_n,
                   HAS_BIAS: tl.constexpr, MUL_ROUTED_WEIGHT: tl.constexpr):
    """Add the expert's bias, scale by the pair's routing weight (in that
    order), and store the fp32 tile in c's dtype."""
    if HAS_BIAS:
        bias = tl.load(bias_ptr + expert * stride_bias_e + offs_n * stride_bias_n, mask=n_mask,
                       other=0.0)
        acc += bias.to(tl.float32)[None, :]
    if MUL_ROUTED_WEIGHT:
        w = tl.load(topk_weights_ptr + pair, mask=pair_mask, other=0.0)
        acc *= w.to(tl.float32)[:, None]
    c_ptrs = c_ptr + pair[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=pair_mask[:, None] & n_mask[None, :])
