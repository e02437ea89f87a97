#!/bin/sh
# Build the PVH ELF and the GRUB ISO into target/images and print their sizes.
set -eu
cd "$(dirname "$0")/.."
exec cargo run --release -q -p fractos -- image build "$@"
