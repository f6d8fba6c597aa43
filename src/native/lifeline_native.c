/*
 * Small system calls that Node's fs module does not expose and that a block
 * server needs: lseek with SEEK_DATA / SEEK_HOLE (to report holes and to skip
 * them when reading), and fallocate with PUNCH_HOLE / ZERO_RANGE (to trim and
 * to write zeroes without sending or writing zero bytes).
 *
 * lseek is a metadata query answered from the inode, so it runs synchronously.
 * fallocate may touch many extents, so it runs on the libuv thread pool.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <node_api.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>
#include <nmmintrin.h>

#include "lz4_block.h"

#define CHECK(call)                                                        \
  do {                                                                     \
    if ((call) != napi_ok) {                                               \
      napi_throw_error(env, NULL, "lifeline_native: N-API call failed");   \
      return NULL;                                                         \
    }                                                                      \
  } while (0)

static napi_value make_errno_error(napi_env env, int code, const char *syscall) {
  napi_value message, error, code_value, syscall_value, errno_value;
  const char *text = strerror(code);
  napi_create_string_utf8(env, text, NAPI_AUTO_LENGTH, &message);
  napi_create_error(env, NULL, message, &error);
  napi_create_int32(env, code, &errno_value);
  napi_set_named_property(env, error, "errno", errno_value);
  napi_create_string_utf8(env, syscall, NAPI_AUTO_LENGTH, &syscall_value);
  napi_set_named_property(env, error, "syscall", syscall_value);
  const char *name = code == EOPNOTSUPP ? "EOPNOTSUPP"
                     : code == ENOSPC   ? "ENOSPC"
                     : code == EINVAL   ? "EINVAL"
                     : code == EBADF    ? "EBADF"
                     : code == EIO      ? "EIO"
                     : code == ENXIO    ? "ENXIO"
                                        : "ESYSCALL";
  napi_create_string_utf8(env, name, NAPI_AUTO_LENGTH, &code_value);
  napi_set_named_property(env, error, "code", code_value);
  return error;
}

/* seek(fd, offset, whence) where whence is 0 for SEEK_DATA and 1 for SEEK_HOLE.
 * Returns the resulting offset, or -1 when the kernel answers ENXIO (no data at
 * or after offset). Other errors throw. */
static napi_value seek(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3];
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  int32_t fd, which;
  int64_t offset;
  CHECK(napi_get_value_int32(env, argv[0], &fd));
  CHECK(napi_get_value_int64(env, argv[1], &offset));
  CHECK(napi_get_value_int32(env, argv[2], &which));
  off_t result = lseek(fd, (off_t)offset, which == 0 ? SEEK_DATA : SEEK_HOLE);
  napi_value out;
  if (result < 0) {
    if (errno == ENXIO) {
      CHECK(napi_create_int64(env, -1, &out));
      return out;
    }
    napi_throw(env, make_errno_error(env, errno, "lseek"));
    return NULL;
  }
  CHECK(napi_create_int64(env, (int64_t)result, &out));
  return out;
}

typedef struct {
  napi_async_work work;
  napi_ref callback;
  int fd;
  int mode;
  int64_t offset;
  int64_t length;
  int error;
} fallocate_job;

static void fallocate_execute(napi_env env, void *data) {
  (void)env;
  fallocate_job *job = data;
  int rc;
  do {
    rc = fallocate(job->fd, job->mode, (off_t)job->offset, (off_t)job->length);
  } while (rc < 0 && errno == EINTR);
  job->error = rc < 0 ? errno : 0;
}

static void fallocate_complete(napi_env env, napi_status status, void *data) {
  fallocate_job *job = data;
  napi_value callback, global, argv[1];
  napi_get_reference_value(env, job->callback, &callback);
  napi_get_global(env, &global);
  if (status != napi_ok) {
    napi_value message;
    napi_create_string_utf8(env, "fallocate was cancelled", NAPI_AUTO_LENGTH, &message);
    napi_create_error(env, NULL, message, &argv[0]);
  } else if (job->error != 0) {
    argv[0] = make_errno_error(env, job->error, "fallocate");
  } else {
    napi_get_null(env, &argv[0]);
  }
  napi_call_function(env, global, callback, 1, argv, NULL);
  napi_delete_reference(env, job->callback);
  napi_delete_async_work(env, job->work);
  free(job);
}

/* fallocate(fd, kind, offset, length, callback) where kind 0 punches a hole
 * (keeping the size), kind 1 zeroes a range (keeping the size) and kind 2
 * reserves the range's blocks. */
static napi_value do_fallocate(napi_env env, napi_callback_info info) {
  size_t argc = 5;
  napi_value argv[5];
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  fallocate_job *job = calloc(1, sizeof(*job));
  if (job == NULL) {
    napi_throw_error(env, NULL, "lifeline_native: out of memory");
    return NULL;
  }
  int32_t kind;
  CHECK(napi_get_value_int32(env, argv[0], &job->fd));
  CHECK(napi_get_value_int32(env, argv[1], &kind));
  CHECK(napi_get_value_int64(env, argv[2], &job->offset));
  CHECK(napi_get_value_int64(env, argv[3], &job->length));
  job->mode = kind == 0   ? FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
              : kind == 1 ? FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE
                          : 0; /* kind 2: reserve blocks (and extend) */
  CHECK(napi_create_reference(env, argv[4], 1, &job->callback));
  napi_value name;
  CHECK(napi_create_string_utf8(env, "lifeline:fallocate", NAPI_AUTO_LENGTH, &name));
  CHECK(napi_create_async_work(env, NULL, name, fallocate_execute, fallocate_complete, job,
                               &job->work));
  CHECK(napi_queue_async_work(env, job->work));
  return NULL;
}


/* CRC-32C (Castagnoli), the checksum of iSCSI, ext4 and fio's crc32c verify.
 * Uses the SSE4.2 crc32 instruction when the CPU has it (several GB/s), else a
 * table. Chained: crc32c(b, crc32c(a, 0)) == crc32c(a ++ b, 0). */
static uint32_t crc32c_table[256];

static void crc32c_table_init(void) {
  for (uint32_t i = 0; i < 256; i++) {
    uint32_t c = i;
    for (int k = 0; k < 8; k++) c = c & 1 ? (c >> 1) ^ 0x82F63B78u : c >> 1;
    crc32c_table[i] = c;
  }
}

static uint32_t crc32c_portable(uint32_t crc, const uint8_t *p, size_t n) {
  crc = ~crc;
  while (n--) crc = crc32c_table[(crc ^ *p++) & 0xff] ^ (crc >> 8);
  return ~crc;
}

__attribute__((target("sse4.2"))) static uint32_t crc32c_hardware(uint32_t crc, const uint8_t *p, size_t n) {
  uint64_t c = ~crc & 0xffffffffu;
  while (n && ((uintptr_t)p & 7)) {
    c = _mm_crc32_u8((uint32_t)c, *p++);
    n--;
  }
  while (n >= 8) {
    uint64_t word;
    memcpy(&word, p, 8);
    c = _mm_crc32_u64(c, word);
    p += 8;
    n -= 8;
  }
  while (n--) c = _mm_crc32_u8((uint32_t)c, *p++);
  return ~(uint32_t)c;
}

static int crc32c_has_hardware = 0;

/* crc32c(buffer, seed) */
static napi_value crc32c(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  void *data;
  size_t length;
  CHECK(napi_get_buffer_info(env, argv[0], &data, &length));
  uint32_t seed = 0;
  if (argc > 1) CHECK(napi_get_value_uint32(env, argv[1], &seed));
  uint32_t result = crc32c_has_hardware ? crc32c_hardware(seed, data, length) : crc32c_portable(seed, data, length);
  napi_value out;
  CHECK(napi_create_uint32(env, result, &out));
  return out;
}

/* readCached(fd, buffer, position) reads what the page cache already holds,
 * without waiting for the disk (preadv2 with RWF_NOWAIT). Returns the bytes
 * read (possibly fewer than asked, 0 at end of file), or -1 when the first
 * byte is not cached or the kernel cannot answer without blocking; the caller
 * then reads the rest on the thread pool. */
static napi_value read_cached(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3];
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  int32_t fd;
  int64_t position;
  void *data;
  size_t length;
  CHECK(napi_get_value_int32(env, argv[0], &fd));
  CHECK(napi_get_buffer_info(env, argv[1], &data, &length));
  CHECK(napi_get_value_int64(env, argv[2], &position));
  struct iovec iov = {.iov_base = data, .iov_len = length};
  ssize_t got;
  do {
    got = preadv2(fd, &iov, 1, (off_t)position, RWF_NOWAIT);
  } while (got < 0 && errno == EINTR);
  napi_value out;
  if (got < 0) {
    if (errno == EAGAIN || errno == EOPNOTSUPP || errno == ENOSYS) {
      CHECK(napi_create_int64(env, -1, &out));
      return out;
    }
    napi_throw(env, make_errno_error(env, errno, "preadv2"));
    return NULL;
  }
  CHECK(napi_create_int64(env, (int64_t)got, &out));
  return out;
}

/* setSocketBuffers(fd, bytes) asks for send and receive buffers of `bytes` on a
 * socket, so large replies leave in fewer writes with fewer wake-ups of the peer.
 * Returns the send buffer size the kernel granted. */
static napi_value set_socket_buffers(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  int32_t fd, bytes;
  CHECK(napi_get_value_int32(env, argv[0], &fd));
  CHECK(napi_get_value_int32(env, argv[1], &bytes));
  if (setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &bytes, sizeof(bytes)) < 0 ||
      setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &bytes, sizeof(bytes)) < 0) {
    napi_throw(env, make_errno_error(env, errno, "setsockopt"));
    return NULL;
  }
  int granted = 0;
  socklen_t size = sizeof(granted);
  getsockopt(fd, SOL_SOCKET, SO_SNDBUF, &granted, &size);
  napi_value out;
  CHECK(napi_create_int32(env, granted, &out));
  return out;
}

/* LZ4 block compression for replication batches (the codec is lz4_block.c).
 * All four run synchronously on the calling thread: a batch of a few MiB
 * takes a few milliseconds, less than a hop to the thread pool would save. */

static int ranges_overlap(const uint8_t *a, size_t a_bytes, const uint8_t *b, size_t b_bytes) {
  return a < b + b_bytes && b < a + a_bytes;
}

/* lz4CompressBound(sourceBytes) */
static napi_value lz4_compress_bound(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  int64_t source_bytes;
  CHECK(napi_get_value_int64(env, argv[0], &source_bytes));
  if (source_bytes < 0 || (uint64_t)source_bytes > LZ4_BLOCK_INPUT_BYTES_MAX) {
    napi_throw_range_error(env, "ERR_OUT_OF_RANGE", "lz4CompressBound: the size must be from 0 to 1 GiB");
    return NULL;
  }
  napi_value out;
  CHECK(napi_create_int64(env, (int64_t)lz4_block_compress_bound((size_t)source_bytes), &out));
  return out;
}

/* Compresses source into target; throws when the input is too large or the
 * two overlap, returns 0 when the result does not fit in target. */
static napi_value lz4_compress_into(napi_env env, const uint8_t *source, size_t source_bytes, napi_value target_value) {
  void *target;
  size_t target_bytes;
  CHECK(napi_get_buffer_info(env, target_value, &target, &target_bytes));
  if (source_bytes > LZ4_BLOCK_INPUT_BYTES_MAX) {
    napi_throw_range_error(env, "ERR_OUT_OF_RANGE", "Cannot compress with LZ4 as the input is larger than 1 GiB");
    return NULL;
  }
  if (ranges_overlap(source, source_bytes, target, target_bytes)) {
    napi_throw_range_error(env, "ERR_INVALID_ARG_VALUE", "Cannot compress with LZ4 as the source and target buffers overlap");
    return NULL;
  }
  size_t written = lz4_block_compress(source, source_bytes, target, target_bytes);
  napi_value out;
  CHECK(napi_create_int64(env, (int64_t)written, &out));
  return out;
}

/* lz4Compress(source, target): bytes written, 0 when they do not fit. */
static napi_value lz4_compress(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  void *source;
  size_t source_bytes;
  CHECK(napi_get_buffer_info(env, argv[0], &source, &source_bytes));
  return lz4_compress_into(env, source, source_bytes, argv[1]);
}

/* lz4CompressChunks(chunks, target[, scratch]): one block of the chunks'
 * concatenation, so that matches reach across chunks. The chunks are gathered
 * first (memcpy runs an order of magnitude faster than compression): into
 * `scratch` when given, at least their total size, which spares a caller that
 * reuses it the page faults of fresh memory on every call; else into a
 * temporary buffer. */
static napi_value lz4_compress_chunks(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3];
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  uint32_t count;
  CHECK(napi_get_array_length(env, argv[0], &count));
  napi_value element;
  void *data;
  size_t bytes, total_bytes = 0;
  for (uint32_t i = 0; i < count; i++) {
    CHECK(napi_get_element(env, argv[0], i, &element));
    CHECK(napi_get_buffer_info(env, element, &data, &bytes));
    total_bytes += bytes;
    if (total_bytes > LZ4_BLOCK_INPUT_BYTES_MAX) {
      napi_throw_range_error(env, "ERR_OUT_OF_RANGE", "Cannot compress with LZ4 as the chunks add up to more than 1 GiB");
      return NULL;
    }
  }
  if (count == 1) {
    CHECK(napi_get_element(env, argv[0], 0, &element));
    CHECK(napi_get_buffer_info(env, element, &data, &bytes));
    return lz4_compress_into(env, data, bytes, argv[1]);
  }
  napi_valuetype scratch_type = napi_undefined;
  if (argc > 2) CHECK(napi_typeof(env, argv[2], &scratch_type));
  uint8_t *gathered;
  int owned = scratch_type == napi_undefined;
  if (owned) {
    gathered = malloc(total_bytes > 0 ? total_bytes : 1);
    if (gathered == NULL) {
      napi_throw_error(env, NULL, "lifeline_native: out of memory");
      return NULL;
    }
  } else {
    void *scratch;
    size_t scratch_bytes;
    CHECK(napi_get_buffer_info(env, argv[2], &scratch, &scratch_bytes));
    if (scratch_bytes < total_bytes) {
      napi_throw_range_error(env, "ERR_OUT_OF_RANGE", "Cannot compress with LZ4 as the scratch buffer is smaller than the chunks");
      return NULL;
    }
    gathered = scratch;
  }
  const char *failure = NULL;
  size_t at = 0;
  for (uint32_t i = 0; i < count && failure == NULL; i++) {
    if (napi_get_element(env, argv[0], i, &element) != napi_ok ||
        napi_get_buffer_info(env, element, &data, &bytes) != napi_ok || bytes > total_bytes - at) {
      failure = "Cannot compress with LZ4 as the chunks changed while being gathered";
    } else if (ranges_overlap(data, bytes, gathered, total_bytes)) {
      failure = "Cannot compress with LZ4 as a chunk overlaps the scratch buffer";
    } else {
      memcpy(gathered + at, data, bytes);
      at += bytes;
    }
  }
  napi_value out = NULL;
  if (failure != NULL) {
    napi_throw_range_error(env, "ERR_INVALID_ARG_VALUE", failure);
  } else {
    out = lz4_compress_into(env, gathered, at, argv[1]);
  }
  if (owned) free(gathered);
  return out;
}

/* lz4Decompress(source, target): bytes produced. Malformed input throws an
 * Error with code ERR_LZ4_MALFORMED, `reason` and `position` (input byte). */
static napi_value lz4_decompress(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  CHECK(napi_get_cb_info(env, info, &argc, argv, NULL, NULL));
  void *source, *target;
  size_t source_bytes, target_bytes;
  CHECK(napi_get_buffer_info(env, argv[0], &source, &source_bytes));
  CHECK(napi_get_buffer_info(env, argv[1], &target, &target_bytes));
  if (ranges_overlap(source, source_bytes, target, target_bytes)) {
    napi_throw_range_error(env, "ERR_INVALID_ARG_VALUE", "Cannot decompress LZ4 as the source and target buffers overlap");
    return NULL;
  }
  size_t position = 0;
  int64_t produced = lz4_block_decompress(source, source_bytes, target, target_bytes, &position);
  napi_value out;
  if (produced < 0) {
    char text[256];
    snprintf(text, sizeof(text), "Cannot decompress LZ4 block as it is malformed: %s (at input byte %zu of %zu, output limit %zu bytes)",
             lz4_block_error_text(produced), position, source_bytes, target_bytes);
    napi_value message, code, error, reason, at;
    CHECK(napi_create_string_utf8(env, text, NAPI_AUTO_LENGTH, &message));
    CHECK(napi_create_string_utf8(env, "ERR_LZ4_MALFORMED", NAPI_AUTO_LENGTH, &code));
    CHECK(napi_create_error(env, code, message, &error));
    CHECK(napi_create_string_utf8(env, lz4_block_error_text(produced), NAPI_AUTO_LENGTH, &reason));
    CHECK(napi_set_named_property(env, error, "reason", reason));
    CHECK(napi_create_int64(env, (int64_t)position, &at));
    CHECK(napi_set_named_property(env, error, "position", at));
    napi_throw(env, error);
    return NULL;
  }
  CHECK(napi_create_int64(env, produced, &out));
  return out;
}

static napi_value init(napi_env env, napi_value exports) {
  napi_value fn;
  crc32c_table_init();
  __builtin_cpu_init();
  crc32c_has_hardware = __builtin_cpu_supports("sse4.2");
  CHECK(napi_create_function(env, "readCached", NAPI_AUTO_LENGTH, read_cached, NULL, &fn));
  CHECK(napi_set_named_property(env, exports, "readCached", fn));
  CHECK(napi_create_function(env, "setSocketBuffers", NAPI_AUTO_LENGTH, set_socket_buffers, NULL, &fn));
  CHECK(napi_set_named_property(env, exports, "setSocketBuffers", fn));
  CHECK(napi_create_function(env, "crc32c", NAPI_AUTO_LENGTH, crc32c, NULL, &fn));
  CHECK(napi_set_named_property(env, exports, "crc32c", fn));
  CHECK(napi_create_function(env, "seek", NAPI_AUTO_LENGTH, seek, NULL, &fn));
  CHECK(napi_set_named_property(env, exports, "seek", fn));
  CHECK(napi_create_function(env, "fallocate", NAPI_AUTO_LENGTH, do_fallocate, NULL, &fn));
  CHECK(napi_set_named_property(env, exports, "fallocate", fn));
  CHECK(napi_create_function(env, "lz4CompressBound", NAPI_AUTO_LENGTH, lz4_compress_bound, NULL, &fn));
  CHECK(napi_set_named_property(env, exports, "lz4CompressBound", fn));
  CHECK(napi_create_function(env, "lz4Compress", NAPI_AUTO_LENGTH, lz4_compress, NULL, &fn));
  CHECK(napi_set_named_property(env, exports, "lz4Compress", fn));
  CHECK(napi_create_function(env, "lz4CompressChunks", NAPI_AUTO_LENGTH, lz4_compress_chunks, NULL, &fn));
  CHECK(napi_set_named_property(env, exports, "lz4CompressChunks", fn));
  CHECK(napi_create_function(env, "lz4Decompress", NAPI_AUTO_LENGTH, lz4_decompress, NULL, &fn));
  CHECK(napi_set_named_property(env, exports, "lz4Decompress", fn));
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
