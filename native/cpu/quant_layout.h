// Internal to quantized weights: where the code of (row i, column c) of a 16-row block lives, for
// the packer (quant.cc write_block) and every kernel that decodes codes (gemm_kernels.h). The
// layouts are chosen so that the SIMD kernels' loads feed their dot products without shuffles:
//   I8  chunks of 4 k (64 bytes): byte 4i + j holds row i's column 4c4 + j, stored as the code
//       + 128 (i8_store: the two's complement byte xor 0x80), so one zmm is vpdpbusd's unsigned
//       operand as loaded (16 rows x 4 k, no permute, no flip per call); padding codes are 0x80.
//   F8  chunks of 4 k (64 bytes): 128-bit lane L holds rows 4L..4L+3; bytes 0-7 of the lane the
//       (k, k+1) pairs of those rows, bytes 8-15 the (k+2, k+3) pairs, so vpunpck{l,h}bw of a
//       chunk gives the two zmm of bf16 k pairs that vdpbf16ps wants, in row order. Each e4m3
//       code's bits are stored reordered (f8_store: s e0 m2 m1 m0 e3 e2 e1), see Bf16DotF8Tile.
//       Blocks are interleaved in groups of kF8Group (see f8_block_offset): per 4-k chunk the
//       group's blocks' 64 bytes lie side by side, so a register tile over a group reads one
//       sequential stream of codes.
//       NOTE: the sign bit of each row's scale of a (block, group) is a flag, set when any of the
//       row's codes in the group has exponent 0 (zero or subnormal; padding rows are set): F8
//       scales are read as their absolute value, and a kernel that decodes several rows at once
//       runs its exponent-0 fix-up where any of their flags is set.
//   I4, FP4  chunks of 8 k (64 bytes): byte 4i + j (j < 4) holds row i's column 8c8 + j in the
//       low nibble and column 8c8 + 4 + j in the high nibble, so the low and the high nibbles of
//       one zmm are each [16 rows][4 k], the operand form of vpdpbusd.
// kp that is not a multiple of the chunk (only for groups that are not multiples of 4 or 8, which
// --quantize and the checkpoint formats never make; the SIMD dot-product kernels are not used
// there) ends in a tail chunk of the old [k][16] form: I8 bytes [k][16], F8 pairs [2][16], 4-bit
// bytes [k][8] with row i in the low nibble of byte i and row i + 8 in the high one.
#pragma once
#include <cstddef>

#include "expertd/ops.h"

namespace expertd {

// An e4m3 code (s e3 e2 e1 e0 m2 m1 m0) as the F8 layout stores it (s e0 m2 m1 m0 e3 e2 e1), and
// back.
inline uint8_t f8_store(uint8_t c) {
  return static_cast<uint8_t>((c & 0x80) | ((c & 0x0f) << 3) | ((c >> 4) & 0x07));
}
inline uint8_t f8_load(uint8_t s) {
  return static_cast<uint8_t>((s & 0x80) | ((s & 0x07) << 4) | ((s >> 3) & 0x0f));
}
// The e4m3 code has exponent 0 (zero or a subnormal).
inline bool f8_exp0(uint8_t c) { return (c & 0x78) == 0; }

// An int8 code as the I8 layout stores it (code + 128), and back.
inline uint8_t i8_store(int8_t c) { return static_cast<uint8_t>(static_cast<uint8_t>(c) ^ 0x80); }
inline int8_t i8_load(uint8_t s) { return static_cast<int8_t>(s ^ 0x80); }

// F8 blocks are stored in groups of kF8Group consecutive blocks (4g .. 4g + 3; a matrix's last
// group holds the blocks left, its width): group g starts where its first block would (byte
// 4g x 16 kp), and chunk c (columns 4c .. 4c + 3) of its block j lies at c x 64 x width + 64 j.
// The CPU kernels' register tiles are kNr = kF8Group blocks and start on a multiple of kNr
// (plan_tasks), so a tile is one group and reads its codes as one stream: block j at 64 j from
// the tile's first byte, chunks 64 x nr apart. NOTE: measured on AMD Zen 4 (2 threads, the decode
// GroupGemm of 8 experts, weights from DRAM, bytes per second against bf16's in the same process,
// medians of 24-40 alternating reps): blocks apart (four streams 16 kp bytes apart) 0.74-0.86x at
// H 1024, I 256 and 0.90x at I 2816; interleaved 0.94x at both. int8's one-row kernel reads one
// stream by walking its blocks in turn, which fp8's f32 sums cannot (each block's k order is fixed
// by the row tiles, so the tile's four blocks are its four independent chains).
constexpr int kF8Group = 4;
constexpr size_t kChunk8 = 64;  // bytes of a 4-k chunk of a 16-row block (8-bit codes)
// Blocks in the group of block b of a matrix of nb blocks.
inline int f8_group_width(int b, int nb) {
  const int g0 = b / kF8Group * kF8Group;
  return nb - g0 < kF8Group ? nb - g0 : kF8Group;
}
// Byte offset of block b's first chunk from the matrix's first byte (kp columns).
inline size_t f8_block_offset(int b, int kp) {
  return static_cast<size_t>(b / kF8Group) * kF8Group * 16 * kp + static_cast<size_t>(b % kF8Group) * kChunk8;
}

// Byte offset from a block's first chunk of the code of row i (0..15) at column c, kp columns in
// the block; cstride: bytes between its chunks (I8: 64; F8: 64 x its group's width).
inline size_t code8_offset(QFormat q, int i, int c, int kp, size_t cstride = kChunk8) {
  const int c0 = c / 4 * 4, j = c % 4;
  if (q != QFormat::F8) {
    if (c0 + 4 > kp) return static_cast<size_t>(c) * 16 + i;  // tail columns
    return static_cast<size_t>(c0) * 16 + 4 * i + j;
  }
  const size_t chunk = static_cast<size_t>(c0 / 4) * cstride;
  if (c0 + 4 > kp) return chunk + 2 * i + j;  // tail pair
  return chunk + 16 * (i / 4) + (j >> 1) * 8 + 2 * (i % 4) + (j & 1);
}

// Byte offset and nibble shift (0 or 4) in a block of the 4-bit code of row i at column c.
inline size_t code4_offset(int i, int c, int kp, int* shift) {
  const int c0 = c / 8 * 8, j = c % 8;
  if (c0 + 8 > kp) {  // tail
    *shift = i < 8 ? 0 : 4;
    return static_cast<size_t>(c0) * 8 + static_cast<size_t>(j) * 8 + (i & 7);
  }
  *shift = j < 4 ? 0 : 4;
  return static_cast<size_t>(c0) * 8 + 4 * i + (j & 3);
}

}  // namespace expertd
