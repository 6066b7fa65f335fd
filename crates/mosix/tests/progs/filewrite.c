/* Writes lines to the file argv[1], opened with O_APPEND when argv[2] is "append"
 * (else O_TRUNC), with CPU work between lines; reports each line on stdout. */
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
int main(int argc, char **argv) {
    if (argc < 3) return 2;
    int append = strcmp(argv[2], "append") == 0;
    int fd = open(argv[1], O_WRONLY | O_CREAT | (append ? O_APPEND : O_TRUNC), 0644);
    if (fd < 0) { perror("open"); return 2; }
    unsigned long long x = 1;
    for (int i = 0; i < 30; i++) {
        for (long k = 0; k < 6000000; k++) x = x * 6364136223846793005ULL + 1442695040888963407ULL;
        char line[128];
        int n = snprintf(line, sizeof line, "line %d %016llx\n", i, x);
        if (write(fd, line, n) != n) return 3;
        printf("wrote %d\n", i); fflush(stdout);
    }
    printf("offset %ld\n", (long)lseek(fd, 0, SEEK_CUR));
    close(fd);
    return 0;
}
