/* The TCP scenario's server and client (nodes/tcp-test.sh), built statically into one image.
 *
 *   tcp-counter serve PORT
 *     Keeps its state in memory: a counter and a token drawn at start. Every 100 ms it sends each
 *     connected client one line "<n> <token>", n being the counter, which every line sent to any
 *     client increments (so the numbers go on across clients and connections). Logs "sent <n>"
 *     for each line, and each connection it accepts or drops. A restored copy has the same token
 *     and goes on from the counter; a restarted one draws a new token and begins at 0.
 *   tcp-counter client HOST PORT
 *     Connects, prints "<ms> got <n> <token>" for every line (ms: wall clock), and on EOF, error
 *     or 3 s of silence prints why and connects again (each attempt given 250 ms, then 100 ms
 *     apart) until it is served, then
 *     "<ms> connected after <gap> ms without a line (<attempts> attempts)".
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAXC 16

static long long now_ms(void) {
  struct timespec t;
  clock_gettime(CLOCK_REALTIME, &t);
  return t.tv_sec * 1000LL + t.tv_nsec / 1000000;
}

static int serve(int port) {
  unsigned long long token = 0;
  int r = open("/dev/urandom", O_RDONLY);
  if (r < 0 || read(r, &token, sizeof token) != sizeof token) token = (unsigned long long)now_ms() ^ getpid();
  if (r >= 0) close(r);
  int ls = socket(AF_INET, SOCK_STREAM, 0), one = 1;
  setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(port), .sin_addr.s_addr = htonl(INADDR_ANY) };
  if (bind(ls, (struct sockaddr *)&a, sizeof a) || listen(ls, 16)) { perror("listen"); return 1; }
  printf("serving on %d, token %016llx\n", port, token);
  fflush(stdout);
  int c[MAXC];
  char peer[MAXC][64];
  unsigned long long n = 0;
  for (int i = 0; i < MAXC; i++) c[i] = -1;
  long long next = now_ms() + 100;
  for (;;) {
    struct pollfd p = { .fd = ls, .events = POLLIN };
    long long wait = next - now_ms();
    if (poll(&p, 1, wait > 0 ? (int)wait : 0) > 0) {
      struct sockaddr_in from;
      socklen_t len = sizeof from;
      int s = accept(ls, (struct sockaddr *)&from, &len), i;
      for (i = 0; s >= 0 && i < MAXC && c[i] >= 0; i++) ;
      if (s >= 0 && i < MAXC) {
        c[i] = s;
        snprintf(peer[i], sizeof peer[i], "%s:%d", inet_ntoa(from.sin_addr), ntohs(from.sin_port));
        printf("accepted %s\n", peer[i]);
      } else if (s >= 0) close(s);
    }
    if (now_ms() < next) continue;
    next += 100;
    for (int i = 0; i < MAXC; i++) {
      if (c[i] < 0) continue;
      char line[64];
      int l = snprintf(line, sizeof line, "%llu %016llx\n", n, token);
      if (send(c[i], line, l, MSG_NOSIGNAL | MSG_DONTWAIT) == l) {
        printf("sent %llu\n", n++);
      } else {
        printf("dropped %s: %s\n", peer[i], strerror(errno));
        close(c[i]);
        c[i] = -1;
      }
    }
    fflush(stdout);
  }
}

static int client(const char *host, int port) {
  struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(port) };
  if (inet_pton(AF_INET, host, &a.sin_addr) != 1) { fprintf(stderr, "not an IPv4 address: %s\n", host); return 2; }
  long long last = 0; /* when the last line came */
  setvbuf(stdout, NULL, _IOLBF, 0);
  for (;;) {
    int s = -1, attempts = 0;
    const char *why = "";
    for (;;) {
      attempts++;
      s = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
      int e = 0;
      if (connect(s, (struct sockaddr *)&a, sizeof a) && errno == EINPROGRESS) {
        struct pollfd p = { .fd = s, .events = POLLOUT };
        socklen_t el = sizeof e;
        if (poll(&p, 1, 250) == 1) getsockopt(s, SOL_SOCKET, SO_ERROR, &e, &el);
        else e = ETIMEDOUT;
      } else if (errno != 0 && errno != EINPROGRESS) e = errno;
      if (!e) break;
      if (strcmp(why, strerror(e))) printf("%lld connect failed: %s\n", now_ms(), why = strerror(e));
      close(s);
      usleep(100000);
      errno = 0;
    }
    printf("%lld connected after %lld ms without a line (%d attempts)\n", now_ms(), last ? now_ms() - last : 0, attempts);
    char buf[4096];
    size_t have = 0;
    for (;;) {
      struct pollfd p = { .fd = s, .events = POLLIN };
      if (poll(&p, 1, 3000) != 1) { printf("%lld silent for 3 s: reconnecting\n", now_ms()); break; }
      ssize_t r = read(s, buf + have, sizeof buf - 1 - have);
      if (r == 0) { printf("%lld closed by the server (EOF)\n", now_ms()); break; }
      if (r < 0) { printf("%lld read failed: %s\n", now_ms(), strerror(errno)); break; }
      have += r;
      buf[have] = 0;
      char *line = buf, *nl;
      while ((nl = strchr(line, '\n'))) {
        *nl = 0;
        last = now_ms();
        printf("%lld got %s\n", last, line);
        line = nl + 1;
      }
      have = strlen(line);
      memmove(buf, line, have);
    }
    close(s);
  }
}

int main(int argc, char **argv) {
  if (argc == 3 && !strcmp(argv[1], "serve")) return serve(atoi(argv[2]));
  if (argc == 4 && !strcmp(argv[1], "client")) return client(argv[2], atoi(argv[3]));
  fprintf(stderr, "usage: tcp-counter serve PORT | tcp-counter client HOST PORT\n");
  return 2;
}
