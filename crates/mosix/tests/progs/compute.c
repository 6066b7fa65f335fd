/* CPU-bound loop (Collatz lengths) printing progress; built static by the tests.
 * Exits with status 7. */
#include <stdio.h>
int main(void) {
    unsigned long long best = 0, arg = 0, total = 0;
    for (unsigned long long n = 1; n < 6000000; n++) {
        unsigned long long x = n, len = 0;
        while (x != 1) { x = (x & 1) ? 3 * x + 1 : x / 2; len++; }
        total += len;
        if (len > best) { best = len; arg = n; }
        if (n % 500000 == 0) { printf("%llu best %llu at %llu total %llu\n", n, best, arg, total); fflush(stdout); }
    }
    printf("done %llu\n", total);
    return 7;
}
