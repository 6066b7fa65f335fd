/* Fills a large heap (MiB from argv[1]) with pseudo-random data, then checksums it in
 * passes, printing each; ends by raising SIGUSR2 (default action: terminate), so the
 * restarted process must die by the same signal. */
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
int main(int argc, char **argv) {
    size_t mib = argc > 1 ? strtoul(argv[1], 0, 10) : 256;
    size_t n = mib * 1024 * 1024 / 8;
    uint64_t *h = malloc(n * 8);
    if (!h) return 2;
    uint64_t x = 88172645463325252ULL;
    for (size_t i = 0; i < n; i++) { x ^= x << 13; x ^= x >> 7; x ^= x << 17; h[i] = x; }
    printf("filled %zu MiB\n", mib); fflush(stdout);
    uint64_t sum = 0;
    for (int pass = 0; pass < 12; pass++) {
        for (size_t i = 0; i < n; i++) sum = sum * 31 + (h[i] ^ (uint64_t)pass);
        for (size_t i = pass; i < n; i += 4096) h[i] += sum;
        printf("pass %d %016llx\n", pass, (unsigned long long)sum); fflush(stdout);
    }
    raise(SIGUSR2);
    return 0;
}
