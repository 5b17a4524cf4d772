/* noetl_arrow.h: a small Arrow IPC *stream* reader and writer for flat schemas
 * (int64, int32, bool and utf8 columns, each with an optional validity bitmap).
 *
 * Stream = messages, each `0xFFFFFFFF, int32 metadata length, flatbuffer Message
 * (padded to 8), body`, ending with `0xFFFFFFFF 0x00000000`: exactly what
 * pyarrow.ipc.new_stream writes. The first message is a Schema, then RecordBatch
 * messages. Dictionaries, compression, nested types and big-endian data are
 * refused with NOETL_E_UNSUPPORTED; anything malformed with NOETL_E_FORMAT or
 * NOETL_E_TRUNCATED. The reader checks every offset and length against the input
 * before it returns, so the accessors below need no checks for 0 <= i < length.
 */
#ifndef NOETL_ARROW_H
#define NOETL_ARROW_H

#include "noetl.h"

#define NA_MAX_FIELDS 64
#define NA_MAX_ROWS 0x7FFFFFFF

typedef enum { NA_INT64 = 1, NA_INT32 = 2, NA_BOOL = 3, NA_UTF8 = 4 } na_type;

typedef struct {
    na_type type;
    const uint8_t *name; /* UTF-8, not NUL-terminated */
    uint32_t name_len;
    bool nullable;
} na_field;

typedef struct {
    int64_t length;
    int64_t null_count;
    const uint8_t *validity; /* NULL: every value valid */
    const uint8_t *values;   /* int64/int32 values, bool bitmap, or utf8 bytes */
    const uint8_t *offsets;  /* utf8 only: length + 1 little-endian int32 */
} na_array;

typedef struct {
    const uint8_t *buf;
    uint32_t len;
    uint32_t pos;
    int nfields;
    na_field fields[NA_MAX_FIELDS];
} na_reader;

typedef struct {
    int64_t length;
    int ncols;
    na_array cols[NA_MAX_FIELDS];
} na_batch;

/* Read the stream's Schema message. 0 or a negative NOETL_E_* code. */
int na_read_schema(na_reader *r, const uint8_t *buf, uint32_t len);
/* The next RecordBatch: 1 when *out holds one, 0 at the end of the stream, or a negative code. */
int na_read_batch(na_reader *r, na_batch *out);
/* 0 when the reader's schema has exactly these names and types, in order; else NOETL_E_SCHEMA. */
int na_expect(const na_reader *r, const char *const *names, const na_type *types, int n);

static inline uint32_t na_u32(const uint8_t *p) {
    uint32_t v;
    __builtin_memcpy(&v, p, 4);
    return v;
}
static inline uint64_t na_u64(const uint8_t *p) {
    uint64_t v;
    __builtin_memcpy(&v, p, 8);
    return v;
}
static inline bool na_bit(const uint8_t *bitmap, int64_t i) { return (bitmap[i >> 3] >> (i & 7)) & 1; }
static inline bool na_valid(const na_array *a, int64_t i) { return a->validity == NULL || na_bit(a->validity, i); }
static inline int64_t na_i64(const na_array *a, int64_t i) { return (int64_t)na_u64(a->values + 8 * i); }
static inline int32_t na_i32(const na_array *a, int64_t i) { return (int32_t)na_u32(a->values + 4 * i); }
static inline bool na_bool(const na_array *a, int64_t i) { return na_bit(a->values, i); }
static inline const uint8_t *na_str(const na_array *a, int64_t i, uint32_t *len) {
    int32_t start = (int32_t)na_u32(a->offsets + 4 * i);
    int32_t end = (int32_t)na_u32(a->offsets + 4 * (i + 1));
    *len = (uint32_t)(end - start);
    return a->values + start;
}

/* A column being built: append values, then na_write_stream. Buffers grow by doubling. */
typedef struct {
    na_type type;
    const char *name; /* NUL-terminated */
    bool nullable;
    int64_t length;
    int64_t null_count;
    uint8_t *validity; /* allocated on the first null */
    uint32_t validity_cap;
    uint8_t *values;
    uint32_t values_len; /* bytes used (bool: bitmap bytes) */
    uint32_t values_cap;
    uint8_t *offsets; /* utf8: int32 offsets */
    uint32_t offsets_cap;
} na_column;

void na_column_init(na_column *c, const char *name, na_type type, bool nullable);
int na_append_i64(na_column *c, int64_t v);
int na_append_i32(na_column *c, int32_t v);
int na_append_bool(na_column *c, bool v);
int na_append_str(na_column *c, const uint8_t *s, uint32_t len);
int na_append_null(na_column *c); /* NOETL_E_SCHEMA when the column is not nullable */

/* Write schema + one record batch (every column must have the same length) + end of stream. */
int na_write_stream(const na_column *cols, int ncols, uint8_t **out, uint32_t *out_len);

#endif
