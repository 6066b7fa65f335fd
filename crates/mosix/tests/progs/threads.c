/* Threads that a checkpoint must catch in every state: four workers adding to a shared
 * counter under a mutex (each also sums into its own thread-local variable), a waiter
 * sleeping in a condition variable until the workers are done, a sleeper in usleep(), and
 * a reader blocked in read() on stdin. Prints "half" when the counter is half way (the
 * main thread waits for that in a condition variable), then the results in a fixed
 * order; exits with status 3. */
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#define NW 4
#define ITER 1500000L
#define INNER 40

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t progress = PTHREAD_COND_INITIALIZER;
static pthread_cond_t finished = PTHREAD_COND_INITIALIZER;
static long counter;
static int done;
static __thread unsigned long tls_sum;
static unsigned long result[NW];
static int slept;
static char line[256];
static long got;

static void *worker(void *arg) {
    long i = (long)arg;
    unsigned long x = 0x9E3779B97F4A7C15ul * (unsigned long)(i + 1);
    for (long k = 0; k < ITER; k++) {
        for (int j = 0; j < INNER; j++)
            x = x * 6364136223846793005ul + 1442695040888963407ul;
        tls_sum += x >> 60;
        pthread_mutex_lock(&mu);
        if (++counter == NW * ITER / 2)
            pthread_cond_broadcast(&progress);
        pthread_mutex_unlock(&mu);
    }
    result[i] = tls_sum;
    return 0;
}

static void *waiter(void *arg) {
    (void)arg;
    pthread_mutex_lock(&mu);
    while (!done)
        pthread_cond_wait(&finished, &mu);
    long c = counter;
    pthread_mutex_unlock(&mu);
    printf("waiter woke: counter=%ld\n", c);
    fflush(stdout);
    return 0;
}

static void *sleeper(void *arg) {
    (void)arg;
    for (int i = 0; i < 200; i++) {
        usleep(5000);
        slept++;
    }
    return 0;
}

static void *reader(void *arg) {
    (void)arg;
    got = read(0, line, sizeof line - 1);
    return 0;
}

int main(void) {
    pthread_t w[NW], wt, st, rt;
    pthread_create(&rt, 0, reader, 0);
    pthread_create(&wt, 0, waiter, 0);
    pthread_create(&st, 0, sleeper, 0);
    for (long i = 0; i < NW; i++)
        pthread_create(&w[i], 0, worker, (void *)i);
    printf("started\n");
    fflush(stdout);
    pthread_mutex_lock(&mu);
    while (counter < NW * ITER / 2)
        pthread_cond_wait(&progress, &mu);
    pthread_mutex_unlock(&mu);
    printf("half\n");
    fflush(stdout);
    for (int i = 0; i < NW; i++)
        pthread_join(w[i], 0);
    printf("counter=%ld\n", counter);
    for (int i = 0; i < NW; i++)
        printf("worker %d: %lu\n", i, result[i]);
    fflush(stdout);
    pthread_mutex_lock(&mu);
    done = 1;
    pthread_cond_broadcast(&finished);
    pthread_mutex_unlock(&mu);
    pthread_join(wt, 0);
    pthread_join(st, 0);
    printf("sleeper: %d naps\n", slept);
    pthread_join(rt, 0);
    printf("read %ld bytes: %s", got, got > 0 ? line : "\n");
    return 3;
}
