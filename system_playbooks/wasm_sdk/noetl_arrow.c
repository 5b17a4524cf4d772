/* noetl_arrow.c: the Arrow IPC stream reader and writer (see noetl_arrow.h).
 *
 * Reading: flatbuffers are parsed by hand, every offset checked against the message before it is
 * followed. Writing: flatbuffers are built front to back: a table is written before the objects it
 * refers to (uoffsets must point forward), each table right after its vtable, every field in its own
 * 8-byte aligned slot, so the output passes Arrow's flatbuffer verifier (alignment included). */
#include "noetl_arrow.h"

#define TRY(expr)                                                                                                      \
    do {                                                                                                               \
        int rc_ = (expr);                                                                                              \
        if (rc_ < 0) {                                                                                                 \
            return rc_;                                                                                                \
        }                                                                                                              \
    } while (0)

enum { MSG_SCHEMA = 1, MSG_DICTIONARY = 2, MSG_RECORD_BATCH = 3 };
enum { TYPE_INT = 2, TYPE_UTF8 = 5, TYPE_BOOL = 6 };

typedef struct {
    const uint8_t *b;
    uint32_t n;
    uint32_t t;
    uint32_t vt;
    uint32_t vtsize;
    uint32_t tsize;
} fb_table;

static uint32_t u16(const uint8_t *p) { return (uint32_t)p[0] | ((uint32_t)p[1] << 8); }

static int fb_open(const uint8_t *b, uint32_t n, uint64_t t, fb_table *f) {
    if (t + 4 > n) {
        return NOETL_E_FORMAT;
    }
    int64_t vt = (int64_t)t - (int32_t)na_u32(b + t);
    if (vt < 0 || (uint64_t)vt + 4 > n) {
        return NOETL_E_FORMAT;
    }
    f->b = b;
    f->n = n;
    f->t = (uint32_t)t;
    f->vt = (uint32_t)vt;
    f->vtsize = u16(b + vt);
    f->tsize = u16(b + vt + 2);
    if (f->vtsize < 4 || (f->vtsize & 1) || (uint64_t)f->vt + f->vtsize > n || f->tsize < 4 || t + f->tsize > n) {
        return NOETL_E_FORMAT;
    }
    return 0;
}

/* Absolute position of field `slot` (size bytes), 0 when absent. */
static int fb_slot(const fb_table *f, uint32_t slot, uint32_t size, uint32_t *at) {
    uint32_t entry = 4 + 2 * slot;
    *at = 0;
    if (entry + 2 > f->vtsize) {
        return 0;
    }
    uint32_t off = u16(f->b + f->vt + entry);
    if (off == 0) {
        return 0;
    }
    if (off < 4 || off + size > f->tsize) {
        return NOETL_E_FORMAT;
    }
    *at = f->t + off;
    return 1;
}

static int fb_uint(const fb_table *f, uint32_t slot, uint32_t size, uint64_t dflt, uint64_t *v) {
    uint32_t at;
    int rc = fb_slot(f, slot, size, &at);
    *v = dflt;
    if (rc <= 0) {
        return rc;
    }
    uint64_t x = 0;
    for (uint32_t i = 0; i < size; i++) {
        x |= (uint64_t)f->b[at + i] << (8 * i);
    }
    *v = x;
    return 0;
}

/* Position of the object a uoffset field points at: 1 present, 0 absent, or an error. */
static int fb_ref(const fb_table *f, uint32_t slot, uint32_t *pos) {
    uint32_t at;
    int rc = fb_slot(f, slot, 4, &at);
    *pos = 0;
    if (rc <= 0) {
        return rc;
    }
    uint32_t off = na_u32(f->b + at);
    uint64_t p = (uint64_t)at + off;
    if (off == 0 || p >= f->n) {
        return NOETL_E_FORMAT;
    }
    *pos = (uint32_t)p;
    return 1;
}

static int fb_vector(const fb_table *f, uint32_t pos, uint32_t elem, uint32_t *count, uint32_t *data) {
    if ((uint64_t)pos + 4 > f->n) {
        return NOETL_E_FORMAT;
    }
    *count = na_u32(f->b + pos);
    *data = pos + 4;
    return (uint64_t)pos + 4 + (uint64_t)*count * elem > f->n ? NOETL_E_FORMAT : 0;
}

static int fb_child(const fb_table *f, uint32_t data, uint32_t i, fb_table *child) {
    uint32_t at = data + 4 * i;
    uint32_t off = na_u32(f->b + at);
    if (off == 0) {
        return NOETL_E_FORMAT;
    }
    return fb_open(f->b, f->n, (uint64_t)at + off, child);
}


/* The next message: 1 (header, body), 0 at the end of the stream, or an error. */
static int read_message(na_reader *r, uint64_t *type, fb_table *header, const uint8_t **body, uint64_t *body_len) {
    if (r->pos == r->len) {
        return 0;
    }
    if (r->len - r->pos < 8) {
        return NOETL_E_TRUNCATED;
    }
    const uint8_t *p = r->buf + r->pos;
    if (na_u32(p) != 0xFFFFFFFFu || (int32_t)na_u32(p + 4) < 0) {
        return NOETL_E_FORMAT;
    }
    uint32_t meta_len = na_u32(p + 4);
    if (meta_len == 0) { /* end of stream: nothing may follow it */
        if (r->len - r->pos != 8) {
            return NOETL_E_FORMAT;
        }
        r->pos = r->len;
        return 0;
    }
    if (meta_len > r->len - r->pos - 8) {
        return NOETL_E_TRUNCATED;
    }
    fb_table msg;
    uint64_t version, body_length;
    uint32_t header_pos;
    if (meta_len < 4) {
        return NOETL_E_FORMAT;
    }
    TRY(fb_open(p + 8, meta_len, na_u32(p + 8), &msg));
    TRY(fb_uint(&msg, 0, 2, 0, &version));
    TRY(fb_uint(&msg, 1, 1, 0, type));
    TRY(fb_uint(&msg, 3, 8, 0, &body_length));
    if (version < 3 || version > 4) {
        return NOETL_E_UNSUPPORTED;
    }
    if (fb_ref(&msg, 2, &header_pos) != 1) {
        return NOETL_E_FORMAT;
    }
    TRY(fb_open(msg.b, msg.n, header_pos, header));
    uint64_t start = (uint64_t)r->pos + 8 + meta_len;
    if (body_length > r->len - start) {
        return (int64_t)body_length < 0 ? NOETL_E_FORMAT : NOETL_E_TRUNCATED;
    }
    *body = r->buf + start;
    *body_len = body_length;
    r->pos = (uint32_t)(start + body_length);
    return 1;
}

static int read_field(const fb_table *schema_fields, uint32_t data, uint32_t i, na_field *out) {
    fb_table field, type;
    uint64_t nullable, type_type, bit_width, is_signed;
    uint32_t pos, count, at;
    TRY(fb_child(schema_fields, data, i, &field));
    out->name = (const uint8_t *)"";
    out->name_len = 0;
    if (fb_ref(&field, 0, &pos) < 0) {
        return NOETL_E_FORMAT;
    }
    if (pos) {
        TRY(fb_vector(&field, pos, 1, &out->name_len, &at));
        out->name = field.b + at;
    }
    TRY(fb_uint(&field, 1, 1, 0, &nullable));
    TRY(fb_uint(&field, 2, 1, 0, &type_type));
    out->nullable = nullable != 0;
    if (fb_ref(&field, 3, &pos) != 1) {
        return NOETL_E_FORMAT;
    }
    TRY(fb_open(field.b, field.n, pos, &type));
    int dictionary = fb_ref(&field, 4, &pos);
    TRY(dictionary);
    int children = fb_ref(&field, 5, &pos);
    TRY(children);
    if (children) {
        TRY(fb_vector(&field, pos, 4, &count, &at));
        if (count) {
            return NOETL_E_UNSUPPORTED;
        }
    }
    if (dictionary) {
        return NOETL_E_UNSUPPORTED;
    }
    switch (type_type) {
    case TYPE_INT:
        TRY(fb_uint(&type, 0, 4, 0, &bit_width));
        TRY(fb_uint(&type, 1, 1, 0, &is_signed));
        if (is_signed && (bit_width == 64 || bit_width == 32)) {
            out->type = bit_width == 64 ? NA_INT64 : NA_INT32;
            return 0;
        }
        return NOETL_E_UNSUPPORTED;
    case TYPE_UTF8:
        out->type = NA_UTF8;
        return 0;
    case TYPE_BOOL:
        out->type = NA_BOOL;
        return 0;
    default:
        return NOETL_E_UNSUPPORTED;
    }
}

int na_read_schema(na_reader *r, const uint8_t *buf, uint32_t len) {
    fb_table schema;
    const uint8_t *body;
    uint64_t type, body_len, endianness;
    uint32_t pos, count, data;
    r->buf = buf;
    r->len = len;
    r->pos = 0;
    r->nfields = 0;
    int rc = read_message(r, &type, &schema, &body, &body_len);
    if (rc <= 0) {
        return rc == 0 ? NOETL_E_TRUNCATED : rc;
    }
    if (type != MSG_SCHEMA) {
        return NOETL_E_FORMAT;
    }
    TRY(fb_uint(&schema, 0, 2, 0, &endianness));
    if (endianness != 0) {
        return NOETL_E_UNSUPPORTED;
    }
    rc = fb_ref(&schema, 1, &pos);
    TRY(rc);
    count = 0;
    if (rc) {
        TRY(fb_vector(&schema, pos, 4, &count, &data));
    }
    if (count > NA_MAX_FIELDS) {
        return NOETL_E_UNSUPPORTED;
    }
    for (uint32_t i = 0; i < count; i++) {
        TRY(read_field(&schema, data, i, &r->fields[i]));
    }
    r->nfields = (int)count;
    return 0;
}

/* Buffer i of the batch as a range of the body; a negative or out-of-body range is malformed. */
static int body_range(const uint8_t *buffers, uint32_t i, uint64_t body_len, uint64_t *off, uint64_t *len) {
    *off = na_u64(buffers + 16 * i);
    *len = na_u64(buffers + 16 * i + 8);
    return (*off > body_len || *len > body_len - *off) ? NOETL_E_FORMAT : 0;
}

static int read_array(na_type type, const uint8_t *nodes, const uint8_t *buffers, uint32_t *next, const uint8_t *body,
                      uint64_t body_len, int64_t length, na_array *a) {
    static const uint8_t zero_offset[4] = {0, 0, 0, 0};
    uint64_t off, len, need;
    a->length = (int64_t)na_u64(nodes);
    a->null_count = (int64_t)na_u64(nodes + 8);
    if (a->length != length || a->null_count < 0 || a->null_count > length) {
        return NOETL_E_FORMAT;
    }
    uint64_t bitmap_bytes = ((uint64_t)length + 7) / 8;
    TRY(body_range(buffers, (*next)++, body_len, &off, &len));
    a->validity = NULL;
    if (a->null_count > 0) {
        if (len < bitmap_bytes) {
            return NOETL_E_FORMAT;
        }
        a->validity = body + off;
    }
    a->offsets = NULL;
    if (type == NA_UTF8) {
        TRY(body_range(buffers, (*next)++, body_len, &off, &len));
        a->offsets = length == 0 && len < 4 ? zero_offset : body + off;
        if (length > 0 && len < 4 * ((uint64_t)length + 1)) {
            return NOETL_E_FORMAT;
        }
    }
    TRY(body_range(buffers, (*next)++, body_len, &off, &len));
    a->values = body + off;
    need = type == NA_INT64 ? 8 * (uint64_t)length : type == NA_INT32 ? 4 * (uint64_t)length
         : type == NA_BOOL  ? bitmap_bytes : 0;
    if (len < need) {
        return NOETL_E_FORMAT;
    }
    if (type == NA_UTF8) {
        int32_t prev = (int32_t)na_u32(a->offsets);
        if (prev < 0) {
            return NOETL_E_FORMAT;
        }
        for (int64_t i = 1; i <= length; i++) {
            int32_t cur = (int32_t)na_u32(a->offsets + 4 * i);
            if (cur < prev) {
                return NOETL_E_FORMAT;
            }
            prev = cur;
        }
        if ((uint64_t)prev > len) {
            return NOETL_E_FORMAT;
        }
    }
    return 0;
}

int na_read_batch(na_reader *r, na_batch *out) {
    fb_table batch;
    const uint8_t *body;
    uint64_t type, body_len, length;
    uint32_t pos, nnodes, nodes, nbuffers, buffers, next = 0, want = 0;
    int rc = read_message(r, &type, &batch, &body, &body_len);
    if (rc <= 0) {
        return rc;
    }
    if (type != MSG_RECORD_BATCH) {
        return type == MSG_DICTIONARY ? NOETL_E_UNSUPPORTED : NOETL_E_FORMAT;
    }
    TRY(fb_uint(&batch, 0, 8, 0, &length));
    if (length > NA_MAX_ROWS) {
        return (int64_t)length < 0 ? NOETL_E_FORMAT : NOETL_E_UNSUPPORTED;
    }
    rc = fb_ref(&batch, 3, &pos); /* compression */
    TRY(rc);
    if (rc) {
        return NOETL_E_UNSUPPORTED;
    }
    if (fb_ref(&batch, 1, &pos) != 1) {
        return NOETL_E_FORMAT;
    }
    TRY(fb_vector(&batch, pos, 16, &nnodes, &nodes));
    if (fb_ref(&batch, 2, &pos) != 1) {
        return NOETL_E_FORMAT;
    }
    TRY(fb_vector(&batch, pos, 16, &nbuffers, &buffers));
    for (int i = 0; i < r->nfields; i++) {
        want += r->fields[i].type == NA_UTF8 ? 3 : 2;
    }
    if (nnodes != (uint32_t)r->nfields || nbuffers != want) {
        return NOETL_E_FORMAT;
    }
    out->length = (int64_t)length;
    out->ncols = r->nfields;
    for (int i = 0; i < r->nfields; i++) {
        TRY(read_array(r->fields[i].type, batch.b + nodes + 16 * (uint32_t)i, batch.b + buffers, &next, body, body_len,
                       (int64_t)length, &out->cols[i]));
    }
    return 1;
}

int na_expect(const na_reader *r, const char *const *names, const na_type *types, int n) {
    if (r->nfields != n) {
        return NOETL_E_SCHEMA;
    }
    for (int i = 0; i < n; i++) {
        size_t len = noetl_strlen(names[i]);
        if (r->fields[i].type != types[i] || r->fields[i].name_len != len || memcmp(r->fields[i].name, names[i], len)) {
            return NOETL_E_SCHEMA;
        }
    }
    return 0;
}

/* ---- writing ---- */

static int grow(uint8_t **buf, uint32_t *cap, uint64_t need) {
    if (need <= *cap) {
        return 0;
    }
    uint64_t want = (uint64_t)*cap * 2;
    if (want < need) {
        want = need;
    }
    if (want < 64) {
        want = 64;
    }
    if (want > 0x7FFFFFFF) {
        if (need > 0x7FFFFFFF) {
            return NOETL_E_NOMEM;
        }
        want = need;
    }
    uint8_t *fresh = alloc((uint32_t)want);
    if (fresh == NULL) {
        return NOETL_E_NOMEM;
    }
    if (*cap) {
        memcpy(fresh, *buf, *cap);
    }
    memset(fresh + *cap, 0, (uint32_t)want - *cap);
    *buf = fresh;
    *cap = (uint32_t)want;
    return 0;
}


void na_column_init(na_column *c, const char *name, na_type type, bool nullable) {
    memset(c, 0, sizeof *c);
    c->name = name;
    c->type = type;
    c->nullable = nullable;
}

/* Room for one more row, and its validity bit set (a later na_append_null clears nothing: it never sets it). */
static int begin_row(na_column *c, bool valid) {
    if (c->length >= NA_MAX_ROWS) {
        return NOETL_E_NOMEM;
    }
    if (!valid && c->validity == NULL) {
        TRY(grow(&c->validity, &c->validity_cap, (uint64_t)c->length / 8 + 1));
        for (int64_t i = 0; i < c->length; i++) {
            c->validity[i >> 3] |= (uint8_t)(1u << (i & 7));
        }
    }
    if (c->validity != NULL) {
        TRY(grow(&c->validity, &c->validity_cap, (uint64_t)c->length / 8 + 1));
        if (valid) {
            c->validity[c->length >> 3] |= (uint8_t)(1u << (c->length & 7));
        }
    }
    return 0;
}

static int append_fixed(na_column *c, const void *value, uint32_t size, bool valid) {
    TRY(begin_row(c, valid));
    TRY(grow(&c->values, &c->values_cap, (uint64_t)c->values_len + size));
    memcpy(c->values + c->values_len, value, size);
    c->values_len += size;
    c->length++;
    return 0;
}

static int append_bit(na_column *c, bool bit, bool valid) {
    TRY(begin_row(c, valid));
    TRY(grow(&c->values, &c->values_cap, (uint64_t)c->length / 8 + 1));
    if (bit) {
        c->values[c->length >> 3] |= (uint8_t)(1u << (c->length & 7));
    }
    c->values_len = (uint32_t)(c->length / 8 + 1);
    c->length++;
    return 0;
}

static int append_bytes(na_column *c, const uint8_t *s, uint32_t len, bool valid) {
    if ((uint64_t)c->values_len + len > 0x7FFFFFFF) {
        return NOETL_E_NOMEM;
    }
    TRY(begin_row(c, valid));
    TRY(grow(&c->offsets, &c->offsets_cap, 4 * ((uint64_t)c->length + 2)));
    TRY(grow(&c->values, &c->values_cap, (uint64_t)c->values_len + len));
    memcpy(c->values + c->values_len, s, len);
    c->values_len += len;
    uint32_t end = c->values_len;
    memcpy(c->offsets + 4 * (c->length + 1), &end, 4);
    c->length++;
    return 0;
}

int na_append_i64(na_column *c, int64_t v) { return c->type == NA_INT64 ? append_fixed(c, &v, 8, true) : NOETL_E_SCHEMA; }
int na_append_i32(na_column *c, int32_t v) { return c->type == NA_INT32 ? append_fixed(c, &v, 4, true) : NOETL_E_SCHEMA; }
int na_append_bool(na_column *c, bool v) { return c->type == NA_BOOL ? append_bit(c, v, true) : NOETL_E_SCHEMA; }
int na_append_str(na_column *c, const uint8_t *s, uint32_t len) {
    return c->type == NA_UTF8 ? append_bytes(c, s, len, true) : NOETL_E_SCHEMA;
}

int na_append_null(na_column *c) {
    static const uint8_t zero[8] = {0};
    if (!c->nullable) {
        return NOETL_E_SCHEMA;
    }
    c->null_count++;
    switch (c->type) {
    case NA_INT64:
        return append_fixed(c, zero, 8, false);
    case NA_INT32:
        return append_fixed(c, zero, 4, false);
    case NA_BOOL:
        return append_bit(c, false, false);
    default:
        return append_bytes(c, zero, 0, false);
    }
}

/* ---- the output buffer and flatbuffer tables ---- */

typedef struct {
    uint8_t *b;
    uint32_t len;
    uint32_t cap;
} out_t;

static int put(out_t *o, const void *data, uint32_t n) {
    TRY(grow(&o->b, &o->cap, (uint64_t)o->len + n));
    if (data != NULL) {
        memcpy(o->b + o->len, data, n);
    }
    o->len += n; /* grow zero-fills, so data == NULL writes zeros */
    return 0;
}

static int pad(out_t *o, uint32_t align, uint32_t rem) {
    while (o->len % align != rem) {
        TRY(put(o, NULL, 1));
    }
    return 0;
}

static void set(out_t *o, uint32_t at, uint64_t v, uint32_t size) { memcpy(o->b + at, &v, size); }


/* A table with the slots in `mask` (bit i = slot i) present, referred to by the uoffset at `from`;
 * at[i] receives slot i's position. */
static int table(out_t *o, uint32_t from, uint32_t nslots, uint32_t mask, uint32_t *at) {
    uint32_t vtsize = 4 + 2 * nslots, present = 0;
    for (uint32_t i = 0; i < nslots; i++) {
        present += (mask >> i) & 1;
    }
    TRY(pad(o, 8, (4 + 8 - vtsize % 8) % 8));
    uint32_t vt = o->len;
    TRY(put(o, NULL, vtsize + 4 + 8 * present));
    uint32_t t = vt + vtsize;
    set(o, vt, vtsize, 2);
    set(o, vt + 2, 4 + 8 * present, 2);
    set(o, t, vtsize, 4);
    set(o, from, t - from, 4);
    for (uint32_t i = 0, k = 0; i < nslots; i++) {
        if ((mask >> i) & 1) {
            set(o, vt + 4 + 2 * i, 4 + 8 * k, 2);
            at[i] = t + 4 + 8 * k++;
        }
    }
    return 0;
}

/* A vector's length, referred to by the uoffset at `from`; its elements start 8-aligned. */
static int vector(out_t *o, uint32_t from, uint32_t count) {
    TRY(pad(o, 8, 4));
    set(o, from, o->len - from, 4);
    return put(o, &count, 4);
}

static int string(out_t *o, uint32_t from, const char *s) {
    uint32_t n = (uint32_t)noetl_strlen(s);
    TRY(vector(o, from, n));
    TRY(put(o, s, n));
    return put(o, NULL, 1);
}

/* Message header: prefix, root offset, Message table; returns the uoffset slot of its header. */
static int message(out_t *o, uint32_t header_type, uint64_t body_len, uint32_t *meta, uint32_t *header) {
    static const uint32_t prefix[2] = {0xFFFFFFFFu, 0};
    uint32_t at[4];
    TRY(pad(o, 8, 0));
    TRY(put(o, prefix, 8));
    *meta = o->len;
    TRY(put(o, NULL, 4));
    TRY(table(o, *meta, 4, 0xF, at));
    set(o, at[0], 4, 2); /* MetadataVersion V5 */
    set(o, at[1], header_type, 1);
    set(o, at[3], body_len, 8);
    *header = at[2];
    return 0;
}

static int end_message(out_t *o, uint32_t meta) {
    TRY(pad(o, 8, 0));
    set(o, meta - 4, o->len - meta, 4);
    return 0;
}

static int write_schema(out_t *o, const na_column *cols, int ncols) {
    uint32_t meta, header, at[6], fields;
    TRY(message(o, 1, 0, &meta, &header));
    TRY(table(o, header, 2, 0x2, at));
    uint32_t n = (uint32_t)ncols;
    TRY(vector(o, at[1], n));
    fields = o->len;
    TRY(put(o, NULL, 4 * n));
    for (uint32_t i = 0; i < n; i++) {
        const na_column *c = &cols[i];
        TRY(table(o, fields + 4 * i, 6, 0x2F, at));
        set(o, at[1], c->nullable, 1);
        set(o, at[2], c->type == NA_UTF8 ? 5 : c->type == NA_BOOL ? 6 : 2, 1);
        TRY(string(o, at[0], c->name));
        TRY(vector(o, at[5], 0)); /* no children */
        if (c->type == NA_INT64 || c->type == NA_INT32) {
            uint32_t it[2];
            TRY(table(o, at[3], 2, 0x3, it));
            set(o, it[0], c->type == NA_INT64 ? 64 : 32, 4);
            set(o, it[1], 1, 1);
        } else {
            TRY(table(o, at[3], 0, 0, at));
        }
    }
    return end_message(o, meta);
}

static uint64_t padded(uint64_t n) { return (n + 7) & ~(uint64_t)7; }

/* The column's buffers in IPC order: (pointer, length) pairs; returns how many. */
static int buffers_of(const na_column *c, const uint8_t **ptr, uint64_t *len) {
    static const uint8_t zero_offset[4] = {0};
    int k = 0;
    ptr[k] = c->validity;
    len[k++] = c->null_count ? ((uint64_t)c->length + 7) / 8 : 0;
    if (c->type == NA_UTF8) {
        ptr[k] = c->length ? c->offsets : zero_offset;
        len[k++] = 4 * ((uint64_t)c->length + 1);
    }
    ptr[k] = c->values;
    len[k++] = c->type == NA_BOOL ? ((uint64_t)c->length + 7) / 8 : c->values_len;
    return k;
}

static int write_batch(out_t *o, const na_column *cols, int ncols) {
    const uint8_t *ptr[3];
    uint64_t len[3], body = 0, rows = ncols ? (uint64_t)cols[0].length : 0;
    uint32_t nbuffers = 0, meta, header, at[3];
    for (int i = 0; i < ncols; i++) {
        int k = buffers_of(&cols[i], ptr, len);
        for (int j = 0; j < k; j++) {
            body += padded(len[j]);
        }
        nbuffers += (uint32_t)k;
    }
    TRY(message(o, 3, body, &meta, &header));
    TRY(table(o, header, 3, 0x7, at));
    set(o, at[0], rows, 8);
    uint32_t vec[2] = {(uint32_t)ncols, nbuffers};
    for (int v = 0; v < 2; v++) {
        TRY(vector(o, at[1 + v], vec[v]));
        uint64_t offset = 0;
        for (int i = 0; i < ncols; i++) {
            if (v == 0) {
                uint64_t node[2] = {(uint64_t)cols[i].length, (uint64_t)cols[i].null_count};
                TRY(put(o, node, 16));
                continue;
            }
            int k = buffers_of(&cols[i], ptr, len);
            for (int j = 0; j < k; j++) {
                uint64_t buffer[2] = {offset, len[j]};
                TRY(put(o, buffer, 16));
                offset += padded(len[j]);
            }
        }
    }
    TRY(end_message(o, meta));
    for (int i = 0; i < ncols; i++) {
        int k = buffers_of(&cols[i], ptr, len);
        for (int j = 0; j < k; j++) {
            TRY(put(o, len[j] ? ptr[j] : NULL, (uint32_t)len[j]));
            TRY(pad(o, 8, 0));
        }
    }
    return 0;
}

int na_write_stream(const na_column *cols, int ncols, uint8_t **out, uint32_t *out_len) {
    static const uint32_t eos[2] = {0xFFFFFFFFu, 0};
    out_t o = {0};
    for (int i = 0; i < ncols; i++) {
        if (cols[i].length != cols[0].length) {
            return NOETL_E_SCHEMA;
        }
    }
    TRY(write_schema(&o, cols, ncols));
    TRY(write_batch(&o, cols, ncols));
    TRY(put(&o, eos, 8));
    *out = o.b;
    *out_len = o.len;
    return 0;
}
