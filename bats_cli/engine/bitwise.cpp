// Bitwise binary layers for the bats engine: BatchNorm + sign folded into bit-packing, XNOR +
// popcount convolution, the float tail (α, activation, residual and node adds) in one pass.
//
// A binary conv computes sum_k sign(x_k) * sign(w_k) over its window. With x and w as bits
// (1 = +1, 0 = -1), each valid term is +1 when the bits agree and -1 when they differ, so the
// sum is  valid_bits - 2 * popcount(x XOR w)  (XNOR-Net). A zero-padded position is neither +1
// nor -1: it is masked out of the XOR and not counted in valid_bits. The sum is an exact integer.
//
// BatchNorm -> sign is a per-channel threshold: bn(x) >= 0  <=>  s_c * x >= t_c, with s_c = -1
// where the BatchNorm's scale is negative. The thresholds are found at load time by bisection on
// PyTorch's own BatchNorm (bitwise.py), so the bits equal the float path's exactly; here the
// input is packed straight from the previous layer's float output with one compare per value,
// and the BatchNorm'd float tensor is never written. A plain binary conv has s = 1, t = 0.
//
// Layout. Packed input P[n][h][w][f][g]: per pixel, group g's cg channel bits in fw = ceil(cg /
// 64) words. Per output pixel a window of nw words per group is XORed with the weights of every
// output channel. Three window layouts, chosen per conv (make_sub):
// * direct (1x1, no padding): the window is the pixel's packed words, read in place;
// * strips (cg <= 64, k x k): up to tpw = 64 / cg taps share a word; a row of kw taps is one word
//   when it fits (then rpw rows share a word), else rw words. Each input row's strips (its taps
//   for every output column) are built once and shared by the kh output rows that read it;
// * fields (cg > 64, k x k): fw words per tap.
// Weights: W[k][o] (window word k of output channel o's group, o padded to a multiple of 8).
// The popcount runs with output channels in SIMD lanes: lane o reads the window word of its group
// (a broadcast for dense convs, a permute for grouped ones), so the output of a pixel is
// contiguous, as channels-last wants it.
//
// SIMD popcount, chosen at run time (simd_path / set_simd): AVX-512 VPOPCNTDQ (8 x 64-bit lanes),
// AVX2 (4 lanes; nibble lookup with VPSHUFB, byte counts summed with VPSADBW), portable C++.
// Threads: at::parallel_for over output rows (one image) or over images (a batch: each image's
// bits and strips stay in one thread's cache); every output value is computed by one thread with
// the same operations whatever the split, so results do not depend on the thread count.
// Also here: the cells' max pools, channels-last (max_pool_nhwc), and the popcount peak of this
// machine for the roofline of bench/infer.py (popcount_peak).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#define BATS_X86 1
#include <immintrin.h>
#define BATS_AVX512 __attribute__((target("avx512f,avx512vpopcntdq,popcnt")))
#define BATS_AVX2 __attribute__((target("avx2,popcnt")))
#else
#define BATS_X86 0
#endif

namespace {

using u64 = uint64_t;

enum Isa { PORTABLE = 0, AVX2 = 1, AVX512 = 2 };
const char* const ISA_NAMES[] = {"portable", "avx2", "avx512-vpopcntdq"};

bool isa_supported(int isa) {
#if BATS_X86
  __builtin_cpu_init();
  if (isa == AVX512) return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vpopcntdq");
  if (isa == AVX2) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt");
#endif
  return isa == PORTABLE;
}

int best_isa() {
  for (int isa : {AVX512, AVX2}) if (isa_supported(isa)) return isa;
  return PORTABLE;
}

std::atomic<int> g_isa{-1};

int active_isa() {
  int isa = g_isa.load(std::memory_order_relaxed);
  if (isa < 0) { isa = best_isa(); g_isa.store(isa); }
  return isa;
}

inline u64 low_bits(int64_t n) { return n >= 64 ? ~u64(0) : ((u64(1) << n) - 1); }
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// How lane o of the popcount finds its window word among the G of its pixel.
enum Expand { BCAST = 0, IDENT = 1, PERM = 2, GATHER = 3 };

// One row of output pixels for one sub-conv: acc[p][o] = sum_k popcount((win[p][k][g(o)] ^
// W[k][o]) & mask[p][k]) for o < Opad.
struct PopArgs {
  const u64* win;        // word k of group g of pixel p at win[p * pix_stride + k * k_stride + g]
  int64_t pix_stride, k_stride;
  int64_t n_pix;
  const u64* masks;      // [n_pix][nw] or null (every bit valid)
  int64_t nw, G, O, Opad;
  const u64* W;          // [nw][Opad]
  const int64_t* gidx;   // [Opad]: lane -> group (0 for padded lanes)
  int32_t* acc;          // acc + p * acc_stride
  int64_t acc_stride;
};

// ---- portable -----------------------------------------------------------------------------

template <int MODE, bool MASK>
void pop_row_portable(const PopArgs& a) {
  for (int64_t p = 0; p < a.n_pix; ++p) {
    const u64* w0 = a.win + p * a.pix_stride;
    const u64* m = MASK ? a.masks + p * a.nw : nullptr;
    int32_t* acc = a.acc + p * a.acc_stride;
    for (int64_t o = 0; o < a.Opad; ++o) {
      const int64_t g = MODE == BCAST ? 0 : a.gidx[o];
      int32_t s = 0;
      for (int64_t k = 0; k < a.nw; ++k) {
        u64 t = w0[k * a.k_stride + g] ^ a.W[k * a.Opad + o];
        if (MASK) t &= m[k];
        s += __builtin_popcountll(t);
      }
      acc[o] = s;
    }
  }
}

// n <= 64 bits starting at bit b of a word array.
inline u64 bit_range(const u64* words, int64_t b, int64_t n) {
  const int64_t w = b >> 6, s = b & 63;
  u64 v = words[w] >> s;
  if (s && s + n > 64) v |= words[w + 1] << (64 - s);
  return v & low_bits(n);
}

// Packing a run of channels-last pixels: bit c of a pixel = (x[c] * s[c] >= t[c]), then each
// group's cg bits to P[p][f][g].
struct PackArgs {
  const float* s; const float* t;
  int64_t C, CW, G, cg, fw, PW;
  const int64_t* ex_idx; const int64_t* ex_sh; const int64_t* ex_shl;  // [round_up(G, 8)]
  u64 fmask;
};

void extract_generic(const PackArgs& a, const u64* bits, u64* dst) {
  for (int64_t f = 0; f < a.fw; ++f)
    for (int64_t g = 0; g < a.G; ++g)
      dst[f * a.G + g] = bit_range(bits, g * a.cg + 64 * f, std::min<int64_t>(64, a.cg - 64 * f));
}

void pack_px_portable(const PackArgs& a, const float* x, int64_t n_pix, u64* P) {
  std::vector<u64> bits(a.CW + 1);
  for (int64_t p = 0; p < n_pix; ++p) {
    const float* px = x + p * a.C;
    u64* b = a.G == 1 ? P + p * a.PW : bits.data();
    std::fill(b, b + a.CW, 0);
    for (int64_t c = 0; c < a.C; ++c) b[c >> 6] |= u64(px[c] * a.s[c] >= a.t[c]) << (c & 63);
    if (a.G > 1) extract_generic(a, b, P + p * a.PW);
  }
}

#if BATS_X86
// ---- AVX2 ---------------------------------------------------------------------------------

BATS_AVX2 inline __m256i popcnt_bytes_avx2(__m256i v) {
  // Nibble lookup (Mula): per byte, popcount(low nibble) + popcount(high nibble).
  const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                                       0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
  const __m256i low = _mm256_set1_epi8(0x0f);
  const __m256i lo = _mm256_and_si256(v, low);
  const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
  return _mm256_add_epi8(_mm256_shuffle_epi8(lut, lo), _mm256_shuffle_epi8(lut, hi));
}

template <int MODE, bool MASK>
BATS_AVX2 void pop_row_avx2(const PopArgs& a) {
  const __m256i zero = _mm256_setzero_si256();
  const __m256i pick = _mm256_setr_epi32(0, 2, 4, 6, 0, 0, 0, 0);
  for (int64_t p = 0; p < a.n_pix; ++p) {
    const u64* w0 = a.win + p * a.pix_stride;
    const u64* m = MASK ? a.masks + p * a.nw : nullptr;
    int32_t* acc = a.acc + p * a.acc_stride;
    for (int64_t ob = 0; ob < a.Opad; ob += 4) {
      __m256i total = zero, bytes = zero;
      int64_t pending = 0;
      for (int64_t k = 0; k < a.nw; ++k) {
        const u64* wk = w0 + k * a.k_stride;
        __m256i x;
        if (MODE == BCAST) {
          x = _mm256_set1_epi64x(int64_t(wk[0]));
        } else if (MODE == IDENT && ob + 4 <= a.O) {
          x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wk + ob));
        } else {
          const int64_t* gi = a.gidx + ob;
          x = _mm256_setr_epi64x(int64_t(wk[gi[0]]), int64_t(wk[gi[1]]), int64_t(wk[gi[2]]),
                                 int64_t(wk[gi[3]]));
        }
        __m256i t = _mm256_xor_si256(
            x, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.W + k * a.Opad + ob)));
        if (MASK) t = _mm256_and_si256(t, _mm256_set1_epi64x(int64_t(m[k])));
        bytes = _mm256_add_epi8(bytes, popcnt_bytes_avx2(t));
        // A byte holds at most 8 per word: sum into 64-bit lanes before 31 words overflow it.
        if (++pending == 31) {
          total = _mm256_add_epi64(total, _mm256_sad_epu8(bytes, zero));
          bytes = zero;
          pending = 0;
        }
      }
      total = _mm256_add_epi64(total, _mm256_sad_epu8(bytes, zero));
      const __m256i lo32 = _mm256_permutevar8x32_epi32(total, pick);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(acc + ob), _mm256_castsi256_si128(lo32));
    }
  }
}

BATS_AVX2 void pack_px_avx2(const PackArgs& a, const float* x, int64_t n_pix, u64* P) {
  std::vector<u64> bits(a.CW + 1);
  for (int64_t p = 0; p < n_pix; ++p) {
    const float* px = x + p * a.C;
    u64* b = a.G == 1 ? P + p * a.PW : bits.data();
    std::fill(b, b + a.CW, 0);
    int64_t c = 0;
    for (; c + 8 <= a.C; c += 8) {
      const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(px + c), _mm256_loadu_ps(a.s + c));
      const u64 m = u64(_mm256_movemask_ps(_mm256_cmp_ps(v, _mm256_loadu_ps(a.t + c), _CMP_GE_OQ)));
      b[c >> 6] |= m << (c & 63);  // 8-bit chunks never straddle a word (c % 8 == 0)
    }
    for (; c < a.C; ++c) b[c >> 6] |= u64(px[c] * a.s[c] >= a.t[c]) << (c & 63);
    if (a.G > 1) extract_generic(a, b, P + p * a.PW);
  }
}

// ---- AVX-512 VPOPCNTDQ --------------------------------------------------------------------

BATS_AVX512 inline __mmask8 lanes8(int64_t n) {
  return n >= 8 ? __mmask8(0xff) : n <= 0 ? __mmask8(0) : __mmask8((1u << n) - 1);
}

// NB vectors of 8 output channels at a time, their sums in registers: a pixel's window words
// are loaded (and its mask broadcast) once per word for all of them.
template <int MODE, bool MASK, int NB>
BATS_AVX512 inline void pop_block_avx512(const PopArgs& a, int64_t ob0) {
  const __mmask8 g_lo = lanes8(a.G), g_hi = lanes8(a.G - 8);
  __m512i idx[NB];
  __mmask8 ol[NB];
  for (int j = 0; j < NB; ++j) {
    idx[j] = MODE == PERM || MODE == GATHER ? _mm512_loadu_si512(a.gidx + ob0 + 8 * j)
                                            : _mm512_setzero_si512();
    ol[j] = lanes8(a.O - ob0 - 8 * j);
  }
  for (int64_t p = 0; p < a.n_pix; ++p) {
    const u64* w0 = a.win + p * a.pix_stride;
    const u64* m = MASK ? a.masks + p * a.nw : nullptr;
    __m512i v[NB];
    for (int j = 0; j < NB; ++j) v[j] = _mm512_setzero_si512();
    for (int64_t k = 0; k < a.nw; ++k) {
      const u64* wk = w0 + k * a.k_stride;
      const u64* Wk = a.W + k * a.Opad + ob0;
      __m512i b = _mm512_setzero_si512(), lo = b, hi = b, mk = b;
      if (MODE == BCAST) b = _mm512_set1_epi64(int64_t(wk[0]));
      if (MODE == PERM) {
        lo = _mm512_maskz_loadu_epi64(g_lo, wk);
        hi = _mm512_maskz_loadu_epi64(g_hi, wk + 8);
      }
      if (MASK) mk = _mm512_set1_epi64(int64_t(m[k]));
      for (int j = 0; j < NB; ++j) {
        __m512i x;
        if (MODE == BCAST) x = b;
        else if (MODE == IDENT) x = _mm512_maskz_loadu_epi64(ol[j], wk + ob0 + 8 * j);
        else if (MODE == PERM) x = _mm512_permutex2var_epi64(lo, idx[j], hi);
        else x = _mm512_i64gather_epi64(idx[j], reinterpret_cast<const void*>(wk), 8);
        __m512i t = _mm512_xor_si512(x, _mm512_loadu_si512(Wk + 8 * j));
        if (MASK) t = _mm512_and_si512(t, mk);
        v[j] = _mm512_add_epi64(v[j], _mm512_popcnt_epi64(t));
      }
    }
    int32_t* acc = a.acc + p * a.acc_stride + ob0;
    for (int j = 0; j < NB; ++j)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc + 8 * j), _mm512_cvtepi64_epi32(v[j]));
  }
}

template <int MODE, bool MASK>
BATS_AVX512 void pop_row_avx512(const PopArgs& a) {
  int64_t ob = 0;
  for (; ob + 32 <= a.Opad; ob += 32) pop_block_avx512<MODE, MASK, 4>(a, ob);
  const int64_t rest = (a.Opad - ob) / 8;
  if (rest == 3) pop_block_avx512<MODE, MASK, 3>(a, ob);
  if (rest == 2) pop_block_avx512<MODE, MASK, 2>(a, ob);
  if (rest == 1) pop_block_avx512<MODE, MASK, 1>(a, ob);
}

BATS_AVX512 void pack_px_avx512(const PackArgs& a, const float* x, int64_t n_pix, u64* P) {
  u64 local[9];
  std::vector<u64> big(a.G > 1 && a.CW > 8 ? a.CW + 1 : 0);
  u64* bits = a.CW > 8 ? big.data() : local;
  // Fields of <= 64 bits out of <= 512 bits, 8 groups per step: lane g takes bits
  // [g * cg, g * cg + cg) from words idx[g] and idx[g] + 1.
  const bool vec_extract = a.G > 1 && a.fw == 1 && a.CW <= 8;
  const __m512i fm = _mm512_set1_epi64(int64_t(a.fmask));
  const __m512i one = _mm512_set1_epi64(1), seven = _mm512_set1_epi64(7);
  for (int64_t p = 0; p < n_pix; ++p) {
    const float* px = x + p * a.C;
    u64* b = a.G == 1 ? P + p * a.PW : bits;
    for (int64_t w = 0; w < a.CW; ++w) {
      const int64_t c0 = 64 * w, c1 = std::min<int64_t>(a.C, c0 + 64);
      u64 word = 0;
      for (int64_t c = c0; c < c1; c += 16) {
        const __mmask16 lm = c1 - c >= 16 ? __mmask16(0xffff) : __mmask16((1u << (c1 - c)) - 1);
        const __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(lm, px + c), _mm512_loadu_ps(a.s + c));
        word |= u64(_mm512_mask_cmp_ps_mask(lm, v, _mm512_loadu_ps(a.t + c), _CMP_GE_OQ)) << (c - c0);
      }
      b[w] = word;
    }
    if (a.G == 1) continue;
    u64* dst = P + p * a.PW;
    if (!vec_extract) { extract_generic(a, b, dst); continue; }
    const __m512i bv = _mm512_maskz_loadu_epi64(lanes8(a.CW), b);
    for (int64_t g = 0; g < a.G; g += 8) {
      const __m512i il = _mm512_loadu_si512(a.ex_idx + g);
      const __m512i ih = _mm512_min_epi64(_mm512_add_epi64(il, one), seven);
      const __m512i lo = _mm512_srlv_epi64(_mm512_permutexvar_epi64(il, bv), _mm512_loadu_si512(a.ex_sh + g));
      const __m512i hi = _mm512_sllv_epi64(_mm512_permutexvar_epi64(ih, bv), _mm512_loadu_si512(a.ex_shl + g));
      _mm512_mask_storeu_epi64(dst + g, lanes8(a.G - g), _mm512_and_si512(_mm512_or_si512(lo, hi), fm));
    }
  }
}
#endif  // BATS_X86

using PopFn = void (*)(const PopArgs&);
using PackFn = void (*)(const PackArgs&, const float*, int64_t, u64*);

PopFn pop_fn(int isa, int mode, bool mask) {
#define BATS_POP_TABLE(fn)                                                          \
  {                                                                                 \
    static const PopFn table[4][2] = {{fn<BCAST, false>, fn<BCAST, true>},          \
                                      {fn<IDENT, false>, fn<IDENT, true>},          \
                                      {fn<PERM, false>, fn<PERM, true>},            \
                                      {fn<GATHER, false>, fn<GATHER, true>}};       \
    return table[mode][mask ? 1 : 0];                                               \
  }
#if BATS_X86
  if (isa == AVX512) BATS_POP_TABLE(pop_row_avx512)
  if (isa == AVX2) BATS_POP_TABLE(pop_row_avx2)
#endif
  BATS_POP_TABLE(pop_row_portable)
#undef BATS_POP_TABLE
}

PackFn pack_fn(int isa) {
#if BATS_X86
  if (isa == AVX512) return pack_px_avx512;
  if (isa == AVX2) return pack_px_avx2;
#endif
  return pack_px_portable;
}

// ---- one sub-conv (a layer has one; factorized reduce has two, on offset grids) --------------

enum Layout { DIRECT = 0, STRIP = 1, FIELD = 2 };

struct Sub {
  int64_t O = 0, Opad = 0, G = 1, cg = 0, og = 0;
  int64_t kh = 1, kw = 1, sh = 1, sw = 1, ph = 0, pw = 0, dh = 1, dw = 1;
  int64_t oy = 0, ox = 0;    // window origin offset (factorized reduce's second conv: 1, 1)
  bool fill_ones = false;    // an origin past the input reads +1 everywhere (a 0 after BatchNorm)
  int layout = DIRECT, mode = BCAST;
  int64_t fw = 1, nw = 1;
  int64_t tpw = 1, rw = 1, rpw = 1, S = 0;  // strips: taps per word, words per row, rows per word
  int64_t o0 = 0;            // first output channel of this sub in the layer's output
  std::vector<u64> W;        // [nw][Opad]
  std::vector<int64_t> gidx; // [Opad]

  int64_t out_size(int64_t in, bool rows) const {
    const int64_t k = rows ? kh : kw, s = rows ? sh : sw, p = rows ? ph : pw, d = rows ? dh : dw;
    const int64_t off = rows ? oy : ox;
    // A shifted grid (offset) is padded at the end to keep ceil(in / s) outputs (factorized reduce).
    const int64_t span = off ? in - off + (in % 2) : in;
    return (span + 2 * p - d * (k - 1) - 1) / s + 1;
  }

  // Bit position of tap (i, j), channel c of the group: (word, bit).
  std::pair<int64_t, int64_t> where(int64_t i, int64_t j, int64_t c) const {
    if (layout == STRIP) {
      if (rw == 1) return {i / rpw, (i % rpw) * S + j * cg + c};
      return {i * rw + j / tpw, (j % tpw) * cg + c};
    }
    const int64_t t = i * kw + j;  // DIRECT: t == 0
    return {t * fw + c / 64, c % 64};
  }
};

Sub make_sub(const torch::Tensor& weight, int64_t C, const std::vector<int64_t>& p) {
  // p = {groups, kh, kw, sh, sw, ph, pw, dh, dw, oy, ox, fill_ones}
  TORCH_CHECK(p.size() == 12, "a sub-conv needs 12 geometry values");
  TORCH_CHECK(weight.dim() == 4, "weight must be 4-d");
  Sub s;
  s.G = p[0];
  s.O = weight.size(0);
  TORCH_CHECK(s.G >= 1 && C % s.G == 0 && s.O % s.G == 0, "channels not divisible by groups");
  s.cg = C / s.G; s.og = s.O / s.G;
  s.kh = p[1]; s.kw = p[2]; s.sh = p[3]; s.sw = p[4]; s.ph = p[5]; s.pw = p[6];
  s.dh = p[7]; s.dw = p[8]; s.oy = p[9]; s.ox = p[10]; s.fill_ones = p[11] != 0;
  TORCH_CHECK(s.kh >= 1 && s.kw >= 1 && s.sh >= 1 && s.sw >= 1 && s.dh >= 1 && s.dw >= 1 &&
              s.ph >= 0 && s.pw >= 0, "bad conv geometry");
  TORCH_CHECK(weight.size(1) == s.cg && weight.size(2) == s.kh && weight.size(3) == s.kw,
              "weight shape does not match the geometry");
  s.fw = ceil_div(s.cg, 64);
  if (s.kh == 1 && s.kw == 1 && s.ph == 0 && s.pw == 0) {
    s.layout = DIRECT;
    s.nw = s.fw;
  } else if (s.cg <= 64) {
    TORCH_CHECK(s.oy == 0 && s.ox == 0, "offset grids are for 1x1 convs");
    s.layout = STRIP;
    s.tpw = 64 / s.cg;
    s.rw = ceil_div(s.kw, s.tpw);
    s.S = s.kw * s.cg;
    s.rpw = s.rw == 1 ? 64 / s.S : 1;
    s.nw = s.rw == 1 ? ceil_div(s.kh, s.rpw) : s.kh * s.rw;
  } else {
    TORCH_CHECK(s.oy == 0 && s.ox == 0, "offset grids are for 1x1 convs");
    s.layout = FIELD;
    s.nw = s.kh * s.kw * s.fw;
  }
  s.mode = s.G == 1 ? BCAST : s.og == 1 ? IDENT : s.G <= 16 ? PERM : GATHER;
  s.Opad = round_up(s.O, 8);
  s.gidx.assign(s.Opad, 0);
  for (int64_t o = 0; o < s.O; ++o) s.gidx[o] = o / s.og;
  s.W.assign(s.nw * s.Opad, 0);
  auto w = weight.to(torch::kFloat).contiguous();
  const float* src = w.data_ptr<float>();
  for (int64_t o = 0; o < s.O; ++o)
    for (int64_t c = 0; c < s.cg; ++c)
      for (int64_t i = 0; i < s.kh; ++i)
        for (int64_t j = 0; j < s.kw; ++j) {
          if (!(src[((o * s.cg + c) * s.kh + i) * s.kw + j] >= 0.0f)) continue;  // sign(w): >= 0 -> 1
          const auto wb = s.where(i, j, c);
          s.W[wb.first * s.Opad + o] |= u64(1) << wb.second;
        }
  return s;
}

// The memory format PyTorch's conv would give the output (it follows the input's), so the float
// layers after the engine see the same layouts as on the float path.
inline bool wants_nhwc(const torch::Tensor& x) {
  return x.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
}

// ACT_RPRELU: ReActNet's PReLU(v - shift_in) + shift_out.
enum Act { ACT_NONE = 0, ACT_RELU = 1, ACT_PRELU = 2, ACT_RPRELU = 3 };

// Scratch memory reused across calls (per thread): fresh large allocations would be fresh pages
// every layer, and zeroing them cost more than the popcounts.
template <class T>
T* scratch(std::vector<T>& v, size_t n) {
  if (v.size() < n) v.resize(n);
  return v.data();
}
struct Scratch {
  std::vector<u64> packed, strips, win, masks;
  std::vector<int32_t> acc, vb;
};
thread_local Scratch tl_scratch;

#ifdef BATS_PHASE_TIMING
// Development aid (-DBATS_PHASE_TIMING): seconds per phase, one thread.
double g_phase[6] = {0};
struct PhaseTimer {
  int i; std::chrono::steady_clock::time_point t0 = std::chrono::steady_clock::now();
  explicit PhaseTimer(int i_) : i(i_) {}
  ~PhaseTimer() { g_phase[i] += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(); }
};
#define BATS_PHASE(i) PhaseTimer bats_phase_timer_##i(i)
#else
#define BATS_PHASE(i)
#endif

struct Epi {
  const int32_t* acc; int64_t aw;   // acc[p * aw + o]
  const int32_t* vb;                // valid bits per pixel
  int64_t n_pix, O;
  const float* scale; const float* slope;
  const float* shift_in; const float* shift_out;  // ACT_RPRELU only
  const float* res; const float* add;  // same layout as out (or null)
  float* out;
  int64_t o_stride, p_stride;          // out[o * o_stride + p * p_stride]
};

template <int ACT, bool RES, bool ADD>
void epilogue(const Epi& e) {
  // Same operations, in the same order, as the float path: conv (an exact integer) * α,
  // activation, + residual, + the node's other term. Built with -ffp-contract=off.
  if (e.o_stride == 1) {
    for (int64_t p = 0; p < e.n_pix; ++p) {
      const int32_t* a = e.acc + p * e.aw;
      const int32_t vb = e.vb[p];
      const int64_t base = p * e.p_stride;
      float* __restrict out = e.out + base;
      const float* __restrict res = RES ? e.res + base : nullptr;
      const float* __restrict add = ADD ? e.add + base : nullptr;
      for (int64_t o = 0; o < e.O; ++o) {
        float v = float(vb - 2 * a[o]) * e.scale[o];
        if (ACT == ACT_RPRELU) v = v - e.shift_in[o];
        if (ACT == ACT_RELU) v = v > 0.0f ? v : 0.0f;
        if (ACT == ACT_PRELU || ACT == ACT_RPRELU) {
          // Both sides computed, then a select: a conditional multiply stays a scalar branch.
          const float neg = e.slope[o] * v;
          v = v > 0.0f ? v : neg;
        }
        if (ACT == ACT_RPRELU) v = v + e.shift_out[o];
        if (RES) v = v + res[o];
        if (ADD) v = v + add[o];
        out[o] = v;
      }
    }
    return;
  }
  for (int64_t o = 0; o < e.O; ++o) {
    const float sc = e.scale[o], sl = (ACT == ACT_PRELU || ACT == ACT_RPRELU) ? e.slope[o] : 0.0f;
    const float si = ACT == ACT_RPRELU ? e.shift_in[o] : 0.0f, so = ACT == ACT_RPRELU ? e.shift_out[o] : 0.0f;
    const int64_t base = o * e.o_stride;
    for (int64_t p = 0; p < e.n_pix; ++p) {
      float v = float(e.vb[p] - 2 * e.acc[p * e.aw + o]) * sc;
      if (ACT == ACT_RPRELU) v = v - si;
      if (ACT == ACT_RELU) v = v > 0.0f ? v : 0.0f;
      if (ACT == ACT_PRELU || ACT == ACT_RPRELU) {
        const float neg = sl * v;
        v = v > 0.0f ? v : neg;
      }
      if (ACT == ACT_RPRELU) v = v + so;
      if (RES) v = v + e.res[base + p];
      if (ADD) v = v + e.add[base + p];
      e.out[base + p] = v;
    }
  }
}

using EpiFn = void (*)(const Epi&);

EpiFn epi_fn(int act, bool res, bool add) {
  static const EpiFn table[4][2][2] = {
      {{epilogue<0, false, false>, epilogue<0, false, true>}, {epilogue<0, true, false>, epilogue<0, true, true>}},
      {{epilogue<1, false, false>, epilogue<1, false, true>}, {epilogue<1, true, false>, epilogue<1, true, true>}},
      {{epilogue<2, false, false>, epilogue<2, false, true>}, {epilogue<2, true, false>, epilogue<2, true, true>}},
      {{epilogue<3, false, false>, epilogue<3, false, true>}, {epilogue<3, true, false>, epilogue<3, true, true>}}};
  return table[act][res ? 1 : 0][add ? 1 : 0];
}

}  // namespace

// A binary layer ready to run: thresholds, packed weights, α, activation.
class BinaryLayer {
 public:
  BinaryLayer(int64_t C, torch::Tensor thresholds, torch::Tensor signs,
              std::vector<torch::Tensor> weights, std::vector<std::vector<int64_t>> params,
              torch::Tensor scale, int64_t act, torch::Tensor slope,
              c10::optional<torch::Tensor> shift_in, c10::optional<torch::Tensor> shift_out)
      : C_(C), act_(int(act)) {
    TORCH_CHECK(C >= 1, "a layer needs input channels");
    TORCH_CHECK(!weights.empty() && weights.size() == params.size(), "one geometry per weight");
    TORCH_CHECK(act >= 0 && act <= 3, "activation must be 0 (none), 1 (relu), 2 (prelu) or 3 (rprelu)");
    auto th = thresholds.to(torch::kFloat).contiguous(), sg = signs.to(torch::kFloat).contiguous();
    TORCH_CHECK(th.numel() == C && sg.numel() == C, "one threshold and one sign per input channel");
    const int64_t Cp = round_up(C, 16);
    thr_.assign(Cp, 0.0f); sgn_.assign(Cp, 1.0f);
    std::copy(th.data_ptr<float>(), th.data_ptr<float>() + C, thr_.begin());
    std::copy(sg.data_ptr<float>(), sg.data_ptr<float>() + C, sgn_.begin());
    int64_t o0 = 0;
    for (size_t i = 0; i < weights.size(); ++i) {
      Sub s = make_sub(weights[i], C, params[i]);
      s.o0 = o0;
      o0 += s.O;
      TORCH_CHECK(subs_.empty() || (s.G == subs_[0].G && s.layout == DIRECT &&
                                    subs_[0].layout == DIRECT),
                  "several sub-convs must be padding-free 1x1 convs over the same groups");
      subs_.push_back(std::move(s));
    }
    O_ = o0;
    G_ = subs_[0].G; cg_ = C / G_; fw_ = ceil_div(cg_, 64); PW_ = G_ * fw_;
    aw_ = 0;
    for (const auto& s : subs_) aw_ = std::max(aw_, s.o0 + s.Opad);
    auto sc = scale.to(torch::kFloat).contiguous();
    TORCH_CHECK(sc.numel() == O_, "scale needs one value per output channel");
    scale_.assign(sc.data_ptr<float>(), sc.data_ptr<float>() + O_);
    slope_.assign(O_, 0.0f);
    if (act_ == ACT_PRELU || act_ == ACT_RPRELU) {
      auto sl = slope.to(torch::kFloat).contiguous();
      TORCH_CHECK(sl.numel() == O_ || sl.numel() == 1, "PReLU needs one slope or one per channel");
      for (int64_t o = 0; o < O_; ++o) slope_[o] = sl.data_ptr<float>()[sl.numel() == 1 ? 0 : o];
    }
    shift_in_.assign(O_, 0.0f); shift_out_.assign(O_, 0.0f);
    if (act_ == ACT_RPRELU) {
      TORCH_CHECK(shift_in.has_value() && shift_out.has_value(), "RPReLU needs its two shifts");
      auto si = shift_in->to(torch::kFloat).contiguous(), so = shift_out->to(torch::kFloat).contiguous();
      TORCH_CHECK(si.numel() == O_ && so.numel() == O_, "RPReLU needs one shift per channel, before and after");
      std::copy(si.data_ptr<float>(), si.data_ptr<float>() + O_, shift_in_.begin());
      std::copy(so.data_ptr<float>(), so.data_ptr<float>() + O_, shift_out_.begin());
    }
    // Field extraction tables (groups of <= 64 bits out of a pixel's channel bits).
    const int64_t Gp = round_up(G_, 8);
    ex_idx_.assign(Gp, 0); ex_sh_.assign(Gp, 0); ex_shl_.assign(Gp, 64);
    for (int64_t g = 0; g < G_; ++g) {
      ex_idx_[g] = (g * cg_) >> 6;
      ex_sh_[g] = (g * cg_) & 63;
      ex_shl_[g] = 64 - ex_sh_[g];
    }
    ones_.assign(PW_, 0);
    for (int64_t f = 0; f < fw_; ++f)
      for (int64_t g = 0; g < G_; ++g) ones_[f * G_ + g] = low_bits(std::min<int64_t>(64, cg_ - 64 * f));
  }

  int64_t out_channels() const { return O_; }

  torch::Tensor forward(torch::Tensor x, c10::optional<torch::Tensor> residual,
                        c10::optional<torch::Tensor> add) const {
    TORCH_CHECK(x.dim() == 4 && x.scalar_type() == torch::kFloat && x.device().is_cpu(),
                "x must be a 4-d float32 CPU tensor");
    TORCH_CHECK(x.size(1) == C_, "expected ", C_, " input channels, got ", x.size(1));
    const bool nhwc = wants_nhwc(x);
    const auto fmt = nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
    auto xc = x.contiguous(fmt);
    const int64_t N = xc.size(0), H = xc.size(2), W = xc.size(3);
    const Sub& s0 = subs_[0];
    const int64_t OH = s0.out_size(H, true), OW = s0.out_size(W, false);
    TORCH_CHECK(OH > 0 && OW > 0, "input smaller than the kernel");
    for (const auto& s : subs_)
      TORCH_CHECK(s.out_size(H, true) == OH && s.out_size(W, false) == OW, "sub-conv sizes differ");
    auto out = torch::empty({N, O_, OH, OW}, torch::TensorOptions().dtype(torch::kFloat).memory_format(fmt));
    torch::Tensor rc, ac;
    const float* res = nullptr;
    const float* addp = nullptr;
    if (residual.has_value() && residual->defined()) {
      TORCH_CHECK(residual->sizes() == out.sizes() && residual->scalar_type() == torch::kFloat,
                  "residual must match the output (", out.sizes(), ")");
      rc = residual->contiguous(fmt);
      res = rc.data_ptr<float>();
    }
    if (add.has_value() && add->defined()) {
      TORCH_CHECK(add->sizes() == out.sizes() && add->scalar_type() == torch::kFloat,
                  "add must match the output (", out.sizes(), ")");
      ac = add->contiguous(fmt);
      addp = ac.data_ptr<float>();
    }
    const int isa = active_isa();
    const float* xp = xc.data_ptr<float>();
    float* dst = out.data_ptr<float>();
    const int64_t in_img = C_ * H * W, out_img = O_ * OH * OW;
    if (N == 1) {
      run_images(xp, dst, res, addp, 1, H, W, OH, OW, nhwc, isa);  // threads split its rows
    } else {
      // Image by image, the images split between threads: each image's packed bits and strips
      // stay in its thread's cache (a whole batch's would not).
      at::parallel_for(0, N, 1, [&](int64_t lo, int64_t hi) {
        for (int64_t n = lo; n < hi; ++n)
          run_images(xp + n * in_img, dst + n * out_img, res ? res + n * out_img : nullptr,
                     addp ? addp + n * out_img : nullptr, 1, H, W, OH, OW, nhwc, isa);
      });
    }
    return out;
  }

  std::string describe() const {
    static const char* names[] = {"direct", "strips", "fields"};
    std::string d;
    for (const auto& s : subs_) {
      if (!d.empty()) d += " + ";
      d += std::string(names[s.layout]) + " " + std::to_string(s.nw) + " word(s)/window, " +
           std::to_string(s.G) + " group(s)";
    }
    return d;
  }

 private:
  // Images [0, N) of x (already offset): pack, strips, rows. Nested parallel_fors run inline when
  // called from a parallel region.
  void run_images(const float* x, float* dst, const float* res, const float* addp, int64_t N,
                  int64_t H, int64_t W, int64_t OH, int64_t OW, bool nhwc, int isa) const {
    // 1. Pack: thresholds applied, straight from the float input. P[n][h][w][f][g].
    u64* P = scratch(tl_scratch.packed, size_t(N * H * W * PW_));
    {
      BATS_PHASE(0);
      pack(x, N, H, W, nhwc, isa, P);
    }

    // 2. Strips (strip layout): per input row and output column, the taps of that row.
    const Sub& sub = subs_[0];
    u64* strips = nullptr;
    std::vector<u64> cmask;
    std::vector<int32_t> ccount;
    if (sub.layout == STRIP) {
      cmask.assign(OW * sub.rw, 0);
      ccount.assign(OW, 0);
      for (int64_t ow = 0; ow < OW; ++ow)
        for (int64_t j = 0; j < sub.kw; ++j) {
          const int64_t iw = ow * sub.sw - sub.pw + j * sub.dw;
          if (iw < 0 || iw >= W) continue;
          const int64_t seg = sub.rw == 1 ? 0 : j / sub.tpw;
          const int64_t shift = sub.rw == 1 ? j * sub.cg : (j % sub.tpw) * sub.cg;
          cmask[ow * sub.rw + seg] |= low_bits(sub.cg) << shift;
          ccount[ow] += 1;
        }
      strips = scratch(tl_scratch.strips, size_t(N * H * OW * sub.rw * G_));
      BATS_PHASE(1);
      build_strips(P, N, H, W, OW, strips);
    }

    // 3. Rows of output pixels: windows, popcounts, the float tail.
    const EpiFn epi = epi_fn(act_, res != nullptr, addp != nullptr);
    int64_t work = 0;
    for (const auto& s : subs_) work += s.nw * s.Opad;
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, OW * work));
    at::parallel_for(0, N * OH, grain, [&](int64_t lo, int64_t hi) {
      Scratch& sc = tl_scratch;  // this worker's
      u64* win = sub.layout == DIRECT ? nullptr : scratch(sc.win, size_t(OW * sub.nw * G_));
      u64* masks = sub.layout == DIRECT ? nullptr : scratch(sc.masks, size_t(OW * sub.nw));
      int32_t* acc = scratch(sc.acc, size_t(OW * aw_));
      int32_t* vb = scratch(sc.vb, size_t(OW));
      for (int64_t r = lo; r < hi; ++r) {
        const int64_t n = r / OH, oh = r % OH;
        for (const auto& s : subs_) run_sub(s, P, strips, cmask, ccount, n, oh, H, W, OW, isa,
                                            win, masks, acc, vb);
        BATS_PHASE(4);
        Epi e;
        e.acc = acc; e.aw = aw_; e.vb = vb; e.n_pix = OW; e.O = O_;
        e.scale = scale_.data(); e.slope = slope_.data();
        e.shift_in = shift_in_.data(); e.shift_out = shift_out_.data();
        if (nhwc) {
          const int64_t base = (n * OH + oh) * OW * O_;
          e.out = dst + base; e.res = res ? res + base : nullptr; e.add = addp ? addp + base : nullptr;
          e.o_stride = 1; e.p_stride = O_;
        } else {
          const int64_t base = n * O_ * OH * OW + oh * OW;
          e.out = dst + base; e.res = res ? res + base : nullptr; e.add = addp ? addp + base : nullptr;
          e.o_stride = OH * OW; e.p_stride = 1;
        }
        epi(e);
      }
    });
  }


  void pack(const float* x, int64_t N, int64_t H, int64_t W, bool nhwc, int isa, u64* P) const {
    const int64_t C = C_, HW = H * W, CW = ceil_div(C, 64);
    PackArgs a;
    a.s = sgn_.data(); a.t = thr_.data(); a.C = C; a.CW = CW; a.G = G_; a.cg = cg_; a.fw = fw_;
    a.PW = PW_; a.ex_idx = ex_idx_.data(); a.ex_sh = ex_sh_.data(); a.ex_shl = ex_shl_.data();
    a.fmask = low_bits(cg_);
    if (nhwc) {
      const PackFn fn = pack_fn(isa);
      at::parallel_for(0, N * HW, std::max<int64_t>(1, 8192 / C), [&](int64_t lo, int64_t hi) {
        fn(a, x + lo * C, hi - lo, P + lo * PW_);
      });
      return;
    }
    // NCHW: channel planes, 64 pixels at a time so the inner loop runs over contiguous pixels.
    const int64_t chunks = ceil_div(HW, 64);
    at::parallel_for(0, N * chunks, 1, [&](int64_t lo, int64_t hi) {
      std::vector<u64> bits(64 * (CW + 1));
      for (int64_t r = lo; r < hi; ++r) {
        const int64_t n = r / chunks, p0 = (r % chunks) * 64, np = std::min<int64_t>(64, HW - p0);
        std::fill(bits.begin(), bits.end(), 0);
        for (int64_t c = 0; c < C; ++c) {
          const float* xc = x + (n * C + c) * HW + p0;
          const float sc = a.s[c], tc = a.t[c];
          const int64_t w = c >> 6, b = c & 63;
          u64* bw = bits.data() + w;
          for (int64_t q = 0; q < np; ++q) bw[q * (CW + 1)] |= u64(xc[q] * sc >= tc) << b;
        }
        for (int64_t q = 0; q < np; ++q) {
          const u64* bq = bits.data() + q * (CW + 1);
          u64* dst = P + (n * HW + p0 + q) * PW_;
          if (G_ == 1) std::memcpy(dst, bq, sizeof(u64) * CW);
          else extract_generic(a, bq, dst);
        }
      }
    });
  }

  void build_strips(const u64* P, int64_t N, int64_t H, int64_t W, int64_t OW, u64* strips) const {
    const Sub& s = subs_[0];
    const int64_t G = G_, rw = s.rw;
    at::parallel_for(0, N * H, std::max<int64_t>(1, 2048 / std::max<int64_t>(1, OW * s.kw * G)),
                     [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) {
        const u64* prow = P + r * W * G;
        u64* srow = strips + r * OW * rw * G;
        std::fill(srow, srow + OW * rw * G, 0);
        for (int64_t j = 0; j < s.kw; ++j) {
          const int64_t off = j * s.dw - s.pw;
          const int64_t seg = rw == 1 ? 0 : j / s.tpw;
          const int64_t shift = rw == 1 ? j * s.cg : (j % s.tpw) * s.cg;
          // Output columns whose tap j lands inside the row.
          const int64_t first = off < 0 ? (-off + s.sw - 1) / s.sw : 0;
          const int64_t last = std::min<int64_t>(OW - 1, W - 1 - off >= 0 ? (W - 1 - off) / s.sw : -1);
          if (last < first) continue;
          if (s.sw == 1 && rw == 1) {
            // Contiguous: output columns first..last read input columns first+off..last+off.
            const u64* __restrict src = prow + (first + off) * G;
            u64* __restrict d = srow + first * G;
            const int64_t n = (last - first + 1) * G;
            for (int64_t q = 0; q < n; ++q) d[q] |= src[q] << shift;
            continue;
          }
          for (int64_t ow = first; ow <= last; ++ow) {
            const u64* __restrict src = prow + (ow * s.sw + off) * G;
            u64* __restrict d = srow + (ow * rw + seg) * G;
            for (int64_t g = 0; g < G; ++g) d[g] |= src[g] << shift;
          }
        }
      }
    });
  }

  // One output row of one sub-conv: windows, masks and valid bits, then the popcounts.
  void run_sub(const Sub& s, const u64* P, const u64* strips, const std::vector<u64>& cmask,
               const std::vector<int32_t>& ccount, int64_t n, int64_t oh, int64_t H, int64_t W,
               int64_t OW, int isa, u64* win, u64* masks, int32_t* acc, int32_t* vb) const {
    const int64_t G = G_;
    PopArgs a;
    a.nw = s.nw; a.G = G; a.O = s.O; a.Opad = s.Opad; a.W = s.W.data(); a.gidx = s.gidx.data();
    a.acc_stride = aw_;
    if (s.layout == DIRECT) {
      const int64_t ih = oh * s.sh + s.oy;
      // Columns whose origin is inside the input; the rest (a shifted grid's last column) fill.
      const int64_t first = 0;  // origins are never left of the input (offset >= 0)
      int64_t last = ih >= H ? 0 : OW;  // [first, last) read from P, the rest fill
      while (last > first && (last - 1) * s.sw + s.ox >= W) --last;
      a.masks = nullptr;
      const PopFn fn = pop_fn(isa, s.mode, false);
      BATS_PHASE(3);
      if (last > first) {
        a.win = P + ((n * H + ih) * W + first * s.sw + s.ox) * PW_;
        a.pix_stride = s.sw * PW_;
        a.k_stride = G;
        a.n_pix = last - first;
        a.acc = acc + first * aw_ + s.o0;
        fn(a);
      }
      if (last < OW) {
        TORCH_CHECK(s.fill_ones, "1x1 window outside the input");
        a.win = ones_.data(); a.pix_stride = 0; a.k_stride = G; a.n_pix = OW - last;
        a.acc = acc + last * aw_ + s.o0;
        fn(a);
      }
      if (s.o0 == 0) for (int64_t ow = 0; ow < OW; ++ow) vb[ow] = int32_t(s.cg);
      return;
    }
    // Windows as rows [k][ow][g]: for each window word, the whole output row is contiguous.
    const int64_t nw = s.nw, kst = OW * G;
#ifdef BATS_PHASE_TIMING
    auto tw = std::chrono::steady_clock::now();
#endif
    std::fill(win, win + OW * nw * G, 0);
    std::fill(masks, masks + OW * nw, 0);
    if (s.layout == STRIP) {
      int32_t rows = 0;
      for (int64_t i = 0; i < s.kh; ++i) {
        const int64_t ih = oh * s.sh - s.ph + i * s.dh;
        if (ih < 0 || ih >= H) continue;
        ++rows;
        const u64* srow = strips + (n * H + ih) * OW * s.rw * G;
        if (s.rw == 1) {
          const int64_t k = i / s.rpw, shift = (i % s.rpw) * s.S;
          const u64* __restrict src = srow;
          u64* __restrict d = win + k * kst;
          for (int64_t q = 0; q < kst; ++q) d[q] |= src[q] << shift;
          for (int64_t ow = 0; ow < OW; ++ow) masks[ow * nw + k] |= cmask[ow] << shift;
        } else {
          for (int64_t seg = 0; seg < s.rw; ++seg) {
            const int64_t k = i * s.rw + seg;
            u64* __restrict d = win + k * kst;
            for (int64_t ow = 0; ow < OW; ++ow) {
              std::memcpy(d + ow * G, srow + (ow * s.rw + seg) * G, sizeof(u64) * G);
              masks[ow * nw + k] = cmask[ow * s.rw + seg];
            }
          }
        }
      }
      for (int64_t ow = 0; ow < OW; ++ow) vb[ow] = int32_t(s.cg) * rows * ccount[ow];
#ifdef BATS_PHASE_TIMING
      g_phase[2] += std::chrono::duration<double>(std::chrono::steady_clock::now() - tw).count();
#endif
    } else {  // FIELD: fw words per tap
      for (int64_t ow = 0; ow < OW; ++ow) {
        int32_t taps = 0;
        for (int64_t i = 0; i < s.kh; ++i) {
          const int64_t ih = oh * s.sh - s.ph + i * s.dh;
          if (ih < 0 || ih >= H) continue;
          for (int64_t j = 0; j < s.kw; ++j) {
            const int64_t iw = ow * s.sw - s.pw + j * s.dw;
            if (iw < 0 || iw >= W) continue;
            ++taps;
            const int64_t k0 = (i * s.kw + j) * s.fw;
            const u64* src = P + ((n * H + ih) * W + iw) * PW_;
            for (int64_t f = 0; f < s.fw; ++f) {
              std::memcpy(win + (k0 + f) * kst + ow * G, src + f * G, sizeof(u64) * G);
              masks[ow * nw + k0 + f] = ~u64(0);
            }
          }
        }
        vb[ow] = int32_t(s.cg) * taps;
      }
    }
    a.win = win; a.pix_stride = G; a.k_stride = kst; a.n_pix = OW; a.masks = masks; a.acc = acc + s.o0;
    BATS_PHASE(3);
    pop_fn(isa, s.mode, true)(a);
  }

  int64_t C_, O_ = 0, G_ = 1, cg_ = 0, fw_ = 1, PW_ = 1, aw_ = 0;
  int act_;
  std::vector<float> thr_, sgn_, scale_, slope_, shift_in_, shift_out_;
  std::vector<Sub> subs_;
  std::vector<int64_t> ex_idx_, ex_sh_, ex_shl_;
  std::vector<u64> ones_;
};

// ---- max pooling (a cell op), channels-last ---------------------------------------------

namespace {

// One output row: o[ow][c] = max over the window, scanned row by row, a value taken when greater
// or NaN (torch.max_pool2d's rule), padding skipped. src points at the image (H x W x C).
struct PoolRow {
  const float* src; float* dst;
  int64_t C, W, OW, ih0, ih1, stride, pad, k;
};

void max_pool_row_portable(const PoolRow& r) {
  for (int64_t ow = 0; ow < r.OW; ++ow) {
    const int64_t iw0 = std::max<int64_t>(0, ow * r.stride - r.pad);
    const int64_t iw1 = std::min<int64_t>(r.W, ow * r.stride - r.pad + r.k);
    float* __restrict o = r.dst + ow * r.C;
    for (int64_t c = 0; c < r.C; ++c) o[c] = -std::numeric_limits<float>::infinity();
    for (int64_t ih = r.ih0; ih < r.ih1; ++ih)
      for (int64_t iw = iw0; iw < iw1; ++iw) {
        const float* __restrict v = r.src + (ih * r.W + iw) * r.C;
        for (int64_t c = 0; c < r.C; ++c) {
          const float a = v[c];
          o[c] = ((a > o[c]) | (a != a)) ? a : o[c];
        }
      }
  }
}

#if BATS_X86
BATS_AVX512 void max_pool_row_avx512(const PoolRow& r) {
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t ow = 0; ow < r.OW; ++ow) {
    const int64_t iw0 = std::max<int64_t>(0, ow * r.stride - r.pad);
    const int64_t iw1 = std::min<int64_t>(r.W, ow * r.stride - r.pad + r.k);
    float* o = r.dst + ow * r.C;
    for (int64_t c = 0; c < r.C; c += 16) {
      const __mmask16 lm = r.C - c >= 16 ? __mmask16(0xffff) : __mmask16((1u << (r.C - c)) - 1);
      __m512 m = ninf;
      for (int64_t ih = r.ih0; ih < r.ih1; ++ih)
        for (int64_t iw = iw0; iw < iw1; ++iw) {
          const __m512 v = _mm512_maskz_loadu_ps(lm, r.src + (ih * r.W + iw) * r.C + c);
          const __mmask16 take = _mm512_cmp_ps_mask(v, m, _CMP_GT_OQ) | _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
          m = _mm512_mask_mov_ps(m, take, v);
        }
      _mm512_mask_storeu_ps(o + c, lm, m);
    }
  }
}
#endif

}  // namespace

// Same values as torch.max_pool2d (dilation 1, floor mode) for a channels-last input. PyTorch's
// kernel also computes the argmax indices and, with 36-144 channels, costs as much as a binary
// layer here.
torch::Tensor max_pool_nhwc(torch::Tensor x, int64_t k, int64_t stride, int64_t pad) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == torch::kFloat && x.device().is_cpu(),
              "x must be a 4-d float32 CPU tensor");
  TORCH_CHECK(k >= 1 && stride >= 1 && pad >= 0 && 2 * pad <= k, "bad pooling geometry");
  auto xc = x.contiguous(at::MemoryFormat::ChannelsLast);
  const int64_t N = xc.size(0), C = xc.size(1), H = xc.size(2), W = xc.size(3);
  const int64_t OH = (H + 2 * pad - k) / stride + 1, OW = (W + 2 * pad - k) / stride + 1;
  TORCH_CHECK(OH > 0 && OW > 0, "input smaller than the pooling window");
  auto out = torch::empty({N, C, OH, OW},
                          torch::TensorOptions().dtype(torch::kFloat).memory_format(at::MemoryFormat::ChannelsLast));
  const float* src = xc.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  void (*row_fn)(const PoolRow&) = max_pool_row_portable;
#if BATS_X86
  if (active_isa() == AVX512) row_fn = max_pool_row_avx512;
#endif
  at::parallel_for(0, N * OH, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, OW * C * k)),
                   [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const int64_t n = r / OH, oh = r % OH;
      PoolRow row;
      row.src = src + n * H * W * C; row.dst = dst + (n * OH + oh) * OW * C;
      row.C = C; row.W = W; row.OW = OW; row.stride = stride; row.pad = pad; row.k = k;
      row.ih0 = std::max<int64_t>(0, oh * stride - pad);
      row.ih1 = std::min<int64_t>(H, oh * stride - pad + k);
      row_fn(row);
    }
  });
  return out;
}

// ---- SIMD path, and the popcount peak of this machine ------------------------------------

std::vector<std::string> simd_paths() {
  std::vector<std::string> out;
  for (int isa : {AVX512, AVX2, PORTABLE}) if (isa_supported(isa)) out.push_back(ISA_NAMES[isa]);
  return out;
}

std::string simd_path() { return ISA_NAMES[active_isa()]; }

std::string set_simd(const std::string& name) {
  const std::string previous = simd_path();
  if (name.empty() || name == "auto") { g_isa.store(best_isa()); return previous; }
  for (int isa : {AVX512, AVX2, PORTABLE}) {
    if (name == ISA_NAMES[isa]) {
      TORCH_CHECK(isa_supported(isa), "this CPU cannot run the ", name, " path");
      g_isa.store(isa);
      return previous;
    }
  }
  TORCH_CHECK(false, "unknown SIMD path '", name, "'; choose auto, avx512-vpopcntdq, avx2 or portable");
  return previous;
}

namespace {

// XOR + popcount + accumulate over an L1-resident buffer, 8 independent chains: the most binary
// multiply-accumulates per second the path can do (64 per word). Returns words processed.
constexpr int64_t PEAK_WORDS = 512;  // 4 KiB

u64 peak_loop_portable(const u64* buf, int64_t reps, u64 x) {
  u64 a[8] = {0};
  for (int64_t r = 0; r < reps; ++r)
    for (int64_t i = 0; i < PEAK_WORDS; i += 8)
      for (int j = 0; j < 8; ++j) a[j] += __builtin_popcountll(buf[i + j] ^ x);
  u64 s = 0;
  for (int j = 0; j < 8; ++j) s += a[j];
  return s;
}

#if BATS_X86
BATS_AVX2 u64 peak_loop_avx2(const u64* buf, int64_t reps, u64 x) {
  const __m256i xv = _mm256_set1_epi64x(int64_t(x)), zero = _mm256_setzero_si256();
  __m256i total = zero;
  for (int64_t r = 0; r < reps; ++r) {
    __m256i b0 = zero, b1 = zero, b2 = zero, b3 = zero;
    // 128 words per pass: 8 words per byte lane at most, far below 255.
    for (int64_t i = 0; i < PEAK_WORDS; i += 16) {
      auto ld = [&](int64_t k) { return _mm256_xor_si256(xv, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(buf + i + k))); };
      b0 = _mm256_add_epi8(b0, popcnt_bytes_avx2(ld(0)));
      b1 = _mm256_add_epi8(b1, popcnt_bytes_avx2(ld(4)));
      b2 = _mm256_add_epi8(b2, popcnt_bytes_avx2(ld(8)));
      b3 = _mm256_add_epi8(b3, popcnt_bytes_avx2(ld(12)));
      if ((i & 127) == 112) {
        total = _mm256_add_epi64(total, _mm256_sad_epu8(b0, zero));
        total = _mm256_add_epi64(total, _mm256_sad_epu8(b1, zero));
        total = _mm256_add_epi64(total, _mm256_sad_epu8(b2, zero));
        total = _mm256_add_epi64(total, _mm256_sad_epu8(b3, zero));
        b0 = b1 = b2 = b3 = zero;
      }
    }
  }
  alignas(32) u64 out[4];
  _mm256_store_si256(reinterpret_cast<__m256i*>(out), total);
  return out[0] + out[1] + out[2] + out[3];
}

BATS_AVX512 u64 peak_loop_avx512(const u64* buf, int64_t reps, u64 x) {
  const __m512i xv = _mm512_set1_epi64(int64_t(x));
  __m512i a[8];
  for (int j = 0; j < 8; ++j) a[j] = _mm512_setzero_si512();
  for (int64_t r = 0; r < reps; ++r)
    for (int64_t i = 0; i < PEAK_WORDS; i += 64)
      for (int j = 0; j < 8; ++j)
        a[j] = _mm512_add_epi64(a[j], _mm512_popcnt_epi64(_mm512_xor_si512(xv, _mm512_loadu_si512(buf + i + 8 * j))));
  __m512i s = a[0];
  for (int j = 1; j < 8; ++j) s = _mm512_add_epi64(s, a[j]);
  return u64(_mm512_reduce_add_epi64(s));
}
#endif

u64 peak_loop(int isa, const u64* buf, int64_t reps, u64 x) {
#if BATS_X86
  if (isa == AVX512) return peak_loop_avx512(buf, reps, x);
  if (isa == AVX2) return peak_loop_avx2(buf, reps, x);
#endif
  return peak_loop_portable(buf, reps, x);
}

std::atomic<u64> g_sink{0};

}  // namespace

// Binary multiply-accumulates per second (64 per XORed word) of the active path's XOR + popcount
// + add loop on L1-resident data, on `threads` threads at once (each runs `seconds`).
double popcount_peak(double seconds, int64_t threads) {
  const int isa = active_isa();
  threads = std::max<int64_t>(1, threads);
  std::vector<double> rate(threads, 0.0);
  at::parallel_for(0, threads, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      std::vector<u64> buf(PEAK_WORDS);
      u64 v = 0x9E3779B97F4A7C15ull + u64(t);
      for (auto& b : buf) { v ^= v << 13; v ^= v >> 7; v ^= v << 17; b = v; }
      using clock = std::chrono::steady_clock;
      int64_t reps = 64, done = 0;
      u64 sink = 0;
      sink += peak_loop(isa, buf.data(), 16, v);  // warm up
      const auto start = clock::now();
      double elapsed = 0.0;
      while (elapsed < seconds) {
        sink += peak_loop(isa, buf.data(), reps, v + u64(done));
        done += reps;
        elapsed = std::chrono::duration<double>(clock::now() - start).count();
        if (elapsed < seconds / 8) reps *= 2;
      }
      g_sink.fetch_add(sink, std::memory_order_relaxed);
      rate[t] = double(done) * double(PEAK_WORDS) * 64.0 / elapsed;
    }
  });
  double total = 0.0;
  for (double r : rate) total += r;
  return total;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "bats bitwise engine: binary layers as XNOR + popcount with folded BatchNorm thresholds";
  // module_local: a second load of the same library (a cleared loader cache) registers it again.
  pybind11::class_<BinaryLayer>(m, "BinaryLayer", pybind11::module_local())
      .def(pybind11::init<int64_t, torch::Tensor, torch::Tensor, std::vector<torch::Tensor>,
                          std::vector<std::vector<int64_t>>, torch::Tensor, int64_t, torch::Tensor,
                          c10::optional<torch::Tensor>, c10::optional<torch::Tensor>>(),
           pybind11::arg("in_channels"), pybind11::arg("thresholds"), pybind11::arg("signs"),
           pybind11::arg("weights"), pybind11::arg("params"), pybind11::arg("scale"),
           pybind11::arg("act"), pybind11::arg("slope"),
           pybind11::arg("shift_in") = pybind11::none(), pybind11::arg("shift_out") = pybind11::none())
      .def("forward", &BinaryLayer::forward, pybind11::arg("x"),
           pybind11::arg("residual") = pybind11::none(), pybind11::arg("add") = pybind11::none())
      .def("describe", &BinaryLayer::describe)
      .def_property_readonly("out_channels", &BinaryLayer::out_channels);
  m.def("max_pool_nhwc", &max_pool_nhwc, "torch.max_pool2d's values for a channels-last input",
        pybind11::arg("x"), pybind11::arg("kernel_size"), pybind11::arg("stride"), pybind11::arg("padding"));
  m.def("simd_paths", &simd_paths, "SIMD popcount paths this CPU can run, best first");
  m.def("simd_path", &simd_path, "the SIMD popcount path in use");
  m.def("set_simd", &set_simd, "choose the SIMD path (auto, avx512-vpopcntdq, avx2, portable); "
        "returns the previous one", pybind11::arg("name"));
#ifdef BATS_PHASE_TIMING
  m.def("phase_times", []() {
    std::vector<double> v(g_phase, g_phase + 6);
    for (double& d : g_phase) d = 0;
    return v;
  });
#endif
  m.def("popcount_peak", &popcount_peak, "binary MAC/s of the active path's XOR + popcount loop",
        pybind11::arg("seconds") = 0.2, pybind11::arg("threads") = 1);
}
