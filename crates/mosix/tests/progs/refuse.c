/* Holds one thing that cannot be checkpointed (argv[1]) and prints "tick" lines forever,
 * so a test can see that a refused checkpoint left it running. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/shm.h>
#include <sys/socket.h>
#include <unistd.h>
int main(int argc, char **argv) {
    const char *what = argc > 1 ? argv[1] : "";
    if (!strcmp(what, "shm") && argc > 2) { /* a writable shared mapping of the file argv[2] */
        int fd = open(argv[2], O_RDWR | O_CREAT, 0600);
        if (fd < 0 || ftruncate(fd, 4096)) return 2;
        char *p = mmap(0, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0); p[0] = 1; close(fd); }
    else if (!strcmp(what, "memfd")) { /* a memfd shared with a child (which also refuses) */
        int fd = memfd_create("both", 0);
        if (fd < 0 || ftruncate(fd, 4096)) return 2;
        if (fork() == 0) { for (;;) pause(); } }
    else if (!strcmp(what, "sysv")) { int id = shmget(IPC_PRIVATE, 4096, 0600); shmat(id, 0, 0); shmctl(id, IPC_RMID, 0); }
    else if (!strcmp(what, "socket")) { socket(AF_INET, SOCK_STREAM, 0); }
    else if (!strcmp(what, "pipe")) { int p[2]; if (pipe(p)) return 2; close(p[1]); /* one end only */ }
    else if (!strcmp(what, "child")) { if (fork() == 0) { for (;;) pause(); } }
    for (;;) { printf("tick\n"); fflush(stdout); usleep(20000); }
}
