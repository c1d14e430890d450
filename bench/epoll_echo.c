/*
 * The reference ceiling for bench/run: a single-threaded, edge-triggered epoll echo server in
 * plain C. Every read goes into one shared 64 KiB buffer and is written straight back; only what
 * the socket will not take at once is kept, in a buffer of the connection's own, so an idle
 * connection costs a few dozen bytes. It does the least work an echo can do in user space, so
 * what it costs is nearly all the kernel's. A measuring stick, not a server: no limits, no
 * metrics, no drain.
 *
 * Build: cc -O2 -o epoll_echo bench/epoll_echo.c    Run: epoll_echo PORT  (listens on 127.0.0.1)
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define BUF 65536

struct conn {
    int fd;
    size_t len, off; /* bytes read but not yet written back: pending[off..len] */
    char *pending;
};

static char shared[BUF];

static void drop_conn(int ep, struct conn *c) {
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    free(c->pending);
    free(c);
}

/* Echoes until the socket would block; returns -1 when the connection is done. */
static int pump(struct conn *c) {
    while (c->off < c->len) {
        ssize_t n = write(c->fd, c->pending + c->off, c->len - c->off);
        if (n < 0) return (errno == EAGAIN || errno == EWOULDBLOCK) ? 0 : -1;
        c->off += (size_t)n;
    }
    free(c->pending);
    c->pending = NULL;
    c->len = c->off = 0;
    for (;;) {
        ssize_t n = read(c->fd, shared, BUF);
        if (n == 0) return -1;
        if (n < 0) return (errno == EAGAIN || errno == EWOULDBLOCK) ? 0 : -1;
        size_t done = 0;
        while (done < (size_t)n) {
            ssize_t w = write(c->fd, shared + done, (size_t)n - done);
            if (w < 0) {
                if (errno != EAGAIN && errno != EWOULDBLOCK) return -1;
                /* The peer is not reading: keep the rest and stop reading until it drains. */
                c->len = (size_t)n - done;
                c->pending = malloc(c->len);
                memcpy(c->pending, shared + done, c->len);
                return 0;
            }
            done += (size_t)w;
        }
    }
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s PORT\n", argv[0]);
        return 2;
    }
    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    int one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((unsigned short)atoi(argv[1]))};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(lfd, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(lfd, 4096) < 0) {
        perror("bind/listen");
        return 1;
    }
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev);
    struct epoll_event events[256];
    for (;;) {
        int n = epoll_wait(ep, events, 256, -1);
        for (int i = 0; i < n; i++) {
            struct conn *c = events[i].data.ptr;
            if (c == NULL) {
                int fd;
                while ((fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
                    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    c = calloc(1, sizeof *c);
                    c->fd = fd;
                    struct epoll_event cev = {.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET, .data.ptr = c};
                    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &cev);
                    if (pump(c) < 0) drop_conn(ep, c);
                }
                continue;
            }
            if (pump(c) < 0) drop_conn(ep, c);
        }
    }
}
