// OpenMP CPU implementation of MoE permute / unpermute (contracts in moe_dispatch.h).
#include "moe_dispatch.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <omp.h>

namespace megatron_mm {
namespace {

// Below these amounts of work per thread, thread start-up costs more than the work.
constexpr int64_t kMinSlotsPerThread = 1 << 14;
constexpr int64_t kMinBytesPerThread = 1 << 18;

int threads_for(int64_t work, int64_t min_work_per_thread) {
  return static_cast<int>(
      std::clamp<int64_t>(work / min_work_per_thread, 1, omp_get_max_threads()));
}

template <typename Index>
void route_counts(const Index* topk, int64_t num_tokens, int64_t top_k, int64_t num_experts,
                  int64_t* counts) {
  const int64_t num_bins = num_experts + 2;
  const int64_t invalid_bin = num_experts;
  const int64_t duplicate_bin = num_experts + 1;
  std::fill(counts, counts + num_bins, 0);

#pragma omp parallel num_threads(threads_for(num_tokens * top_k, kMinSlotsPerThread))
  {
    std::vector<int64_t> local(num_bins, 0);
    // last_token[e] = last token that chose e; a repeat within one token is a duplicate.
    std::vector<int64_t> last_token(num_experts, -1);
#pragma omp for schedule(static) nowait
    for (int64_t token = 0; token < num_tokens; ++token) {
      bool duplicate = false;
      for (int64_t k = 0; k < top_k; ++k) {
        const int64_t expert = static_cast<int64_t>(topk[token * top_k + k]);
        if (expert == -1) continue;
        if (expert < -1 || expert >= num_experts) {
          ++local[invalid_bin];
          continue;
        }
        ++local[expert];
        duplicate |= last_token[expert] == token;
        last_token[expert] = token;
      }
      if (duplicate) ++local[duplicate_bin];
    }
#pragma omp critical
    for (int64_t bin = 0; bin < num_bins; ++bin) counts[bin] += local[bin];
  }
}

// Stable counting sort, parallel over contiguous token chunks: each thread counts its chunk,
// the per-(chunk, expert) counts give each chunk its first rank inside every expert, and
// each thread then scatters its chunk in token order, which keeps tokens ascending.
template <typename Index>
void build_permute_map(const Index* topk, int64_t num_tokens, int64_t top_k, int64_t num_experts,
                       int64_t capacity, const int64_t* counts, int64_t* row_map,
                       int64_t* slot_of_row, int64_t* row_of_slot) {
  const bool drop_and_pad = capacity >= 0;
  std::vector<int64_t> expert_first_row(num_experts);
  int64_t num_rows = 0;
  for (int64_t e = 0; e < num_experts; ++e) {
    expert_first_row[e] = drop_and_pad ? e * capacity : num_rows;
    num_rows += drop_and_pad ? capacity : counts[e];
  }
  if (drop_and_pad) {
    std::fill(row_map, row_map + num_rows, -1);
    std::fill(slot_of_row, slot_of_row + num_rows, -1);
  }

  const int max_threads = threads_for(num_tokens * top_k, kMinSlotsPerThread);
  // chunk_rank[p * E + e]: rank inside expert e of the first slot of chunk p choosing e.
  std::vector<int64_t> chunk_rank(static_cast<size_t>(max_threads) * num_experts, 0);
#pragma omp parallel num_threads(max_threads)
  {
    const int64_t num_chunks = omp_get_num_threads();
    const int64_t chunk = omp_get_thread_num();
    const int64_t first_token = num_tokens * chunk / num_chunks;
    const int64_t end_token = num_tokens * (chunk + 1) / num_chunks;
    int64_t* rank = chunk_rank.data() + chunk * num_experts;
    for (int64_t slot = first_token * top_k; slot < end_token * top_k; ++slot) {
      if (topk[slot] >= 0) ++rank[topk[slot]];
    }
#pragma omp barrier
#pragma omp single
    for (int64_t e = 0; e < num_experts; ++e) {
      int64_t running = 0;
      for (int64_t c = 0; c < num_chunks; ++c) {
        const int64_t chunk_count = chunk_rank[c * num_experts + e];
        chunk_rank[c * num_experts + e] = running;
        running += chunk_count;
      }
    }
    for (int64_t token = first_token; token < end_token; ++token) {
      for (int64_t k = 0; k < top_k; ++k) {
        const int64_t slot = token * top_k + k;
        const int64_t expert = static_cast<int64_t>(topk[slot]);
        int64_t row = -1;
        if (expert >= 0) {
          const int64_t expert_rank = rank[expert]++;
          if (!drop_and_pad || expert_rank < capacity) row = expert_first_row[expert] + expert_rank;
        }
        row_of_slot[slot] = row;
        if (row >= 0) {
          row_map[row] = token;
          slot_of_row[row] = slot;
        }
      }
    }
  }
}

// Element access for the row loops. Storage is what a row holds: bfloat16 is handled as raw
// bits with plain integer operations (exactly c10's conversions) so that the loops vectorise;
// c10::BFloat16's own operators are per element and do not. float and double rows are their
// own accumulator type.
template <typename Scalar>
struct Element {
  using Storage = Scalar;
  static Scalar load(Scalar x) { return x; }
  static Scalar store(Scalar x) { return x; }
};

template <>
struct Element<c10::Half> {
  using Storage = c10::Half;
  static float load(c10::Half x) { return static_cast<float>(x); }
  static c10::Half store(float x) { return static_cast<c10::Half>(x); }
};

template <>
struct Element<c10::BFloat16> {
  using Storage = uint16_t;
  static float load(uint16_t bits) {
    const uint32_t wide = static_cast<uint32_t>(bits) << 16;
    float value;
    std::memcpy(&value, &wide, sizeof(value));
    return value;
  }
  // Round to nearest even; NaN becomes the canonical 0x7FC0 (c10::BFloat16 semantics).
  static uint16_t store(float value) {
    uint32_t bits;
    std::memcpy(&bits, &value, sizeof(bits));
    const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
    return (bits & 0x7FFFFFFFu) > 0x7F800000u ? uint16_t{0x7FC0} : static_cast<uint16_t>(rounded);
  }
};

template <typename Scalar, typename Accum>
void unpermute(const Scalar* permuted_data, int64_t hidden, const int64_t* row_start,
               const int64_t* token_rows, const Accum* probs, int64_t num_tokens,
               Scalar* out_data) {
  using E = Element<Scalar>;
  using Storage = typename E::Storage;
  const auto* permuted = reinterpret_cast<const Storage*>(permuted_data);
  auto* out = reinterpret_cast<Storage*>(out_data);
  const int64_t row_bytes = hidden * static_cast<int64_t>(sizeof(Scalar));
#pragma omp parallel num_threads(threads_for(num_tokens * row_bytes, kMinBytesPerThread))
  {
    std::vector<Accum> sum_buffer(hidden);
    Accum* sum = sum_buffer.data();
#pragma omp for schedule(static)
    for (int64_t token = 0; token < num_tokens; ++token) {
      Storage* out_row = out + token * hidden;
      const int64_t begin = row_start[token];
      const int64_t end = row_start[token + 1];
      if (begin == end) {
        std::memset(out_row, 0, row_bytes);
        continue;
      }
      // The first row initialises the sum, saving a pass that zeroes it.
      for (int64_t r = begin; r < end; ++r) {
        const int64_t row = token_rows[r];
        const Storage* in = permuted + row * hidden;
        const Accum weight = probs ? probs[row] : Accum(1);
        if (r == begin) {
          for (int64_t j = 0; j < hidden; ++j) sum[j] = weight * E::load(in[j]);
        } else {
          for (int64_t j = 0; j < hidden; ++j) sum[j] += weight * E::load(in[j]);
        }
      }
      for (int64_t j = 0; j < hidden; ++j) out_row[j] = E::store(sum[j]);
    }
  }
}

// One pass over each row: the scaled gradient and the probability's dot product share the
// read of grad_out.
template <typename Scalar, typename Accum>
void unpermute_backward(const Scalar* grad_out_data, const Scalar* permuted_data, int64_t hidden,
                        const int64_t* row_map, int64_t num_rows, const Accum* probs,
                        Scalar* grad_permuted_data, Accum* grad_probs) {
  using E = Element<Scalar>;
  using Storage = typename E::Storage;
  const auto* grad_out = reinterpret_cast<const Storage*>(grad_out_data);
  const auto* permuted = reinterpret_cast<const Storage*>(permuted_data);
  auto* grad_permuted = reinterpret_cast<Storage*>(grad_permuted_data);
  const int64_t row_bytes = hidden * static_cast<int64_t>(sizeof(Scalar));
#pragma omp parallel for schedule(static) \
    num_threads(threads_for(num_rows * row_bytes, kMinBytesPerThread))
  for (int64_t row = 0; row < num_rows; ++row) {
    Storage* grad_row = grad_permuted + row * hidden;
    const int64_t token = row_map[row];
    if (token < 0) {
      std::memset(grad_row, 0, row_bytes);
      if (grad_probs) grad_probs[row] = 0;
      continue;
    }
    const Storage* grad_out_row = grad_out + token * hidden;
    const Accum weight = probs ? probs[row] : Accum(1);
    if (!grad_probs) {
      for (int64_t j = 0; j < hidden; ++j) {
        grad_row[j] = E::store(weight * E::load(grad_out_row[j]));
      }
      continue;
    }
    const Storage* in = permuted + row * hidden;
    Accum dot = 0;
    // simd reduction: the sum is split over vector lanes, a fixed order for a given build.
#pragma omp simd reduction(+ : dot)
    for (int64_t j = 0; j < hidden; ++j) {
      const Accum grad = E::load(grad_out_row[j]);
      grad_row[j] = E::store(weight * grad);
      dot += E::load(in[j]) * grad;
    }
    grad_probs[row] = dot;
  }
}

// Calls fn(Scalar{}, Accum{}) for the runtime dtype; the arguments only carry types.
template <typename Fn>
void dispatch_float(FloatType dtype, Fn&& fn) {
  switch (dtype) {
    case FloatType::kFloat32: return fn(float{}, float{});
    case FloatType::kFloat64: return fn(double{}, double{});
    case FloatType::kFloat16: return fn(c10::Half{}, float{});
    case FloatType::kBFloat16: return fn(c10::BFloat16{}, float{});
  }
}

}  // namespace

void moe_route_counts_cpu(const int32_t* topk, int64_t num_tokens, int64_t top_k,
                          int64_t num_experts, int64_t* counts) {
  route_counts(topk, num_tokens, top_k, num_experts, counts);
}

void moe_route_counts_cpu(const int64_t* topk, int64_t num_tokens, int64_t top_k,
                          int64_t num_experts, int64_t* counts) {
  route_counts(topk, num_tokens, top_k, num_experts, counts);
}

void moe_build_permute_map_cpu(const int32_t* topk, int64_t num_tokens, int64_t top_k,
                               int64_t num_experts, int64_t capacity, const int64_t* counts,
                               int64_t* row_map, int64_t* slot_of_row, int64_t* row_of_slot) {
  build_permute_map(topk, num_tokens, top_k, num_experts, capacity, counts, row_map, slot_of_row,
                    row_of_slot);
}

void moe_build_permute_map_cpu(const int64_t* topk, int64_t num_tokens, int64_t top_k,
                               int64_t num_experts, int64_t capacity, const int64_t* counts,
                               int64_t* row_map, int64_t* slot_of_row, int64_t* row_of_slot) {
  build_permute_map(topk, num_tokens, top_k, num_experts, capacity, counts, row_map, slot_of_row,
                    row_of_slot);
}

void moe_gather_rows_cpu(const void* src, int64_t row_bytes, const int64_t* index,
                         int64_t num_out, void* out) {
  const auto* src_bytes = static_cast<const char*>(src);
  auto* out_bytes = static_cast<char*>(out);
#pragma omp parallel for schedule(static) \
    num_threads(threads_for(num_out * row_bytes, kMinBytesPerThread))
  for (int64_t i = 0; i < num_out; ++i) {
    if (index[i] >= 0) {
      std::memcpy(out_bytes + i * row_bytes, src_bytes + index[i] * row_bytes, row_bytes);
    } else {
      std::memset(out_bytes + i * row_bytes, 0, row_bytes);
    }
  }
}

int64_t moe_unpermute_cpu(FloatType dtype, const void* permuted, int64_t hidden,
                          const int64_t* row_map, int64_t num_rows, const void* probs,
                          int64_t num_tokens, void* out) {
  // Inverse map as CSR: a serial counting sort of rows by token keeps each token's rows
  // ascending, which fixes the summation order. It is O(rows), far below the row traffic.
  std::vector<int64_t> row_start(num_tokens + 1, 0);
  int64_t num_invalid = 0;
  for (int64_t row = 0; row < num_rows; ++row) {
    const int64_t token = row_map[row];
    if (token >= 0 && token < num_tokens) {
      ++row_start[token + 1];
    } else if (token != -1) {
      ++num_invalid;
    }
  }
  if (num_invalid != 0) return num_invalid;
  for (int64_t token = 0; token < num_tokens; ++token) row_start[token + 1] += row_start[token];
  std::vector<int64_t> token_rows(row_start[num_tokens]);
  std::vector<int64_t> cursor(row_start.begin(), row_start.end() - 1);
  for (int64_t row = 0; row < num_rows; ++row) {
    if (row_map[row] >= 0) token_rows[cursor[row_map[row]]++] = row;
  }

  dispatch_float(dtype, [&](auto scalar_tag, auto accum_tag) {
    using Scalar = decltype(scalar_tag);
    using Accum = decltype(accum_tag);
    unpermute(static_cast<const Scalar*>(permuted), hidden, row_start.data(), token_rows.data(),
              static_cast<const Accum*>(probs), num_tokens, static_cast<Scalar*>(out));
  });
  return 0;
}

void moe_unpermute_backward_cpu(FloatType dtype, const void* grad_out, const void* permuted,
                                int64_t hidden, const int64_t* row_map, int64_t num_rows,
                                const void* probs, void* grad_permuted, void* grad_probs) {
  dispatch_float(dtype, [&](auto scalar_tag, auto accum_tag) {
    using Scalar = decltype(scalar_tag);
    using Accum = decltype(accum_tag);
    unpermute_backward(static_cast<const Scalar*>(grad_out), static_cast<const Scalar*>(permuted),
                       hidden, row_map, num_rows, static_cast<const Accum*>(probs),
                       static_cast<Scalar*>(grad_permuted), static_cast<Accum*>(grad_probs));
  });
}

}  // namespace megatron_mm
