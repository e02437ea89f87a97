// echo.cpp - the FractOS C SDK from C++17.
//
// Attaches over TCP, serves an "echo" Request with a callback handler,
// invokes it with a reply continuation that is taken by polling, copies a
// registered buffer into another through Memory capabilities, publishes and
// looks up a name, and checks that a revoked capability is refused. Prints
// "echo: ok" and exits 0 when everything behaved.
//
// Build against the installed SDK:
//   c++ -std=c++17 -Wall -Wextra -Werror echo.cpp $(pkg-config --cflags --libs fractos)
// Usage: fractos-echo HOST:PORT NAME TOKEN_HEX64

#include <fractos.h>

#include <array>
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

namespace {

constexpr std::uint64_t kTagEcho = 0xEC40001;
constexpr std::uint64_t kTagReply = 0xEC40002;

// A failed call: what, the status name and the SDK's message.
bool failed(const char *what, fractos_status s) {
    if (s == FRACTOS_OK) return false;
    std::fprintf(stderr, "echo: %s failed: %s (%s)\n", what, fractos_status_str(s),
                 fractos_last_error_message());
    return true;
}

// Owning handles: the deleters are the SDK's release functions.
struct CloseProcess {
    void operator()(fractos_process *p) const { fractos_close(p); }
};
struct FreeRegion {
    void operator()(fractos_region *r) const { fractos_region_free(r); }
};
struct FreeInvocation {
    void operator()(fractos_invocation *i) const { fractos_invocation_free(i); }
};
using Process = std::unique_ptr<fractos_process, CloseProcess>;
using Region = std::unique_ptr<fractos_region, FreeRegion>;
using Invocation = std::unique_ptr<fractos_invocation, FreeInvocation>;

std::vector<std::uint8_t> imms_of(const fractos_invocation *inv) {
    std::size_t n = 0;
    if (fractos_invocation_imms(inv, nullptr, 0, &n) != FRACTOS_OK) return {};
    std::vector<std::uint8_t> out(n);
    if (n > 0 && fractos_invocation_imms(inv, out.data(), out.size(), &n) != FRACTOS_OK) return {};
    return out;
}

// The echo handler: invokes capability 0 (the caller's continuation) with
// the immediates it got. Runs on an SDK thread; catches everything, since
// nothing may unwind into the SDK.
extern "C" void on_echo(fractos_process *p, const fractos_invocation *inv, void *user) noexcept {
    try {
        auto *count = static_cast<std::atomic<int> *>(user);
        std::vector<std::uint8_t> imms = imms_of(inv);
        fractos_cap reply{};
        if (!failed("echo: capability 0", fractos_invocation_cap(inv, 0, &reply))) {
            // Counted before the reply, which the caller may see at once.
            count->fetch_add(1);
            failed("echo: invoking the reply",
                   fractos_invoke(p, &reply, imms.data(), imms.size(), nullptr, 0));
        }
    } catch (...) {
        std::fprintf(stderr, "echo: handler threw\n");
    }
    fractos_invocation_drop_caps(p, inv);
}

int run(const char *addr, const char *name, const char *token_hex) {
    std::array<std::uint8_t, FRACTOS_TOKEN_LEN> token{};
    if (failed("parsing the token", fractos_token_from_hex(token_hex, token.data()))) return 2;

    fractos_attach_options opts = fractos_attach_options_default();
    opts.op_timeout_ms = 20000;
    fractos_process *raw = nullptr;
    if (failed("attach", fractos_attach_tcp(addr, name, token.data(), &opts, &raw))) return 1;
    Process p(raw);

    // Invocations: a callback for echo, polling for the replies.
    std::atomic<int> echoed{0};
    if (failed("serve", fractos_serve(p.get(), kTagEcho, on_echo, &echoed, 0))) return 1;
    fractos_cap echo{}, reply{};
    if (failed("request_create echo",
               fractos_request_create(p.get(), kTagEcho, nullptr, 0, nullptr, 0, &echo)) ||
        failed("request_create reply",
               fractos_request_create(p.get(), kTagReply, nullptr, 0, nullptr, 0, &reply)))
        return 1;
    const std::string ping = "ping from C++";
    if (failed("invoke", fractos_invoke(p.get(), &echo,
                                        reinterpret_cast<const std::uint8_t *>(ping.data()),
                                        ping.size(), &reply, 1)))
        return 1;
    fractos_invocation *got = nullptr;
    if (failed("next_invocation", fractos_next_invocation(p.get(), 20000, &got))) return 1;
    Invocation inv(got);
    std::uint64_t tag = 0;
    if (failed("invocation_tag", fractos_invocation_tag(inv.get(), &tag))) return 1;
    std::vector<std::uint8_t> back = imms_of(inv.get());
    if (tag != kTagReply || std::string(back.begin(), back.end()) != ping || echoed.load() != 1) {
        std::fprintf(stderr, "echo: wrong reply (tag %#llx, %zu bytes)\n",
                     static_cast<unsigned long long>(tag), back.size());
        return 1;
    }

    // Memory: copy one region into another through capabilities.
    fractos_region *r1 = nullptr, *r2 = nullptr;
    if (failed("register", fractos_register(p.get(), 4096, &r1))) return 1;
    Region src_region(r1);
    if (failed("register", fractos_register(p.get(), 4096, &r2))) return 1;
    Region dst_region(r2);
    const char hello[] = "hello, capabilities";
    if (failed("region_write",
               fractos_region_write(src_region.get(), 100,
                                    reinterpret_cast<const std::uint8_t *>(hello), sizeof hello)))
        return 1;
    fractos_cap src{}, dst{};
    if (failed("memory_create", fractos_memory_create(p.get(), src_region.get(), 100, sizeof hello,
                                                      FRACTOS_RIGHT_READ, &src)) ||
        failed("memory_create", fractos_memory_create(p.get(), dst_region.get(), 0, 4096,
                                                      FRACTOS_RIGHT_READ_WRITE, &dst)))
        return 1;
    if (failed("copy", fractos_copy(p.get(), &src, &dst, nullptr))) return 1;
    std::uint8_t *bytes = nullptr;
    if (failed("region_data", fractos_region_data(dst_region.get(), &bytes))) return 1;
    if (std::memcmp(bytes, hello, sizeof hello) != 0) {
        std::fprintf(stderr, "echo: the copy did not arrive\n");
        return 1;
    }

    // Names, then revocation.
    fractos_cap found{};
    if (failed("publish", fractos_publish(p.get(), "cpp-example/buffer", &dst)) ||
        failed("lookup", fractos_lookup(p.get(), "cpp-example/buffer", 1000, &found)))
        return 1;
    if (found.kind != FRACTOS_CAP_MEMORY || found.len != 4096) {
        std::fprintf(stderr, "echo: lookup returned kind %u len %llu\n", found.kind,
                     static_cast<unsigned long long>(found.len));
        return 1;
    }
    if (failed("revoke", fractos_revoke(p.get(), &src))) return 1;
    fractos_status s = fractos_copy(p.get(), &src, &dst, nullptr);
    if (s != FRACTOS_ERR_REVOKED) {
        std::fprintf(stderr, "echo: a copy from a revoked capability returned %s\n",
                     fractos_status_str(s));
        return 1;
    }
    std::printf("echo: ok\n");
    return 0;
}

}  // namespace

int main(int argc, char **argv) {
    if (argc != 4) {
        std::fprintf(stderr, "usage: %s HOST:PORT NAME TOKEN_HEX64\n", argv[0]);
        return 2;
    }
    return run(argv[1], argv[2], argv[3]);
}
