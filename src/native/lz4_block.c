/*
 * LZ4 block format, compressor and decompressor. See lz4_block.h for the
 * contract; the format itself, in short:
 *
 *   A block is a list of sequences. A sequence is a token byte (high nibble:
 *   literal count, low nibble: match length minus 4; 15 in either means more
 *   length bytes follow, each added, until one is not 255), the literals, a
 *   2-byte little-endian offset (1 to 65535 bytes back into the output) and
 *   the match length bytes. The last sequence has literals only and ends the
 *   block. Its last 5 bytes are literals, and the last match starts at least
 *   12 bytes before the end, so that fast decoders may copy in wide words.
 */
#include "lz4_block.h"

#include <string.h>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "lz4_block.c counts matching bytes with little-endian word loads"
#endif

enum {
  match_bytes_min = 4,
  /* End-of-block rules of the format (see the header comment). */
  last_literal_bytes = 5,
  last_match_start_margin = 12,
  offset_max = 65535,
  /* A length nibble of 15 means that length bytes follow. */
  nibble_max = 15,
  /* Hash table of 2^bits 32-bit positions, 4 KiB for small inputs and up to
   * 16 KiB, which stays in the L1 cache. (64 KiB finds 3 % more matches on
   * mixed data but compresses a third slower.) */
  hash_bits_min = 10,
  hash_bits_max = 12,
  /* After every 2^skip_shift probes without a match the search step grows by
   * one byte, so that incompressible data is crossed quickly; it falls back
   * to 1 at the next match. */
  skip_shift = 6,
  /* Width of the speculative copies of the decompressor. */
  wild_copy_bytes = 16,
};

static inline uint32_t load32(const uint8_t *p) {
  uint32_t value;
  memcpy(&value, p, sizeof(value));
  return value;
}

static inline uint64_t load64(const uint8_t *p) {
  uint64_t value;
  memcpy(&value, p, sizeof(value));
  return value;
}

/* Multiplicative hashing of the 4 bytes at p (the least a match needs), or of
 * 5: on large inputs 5 bytes spread binary data over the table better and find
 * about 1 % more, on small ones 4 find more. Reads 8 bytes for 5. */
static inline uint32_t hash_at(const uint8_t *p, unsigned bits, unsigned hash_bytes) {
  if (hash_bytes == 5) return (uint32_t)(((load64(p) << 24) * 0x9E3779B97F4A7C15ull) >> (64 - bits));
  return (load32(p) * 2654435761u) >> (32 - bits);
}

/* Number of equal bytes at `p` and `m` (m < p), reading p no further than `limit`. */
static inline size_t count_equal(const uint8_t *p, const uint8_t *m, const uint8_t *limit) {
  const uint8_t *start = p;
  while (p + 8 <= limit) {
    uint64_t difference = load64(p) ^ load64(m);
    if (difference != 0) return (size_t)(p - start) + ((size_t)__builtin_ctzll(difference) >> 3);
    p += 8;
    m += 8;
  }
  while (p < limit && *p == *m) {
    p++;
    m++;
  }
  return (size_t)(p - start);
}

/* Writes the length bytes that follow a nibble of 15: `rest` is the length
 * minus 15, as runs of 255 and a final byte below 255. */
static inline uint8_t *write_length_rest(uint8_t *op, size_t rest) {
  if (rest >= 255) {
    size_t full = rest / 255;
    memset(op, 255, full);
    op += full;
    rest -= full * 255;
  }
  *op++ = (uint8_t)rest;
  return op;
}

/* Bytes that a length (of literals, or of a match minus 4) takes after its nibble. */
static inline size_t length_rest_bytes(size_t length) { return length < nibble_max ? 0 : (length - nibble_max) / 255 + 1; }

size_t lz4_block_compress_bound(size_t source_bytes) { return source_bytes + source_bytes / 255 + 16; }

/* Copies literals in 8-byte words when the target has room for the overrun
 * (the source always has: literals end at least 12 bytes before its end). */
static inline uint8_t *copy_literals(uint8_t *op, const uint8_t *anchor, size_t literal_bytes, const uint8_t *oend) {
  if ((size_t)(oend - op) >= literal_bytes + 8) {
    for (size_t i = 0; i < literal_bytes; i += 8) memcpy(op + i, anchor + i, 8);
  } else {
    memcpy(op, anchor, literal_bytes);
  }
  return op + literal_bytes;
}

/* The compressor, specialised below for 4- and 5-byte hashing. */
static inline __attribute__((always_inline)) size_t compress(const uint8_t *source, size_t source_bytes,
                                                             uint8_t *target, size_t target_bytes,
                                                             unsigned hash_bytes) {
  const uint8_t *const iend = source + source_bytes;
  const uint8_t *anchor = source; /* first byte not yet emitted */
  uint8_t *op = target;
  uint8_t *const oend = target + target_bytes;

  if (source_bytes > last_match_start_margin) {
    unsigned bits = hash_bits_min;
    while (bits < hash_bits_max && ((size_t)1 << bits) < source_bytes) bits++;
    uint32_t table[(size_t)1 << hash_bits_max];
    /* Every slot starts as position 0, a real position: a wrong candidate only
     * costs a comparison. */
    memset(table, 0, sizeof(table[0]) << bits);
    /* A match may start at p only while p + 12 <= end, and must end by end - 5. */
    const uint8_t *const match_start_last = iend - last_match_start_margin;
    const uint8_t *const match_end_limit = iend - last_literal_bytes;
    const uint8_t *ip = source + 1;

    for (;;) {
      /* Search. The hash of the next position is computed before the current
       * candidate is compared, so that the two overlap in the pipeline. Here
       * ip <= match_start_last, and every step keeps it so. */
      const uint8_t *match;
      const uint8_t *next = ip;
      uint32_t next_slot = hash_at(next, bits, hash_bytes);
      uint32_t probes = 1u << skip_shift;
      do {
        uint32_t slot = next_slot;
        ip = next;
        size_t step = probes++ >> skip_shift;
        if (step > (size_t)(match_start_last - ip)) goto last_literals;
        next = ip + step;
        match = source + table[slot];
        next_slot = hash_at(next, bits, hash_bytes);
        table[slot] = (uint32_t)(ip - source);
      } while ((size_t)(ip - match) > offset_max || load32(match) != load32(ip));

      /* Grow the match backwards over literals not yet emitted. */
      while (ip > anchor && match > source && ip[-1] == match[-1]) {
        ip--;
        match--;
      }
      size_t match_rest = count_equal(ip + match_bytes_min, match + match_bytes_min, match_end_limit);
      size_t literal_bytes = (size_t)(ip - anchor);
      size_t sequence_bytes = 1 + length_rest_bytes(literal_bytes) + literal_bytes + 2 + length_rest_bytes(match_rest);
      if (sequence_bytes > (size_t)(oend - op)) return 0;

      uint8_t *token = op++;
      uint8_t nibbles;
      if (literal_bytes >= nibble_max) {
        nibbles = nibble_max << 4;
        op = write_length_rest(op, literal_bytes - nibble_max);
      } else {
        nibbles = (uint8_t)(literal_bytes << 4);
      }
      op = copy_literals(op, anchor, literal_bytes, oend);
      size_t offset = (size_t)(ip - match);
      op[0] = (uint8_t)offset;
      op[1] = (uint8_t)(offset >> 8);
      op += 2;
      if (match_rest >= nibble_max) {
        nibbles |= nibble_max;
        op = write_length_rest(op, match_rest - nibble_max);
      } else {
        nibbles |= (uint8_t)match_rest;
      }
      *token = nibbles;

      ip += match_bytes_min + match_rest;
      anchor = ip;
      if (ip > match_start_last) break;
      /* Remember a position inside the match, so that a repetition of what
       * follows it is found too. */
      table[hash_at(ip - 2, bits, hash_bytes)] = (uint32_t)(ip - 2 - source);
    }
  }

last_literals: {
  size_t literal_bytes = (size_t)(iend - anchor);
  if (1 + length_rest_bytes(literal_bytes) + literal_bytes > (size_t)(oend - op)) return 0;
  if (literal_bytes >= nibble_max) {
    *op++ = nibble_max << 4;
    op = write_length_rest(op, literal_bytes - nibble_max);
  } else {
    *op++ = (uint8_t)(literal_bytes << 4);
  }
  memcpy(op, anchor, literal_bytes);
  op += literal_bytes;
  return (size_t)(op - target);
}
}

/* Inputs above this size hash 5 bytes (see hash_at). */
static const size_t wide_hash_source_bytes_min = (size_t)64 << 10;

size_t lz4_block_compress(const uint8_t *source, size_t source_bytes, uint8_t *target, size_t target_bytes) {
  if (source_bytes > LZ4_BLOCK_INPUT_BYTES_MAX) return 0;
  if (source_bytes > wide_hash_source_bytes_min) return compress(source, source_bytes, target, target_bytes, 5);
  return compress(source, source_bytes, target, target_bytes, 4);
}

/* Reads the length bytes that follow a nibble of 15 at p and adds them to
 * *length. Returns the position after them, or NULL when the input ends
 * first. Each byte adds at most 255 and is consumed, so the sum cannot
 * overflow. */
static inline const uint8_t *read_length_rest(const uint8_t *p, const uint8_t *iend, size_t *length) {
  size_t sum = *length;
  unsigned more;
  do {
    if (p >= iend) return NULL;
    more = *p++;
    sum += more;
  } while (more == 255);
  *length = sum;
  return p;
}

/*
 * Decompression runs in two loops. The fast loop decodes while both buffers
 * have room for whole 16-byte copies past the end of each sequence; it calls
 * no library function, so that its cursors stay in registers. When a sequence
 * does not fit (or is malformed) it stops at that sequence's start, and the
 * exact loop decodes the rest byte-precisely and names any error.
 */
typedef struct {
  const uint8_t *ip;
  uint8_t *op;
} cursors;

static cursors decompress_fast(const uint8_t *ip, const uint8_t *iend, uint8_t *op, const uint8_t *oend,
                               const uint8_t *target) {
  /* At the top of the loop at least 32 input and 64 output bytes remain, so a
   * short sequence (fewer than 15 literals, a match of at most 18 bytes) needs
   * no further room checks for its fixed 16- and 24-byte copies. */
  while (iend - ip >= 2 * wild_copy_bytes && oend - op >= 4 * wild_copy_bytes) {
    const uint8_t *const sequence_ip = ip;
    uint8_t *const sequence_op = op;
    unsigned token = *ip++;
    size_t literal_bytes = token >> 4;
    if (literal_bytes != nibble_max) {
      memcpy(op, ip, wild_copy_bytes);
    } else {
      ip = read_length_rest(ip, iend, &literal_bytes);
      if (ip == NULL) goto stop;
      /* Room for the literals rounded up to 16 bytes, then 16 input bytes for
       * the offset and the next token and 64 output bytes as above. */
      if ((size_t)(iend - ip) < literal_bytes + wild_copy_bytes ||
          (size_t)(oend - op) < literal_bytes + 4 * wild_copy_bytes)
        goto stop;
      size_t i = 0;
      do {
        memcpy(op + i, ip + i, wild_copy_bytes);
        i += wild_copy_bytes;
      } while (i < literal_bytes);
    }
    op += literal_bytes;
    ip += literal_bytes;

    size_t offset = (size_t)ip[0] | (size_t)ip[1] << 8;
    ip += 2;
    /* offset - 1 wraps for 0, so this also refuses an offset of 0. */
    if (offset - 1 >= (size_t)(op - target)) goto stop;
    const uint8_t *match = op - offset;
    size_t match_bytes = token & nibble_max;
    if (match_bytes != nibble_max) {
      match_bytes += match_bytes_min;
      if (offset >= 8) {
        /* Three 8-byte copies, each from at least 8 bytes back: none reads what
         * it writes. (Narrower loads than 16 bytes are more often forwarded
         * straight from the recent stores they read, which measured faster.) */
        memcpy(op, match, 8);
        memcpy(op + 8, match + 8, 8);
        memcpy(op + 16, match + 16, 8);
        op += match_bytes;
        continue;
      }
    } else {
      ip = read_length_rest(ip, iend, &match_bytes);
      if (ip == NULL) goto stop;
      match_bytes += match_bytes_min;
      if ((size_t)(oend - op) < match_bytes + wild_copy_bytes) goto stop;
      if (offset >= wild_copy_bytes) {
        size_t i = 0;
        do {
          memcpy(op + i, match + i, wild_copy_bytes);
          i += wild_copy_bytes;
        } while (i < match_bytes);
        op += match_bytes;
        continue;
      }
    }
    /* An overlapping match repeats the last `offset` bytes. Build 16 bytes one
     * at a time, then copy from the smallest multiple of the period at least
     * 16 bytes back, which holds the same bytes without overlap. */
    for (size_t i = 0; i < wild_copy_bytes; i++) op[i] = match[i];
    size_t stride = offset * ((wild_copy_bytes + offset - 1) / offset);
    for (size_t i = wild_copy_bytes; i < match_bytes; i += wild_copy_bytes)
      memcpy(op + i, op + i - stride, wild_copy_bytes);
    op += match_bytes;
    continue;
  stop:
    return (cursors){sequence_ip, sequence_op};
  }
  return (cursors){ip, op};
}

/* Copies a match exactly (no byte written past op + length). For an
 * overlapping match each copy takes everything from the match start to the
 * write position, a multiple of the period long, so source and destination
 * never overlap and the copies double in size. */
static void copy_match_exact(uint8_t *op, size_t offset, size_t length) {
  const uint8_t *match = op - offset;
  if (offset == 1) {
    /* A run of one byte (runs of zeros end most blocks of a zeroed disk). */
    memset(op, *match, length);
    return;
  }
  for (size_t done = 0; done < length;) {
    size_t chunk = done + offset;
    if (chunk > length - done) chunk = length - done;
    memcpy(op + done, match, chunk);
    done += chunk;
  }
}

int64_t lz4_block_decompress(const uint8_t *source, size_t source_bytes, uint8_t *target, size_t target_bytes,
                             size_t *error_position) {
  const uint8_t *const iend = source + source_bytes;
  const uint8_t *const oend = target + target_bytes;
  cursors at = decompress_fast(source, iend, target, oend, target);
  const uint8_t *ip = at.ip;
  uint8_t *op = at.op;
  int64_t error;

  /* The exact loop. Each pass starts at a sequence. */
  for (;;) {
    if (ip == iend) {
      /* No sequence starts at the end of the input: either the input is empty
       * or the previous sequence ended with a match. */
      error = source_bytes == 0 ? LZ4_BLOCK_ERROR_EMPTY_INPUT : LZ4_BLOCK_ERROR_ENDS_WITH_MATCH;
      goto fail;
    }
    unsigned token = *ip++;
    size_t literal_bytes = token >> 4;
    if (literal_bytes == nibble_max) {
      const uint8_t *after = read_length_rest(ip, iend, &literal_bytes);
      if (after == NULL) {
        error = LZ4_BLOCK_ERROR_TRUNCATED;
        goto fail;
      }
      ip = after;
    }
    if (literal_bytes > (size_t)(iend - ip)) {
      error = LZ4_BLOCK_ERROR_TRUNCATED;
      goto fail;
    }
    if (literal_bytes > (size_t)(oend - op)) {
      error = LZ4_BLOCK_ERROR_OUTPUT_FULL;
      goto fail;
    }
    memcpy(op, ip, literal_bytes);
    op += literal_bytes;
    ip += literal_bytes;
    if (ip == iend) break; /* the last sequence: literals only */

    if (iend - ip < 2) {
      error = LZ4_BLOCK_ERROR_TRUNCATED;
      goto fail;
    }
    size_t offset = (size_t)ip[0] | (size_t)ip[1] << 8;
    if (offset == 0) {
      error = LZ4_BLOCK_ERROR_OFFSET_ZERO;
      goto fail;
    }
    if (offset > (size_t)(op - target)) {
      error = LZ4_BLOCK_ERROR_OFFSET_BEFORE;
      goto fail;
    }
    ip += 2;
    size_t match_bytes = token & nibble_max;
    if (match_bytes == nibble_max) {
      const uint8_t *after = read_length_rest(ip, iend, &match_bytes);
      if (after == NULL) {
        error = LZ4_BLOCK_ERROR_TRUNCATED;
        goto fail;
      }
      ip = after;
    }
    match_bytes += match_bytes_min;
    if (match_bytes > (size_t)(oend - op)) {
      error = LZ4_BLOCK_ERROR_OUTPUT_FULL;
      goto fail;
    }
    copy_match_exact(op, offset, match_bytes);
    op += match_bytes;
  }
  return (int64_t)(op - target);

fail:
  if (error_position != NULL) *error_position = (size_t)(ip - source);
  return error;
}

const char *lz4_block_error_text(int64_t code) {
  switch (code) {
    case LZ4_BLOCK_ERROR_TRUNCATED: return "the input ends inside a sequence";
    case LZ4_BLOCK_ERROR_OUTPUT_FULL: return "a sequence would write past the end of the output";
    case LZ4_BLOCK_ERROR_OFFSET_ZERO: return "a match has offset 0";
    case LZ4_BLOCK_ERROR_OFFSET_BEFORE: return "a match offset reaches before the start of the output";
    case LZ4_BLOCK_ERROR_ENDS_WITH_MATCH: return "the block ends with a match instead of literals";
    case LZ4_BLOCK_ERROR_EMPTY_INPUT: return "the input is empty (an empty block is one zero byte)";
    default: return "unknown error";
  }
}
