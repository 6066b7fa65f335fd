/* A SIGALRM handler driven by an interval timer, a SIGUSR1 that stays pending (blocked)
 * until the end, and an alternate signal stack. Output is independent of timing. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
static volatile sig_atomic_t ticks, usr1, onalt;
static char altstack[65536];
static void on_alrm(int s) { (void)s; ticks++; }
static void on_usr1(int s) {
    (void)s; usr1++;
    stack_t ss; sigaltstack(NULL, &ss);
    onalt = (ss.ss_flags & SS_ONSTACK) != 0;
}
int main(void) {
    stack_t ss = { .ss_sp = altstack, .ss_size = sizeof altstack, .ss_flags = 0 };
    sigaltstack(&ss, NULL);
    struct sigaction sa; memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_alrm; sa.sa_flags = SA_RESTART; sigaction(SIGALRM, &sa, NULL);
    sa.sa_handler = on_usr1; sa.sa_flags = SA_ONSTACK; sigaction(SIGUSR1, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
    sigset_t set; sigemptyset(&set); sigaddset(&set, SIGUSR1);
    sigprocmask(SIG_BLOCK, &set, NULL);
    raise(SIGUSR1); /* pending until unblocked below */
    struct itimerval it = { { 0, 20000 }, { 0, 20000 } };
    setitimer(ITIMER_REAL, &it, NULL);
    int printed = 0;
    unsigned long work = 0;
    while (printed < 100) {
        work++;
        /* Every tenth tick once, in order, however late this loop sees them. */
        if (ticks >= printed + 10) { printed += 10; printf("tick %d\n", printed); fflush(stdout); }
    }
    sigset_t pend; sigpending(&pend);
    printf("usr1 pending %d handled %d\n", sigismember(&pend, SIGUSR1), (int)usr1);
    sigprocmask(SIG_UNBLOCK, &set, NULL);
    printf("usr1 handled %d on altstack %d\n", (int)usr1, (int)onalt);
    struct sigaction cur; sigaction(SIGPIPE, NULL, &cur);
    printf("sigpipe ignored %d\n", cur.sa_handler == SIG_IGN);
    return 0;
}
