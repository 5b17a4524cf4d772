/* score: an example user plug-in for `tool: wasm` steps.
 *
 * Input: the step's args as a one-row Arrow table with int64 columns `a` and `b`.
 * Output: one row {sum: a + b, version: VERSION}; it also logs a line and publishes
 * a `user.scored` event for its execution (both through granted host functions).
 *
 *   noetl-edge plugin build examples/wasm/score.c -o score.wasm
 *   noetl-edge plugin register score.wasm --tenant acme --project web --path tools/score
 */
#include "noetl_arrow.h"

#ifndef VERSION
#define VERSION 1
#endif

static const char *const NAMES[] = {"a", "b"};
static const na_type TYPES[] = {NA_INT64, NA_INT64};

static uint32_t put_i64(uint8_t *p, int64_t v) {
    uint8_t tmp[24];
    uint32_t n = 0, k = 0;
    uint64_t u = v < 0 ? (uint64_t)(-v) : (uint64_t)v;
    do { tmp[k++] = (uint8_t)('0' + u % 10); u /= 10; } while (u);
    if (v < 0) p[n++] = '-';
    while (k) p[n++] = tmp[--k];
    return n;
}

NOETL_EXPORT("run") int64_t run(const uint8_t *in, int32_t len) {
    na_reader reader;
    na_batch batch;
    int rc = na_read_schema(&reader, in, (uint32_t)len);
    if (rc < 0) return noetl_fail(rc);
    if ((rc = na_expect(&reader, NAMES, TYPES, 2)) < 0) return noetl_fail(rc);
    if ((rc = na_read_batch(&reader, &batch)) != 1) return noetl_fail(rc < 0 ? rc : NOETL_E_INPUT);
    if (batch.length != 1 || !na_valid(&batch.cols[0], 0) || !na_valid(&batch.cols[1], 0)) return noetl_fail(NOETL_E_INPUT);
    int64_t sum = na_i64(&batch.cols[0], 0) + na_i64(&batch.cols[1], 0);

    static const char head[] = "{\"type\":\"user.scored\",\"payload\":{\"sum\":";
    uint8_t event[96];
    uint32_t n = 0;
    for (const char *c = head; *c; c++) event[n++] = (uint8_t)*c;
    n += put_i64(event + n, sum);
    event[n++] = '}';
    event[n++] = '}';
    noetl_event_publish(event, (int32_t)n);
    noetl_log_str("score: scored one row");

    na_column cols[2];
    na_column_init(&cols[0], "sum", NA_INT64, false);
    na_column_init(&cols[1], "version", NA_INT64, false);
    if (na_append_i64(&cols[0], sum) < 0 || na_append_i64(&cols[1], VERSION) < 0) return noetl_fail(NOETL_E_NOMEM);
    uint8_t *out;
    uint32_t out_len;
    if ((rc = na_write_stream(cols, 2, &out, &out_len)) < 0) return noetl_fail(rc);
    return noetl_output(out, out_len);
}
