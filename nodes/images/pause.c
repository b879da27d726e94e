/* The pods' infra process (like kubernetes' build/pause): sleeps, reaps, exits on SIGINT/SIGTERM.
 * Built statically by nodes/images/build.sh so that it runs in an image holding nothing else. */
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>
static void sigdown(int s) { (void)s; _exit(0); }
static void sigreap(int s) { (void)s; while (waitpid(-1, NULL, WNOHANG) > 0) ; }
int main(void) {
  struct sigaction a = { .sa_handler = sigdown }, r = { .sa_handler = sigreap, .sa_flags = SA_NOCLDSTOP };
  sigaction(SIGINT, &a, NULL); sigaction(SIGTERM, &a, NULL); sigaction(SIGCHLD, &r, NULL);
  for (;;) pause();
}
