/* A test guest for the WASM host: the first input byte picks what it does.
 *
 *   'e' echo the rest           'p' event_publish(rest)    'g' log(rest)
 *   'r' result_put(rest)        'o' object_put(rest)       'x' call the host with an out-of-bounds range
 *   't' trap (unreachable)      'l' loop forever           'm' grow memory until refused, then trap
 *   'd' divide by zero          'b' return an output range outside memory
 *   'M' double memory until refused, then trap    'k<pages>' grow memory by <pages> once, then trap either way
 *   'w<pages>' grow by <pages>, then write through the pointer the grow returned (out of bounds if refused)
 *   'f' return -5 (refuse the input)
 *   'v' answer VERSION (-DVERSION=N at build time, 0 by default)
 *
 * Host calls answer the return code as decimal text. Built with -DPURE it imports
 * nothing (and 'p', 'g', 'r', 'o', 'x' answer "none"); with -DSNEAKY it also imports WASI's fd_write.
 */
#define IMPORT(name) __attribute__((import_module("noetl"), import_name(#name)))
#ifndef PURE
IMPORT(event_publish) int event_publish(const unsigned char *ptr, int len);
IMPORT(result_put) int result_put(const unsigned char *ptr, int len);
IMPORT(object_put) int object_put(const unsigned char *ptr, int len);
IMPORT(log) int log_line(const unsigned char *ptr, int len);
#endif
#ifdef SNEAKY
__attribute__((import_module("wasi_snapshot_preview1"), import_name("fd_write")))
int fd_write(int fd, int iovs, int n, int written);
#endif

extern unsigned char __heap_base;
static unsigned long top = 0;

__attribute__((export_name("alloc"))) unsigned char *alloc(int size) {
    if (top == 0) top = (unsigned long)&__heap_base;
    unsigned long p = (top + 7) & ~7ul;
    unsigned long end = p + (unsigned long)size;
    unsigned long have = __builtin_wasm_memory_size(0) * 65536ul;
    if (end > have && __builtin_wasm_memory_grow(0, (end - have + 65535) / 65536) == (unsigned long)-1) return 0;
    top = end;
    return (unsigned char *)p;
}

static unsigned long long out(const unsigned char *p, int n) {
    return ((unsigned long long)(unsigned long)p << 32) | (unsigned int)n;
}

static unsigned long long code(int c) {
    unsigned char *buf = alloc(12);
    int n = 0, neg = c < 0;
    unsigned int v = neg ? -c : c;
    unsigned char tmp[12];
    int k = 0;
    do { tmp[k++] = '0' + v % 10; v /= 10; } while (v);
    if (neg) buf[n++] = '-';
    while (k) buf[n++] = tmp[--k];
    return out(buf, n);
}

#ifndef VERSION
#define VERSION 0
#endif

static volatile int zero = 0;

static unsigned long pages(const unsigned char *p, int n) {
    unsigned long v = 0;
    for (int i = 0; i < n && p[i] >= '0' && p[i] <= '9'; i++) v = v * 10 + (p[i] - '0');
    return v;
}

__attribute__((export_name("run"))) unsigned long long run(const unsigned char *in, int len) {
    if (len < 1) return out(in, 0);
    const unsigned char *rest = in + 1;
    int n = len - 1;
#ifdef ALWAYS
    switch (ALWAYS) { /* -DALWAYS="'t'": the same action whatever the input (an Arrow stream, in a tool) */
#else
    switch (in[0]) {
#endif
    case 'e': return out(rest, n);
    case 'v': return code(VERSION);
#ifndef PURE
    case 'p': return code(event_publish(rest, n));
    case 'g': return code(log_line(rest, n));
    case 'r': return code(result_put(rest, n));
    case 'o': return code(object_put(rest, n));
    case 'x': return code(event_publish((const unsigned char *)0xFFFFFF00ul, 4096));
#endif
#ifdef SNEAKY
    case 's': return code(fd_write(1, 0, 0, 0));
#endif
    case 't': __builtin_trap();
    case 'l': for (;;) { zero = zero + 1; }
    case 'm':
        for (;;) {
            if (__builtin_wasm_memory_grow(0, 16) == (unsigned long)-1) __builtin_trap();
        }
    case 'M':
        for (;;) {
            if (__builtin_wasm_memory_grow(0, __builtin_wasm_memory_size(0)) == (unsigned long)-1) __builtin_trap();
        }
    case 'k':
        __builtin_wasm_memory_grow(0, pages(rest, n));
        __builtin_trap();
    case 'w': {
        unsigned long old = __builtin_wasm_memory_grow(0, pages(rest, n));
        *(volatile unsigned char *)(old * 65536ul) = 1; /* -1 * 65536 wraps to 0xFFFF0000: outside memory */
        return code((int)old);
    }
    case 'd': return code(10 / zero);
    case 'f': return (unsigned long long)-5ll;
    case 'b': return out((const unsigned char *)0x7FFFFFF0ul, 4096);
    }
    static const unsigned char none[] = "none";
    return out(none, 4);
}
