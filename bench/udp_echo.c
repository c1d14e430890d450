/*
 * The UDP reference for bench/run: a single-threaded UDP echo server in plain C. One blocking
 * recvmmsg takes up to 64 datagrams (returning as soon as one is there, MSG_WAITFORONE), one
 * sendmmsg sends each back to its source, from the same buffers. Two system calls per batch and
 * no other work: what it costs is nearly all the kernel's. A measuring stick, not a server: no
 * rate limit, no reserved-port check, no metrics, no drain.
 *
 * Build: cc -O2 -o udp_echo bench/udp_echo.c    Run: udp_echo PORT  (listens on 127.0.0.1)
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define BATCH 64
#define SLOT 65536
#define SOCKET_BUFFER (4 << 20)

static char data[BATCH][SLOT];
static struct sockaddr_storage names[BATCH];
static struct iovec iov[BATCH];
static struct mmsghdr msgs[BATCH];

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s PORT\n", argv[0]);
        return 2;
    }
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    int size = SOCKET_BUFFER;
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof size);
    setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, sizeof size);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((unsigned short)atoi(argv[1]))};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(fd, (struct sockaddr *)&addr, sizeof addr) < 0) {
        perror("bind");
        return 1;
    }
    for (;;) {
        for (int i = 0; i < BATCH; i++) {
            iov[i].iov_base = data[i];
            iov[i].iov_len = SLOT;
            memset(&msgs[i].msg_hdr, 0, sizeof msgs[i].msg_hdr);
            msgs[i].msg_hdr.msg_name = &names[i];
            msgs[i].msg_hdr.msg_namelen = sizeof names[i];
            msgs[i].msg_hdr.msg_iov = &iov[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
        }
        int n = recvmmsg(fd, msgs, BATCH, MSG_WAITFORONE, NULL);
        if (n < 0) {
            if (errno == EINTR) continue;
            perror("recvmmsg");
            return 1;
        }
        for (int i = 0; i < n; i++) iov[i].iov_len = msgs[i].msg_len;
        /* Each reply to the address its datagram came from; one that fails is skipped. */
        int at = 0;
        while (at < n) {
            int sent = sendmmsg(fd, msgs + at, (unsigned)(n - at), 0);
            if (sent < 0) {
                if (errno == EINTR) continue;
                at++;
                continue;
            }
            at += sent;
        }
    }
}
