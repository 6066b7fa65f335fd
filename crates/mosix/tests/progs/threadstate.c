/* Each of two threads makes its own state distinct (signal mask, a pending signal sent
 * to itself, alternate signal stack, name, FPU rounding mode, a thread-local value) and
 * notes it; "ready" is printed once both have. After a line on stdin (sent after the
 * restart), each checks that its state is as it noted and says so; exits with 7. */
#define _GNU_SOURCE
#include <fenv.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

struct noted {
    const char *name;
    pthread_barrier_t check;
    int sig, round;
    stack_t ss;
    long robust;
    pid_t tid;
};

static pthread_barrier_t ready;
static __thread long tls_value;

static void *thread(void *arg) {
    struct noted *n = arg;
    sigset_t m;
    sigemptyset(&m);
    sigaddset(&m, n->sig);
    pthread_sigmask(SIG_BLOCK, &m, 0);
    syscall(SYS_tgkill, getpid(), gettid(), n->sig);
    n->ss.ss_sp = malloc(65536);
    n->ss.ss_size = 65536;
    n->ss.ss_flags = 0;
    sigaltstack(&n->ss, 0);
    prctl(PR_SET_NAME, n->name);
    fesetround(n->round);
    tls_value = (long)n->sig * 1000;
    size_t len;
    syscall(SYS_get_robust_list, 0, &n->robust, &len);
    n->tid = gettid();
    pthread_barrier_wait(&ready);
    pthread_barrier_wait(&n->check);
    sigset_t p, now;
    sigpending(&p);
    pthread_sigmask(SIG_BLOCK, 0, &now);
    stack_t ss;
    sigaltstack(0, &ss);
    char name[16] = "";
    prctl(PR_GET_NAME, name);
    long robust;
    syscall(SYS_get_robust_list, 0, &robust, &len);
    volatile double one = 1.0, three = 3.0;
    double up = one / three;
    printf("%s: pending %s, blocked %s, altstack %s, name %s, rounding %s (%.17g), tls %ld, "
           "robust list %s, tid %s\n",
           n->name, sigismember(&p, n->sig) ? "yes" : "no",
           sigismember(&now, n->sig) ? "yes" : "no",
           ss.ss_sp == n->ss.ss_sp && ss.ss_size == n->ss.ss_size ? "same" : "changed", name,
           fegetround() == n->round ? "same" : "changed", up, tls_value,
           robust == n->robust ? "same" : "changed", gettid() == n->tid ? "same" : "changed");
    fflush(stdout);
    return 0;
}

int main(void) {
    struct noted n[2] = {{.name = "alpha", .sig = SIGUSR1, .round = FE_UPWARD},
                         {.name = "beta", .sig = SIGUSR2, .round = FE_DOWNWARD}};
    pthread_t t[2];
    pthread_barrier_init(&ready, 0, 3);
    for (int i = 0; i < 2; i++) {
        pthread_barrier_init(&n[i].check, 0, 2);
        pthread_create(&t[i], 0, thread, &n[i]);
    }
    pthread_barrier_wait(&ready);
    printf("ready\n");
    fflush(stdout);
    char buf[64];
    if (read(0, buf, sizeof buf) <= 0)
        return 1;
    /* One thread at a time, alpha first. */
    for (int i = 0; i < 2; i++) {
        pthread_barrier_wait(&n[i].check);
        pthread_join(t[i], 0);
    }
    printf("main: tid %s\n", gettid() == getpid() ? "is the pid" : "differs");
    return 7;
}
