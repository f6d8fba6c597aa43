/*
 * LZ4 block format (no frame, no checksum, no size prefix): a compressor with a
 * greedy hash-table matcher and a decompressor that checks every length and
 * offset, because its input arrives from the network.
 *
 * Written from the format description (lz4/lz4 doc/lz4_Block_format.md); the
 * output decodes with any conformant LZ4 block decoder and this decoder reads
 * any conformant block.
 */
#ifndef LIFELINE_LZ4_BLOCK_H
#define LIFELINE_LZ4_BLOCK_H

#include <stddef.h>
#include <stdint.h>

/* Largest input the compressor accepts. Positions are kept as 32-bit numbers
 * in the hash table; a replication batch is far smaller than this. */
#define LZ4_BLOCK_INPUT_BYTES_MAX ((size_t)1 << 30)

/* Errors of lz4_block_decompress, always negative. */
#define LZ4_BLOCK_ERROR_TRUNCATED (-1)       /* input ends inside a sequence */
#define LZ4_BLOCK_ERROR_OUTPUT_FULL (-2)     /* a sequence would write past the end of the output */
#define LZ4_BLOCK_ERROR_OFFSET_ZERO (-3)     /* a match offset of 0 */
#define LZ4_BLOCK_ERROR_OFFSET_BEFORE (-4)   /* a match offset reaching before the start of the output */
#define LZ4_BLOCK_ERROR_ENDS_WITH_MATCH (-5) /* the block does not end with a literal run */
#define LZ4_BLOCK_ERROR_EMPTY_INPUT (-6)     /* zero bytes of input (an empty block is one zero token) */

/* Worst-case compressed size of `source_bytes` bytes (every byte a literal). */
size_t lz4_block_compress_bound(size_t source_bytes);

/* Compresses source[0, source_bytes) into target[0, target_bytes). Returns the
 * compressed size, or 0 when it would not fit in target_bytes (or the input is
 * larger than LZ4_BLOCK_INPUT_BYTES_MAX). Never writes past target_bytes; a
 * target of lz4_block_compress_bound(source_bytes) always fits. A target
 * smaller than the source makes incompressible input stop early. The bytes of
 * target past the returned length may have been overwritten. Deterministic:
 * the same input gives the same block. */
size_t lz4_block_compress(const uint8_t *source, size_t source_bytes, uint8_t *target, size_t target_bytes);

/* Decompresses one block. Returns the number of bytes produced, or one of the
 * negative LZ4_BLOCK_ERROR_* codes. Never reads past source_bytes nor writes
 * past target_bytes, whatever the input; the bytes of target past the returned
 * length may have been overwritten. */
int64_t lz4_block_decompress(const uint8_t *source, size_t source_bytes, uint8_t *target, size_t target_bytes,
                             size_t *error_position);

/* A short English description of an error code. */
const char *lz4_block_error_text(int64_t code);

#endif
