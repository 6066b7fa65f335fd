/* Keeps its state in AVX registers (ymm0-ymm8) inside long assembly loops, under a
 * non-default SSE rounding mode; any lost register or MXCSR bit changes the output. */
#include <stdint.h>
#include <stdio.h>
#include <xmmintrin.h>
static void rounds(uint64_t *st, double *fs, const double *inc, long n) {
    __asm__ volatile(
        "vmovdqu 0(%0), %%ymm0\n\t vmovdqu 32(%0), %%ymm1\n\t"
        "vmovdqu 64(%0), %%ymm2\n\t vmovdqu 96(%0), %%ymm3\n\t"
        "vmovupd 0(%1), %%ymm4\n\t vmovupd 32(%1), %%ymm5\n\t"
        "vmovupd 64(%1), %%ymm6\n\t vmovupd 96(%1), %%ymm7\n\t"
        "vmovupd (%2), %%ymm8\n\t"
        "1:\n\t"
#define XS(r) "vpsllq $13, %%" r ", %%ymm10\n\t vpxor %%ymm10, %%" r ", %%" r "\n\t" \
              "vpsrlq $7, %%" r ", %%ymm10\n\t vpxor %%ymm10, %%" r ", %%" r "\n\t" \
              "vpsllq $17, %%" r ", %%ymm10\n\t vpxor %%ymm10, %%" r ", %%" r "\n\t"
        XS("ymm0") XS("ymm1") XS("ymm2") XS("ymm3")
        "vaddpd %%ymm8, %%ymm4, %%ymm4\n\t vaddpd %%ymm8, %%ymm5, %%ymm5\n\t"
        "vaddpd %%ymm8, %%ymm6, %%ymm6\n\t vaddpd %%ymm8, %%ymm7, %%ymm7\n\t"
        "vmulpd %%ymm8, %%ymm8, %%ymm11\n\t"
        "dec %3\n\t jnz 1b\n\t"
        "vmovdqu %%ymm0, 0(%0)\n\t vmovdqu %%ymm1, 32(%0)\n\t"
        "vmovdqu %%ymm2, 64(%0)\n\t vmovdqu %%ymm3, 96(%0)\n\t"
        "vmovupd %%ymm4, 0(%1)\n\t vmovupd %%ymm5, 32(%1)\n\t"
        "vmovupd %%ymm6, 64(%1)\n\t vmovupd %%ymm7, 96(%1)\n\t"
        "vzeroupper\n\t"
        : "+r"(st), "+r"(fs), "+r"(inc), "+r"(n)
        :
        : "memory", "cc", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7",
          "xmm8", "xmm10", "xmm11");
}
int main(void) {
    _MM_SET_ROUNDING_MODE(_MM_ROUND_UP);
    uint64_t st[16]; double fs[16], inc[4] = { 0.1, 0.2, 0.3, 0.7 };
    for (int i = 0; i < 16; i++) { st[i] = 0x9E3779B97F4A7C15ULL * (i + 1); fs[i] = i * 0.5; }
    printf("start\n"); fflush(stdout);
    for (int r = 0; r < 8; r++) {
        rounds(st, fs, inc, 40000000);
        uint64_t h = 0; for (int i = 0; i < 16; i++) h = h * 1000003 ^ st[i];
        printf("round %d %016llx %.17g %.17g\n", r, (unsigned long long)h, fs[0], fs[15]); fflush(stdout);
    }
    return 0;
}
