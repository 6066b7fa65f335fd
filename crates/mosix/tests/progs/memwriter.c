/* Keeps writing its memory while it runs and checks all of it after every pass: a
 * process whose memory changes under a checkpoint or a move. argv: MiB of memory,
 * passes (0: until a line arrives on stdin; then it prints "done P" after its last pass
 * P), MiB written per second (0: as fast as it can), pages written per pass.
 * Every 8-byte word of page i holds i, the page's generation and the word's place; a
 * pass rewrites pages chosen by a fixed pseudo-random sequence, then reads every page
 * back against its generation. Prints "pass P <checksum of the generations>" (the
 * same on every run), or "BAD page I word W" and exits 3 at the first wrong word.
 * argv[5], optional, letters of memory that changes shape while it runs:
 *   s: its main stack grows: every pass recurses 8 KiB deeper (from 192 KiB, past the
 *      stack's first extent, up to 6 MiB), each frame
 *      checked on the way back, and 64 KiB of main's own frame, written once, are
 *      checked after every pass (memory of an area that changed size but was not
 *      written since: a move must still carry it);
 *   h: its heap (brk) shrinks and grows: its memory is on the heap, and every pass
 *      takes 4 MiB more on top of it, fills and checks them, frees them and trims the
 *      heap (malloc_trim), so the heap's end moves while it is saved.
 * Prints "BAD stack|frame|heap ..." and exits 3 if one of these is wrong. */
#include <errno.h>
#include <malloc.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static void pause_ns(long ns) {
    struct timespec t = {ns / 1000000000L, ns % 1000000000L};
    while (nanosleep(&t, &t) != 0 && errno == EINTR) {}
}

static uint64_t word(uint64_t page, uint64_t gen, uint64_t w) {
    return (page << 40) ^ (gen << 12) ^ w ^ 0x9e3779b97f4a7c15ULL;
}

/* Recurses `left` more frames of 8 KiB below this one, each filled with a pattern of
 * its depth and checked on the way back. Returns 0 if all were right. */
__attribute__((noinline)) static int dive(int left, uint64_t salt) {
    volatile uint64_t frame[1024];
    for (int w = 0; w < 1024; w++) frame[w] = word(left, salt, w);
    int bad = left > 0 ? dive(left - 1, salt) : 0;
    for (int w = 0; w < 1024; w++)
        if (frame[w] != word(left, salt, w)) bad = 1;
    return bad;
}

/* Takes `mib` MiB on top of the heap, fills and checks them, frees them and gives the
 * top of the heap back. Returns 0 if all were right. */
static int churn_heap(size_t mib, uint64_t salt) {
    size_t n = mib << 17;
    uint64_t *p = malloc(n * 8);
    if (!p) return 1;
    for (size_t w = 0; w < n; w++) p[w] = word(w >> 9, salt, w & 511);
    int bad = 0;
    for (size_t w = 0; w < n; w++)
        if (p[w] != word(w >> 9, salt, w & 511)) bad = 1;
    free(p);
    malloc_trim(0);
    return bad;
}

int main(int argc, char **argv) {
    size_t mib = argc > 1 ? strtoul(argv[1], 0, 10) : 64;
    int passes = argc > 2 ? atoi(argv[2]) : 20;
    double rate = argc > 3 ? atof(argv[3]) : 0;
    size_t per_pass = argc > 4 ? strtoul(argv[4], 0, 10) : 256;
    const char *mode = argc > 5 ? argv[5] : "";
    int stack = strchr(mode, 's') != 0, heap = strchr(mode, 'h') != 0;
    /* All of its memory on the heap (brk), none in mappings of its own. */
    if (heap && !mallopt(M_MMAP_THRESHOLD, 1 << 30)) return 2;
    volatile uint64_t own[8192];
    for (int w = 0; w < 8192; w++) own[w] = word(w >> 9, 7, w & 511);
    size_t pages = mib * 256, words = 512;
    uint64_t *m = malloc(pages * 4096);
    uint32_t *gen = calloc(pages, sizeof *gen);
    if (!m || !gen) return 2;
    for (size_t i = 0; i < pages; i++)
        for (size_t w = 0; w < words; w++) m[i * words + w] = word(i, 0, w);
    printf("start: filled %zu MiB\n", mib);
    fflush(stdout);
    uint64_t x = 88172645463325252ULL;
    /* Pages of 4 KiB at `rate` MiB/s: a pause after every 16 pages. */
    long ns16 = rate > 0 ? (long)(16 * 4096 / (rate * 1048576.0) * 1e9) : 0;
    for (int pass = 0; passes == 0 || pass < passes; pass++) {
        if (passes == 0) {
            struct pollfd p = {0, POLLIN, 0};
            if (poll(&p, 1, 0) > 0) {
                printf("done %d\n", pass);
                return 0;
            }
        }
        for (size_t k = 0; k < per_pass; k++) {
            x ^= x << 13; x ^= x >> 7; x ^= x << 17;
            size_t i = x % pages;
            uint32_t g = ++gen[i];
            for (size_t w = 0; w < words; w++) m[i * words + w] = word(i, g, w);
            if (ns16 && k % 16 == 15) pause_ns(ns16);
        }
        if (stack) {
            /* From 192 KiB down (past the stack's first extent), so it grows at once. */
            int depth = pass < 744 ? 24 + pass : 768;
            if (dive(depth, pass)) {
                printf("BAD frame at pass %d\n", pass);
                fflush(stdout);
                return 3;
            }
            for (int w = 0; w < 8192; w++) {
                if (own[w] != word(w >> 9, 7, w & 511)) {
                    printf("BAD stack word %d\n", w);
                    fflush(stdout);
                    return 3;
                }
            }
        }
        if (heap && churn_heap(4, pass)) {
            printf("BAD heap at pass %d\n", pass);
            fflush(stdout);
            return 3;
        }
        uint64_t sum = 0;
        for (size_t i = 0; i < pages; i++) {
            for (size_t w = 0; w < words; w++) {
                if (m[i * words + w] != word(i, gen[i], w)) {
                    printf("BAD page %zu word %zu\n", i, w);
                    fflush(stdout);
                    return 3;
                }
            }
            sum = sum * 1000003 + gen[i];
        }
        printf("pass %d %016llx\n", pass, (unsigned long long)sum);
        fflush(stdout);
    }
    return 0;
}
