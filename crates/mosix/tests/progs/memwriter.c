/* Keeps writing its memory while it runs and checks all of it after every pass: a
 * process whose memory changes under a checkpoint or a move. argv: MiB of memory,
 * passes (0: until a line arrives on stdin; then it prints "done P" after its last pass
 * P), MiB written per second (0: as fast as it can), pages written per pass.
 * Every 8-byte word of page i holds i, the page's generation and the word's place; a
 * pass rewrites pages chosen by a fixed pseudo-random sequence, then reads every page
 * back against its generation. Prints "pass P <checksum of the generations>" (the
 * same on every run), or "BAD page I word W" and exits 3 at the first wrong word. */
#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static void pause_ns(long ns) {
    struct timespec t = {ns / 1000000000L, ns % 1000000000L};
    while (nanosleep(&t, &t) != 0 && errno == EINTR) {}
}

static uint64_t word(uint64_t page, uint64_t gen, uint64_t w) {
    return (page << 40) ^ (gen << 12) ^ w ^ 0x9e3779b97f4a7c15ULL;
}

int main(int argc, char **argv) {
    size_t mib = argc > 1 ? strtoul(argv[1], 0, 10) : 64;
    int passes = argc > 2 ? atoi(argv[2]) : 20;
    double rate = argc > 3 ? atof(argv[3]) : 0;
    size_t per_pass = argc > 4 ? strtoul(argv[4], 0, 10) : 256;
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
