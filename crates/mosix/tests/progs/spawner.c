/* Threads born and ending all the time: 8000 short-lived threads, four at a time, each
 * adding its number to a sum; a line every 500. A checkpoint must catch the threads
 * being born while it freezes the others. */
#include <pthread.h>
#include <stdio.h>

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static unsigned long sum;

static void *one(void *arg) {
    unsigned long x = (unsigned long)arg, s = 0;
    for (int i = 0; i < 2000; i++)
        s += (x * 2654435761ul + i) % 1009;
    pthread_mutex_lock(&mu);
    sum += s;
    pthread_mutex_unlock(&mu);
    return 0;
}

int main(void) {
    for (long i = 0; i < 8000; i += 4) {
        pthread_t t[4];
        for (int k = 0; k < 4; k++)
            pthread_create(&t[k], 0, one, (void *)(i + k));
        for (int k = 0; k < 4; k++)
            pthread_join(t[k], 0);
        if ((i + 4) % 500 == 0) {
            printf("%ld threads, sum %lu\n", i + 4, sum);
            fflush(stdout);
        }
    }
    return 0;
}
