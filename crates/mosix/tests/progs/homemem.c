/* A parent and its child sharing a page of MAP_SHARED memory (a family's shared memory,
 * which stays at the home node when either moves). The child copies what the parent
 * writes, times ten; the parent answers commands, one per line of stdin:
 *   set N   writes N to the page and waits until the child has answered: "b=N*10"
 *   futex   waits 10 ms on a word of the page it has not touched (the kernel reads it,
 *           not the program): "futex ETIMEDOUT" as at home
 * and prints "start" first. */
#include <errno.h>
#include <linux/futex.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

struct page {
    volatile int a, b;
    int word;
};

int main(void) {
    struct page *p = mmap(0, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
        return 1;
    pid_t kid = fork();
    if (kid == 0) {
        for (;;) {
            int a = p->a;
            if (p->b != a * 10)
                p->b = a * 10;
            usleep(2000);
        }
    }
    printf("start %d\n", kid);
    fflush(stdout);
    char line[64];
    while (fgets(line, sizeof line, stdin)) {
        int n;
        if (sscanf(line, "set %d", &n) == 1) {
            p->a = n;
            while (p->b != n * 10)
                usleep(1000);
            printf("b=%d\n", p->b);
        } else if (strncmp(line, "futex", 5) == 0) {
            struct timespec ts = {0, 10 * 1000 * 1000};
            long r = syscall(SYS_futex, &p->word, FUTEX_WAIT, 0, &ts, 0, 0);
            printf("futex %s\n", r == 0 ? "woken" : errno == ETIMEDOUT ? "ETIMEDOUT" : strerror(errno));
        }
        fflush(stdout);
    }
    kill(kid, SIGKILL);
    return 0;
}
