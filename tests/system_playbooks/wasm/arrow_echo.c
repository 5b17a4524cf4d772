/* Test guest for the SDK's Arrow reader and writer: reads every batch of the input stream and writes
 * one stream with the same schema and the rows of all batches. Built with -DTRANSFORM it also changes
 * each valid value (int64 + 1, int32 * 2, bool negated, utf8 repeated twice); nulls stay null.
 * A refused input returns the reader's error code. */
#include "noetl_arrow.h"

static const char *names[NA_MAX_FIELDS];

static int copy_value(na_column *c, const na_array *a, int64_t i) {
    if (!na_valid(a, i)) {
        return na_append_null(c);
    }
    switch (c->type) {
    case NA_INT64:
#ifdef TRANSFORM
        return na_append_i64(c, (int64_t)((uint64_t)na_i64(a, i) + 1));
#else
        return na_append_i64(c, na_i64(a, i));
#endif
    case NA_INT32:
#ifdef TRANSFORM
        return na_append_i32(c, (int32_t)((uint32_t)na_i32(a, i) * 2));
#else
        return na_append_i32(c, na_i32(a, i));
#endif
    case NA_BOOL:
#ifdef TRANSFORM
        return na_append_bool(c, !na_bool(a, i));
#else
        return na_append_bool(c, na_bool(a, i));
#endif
    default: {
        uint32_t len;
        const uint8_t *s = na_str(a, i, &len);
#ifdef TRANSFORM
        uint8_t *twice = alloc(2 * len);
        if (twice == NULL) {
            return NOETL_E_NOMEM;
        }
        memcpy(twice, s, len);
        memcpy(twice + len, s, len);
        return na_append_str(c, twice, 2 * len);
#else
        return na_append_str(c, s, len);
#endif
    }
    }
}

int64_t run(int32_t ptr, int32_t len) {
    static na_reader reader;
    static na_batch batch;
    static na_column cols[NA_MAX_FIELDS];
    int rc = na_read_schema(&reader, (const uint8_t *)(uintptr_t)ptr, (uint32_t)len);
    if (rc < 0) {
        return noetl_fail(rc);
    }
    for (int f = 0; f < reader.nfields; f++) {
        char *name = alloc(reader.fields[f].name_len + 1);
        if (name == NULL) {
            return noetl_fail(NOETL_E_NOMEM);
        }
        memcpy(name, reader.fields[f].name, reader.fields[f].name_len);
        name[reader.fields[f].name_len] = 0;
        names[f] = name;
        na_column_init(&cols[f], name, reader.fields[f].type, reader.fields[f].nullable);
    }
    while ((rc = na_read_batch(&reader, &batch)) == 1) {
        for (int f = 0; f < batch.ncols; f++) {
            for (int64_t i = 0; i < batch.length; i++) {
                int err = copy_value(&cols[f], &batch.cols[f], i);
                if (err < 0) {
                    return noetl_fail(err);
                }
            }
        }
    }
    if (rc < 0) {
        return noetl_fail(rc);
    }
    uint8_t *out;
    uint32_t out_len;
    rc = na_write_stream(cols, reader.nfields, &out, &out_len);
    return rc < 0 ? noetl_fail(rc) : noetl_output(out, out_len);
}
