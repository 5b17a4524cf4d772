/* rows.c: the materialize row builder compiled to wasm32, the twin of system_playbooks/materialize/rows.py.
 *
 * In:  key utf8 (not null), revision int64 (not null), projection utf8 (canonical JSON; null = already a pointer)
 * Out: key, revision, execution_id, tenant, project, status, last_seq, event_count, projection, pointer (bool)
 *      one row per non-null projection, in input order; pointer = status is COMPLETED, FAILED or CANCELLED.
 *
 * The projection is parsed as JSON for its top-level fields; every other value is skipped but still
 * validated (strings with their escapes and UTF-8, numbers, literals, nesting up to MAX_DEPTH), so a
 * malformed projection is refused (NOETL_E_INPUT) just as the Python twin refuses it. */
#include "noetl_arrow.h"

#define MAX_DEPTH 1024
#define NOUT 10

enum { F_EXECUTION_ID, F_TENANT, F_PROJECT, F_STATUS, F_LAST_SEQ, F_EVENT_COUNT, NHEAD };
static const char *const HEAD[NHEAD] = {"execution_id", "tenant", "project", "status", "last_seq", "event_count"};

typedef struct {
    const uint8_t *str[4];
    uint32_t len[4];
    int64_t num[2];
    unsigned seen;
} head_t;

__attribute__((always_inline)) static inline const uint8_t *ws(const uint8_t *p, const uint8_t *end) {
    while (p < end && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r')) {
        p++;
    }
    return p;
}

static int hex4(const uint8_t *p, const uint8_t *end, uint32_t *v) {
    if (end - p < 4) {
        return -1;
    }
    *v = 0;
    for (int i = 0; i < 4; i++) {
        uint8_t c = p[i];
        uint32_t d = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : 16;
        if (d == 16) {
            return -1;
        }
        *v = *v << 4 | d;
    }
    return 0;
}

/* Length of the valid UTF-8 sequence at p (no overlongs, no surrogates, <= U+10FFFF), 0 if invalid. */
static uint32_t utf8_seq(const uint8_t *p, const uint8_t *end) {
    uint8_t c = p[0];
    uint32_t n = c >= 0xF0 && c <= 0xF4 ? 4 : c >= 0xE0 ? 3 : c >= 0xC2 && c <= 0xDF ? 2 : 0;
    if (n == 0 || c > 0xF4 || end - p < (ptrdiff_t)n) {
        return 0;
    }
    for (uint32_t i = 1; i < n; i++) {
        if ((p[i] & 0xC0) != 0x80) {
            return 0;
        }
    }
    if ((c == 0xE0 && p[1] < 0xA0) || (c == 0xED && p[1] > 0x9F) || (c == 0xF0 && p[1] < 0x90) || (c == 0xF4 && p[1] > 0x8F)) {
        return 0;
    }
    return n;
}

static uint32_t put_utf8(uint8_t *out, uint32_t cp) {
    if (cp < 0x80) {
        out[0] = (uint8_t)cp;
        return 1;
    }
    if (cp < 0x800) {
        out[0] = (uint8_t)(0xC0 | cp >> 6);
        out[1] = (uint8_t)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        out[0] = (uint8_t)(0xE0 | cp >> 12);
        out[1] = (uint8_t)(0x80 | ((cp >> 6) & 0x3F));
        out[2] = (uint8_t)(0x80 | (cp & 0x3F));
        return 3;
    }
    out[0] = (uint8_t)(0xF0 | cp >> 18);
    out[1] = (uint8_t)(0x80 | ((cp >> 12) & 0x3F));
    out[2] = (uint8_t)(0x80 | ((cp >> 6) & 0x3F));
    out[3] = (uint8_t)(0x80 | (cp & 0x3F));
    return 4;
}

/* plain[c]: byte c stands for itself inside a JSON string (ASCII, not a control, quote or backslash). */
static uint8_t plain[256];

static void init_plain(void) {
    for (int c = 0x20; c < 0x80; c++) {
        plain[c] = c != '"' && c != '\\';
    }
}

/* Whether any of the 8 bytes in v is not plain (a quote, a backslash, a control or a non-ASCII byte). */
static inline bool special8(uint64_t v) {
    const uint64_t ones = 0x0101010101010101ull, highs = 0x8080808080808080ull;
    uint64_t q = v ^ (ones * '"'), b = v ^ (ones * '\\');
    return (((v - ones * 0x20) & ~v) | ((q - ones) & ~q) | ((b - ones) & ~b) | v) & highs;
}

/* The JSON string at p: returns the position after its closing quote, or NULL if malformed. When out is
 * not NULL its unescaped bytes are written there (never more than the raw length) and counted in *n. */
__attribute__((always_inline)) static inline const uint8_t *string(const uint8_t *p, const uint8_t *end, uint8_t *out,
                                                                 uint32_t *n) {
    uint8_t tmp[4];
    uint32_t k = 0;
    if (p >= end || *p != '"') {
        return NULL;
    }
    p++;
    while (p < end) {
        const uint8_t *run = p;
        while (end - p >= 8 && !special8(na_u64(p))) { /* eight plain bytes at a time */
            p += 8;
        }
        while (p < end && plain[*p]) { /* the common case, a byte at a time without further tests */
            p++;
        }
        if (out != NULL) {
            memcpy(out + k, run, (uint32_t)(p - run));
        }
        k += (uint32_t)(p - run);
        if (p >= end) {
            break;
        }
        uint8_t c = *p;
        if (c == '"') {
            if (n != NULL) {
                *n = k;
            }
            return p + 1;
        }
        if (c < 0x20) {
            return NULL;
        }
        if (c != '\\') {
            uint32_t len = c < 0x80 ? 1 : utf8_seq(p, end);
            if (len == 0) {
                return NULL;
            }
            if (out != NULL) {
                memcpy(out + k, p, len);
            }
            k += len;
            p += len;
            continue;
        }
        if (++p >= end) {
            return NULL;
        }
        uint32_t cp;
        switch (*p++) {
        case '"': cp = '"'; break;
        case '\\': cp = '\\'; break;
        case '/': cp = '/'; break;
        case 'b': cp = '\b'; break;
        case 'f': cp = '\f'; break;
        case 'n': cp = '\n'; break;
        case 'r': cp = '\r'; break;
        case 't': cp = '\t'; break;
        case 'u':
            if (hex4(p, end, &cp) < 0 || (cp >= 0xDC00 && cp <= 0xDFFF)) {
                return NULL;
            }
            p += 4;
            if (cp >= 0xD800 && cp <= 0xDBFF) {
                uint32_t low;
                if (end - p < 6 || p[0] != '\\' || p[1] != 'u' || hex4(p + 2, end, &low) < 0 || low < 0xDC00 || low > 0xDFFF) {
                    return NULL;
                }
                cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
                p += 6;
            }
            break;
        default:
            return NULL;
        }
        uint32_t len = put_utf8(out != NULL ? out + k : tmp, cp);
        k += len;
    }
    return NULL;
}

/* A JSON number; *integral and *value describe it when it is an integer within int64. */
static const uint8_t *number(const uint8_t *p, const uint8_t *end, bool *integral, int64_t *value) {
    bool negative = p < end && *p == '-', fits = true;
    uint64_t magnitude = 0, last = negative ? 8 : 7; /* the last digit of 2^63 (negative) or 2^63 - 1 */
    p += negative;
    if (p >= end || *p < '0' || *p > '9') {
        return NULL;
    }
    if (*p == '0') {
        p++;
    } else {
        while (p < end && *p >= '0' && *p <= '9') {
            uint64_t d = (uint64_t)(*p++ - '0');
            fits = fits && (magnitude < 922337203685477580ull || (magnitude == 922337203685477580ull && d <= last));
            magnitude = magnitude * 10 + d; /* meaningless once !fits, and then unused */
        }
    }
    *integral = fits;
    if (p < end && *p == '.') {
        *integral = false;
        if (++p >= end || *p < '0' || *p > '9') {
            return NULL;
        }
        while (p < end && *p >= '0' && *p <= '9') {
            p++;
        }
    }
    if (p < end && (*p == 'e' || *p == 'E')) {
        *integral = false;
        p++;
        p += p < end && (*p == '+' || *p == '-');
        if (p >= end || *p < '0' || *p > '9') {
            return NULL;
        }
        while (p < end && *p >= '0' && *p <= '9') {
            p++;
        }
    }
    *value = negative ? (int64_t)(0 - magnitude) : (int64_t)magnitude;
    return p;
}

static const uint8_t *literal(const uint8_t *p, const uint8_t *end, const char *word, uint32_t n) {
    return (uint32_t)(end - p) >= n && memcmp(p, word, n) == 0 ? p + n : NULL;
}

/* Skip one JSON value of any shape (validating it), without recursion. */
static const uint8_t *skip_value(const uint8_t *p, const uint8_t *end) {
    static uint8_t stack[MAX_DEPTH];
    int depth = 0;
    bool integral;
    int64_t ignored;
    for (;;) {
        p = ws(p, end);
        if (p >= end) {
            return NULL;
        }
        switch (*p) {
        case '{':
        case '[':
            if (depth == MAX_DEPTH) {
                return NULL;
            }
            stack[depth++] = *p == '{' ? '}' : ']';
            p = ws(p + 1, end);
            if (p < end && *p == stack[depth - 1]) {
                p++;
                depth--;
                break;
            }
            if (stack[depth - 1] == '}') {
                p = string(p, end, NULL, NULL);
                p = p ? ws(p, end) : NULL;
                if (p == NULL || p >= end || *p++ != ':') {
                    return NULL;
                }
            }
            continue; /* a value comes next */
        case '"': p = string(p, end, NULL, NULL); break;
        case 't': p = literal(p, end, "true", 4); break;
        case 'f': p = literal(p, end, "false", 5); break;
        case 'n': p = literal(p, end, "null", 4); break;
        default: p = number(p, end, &integral, &ignored); break;
        }
        /* after a value: close containers, or go on to the next element */
        for (;;) {
            if (p == NULL) {
                return NULL;
            }
            if (depth == 0) {
                return p;
            }
            p = ws(p, end);
            if (p >= end) {
                return NULL;
            }
            if (*p == stack[depth - 1]) {
                p++;
                depth--;
                continue;
            }
            if (*p++ != ',') {
                return NULL;
            }
            if (stack[depth - 1] == '}') {
                p = string(ws(p, end), end, NULL, NULL);
                p = p ? ws(p, end) : NULL;
                if (p == NULL || p >= end || *p++ != ':') {
                    return NULL;
                }
            }
            break;
        }
    }
}

static const uint32_t HEAD_LEN[NHEAD] = {12, 6, 7, 6, 8, 11};

static int which_field(const uint8_t *key, uint32_t n) {
    for (int f = 0; f < NHEAD; f++) {
        if (HEAD_LEN[f] == n && key[0] == (uint8_t)HEAD[f][0] && memcmp(HEAD[f], key, n) == 0) {
            return f;
        }
    }
    return -1;
}

/* The projection's top-level fields; `scratch` has room for its length (unescaped values go there). */
static int parse_head(const uint8_t *json, uint32_t len, uint8_t *scratch, head_t *h) {
    const uint8_t *p = ws(json, json + len), *end = json + len;
    h->seen = 0;
    if (p >= end || *p++ != '{') {
        return NOETL_E_INPUT;
    }
    p = ws(p, end);
    if (p < end && *p == '}') {
        return NOETL_E_INPUT; /* {} lacks every field */
    }
    for (;;) {
        uint32_t n;
        uint8_t *key = scratch + (p - json); /* unescaped keys and values go to disjoint places */
        const uint8_t *after = string(p, end, key, &n);
        if (after == NULL) {
            return NOETL_E_INPUT;
        }
        int f = which_field(key, n);
        p = ws(after, end);
        if (p >= end || *p++ != ':') {
            return NOETL_E_INPUT;
        }
        p = ws(p, end);
        if (f >= F_EXECUTION_ID && f <= F_STATUS) {
            uint8_t *out = scratch + (p - json);
            p = string(p, end, out, &h->len[f]);
            h->str[f] = out;
        } else if (f == F_LAST_SEQ || f == F_EVENT_COUNT) {
            bool integral = false;
            p = p < end && (*p == '-' || (*p >= '0' && *p <= '9')) ? number(p, end, &integral, &h->num[f - F_LAST_SEQ]) : NULL;
            p = integral ? p : NULL;
        } else {
            p = skip_value(p, end);
        }
        if (p == NULL) {
            return NOETL_E_INPUT;
        }
        if (f >= 0) {
            h->seen |= 1u << f;
        }
        p = ws(p, end);
        if (p < end && *p == ',') {
            p = ws(p + 1, end);
            continue;
        }
        if (p < end && *p == '}' && ws(p + 1, end) == end) {
            return h->seen == (1u << NHEAD) - 1 ? 0 : NOETL_E_INPUT;
        }
        return NOETL_E_INPUT;
    }
}

static bool terminal(const uint8_t *s, uint32_t n) {
    return (n == 9 && memcmp(s, "COMPLETED", 9) == 0) || (n == 6 && memcmp(s, "FAILED", 6) == 0) ||
           (n == 9 && memcmp(s, "CANCELLED", 9) == 0);
}

#define TRY(expr)                                                                                                      \
    do {                                                                                                               \
        int rc_ = (expr);                                                                                              \
        if (rc_ < 0) {                                                                                                 \
            return noetl_fail(rc_);                                                                                    \
        }                                                                                                              \
    } while (0)

int64_t run(int32_t ptr, int32_t len) {
    static const char *const in_names[3] = {"key", "revision", "projection"};
    static const na_type in_types[3] = {NA_UTF8, NA_INT64, NA_UTF8};
    static const char *const out_names[NOUT] = {"key", "revision", "execution_id", "tenant", "project",
                                                "status", "last_seq", "event_count", "projection", "pointer"};
    static const na_type out_types[NOUT] = {NA_UTF8, NA_INT64, NA_UTF8, NA_UTF8, NA_UTF8,
                                            NA_UTF8, NA_INT64, NA_INT64, NA_UTF8, NA_BOOL};
    static na_reader reader;
    static na_batch batch;
    static na_column out[NOUT];
    uint8_t *scratch = NULL, *result;
    uint32_t scratch_cap = 0, result_len;
    head_t h;

    init_plain();
    TRY(na_read_schema(&reader, (const uint8_t *)(uintptr_t)ptr, (uint32_t)len));
    TRY(na_expect(&reader, in_names, in_types, 3));
    if (reader.fields[0].nullable || reader.fields[1].nullable || !reader.fields[2].nullable) {
        return noetl_fail(NOETL_E_SCHEMA);
    }
    for (int c = 0; c < NOUT; c++) {
        na_column_init(&out[c], out_names[c], out_types[c], false);
    }
    int rc;
    while ((rc = na_read_batch(&reader, &batch)) == 1) {
        const na_array *keys = &batch.cols[0], *revisions = &batch.cols[1], *projections = &batch.cols[2];
        for (int64_t i = 0; i < batch.length; i++) {
            if (!na_valid(keys, i) || !na_valid(revisions, i)) {
                return noetl_fail(NOETL_E_INPUT);
            }
            if (!na_valid(projections, i)) {
                continue;
            }
            uint32_t key_len, json_len;
            const uint8_t *key = na_str(keys, i, &key_len), *json = na_str(projections, i, &json_len);
            if (json_len > scratch_cap) {
                scratch_cap = json_len > 2 * scratch_cap ? json_len : 2 * scratch_cap;
                if ((scratch = alloc(scratch_cap)) == NULL) {
                    return noetl_fail(NOETL_E_NOMEM);
                }
            }
            TRY(parse_head(json, json_len, scratch, &h));
            TRY(na_append_str(&out[0], key, key_len));
            TRY(na_append_i64(&out[1], na_i64(revisions, i)));
            for (int f = F_EXECUTION_ID; f <= F_STATUS; f++) {
                TRY(na_append_str(&out[2 + f], h.str[f], h.len[f]));
            }
            TRY(na_append_i64(&out[6], h.num[0]));
            TRY(na_append_i64(&out[7], h.num[1]));
            TRY(na_append_str(&out[8], json, json_len));
            TRY(na_append_bool(&out[9], terminal(h.str[F_STATUS], h.len[F_STATUS])));
        }
    }
    TRY(rc);
    TRY(na_write_stream(out, NOUT, &result, &result_len));
    return noetl_output(result, result_len);
}
