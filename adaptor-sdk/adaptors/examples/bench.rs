//! `cargo run --release -p fractos-adaptors --example bench`
fn main() {
    match fractos_adaptors::bench::run(&fractos_adaptors::bench::BenchConfig::default()) {
        Ok(r) => print!("{}{}", r.table(), r.to_json()),
        Err(e) => {
            eprintln!("bench failed: {e}");
            std::process::exit(1);
        }
    }
}
