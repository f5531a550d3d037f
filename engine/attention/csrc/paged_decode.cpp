// Decode attention over FactorKV's paged CPU cache, reading blocks in place: one query token
// per request, float32.
//
//   kv_cache     [N, H_kv, bs, r + D]   slot h = [..., :r] (thin key, or latent slot), V = [..., r:]
//   block_table  [B, max_blocks] int32,  seq_lens [B] int32,  out [B, H, D]
//
// thin_decode:   q [B, H, r]; score(t) = q · k_h(t)
// latent_decode: q [B, H, D] (rotated); KV head h of latent group g = h / m (m = H_kv / groups)
//                rebuilds its key from the group's m slots, c_g(t) = [slot g·m .. g·m+m-1] (r_g = m·r),
//                    k_h(t) = RoPE_{pos(t)}(B_h c_g(t)),   B_h = up_t[h]ᵀ  (up_t [H_kv, r_g, D])
//                with cos/sin [P, H_kv, D] (rotate_half's sign folded into sin), pos(t) = t or,
//                after an eviction compacted the cache, key_pos[b, t] (int32 [B, >= seq_len]);
//                score(t) = q · k_h(t).  Cost per token and KV head: r_g·D multiply-adds (the rebuild)
//                + G·D (QK) + G·D (PV).
//
// One task per (request, KV head, split of its blocks): a block's scores for the G = H / H_kv
// query heads, then an online-softmax update of their accumulators and the values (each row
// read once); splits are merged by their log-sum-exp weights. `paged_decode` holds that loop
// once; the two kernels differ only in how a block's scores are computed.
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

// The paged cache and batch, as raw pointers and strides.
struct Paged {
  const float* kv;
  int64_t s0, s1, s2;          // strides of kv_cache dims 0..2 (rows are contiguous)
  const int32_t* bt;
  int64_t bt_stride, max_blocks;
  const int32_t* sl;
  int64_t B, H, Hkv, G, bs, r, D;

  Paged(const torch::Tensor& kv_cache, const torch::Tensor& block_table,
        const torch::Tensor& seq_lens, int64_t num_heads, int64_t key_dims)
      : kv(kv_cache.data_ptr<float>()), s0(kv_cache.stride(0)), s1(kv_cache.stride(1)),
        s2(kv_cache.stride(2)), bt(block_table.data_ptr<int32_t>()),
        bt_stride(block_table.stride(0)), max_blocks(block_table.size(1)),
        sl(seq_lens.data_ptr<int32_t>()), B(seq_lens.size(0)), H(num_heads),
        Hkv(kv_cache.size(1)), G(num_heads / kv_cache.size(1)), bs(kv_cache.size(2)),
        r(key_dims), D(kv_cache.size(3) - key_dims) {}

  // first row of KV-head slot h in block `blk` of request b
  const float* slot(int64_t b, int64_t blk, int64_t h) const {
    return kv + static_cast<int64_t>(bt[b * bt_stride + blk]) * s0 + h * s1;
  }
};

static void check_common(const torch::Tensor& q, const torch::Tensor& kv_cache,
                         const torch::Tensor& block_table, const torch::Tensor& seq_lens,
                         const torch::Tensor& out) {
  TORCH_CHECK(q.scalar_type() == torch::kFloat32 && kv_cache.scalar_type() == torch::kFloat32 &&
                  out.scalar_type() == torch::kFloat32, "paged decode: float32 only");
  TORCH_CHECK(q.is_contiguous() && out.is_contiguous(), "paged decode: q/out must be contiguous");
  TORCH_CHECK(kv_cache.stride(3) == 1, "paged decode: cache rows must be contiguous");
  TORCH_CHECK(block_table.scalar_type() == torch::kInt32 && seq_lens.scalar_type() == torch::kInt32,
              "paged decode: block_table and seq_lens must be int32");
}

// score_block(b, h, blk, n, scores, work): scores[g * bs + t] = scale · q_{h·G+g} · k_h(blk·bs + t)
// for the n tokens of block blk; work: work_floats floats of per-thread scratch.
template <class ScoreBlock>
static void paged_decode(const Paged& p, const ScoreBlock& score_block, int64_t work_floats,
                         float* op) {
  const int64_t G = p.G, D = p.D, bs = p.bs;
  // Split each (request, KV head) over its blocks when there are too few of them to keep
  // every thread busy (small batches, long contexts); partial results merge below.
  const int64_t units = p.B * p.Hkv;
  const int64_t threads = omp_get_max_threads();
  int64_t splits = 1;
  if (units < 4 * threads) splits = std::min<int64_t>(std::max<int64_t>(p.max_blocks, 1),
                                                     (4 * threads + units - 1) / units);
  std::vector<float> part_m(units * splits * G), part_l(units * splits * G),
      part_acc(units * splits * G * D);

#pragma omp parallel
  {
    std::vector<float> scores(G * bs), work(std::max<int64_t>(work_floats, 1));
#pragma omp for collapse(3) schedule(dynamic, 1)
    for (int64_t b = 0; b < p.B; ++b) {
      for (int64_t h = 0; h < p.Hkv; ++h) {
        for (int64_t sp = 0; sp < splits; ++sp) {
          const int64_t len = p.sl[b];
          const int64_t nblk = (len + bs - 1) / bs;
          const int64_t blk_lo = nblk * sp / splits, blk_hi = nblk * (sp + 1) / splits;
          const int64_t slot = ((b * p.Hkv + h) * splits + sp) * G;
          float* m = part_m.data() + slot;
          float* l = part_l.data() + slot;
          float* acc = part_acc.data() + slot * D;
          std::fill(acc, acc + G * D, 0.f);
          std::fill(m, m + G, -INFINITY);
          std::fill(l, l + G, 0.f);
          for (int64_t blk = blk_lo; blk < blk_hi; ++blk) {
            const int64_t n = std::min(bs, len - blk * bs);
            score_block(b, h, blk, n, scores.data(), work.data());
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
            const float* base = p.slot(b, blk, h);
            for (int64_t t = 0; t < n; ++t) {
              const float* v = base + t * p.s2 + p.r;
              for (int64_t g = 0; g < G; ++g) {
                const float w = scores[g * bs + t];
                float* __restrict ag = acc + g * D;
#pragma omp simd
                for (int64_t d = 0; d < D; ++d) ag[d] += w * v[d];
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

void thin_decode(torch::Tensor q, torch::Tensor kv_cache, torch::Tensor block_table,
                 torch::Tensor seq_lens, torch::Tensor out, double scale) {
  check_common(q, kv_cache, block_table, seq_lens, out);
  const Paged p(kv_cache, block_table, seq_lens, q.size(1), q.size(2));
  const float* qp = q.data_ptr<float>();
  const float fscale = static_cast<float>(scale);
  auto score_block = [&](int64_t b, int64_t h, int64_t blk, int64_t n, float* scores, float*) {
    const float* base = p.slot(b, blk, h);
    const float* qh = qp + (b * p.H + h * p.G) * p.r;   // the G query heads of this KV head
    for (int64_t t = 0; t < n; ++t) {
      const float* k = base + t * p.s2;
      for (int64_t g = 0; g < p.G; ++g) {
        const float* qg = qh + g * p.r;
        float s = 0.f;
#pragma omp simd reduction(+ : s)
        for (int64_t i = 0; i < p.r; ++i) s += qg[i] * k[i];
        scores[g * p.bs + t] = s * fscale;
      }
    }
  };
  paged_decode(p, score_block, 0, out.data_ptr<float>());
}

// k[d] = sum_i c[i] · u[i·DC + d] for one token (DC > 0: the head dim known at compile time, so
// the D accumulators stay in registers; DC = 0: any D).
template <int DC>
static inline void rebuild_key(const float* const* c_slots, int64_t m, int64_t r, const float* u,
                               int64_t D, float* __restrict k) {
  const int64_t d_n = DC > 0 ? DC : D;
  float acc[DC > 0 ? DC : 1];
  float* a = DC > 0 ? acc : k;
#pragma omp simd
  for (int64_t d = 0; d < d_n; ++d) a[d] = 0.f;
  for (int64_t j = 0; j < m; ++j) {
    const float* c = c_slots[j];
    for (int64_t e = 0; e < r; ++e) {
      const float ce = c[e];
      const float* ui = u + (j * r + e) * d_n;
#pragma omp simd
      for (int64_t d = 0; d < d_n; ++d) a[d] += ce * ui[d];
    }
  }
  if (DC > 0) std::memcpy(k, acc, sizeof(float) * d_n);
}

constexpr int64_t kMaxGroupSlots = 64;

void latent_decode(torch::Tensor q, torch::Tensor kv_cache, torch::Tensor block_table,
                   torch::Tensor seq_lens, torch::Tensor up_t, torch::Tensor cos,
                   torch::Tensor sin, torch::Tensor key_pos, int64_t groups, torch::Tensor out,
                   double scale) {
  check_common(q, kv_cache, block_table, seq_lens, out);
  const int64_t Hkv = kv_cache.size(1), D = q.size(2), r = kv_cache.size(3) - D;
  TORCH_CHECK(r > 0 && groups > 0 && Hkv % groups == 0, "latent_decode: bad latent groups");
  const int64_t m = Hkv / groups, rg = m * r;
  TORCH_CHECK(m <= kMaxGroupSlots, "latent_decode: more than 64 KV heads share one latent");
  TORCH_CHECK(up_t.scalar_type() == torch::kFloat32 && up_t.is_contiguous() &&
                  up_t.size(0) == Hkv && up_t.size(1) == rg && up_t.size(2) == D,
              "latent_decode: up_t must be float32 [H_kv, r_g, D]");
  TORCH_CHECK(cos.scalar_type() == torch::kFloat32 && sin.scalar_type() == torch::kFloat32 &&
                  cos.is_contiguous() && sin.is_contiguous() && cos.sizes() == sin.sizes() &&
                  cos.size(1) == Hkv && cos.size(2) == D,
              "latent_decode: cos/sin must be float32 [P, H_kv, D]");
  const bool remap = key_pos.numel() > 0;
  if (remap) {
    TORCH_CHECK(key_pos.scalar_type() == torch::kInt32 && key_pos.dim() == 2 &&
                    key_pos.stride(1) == 1 && key_pos.size(0) == seq_lens.size(0) &&
                    key_pos.size(1) >= seq_lens.max().item<int32_t>(),
                "latent_decode: key_pos must be int32 [B, >= max seq_len]");
    TORCH_CHECK(key_pos.min().item<int32_t>() >= 0 && key_pos.max().item<int32_t>() < cos.size(0),
                "latent_decode: rotary table shorter than the key positions");
  } else {
    TORCH_CHECK(seq_lens.numel() == 0 || seq_lens.max().item<int32_t>() <= cos.size(0),
                "latent_decode: rotary table shorter than the sequences");
  }
  const int32_t* kpp = remap ? key_pos.data_ptr<int32_t>() : nullptr;
  const int64_t kp_stride = remap ? key_pos.stride(0) : 0;
  TORCH_CHECK(D % 2 == 0, "latent_decode: odd head dim");
  const Paged p(kv_cache, block_table, seq_lens, q.size(1), r);
  const float* qp = q.data_ptr<float>();
  const float* up = up_t.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* snp = sin.data_ptr<float>();
  const float fscale = static_cast<float>(scale);
  const int64_t half = D / 2, cs = Hkv * D;
  // work: one rebuilt key [D] and its rotation [D]
  auto score_block = [&](int64_t b, int64_t h, int64_t blk, int64_t n, float* scores,
                         float* work) {
    const int64_t g0 = h / m * m;                       // first slot of h's latent group
    const float* u = up + h * rg * D;
    const float* qh = qp + (b * p.H + h * p.G) * D;
    float* k = work;
    float* kr = work + D;
    const float* c[kMaxGroupSlots];
    for (int64_t j = 0; j < m; ++j) c[j] = p.slot(b, blk, g0 + j);
    for (int64_t t = 0; t < n; ++t) {
      if (D == 64) rebuild_key<64>(c, m, r, u, D, k);
      else if (D == 128) rebuild_key<128>(c, m, r, u, D, k);
      else rebuild_key<0>(c, m, r, u, D, k);
      for (int64_t j = 0; j < m; ++j) c[j] += p.s2;
      // RoPE at the key's position: kr = k·cos + rotate_half(k)·sin (sign folded into sin)
      const int64_t pos = kpp ? kpp[b * kp_stride + blk * p.bs + t] : blk * p.bs + t;
      const float* cr = cp + pos * cs + h * D;
      const float* sr = snp + pos * cs + h * D;
#pragma omp simd
      for (int64_t d = 0; d < half; ++d) {
        kr[d] = k[d] * cr[d] + k[d + half] * sr[d];
        kr[d + half] = k[d + half] * cr[d + half] + k[d] * sr[d + half];
      }
      for (int64_t g = 0; g < p.G; ++g) {
        const float* qg = qh + g * D;
        float s = 0.f;
#pragma omp simd reduction(+ : s)
        for (int64_t d = 0; d < D; ++d) s += qg[d] * kr[d];
        scores[g * p.bs + t] = s * fscale;
      }
    }
  };
  paged_decode(p, score_block, 2 * D, out.data_ptr<float>());
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("thin_decode", &thin_decode, "paged thin-key decode attention (CPU, float32)");
  m.def("latent_decode", &latent_decode, "paged latent-key decode attention (CPU, float32)");
}
