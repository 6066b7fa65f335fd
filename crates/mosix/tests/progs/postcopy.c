/* A job with a large buffer that it reads only at its end, and before that a loop that
 * touches nothing but its stack and writes through raw system calls (no libc state).
 * Restarted with `mosix restart --lazy -`, it runs on before the buffer's memory has
 * arrived. Prints "tick N" lines, then the buffer's sum and the loop's result.
 * With "fork", after each tick from the 10th a child (made and ended by raw system
 * calls) prints a sum of the buffer, and the parent waits for it.
 * Usage: postcopy [MiB] [ticks] [fork] */
#include <stdint.h>
#include <stdlib.h>
#include <sys/mman.h>

static long raw_write(long fd, const void *b, unsigned long n)
{
	long r;
	__asm__ volatile("syscall"
			 : "=a"(r)
			 : "a"(1L), "D"(fd), "S"(b), "d"(n)
			 : "rcx", "r11", "memory");
	return r;
}

static long raw3(long nr, long a, long b, long c)
{
	long r;
	register long r10 __asm__("r10") = 0;
	__asm__ volatile("syscall"
			 : "=a"(r)
			 : "a"(nr), "D"(a), "S"(b), "d"(c), "r"(r10)
			 : "rcx", "r11", "memory");
	return r;
}

/* "WORD N\n" (N in hex if hex), from a buffer on the stack. */
static void say(const char *word, uint64_t n, int hex)
{
	char b[64];
	int i = 0;
	while (*word)
		b[i++] = *word++;
	b[i++] = ' ';
	char d[24];
	int k = 0;
	unsigned base = hex ? 16 : 10;
	do {
		d[k++] = "0123456789abcdef"[n % base];
		n /= base;
	} while (n);
	while (k)
		b[i++] = d[--k];
	b[i++] = '\n';
	raw_write(1, b, i);
}

int main(int argc, char **argv)
{
	uint64_t mib = argc > 1 ? strtoull(argv[1], 0, 10) : 64;
	uint64_t ticks = argc > 2 ? strtoull(argv[2], 0, 10) : 40;
	uint64_t n = (mib << 20) / 8;
	uint64_t *big = mmap(0, n * 8, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (big == MAP_FAILED)
		return 1;
	for (uint64_t i = 0; i < n; i++)
		big[i] = (i + 1) * 0x9E3779B97F4A7C15ull;
	int forks = argc > 3;
	volatile uint64_t acc = 1;
	uint64_t sum = 0;
	for (uint64_t t = 1; t <= ticks; t++) {
		for (long k = 0; k < 20000000; k++)
			acc = acc * 6364136223846793005ull + 1442695040888963407ull;
		say("tick", t, 0);
		if (forks && t >= 10) {
			long child = raw3(57 /* fork */, 0, 0, 0);
			if (child == 0) {
				for (uint64_t i = 0; i < n; i++)
					sum = sum * 31 + big[i] * t;
				say("child", sum, 1);
				raw3(60 /* exit */, 0, 0, 0);
			}
			int st = 0;
			raw3(61 /* wait4 */, child, (long)&st, 0);
		}
	}
	for (uint64_t i = 0; i < n; i++)
		sum = sum * 31 + big[i];
	say("sum", sum, 1);
	say("acc", acc, 1);
	return 0;
}
