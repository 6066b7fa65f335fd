/* A 256 MiB (argv[1] MiB) heap job in phases for migration tests: fills the heap with
 * pseudo-random data, then for each line read from stdin checksums and changes it and
 * prints the checksum, and whether getpid() is still what it was at the start. Output is
 * the same wherever and however often it moved. Exits 7 at end of input. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
int main(int argc, char **argv) {
    size_t mib = argc > 1 ? strtoul(argv[1], 0, 10) : 256;
    size_t n = mib * 1024 * 1024 / 8;
    uint64_t *h = malloc(n * 8);
    if (!h) return 2;
    pid_t me = getpid();
    uint64_t x = 88172645463325252ULL;
    for (size_t i = 0; i < n; i++) { x ^= x << 13; x ^= x >> 7; x ^= x << 17; h[i] = x; }
    printf("start pid=%d filled %zu MiB\n", (int)me, mib); fflush(stdout);
    char line[256];
    uint64_t sum = 0;
    for (int phase = 0; fgets(line, sizeof line, stdin); phase++) {
        for (size_t i = 0; i < n; i++) sum = sum * 31 + (h[i] ^ (uint64_t)phase);
        for (size_t i = phase; i < n; i += 4096) h[i] += sum;
        printf("phase %d %016llx samepid=%d got %s", phase, (unsigned long long)sum,
               getpid() == me, line);
        fflush(stdout);
    }
    printf("end\n");
    return 7;
}
