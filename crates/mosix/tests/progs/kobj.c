/* Kernel objects inside the process: a pipe holding bytes (both ends open), an eventfd
 * with a count, an epoll instance watching both (edge- and level-triggered). After a line
 * on stdin (sent after the restart) it checks that they still are what they were;
 * exits with 8. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <unistd.h>

int main(void) {
    int p[2];
    if (pipe2(p, O_NONBLOCK))
        return 1;
    if (write(p[1], "pipe bytes", 10) != 10)
        return 1;
    int ev = eventfd(41, EFD_SEMAPHORE);
    int ep = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event e = {.events = EPOLLIN, .data.u64 = 0x1234};
    epoll_ctl(ep, EPOLL_CTL_ADD, p[0], &e);
    e.events = EPOLLIN | EPOLLET;
    e.data.u64 = 0x5678;
    epoll_ctl(ep, EPOLL_CTL_ADD, ev, &e);
    printf("ready\n");
    fflush(stdout);
    char line[64];
    if (read(0, line, sizeof line) <= 0)
        return 1;
    struct epoll_event got[4];
    int n = epoll_wait(ep, got, 4, 1000);
    uint64_t sum = 0;
    for (int i = 0; i < n; i++)
        sum += got[i].data.u64;
    printf("epoll: %d ready, data sum %#llx\n", n, (unsigned long long)sum);
    char buf[32] = "";
    printf("pipe: %.*s\n", (int)read(p[0], buf, sizeof buf), buf);
    printf("pipe flags: %s\n", fcntl(p[0], F_GETFL) & O_NONBLOCK ? "nonblocking" : "blocking");
    uint64_t v = 0;
    if (read(ev, &v, 8) != 8)
        return 1;
    printf("eventfd: semaphore read %llu\n", (unsigned long long)v);
    printf("epoll is cloexec: %s\n", fcntl(ep, F_GETFD) & FD_CLOEXEC ? "yes" : "no");
    return 8;
}
