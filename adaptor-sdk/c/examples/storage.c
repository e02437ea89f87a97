/*
 * storage.c - the reference FractOS storage adaptor, in C.
 *
 * Serves a file as a block store with the storage read/write protocol of
 * the pipeline (adaptor-sdk/adaptors/src/pipeline.rs) and the appliance's
 * NVMe service (kernel/src/storage.rs):
 *
 *   read  (tag 0x53540001): immediates end with (offset u64, len u64),
 *         little-endian; caps [dst Memory (WRITE), done Request?, err?].
 *         The bytes are read from the file into a staging region and
 *         copied into dst, with done as the copy's completion.
 *   write (tag 0x53540002): same immediates; caps [src Memory (READ),
 *         done?, err?]. src (at most len bytes) is copied into the staging
 *         region, written to the file at offset, then done is invoked.
 *
 * Failures invoke err (when given) with [status u8, code u16 LE]:
 * 1 out of range, 2 bad request, 3 device (file I/O), 4 copy (code = the
 * wire error code). The read Request is published as
 * "pipeline/storage/read", the write Request as "pipeline/storage/write"
 * (both changeable), then "ready" is printed on stdout.
 *
 * Build against the installed SDK:
 *   cc -std=c11 -Wall -Wextra -Werror storage.c \
 *      $(pkg-config --cflags --libs fractos) -o fractos-storage
 *
 * Usage:
 *   fractos-storage (--tcp HOST:PORT | --local SOCKET | --slot FILE)
 *       --token HEX64 --file PATH --size BYTES [--name storage]
 *       [--max-io BYTES] [--read-name NAME] [--write-name NAME] [--corrupt]
 *
 * --corrupt flips the first byte of every write before storing it, as a
 * faulty device would: for tests that the pipeline's checks notice.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <fractos.h>

#define TAG_READ UINT64_C(0x53540001)
#define TAG_WRITE UINT64_C(0x53540002)

enum storage_status {
    STATUS_OUT_OF_RANGE = 1,
    STATUS_BAD_REQUEST = 2,
    STATUS_DEVICE = 3,
    STATUS_COPY = 4,
};

struct store {
    fractos_process *p;
    int fd;
    uint64_t size;
    uint64_t max_io;
    int corrupt;
    /* One staging region, one request at a time (the lock). */
    pthread_mutex_t lock;
    fractos_region *staging;
    uint8_t *data;
    fractos_cap staging_r;
    fractos_cap staging_w;
    /* Counters (under the lock). */
    uint64_t reads, writes, errors;
};

static volatile sig_atomic_t stop;

static void on_signal(int sig) {
    (void)sig;
    stop = 1;
}

static void report(const char *what, fractos_status s) {
    fprintf(stderr, "storage: %s failed: %s (%s)\n", what, fractos_status_str(s),
            fractos_last_error_message());
}

static uint64_t le64(const uint8_t *b) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = (v << 8) | b[i];
    return v;
}

/* Invokes err (when given) with [status u8, code u16 LE]. */
static void fail(struct store *st, const fractos_cap *err, enum storage_status status,
                 fractos_status code) {
    uint8_t imms[3] = {(uint8_t)status, 0, 0};
    if (code > 0 && code < 100) {
        imms[1] = (uint8_t)(code & 0xff);
        imms[2] = (uint8_t)((unsigned)code >> 8);
    }
    pthread_mutex_lock(&st->lock);
    st->errors++;
    pthread_mutex_unlock(&st->lock);
    if (err) {
        fractos_status s = fractos_invoke(st->p, err, imms, sizeof imms, NULL, 0);
        if (s != FRACTOS_OK) report("invoking err", s);
    }
}

/* The whole of a pread or pwrite (retried on EINTR and short transfers). */
static int full_io(int fd, uint8_t *buf, uint64_t len, uint64_t off, int write) {
    while (len > 0) {
        ssize_t n = write ? pwrite(fd, buf, len, (off_t)off) : pread(fd, buf, len, (off_t)off);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return -1;
        buf += n, len -= (uint64_t)n, off += (uint64_t)n;
    }
    return 0;
}

/* The read: file -> staging -> dst, then done (the copy's completion). */
static void serve_read(struct store *st, uint64_t off, uint64_t len, const fractos_cap *dst,
                       const fractos_cap *done, const fractos_cap *err) {
    pthread_mutex_lock(&st->lock);
    if (full_io(st->fd, st->data, len, off, 0) != 0) {
        pthread_mutex_unlock(&st->lock);
        fprintf(stderr, "storage: reading %" PRIu64 " bytes at %" PRIu64 ": %s\n", len, off,
                strerror(errno));
        fail(st, err, STATUS_DEVICE, FRACTOS_OK);
        return;
    }
    fractos_cap part = st->staging_r;
    fractos_status s = FRACTOS_OK;
    if (len != st->max_io) s = fractos_diminish(st->p, &st->staging_r, 0, len, FRACTOS_RIGHT_READ, &part);
    if (s == FRACTOS_OK) {
        s = fractos_copy(st->p, &part, dst, done);
        if (len != st->max_io) fractos_drop_cap(st->p, &part);
    }
    if (s == FRACTOS_OK) st->reads++;
    pthread_mutex_unlock(&st->lock);
    if (s != FRACTOS_OK) {
        report("read copy", s);
        fail(st, err, STATUS_COPY, s);
    }
}

/* The write: src -> staging -> file, then done. */
static void serve_write(struct store *st, uint64_t off, uint64_t len, const fractos_cap *src,
                        const fractos_cap *done, const fractos_cap *err) {
    if (src->len > len) {
        fprintf(stderr, "storage: write source of %" PRIu64 " bytes is longer than len %" PRIu64 "\n",
                src->len, len);
        fail(st, err, STATUS_BAD_REQUEST, FRACTOS_OK);
        return;
    }
    pthread_mutex_lock(&st->lock);
    fractos_status s = fractos_copy(st->p, src, &st->staging_w, NULL);
    if (s != FRACTOS_OK) {
        pthread_mutex_unlock(&st->lock);
        report("write copy", s);
        fail(st, err, STATUS_COPY, s);
        return;
    }
    if (st->corrupt) st->data[0] ^= 0xff;
    int io = full_io(st->fd, st->data, len, off, 1);
    if (io == 0) io = fdatasync(st->fd);
    if (io == 0) st->writes++;
    pthread_mutex_unlock(&st->lock);
    if (io != 0) {
        fprintf(stderr, "storage: writing %" PRIu64 " bytes at %" PRIu64 ": %s\n", len, off,
                strerror(errno));
        fail(st, err, STATUS_DEVICE, FRACTOS_OK);
        return;
    }
    if (done) {
        s = fractos_invoke(st->p, done, NULL, 0, NULL, 0);
        if (s != FRACTOS_OK) report("invoking done", s);
    }
}

/* The handler of both Requests (runs on the SDK's handler threads). */
static void handle(fractos_process *p, const fractos_invocation *inv, void *user) {
    struct store *st = user;
    uint64_t tag = 0;
    uint8_t imms[256];
    size_t n = 0, ncaps = 0;
    fractos_cap caps[3];
    memset(caps, 0, sizeof caps);
    if (fractos_invocation_tag(inv, &tag) != FRACTOS_OK ||
        fractos_invocation_imms(inv, imms, sizeof imms, &n) != FRACTOS_OK ||
        fractos_invocation_cap_count(inv, &ncaps) != FRACTOS_OK) {
        report("reading the invocation", FRACTOS_ERR_OTHER);
        fractos_invocation_drop_caps(p, inv);
        return;
    }
    for (size_t i = 0; i < ncaps && i < 3; i++) fractos_invocation_cap(inv, i, &caps[i]);
    const fractos_cap *done = ncaps > 1 && caps[1].kind == FRACTOS_CAP_REQUEST ? &caps[1] : NULL;
    const fractos_cap *err = ncaps > 2 && caps[2].kind == FRACTOS_CAP_REQUEST ? &caps[2] : NULL;
    if (n < 16 || n > sizeof imms || ncaps < 1 || caps[0].kind != FRACTOS_CAP_MEMORY) {
        fprintf(stderr, "storage: malformed request (%zu immediate bytes, %zu caps)\n", n, ncaps);
        fail(st, err, STATUS_BAD_REQUEST, FRACTOS_OK);
    } else {
        uint64_t off = le64(imms + n - 16), len = le64(imms + n - 8);
        if (len == 0 || len > st->max_io) {
            fprintf(stderr, "storage: length %" PRIu64 " outside 1..=%" PRIu64 "\n", len, st->max_io);
            fail(st, err, STATUS_BAD_REQUEST, FRACTOS_OK);
        } else if (off > st->size || len > st->size - off) {
            fail(st, err, STATUS_OUT_OF_RANGE, FRACTOS_OK);
        } else if (tag == TAG_READ) {
            serve_read(st, off, len, &caps[0], done, err);
        } else {
            serve_write(st, off, len, &caps[0], done, err);
        }
    }
    fractos_invocation_drop_caps(p, inv);
}

static void usage(void) {
    fprintf(stderr,
            "usage: fractos-storage (--tcp HOST:PORT | --local SOCKET | --slot FILE) --token HEX64\n"
            "       --file PATH --size BYTES [--name storage] [--max-io BYTES]\n"
            "       [--read-name NAME] [--write-name NAME] [--corrupt]\n");
}

int main(int argc, char **argv) {
    const char *tcp = NULL, *local = NULL, *slot = NULL, *token_hex = getenv("FRACTOS_TOKEN"), *file = NULL;
    const char *name = "storage", *read_name = "pipeline/storage/read";
    const char *write_name = "pipeline/storage/write";
    struct store st;
    memset(&st, 0, sizeof st);
    st.max_io = 4u << 20;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--corrupt")) { st.corrupt = 1; continue; }
        if (!v) { usage(); return 2; }
        if (!strcmp(a, "--tcp")) tcp = v;
        else if (!strcmp(a, "--local")) local = v;
        else if (!strcmp(a, "--slot")) slot = v;
        else if (!strcmp(a, "--token")) token_hex = v;
        else if (!strcmp(a, "--file")) file = v;
        else if (!strcmp(a, "--size")) st.size = strtoull(v, NULL, 0);
        else if (!strcmp(a, "--max-io")) st.max_io = strtoull(v, NULL, 0);
        else if (!strcmp(a, "--name")) name = v;
        else if (!strcmp(a, "--read-name")) read_name = v;
        else if (!strcmp(a, "--write-name")) write_name = v;
        else { usage(); return 2; }
        i++;
    }
    if ((!!tcp + !!local + !!slot) != 1 || !token_hex || !file || st.size == 0 || st.max_io == 0) {
        usage();
        return 2;
    }
    uint8_t token[FRACTOS_TOKEN_LEN];
    fractos_status s = fractos_token_from_hex(token_hex, token);
    if (s != FRACTOS_OK) { report("--token", s); return 2; }

    st.fd = open(file, O_RDWR | O_CREAT, 0600);
    if (st.fd < 0 || ftruncate(st.fd, (off_t)st.size) != 0) {
        fprintf(stderr, "storage: opening %s: %s\n", file, strerror(errno));
        return 1;
    }
    pthread_mutex_init(&st.lock, NULL);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);

    fractos_attach_options opts = fractos_attach_options_default();
    opts.op_timeout_ms = 20000;
    s = tcp     ? fractos_attach_tcp(tcp, name, token, &opts, &st.p)
        : local ? fractos_attach_local(local, name, token, &opts, &st.p)
                : fractos_attach_slot(slot, name, token, &opts, &st.p);
    if (s != FRACTOS_OK) { report("attach", s); return 1; }

    fractos_cap read_req, write_req;
    if ((s = fractos_register(st.p, st.max_io, &st.staging)) != FRACTOS_OK ||
        (s = fractos_region_data(st.staging, &st.data)) != FRACTOS_OK ||
        (s = fractos_memory_create(st.p, st.staging, 0, st.max_io, FRACTOS_RIGHT_READ, &st.staging_r)) != FRACTOS_OK ||
        (s = fractos_memory_create(st.p, st.staging, 0, st.max_io, FRACTOS_RIGHT_WRITE, &st.staging_w)) != FRACTOS_OK ||
        (s = fractos_serve(st.p, TAG_READ, handle, &st, 0)) != FRACTOS_OK ||
        (s = fractos_serve(st.p, TAG_WRITE, handle, &st, 0)) != FRACTOS_OK ||
        (s = fractos_request_create(st.p, TAG_READ, NULL, 0, NULL, 0, &read_req)) != FRACTOS_OK ||
        (s = fractos_request_create(st.p, TAG_WRITE, NULL, 0, NULL, 0, &write_req)) != FRACTOS_OK ||
        (s = fractos_publish(st.p, read_name, &read_req)) != FRACTOS_OK ||
        (s = fractos_publish(st.p, write_name, &write_req)) != FRACTOS_OK) {
        report("setting up the service", s);
        fractos_close(st.p);
        return 1;
    }
    printf("ready\n");
    fflush(stdout);

    struct timespec tick = {0, 50 * 1000 * 1000};
    while (!stop && fractos_is_connected(st.p)) nanosleep(&tick, NULL);

    int lost = !stop;
    fractos_region_free(st.staging);
    fractos_close(st.p);
    pthread_mutex_lock(&st.lock);
    fprintf(stderr, "storage: %" PRIu64 " reads, %" PRIu64 " writes, %" PRIu64 " errors%s\n",
            st.reads, st.writes, st.errors, lost ? " (controller gone)" : "");
    pthread_mutex_unlock(&st.lock);
    close(st.fd);
    return lost ? 1 : 0;
}
