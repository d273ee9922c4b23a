// Bitwise binary convolution for the bats engine: XNOR + popcount on bit-packed signs.
//
// A binary conv computes sum_k sign(x_k) * sign(w_k) over its window. With x and w as bits
// (1 = +1, 0 = -1), each valid term is +1 when the bits agree and -1 when they differ, so the
// sum is  valid_bits - 2 * popcount(x XOR w)  (XNOR-Net). A padded position is 0, neither +1 nor
// -1: it is masked out of the XOR and not counted in valid_bits. The result is an exact integer;
// the XNOR-Net++ scale is applied after, as the float model does.
//
// Two window layouts (uint64 words stored in int64 tensors), chosen per conv by make_geometry:
// * row strips (a window row of kw taps is S = kw * cg <= 64 bits; every BATS grouped conv on
//   CIFAR, depthwise convs, small 1x1 convs): rpw = 64 / S rows share a word, tap (i, j) of
//   channel c at word i / rpw, bit (i % rpw) * S + j * cg + c. Activations are packed into one
//   plane of cg-bit fields per group; each input row's strips are built once and shared by the
//   kh output rows that read it (conv_strips);
// * fields (otherwise: dense 1x1 convs over > 64 channels, wide groups): per pixel and group
//   fw = ceil(cg / 64) words; with fw == 1, fpw = 64 / cg taps share a word (tap t in word
//   t / fpw at bit (t % fpw) * cg), otherwise tap t owns words t * fw .. t * fw + fw - 1
//   (conv_packed).
// Weights: [group][window word][output channel of the group], packed once at load time.
// Inputs are read in place (NCHW or channels-last); the output takes the layout PyTorch's conv
// would give it.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace {

struct Geometry {
  int64_t C, G, cg, O, og, kh, kw, sh, sw, ph, pw, dh, dw, T, fw, fpw, nw;
  // Row-strip layout: a window row of kw taps is S = kw * cg <= 64 bits, rpw rows per word.
  bool strip;
  int64_t S, rpw;
};

Geometry make_geometry(int64_t C, int64_t O, const std::vector<int64_t>& p) {
  // p = {groups, kh, kw, sh, sw, ph, pw, dh, dw}
  TORCH_CHECK(p.size() == 9, "geometry needs 9 values");
  Geometry g;
  g.C = C; g.O = O; g.G = p[0];
  TORCH_CHECK(g.G >= 1 && C % g.G == 0 && O % g.G == 0, "channels not divisible by groups");
  g.cg = C / g.G; g.og = O / g.G;
  g.kh = p[1]; g.kw = p[2]; g.sh = p[3]; g.sw = p[4];
  g.ph = p[5]; g.pw = p[6]; g.dh = p[7]; g.dw = p[8];
  g.T = g.kh * g.kw;
  g.fw = (g.cg + 63) / 64;
  g.fpw = g.fw == 1 ? 64 / g.cg : 1;
  g.nw = g.fw == 1 ? (g.T + g.fpw - 1) / g.fpw : g.T * g.fw;
  g.S = g.kw * g.cg;
  g.strip = g.fw == 1 && g.S <= 64;
  g.rpw = g.strip ? 64 / g.S : 0;
  if (g.strip) g.nw = (g.kh + g.rpw - 1) / g.rpw;
  return g;
}

// The memory format PyTorch's own conv would give its output (it follows the input's suggested
// format), so the float layers after the engine's convs see the same layouts as on the float path.
inline bool wants_nhwc(const torch::Tensor& x) {
  return x.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
}

inline uint64_t low_bits(int64_t n) { return n >= 64 ? ~uint64_t(0) : ((uint64_t(1) << n) - 1); }

// Sign bits (x >= 0 -> 1; NaN -> 0, as the float path's comparison) of C contiguous floats into
// ceil(C / 64) zeroed words, bit c of the pixel at word c / 64, bit c % 64.
inline void pixel_bits(const float* px, int64_t C, uint64_t* words) {
  int64_t c = 0;
#ifdef __AVX512F__
  // 16 channels per compare; 16-bit chunks never straddle a word (c is a multiple of 16).
  const __m512 zero = _mm512_setzero_ps();
  for (; c + 16 <= C; c += 16) {
    const uint64_t m = _mm512_cmp_ps_mask(_mm512_loadu_ps(px + c), zero, _CMP_GE_OQ);
    words[c >> 6] |= m << (c & 63);
  }
#endif
  for (; c < C; ++c) words[c >> 6] |= uint64_t(px[c] >= 0.0f) << (c & 63);
}

// n <= 64 bits starting at bit b of a word array.
inline uint64_t bit_range(const uint64_t* words, int64_t b, int64_t n) {
  const int64_t w = b >> 6, s = b & 63;
  uint64_t v = words[w] >> s;
  if (s && s + n > 64) v |= words[w + 1] << (64 - s);
  return v & low_bits(n);
}

}  // namespace

// Number of uint64 words of one packed window (for callers that size buffers).
int64_t window_words(int64_t C, int64_t O, std::vector<int64_t> params) {
  return make_geometry(C, O, params).nw;
}

// weight: [O, cg, kh, kw] float (its sign is used: >= 0 -> bit 1). Returns [G, nw, og] words.
torch::Tensor pack_weight(torch::Tensor weight, int64_t C, std::vector<int64_t> params) {
  TORCH_CHECK(weight.dim() == 4, "weight must be 4-d");
  auto w = weight.to(torch::kFloat).contiguous();
  const Geometry g = make_geometry(C, w.size(0), params);
  TORCH_CHECK(w.size(1) == g.cg && w.size(2) == g.kh && w.size(3) == g.kw, "weight shape mismatch");
  auto out = torch::zeros({g.G, g.nw, g.og}, torch::kLong);
  auto* dst = reinterpret_cast<uint64_t*>(out.data_ptr<int64_t>());
  const float* src = w.data_ptr<float>();
  for (int64_t o = 0; o < g.O; ++o) {
    const int64_t grp = o / g.og, oi = o % g.og;
    for (int64_t c = 0; c < g.cg; ++c) {
      for (int64_t i = 0; i < g.kh; ++i) {
        for (int64_t j = 0; j < g.kw; ++j) {
          if (src[((o * g.cg + c) * g.kh + i) * g.kw + j] < 0) continue;
          const int64_t t = i * g.kw + j;
          int64_t word, bit;
          if (g.strip) { word = i / g.rpw; bit = (i % g.rpw) * g.S + j * g.cg + c; }
          else if (g.fw == 1) { word = t / g.fpw; bit = (t % g.fpw) * g.cg + c; }
          else { word = t * g.fw + c / 64; bit = c % 64; }
          dst[(grp * g.nw + word) * g.og + oi] |= uint64_t(1) << bit;
        }
      }
    }
  }
  return out;
}

// x: [N, C, H, W] float, NCHW or channels-last (read in place). Returns [N, H, W, G, fw] words.
torch::Tensor pack_activations(torch::Tensor x, int64_t groups) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == torch::kFloat, "x must be a 4-d float tensor");
  const bool nhwc = wants_nhwc(x);
  auto xc = x.contiguous(nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  const int64_t N = xc.size(0), C = xc.size(1), H = xc.size(2), W = xc.size(3);
  TORCH_CHECK(C % groups == 0, "channels not divisible by groups");
  const int64_t cg = C / groups, fw = (cg + 63) / 64, HW = H * W;
  auto out = torch::empty({N, H, W, groups, fw}, torch::kLong);
  auto* dst = reinterpret_cast<uint64_t*>(out.data_ptr<int64_t>());
  const float* src = xc.data_ptr<float>();
  if (nhwc) {
    at::parallel_for(0, N * HW, std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1)),
                     [&](int64_t lo, int64_t hi) {
      std::vector<uint64_t> bits((C + 63) / 64);
      for (int64_t p = lo; p < hi; ++p) {
        std::fill(bits.begin(), bits.end(), 0);
        pixel_bits(src + p * C, C, bits.data());
        uint64_t* out_px = dst + p * groups * fw;
        for (int64_t grp = 0; grp < groups; ++grp) {
          for (int64_t f = 0; f < fw; ++f) {
            const int64_t c0 = f * 64, n = std::min<int64_t>(64, cg - c0);
            out_px[grp * fw + f] = bit_range(bits.data(), grp * cg + c0, n);
          }
        }
      }
    });
  } else {
    // NCHW: channel-outer so the inner loop runs over contiguous pixels (vectorizes).
    const int64_t words = groups * fw;
    at::parallel_for(0, N * words, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) {
        const int64_t n = r / words, k = r % words, grp = k / fw, f = k % fw;
        const int64_t c0 = grp * cg + f * 64, cn = std::min<int64_t>(64, cg - f * 64);
        uint64_t* o = dst + n * HW * words + k;
        const float* xs = src + (n * C + c0) * HW;
        for (int64_t p = 0; p < HW; ++p) o[p * words] = 0;
        for (int64_t c = 0; c < cn; ++c) {
          const float* xc_ = xs + c * HW;
          for (int64_t p = 0; p < HW; ++p) o[p * words] |= uint64_t(xc_[p] >= 0.0f) << c;
        }
      }
    });
  }
  return out;
}

// Binary conv of packed activations [N, H, W, G, fw] with packed weights [G, nw, og]; returns
// (valid_bits - 2 * popcount) * scale as a float [N, O, OH, OW] channels-last tensor.
torch::Tensor conv_packed(torch::Tensor act, torch::Tensor wpack, torch::Tensor scale, int64_t C,
                          std::vector<int64_t> params, bool channels_last) {
  TORCH_CHECK(act.dim() == 5 && act.scalar_type() == torch::kLong, "packed activations expected");
  TORCH_CHECK(wpack.dim() == 3 && wpack.scalar_type() == torch::kLong, "packed weights expected");
  const int64_t O = wpack.size(0) * wpack.size(2);
  const Geometry g = make_geometry(C, O, params);
  TORCH_CHECK(!g.strip, "conv_packed is the field layout; this geometry uses row strips");
  TORCH_CHECK(act.size(3) == g.G && act.size(4) == g.fw, "activation packing does not match");
  TORCH_CHECK(wpack.size(0) == g.G && wpack.size(1) == g.nw, "weight packing does not match");
  auto sc = scale.to(torch::kFloat).contiguous();
  TORCH_CHECK(sc.numel() == O, "scale needs one value per output channel");
  auto a = act.contiguous();
  auto wp = wpack.contiguous();
  const int64_t N = a.size(0), H = a.size(1), W = a.size(2);
  const int64_t OH = (H + 2 * g.ph - g.dh * (g.kh - 1) - 1) / g.sh + 1;
  const int64_t OW = (W + 2 * g.pw - g.dw * (g.kw - 1) - 1) / g.sw + 1;
  TORCH_CHECK(OH > 0 && OW > 0, "input smaller than the kernel");
  auto out = torch::empty({N, O, OH, OW},
                          torch::TensorOptions().dtype(torch::kFloat).memory_format(
                              channels_last ? at::MemoryFormat::ChannelsLast
                                            : at::MemoryFormat::Contiguous));
  float* dst = out.data_ptr<float>();
  const auto* A = reinterpret_cast<const uint64_t*>(a.data_ptr<int64_t>());
  const auto* Wt = reinterpret_cast<const uint64_t*>(wp.data_ptr<int64_t>());
  const float* S = sc.data_ptr<float>();
  const uint64_t field_mask = low_bits(g.cg);
  const int64_t rows = N * OH;
  // Enough popcounts per chunk that threading pays for itself on small maps.
  const int64_t per_row = std::max<int64_t>(1, OW * O * g.nw);
  const int64_t grain = std::max<int64_t>(1, 32768 / per_row);

  at::parallel_for(0, rows, grain, [&](int64_t lo, int64_t hi) {
    // Local copies (see conv_strips): keeps loop bounds in registers so the loops vectorise.
    const Geometry gl = g;
    const int64_t OW_ = OW, OH_ = OH, H_ = H, W_ = W, O_ = O;
    std::vector<uint64_t> win(gl.nw * gl.G), mask(gl.nw);
    std::vector<int32_t> acc(gl.og);
    // NCHW output: a row is computed channels-last here, then written out per channel.
    std::vector<float> row(channels_last ? 0 : OW_ * O_);
    for (int64_t r = lo; r < hi; ++r) {
      const int64_t n = r / OH_, oh = r % OH_;
      float* row_out = channels_last ? dst + (n * OH_ + oh) * OW_ * O_ : row.data();
      for (int64_t ow = 0; ow < OW_; ++ow) {
        std::fill(win.begin(), win.end(), 0);
        std::fill(mask.begin(), mask.end(), 0);
        int64_t valid_bits = 0;
        for (int64_t i = 0; i < gl.kh; ++i) {
          const int64_t ih = oh * gl.sh - gl.ph + i * gl.dh;
          if (ih < 0 || ih >= H_) continue;
          for (int64_t j = 0; j < gl.kw; ++j) {
            const int64_t iw = ow * gl.sw - gl.pw + j * gl.dw;
            if (iw < 0 || iw >= W_) continue;
            const int64_t t = i * gl.kw + j;
            const uint64_t* src = A + ((n * H_ + ih) * W_ + iw) * gl.G * gl.fw;
            valid_bits += gl.cg;
            if (gl.fw == 1) {
              const int64_t word = t / gl.fpw, shift = (t % gl.fpw) * gl.cg;
              uint64_t* wrow = win.data() + word * gl.G;
              for (int64_t grp = 0; grp < gl.G; ++grp) wrow[grp] |= src[grp] << shift;
              mask[word] |= field_mask << shift;
            } else {
              for (int64_t f = 0; f < gl.fw; ++f) {
                uint64_t* wrow = win.data() + (t * gl.fw + f) * gl.G;
                for (int64_t grp = 0; grp < gl.G; ++grp) wrow[grp] = src[grp * gl.fw + f];
                mask[t * gl.fw + f] = ~uint64_t(0);  // bits past cg are 0 in both operands
              }
            }
          }
        }
        float* out_px = row_out + ow * O_;
        for (int64_t grp = 0; grp < gl.G; ++grp) {
          std::fill(acc.begin(), acc.end(), 0);
          const uint64_t* wg = Wt + grp * gl.nw * gl.og;
          for (int64_t k = 0; k < gl.nw; ++k) {
            const uint64_t xw = win[k * gl.G + grp], m = mask[k];
            const uint64_t* wk = wg + k * gl.og;
            for (int64_t o = 0; o < gl.og; ++o)
              acc[o] += __builtin_popcountll((xw ^ wk[o]) & m);
          }
          const float* sg = S + grp * gl.og;
          float* og_out = out_px + grp * gl.og;
          for (int64_t o = 0; o < gl.og; ++o)
            og_out[o] = float(valid_bits - 2 * int64_t(acc[o])) * sg[o];
        }
      }
      if (!channels_last) {
        for (int64_t o = 0; o < O_; ++o) {
          float* plane = dst + ((n * O_ + o) * OH_ + oh) * OW_;
          for (int64_t ow = 0; ow < OW_; ++ow) plane[ow] = row[ow * O_ + o];
        }
      }
    }
  });
  return out;
}


// Channel bits of every pixel, one plane per group: [N, G, H, W] words (cg <= 64).
static torch::Tensor pack_planar(const torch::Tensor& x, int64_t groups) {
  const bool nhwc = wants_nhwc(x);
  auto xc = x.contiguous(nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  const int64_t N = xc.size(0), C = xc.size(1), H = xc.size(2), W = xc.size(3), HW = H * W;
  const int64_t cg = C / groups;
  auto out = torch::empty({N, groups, H, W}, torch::kLong);
  auto* dst = reinterpret_cast<uint64_t*>(out.data_ptr<int64_t>());
  const float* src = xc.data_ptr<float>();
  if (nhwc) {
    // Whole pixels at a time (every group's bits from one pass over the channels).
    at::parallel_for(0, N * HW, std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1)),
                     [&](int64_t lo, int64_t hi) {
      const int64_t HW_ = HW, C_ = C, cg_ = cg, groups_ = groups;  // locals: see conv_strips
      std::vector<uint64_t> bits((C_ + 63) / 64);
      for (int64_t q = lo; q < hi; ++q) {
        const int64_t n = q / HW_, p = q % HW_;
        std::fill(bits.begin(), bits.end(), 0);
        pixel_bits(src + q * C_, C_, bits.data());
        uint64_t* on = dst + n * groups_ * HW_ + p;
        for (int64_t grp = 0; grp < groups_; ++grp) on[grp * HW_] = bit_range(bits.data(), grp * cg_, cg_);
      }
    });
    return out;
  }
  at::parallel_for(0, N * groups, 1, [&](int64_t lo, int64_t hi) {
    const int64_t HW_ = HW, C_ = C, cg_ = cg, groups_ = groups;  // locals: see conv_strips
    for (int64_t r = lo; r < hi; ++r) {
      const int64_t n = r / groups_, grp = r % groups_;
      uint64_t* o = dst + r * HW_;
      // NCHW: channel-outer, so the inner loop runs over contiguous pixels (vectorises).
      const float* xs = src + (n * C_ + grp * cg_) * HW_;
      for (int64_t p = 0; p < HW_; ++p) o[p] = uint64_t(xs[p] >= 0.0f);
      for (int64_t c = 1; c < cg_; ++c) {
        const float* xr = xs + c * HW_;
        for (int64_t p = 0; p < HW_; ++p) o[p] |= uint64_t(xr[p] >= 0.0f) << c;
      }
    }
  });
  return out;
}

// Row-strip conv (every op whose window row fits a word: all CIFAR grouped convs). Phase 1
// builds, for every input row and output column, the strip of the kw taps of that row; each
// strip serves the kh output rows that read the input row. Phase 2 ORs kh strips into a window,
// XORs it with each output channel's weight words and popcounts, vectorised over the row.
static torch::Tensor conv_strips(const torch::Tensor& x, const torch::Tensor& wpack,
                                 const torch::Tensor& scale, const Geometry& g) {
  const bool nhwc = wants_nhwc(x);
  auto planes = pack_planar(x, g.G);
  const int64_t N = x.size(0), H = x.size(2), W = x.size(3), O = g.O;
  const int64_t OH = (H + 2 * g.ph - g.dh * (g.kh - 1) - 1) / g.sh + 1;
  const int64_t OW = (W + 2 * g.pw - g.dw * (g.kw - 1) - 1) / g.sw + 1;
  TORCH_CHECK(OH > 0 && OW > 0, "input smaller than the kernel");
  auto out = torch::empty({N, O, OH, OW},
                          torch::TensorOptions().dtype(torch::kFloat).memory_format(
                              nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous));
  float* dst = out.data_ptr<float>();
  const auto* P = reinterpret_cast<const uint64_t*>(planes.data_ptr<int64_t>());
  const auto* Wt = reinterpret_cast<const uint64_t*>(wpack.data_ptr<int64_t>());
  const float* Sc = scale.data_ptr<float>();
  const uint64_t field_mask = low_bits(g.cg);

  // Column validity per output column (padding), shared by every row and group.
  std::vector<uint64_t> cmask(OW, 0);
  std::vector<int32_t> cbits(OW, 0);
  for (int64_t ow = 0; ow < OW; ++ow)
    for (int64_t j = 0; j < g.kw; ++j) {
      const int64_t iw = ow * g.sw - g.pw + j * g.dw;
      if (iw >= 0 && iw < W) { cmask[ow] |= field_mask << (j * g.cg); cbits[ow] += g.cg; }
    }

  auto strips_t = torch::empty({N, g.G, H, OW}, torch::kLong);
  auto* strips = reinterpret_cast<uint64_t*>(strips_t.data_ptr<int64_t>());
  at::parallel_for(0, N * g.G * H, std::max<int64_t>(1, 4096 / (OW * g.kw)), [&](int64_t lo, int64_t hi) {
    const int64_t OW_ = OW, W_ = W, kw_ = g.kw, dw_ = g.dw, pw_ = g.pw, sw_ = g.sw, cg_ = g.cg;
    for (int64_t r = lo; r < hi; ++r) {
      const uint64_t* in_row = P + r * W_;
      uint64_t* srow = strips + r * OW_;
      for (int64_t ow = 0; ow < OW_; ++ow) srow[ow] = 0;
      for (int64_t j = 0; j < kw_; ++j) {
        const int64_t off = j * dw_ - pw_, shift = j * cg_;
        // Output columns whose tap j lands inside the row.
        int64_t first = off < 0 ? (-off + sw_ - 1) / sw_ : 0;
        int64_t last = (W_ - 1 - off) >= 0 ? (W_ - 1 - off) / sw_ : -1;
        if (last > OW_ - 1) last = OW_ - 1;
        if (sw_ == 1) {
          for (int64_t ow = first; ow <= last; ++ow) srow[ow] |= in_row[ow + off] << shift;
        } else {
          for (int64_t ow = first; ow <= last; ++ow) srow[ow] |= in_row[ow * sw_ + off] << shift;
        }
      }
    }
  });

  const int64_t items = N * OH * g.G;
  const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(1, OW * g.og * g.nw));
  at::parallel_for(0, items, grain, [&](int64_t lo, int64_t hi) {
    // Locals, not captured references: stores through uint64_t* may alias an int64_t captured by
    // reference, which kept the compiler from vectorising (it reloaded loop bounds every pass).
    const int64_t OW_ = OW, OH_ = OH, H_ = H, O_ = O, nw_ = g.nw, og_ = g.og, G_ = g.G, kh_ = g.kh;
    const int64_t rpw_ = g.rpw, S_ = g.S, sh_ = g.sh, ph_ = g.ph, dh_ = g.dh;
    std::vector<uint64_t> win(nw_ * OW_), mask(nw_ * OW_);
    std::vector<int32_t> acc(OW_), vbits(OW_);
    for (int64_t it = lo; it < hi; ++it) {
      const int64_t grp = it % G_, oh = (it / G_) % OH_, n = it / (G_ * OH_);
      std::fill(win.begin(), win.end(), 0);
      std::fill(mask.begin(), mask.end(), 0);
      int64_t rows = 0;
      for (int64_t i = 0; i < kh_; ++i) {
        const int64_t ih = oh * sh_ - ph_ + i * dh_;
        if (ih < 0 || ih >= H_) continue;
        ++rows;
        const int64_t k = i / rpw_, shift = (i % rpw_) * S_;
        const uint64_t* __restrict srow = strips + ((n * G_ + grp) * H_ + ih) * OW_;
        const uint64_t* __restrict cm = cmask.data();
        uint64_t* __restrict wk = win.data() + k * OW_;
        uint64_t* __restrict mk = mask.data() + k * OW_;
        // Two loops with restrict pointers: the combined one did not vectorise (aliasing).
        for (int64_t ow = 0; ow < OW_; ++ow) wk[ow] |= srow[ow] << shift;
        for (int64_t ow = 0; ow < OW_; ++ow) mk[ow] |= cm[ow] << shift;
      }
      for (int64_t ow = 0; ow < OW_; ++ow) vbits[ow] = int32_t(rows) * cbits[ow];
      const uint64_t* wg = Wt + grp * nw_ * og_;
      for (int64_t oi = 0; oi < og_; ++oi) {
        for (int64_t ow = 0; ow < OW_; ++ow) acc[ow] = 0;
        for (int64_t k = 0; k < nw_; ++k) {
          const uint64_t wbits = wg[k * og_ + oi];
          const uint64_t* __restrict wk = win.data() + k * OW_;
          const uint64_t* __restrict mk = mask.data() + k * OW_;
          int32_t* __restrict ac = acc.data();
          for (int64_t ow = 0; ow < OW_; ++ow)
            ac[ow] += int32_t(__builtin_popcountll((wk[ow] ^ wbits) & mk[ow]));
        }
        const int64_t o = grp * og_ + oi;
        const float so = Sc[o];
        if (nhwc) {
          float* base = dst + (n * OH_ + oh) * OW_ * O_ + o;
          for (int64_t ow = 0; ow < OW_; ++ow) base[ow * O_] = float(vbits[ow] - 2 * acc[ow]) * so;
        } else {
          float* base = dst + ((n * O_ + o) * OH_ + oh) * OW_;
          for (int64_t ow = 0; ow < OW_; ++ow) base[ow] = float(vbits[ow] - 2 * acc[ow]) * so;
        }
      }
    }
  });
  return out;
}

// pack + conv in one call (one Python round trip per layer).
torch::Tensor binary_conv(torch::Tensor x, torch::Tensor wpack, torch::Tensor scale,
                          std::vector<int64_t> params) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == torch::kFloat, "x must be a 4-d float tensor");
  const int64_t O = wpack.size(0) * wpack.size(2);
  const Geometry g = make_geometry(x.size(1), O, params);
  TORCH_CHECK(wpack.size(0) == g.G && wpack.size(1) == g.nw, "weight packing does not match");
  TORCH_CHECK(scale.scalar_type() == torch::kFloat && scale.numel() == O && scale.is_contiguous(),
              "scale must be a contiguous float tensor with one value per output channel");
  if (g.strip) return conv_strips(x, wpack.contiguous(), scale, g);
  // The output keeps the input's memory format, so the float layers around it do too.
  const bool nhwc = wants_nhwc(x);
  return conv_packed(pack_activations(x, params[0]), wpack, scale, x.size(1), params, nhwc);
}
