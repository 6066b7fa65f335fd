/* Shared memory inside one process: a sealed memfd with data, mapped twice (one view at
 * an offset), its descriptor at an offset; MAP_SHARED anonymous memory written by a
 * thread. After a line on stdin (sent after the restart) it checks that all of it is as
 * it was and still shared; exits with 9. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define ANON (4 << 20)
static unsigned char *anon;

static void *fill(void *arg) {
    (void)arg;
    for (int i = 0; i < ANON / 2; i += 4096)
        anon[i] = (unsigned char)(i / 4096 + 1);
    return 0;
}

int main(void) {
    int fd = memfd_create("buf", MFD_ALLOW_SEALING);
    if (fd < 0 || ftruncate(fd, 3 * 4096) || write(fd, "hello memfd", 11) != 11)
        return 1;
    char *a = mmap(0, 3 * 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    char *b = mmap(0, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 4096);
    anon = mmap(0, ANON, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (a == MAP_FAILED || b == MAP_FAILED || anon == MAP_FAILED)
        return 1;
    a[2 * 4096] = 'z';
    fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK);
    lseek(fd, 5, SEEK_SET);
    pthread_t t;
    pthread_create(&t, 0, fill, 0);
    pthread_join(t, 0);
    printf("ready\n");
    fflush(stdout);
    char line[64];
    if (read(0, line, sizeof line) <= 0)
        return 1;
    b[0] = 'X';
    printf("views share: %s\n", a[4096] == 'X' ? "yes" : "no");
    char buf[16] = "";
    printf("pread: %.11s, %c\n", pread(fd, buf, 11, 0) == 11 ? buf : "?", a[2 * 4096]);
    printf("offset %ld\n", (long)lseek(fd, 0, SEEK_CUR));
    printf("seals %s\n", fcntl(fd, F_GET_SEALS) == F_SEAL_SHRINK ? "same" : "changed");
    printf("shrink %s\n", ftruncate(fd, 4096) ? "refused" : "allowed");
    char link[64], target[128] = "";
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    readlink(link, target, sizeof target - 1);
    printf("name %.10s\n", target);
    unsigned long sum = 0;
    for (int i = 0; i < ANON; i += 4096)
        sum += anon[i];
    printf("anon sum %lu\n", sum);
    return 9;
}
