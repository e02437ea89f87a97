/*
 * abi_check.c - the C boundary's guarantees, checked from C against the
 * installed library: a panic inside an entry point comes back as
 * FRACTOS_ERR_PANIC (the program goes on), NULL pointers and dead or
 * foreign handles are error codes, and every failure has a message.
 *
 * Usage: abi_check HOST:PORT NAME TOKEN_HEX64
 * Prints one line per check and "N passed, M failed"; exits non-zero if
 * any check failed.
 */
#include <stdio.h>
#include <string.h>

#include <fractos.h>

static int passed, failed;

static void check(int ok, const char *what) {
    printf("%s: %s\n", ok ? "ok" : "FAILED", what);
    if (ok) passed++;
    else failed++;
}

static int has_message(void) {
    const char *m = fractos_last_error_message();
    return m != NULL && m[0] != '\0';
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s HOST:PORT NAME TOKEN_HEX64\n", argv[0]);
        return 2;
    }
    uint8_t token[FRACTOS_TOKEN_LEN];

    /* Panics are caught at the boundary, twice in a row. */
    check(fractos_selftest_panic() == FRACTOS_ERR_PANIC, "a panic comes back as FRACTOS_ERR_PANIC");
    check(strstr(fractos_last_error_message(), "panic") != NULL, "the panic has a message");
    check(fractos_selftest_panic() == FRACTOS_ERR_PANIC, "and the library still works after it");

    /* Messages. */
    check(strcmp(fractos_status_str(FRACTOS_OK), "success") == 0, "status_str(FRACTOS_OK)");
    check(strstr(fractos_status_str(FRACTOS_ERR_REVOKED), "revoked") != NULL, "status_str(REVOKED)");
    check(strcmp(fractos_status_str(-7), "unknown status") == 0, "status_str of an unknown code");

    /* Arguments. */
    check(fractos_token_from_hex(NULL, token) == FRACTOS_ERR_NULL_POINTER && has_message(),
          "NULL string -> FRACTOS_ERR_NULL_POINTER");
    check(fractos_token_from_hex("abc", token) == FRACTOS_ERR_INVALID_ARGUMENT,
          "short token -> FRACTOS_ERR_INVALID_ARGUMENT");
    fractos_process *p = NULL;
    check(fractos_attach_tcp("127.0.0.1:1", "x", token, NULL, &p) == FRACTOS_ERR_IO && p == NULL,
          "nothing listening -> FRACTOS_ERR_IO");
    check(fractos_token_from_hex(argv[3], token) == FRACTOS_OK, "token parses");
    fractos_attach_options many = fractos_attach_options_default();
    many.handler_threads = 0xffffffffu;
    check(fractos_attach_tcp(argv[1], argv[2], token, &many, &p) == FRACTOS_ERR_INVALID_ARGUMENT && p == NULL,
          "absurd handler_threads -> FRACTOS_ERR_INVALID_ARGUMENT");
    check(fractos_attach_tcp(argv[1], argv[2], token, NULL, NULL) == FRACTOS_ERR_NULL_POINTER,
          "NULL out -> FRACTOS_ERR_NULL_POINTER");
    uint8_t wrong[FRACTOS_TOKEN_LEN];
    memcpy(wrong, token, sizeof wrong);
    wrong[0] ^= 1;
    check(fractos_attach_tcp(argv[1], argv[2], wrong, NULL, &p) == FRACTOS_ERR_AUTH_FAILED,
          "wrong token -> FRACTOS_ERR_AUTH_FAILED");
    if (fractos_attach_tcp(argv[1], argv[2], token, NULL, &p) != FRACTOS_OK) {
        fprintf(stderr, "attach: %s\n", fractos_last_error_message());
        return 1;
    }
    check(fractos_is_connected(p), "attached");

    /* Handles. */
    fractos_region *r = NULL;
    uint64_t len = 0;
    check(fractos_register(p, 8192, &r) == FRACTOS_OK, "register");
    check(fractos_region_len(r, &len) == FRACTOS_OK && len == 8192, "region_len");
    check(fractos_region_len((const fractos_region *)p, &len) == FRACTOS_ERR_INVALID_HANDLE,
          "a process handle cast to a region -> FRACTOS_ERR_INVALID_HANDLE");
    check(fractos_region_write(r, 8190, (const uint8_t *)"xyz", 3) == FRACTOS_ERR_OUT_OF_RANGE,
          "write past the region -> FRACTOS_ERR_OUT_OF_RANGE");
    fractos_cap c;
    check(fractos_memory_create(p, r, 0, 4096, 0x80, &c) == FRACTOS_ERR_INVALID_ARGUMENT,
          "unknown rights bits -> FRACTOS_ERR_INVALID_ARGUMENT");
    check(fractos_memory_create(p, r, 0, 4096, FRACTOS_RIGHT_READ, &c) == FRACTOS_OK, "memory_create");
    check(fractos_invoke(p, &c, NULL, 0, NULL, 0) == FRACTOS_ERR_WRONG_TYPE,
          "invoking a Memory capability -> FRACTOS_ERR_WRONG_TYPE");
    fractos_cap bogus = c;
    bogus.handle += 1000;
    check(fractos_drop_cap(p, &bogus) == FRACTOS_ERR_BAD_HANDLE,
          "dropping an unknown capability -> FRACTOS_ERR_BAD_HANDLE (from the controller)");
    fractos_cap rq;
    check(fractos_request_create(p, 7, NULL, 0, NULL, 0, &rq) == FRACTOS_OK && rq.kind == FRACTOS_CAP_REQUEST,
          "request_create");
    check(fractos_invoke(p, &rq, NULL, 5, NULL, 0) == FRACTOS_ERR_NULL_POINTER,
          "NULL immediates with a length -> FRACTOS_ERR_NULL_POINTER");
    check(fractos_region_free(r) == FRACTOS_OK, "region_free");
    check(fractos_region_free(r) == FRACTOS_ERR_INVALID_HANDLE, "double free -> FRACTOS_ERR_INVALID_HANDLE");
    check(fractos_region_len(r, &len) == FRACTOS_ERR_INVALID_HANDLE, "use after free -> FRACTOS_ERR_INVALID_HANDLE");
    fractos_invocation *inv = NULL;
    check(fractos_next_invocation(p, 10, &inv) == FRACTOS_ERR_TIMEOUT, "no invocation -> FRACTOS_ERR_TIMEOUT");
    check(fractos_serve(p, 1, NULL, NULL, 0) == FRACTOS_ERR_NULL_POINTER, "NULL handler refused");
    check(fractos_close(p) == FRACTOS_OK, "close");
    check(fractos_close(p) == FRACTOS_ERR_INVALID_HANDLE, "double close -> FRACTOS_ERR_INVALID_HANDLE");
    check(!fractos_is_connected(p), "a closed handle is not connected");
    check(fractos_register(p, 4096, &r) == FRACTOS_ERR_INVALID_HANDLE, "use after close -> FRACTOS_ERR_INVALID_HANDLE");

    printf("%d passed, %d failed\n", passed, failed);
    return failed == 0 ? 0 : 1;
}
