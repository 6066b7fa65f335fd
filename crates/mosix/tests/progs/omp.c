/* OpenMP: ten phases of a parallel checksum (integer reduction: the same whatever the
 * schedule), one line per phase. */
#include <omp.h>
#include <stdio.h>

int main(void) {
    unsigned long total = 0;
    printf("threads %d\n", omp_get_max_threads());
    fflush(stdout);
    for (int phase = 0; phase < 10; phase++) {
        unsigned long sum = 0;
#pragma omp parallel for reduction(+ : sum) schedule(static)
        for (long i = 0; i < 6000000; i++) {
            unsigned long x = (unsigned long)i * 2654435761ul + (unsigned long)phase;
            for (int j = 0; j < 8; j++)
                x ^= x << 13, x ^= x >> 7, x ^= x << 17;
            sum += x & 0xffff;
        }
        total += sum;
        printf("phase %d: %lu\n", phase, sum);
        fflush(stdout);
    }
    printf("checksum %lu\n", total);
    return 0;
}
