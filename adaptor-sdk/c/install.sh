#!/usr/bin/env bash
# Builds the FractOS C SDK with the unwinding `c-sdk` profile and installs
#   PREFIX/lib/libfractos.so, PREFIX/lib/libfractos.a,
#   PREFIX/include/fractos.h, PREFIX/lib/pkgconfig/fractos.pc
# Usage: adaptor-sdk/c/install.sh --prefix DIR   (default /usr/local)
# Environment: CARGO (default cargo), CARGO_TARGET_DIR (as cargo's).
set -euo pipefail

prefix=/usr/local
while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) prefix="${2:?--prefix needs a directory}"; shift 2 ;;
        --prefix=*) prefix="${1#--prefix=}"; shift ;;
        -h|--help) sed -n '2,7p' "$0"; exit 0 ;;
        *) echo "install.sh: unknown argument $1 (usage: install.sh --prefix DIR)" >&2; exit 2 ;;
    esac
done

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cargo="${CARGO:-cargo}"
# The library must unwind so that a panic inside an entry point comes back
# as FRACTOS_ERR_PANIC: the workspace's dev/release profiles abort.
"$cargo" build --manifest-path "$root/Cargo.toml" -p fractos-sdk-c --profile c-sdk --lib
target="${CARGO_TARGET_DIR:-$root/target}"
case "$target" in /*) ;; *) target="$root/$target" ;; esac
out="$target/c-sdk"

version="$(sed -n 's/^version = "\(.*\)"/\1/p' "$root/Cargo.toml" | head -n1)"
mkdir -p "$prefix/lib/pkgconfig" "$prefix/include"
prefix="$(cd "$prefix" && pwd)"
install -m 0755 "$out/libfractos_c.so" "$prefix/lib/libfractos.so"
install -m 0644 "$out/libfractos_c.a" "$prefix/lib/libfractos.a"
install -m 0644 "$here/include/fractos.h" "$prefix/include/fractos.h"
sed -e "s|@PREFIX@|$prefix|" -e "s|@VERSION@|$version|" "$here/fractos.pc.in" \
    > "$prefix/lib/pkgconfig/fractos.pc"
echo "installed the FractOS C SDK $version into $prefix"
