// Internal to gemm_kernels.h: AMX bf16 tile kernels (tdpbf16ps) for fast-mode bf16 weights. The
// packed bf16 layout is AMX's B operand as stored: k-range [k0, k0 + 32) of a 16-row block is one
// contiguous 1 KB tile of 16 k pairs x 64 bytes, so B tiles load straight from the weight.
//
// NOTE (tile state): the tile configuration is per thread. run_tiles_amx loads it at its start
// (and when the row count of its 32-row groups changes) and releases the tiles before it
// returns, so no thread is left holding tile state between tasks, and the AVX-512 paths that may
// run next on the same thread see none. Everything here is inline assembly, so no function needs
// an AMX target attribute; the assembler (binutils >= 2.34) knows the mnemonics.
#pragma once

#if EXPERTD_GEMM_X86

namespace expertd::gemm {

// Palette 1 tile configuration (ldtilecfg's 64-byte operand).
struct alignas(64) AmxConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};
static_assert(sizeof(AmxConfig) == 64, "ldtilecfg reads 64 bytes");

// Tile numbers are immediates of the encoding, hence macros. Loads and stores clobber memory:
// the tail copies below are written just before a load reads them, and the compiler must not
// sink or drop those writes (the asm names only the base pointer).
#define EXPERTD_TILE_LOAD(t, base, stride_bytes)                                      \
  __asm__ volatile("tileloadd (%0,%1,1), %%tmm" #t ::"r"(static_cast<const void*>(base)), \
                   "r"(static_cast<long>(stride_bytes))                                \
                   : "memory")
#define EXPERTD_TILE_STORE(t, base, stride_bytes)                                      \
  __asm__ volatile("tilestored %%tmm" #t ", (%0,%1,1)" ::"r"(static_cast<void*>(base)), \
                   "r"(static_cast<long>(stride_bytes))                                 \
                   : "memory")
#define EXPERTD_TILE_ZERO(t) __asm__ volatile("tilezero %%tmm" #t ::)
// c += a * b over bf16 pairs (AT&T order: b, a, c).
#define EXPERTD_TILE_DPBF16(c, a, b) __asm__ volatile("tdpbf16ps %%tmm" #b ", %%tmm" #a ", %%tmm" #c ::)

inline void amx_load_config(const AmxConfig& cfg) {
  __asm__ volatile("ldtilecfg %0" ::"m"(cfg) : "memory");
}
inline void amx_release() { __asm__ volatile("tilerelease" ::: "memory"); }

constexpr int kAmxK = 32;             // k per tile step (16 bf16 pairs)
constexpr int kAmxTileElems = 512;    // bf16 elements of one B tile (16 pairs x 16 columns x 2)
constexpr size_t kAmxRowBytes = 64;   // bytes of a tile row
constexpr int kAmxRows = 32;          // rows of x per tile group (two A tiles)
constexpr int kAmxWideBlocks = 4;     // blocks per group with one A tile (mr <= 16)

// Few rows stream each B tile from memory once: a tile load that misses waits out the memory
// latency with its tile register busy, so the B tiles kAmxPrefetchSteps steps ahead are fetched
// early (prefetches past a block's end touch the next block or nothing: they never fault).
// Into L1 (prefetcht0): measured on one core of this project's Xeon (bench/native/amx-tiles.cc,
// m = 1, 4096 x 4096 from DRAM, a loaded machine), 4 steps ahead matched vdpbf16ps within the
// noise where none was ~10% behind, and prefetcht1 / prefetchnta were slower still.
constexpr int kAmxPrefetchSteps = 4;
template <int NB>
inline void amx_prefetch_b(const uint16_t* w, size_t wstride) {
  for (int i = 0; i < NB; ++i)
    for (int l = 0; l < 16; ++l)
      __builtin_prefetch(reinterpret_cast<const uint8_t*>(w + i * wstride) + l * 64, 0, 3);
}

// One tile group: mr <= 16 rows of x (A = tmm4) against nb <= 4 blocks (C = tmm0..3, B loads
// rotate over tmm5..7), or 16 < mr <= 32 rows (A = tmm4, tmm5) against nb <= 2 blocks (B = tmm6,
// tmm7; C = tmm0, tmm1 for rows 0..15 and tmm2, tmm3 for rows 16..). The configuration loaded by
// amx_config(mr) matches. a: bf16 rows, lda_bytes apart; w: block 0 of the group, wstride
// elements between blocks; ksteps whole 32-k steps, then (if a_tail) one more step from the
// zero-padded copies a_tail ([32][32] bf16) and b_tail ([nb][512] bf16). Writes the C tiles to
// stage (rows kTileLd floats apart, block i at column 16 i).
//
// NOTE (determinism): each output element accumulates its own k steps in order (step s after
// step s - 1, the tail last), whatever mr and nb are: rows of a tile never mix, so a row's
// result does not depend on which rows share its tile or its group.
template <int NB>
inline void amx_wide(const uint16_t* a, size_t lda_bytes, const uint16_t* w, size_t wstride,
                     int ksteps, const uint16_t* a_tail, const uint16_t* b_tail, float* stage) {
  static_assert(NB >= 1 && NB <= kAmxWideBlocks, "1 to 4 blocks");
  EXPERTD_TILE_ZERO(0);
  if constexpr (NB > 1) EXPERTD_TILE_ZERO(1);
  if constexpr (NB > 2) EXPERTD_TILE_ZERO(2);
  if constexpr (NB > 3) EXPERTD_TILE_ZERO(3);
  for (int s = 0; s < ksteps; ++s) {
    const size_t off = static_cast<size_t>(s) * kAmxTileElems;
    amx_prefetch_b<NB>(w + off + kAmxPrefetchSteps * kAmxTileElems, wstride);
    EXPERTD_TILE_LOAD(4, a + static_cast<size_t>(s) * kAmxK, lda_bytes);
    EXPERTD_TILE_LOAD(5, w + off, kAmxRowBytes);
    EXPERTD_TILE_DPBF16(0, 4, 5);
    if constexpr (NB > 1) {
      EXPERTD_TILE_LOAD(6, w + wstride + off, kAmxRowBytes);
      EXPERTD_TILE_DPBF16(1, 4, 6);
    }
    if constexpr (NB > 2) {
      EXPERTD_TILE_LOAD(7, w + 2 * wstride + off, kAmxRowBytes);
      EXPERTD_TILE_DPBF16(2, 4, 7);
    }
    if constexpr (NB > 3) {
      EXPERTD_TILE_LOAD(5, w + 3 * wstride + off, kAmxRowBytes);
      EXPERTD_TILE_DPBF16(3, 4, 5);
    }
  }
  if (a_tail) {
    EXPERTD_TILE_LOAD(4, a_tail, kAmxRowBytes);
    EXPERTD_TILE_LOAD(5, b_tail, kAmxRowBytes);
    EXPERTD_TILE_DPBF16(0, 4, 5);
    if constexpr (NB > 1) {
      EXPERTD_TILE_LOAD(6, b_tail + kAmxTileElems, kAmxRowBytes);
      EXPERTD_TILE_DPBF16(1, 4, 6);
    }
    if constexpr (NB > 2) {
      EXPERTD_TILE_LOAD(7, b_tail + 2 * kAmxTileElems, kAmxRowBytes);
      EXPERTD_TILE_DPBF16(2, 4, 7);
    }
    if constexpr (NB > 3) {
      EXPERTD_TILE_LOAD(5, b_tail + 3 * kAmxTileElems, kAmxRowBytes);
      EXPERTD_TILE_DPBF16(3, 4, 5);
    }
  }
  constexpr size_t ld = kTileLd * sizeof(float);
  EXPERTD_TILE_STORE(0, stage, ld);
  if constexpr (NB > 1) EXPERTD_TILE_STORE(1, stage + 16, ld);
  if constexpr (NB > 2) EXPERTD_TILE_STORE(2, stage + 32, ld);
  if constexpr (NB > 3) EXPERTD_TILE_STORE(3, stage + 48, ld);
}

template <int NB>
inline void amx_tall(const uint16_t* a, size_t lda_bytes, const uint16_t* w, size_t wstride,
                     int ksteps, const uint16_t* a_tail, const uint16_t* b_tail, float* stage) {
  static_assert(NB == 1 || NB == 2, "1 or 2 blocks");
  const uint16_t* a1 = reinterpret_cast<const uint16_t*>(reinterpret_cast<const uint8_t*>(a) +
                                                         16 * lda_bytes);
  EXPERTD_TILE_ZERO(0);
  EXPERTD_TILE_ZERO(2);
  if constexpr (NB > 1) {
    EXPERTD_TILE_ZERO(1);
    EXPERTD_TILE_ZERO(3);
  }
  for (int s = 0; s < ksteps; ++s) {
    const size_t off = static_cast<size_t>(s) * kAmxTileElems;
    EXPERTD_TILE_LOAD(4, a + static_cast<size_t>(s) * kAmxK, lda_bytes);
    EXPERTD_TILE_LOAD(5, a1 + static_cast<size_t>(s) * kAmxK, lda_bytes);
    EXPERTD_TILE_LOAD(6, w + off, kAmxRowBytes);
    EXPERTD_TILE_DPBF16(0, 4, 6);
    EXPERTD_TILE_DPBF16(2, 5, 6);
    if constexpr (NB > 1) {
      EXPERTD_TILE_LOAD(7, w + wstride + off, kAmxRowBytes);
      EXPERTD_TILE_DPBF16(1, 4, 7);
      EXPERTD_TILE_DPBF16(3, 5, 7);
    }
  }
  if (a_tail) {
    EXPERTD_TILE_LOAD(4, a_tail, kAmxRowBytes);
    EXPERTD_TILE_LOAD(5, a_tail + 16 * kAmxK, kAmxRowBytes);
    EXPERTD_TILE_LOAD(6, b_tail, kAmxRowBytes);
    EXPERTD_TILE_DPBF16(0, 4, 6);
    EXPERTD_TILE_DPBF16(2, 5, 6);
    if constexpr (NB > 1) {
      EXPERTD_TILE_LOAD(7, b_tail + kAmxTileElems, kAmxRowBytes);
      EXPERTD_TILE_DPBF16(1, 4, 7);
      EXPERTD_TILE_DPBF16(3, 5, 7);
    }
  }
  constexpr size_t ld = kTileLd * sizeof(float);
  EXPERTD_TILE_STORE(0, stage, ld);
  EXPERTD_TILE_STORE(2, stage + 16 * kTileLd, ld);
  if constexpr (NB > 1) {
    EXPERTD_TILE_STORE(1, stage + 16, ld);
    EXPERTD_TILE_STORE(3, stage + 16 * kTileLd + 16, ld);
  }
}

// The configuration of a tile group of mr rows (1..32), as amx_wide / amx_tall use the tiles.
inline AmxConfig amx_config(int mr) {
  AmxConfig c;
  for (int t = 0; t < 8; ++t) c.colsb[t] = kAmxRowBytes;
  const uint8_t lo = static_cast<uint8_t>(std::min(mr, 16));
  const uint8_t hi = static_cast<uint8_t>(mr > 16 ? mr - 16 : 16);
  if (mr <= 16) {
    c.rows[0] = c.rows[1] = c.rows[2] = c.rows[3] = c.rows[4] = lo;  // C0..3, A
    c.rows[5] = c.rows[6] = c.rows[7] = 16;                          // B
  } else {
    c.rows[0] = c.rows[1] = c.rows[4] = 16;  // C of rows 0..15, A0
    c.rows[2] = c.rows[3] = c.rows[5] = hi;  // C of rows 16.., A1
    c.rows[6] = c.rows[7] = 16;              // B0, B1
  }
  return c;
}

// run_tiles for Path::Amx: x holds bf16 rows (ld elements apart, at least w.kp used); hands
// epi(row, mr, block, nr, tile) tiles of up to 32 rows and 4 blocks (2 when more than 16 rows;
// gate/up pairs stay together as the chunk starts are multiples of kNr), rows kTileLd floats apart.
// A k tail (Kp not a multiple of 32) runs one more step over zero-padded copies of the last
// columns of x and of each block, so nothing past the weight's allocation or a row is read.
template <class Epi>
inline void run_tiles_amx(Act x, int rows, const PackedWeight& w, int b0, int b1,
                          const Epi& epi) {
  alignas(64) float stage[kAmxRows * kTileLd];
  alignas(64) uint16_t a_tail[kAmxRows * kAmxK];
  alignas(64) uint16_t b_tail[kAmxWideBlocks * kAmxTileElems];
  const int kp = w.k_even();
  const int ksteps = kp / kAmxK;
  const int k0 = ksteps * kAmxK, tail = kp - k0;  // tail: even, 0..30
  const uint16_t* wbase = static_cast<const uint16_t*>(w.ptr());
  const size_t wstride = static_cast<size_t>(16) * w.kp;
  const uint16_t* xa = static_cast<const uint16_t*>(x.data);
  const size_t lda_bytes = x.ld * sizeof(uint16_t);
  int configured = 0;
  for (int r = 0; r < rows; r += kAmxRows) {
    const int mr = std::min(kAmxRows, rows - r);
    if (mr != configured) {
      amx_load_config(amx_config(mr));
      configured = mr;
    }
    const uint16_t* ar = xa + static_cast<size_t>(r) * x.ld;
    if (tail) {
      std::memset(a_tail, 0, sizeof(a_tail));
      for (int i = 0; i < mr; ++i)
        std::memcpy(a_tail + i * kAmxK, ar + static_cast<size_t>(i) * x.ld + k0,
                    static_cast<size_t>(tail) * sizeof(uint16_t));
    }
    const bool wide = mr <= 16;
    const int step = wide ? kAmxWideBlocks : 2;
    for (int b = b0; b < b1; b += step) {
      const int nb = std::min(step, b1 - b);
      const uint16_t* wb = wbase + b * wstride;
      if (tail) {
        const size_t tail_elems = static_cast<size_t>(tail) * 16;  // tail / 2 pairs x 32
        for (int i = 0; i < nb; ++i) {
          uint16_t* bt = b_tail + i * kAmxTileElems;
          std::memcpy(bt, wb + i * wstride + static_cast<size_t>(k0) * 16, tail_elems * 2);
          std::memset(bt + tail_elems, 0, (kAmxTileElems - tail_elems) * 2);
        }
      }
      const uint16_t* at = tail ? a_tail : nullptr;
      if (wide) {
        switch (nb) {
          case 1: amx_wide<1>(ar, lda_bytes, wb, wstride, ksteps, at, b_tail, stage); break;
          case 2: amx_wide<2>(ar, lda_bytes, wb, wstride, ksteps, at, b_tail, stage); break;
          case 3: amx_wide<3>(ar, lda_bytes, wb, wstride, ksteps, at, b_tail, stage); break;
          default: amx_wide<4>(ar, lda_bytes, wb, wstride, ksteps, at, b_tail, stage); break;
        }
      } else if (nb == 1) {
        amx_tall<1>(ar, lda_bytes, wb, wstride, ksteps, at, b_tail, stage);
      } else {
        amx_tall<2>(ar, lda_bytes, wb, wstride, ksteps, at, b_tail, stage);
      }
      epi(r, mr, b, nb, stage);
    }
  }
  if (configured) amx_release();
}

}  // namespace expertd::gemm

#endif  // EXPERTD_GEMM_X86
