// Decode attention over a paged thin-key cache, reading blocks in place.
//
//   q            [B, H, r]            float32, one query token per request
//   kv_cache     [N, H_kv, bs, r + D] float32 (K = [..., :r], V = [..., r:]), any strides
//   block_table  [B, max_blocks]      int32
//   seq_lens     [B]                  int32
//   out          [B, H, D]            float32
//
// One task per (request, KV head): scores for one block at a time, then an online-softmax
// update of the G = H / H_kv query heads' accumulators. Each cached row is read once.
#include <torch/extension.h>
#include <algorithm>
#include <cmath>
#include <vector>

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

#pragma omp parallel
  {
    std::vector<float> scores(G * bs), acc(G * D), m(G), l(G);
#pragma omp for collapse(2) schedule(dynamic, 1)
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t h = 0; h < Hkv; ++h) {
        const int64_t len = slp[b];
        const float* qh = qp + (b * H + h * G) * r;   // G consecutive query heads
        std::fill(acc.begin(), acc.end(), 0.f);
        std::fill(m.begin(), m.end(), -INFINITY);
        std::fill(l.begin(), l.end(), 0.f);
        for (int64_t start = 0; start < len; start += bs) {
          const int64_t n = std::min(bs, len - start);
          const float* base = kvp + static_cast<int64_t>(btp[b * bt_stride + start / bs]) * s0 + h * s1;
          for (int64_t g = 0; g < G; ++g) {
            const float* qg = qh + g * r;
            float* sg = scores.data() + g * bs;
            float mx = m[g];
            for (int64_t t = 0; t < n; ++t) {
              const float* k = base + t * s2;
              float s = 0.f;
              for (int64_t i = 0; i < r; ++i) s += qg[i] * k[i];
              s *= fscale;
              sg[t] = s;
              mx = std::max(mx, s);
            }
            const float corr = std::exp(m[g] - mx);
            float* ag = acc.data() + g * D;
            float lsum = l[g] * corr;
            for (int64_t d = 0; d < D; ++d) ag[d] *= corr;
            for (int64_t t = 0; t < n; ++t) {
              const float p = std::exp(sg[t] - mx);
              lsum += p;
              const float* v = base + t * s2 + r;
              for (int64_t d = 0; d < D; ++d) ag[d] += p * v[d];
            }
            m[g] = mx;
            l[g] = lsum;
          }
        }
        for (int64_t g = 0; g < G; ++g) {
          float* o = op + (b * H + h * G + g) * D;
          const float inv = l[g] > 0.f ? 1.f / l[g] : 0.f;
          for (int64_t d = 0; d < D; ++d) o[d] = acc[g * D + d] * inv;
        }
      }
    }
  }
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("thin_decode", &thin_decode, "paged thin-key decode attention (CPU, float32)");
}
