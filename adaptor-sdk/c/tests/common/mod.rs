//! What the tests calling the C ABI through its Rust symbols share: an
//! embedded hosted controller, attach, and status checks.
#![allow(dead_code)]

use std::ffi::{CStr, CString};
use std::ptr;

use fractos_c::fractos_status::{self, *};
use fractos_c::*;
use fractos_core::process_token;
use fractos_hosted::{spawn, HostedConfig, Running};
use fractos_sdk::NodeId;

pub const KEY: [u8; 32] = *b"fractos-c-sdk-abi-test-cluster-k";

/// A hosted controller (node `node`), with a local socket if `local`.
pub fn controller(node: u32, local: bool) -> Running {
    let mut c = HostedConfig::local(NodeId(node), KEY);
    if local {
        c.local_socket = Some(fractos_adaptors::bench::socket_path("csdk"));
    }
    spawn(c).expect("starting a hosted controller")
}

/// This thread's last error message.
pub fn last_error() -> String {
    // SAFETY: the SDK returns a NUL-terminated string valid until the
    // thread's next failing call.
    unsafe { CStr::from_ptr(fractos_last_error_message()) }
        .to_string_lossy()
        .into_owned()
}

#[track_caller]
pub fn ok(s: fractos_status) {
    assert_eq!(s, FRACTOS_OK, "{}", last_error());
}

/// A process attached over TCP with `handler_threads` handler threads.
pub fn attach(node: &Running, name: &str, handler_threads: u32) -> *mut fractos_process {
    let addr = CString::new(node.process_addr().to_string()).unwrap();
    let cname = CString::new(name).unwrap();
    let token = process_token(&KEY, name.as_bytes());
    let mut opts = fractos_attach_options_default();
    opts.handler_threads = handler_threads;
    let mut p = ptr::null_mut();
    // SAFETY: valid strings, a 32-byte token, options and an out-pointer.
    ok(unsafe { fractos_attach_tcp(addr.as_ptr(), cname.as_ptr(), token.as_ptr(), &opts, &mut p) });
    p
}
