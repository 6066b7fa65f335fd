/* Prints its PID and CLOCK_MONOTONIC on every line while it computes, and checks that
 * CLOCK_MONOTONIC and CLOCK_BOOTTIME never go backwards. After each line it reads one
 * byte of stdin (returns at once on /dev/null; a test can pace it with a pipe). */
#include <stdio.h>
#include <time.h>
#include <unistd.h>

static long long now(clockid_t c) {
    struct timespec ts;
    clock_gettime(c, &ts);
    return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

int main(void) {
    long long last_mono = now(CLOCK_MONOTONIC), last_boot = now(CLOCK_BOOTTIME);
    volatile unsigned long sum = 0;
    for (int i = 0; i < 16; i++) {
        for (unsigned long k = 0; k < 40000000UL; k++) sum += k % 7;
        long long mono = now(CLOCK_MONOTONIC), boot = now(CLOCK_BOOTTIME);
        if (mono < last_mono) printf("BACKWARDS monotonic %lld < %lld\n", mono, last_mono);
        if (boot < last_boot) printf("BACKWARDS boottime %lld < %lld\n", boot, last_boot);
        last_mono = mono;
        last_boot = boot;
        printf("step %d sum %lu pid %d mono %lld\n", i, sum, (int)getpid(), mono);
        fflush(stdout);
        char c;
        if (read(0, &c, 1) < 0) perror("read");
    }
    printf("done %lu pid %d\n", sum, (int)getpid());
    return 6;
}
