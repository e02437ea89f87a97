//! The FractOS C SDK: a C ABI over the Rust adaptor SDK ([`fractos_sdk`]).
//!
//! Built as `libfractos.so` / `libfractos.a` (crate types `cdylib` and
//! `staticlib`; `install.sh` builds them with the `c-sdk` profile, which
//! unwinds, and installs them with `include/fractos.h` and `fractos.pc`).
//! The header is generated from this crate by cbindgen (`cbindgen.toml`)
//! and committed; a test fails when it is out of date.
//!
//! Every entry point:
//! * runs behind a panic boundary (`catch_unwind`): a panic comes back as
//!   `FRACTOS_ERR_PANIC`, never unwinds into C and never aborts (with the
//!   `c-sdk` profile);
//! * checks every pointer argument for NULL (and byte buffers for a length
//!   that fits), and every handle against its table (`src/handles.rs`), so a
//!   freed or foreign handle is an error code, not undefined behaviour;
//! * returns a [`fractos_status`] and sets the thread's last error message
//!   (`fractos_last_error_message`).
//!
//! See README.md (next to Cargo.toml) for the ownership and threading rules.
#![allow(non_camel_case_types)]

mod handles;
mod status;

use std::ffi::{c_char, c_void, CStr};
use std::ptr::NonNull;
use std::time::Duration;

use fractos_sdk::{
    AttachOptions, Cap, Handle, Invocation, MemoryCap, ObjectKind, Pending, Process, Region,
    RequestCap, Rights,
};
use std::sync::Mutex;

use handles::Table;
pub use status::fractos_status;
use status::{fractos_status::*, guard, guard_value, Fail};

// ------------------------------------------------------------------ types

/// A process attached to its controller. Opaque; made by the
/// `fractos_attach_*` functions, released by `fractos_close`.
pub struct fractos_process {
    _opaque: [u8; 0],
}

/// A region of registered memory. Opaque; made by `fractos_register`,
/// released by `fractos_region_free`.
pub struct fractos_region {
    _opaque: [u8; 0],
}

/// An invocation of one of this process's Requests. Opaque; made by
/// `fractos_next_invocation` (released by `fractos_invocation_free`) or
/// lent to a `fractos_handler` for the duration of the call.
pub struct fractos_invocation {
    _opaque: [u8; 0],
}

/// An operation in flight (opaque), from a `fractos_start_*` function:
/// awaited and released by `fractos_pending_wait`, or abandoned with
/// `fractos_pending_free`.
pub struct fractos_pending {
    _opaque: [u8; 0],
}

/// `fractos_cap.kind` of a Memory capability.
pub const FRACTOS_CAP_MEMORY: u32 = 0;
/// `fractos_cap.kind` of a Request capability.
pub const FRACTOS_CAP_REQUEST: u32 = 1;
/// Right to read a Memory capability's window (be a copy's source).
pub const FRACTOS_RIGHT_READ: u32 = 1;
/// Right to write a Memory capability's window (be a copy's destination).
pub const FRACTOS_RIGHT_WRITE: u32 = 2;
/// Both rights.
pub const FRACTOS_RIGHT_READ_WRITE: u32 = 3;
/// `fractos_serve` flag: run the handler on the channel's reader thread
/// (see `fractos_serve`).
pub const FRACTOS_SERVE_INLINE: u32 = 1;
/// Most handler threads `fractos_attach_options.handler_threads` may ask.
pub const FRACTOS_MAX_HANDLER_THREADS: u32 = 256;
/// Bytes of a process token.
pub const FRACTOS_TOKEN_LEN: usize = 32;

/// A capability: a plain value naming an entry of this process's
/// capability table (the controller checks every use). Copy it freely; it
/// owns nothing on the C side. The table entry is released with
/// `fractos_drop_cap`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct fractos_cap {
    /// Handle in this process's capability table.
    pub handle: u32,
    /// `FRACTOS_CAP_MEMORY` or `FRACTOS_CAP_REQUEST`.
    pub kind: u32,
    /// Memory: `FRACTOS_RIGHT_*` bits. Request: 0.
    pub rights: u32,
    /// Memory: window length in bytes. Request: 0.
    pub len: u64,
}

/// Attach options. Start from `fractos_attach_options_default()` and
/// change fields; a 0 timeout means the default.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct fractos_attach_options {
    /// Timeout of every blocking call, in milliseconds (default 10000).
    pub op_timeout_ms: u32,
    /// Timeout of the connection and the attach handshake (default 5000).
    pub connect_timeout_ms: u32,
    /// Threads running `fractos_serve` handlers (default 2). 0: no pool;
    /// the application runs handlers with `fractos_dispatch`. At most
    /// `FRACTOS_MAX_HANDLER_THREADS`.
    pub handler_threads: u32,
}

/// A handler registered with `fractos_serve`.
///
/// `process` is the handle `fractos_serve` was called with; `inv` is valid
/// only until the handler returns (the SDK frees it then; do not call
/// `fractos_invocation_free` on it). The capabilities it delivered stay in
/// the process's table until dropped (`fractos_invocation_drop_caps`).
/// Runs on an SDK thread: `user` must be safe to use from there. Must not
/// unwind (no C++ exception may leave it).
pub type fractos_handler = Option<
    unsafe extern "C" fn(
        process: *mut fractos_process,
        inv: *const fractos_invocation,
        user: *mut c_void,
    ),
>;

// ----------------------------------------------------------------- tables

static PROCESSES: Table<Process> = Table::new(1, "process");
static REGIONS: Table<RegionEntry> = Table::new(2, "region");
static INVOCATIONS: Table<Invocation> = Table::new(3, "invocation");

static PENDING: Table<Mutex<Option<InFlight>>> = Table::new(4, "pending operation");

struct RegionEntry {
    region: Region,
}

/// What a `fractos_pending` handle holds until it is awaited.
enum InFlight {
    /// An operation answered with nothing.
    Done(Pending<()>),
    /// An operation answered with a Memory capability.
    Memory(Pending<MemoryCap>),
}

// ---------------------------------------------------- pointer arguments

/// An out-pointer argument, checked for NULL before the call does anything.
struct Out<T>(NonNull<T>);

/// `ptr` as an [`Out`], or `FRACTOS_ERR_NULL_POINTER` naming `what`.
///
/// # Safety
/// `ptr` is NULL or points to writable, aligned storage for a `T` for the
/// call's duration.
unsafe fn out_arg<T>(ptr: *mut T, what: &str) -> Result<Out<T>, Fail> {
    NonNull::new(ptr).map(Out).ok_or_else(|| Fail::null(what))
}

impl<T: Copy> Out<T> {
    /// Stores the call's result.
    fn put(self, value: T) {
        // SAFETY: non-null, and writable aligned storage for a `T` by
        // `out_arg`'s contract; `T: Copy`, so the old contents need no drop.
        unsafe { self.0.as_ptr().write(value) }
    }
}

/// A NUL-terminated UTF-8 string argument.
///
/// # Safety
/// `ptr` is NULL or points to a NUL-terminated string readable for the
/// call's duration.
unsafe fn text<'a>(ptr: *const c_char, what: &str) -> Result<&'a str, Fail> {
    if ptr.is_null() {
        return Err(Fail::null(what));
    }
    // SAFETY: non-null and NUL-terminated by the function's contract.
    let s = unsafe { CStr::from_ptr(ptr) };
    s.to_str()
        .map_err(|_| Fail::invalid(format!("{what} is not valid UTF-8")))
}

/// A byte-buffer argument of `len` bytes (`ptr` may be NULL when `len` is 0).
///
/// # Safety
/// `ptr` is NULL or points to `len` bytes readable for the call's duration.
unsafe fn bytes<'a>(ptr: *const u8, len: usize, what: &str) -> Result<&'a [u8], Fail> {
    if len == 0 {
        return Ok(&[]);
    }
    if ptr.is_null() {
        return Err(Fail::null(what));
    }
    if len > isize::MAX as usize {
        return Err(Fail::invalid(format!("{what}: length {len} is too large")));
    }
    // SAFETY: non-null, `len` readable bytes by the function's contract,
    // and `len` fits an isize (checked above).
    Ok(unsafe { std::slice::from_raw_parts(ptr, len) })
}

/// An immediates argument: refused above the protocol's limit before the
/// buffer is touched.
///
/// # Safety
/// As [`bytes`].
unsafe fn imms_arg<'a>(ptr: *const u8, len: usize) -> Result<&'a [u8], Fail> {
    let max = fractos_sdk::wire::MAX_IMMEDIATES;
    if len > max {
        return Err(Fail::invalid(format!(
            "imms: {len} bytes, at most {max} per message"
        )));
    }
    // SAFETY: forwarded contract.
    unsafe { bytes(ptr, len, "imms") }
}

/// A writable byte buffer argument of `len` bytes.
///
/// # Safety
/// `ptr` is NULL or points to `len` bytes writable for the call's duration,
/// not aliased by anything else the call reads.
unsafe fn bytes_mut<'a>(ptr: *mut u8, len: usize, what: &str) -> Result<&'a mut [u8], Fail> {
    if len == 0 {
        return Ok(&mut []);
    }
    if ptr.is_null() {
        return Err(Fail::null(what));
    }
    if len > isize::MAX as usize {
        return Err(Fail::invalid(format!("{what}: length {len} is too large")));
    }
    // SAFETY: non-null, `len` writable unaliased bytes by the function's
    // contract, and `len` fits an isize (checked above).
    Ok(unsafe { std::slice::from_raw_parts_mut(ptr, len) })
}

/// A `fractos_cap` argument passed by pointer.
///
/// # Safety
/// `ptr` is NULL or points to a readable `fractos_cap`.
unsafe fn cap_arg(ptr: *const fractos_cap, what: &str) -> Result<fractos_cap, Fail> {
    if ptr.is_null() {
        return Err(Fail::null(what));
    }
    // SAFETY: non-null and pointing to a `fractos_cap` by the function's
    // contract; every bit pattern is a valid `fractos_cap` (plain integers).
    Ok(unsafe { ptr.read() })
}

/// An array of `n` capabilities (NULL allowed when `n` is 0).
///
/// # Safety
/// `ptr` is NULL or points to `n` readable `fractos_cap`s.
unsafe fn caps_arg(ptr: *const fractos_cap, n: usize, what: &str) -> Result<Vec<Cap>, Fail> {
    if n == 0 {
        return Ok(Vec::new());
    }
    if ptr.is_null() {
        return Err(Fail::null(what));
    }
    if n > fractos_sdk::wire::MAX_CAPS_PER_MESSAGE {
        return Err(Fail::invalid(format!(
            "{what}: {n} capabilities, at most {} per message",
            fractos_sdk::wire::MAX_CAPS_PER_MESSAGE
        )));
    }
    // SAFETY: non-null, `n` readable `fractos_cap`s by the function's
    // contract (n is small: checked above); any bit pattern is valid.
    let raw = unsafe { std::slice::from_raw_parts(ptr, n) };
    raw.iter()
        .enumerate()
        .map(|(i, c)| to_cap(*c, &format!("{what}[{i}]")))
        .collect()
}

/// Runs `get` on the object behind `handle` and stores its answer in
/// `*out`: the shape of every accessor.
///
/// # Safety
/// `out` is NULL or writable.
unsafe fn answer<T, P, U: Copy>(
    what: &str,
    table: &Table<T>,
    handle: *const P,
    out: *mut U,
    get: impl FnOnce(&T) -> Result<U, Fail>,
) -> fractos_status {
    guard(what, || {
        // SAFETY: forwarded contract (`out` is NULL or writable).
        let out = unsafe { out_arg(out, "out") }?;
        out.put(get(&*table.get(handle)?)?);
        Ok(())
    })
}

fn to_rights(bits: u32, what: &str) -> Result<Rights, Fail> {
    u8::try_from(bits)
        .ok()
        .and_then(Rights::from_bits)
        .ok_or_else(|| {
            Fail::invalid(format!(
                "{what}: rights {bits:#x} has bits other than FRACTOS_RIGHT_READ | FRACTOS_RIGHT_WRITE"
            ))
        })
}

fn to_cap(c: fractos_cap, what: &str) -> Result<Cap, Fail> {
    match c.kind {
        FRACTOS_CAP_MEMORY => {
            Ok(MemoryCap::from_raw(Handle(c.handle), to_rights(c.rights, what)?, c.len).into())
        }
        FRACTOS_CAP_REQUEST => Ok(RequestCap::from_raw(Handle(c.handle)).into()),
        k => Err(Fail::invalid(format!(
            "{what}: kind {k} is neither FRACTOS_CAP_MEMORY nor FRACTOS_CAP_REQUEST"
        ))),
    }
}

fn wrong_kind(what: &str, expected: &str) -> Fail {
    Fail::new(
        FRACTOS_ERR_WRONG_TYPE,
        format!("{what} is not a {expected} capability (see its kind field)"),
    )
}

fn memory_arg(c: fractos_cap, what: &str) -> Result<MemoryCap, Fail> {
    to_cap(c, what)?
        .as_memory()
        .ok_or_else(|| wrong_kind(what, "Memory"))
}

fn request_arg(c: fractos_cap, what: &str) -> Result<RequestCap, Fail> {
    to_cap(c, what)?
        .as_request()
        .ok_or_else(|| wrong_kind(what, "Request"))
}

fn cap_out(c: Cap) -> fractos_cap {
    let info = c.info();
    fractos_cap {
        handle: c.handle().0,
        kind: match info.kind {
            ObjectKind::Memory => FRACTOS_CAP_MEMORY,
            ObjectKind::Request => FRACTOS_CAP_REQUEST,
        },
        rights: u32::from(info.rights.bits()),
        len: info.len,
    }
}

fn millis(ms: u32) -> Duration {
    Duration::from_millis(u64::from(ms))
}

// ------------------------------------------------------------- messages

/// A static, NUL-terminated description of `status` (any integer: unknown
/// codes get "unknown status"). Never NULL; never free it.
#[no_mangle]
pub extern "C" fn fractos_status_str(status: i32) -> *const c_char {
    guard_value(c"unknown status".as_ptr(), || {
        status::ALL
            .iter()
            .find(|s| **s as i32 == status)
            .map_or(c"unknown status".as_ptr(), |s| s.describe().as_ptr())
    })
}

/// The calling thread's last error message: what failed and what to do,
/// e.g. "fractos_attach_tcp: I/O error while connecting ...". Never NULL
/// (empty before any failure). Owned by the SDK: valid until the thread's
/// next failing FractOS call; copy it to keep it. Successful calls leave it
/// unchanged.
#[no_mangle]
pub extern "C" fn fractos_last_error_message() -> *const c_char {
    guard_value(c"".as_ptr(), status::last_error_ptr)
}

/// The SDK version (static string, e.g. "0.1.0").
#[no_mangle]
pub extern "C" fn fractos_version() -> *const c_char {
    const VERSION: &CStr =
        match CStr::from_bytes_with_nul(concat!(env!("CARGO_PKG_VERSION"), "\0").as_bytes()) {
            Ok(v) => v,
            Err(_) => c"unknown",
        };
    VERSION.as_ptr()
}

/// For tests of the panic boundary: panics inside the entry point and
/// returns what the boundary made of it, `FRACTOS_ERR_PANIC` (with the
/// message in `fractos_last_error_message`). A library built without
/// unwinding (not with `install.sh`) aborts the program instead.
#[no_mangle]
pub extern "C" fn fractos_selftest_panic() -> fractos_status {
    guard("fractos_selftest_panic", || {
        panic!("forced by fractos_selftest_panic");
    })
}

// --------------------------------------------------------------- attach

/// The default attach options (10 s operations, 5 s connect, 2 handler
/// threads).
#[no_mangle]
pub extern "C" fn fractos_attach_options_default() -> fractos_attach_options {
    let d = AttachOptions::default();
    let ms = |d: Duration| u32::try_from(d.as_millis()).unwrap_or(u32::MAX);
    fractos_attach_options {
        op_timeout_ms: ms(d.op_timeout),
        connect_timeout_ms: ms(d.connect_timeout),
        handler_threads: u32::try_from(d.handler_threads).unwrap_or(u32::MAX),
    }
}

/// Options from the C struct (NULL: defaults).
///
/// # Safety
/// `opts` is NULL or points to a readable `fractos_attach_options`.
unsafe fn options(opts: *const fractos_attach_options) -> Result<AttachOptions, Fail> {
    let mut o = AttachOptions::default();
    if opts.is_null() {
        return Ok(o);
    }
    // SAFETY: non-null and readable by the function's contract; every bit
    // pattern is valid (plain integers).
    let c = unsafe { opts.read() };
    if c.op_timeout_ms > 0 {
        o = o.op_timeout(millis(c.op_timeout_ms));
    }
    if c.connect_timeout_ms > 0 {
        o = o.connect_timeout(millis(c.connect_timeout_ms));
    }
    if c.handler_threads > FRACTOS_MAX_HANDLER_THREADS {
        return Err(Fail::invalid(format!(
            "handler_threads {} is above FRACTOS_MAX_HANDLER_THREADS ({FRACTOS_MAX_HANDLER_THREADS})",
            c.handler_threads
        )));
    }
    Ok(o.handler_threads(c.handler_threads as usize))
}

/// The token argument.
///
/// # Safety
/// `token` is NULL or points to `FRACTOS_TOKEN_LEN` readable bytes.
unsafe fn token_arg(token: *const u8) -> Result<[u8; 32], Fail> {
    // SAFETY: forwarded contract.
    let t = unsafe { bytes(token, FRACTOS_TOKEN_LEN, "the token") }?;
    let mut out = [0u8; 32];
    out.copy_from_slice(t);
    Ok(out)
}

/// What the three attach functions share.
///
/// # Safety
/// As the public attach functions.
unsafe fn attach_with(
    target: *const c_char,
    what: &str,
    name: *const c_char,
    token: *const u8,
    opts: *const fractos_attach_options,
    out: *mut *mut fractos_process,
    connect: impl FnOnce(&str, &str, [u8; 32], AttachOptions) -> Result<Process, fractos_sdk::SdkError>,
) -> Result<(), Fail> {
    // SAFETY: this function's contract (`out` is NULL or writable).
    let out = unsafe { out_arg(out, "out") }?;
    // SAFETY: forwarded contracts of the public function.
    let (target, name, token, opts) = unsafe {
        (
            text(target, what)?,
            text(name, "the process name")?,
            token_arg(token)?,
            options(opts)?,
        )
    };
    let p = connect(target, name, token, opts)?;
    out.put(PROCESSES.insert(p));
    Ok(())
}

/// Connects to the controller at `addr` ("host:port") over TCP and
/// attaches as `name` with `token` (`FRACTOS_TOKEN_LEN` bytes, issued by
/// whoever runs the cluster for this exact name). `opts` may be NULL
/// (defaults). On success stores a new process handle in `*out` (release
/// it with `fractos_close`). Blocks up to the connect timeout.
///
/// # Safety
/// `addr` and `name` are NULL or NUL-terminated strings; `token` is NULL or
/// points to 32 bytes; `opts` is NULL or points to options; `out` is NULL
/// or writable.
#[no_mangle]
pub unsafe extern "C" fn fractos_attach_tcp(
    addr: *const c_char,
    name: *const c_char,
    token: *const u8,
    opts: *const fractos_attach_options,
    out: *mut *mut fractos_process,
) -> fractos_status {
    guard("fractos_attach_tcp", || {
        // SAFETY: this function's contract.
        unsafe {
            attach_with(addr, "the address", name, token, opts, out, |a, n, t, o| {
                Process::attach(a, n, t, o)
            })
        }
    })
}

/// Attaches through the local socket of a controller on this host
/// (`fractos controller --local-socket PATH`): shared-memory rings, and
/// regions the controller reads and writes directly. Otherwise as
/// `fractos_attach_tcp`.
///
/// # Safety
/// As `fractos_attach_tcp`, with `socket_path` for `addr`.
#[no_mangle]
pub unsafe extern "C" fn fractos_attach_local(
    socket_path: *const c_char,
    name: *const c_char,
    token: *const u8,
    opts: *const fractos_attach_options,
    out: *mut *mut fractos_process,
) -> fractos_status {
    guard("fractos_attach_local", || {
        // SAFETY: this function's contract.
        unsafe {
            attach_with(
                socket_path,
                "the socket path",
                name,
                token,
                opts,
                out,
                |a, n, t, o| Process::attach_local(a, n, t, o),
            )
        }
    })
}

/// Attaches through an appliance's shared-memory slot file (listed under
/// `shm_slots` in `fractos up`'s cluster.json). Otherwise as
/// `fractos_attach_tcp`.
///
/// # Safety
/// As `fractos_attach_tcp`, with `slot_path` for `addr`.
#[no_mangle]
pub unsafe extern "C" fn fractos_attach_slot(
    slot_path: *const c_char,
    name: *const c_char,
    token: *const u8,
    opts: *const fractos_attach_options,
    out: *mut *mut fractos_process,
) -> fractos_status {
    guard("fractos_attach_slot", || {
        // SAFETY: this function's contract.
        unsafe {
            attach_with(
                slot_path,
                "the slot path",
                name,
                token,
                opts,
                out,
                |a, n, t, o| Process::attach_slot(a, n, t, o),
            )
        }
    })
}

/// Parses a token written as 64 hex digits into `out` (32 bytes).
///
/// # Safety
/// `hex` is NULL or a NUL-terminated string; `out` is NULL or points to 32
/// writable bytes.
#[no_mangle]
pub unsafe extern "C" fn fractos_token_from_hex(
    hex: *const c_char,
    out: *mut u8,
) -> fractos_status {
    guard("fractos_token_from_hex", || {
        // SAFETY: this function's contract.
        let (hex, out) = unsafe { (text(hex, "the hex token")?, bytes_mut(out, 32, "out")?) };
        let digits = hex.as_bytes();
        if digits.len() != 64 {
            return Err(Fail::invalid(format!(
                "a token is 64 hex digits, got {} characters",
                digits.len()
            )));
        }
        let nibble = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
        for (i, pair) in digits.chunks(2).enumerate() {
            match (nibble(pair[0]), nibble(pair[1])) {
                (Some(h), Some(l)) => out[i] = h << 4 | l,
                _ => return Err(Fail::invalid("the token has a non-hex character")),
            }
        }
        Ok(())
    })
}

/// Closes the channel (process exit for the controller: everything the
/// process owns is revoked, its names withdrawn) and releases the handle.
/// Waits for the SDK's reader thread; do not call it from a handler of
/// the same process. Regions and invocations keep their own handles (free
/// them too). A second close of the same handle is
/// `FRACTOS_ERR_INVALID_HANDLE`.
#[no_mangle]
pub extern "C" fn fractos_close(process: *mut fractos_process) -> fractos_status {
    guard("fractos_close", || {
        let p = PROCESSES.remove(process)?;
        (*p).clone().close();
        Ok(())
    })
}

/// Whether the channel to the controller is still open (false for an
/// invalid handle).
#[no_mangle]
pub extern "C" fn fractos_is_connected(process: *const fractos_process) -> bool {
    guard_value(false, || {
        PROCESSES.get(process).is_ok_and(|p| p.is_connected())
    })
}

/// Stores the controller's node id in `*out`.
///
/// # Safety
/// Every pointer argument is NULL (refused with `FRACTOS_ERR_NULL_POINTER`)
/// or valid for the call: out-pointers writable, inputs readable.
#[no_mangle]
pub unsafe extern "C" fn fractos_node_id(
    process: *const fractos_process,
    out: *mut u32,
) -> fractos_status {
    // SAFETY: this function's contract.
    unsafe {
        answer("fractos_node_id", &PROCESSES, process, out, |p| {
            Ok(p.node().0)
        })
    }
}

/// Sets the timeout of this handle's blocking calls (operations,
/// `fractos_next_invocation` is given its own). 0 is refused.
#[no_mangle]
pub extern "C" fn fractos_set_timeout(
    process: *mut fractos_process,
    timeout_ms: u32,
) -> fractos_status {
    guard("fractos_set_timeout", || {
        if timeout_ms == 0 {
            return Err(Fail::invalid("a timeout of 0 ms would fail every call"));
        }
        let p = PROCESSES.get(process)?;
        PROCESSES.replace(process, p.with_timeout(millis(timeout_ms)))
    })
}

fn proc_of(p: *const fractos_process) -> Result<std::sync::Arc<Process>, Fail> {
    PROCESSES.get(p)
}

// --------------------------------------------------------------- memory

/// Registers a zeroed region of `len` bytes (page-aligned) and stores its
/// handle in `*out`. The controller reaches it only through Memory
/// capabilities made with `fractos_memory_create`. Release the handle with
/// `fractos_region_free`; the bytes stay registered until
/// `fractos_unregister` or `fractos_close`.
///
/// # Safety
/// Every pointer argument is NULL (refused with `FRACTOS_ERR_NULL_POINTER`)
/// or valid for the call: out-pointers writable, inputs readable.
#[no_mangle]
pub unsafe extern "C" fn fractos_register(
    process: *const fractos_process,
    len: u64,
    out: *mut *mut fractos_region,
) -> fractos_status {
    guard("fractos_register", || {
        // SAFETY: this function's contract (`out` is NULL or writable).
        let out = unsafe { out_arg(out, "out") }?;
        let region = proc_of(process)?.register(len)?;
        out.put(REGIONS.insert(RegionEntry { region }));
        Ok(())
    })
}

/// Unregisters `region`: later copies through capabilities over it fail
/// with `FRACTOS_ERR_MEMORY_FAULT` (revoke them first to fail them with
/// `FRACTOS_ERR_REVOKED`). Returns once the controller stopped touching it.
/// The region handle stays valid (free it with `fractos_region_free`).
#[no_mangle]
pub extern "C" fn fractos_unregister(
    process: *const fractos_process,
    region: *const fractos_region,
) -> fractos_status {
    guard("fractos_unregister", || {
        let p = proc_of(process)?;
        let r = REGIONS.get(region)?;
        if p.unregister(&r.region) {
            Ok(())
        } else {
            Err(Fail::invalid(
                "the region is not registered with this process (another process's, or unregistered already)",
            ))
        }
    })
}

/// Releases a region handle. The bytes stay registered (and reachable by
/// the controller) until `fractos_unregister` or `fractos_close`; pointers
/// from `fractos_region_data` must not be used after this call. A second
/// free is `FRACTOS_ERR_INVALID_HANDLE`.
#[no_mangle]
pub extern "C" fn fractos_region_free(region: *mut fractos_region) -> fractos_status {
    guard("fractos_region_free", || REGIONS.remove(region).map(drop))
}

/// Stores the region's length in bytes in `*out`.
///
/// # Safety
/// Every pointer argument is NULL (refused with `FRACTOS_ERR_NULL_POINTER`)
/// or valid for the call: out-pointers writable, inputs readable.
#[no_mangle]
pub unsafe extern "C" fn fractos_region_len(
    region: *const fractos_region,
    out: *mut u64,
) -> fractos_status {
    // SAFETY: this function's contract.
    unsafe {
        answer("fractos_region_len", &REGIONS, region, out, |r| {
            Ok(r.region.len())
        })
    }
}

/// Stores a pointer to the region's first byte in `*out` (page-aligned,
/// stable until `fractos_region_free`): for zero-copy I/O such as
/// `pread(fd, data, ...)` or a device's DMA. The controller may read or
/// write these bytes concurrently while a copy through a capability over
/// them runs (directly, over a local channel): synchronise on the copy's
/// completion, as with a DMA buffer.
///
/// # Safety
/// Every pointer argument is NULL (refused with `FRACTOS_ERR_NULL_POINTER`)
/// or valid for the call: out-pointers writable, inputs readable.
#[no_mangle]
pub unsafe extern "C" fn fractos_region_data(
    region: *const fractos_region,
    out: *mut *mut u8,
) -> fractos_status {
    // SAFETY: this function's contract.
    unsafe {
        answer("fractos_region_data", &REGIONS, region, out, |r| {
            Ok(r.region.as_mut_ptr())
        })
    }
}

/// Copies `len` bytes at `offset` of the region into `buf`
/// (`FRACTOS_ERR_OUT_OF_RANGE` past its end).
///
/// # Safety
/// `buf` is NULL or points to `len` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn fractos_region_read(
    region: *const fractos_region,
    offset: u64,
    buf: *mut u8,
    len: usize,
) -> fractos_status {
    guard("fractos_region_read", || {
        // SAFETY: this function's contract.
        let buf = unsafe { bytes_mut(buf, len, "buf") }?;
        Ok(REGIONS.get(region)?.region.read_at(offset, buf)?)
    })
}

/// Copies `len` bytes from `data` into the region at `offset`.
///
/// # Safety
/// `data` is NULL or points to `len` readable bytes.
#[no_mangle]
pub unsafe extern "C" fn fractos_region_write(
    region: *const fractos_region,
    offset: u64,
    data: *const u8,
    len: usize,
) -> fractos_status {
    guard("fractos_region_write", || {
        // SAFETY: this function's contract.
        let data = unsafe { bytes(data, len, "data") }?;
        Ok(REGIONS.get(region)?.region.write_at(offset, data)?)
    })
}

// ------------------------------------------------------ the object model

/// Makes a Memory capability for `[offset, offset+len)` of `region` with
/// `rights` (`FRACTOS_RIGHT_*`), stored in `*out`. The window must lie
/// inside the region. Blocks until the controller answers.
///
/// # Safety
/// Every pointer argument is NULL (refused with `FRACTOS_ERR_NULL_POINTER`)
/// or valid for the call: out-pointers writable, inputs readable.
#[no_mangle]
pub unsafe extern "C" fn fractos_memory_create(
    process: *const fractos_process,
    region: *const fractos_region,
    offset: u64,
    len: u64,
    rights: u32,
    out: *mut fractos_cap,
) -> fractos_status {
    guard("fractos_memory_create", || {
        // SAFETY: this function's contract (`out` is NULL or writable).
        let out = unsafe { out_arg(out, "out") }?;
        let p = proc_of(process)?;
        let r = REGIONS.get(region)?;
        let rights = to_rights(rights, "rights")?;
        let cap = p.memory_create(&r.region, offset, len, rights)?;
        out.put(cap_out(cap.into()));
        Ok(())
    })
}

/// `fractos_diminish`'s capability and rights.
///
/// # Safety
/// `cap` is NULL or points to a `fractos_cap`.
unsafe fn diminish_args(cap: *const fractos_cap, rights: u32) -> Result<(MemoryCap, Rights), Fail> {
    // SAFETY: forwarded contract.
    let cap = memory_arg(unsafe { cap_arg(cap, "cap") }?, "cap")?;
    Ok((cap, to_rights(rights, "rights")?))
}

/// Derives from the Memory capability `*cap` one for its sub-window
/// `[offset, offset+len)` with `rights` (a subset of its own), stored in
/// `*out`.
///
/// # Safety
/// `cap` is NULL or points to a `fractos_cap`; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn fractos_diminish(
    process: *const fractos_process,
    cap: *const fractos_cap,
    offset: u64,
    len: u64,
    rights: u32,
    out: *mut fractos_cap,
) -> fractos_status {
    guard("fractos_diminish", || {
        // SAFETY: this function's contract (`out` is NULL or writable).
        let out = unsafe { out_arg(out, "out") }?;
        // SAFETY: this function's contract.
        let (cap, rights) = unsafe { diminish_args(cap, rights) }?;
        let d = proc_of(process)?.diminish(&cap, offset, len, rights)?;
        out.put(cap_out(d.into()));
        Ok(())
    })
}

/// Makes a Request capability for this process's handler `tag`, with
/// bound immediates (`imms`, `imms_len` bytes) and capabilities (`caps`,
/// `ncaps`), delivered before the invoker's; stored in `*out`.
///
/// # Safety
/// `imms` is NULL or points to `imms_len` bytes; `caps` is NULL or points
/// to `ncaps` capabilities; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn fractos_request_create(
    process: *const fractos_process,
    tag: u64,
    imms: *const u8,
    imms_len: usize,
    caps: *const fractos_cap,
    ncaps: usize,
    out: *mut fractos_cap,
) -> fractos_status {
    guard("fractos_request_create", || {
        // SAFETY: this function's contract (`out` is NULL or writable).
        let out = unsafe { out_arg(out, "out") }?;
        // SAFETY: this function's contract.
        let (imms, caps) = unsafe { (imms_arg(imms, imms_len)?, caps_arg(caps, ncaps, "caps")?) };
        let r = proc_of(process)?.request_create(tag, imms, &caps)?;
        out.put(cap_out(r.into()));
        Ok(())
    })
}

/// Derives from the Request `*request` one with more bound arguments
/// (appended to its bound ones), stored in `*out`.
///
/// # Safety
/// As `fractos_request_create`, and `request` is NULL or points to a
/// `fractos_cap`.
#[no_mangle]
pub unsafe extern "C" fn fractos_derive(
    process: *const fractos_process,
    request: *const fractos_cap,
    imms: *const u8,
    imms_len: usize,
    caps: *const fractos_cap,
    ncaps: usize,
    out: *mut fractos_cap,
) -> fractos_status {
    guard("fractos_derive", || {
        // SAFETY: this function's contract (`out` is NULL or writable).
        let out = unsafe { out_arg(out, "out") }?;
        // SAFETY: this function's contract.
        let (request, imms, caps) = unsafe {
            (
                request_arg(cap_arg(request, "request")?, "request")?,
                imms_arg(imms, imms_len)?,
                caps_arg(caps, ncaps, "caps")?,
            )
        };
        let r = proc_of(process)?.derive(&request, imms, &caps)?;
        out.put(cap_out(r.into()));
        Ok(())
    })
}

/// `fractos_invoke`'s Request, immediates and capabilities.
///
/// # Safety
/// As `fractos_invoke`.
unsafe fn invoke_args<'a>(
    request: *const fractos_cap,
    imms: *const u8,
    imms_len: usize,
    caps: *const fractos_cap,
    ncaps: usize,
) -> Result<(RequestCap, &'a [u8], Vec<Cap>), Fail> {
    // SAFETY: forwarded contract.
    unsafe {
        Ok((
            request_arg(cap_arg(request, "request")?, "request")?,
            imms_arg(imms, imms_len)?,
            caps_arg(caps, ncaps, "caps")?,
        ))
    }
}

/// `fractos_copy`'s source, destination and optional completion.
///
/// # Safety
/// As `fractos_copy`.
unsafe fn copy_args(
    src: *const fractos_cap,
    dst: *const fractos_cap,
    completion: *const fractos_cap,
) -> Result<(MemoryCap, MemoryCap, Option<RequestCap>), Fail> {
    // SAFETY: forwarded contract.
    let (src, dst) = unsafe { (cap_arg(src, "src")?, cap_arg(dst, "dst")?) };
    let (src, dst) = (memory_arg(src, "src")?, memory_arg(dst, "dst")?);
    if completion.is_null() {
        return Ok((src, dst, None));
    }
    // SAFETY: non-null, so a capability by the forwarded contract.
    let completion = unsafe { cap_arg(completion, "completion") }?;
    Ok((src, dst, Some(request_arg(completion, "completion")?)))
}

/// Invokes the Request `*request` with immediates and capabilities.
/// Returns once the owner's controller delivered the invocation (pass a
/// continuation Request to learn when the owner handled it).
///
/// # Safety
/// `request` is NULL or points to a `fractos_cap`; `imms` is NULL or
/// points to `imms_len` bytes; `caps` is NULL or points to `ncaps`
/// capabilities.
#[no_mangle]
pub unsafe extern "C" fn fractos_invoke(
    process: *const fractos_process,
    request: *const fractos_cap,
    imms: *const u8,
    imms_len: usize,
    caps: *const fractos_cap,
    ncaps: usize,
) -> fractos_status {
    guard("fractos_invoke", || {
        // SAFETY: this function's contract.
        let (request, imms, caps) = unsafe { invoke_args(request, imms, imms_len, caps, ncaps) }?;
        Ok(proc_of(process)?.invoke(&request, imms, &caps)?)
    })
}

/// Copies the bytes of the Memory capability `*src` (READ) into the start
/// of `*dst` (WRITE), owner to owner, then invokes the Request
/// `*completion` (without arguments) when it is not NULL. Returns after
/// the last byte is written and the completion invoked.
///
/// # Safety
/// `src` and `dst` are NULL or point to capabilities; `completion` is NULL
/// or points to a capability.
#[no_mangle]
pub unsafe extern "C" fn fractos_copy(
    process: *const fractos_process,
    src: *const fractos_cap,
    dst: *const fractos_cap,
    completion: *const fractos_cap,
) -> fractos_status {
    guard("fractos_copy", || {
        // SAFETY: this function's contract.
        let (src, dst, completion) = unsafe { copy_args(src, dst, completion) }?;
        Ok(proc_of(process)?.copy(&src, &dst, completion.as_ref())?)
    })
}

/// Which of the single-capability operations to run.
#[derive(Clone, Copy)]
enum CapOp {
    Revoke,
    Drop,
}

/// # Safety
/// `cap` is NULL or points to a `fractos_cap`.
unsafe fn cap_op(
    process: *const fractos_process,
    cap: *const fractos_cap,
    op: CapOp,
) -> Result<(), Fail> {
    // SAFETY: forwarded contract.
    let cap = to_cap(unsafe { cap_arg(cap, "cap") }?, "cap")?;
    let p = proc_of(process)?;
    Ok(match op {
        CapOp::Revoke => p.revoke(cap),
        CapOp::Drop => p.drop_cap(cap),
    }?)
}

/// Revokes `*cap` and every capability derived from it, everywhere. The
/// handle stays in this process's table (drop it).
///
/// # Safety
/// `cap` is NULL or points to a `fractos_cap`.
#[no_mangle]
pub unsafe extern "C" fn fractos_revoke(
    process: *const fractos_process,
    cap: *const fractos_cap,
) -> fractos_status {
    // SAFETY: this function's contract.
    guard("fractos_revoke", || unsafe {
        cap_op(process, cap, CapOp::Revoke)
    })
}

/// Removes `*cap` from this process's capability table (derived
/// capabilities are unaffected). Every capability a process receives
/// (from `fractos_lookup`, in invocations) counts against its limit until
/// dropped.
///
/// # Safety
/// `cap` is NULL or points to a `fractos_cap`.
#[no_mangle]
pub unsafe extern "C" fn fractos_drop_cap(
    process: *const fractos_process,
    cap: *const fractos_cap,
) -> fractos_status {
    // SAFETY: this function's contract.
    guard("fractos_drop_cap", || unsafe {
        cap_op(process, cap, CapOp::Drop)
    })
}

/// Invokes the Request `*notify` (without arguments) when the object
/// behind `*cap` dies (revoked, or its owner exited).
///
/// # Safety
/// `cap` and `notify` are NULL or point to capabilities.
#[no_mangle]
pub unsafe extern "C" fn fractos_monitor(
    process: *const fractos_process,
    cap: *const fractos_cap,
    notify: *const fractos_cap,
) -> fractos_status {
    guard("fractos_monitor", || {
        // SAFETY: this function's contract.
        let (cap, notify) = unsafe { (cap_arg(cap, "cap")?, cap_arg(notify, "notify")?) };
        let (cap, notify) = (to_cap(cap, "cap")?, request_arg(notify, "notify")?);
        Ok(proc_of(process)?.monitor(cap, &notify)?)
    })
}

/// Publishes `*cap` under `name` in the cluster's name service (withdrawn
/// when this process exits). `FRACTOS_ERR_NAME_TAKEN` if taken.
///
/// # Safety
/// `name` is NULL or a NUL-terminated string; `cap` is NULL or points to a
/// capability.
#[no_mangle]
pub unsafe extern "C" fn fractos_publish(
    process: *const fractos_process,
    name: *const c_char,
    cap: *const fractos_cap,
) -> fractos_status {
    guard("fractos_publish", || {
        // SAFETY: this function's contract.
        let (name, cap) = unsafe { (text(name, "the name")?, cap_arg(cap, "cap")?) };
        Ok(proc_of(process)?.publish(name, to_cap(cap, "cap")?)?)
    })
}

/// Withdraws this process's publication of `name`.
///
/// # Safety
/// `name` is NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn fractos_unpublish(
    process: *const fractos_process,
    name: *const c_char,
) -> fractos_status {
    guard("fractos_unpublish", || {
        // SAFETY: this function's contract.
        let name = unsafe { text(name, "the name") }?;
        Ok(proc_of(process)?.unpublish(name)?)
    })
}

/// Fetches the capability published under `name` into `*out` (a fresh
/// handle: drop it when done), waiting up to `wait_ms` for it to appear
/// (0: `FRACTOS_ERR_NAME_NOT_FOUND` at once). Blocks up to the handle's
/// timeout plus `wait_ms`.
///
/// # Safety
/// `name` is NULL or a NUL-terminated string; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn fractos_lookup(
    process: *const fractos_process,
    name: *const c_char,
    wait_ms: u32,
    out: *mut fractos_cap,
) -> fractos_status {
    guard("fractos_lookup", || {
        // SAFETY: this function's contract (`out` is NULL or writable).
        let out = unsafe { out_arg(out, "out") }?;
        // SAFETY: this function's contract.
        let name = unsafe { text(name, "the name") }?;
        let cap = proc_of(process)?.lookup(name, millis(wait_ms))?;
        out.put(cap_out(cap));
        Ok(())
    })
}

// ------------------------------------------------------------ pipelining

/// Stores a started operation's handle in `*out`.
fn started(out: Out<*mut fractos_pending>, op: InFlight) {
    out.put(PENDING.insert(Mutex::new(Some(op))));
}

/// `fractos_copy` without waiting: sends the copy and stores a handle to
/// await it in `*out` (`fractos_pending_wait`), so one thread can keep
/// many copies in flight. The call itself does not wait for the
/// controller.
///
/// # Safety
/// As `fractos_copy`; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn fractos_start_copy(
    process: *const fractos_process,
    src: *const fractos_cap,
    dst: *const fractos_cap,
    completion: *const fractos_cap,
    out: *mut *mut fractos_pending,
) -> fractos_status {
    guard("fractos_start_copy", || {
        // SAFETY: this function's contract (`out` is NULL or writable).
        let out = unsafe { out_arg(out, "out") }?;
        // SAFETY: this function's contract.
        let (src, dst, completion) = unsafe { copy_args(src, dst, completion) }?;
        let op = proc_of(process)?.start_copy(&src, &dst, completion.as_ref())?;
        started(out, InFlight::Done(op));
        Ok(())
    })
}

/// `fractos_invoke` without waiting (see `fractos_start_copy`).
///
/// # Safety
/// As `fractos_invoke`; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn fractos_start_invoke(
    process: *const fractos_process,
    request: *const fractos_cap,
    imms: *const u8,
    imms_len: usize,
    caps: *const fractos_cap,
    ncaps: usize,
    out: *mut *mut fractos_pending,
) -> fractos_status {
    guard("fractos_start_invoke", || {
        // SAFETY: this function's contract (`out` is NULL or writable).
        let out = unsafe { out_arg(out, "out") }?;
        // SAFETY: this function's contract.
        let (request, imms, caps) = unsafe { invoke_args(request, imms, imms_len, caps, ncaps) }?;
        let op = proc_of(process)?.start_invoke(&request, imms, &caps)?;
        started(out, InFlight::Done(op));
        Ok(())
    })
}

/// `fractos_diminish` without waiting: the new capability comes out of
/// `fractos_pending_wait` (see `fractos_start_copy`).
///
/// # Safety
/// As `fractos_diminish`.
#[no_mangle]
pub unsafe extern "C" fn fractos_start_diminish(
    process: *const fractos_process,
    cap: *const fractos_cap,
    offset: u64,
    len: u64,
    rights: u32,
    out: *mut *mut fractos_pending,
) -> fractos_status {
    guard("fractos_start_diminish", || {
        // SAFETY: this function's contract (`out` is NULL or writable).
        let out = unsafe { out_arg(out, "out") }?;
        // SAFETY: this function's contract.
        let (cap, rights) = unsafe { diminish_args(cap, rights) }?;
        let op = proc_of(process)?.start_diminish(&cap, offset, len, rights)?;
        started(out, InFlight::Memory(op));
        Ok(())
    })
}

/// `fractos_drop_cap` without waiting (see `fractos_start_copy`).
///
/// # Safety
/// `cap` is NULL or points to a `fractos_cap`; `out` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn fractos_start_drop_cap(
    process: *const fractos_process,
    cap: *const fractos_cap,
    out: *mut *mut fractos_pending,
) -> fractos_status {
    guard("fractos_start_drop_cap", || {
        // SAFETY: this function's contract (`out` is NULL or writable).
        let out = unsafe { out_arg(out, "out") }?;
        // SAFETY: this function's contract.
        let cap = to_cap(unsafe { cap_arg(cap, "cap") }?, "cap")?;
        let op = proc_of(process)?.start_drop_cap(cap)?;
        started(out, InFlight::Done(op));
        Ok(())
    })
}

/// Waits for a started operation (up to the timeout of the process handle
/// that started it) and releases `pending`, whatever the outcome. Returns
/// the operation's status. `result` receives the capability of a
/// `fractos_start_diminish` (required there: NULL is refused before
/// anything is consumed); it may be NULL for the others.
///
/// # Safety
/// `result` is NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn fractos_pending_wait(
    pending: *mut fractos_pending,
    result: *mut fractos_cap,
) -> fractos_status {
    guard("fractos_pending_wait", || {
        let wants_cap = {
            let slot = PENDING.get(pending)?;
            let op = slot.lock().unwrap_or_else(|e| e.into_inner());
            matches!(*op, Some(InFlight::Memory(_)))
        };
        let result = if wants_cap {
            // SAFETY: this function's contract (`result` is NULL or writable).
            Some(unsafe { out_arg(result, "result") }?)
        } else {
            None
        };
        let slot = PENDING.remove(pending)?;
        let op = slot.lock().unwrap_or_else(|e| e.into_inner()).take();
        match (op, result) {
            (Some(InFlight::Done(op)), _) => Ok(op.wait()?),
            (Some(InFlight::Memory(op)), Some(out)) => {
                out.put(cap_out(op.wait()?.into()));
                Ok(())
            }
            // Another thread waited on the same handle concurrently.
            _ => Err(Fail::new(
                FRACTOS_ERR_INVALID_HANDLE,
                "the operation was already awaited",
            )),
        }
    })
}

/// Abandons a started operation without waiting and releases `pending`: it
/// still happens (or not) at the controller; a capability it returns
/// later is dropped automatically.
#[no_mangle]
pub extern "C" fn fractos_pending_free(pending: *mut fractos_pending) -> fractos_status {
    guard("fractos_pending_free", || PENDING.remove(pending).map(drop))
}

// ---------------------------------------------------------- invocations

/// Waits up to `timeout_ms` for the next invocation of one of this
/// process's Requests whose tag has no handler (`fractos_serve`), and
/// stores a new invocation handle in `*out` (release it with
/// `fractos_invocation_free`). `FRACTOS_ERR_TIMEOUT` if none came (0:
/// just poll); `FRACTOS_ERR_DISCONNECTED` once the channel is closed and
/// nothing is queued.
///
/// # Safety
/// Every pointer argument is NULL (refused with `FRACTOS_ERR_NULL_POINTER`)
/// or valid for the call: out-pointers writable, inputs readable.
#[no_mangle]
pub unsafe extern "C" fn fractos_next_invocation(
    process: *const fractos_process,
    timeout_ms: u32,
    out: *mut *mut fractos_invocation,
) -> fractos_status {
    guard("fractos_next_invocation", || {
        // SAFETY: this function's contract (`out` is NULL or writable).
        let out = unsafe { out_arg(out, "out") }?;
        let inv = proc_of(process)?.next_invocation_timeout(millis(timeout_ms))?;
        out.put(INVOCATIONS.insert(inv));
        Ok(())
    })
}

/// Releases an invocation handle from `fractos_next_invocation` (not the
/// capabilities it delivered: see `fractos_invocation_drop_caps`).
#[no_mangle]
pub extern "C" fn fractos_invocation_free(inv: *mut fractos_invocation) -> fractos_status {
    guard("fractos_invocation_free", || {
        INVOCATIONS.remove(inv).map(drop)
    })
}

/// Stores the invocation's handler tag (given at `fractos_request_create`)
/// in `*out`.
///
/// # Safety
/// Every pointer argument is NULL (refused with `FRACTOS_ERR_NULL_POINTER`)
/// or valid for the call: out-pointers writable, inputs readable.
#[no_mangle]
pub unsafe extern "C" fn fractos_invocation_tag(
    inv: *const fractos_invocation,
    out: *mut u64,
) -> fractos_status {
    // SAFETY: this function's contract.
    unsafe {
        answer("fractos_invocation_tag", &INVOCATIONS, inv, out, |i| {
            Ok(i.tag)
        })
    }
}

/// Copies the invocation's immediates (bound ones first, then the
/// invoker's) into `buf` (at most `cap` bytes) and stores their full
/// length in `*len`. `buf` may be NULL when `cap` is 0, to ask the length.
///
/// # Safety
/// `buf` is NULL or points to `cap` writable bytes; `len` is NULL or
/// writable.
#[no_mangle]
pub unsafe extern "C" fn fractos_invocation_imms(
    inv: *const fractos_invocation,
    buf: *mut u8,
    cap: usize,
    len: *mut usize,
) -> fractos_status {
    guard("fractos_invocation_imms", || {
        // SAFETY: this function's contract (`len` is NULL or writable).
        let len = unsafe { out_arg(len, "len") }?;
        // SAFETY: this function's contract.
        let buf = unsafe { bytes_mut(buf, cap, "buf") }?;
        let inv = INVOCATIONS.get(inv)?;
        let n = inv.imms.len().min(buf.len());
        buf[..n].copy_from_slice(&inv.imms[..n]);
        len.put(inv.imms.len());
        Ok(())
    })
}

/// Stores the number of capabilities the invocation delivered in `*out`.
///
/// # Safety
/// Every pointer argument is NULL (refused with `FRACTOS_ERR_NULL_POINTER`)
/// or valid for the call: out-pointers writable, inputs readable.
#[no_mangle]
pub unsafe extern "C" fn fractos_invocation_cap_count(
    inv: *const fractos_invocation,
    out: *mut usize,
) -> fractos_status {
    // SAFETY: this function's contract.
    unsafe {
        answer(
            "fractos_invocation_cap_count",
            &INVOCATIONS,
            inv,
            out,
            |i| Ok(i.caps.len()),
        )
    }
}

/// Stores capability `index` of the invocation (bound ones first, then
/// the invoker's) in `*out`; `FRACTOS_ERR_UNEXPECTED_CAP` past the last.
///
/// # Safety
/// Every pointer argument is NULL (refused with `FRACTOS_ERR_NULL_POINTER`)
/// or valid for the call: out-pointers writable, inputs readable.
#[no_mangle]
pub unsafe extern "C" fn fractos_invocation_cap(
    inv: *const fractos_invocation,
    index: usize,
    out: *mut fractos_cap,
) -> fractos_status {
    // SAFETY: this function's contract.
    unsafe {
        answer("fractos_invocation_cap", &INVOCATIONS, inv, out, |i| {
            let cap = i.caps.get(index).ok_or_else(|| {
                Fail::new(
                    FRACTOS_ERR_UNEXPECTED_CAP,
                    format!(
                        "the invocation has {} capabilities, no #{index}",
                        i.caps.len()
                    ),
                )
            })?;
            Ok(cap_out(*cap))
        })
    }
}

/// Drops every capability the invocation delivered from this process's
/// table (what a handler does when done with them). Tries all; returns the
/// first failure.
#[no_mangle]
pub extern "C" fn fractos_invocation_drop_caps(
    process: *const fractos_process,
    inv: *const fractos_invocation,
) -> fractos_status {
    guard("fractos_invocation_drop_caps", || {
        let p = proc_of(process)?;
        let inv = INVOCATIONS.get(inv)?;
        let mut first = Ok(());
        for c in &inv.caps {
            if let Err(e) = p.drop_cap(c) {
                first = first.and(Err(e));
            }
        }
        Ok(first?)
    })
}

/// The user data of a handler, handed to the SDK's threads.
#[derive(Clone, Copy)]
struct UserData(*mut c_void);

// SAFETY: the header requires `user` to be usable from the SDK's handler
// threads (fractos_serve's contract); the SDK only passes it back to the
// application's handler, never dereferences it.
unsafe impl Send for UserData {}
// SAFETY: as for Send: shared only to be passed back to the handler.
unsafe impl Sync for UserData {}

/// Runs `handler` for every invocation with `tag` (replacing a previous
/// handler; invocations with `tag` already queued for
/// `fractos_next_invocation` are handed to it too), passing `user` back.
///
/// Where it runs: on the SDK's handler threads
/// (`fractos_attach_options.handler_threads`, several at once when more
/// than one), or, with `handler_threads` 0, inside `fractos_dispatch` on
/// the application's thread. With `flags` = `FRACTOS_SERVE_INLINE` it runs
/// on the channel's reader thread as soon as the invocation is read: for
/// cheap handlers that wait for nothing but their own operations.
///
/// A handler may call every function on `process` except `fractos_close`,
/// `fractos_dispatch` and `fractos_next_invocation`.
///
/// # Safety
/// `handler` is NULL (refused) or a function that stays callable while the
/// process is attached; `user` is what it expects, usable from other
/// threads until `fractos_unserve` or `fractos_close`.
#[no_mangle]
pub unsafe extern "C" fn fractos_serve(
    process: *mut fractos_process,
    tag: u64,
    handler: fractos_handler,
    user: *mut c_void,
    flags: u32,
) -> fractos_status {
    guard("fractos_serve", || {
        let handler = handler.ok_or_else(|| Fail::null("the handler"))?;
        if flags & !FRACTOS_SERVE_INLINE != 0 {
            return Err(Fail::invalid(format!("unknown flags {flags:#x}")));
        }
        let p = proc_of(process)?;
        let user = UserData(user);
        let pid = process.addr();
        let run = move |_: &Process, inv: Invocation| {
            let user = user;
            let handle: *mut fractos_invocation = INVOCATIONS.insert(inv);
            let this: *mut fractos_process = std::ptr::without_provenance_mut(pid);
            // A panic here would be the SDK's own (C cannot unwind into
            // Rust: an unwinding C++ exception aborts at `extern "C"`).
            let _ = std::panic::catch_unwind(|| {
                // SAFETY: `handler` is callable while the process is attached
                // and takes these arguments (fractos_serve's contract);
                // `this` and `handle` are live handles for the call.
                unsafe { handler(this, handle, user.0) }
            });
            INVOCATIONS.forget(handle.addr() as u64);
        };
        if flags & FRACTOS_SERVE_INLINE != 0 {
            p.serve_inline(tag, run);
        } else {
            p.serve(tag, run);
        }
        Ok(())
    })
}

/// Removes the handler of `tag` (later invocations with it are queued for
/// `fractos_next_invocation`). `FRACTOS_ERR_INVALID_ARGUMENT` if none.
#[no_mangle]
pub extern "C" fn fractos_unserve(process: *const fractos_process, tag: u64) -> fractos_status {
    guard("fractos_unserve", || {
        if proc_of(process)?.unserve(tag) {
            Ok(())
        } else {
            Err(Fail::invalid(format!(
                "no handler is registered for tag {tag:#x}"
            )))
        }
    })
}

/// Runs the next invocation that has a handler on the calling thread (for
/// processes attached with `handler_threads` 0) and stores its tag in
/// `*tag` (may be NULL). `FRACTOS_ERR_TIMEOUT` if none arrives within
/// `timeout_ms`; `FRACTOS_ERR_DISCONNECTED` once the channel is closed.
///
/// # Safety
/// Every pointer argument is NULL (refused with `FRACTOS_ERR_NULL_POINTER`)
/// or valid for the call: out-pointers writable, inputs readable.
#[no_mangle]
pub unsafe extern "C" fn fractos_dispatch(
    process: *const fractos_process,
    timeout_ms: u32,
    tag: *mut u64,
) -> fractos_status {
    guard("fractos_dispatch", || {
        let t = proc_of(process)?.dispatch(millis(timeout_ms))?;
        if !tag.is_null() {
            // SAFETY: this function's contract (`tag` is NULL or writable).
            unsafe { out_arg(tag, "tag") }?.put(t);
        }
        Ok(())
    })
}
