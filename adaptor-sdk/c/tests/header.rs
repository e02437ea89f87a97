//! The committed `include/fractos.h` is what cbindgen makes of the crate
//! today. `FRACTOS_BLESS=1` rewrites it instead of failing.

use std::path::Path;

#[test]
fn committed_header_is_current() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(dir.join("cbindgen.toml")).expect("cbindgen.toml");
    let bindings = cbindgen::Builder::new()
        .with_crate(dir)
        .with_config(config)
        .generate()
        .expect("cbindgen could not generate the header");
    let mut fresh = Vec::new();
    bindings.write(&mut fresh);
    let path = dir.join("include/fractos.h");
    if std::env::var_os("FRACTOS_BLESS").is_some() {
        std::fs::write(&path, &fresh).expect("writing include/fractos.h");
        return;
    }
    let committed = std::fs::read(&path).unwrap_or_default();
    assert!(
        committed == fresh,
        "include/fractos.h is out of date with the crate's C ABI: regenerate it with \
         FRACTOS_BLESS=1 cargo test -p fractos-sdk-c --test header, and commit it"
    );
}
