//! The C SDK as a user gets it: `install.sh` builds the library with the
//! unwinding `c-sdk` profile and installs it into a temporary prefix; the
//! C storage adaptor, the C++ example and the C boundary checks are built
//! with the system compilers against the installed header and library
//! (`pkg-config --cflags --libs fractos`), then run against embedded hosted
//! controllers. The C storage adaptor serves the pipeline demo's storage
//! stage next to the Rust compute and client adaptors.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use fractos_adaptors::demo::{self, DemoConfig, DemoNode, DemoReport, DemoTransport, DEMO_KEY};
use fractos_adaptors::pipeline::names;
use fractos_core::process_token;

/// Where the test installed the SDK and built the programs.
struct Installed {
    prefix: PathBuf,
    storage: PathBuf,
    echo: PathBuf,
    abi_check: PathBuf,
    abi_check_static: PathBuf,
}

fn run(cmd: &mut Command, what: &str) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run {cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{text}",
        out.status
    );
    text
}

fn pkg_config(prefix: &Path, args: &[&str]) -> Vec<String> {
    let text = run(
        Command::new("pkg-config")
            .args(args)
            .arg("fractos")
            .env("PKG_CONFIG_PATH", prefix.join("lib/pkgconfig")),
        "pkg-config",
    );
    text.split_whitespace().map(String::from).collect()
}

/// Installs once per test binary and builds the three programs.
fn installed() -> &'static Installed {
    static ONCE: OnceLock<Installed> = OnceLock::new();
    ONCE.get_or_init(|| {
        let here = Path::new(env!("CARGO_MANIFEST_DIR"));
        // Under target/tmp, replaced by every run (nothing left in /tmp).
        let prefix = Path::new(env!("CARGO_TARGET_TMPDIR")).join("c-sdk-prefix");
        let _ = std::fs::remove_dir_all(&prefix);
        run(
            Command::new("bash")
                .arg(here.join("install.sh"))
                .arg("--prefix")
                .arg(&prefix),
            "install.sh",
        );
        for f in [
            "lib/libfractos.so",
            "lib/libfractos.a",
            "include/fractos.h",
            "lib/pkgconfig/fractos.pc",
        ] {
            assert!(prefix.join(f).is_file(), "install.sh did not install {f}");
        }
        let cflags = pkg_config(&prefix, &["--cflags"]);
        let libs = pkg_config(&prefix, &["--libs"]);
        let rpath = format!("-Wl,-rpath,{}", prefix.join("lib").display());
        let build = |compiler: &str, std: &str, src: &str, out: &str| -> PathBuf {
            let exe = prefix.join(out);
            run(
                Command::new(compiler)
                    .arg(std)
                    .args(["-Wall", "-Wextra", "-Werror", "-O1"])
                    .arg(here.join(src))
                    .args(&cflags)
                    .args(&libs)
                    .arg(&rpath)
                    .arg("-o")
                    .arg(&exe),
                &format!("compiling {src}"),
            );
            exe
        };
        let storage = build("cc", "-std=c11", "examples/storage.c", "fractos-storage");
        let echo = build("c++", "-std=c++17", "examples/echo.cpp", "fractos-echo");
        let abi_check = build("cc", "-std=c11", "tests/c/abi_check.c", "abi-check");
        // The static library, linked into the same program.
        let abi_check_static = prefix.join("abi-check-static");
        let private = pkg_config(&prefix, &["--static", "--libs-only-l"]);
        run(
            Command::new("cc")
                .args(["-std=c11", "-Wall", "-Wextra", "-Werror"])
                .arg(here.join("tests/c/abi_check.c"))
                .args(&cflags)
                .arg(prefix.join("lib/libfractos.a"))
                .args(private.iter().filter(|l| *l != "-lfractos"))
                .arg("-o")
                .arg(&abi_check_static),
            "linking abi_check.c with libfractos.a",
        );
        Installed {
            prefix,
            storage,
            echo,
            abi_check,
            abi_check_static,
        }
    })
}

fn token_hex(name: &str) -> String {
    process_token(&DEMO_KEY, name.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A child process killed when the test ends, however it ends, and what it
/// wrote on stderr.
struct Kill(Child, Arc<Mutex<String>>);

impl Kill {
    /// Stops the adaptor with SIGTERM (it closes its process and prints its
    /// counters) and returns its exit status and stderr.
    fn stop(mut self) -> (std::process::ExitStatus, String) {
        // The shell's built-in kill: no procps needed.
        let pid = self.0.id();
        run(
            Command::new("sh").args(["-c", &format!("kill -TERM {pid}")]),
            "kill -TERM",
        );
        let status = self.0.wait().expect("waiting for the adaptor");
        // The stderr reader ends at EOF, right after the exit.
        std::thread::sleep(Duration::from_millis(200));
        let err = self.1.lock().unwrap().clone();
        (status, err)
    }
}

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The embedded cluster, its sockets removed at the end.
struct Cluster(Vec<DemoNode>);

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in &self.0 {
            if let DemoNode::Hosted(r) = n {
                fractos_adaptors::bench::remove_socket_dir(r);
            }
        }
    }
}

fn cluster() -> Cluster {
    Cluster(
        demo::start_cluster()
            .expect("starting the embedded cluster")
            .into_iter()
            .map(DemoNode::Hosted)
            .collect(),
    )
}

/// How the C adaptor attaches to node 0.
enum Attach {
    Tcp,
    Local,
}

/// Starts the C storage adaptor on node 0 of `c` and waits for "ready".
fn start_storage(c: &Cluster, attach: Attach, corrupt: bool, store: &Path) -> Kill {
    let DemoNode::Hosted(node) = &c.0[0] else {
        unreachable!("embedded cluster")
    };
    let mut cmd = Command::new(&installed().storage);
    match attach {
        Attach::Tcp => cmd.arg("--tcp").arg(node.process_addr().to_string()),
        Attach::Local => cmd.arg("--local").arg(
            node.local_socket()
                .expect("the demo nodes have local sockets"),
        ),
    };
    cmd.args(["--token", &token_hex("storage"), "--size", "16777216"])
        .arg("--file")
        .arg(store)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if corrupt {
        cmd.arg("--corrupt");
    }
    let mut child = cmd.spawn().expect("starting the C storage adaptor");
    let stdout = child.stdout.take().expect("piped stdout");
    let stderr = child.stderr.take().expect("piped stderr");
    let errors = Arc::new(Mutex::new(String::new()));
    let sink = errors.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            eprintln!("[c storage] {line}");
            let mut s = sink.lock().unwrap();
            s.push_str(&line);
            s.push('\n');
        }
    });
    let child = Kill(child, errors);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
        }
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(line) if line == "ready" => child,
        other => panic!("the C storage adaptor did not get ready: {other:?}"),
    }
}

fn small_demo() -> DemoConfig {
    DemoConfig {
        requests: 12,
        image_side: 160,
        images: 4,
        warmup: 1,
        block: 2,
        storage_write: Some("pipeline/storage/write".into()),
        transport: DemoTransport::Local,
        ..DemoConfig::default()
    }
}

fn run_demo(c: &Cluster, cfg: &DemoConfig) -> DemoReport {
    demo::run_on(cfg, &c.0, None, |_, _, _| {}).expect("the demo ran to the end")
}

fn store_path(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!("fractos-c-store-{}-{tag}", std::process::id()))
}

#[test]
fn c_storage_adaptor_serves_the_pipeline_demo() {
    let c = cluster();
    let store = store_path("good");
    let adaptor = start_storage(&c, Attach::Local, false, &store);
    let report = run_demo(&c, &small_demo());
    let (status, stderr) = adaptor.stop();
    let _ = std::fs::remove_file(&store);
    report
        .check()
        .unwrap_or_else(|e| panic!("the demo's checks failed with the C storage adaptor: {e}"));
    assert_eq!(report.failures(), 0);
    // Every mode ran every request and read real images through it.
    for m in [&report.fractos, &report.centralized, &report.remote_api] {
        assert_eq!(m.scores.len(), 12);
        assert!(m.scores.iter().all(|s| s.is_finite()));
    }
    // Every image was loaded and read through the C adaptor: 4 writes, and
    // one read of the whole image per request (12 + 1 warm-up) per mode.
    assert!(
        status.success(),
        "the adaptor exited with {status}: {stderr}"
    );
    assert!(
        stderr.contains("storage: 39 reads, 4 writes, 0 errors"),
        "{stderr}"
    );
}

#[test]
fn corrupted_images_from_the_c_adaptor_fail_the_demo_checks() {
    let c = cluster();
    let store = store_path("corrupt");
    let _adaptor = start_storage(&c, Attach::Tcp, true, &store);
    let cfg = DemoConfig {
        transport: DemoTransport::Tcp,
        ..small_demo()
    };
    let report = run_demo(&c, &cfg);
    let _ = std::fs::remove_file(&store);
    assert!(
        report.check().is_err(),
        "corrupted images passed the demo's checks"
    );
    assert_eq!(report.failures(), 3 * 12, "every verification must fail");
}

#[test]
fn the_read_protocol_reports_errors_through_err() {
    // A range past the store and a zero length come back on the err
    // Request with the storage status, as from the appliance's service.
    let c = cluster();
    let store = store_path("errors");
    let _adaptor = start_storage(&c, Attach::Tcp, false, &store);
    let DemoNode::Hosted(node) = &c.0[2] else {
        unreachable!()
    };
    let p = demo::attach(node, "client").expect("attach");
    let read = p
        .lookup(names::STORAGE_READ, Duration::from_secs(10))
        .expect("lookup")
        .as_request()
        .expect("a Request");
    let buf = p.register(4096).expect("register");
    let dst = p
        .memory_create(&buf, 0, 4096, fractos_sdk::Rights::WRITE)
        .expect("memory_create");
    let done = p.request_create(1, &[], &[]).expect("done");
    let err = p.request_create(2, &[], &[]).expect("err");
    let range = |off: u64, len: u64| [off.to_le_bytes(), len.to_le_bytes()].concat();
    for (imms, status) in [(range(16 << 20, 8), 1u8), (range(0, 0), 2)] {
        p.invoke(&read, &imms, &[dst.into(), done.into(), err.into()])
            .expect("invoke");
        let inv = p
            .next_invocation_timeout(Duration::from_secs(20))
            .expect("an answer");
        assert_eq!((inv.tag, inv.imms.first()), (2, Some(&status)));
    }
    // And a good read lands the stored bytes (zeros: nothing written).
    buf.fill(0xaa);
    p.invoke(
        &read,
        &range(4096, 4096),
        &[dst.into(), done.into(), err.into()],
    )
    .expect("invoke");
    let inv = p
        .next_invocation_timeout(Duration::from_secs(20))
        .expect("an answer");
    assert_eq!(inv.tag, 1);
    assert!(buf.to_vec().iter().all(|b| *b == 0));
    let _ = std::fs::remove_file(&store);
}

#[test]
fn cpp_example_runs_against_a_controller() {
    let c = cluster();
    let out = run(
        Command::new(&installed().echo)
            .arg(c.0[1].process_addr().to_string())
            .arg("cpp-echo")
            .arg(token_hex("cpp-echo")),
        "the C++ example",
    );
    assert!(out.contains("echo: ok"), "{out}");
}

#[test]
fn c_boundary_checks_pass_with_the_shared_and_static_library() {
    let c = cluster();
    for exe in [&installed().abi_check, &installed().abi_check_static] {
        let out = run(
            Command::new(exe)
                .arg(c.0[0].process_addr().to_string())
                .arg("abi-check")
                .arg(token_hex("abi-check")),
            "abi_check",
        );
        assert!(out.contains(" passed, 0 failed"), "{out}");
        assert!(!out.contains("FAILED:"), "{out}");
    }
    assert!(installed().prefix.join("include/fractos.h").is_file());
}

#[test]
fn header_compiles_pedantically_as_c99_and_cxx11() {
    let prefix = &installed().prefix;
    let src = prefix.join("header-check.c");
    std::fs::write(
        &src,
        "#include <fractos.h>\n\
         int main(void) { fractos_cap c = {0, FRACTOS_CAP_MEMORY, FRACTOS_RIGHT_READ, 0}; \
         return fractos_status_str(FRACTOS_OK) != 0 && c.kind == 0 ? 0 : 1; }\n",
    )
    .unwrap();
    let cflags = pkg_config(prefix, &["--cflags"]);
    for (compiler, std, lang) in [("cc", "-std=c99", "c"), ("c++", "-std=c++11", "c++")] {
        run(
            Command::new(compiler)
                .args([
                    std,
                    "-pedantic",
                    "-Wall",
                    "-Wextra",
                    "-Werror",
                    "-x",
                    lang,
                    "-c",
                ])
                .arg(&src)
                .args(&cflags)
                .arg("-o")
                .arg(prefix.join(format!("header-check-{lang}.o"))),
            &format!("compiling fractos.h as {std}"),
        );
    }
}
