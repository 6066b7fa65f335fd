/* Holds one thing that cannot be checkpointed (argv[1]) and prints "tick" lines forever,
 * so a test can see that a refused checkpoint left it running. */
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/shm.h>
#include <sys/socket.h>
#include <unistd.h>
int main(int argc, char **argv) {
    const char *what = argc > 1 ? argv[1] : "";
    if (!strcmp(what, "shm")) { char *p = mmap(0, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0); p[0] = 1; }
    else if (!strcmp(what, "sysv")) { int id = shmget(IPC_PRIVATE, 4096, 0600); shmat(id, 0, 0); shmctl(id, IPC_RMID, 0); }
    else if (!strcmp(what, "socket")) { socket(AF_INET, SOCK_STREAM, 0); }
    else if (!strcmp(what, "pipe")) { int p[2]; if (pipe(p)) return 2; }
    else if (!strcmp(what, "child")) { if (fork() == 0) { for (;;) pause(); } }
    for (;;) { printf("tick\n"); fflush(stdout); usleep(20000); }
}
