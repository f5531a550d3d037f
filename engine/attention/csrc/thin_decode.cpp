// Decode attention over a paged thin-key cache, reading blocks in place.
//
//   q            [B, H, r]            float32, one query token per request
//   kv_cache     [N, H_kv, bs, r + D] float32 (K = [..., :r], V = [..., r:]), any strides
//   block_table  [B, max_blocks]      int32
//   seq_lens     [B]                  int32
//   out          [B, H, D]            float32
//
// One task per (request, KV head, split of its blocks): scores for one block at a time, then
// an online-softmax update of the G = H / H_kv query heads' accumulators; splits are merged by
// their log-sum-exp weights. Each cached row is read once.
#include <torch/extension.h>
#include <omp.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

// e^x for x <= 0 (softmax exponents), vectorizable inside `omp simd` loops: x = (n + f) ln 2
// with n = floor(x log2 e), 2^f by a degree-6 polynomial on [0, 1) (relative error < 2e-7),
// 2^n from the exponent bits. Inputs below -87 give ~1e-38 instead of 0; NaN propagates.
#pragma omp declare simd
static inline float exp_nonpos(float x) {
  x = x < -87.0f ? -87.0f : x;
  const float t = x * 1.44269504088896341f;
  const float n = std::floor(t);
  const float f = t - n;
  float p = 1.535336188319500e-4f;
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

void thin_decode(torch::Tensor q, torch::Tensor kv_cache, torch::Tensor block_table,
                 torch::Tensor seq_lens, torch::Tensor out, double scale) {
  TORCH_CHECK(q.scalar_type() == torch::kFloat32 && kv_cache.scalar_type() == torch::kFloat32,
              "thin_decode: float32 only");
  TORCH_CHECK(q.is_contiguous() && out.is_contiguous(), "thin_decode: q/out must be contiguous");
  TORCH_CHECK(kv_cache.stride(3) == 1, "thin_decode: cache rows must be contiguous");
  const int64_t B = q.size(0), H = q.size(1), r = q.size(2);
  const int64_t Hkv = kv_cache.size(1), bs = kv_cache.size(2), D = kv_cache.size(3) - r;
  const int64_t G = H / Hkv;
  const int64_t s0 = kv_cache.stride(0), s1 = kv_cache.stride(1), s2 = kv_cache.stride(2);
  const int64_t bt_stride = block_table.stride(0);
  const float* qp = q.data_ptr<float>();
  const float* kvp = kv_cache.data_ptr<float>();
  const int32_t* btp = block_table.data_ptr<int32_t>();
  const int32_t* slp = seq_lens.data_ptr<int32_t>();
  float* op = out.data_ptr<float>();
  const float fscale = static_cast<float>(scale);

  // Split each (request, KV head) over its blocks when there are too few of them to keep
  // every thread busy (small batches, long contexts); partial results merge below.
  const int64_t units = B * Hkv;
  const int64_t threads = omp_get_max_threads();
  const int64_t max_blocks = block_table.size(1);
  int64_t splits = 1;
  if (units < 4 * threads) splits = std::min<int64_t>(std::max<int64_t>(max_blocks, 1),
                                                     (4 * threads + units - 1) / units);
  std::vector<float> part_m(units * splits * G), part_l(units * splits * G),
      part_acc(units * splits * G * D);

#pragma omp parallel
  {
    std::vector<float> scores(G * bs);
#pragma omp for collapse(3) schedule(dynamic, 1)
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t h = 0; h < Hkv; ++h) {
        for (int64_t sp = 0; sp < splits; ++sp) {
          const int64_t len = slp[b];
          const int64_t nblk = (len + bs - 1) / bs;
          const int64_t blk_lo = nblk * sp / splits, blk_hi = nblk * (sp + 1) / splits;
          const int64_t slot = ((b * Hkv + h) * splits + sp) * G;
          float* m = part_m.data() + slot;
          float* l = part_l.data() + slot;
          float* acc = part_acc.data() + slot * D;
          const float* qh = qp + (b * H + h * G) * r;   // the G query heads of this KV head
          std::fill(acc, acc + G * D, 0.f);
          std::fill(m, m + G, -INFINITY);
          std::fill(l, l + G, 0.f);
          for (int64_t blk = blk_lo; blk < blk_hi; ++blk) {
            const int64_t start = blk * bs;
            const int64_t n = std::min(bs, len - start);
            const float* base = kvp + static_cast<int64_t>(btp[b * bt_stride + blk]) * s0 + h * s1;
            // scores of the G query heads against this block's keys (each key row read once)
            for (int64_t t = 0; t < n; ++t) {
              const float* k = base + t * s2;
              for (int64_t g = 0; g < G; ++g) {
                const float* qg = qh + g * r;
                float s = 0.f;
#pragma omp simd reduction(+ : s)
                for (int64_t i = 0; i < r; ++i) s += qg[i] * k[i];
                scores[g * bs + t] = s * fscale;
              }
            }
            for (int64_t g = 0; g < G; ++g) {
              float* __restrict sg = scores.data() + g * bs;
              float mx = m[g];
#pragma omp simd reduction(max : mx)
              for (int64_t t = 0; t < n; ++t) mx = std::max(mx, sg[t]);
              const float corr = std::exp(m[g] - mx);
              float* ag = acc + g * D;
#pragma omp simd
              for (int64_t d = 0; d < D; ++d) ag[d] *= corr;
              float sum = 0.f;
#pragma omp simd reduction(+ : sum)
              for (int64_t t = 0; t < n; ++t) {
                const float e = exp_nonpos(sg[t] - mx);
                sg[t] = e;
                sum += e;
              }
              l[g] = l[g] * corr + sum;
              m[g] = mx;
            }
            // values: each row read once, accumulated into the G heads
            for (int64_t t = 0; t < n; ++t) {
              const float* v = base + t * s2 + r;
              for (int64_t g = 0; g < G; ++g) {
                const float p = scores[g * bs + t];
                float* __restrict ag = acc + g * D;
#pragma omp simd
                for (int64_t d = 0; d < D; ++d) ag[d] += p * v[d];
              }
            }
          }
        }
      }
    }
  }

  // Merge the splits: out = sum_s e^{m_s - M} acc_s / sum_s e^{m_s - M} l_s.
#pragma omp parallel for collapse(2)
  for (int64_t u = 0; u < units; ++u) {
    for (int64_t g = 0; g < G; ++g) {
      float mx = -INFINITY;
      for (int64_t sp = 0; sp < splits; ++sp) mx = std::max(mx, part_m[(u * splits + sp) * G + g]);
      float denom = 0.f;
      float* o = op + (u * G + g) * D;   // u = b * Hkv + h, query head = h * G + g
      for (int64_t d = 0; d < D; ++d) o[d] = 0.f;
      for (int64_t sp = 0; sp < splits; ++sp) {
        const int64_t idx = (u * splits + sp) * G + g;
        if (part_l[idx] == 0.f) continue;
        const float w = std::exp(part_m[idx] - mx);
        denom += w * part_l[idx];
        const float* a = part_acc.data() + idx * D;
        for (int64_t d = 0; d < D; ++d) o[d] += w * a[d];
      }
      const float inv = denom > 0.f ? 1.f / denom : 0.f;
      for (int64_t d = 0; d < D; ++d) o[d] *= inv;
    }
  }
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("thin_decode", &thin_decode, "paged thin-key decode attention (CPU, float32)");
}
