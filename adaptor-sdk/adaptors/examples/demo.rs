//! Runs the pipeline demo on an embedded cluster and prints the table:
//! `cargo run --release -p fractos-adaptors --example demo [requests] [image_side]`.

fn main() {
    let mut args = std::env::args().skip(1);
    let mut cfg = fractos_adaptors::demo::DemoConfig::default();
    if let Some(n) = args.next().and_then(|a| a.parse().ok()) {
        cfg.requests = n;
    }
    if let Some(s) = args.next().and_then(|a| a.parse().ok()) {
        cfg.image_side = s;
    }
    match fractos_adaptors::demo::run(&cfg, |_, _, _| {}) {
        Ok(r) => {
            print!("{}", r.table());
            print!("{}", r.to_json());
        }
        Err(e) => {
            eprintln!("demo failed: {e}");
            std::process::exit(1);
        }
    }
}
