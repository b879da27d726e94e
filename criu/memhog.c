/*
 * memhog — the init of the "memory" test image (criu/images.sh): holds MIB MiB of anonymous
 * memory filled with a pattern that is a pure function of SEED, and a counter.
 *
 * Environment: MIB (default 64), SEED (default: derived from the clock and pid at start, so that
 * two runs differ and a restored process cannot pass for a fresh one), TICK_MS (default 100),
 * REPORT_EVERY (ticks between checksum reports, default 50).
 *
 * Prints to stdout (unbuffered, one line each):
 *   memhog start pid=<pid> mib=<n> seed=<hex> checksum=<hex> fill_ms=<ms>
 *   count <n>                                                  every tick
 *   memhog report count=<n> checksum=<hex> verify=ok|BAD@<off>  every REPORT_EVERY ticks and on SIGUSR1
 *
 * checksum is a 64-bit hash over the whole region (read back from memory, not recomputed from
 * the seed); verify regenerates the pattern from the seed (which itself lives in the process's
 * memory) and compares word by word. After a CRIU restore, checksum equal to the value before the
 * checkpoint and verify=ok prove that every page came back; count continuing from its value at
 * the checkpoint proves the process was restored and not restarted.
 *
 * Anonymous private memory, written page by page: it is the process's memory (RSS), not page
 * cache or a tmpfs file, so CRIU has to carry it in pages-*.img. The pattern is pseudo-random
 * (splitmix64), so the images do not compress.
 *
 * Built statically with the host's gcc and glibc (libc6-dev ships libc.a): gcc -static -O2.
 */
#define _GNU_SOURCE
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t want_report;
static void on_usr1(int s) { (void)s; want_report = 1; }

static inline uint64_t splitmix64(uint64_t x) {
    x += 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

static uint64_t now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static uint64_t env_u64(const char *name, uint64_t def) {
    const char *v = getenv(name);
    return v && *v ? strtoull(v, NULL, 0) : def;
}

static uint64_t checksum(const uint64_t *w, size_t n) {
    uint64_t h = 0xcbf29ce484222325ULL;
    for (size_t i = 0; i < n; i++) {
        h ^= w[i];
        h *= 0x100000001b3ULL;
        h ^= h >> 29;
    }
    return h;
}

static long verify(const uint64_t *w, size_t n, uint64_t seed) {
    for (size_t i = 0; i < n; i++)
        if (w[i] != splitmix64(seed ^ i)) return (long)i;
    return -1;
}

int main(void) {
    uint64_t mib = env_u64("MIB", 64);
    uint64_t tick_ms = env_u64("TICK_MS", 100);
    uint64_t every = env_u64("REPORT_EVERY", 50);
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    uint64_t seed = env_u64("SEED", splitmix64((uint64_t)ts.tv_sec * 1000000000ULL + ts.tv_nsec) ^ (uint64_t)getpid());

    size_t bytes = (size_t)mib << 20, n = bytes / 8;
    uint64_t *w = NULL;
    if (bytes) {
        w = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (w == MAP_FAILED) { dprintf(2, "memhog: mmap %zu bytes failed\n", bytes); return 1; }
    }
    uint64_t t0 = now_ms();
    for (size_t i = 0; i < n; i++) w[i] = splitmix64(seed ^ i);
    uint64_t fill = now_ms() - t0;

    signal(SIGUSR1, on_usr1);
    dprintf(1, "memhog start pid=%d mib=%llu seed=%016llx checksum=%016llx fill_ms=%llu\n", getpid(),
            (unsigned long long)mib, (unsigned long long)seed, (unsigned long long)checksum(w, n),
            (unsigned long long)fill);

    for (uint64_t count = 0;; count++) {
        dprintf(1, "count %llu\n", (unsigned long long)count);
        if (want_report || (every && count % every == 0)) {
            want_report = 0;
            long bad = verify(w, n, seed);
            if (bad < 0)
                dprintf(1, "memhog report count=%llu checksum=%016llx verify=ok\n", (unsigned long long)count,
                        (unsigned long long)checksum(w, n));
            else
                dprintf(1, "memhog report count=%llu checksum=%016llx verify=BAD@%ld\n", (unsigned long long)count,
                        (unsigned long long)checksum(w, n), bad * 8);
        }
        struct timespec d = {(time_t)(tick_ms / 1000), (long)(tick_ms % 1000) * 1000000L};
        while (nanosleep(&d, &d) != 0 && !want_report) { /* EINTR: keep sleeping unless a report is due */ }
    }
}
