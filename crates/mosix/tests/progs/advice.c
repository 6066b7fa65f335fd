/* Memory with madvise advice: a 4 MiB area asking for transparent huge pages, one a child
 * does not get (MADV_DONTFORK), one a child gets zeroed (MADV_WIPEONFORK). Prints
 * "ready", waits until the file argv[1] exists (the test checkpoints it meanwhile), then
 * says what the areas' VmFlags are and what a child of it sees, and sums its data. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#define MIB (1UL << 20)

static void *area(size_t len, size_t align) {
    char *p = mmap(0, len + align, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) exit(2);
    uintptr_t a = ((uintptr_t)p + align - 1) & ~(uintptr_t)(align - 1);
    return (void *)a;
}

/* Whether the area at `a` has VmFlags `flag` in /proc/self/smaps. */
static int has_flag(void *a, const char *flag) {
    FILE *f = fopen("/proc/self/smaps", "r");
    char line[512];
    int in = 0, found = 0;
    unsigned long s, e;
    while (fgets(line, sizeof line, f)) {
        if (sscanf(line, "%lx-%lx ", &s, &e) == 2 && strchr(line, '-') < strchr(line, ' '))
            in = (uintptr_t)a >= s && (uintptr_t)a < e;
        else if (in && !strncmp(line, "VmFlags:", 8)) {
            char want[8];
            snprintf(want, sizeof want, " %s", flag);
            char *p = strstr(line, want);
            found = p && (p[3] == ' ' || p[3] == '\n');
            break;
        }
    }
    fclose(f);
    return found;
}

/* Whether `a` is mapped in this process (/proc/self/maps). */
static int mapped(void *a) {
    FILE *f = fopen("/proc/self/maps", "r");
    unsigned long s, e;
    int yes = 0;
    char line[512];
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "%lx-%lx", &s, &e) == 2 && (uintptr_t)a >= s && (uintptr_t)a < e) yes = 1;
    fclose(f);
    return yes;
}

int main(int argc, char **argv) {
    size_t hlen = 4 * MIB, len = 64 * 1024;
    uint64_t *huge = area(hlen, 2 * MIB);
    char *nofork = area(len, 4096), *wipe = area(len, 4096);
    if (madvise(huge, hlen, MADV_HUGEPAGE) || madvise(nofork, len, MADV_DONTFORK) ||
        madvise(wipe, len, MADV_WIPEONFORK))
        return 3;
    for (size_t i = 0; i < hlen / 8; i++) huge[i] = i * 2654435761u;
    memset(nofork, 0x33, len);
    memset(wipe, 0x5a, len);
    printf("ready\n");
    fflush(stdout);
    while (access(argv[1], F_OK)) usleep(10000);
    printf("hugepage %d dontfork %d wipeonfork %d\n", has_flag(huge, "hg"),
           has_flag(nofork, "dc"), has_flag(wipe, "wf"));
    fflush(stdout);
    pid_t c = fork();
    if (c == 0) {
        /* The child: no DONTFORK area, a zeroed WIPEONFORK one. */
        int zero = 1;
        for (size_t i = 0; i < len; i++) zero &= wipe[i] == 0;
        printf("child: dontfork area %s, wipeonfork area %s\n",
               mapped(nofork) ? "there" : "absent", zero ? "zeroed" : "copied");
        fflush(stdout);
        _exit(0);
    }
    waitpid(c, 0, 0);
    uint64_t sum = 0;
    for (size_t i = 0; i < hlen / 8; i++) sum += huge[i];
    printf("parent: sum %llx, wipeonfork area %s\n", (unsigned long long)sum,
           wipe[len - 1] == 0x5a ? "kept" : "lost");
    return 0;
}
