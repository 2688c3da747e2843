/*
 * bench_segments.c - latencies of pinning and unpinning volfs segments, and of what else a
 * program can do to make one page of memory reclaimable and take it back. Built and run by
 * scripts/bench_segments.py (cc -std=c99 -O2 -I volfs/include); usable by hand too:
 *
 *   bench_segments pairs FILE ITERATIONS SEED   pin + unpin of a random segment of FILE's table
 *                                                (every registered segment must be unpinned)
 *   bench_segments ioctl FILE ITERATIONS        VOLFS_IOC_VRANGE NONVOLATILE + VOLATILE, page 0
 *   bench_segments madvise ITERATIONS           madvise(MADV_FREE) + a store into the page
 *   bench_segments punch FILE ITERATIONS        fallocate(PUNCH_HOLE) + pwrite of page 0
 *   bench_segments clock ITERATIONS             nothing: what the two clock reads cost
 *
 * Each sample is one operation between two clock_gettime(CLOCK_MONOTONIC) reads (the vDSO's),
 * so it includes one read's worth of the clock; `clock` measures that. After ITERATIONS / 10
 * untimed warm-up operations, it prints one line:
 *   median=NS p99=NS mean=NS min=NS samples=N [loop=NS segments=N purged=N]
 * and exits 0; on an error it prints what failed on stderr and exits 1. For pairs, `loop` is
 * the mean of the same pairs again in a loop with no clock read between them, in the thread's
 * CPU time (so that time the thread spent descheduled on a busy machine does not count).
 */
#include <volfs.h>

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#define PAGE VOLFS_PAGE_SIZE

static void die(const char *what)
{
    fprintf(stderr, "bench_segments: %s: %s\n", what, strerror(errno));
    exit(1);
}

static uint64_t now_ns(void)
{
    struct timespec now;

    clock_gettime(CLOCK_MONOTONIC, &now);
    return (uint64_t)now.tv_sec * 1000000000u + (uint64_t)now.tv_nsec;
}

static uint64_t cpu_ns(void)
{
    struct timespec now;

    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &now);
    return (uint64_t)now.tv_sec * 1000000000u + (uint64_t)now.tv_nsec;
}

static int by_value(const void *one, const void *other)
{
    uint64_t a = *(const uint64_t *)one, b = *(const uint64_t *)other;

    return (a > b) - (a < b);
}

/* Sort the samples and print their summary (without the newline). */
static void summarise(uint64_t *samples, size_t count)
{
    uint64_t sum = 0;
    size_t i;

    qsort(samples, count, sizeof(*samples), by_value);
    for (i = 0; i < count; i++)
        sum += samples[i];
    printf("median=%llu p99=%llu mean=%.1f min=%llu samples=%lu",
           (unsigned long long)samples[count / 2],
           (unsigned long long)samples[(count * 99) / 100 < count ? (count * 99) / 100
                                                                   : count - 1],
           (double)sum / (double)count, (unsigned long long)samples[0], (unsigned long)count);
}

static uint64_t *allocate_samples(size_t count)
{
    uint64_t *samples = (uint64_t *)malloc(count * sizeof(*samples));

    if (samples == NULL)
        die("malloc");
    return samples;
}

/* xorshift64*: a random number that costs nothing next to what is measured. */
static uint64_t next_random(uint64_t *state)
{
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    return *state * 2685821657736338717u;
}

static int bench_pairs(const char *path, size_t iterations, uint64_t seed)
{
    struct volfs_segment_table table;
    uint32_t *segments, *order, i, count = 0;
    uint64_t *samples, state = seed | 1, loop;
    size_t n, warmup = iterations / 10, purged_count = 0;
    int fd = open(path, O_RDWR | O_CLOEXEC), purged;

    if (fd < 0)
        die(path);
    if (volfs_segments_open(fd, 0, &table) < 0)
        die("volfs_segments_open");
    close(fd);  /* the table lives while the benchmark's script keeps the file open */
    segments = (uint32_t *)malloc(table.capacity * sizeof(*segments));
    order = (uint32_t *)malloc((warmup + iterations) * sizeof(*order));
    if (segments == NULL || order == NULL)
        die("malloc");
    for (i = 0; i < table.capacity; i++) {
        int word = volfs_segment_state(&table, i);
        if (word == VOLFS_SEGMENT_UNPINNED)
            segments[count++] = i;
        else if (word != VOLFS_SEGMENT_FREE) {
            errno = EINVAL;
            die("a registered segment is not unpinned");
        }
    }
    if (count == 0) {
        errno = ENOENT;
        die("no segment in the table");
    }
    for (n = 0; n < warmup + iterations; n++)
        order[n] = segments[next_random(&state) % count];
    samples = allocate_samples(iterations);
    for (n = 0; n < warmup + iterations; n++) {
        uint64_t start = now_ns();
        if (volfs_segment_pin(&table, order[n], &purged) < 0)
            die("volfs_segment_pin");
        if (volfs_segment_unpin(&table, order[n]) < 0)
            die("volfs_segment_unpin");
        if (n >= warmup)
            samples[n - warmup] = now_ns() - start;
        purged_count += (size_t)purged;
    }
    loop = cpu_ns();
    for (n = warmup; n < warmup + iterations; n++) {
        if (volfs_segment_pin(&table, order[n], &purged) < 0)
            die("volfs_segment_pin");
        if (volfs_segment_unpin(&table, order[n]) < 0)
            die("volfs_segment_unpin");
        purged_count += (size_t)purged;
    }
    loop = cpu_ns() - loop;
    summarise(samples, iterations);
    printf(" loop=%.1f segments=%u purged=%lu\n", (double)loop / (double)iterations, count,
           (unsigned long)purged_count);
    volfs_segments_close(&table);
    return 0;
}

static int bench_ioctl(const char *path, size_t iterations)
{
    struct vrange_args pin, unpin;
    uint64_t *samples = allocate_samples(iterations);
    size_t n, warmup = iterations / 10;
    int fd = open(path, O_RDWR | O_CLOEXEC);

    if (fd < 0)
        die(path);
    memset(&pin, 0, sizeof(pin));
    pin.length = PAGE;
    pin.mode = VRANGE_NONVOLATILE;
    unpin = pin;
    unpin.mode = VRANGE_VOLATILE;
    for (n = 0; n < warmup + iterations; n++) {
        uint64_t start = now_ns();
        if (ioctl(fd, VOLFS_IOC_VRANGE, &pin) < 0)
            die("VOLFS_IOC_VRANGE NONVOLATILE");
        if (ioctl(fd, VOLFS_IOC_VRANGE, &unpin) < 0)
            die("VOLFS_IOC_VRANGE VOLATILE");
        if (n >= warmup)
            samples[n - warmup] = now_ns() - start;
    }
    summarise(samples, iterations);
    printf("\n");
    close(fd);
    return 0;
}

static int bench_madvise(size_t iterations)
{
    uint64_t *samples = allocate_samples(iterations);
    size_t n, warmup = iterations / 10;
    volatile char *page = (volatile char *)mmap(NULL, PAGE, PROT_READ | PROT_WRITE,
                                                MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

    if ((void *)page == MAP_FAILED)
        die("mmap");
    page[0] = 1;
    for (n = 0; n < warmup + iterations; n++) {
        uint64_t start = now_ns();
        if (madvise((void *)page, PAGE, MADV_FREE) < 0)
            die("madvise(MADV_FREE)");
        page[0] = (char)n;
        if (n >= warmup)
            samples[n - warmup] = now_ns() - start;
    }
    summarise(samples, iterations);
    printf("\n");
    return 0;
}

static int bench_punch(const char *path, size_t iterations)
{
    char page[PAGE];
    uint64_t *samples = allocate_samples(iterations);
    size_t n, warmup = iterations / 10;
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);

    if (fd < 0)
        die(path);
    memset(page, 'p', sizeof(page));
    if (pwrite(fd, page, PAGE, 0) != PAGE)
        die("pwrite");
    for (n = 0; n < warmup + iterations; n++) {
        uint64_t start = now_ns();
        if (fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, PAGE) < 0)
            die("fallocate(PUNCH_HOLE)");
        if (pwrite(fd, page, PAGE, 0) != PAGE)
            die("pwrite");
        if (n >= warmup)
            samples[n - warmup] = now_ns() - start;
    }
    summarise(samples, iterations);
    printf("\n");
    close(fd);
    unlink(path);
    return 0;
}

static int bench_clock(size_t iterations)
{
    uint64_t *samples = allocate_samples(iterations);
    size_t n;

    for (n = 0; n < iterations; n++) {
        uint64_t start = now_ns();
        samples[n] = now_ns() - start;
    }
    summarise(samples, iterations);
    printf("\n");
    return 0;
}

/* A positive count from the command line, or exit 2. */
static size_t count_of(const char *text)
{
    char *end;
    unsigned long long value = strtoull(text, &end, 10);

    if (*text == '\0' || *end != '\0' || value == 0 || value > (1ull << 32)) {
        fprintf(stderr, "bench_segments: not a count: %s\n", text);
        exit(2);
    }
    return (size_t)value;
}

int main(int argc, char **argv)
{
    const char *mode = argc > 1 ? argv[1] : "";

    if (strcmp(mode, "pairs") == 0 && argc == 5)
        return bench_pairs(argv[2], count_of(argv[3]), (uint64_t)count_of(argv[4]));
    if (strcmp(mode, "ioctl") == 0 && argc == 4)
        return bench_ioctl(argv[2], count_of(argv[3]));
    if (strcmp(mode, "madvise") == 0 && argc == 3)
        return bench_madvise(count_of(argv[2]));
    if (strcmp(mode, "punch") == 0 && argc == 4)
        return bench_punch(argv[2], count_of(argv[3]));
    if (strcmp(mode, "clock") == 0 && argc == 3)
        return bench_clock(count_of(argv[2]));
    fprintf(stderr, "usage: %s pairs FILE ITERATIONS SEED | ioctl FILE ITERATIONS | "
                    "madvise ITERATIONS | punch FILE ITERATIONS | clock ITERATIONS\n",
            argv[0]);
    return 2;
}
