/* noetl.h: the guest side of the noetl plug-in ABI (wasm32, freestanding, no libc).
 *
 * Host functions live in the wasm import module "noetl"; each takes (ptr, len) of a
 * byte range in guest memory and returns 0 on success or a negative error code.
 * Declaring them here imports nothing: wasm-ld turns only the ones a module calls
 * into imports, so a module asks for exactly the capabilities it uses, and one the
 * plug-in was not granted fails instantiation on the host.
 *
 * A module exports `memory` (wasm-ld does), `alloc` (defined below) and
 *     int64_t run(int32_t ptr, int32_t len)
 * which reads its input (an Arrow IPC stream, see noetl_arrow.h) at [ptr, ptr+len)
 * and returns noetl_output(out, out_len) = (out << 32) | out_len, or
 * noetl_fail(code) (a negative value) when it refuses the input.
 */
#ifndef NOETL_H
#define NOETL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define NOETL_IMPORT(name) __attribute__((import_module("noetl"), import_name(name)))
#define NOETL_EXPORT(name) __attribute__((export_name(name)))

NOETL_IMPORT("event_publish") int32_t noetl_event_publish(const void *ptr, int32_t len);
NOETL_IMPORT("result_put") int32_t noetl_result_put(const void *ptr, int32_t len);
NOETL_IMPORT("object_put") int32_t noetl_object_put(const void *ptr, int32_t len);
NOETL_IMPORT("log") int32_t noetl_log(const void *ptr, int32_t len);

/* Error codes a guest returns from run (negated into the i64 result). */
enum {
    NOETL_OK = 0,
    NOETL_E_NOMEM = -1,       /* the allocator could not grow memory */
    NOETL_E_TRUNCATED = -2,   /* the input ends inside a message or buffer */
    NOETL_E_FORMAT = -3,      /* the input is not a well-formed Arrow IPC stream */
    NOETL_E_UNSUPPORTED = -4, /* well-formed, but outside the flat int64/int32/bool/utf8 subset */
    NOETL_E_SCHEMA = -5,      /* the columns are not the ones this module expects */
    NOETL_E_INPUT = -6,       /* a value is invalid for this module (e.g. malformed JSON) */
};


static inline int64_t noetl_output(const void *ptr, uint32_t len) {
    return (int64_t)(((uint64_t)(uintptr_t)ptr << 32) | (uint64_t)len);
}

static inline int64_t noetl_fail(int32_t code) { return code < 0 ? (int64_t)code : (int64_t)NOETL_E_INPUT; }

/* Everything below is defined weak, so the header can be included by several sources of one
 * module (the guest and noetl_arrow.c) and the linker keeps one copy. */
size_t noetl_strlen(const char *s);

extern unsigned char __heap_base;

#define NOETL_WEAK __attribute__((weak))

NOETL_WEAK uintptr_t noetl_heap_top;

/* Bump allocator, the module's `alloc` export: 8-byte aligned, grows memory, never frees (the host
 * gives every invocation a fresh instance). NULL when memory cannot grow. */
NOETL_WEAK NOETL_EXPORT("alloc") void *alloc(uint32_t size) {
    if (noetl_heap_top == 0) {
        noetl_heap_top = (uintptr_t)&__heap_base;
    }
    uint64_t start = ((uint64_t)noetl_heap_top + 7u) & ~(uint64_t)7u;
    uint64_t end = start + (uint64_t)size;
    uint64_t have = (uint64_t)__builtin_wasm_memory_size(0) * 65536u;
    if (end > have) {
        uint64_t pages = (end - have + 65535u) / 65536u;
        if (end > 0xFFFFFFFFull || __builtin_wasm_memory_grow(0, (size_t)pages) == (size_t)-1) {
            return NULL;
        }
    }
    noetl_heap_top = (uintptr_t)end;
    return (void *)(uintptr_t)start;
}

/* Log a NUL-terminated message through the host (the module then imports `log`). */
static inline int32_t noetl_log_str(const char *message) { return noetl_log(message, (int32_t)noetl_strlen(message)); }

NOETL_WEAK size_t noetl_strlen(const char *s) {
    size_t n = 0;
    while (s[n]) {
        n++;
    }
    return n;
}

/* The few libc memory functions a freestanding module needs (the compiler may emit calls to them).
 * With bulk memory (zig's wasm32 default) they are single memory.copy / memory.fill instructions;
 * otherwise byte loops, which no_builtin keeps from being turned back into calls to themselves. */
#if defined(__wasm_bulk_memory__) || defined(__wasm_bulk_memory_opt__)
NOETL_WEAK void *memcpy(void *dst, const void *src, size_t n) {
    __builtin_memcpy(dst, src, n); /* lowered to memory.copy, not to a call */
    return dst;
}

NOETL_WEAK void *memmove(void *dst, const void *src, size_t n) {
    __builtin_memmove(dst, src, n); /* memory.copy handles overlap */
    return dst;
}

NOETL_WEAK void *memset(void *dst, int c, size_t n) {
    __builtin_memset(dst, c, n);
    return dst;
}
#else
NOETL_WEAK __attribute__((no_builtin)) void *memcpy(void *dst, const void *src, size_t n) {
    unsigned char *d = dst;
    const unsigned char *s = src;
    while (n--) {
        *d++ = *s++;
    }
    return dst;
}

NOETL_WEAK __attribute__((no_builtin)) void *memmove(void *dst, const void *src, size_t n) {
    unsigned char *d = dst;
    const unsigned char *s = src;
    if (d < s) {
        while (n--) {
            *d++ = *s++;
        }
    } else {
        while (n--) {
            d[n] = s[n];
        }
    }
    return dst;
}

NOETL_WEAK __attribute__((no_builtin)) void *memset(void *dst, int c, size_t n) {
    unsigned char *d = dst;
    while (n--) {
        *d++ = (unsigned char)c;
    }
    return dst;
}
#endif

NOETL_WEAK __attribute__((no_builtin)) int memcmp(const void *a, const void *b, size_t n) {
    const unsigned char *x = a;
    const unsigned char *y = b;
    for (size_t i = 0; i < n; i++) {
        if (x[i] != y[i]) {
            return x[i] < y[i] ? -1 : 1;
        }
    }
    return 0;
}

#endif
