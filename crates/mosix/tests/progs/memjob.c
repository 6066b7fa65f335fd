/* A memory job for ushering tests: touches argv[1] MiB a little at a time (4 MiB every
 * 100 ms), prints "filled", then computes over it until the file argv[2] exists, checking
 * that its memory still holds what it wrote. Prints "done ok" (or "done BAD") and exits 0. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
int main(int argc, char **argv) {
    size_t mib = argc > 1 ? strtoul(argv[1], 0, 10) : 64;
    const char *stop = argc > 2 ? argv[2] : "/nonexistent";
    size_t n = mib * 1024 * 1024 / 8, step = 4 * 1024 * 1024 / 8;
    uint64_t *h = malloc(n * 8);
    if (!h) return 2;
    printf("start\n"); fflush(stdout);
    struct timespec pause = {0, 100 * 1000 * 1000};
    for (size_t i = 0; i < n; i++) {
        h[i] = i * 0x9E3779B97F4A7C15ULL;
        if (i % step == step - 1) nanosleep(&pause, 0);
    }
    printf("filled\n"); fflush(stdout);
    int bad = 0;
    while (access(stop, F_OK) != 0) {
        for (size_t i = 0; i < n; i += 512)
            if (h[i] != i * 0x9E3779B97F4A7C15ULL) bad = 1;
    }
    printf("done %s\n", bad ? "BAD" : "ok");
    return 0;
}
