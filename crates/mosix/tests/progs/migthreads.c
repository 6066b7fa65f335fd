/* A multi-threaded job in phases for migration tests: four workers, each with its own
 * thread-local sum, do one round of work under a shared mutex per line read from stdin,
 * while a fifth thread sleeps in a condition variable until the end. Each phase prints
 * the counter, whether getpid() and every thread's gettid() are what they were at the
 * start, and the line. Output is the same wherever and however often it moved. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <unistd.h>

#define NW 4
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t go = PTHREAD_COND_INITIALIZER, done = PTHREAD_COND_INITIALIZER;
static pthread_cond_t end_cv = PTHREAD_COND_INITIALIZER;
static int round_no, finished, ended;
static long counter;
static __thread unsigned long mine;
static unsigned long sums[NW];
static pid_t tids[NW + 1];
static int same[NW + 1];

static void *worker(void *arg) {
    long i = (long)arg;
    tids[i] = gettid();
    unsigned long x = 0x9E3779B97F4A7C15ul * (unsigned long)(i + 1);
    for (int r = 1;; r++) {
        pthread_mutex_lock(&mu);
        while (round_no < r && !ended)
            pthread_cond_wait(&go, &mu);
        pthread_mutex_unlock(&mu);
        if (ended)
            return 0;
        for (int k = 0; k < 200000; k++) {
            x = x * 6364136223846793005ul + 1442695040888963407ul;
            mine += x >> 61;
            if (k % 1000 == 0) {
                pthread_mutex_lock(&mu);
                counter++;
                pthread_mutex_unlock(&mu);
            }
        }
        pthread_mutex_lock(&mu);
        sums[i] = mine;
        same[i] = gettid() == tids[i];
        finished++;
        pthread_cond_signal(&done);
        pthread_mutex_unlock(&mu);
    }
}

static void *sleeper(void *arg) {
    (void)arg;
    tids[NW] = gettid();
    pthread_mutex_lock(&mu);
    while (!ended)
        pthread_cond_wait(&end_cv, &mu);
    pthread_mutex_unlock(&mu);
    printf("sleeper woke, tid %s\n", gettid() == tids[NW] ? "same" : "changed");
    return 0;
}

int main(void) {
    pid_t me = getpid();
    pthread_t t[NW + 1];
    for (long i = 0; i < NW; i++)
        pthread_create(&t[i], 0, worker, (void *)i);
    pthread_create(&t[NW], 0, sleeper, 0);
    printf("start pid=%d threads %d\n", (int)me, NW + 1);
    fflush(stdout);
    char line[256];
    for (int phase = 0; fgets(line, sizeof line, stdin); phase++) {
        pthread_mutex_lock(&mu);
        finished = 0;
        round_no++;
        pthread_cond_broadcast(&go);
        while (finished < NW)
            pthread_cond_wait(&done, &mu);
        unsigned long s = 0;
        int tid_same = 1;
        for (int i = 0; i < NW; i++)
            s += sums[i], tid_same &= same[i];
        printf("phase %d counter=%ld sums=%lu samepid=%d sametids=%d got %s", phase, counter, s,
               getpid() == me, tid_same, line);
        fflush(stdout);
        pthread_mutex_unlock(&mu);
    }
    pthread_mutex_lock(&mu);
    ended = 1;
    pthread_cond_broadcast(&go);
    pthread_cond_broadcast(&end_cv);
    pthread_mutex_unlock(&mu);
    for (int i = 0; i <= NW; i++)
        pthread_join(t[i], 0);
    printf("end\n");
    return 5;
}
