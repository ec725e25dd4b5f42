//! A gcc-built test program BOLT has something to do with: a hot loop over a few branchy
//! functions, printing a result that depends on all of them (`prog N`; exit 2 with a
//! usage message on a bad N).
// Each test uses the part of this it needs.
#![allow(dead_code)]

/// A hot loop over a few functions; prints a result that depends on all of them.
pub const PROGRAM: &str = r#"
#include <stdio.h>
#include <stdlib.h>
static unsigned long mix(unsigned long x) { x ^= x >> 13; x *= 0x9E3779B97F4A7C15UL; return x ^ (x >> 29); }
__attribute__((noinline)) unsigned long step_a(unsigned long s, unsigned long i) { return (i % 7 == 3) ? s + mix(i) : s ^ (i * 3); }
__attribute__((noinline)) unsigned long step_b(unsigned long s, unsigned long i) { return (s << 1 | s >> 63) + (i & 0xff); }
__attribute__((noinline)) unsigned long step_c(unsigned long s, unsigned long i) {
    switch (i & 7) { case 0: return s * 31 + i; case 1: return s ^ 0x5555; case 2: return s + (i >> 3);
    case 3: return s - i; case 4: return mix(s); case 5: return s | (i << 7); case 6: return s & ~i; default: return s + 1; }
}
__attribute__((noinline)) unsigned long step_d(unsigned long s, unsigned long i) {
    switch ((i >> 3) & 7) { case 0: return s * 17 + (i ^ 0x33); case 1: return s ^ (s >> 7); case 2: return s + mix(i >> 5);
    case 3: return (s << 3) - i; case 4: return s ^ mix(s + i); case 5: return s | (i << 11); case 6: return s & (~i | 0xf0f0); default: return s + 3; }
}
__attribute__((noinline)) unsigned long step_e(unsigned long s, unsigned long i) {
    unsigned long t = s;
    for (int k = 0; k < 3; k++) { t = (t ^ (i + k)) * 0x100000001B3UL; if (t & 0x10) t += mix(t); else t -= k; }
    return t;
}
__attribute__((noinline)) unsigned long step_f(unsigned long s, unsigned long i) {
    switch ((i >> 6) & 7) { case 0: return s + 0x1234567; case 1: return s * 5 - (i >> 2); case 2: return s ^ (i * 0x9E37);
    case 3: return s + (s >> 11); case 4: return s - mix(i); case 5: return s ^ (s << 13); case 6: return s + i * i; default: return s ^ 0xabcdef; }
}
__attribute__((noinline)) unsigned long hot_loop(unsigned long n) {
    unsigned long s = 1;
    for (unsigned long i = 0; i < n; i++) {
        s = step_a(s, i);
        if (i & 1) s = step_b(s, i); else s = step_c(s, i);
        if ((i & 3) == 2) s = step_d(s, i);
        if ((i & 15) == 5) s = step_e(s, i);
        if ((i & 7) == 1) s = step_f(s, i);
    }
    return s;
}
__attribute__((noinline)) int usage(const char *why) { fprintf(stderr, "usage: prog N (%s)\n", why); return 2; }
__attribute__((noinline)) unsigned long checksum(const char *text) { unsigned long h = 5381; while (*text) h = h * 33 + (unsigned char)*text++; return h; }
int main(int argc, char **argv) {
    if (argc < 2) return usage("missing N");
    char *end; unsigned long n = strtoul(argv[1], &end, 10);
    if (*end || n == 0) return usage("N must be a positive number");
    printf("result %lu check %lu\n", hot_loop(n), checksum(argv[1]));
    return 0;
}
"#;

/// Iterations of a profiled run (~0.3 s here).
pub const WORK: &str = "30000000";
/// Iterations of a quick check run.
pub const QUICK: &str = "300000";
