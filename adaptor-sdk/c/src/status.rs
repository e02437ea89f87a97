//! Status codes, the thread's last error message, and the panic boundary
//! every entry point runs behind.

use std::cell::RefCell;
use std::ffi::{c_char, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

use fractos_sdk::{ErrorCode, SdkError};

/// What an entry point returns: `FRACTOS_OK` (0) or an error.
///
/// Codes 1 to 18 are the controller's typed errors (the wire protocol's
/// `ErrorCode`, same numbers); codes from 100 are detected by the SDK
/// itself. `fractos_status_str` names a code; `fractos_last_error_message`
/// tells what went wrong in the calling thread's last failed call.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum fractos_status {
    /// Success.
    FRACTOS_OK = 0,
    /// The controller: no capability under this handle.
    FRACTOS_ERR_BAD_HANDLE = 1,
    /// The capability is of the wrong kind (Memory vs Request) for the
    /// operation (also detected locally from `fractos_cap.kind`).
    FRACTOS_ERR_WRONG_TYPE = 2,
    /// The capability lacks a right (READ/WRITE) the operation needs.
    FRACTOS_ERR_MISSING_RIGHT = 3,
    /// A window lies outside the capability's window.
    FRACTOS_ERR_OUT_OF_BOUNDS = 4,
    /// The capability (or an ancestor) was revoked.
    FRACTOS_ERR_REVOKED = 5,
    /// The object's owner exited.
    FRACTOS_ERR_OWNER_GONE = 6,
    /// The owner's controller cannot be reached.
    FRACTOS_ERR_PEER_UNREACHABLE = 7,
    /// The controller gave up on the operation; its outcome is unknown.
    FRACTOS_ERR_REMOTE_TIMEOUT = 8,
    /// A per-process or per-controller limit was reached.
    FRACTOS_ERR_LIMIT_REACHED = 9,
    /// The controller could not decode a message.
    FRACTOS_ERR_MALFORMED = 10,
    /// The controller speaks another protocol version.
    FRACTOS_ERR_VERSION_MISMATCH = 11,
    /// Attach refused: wrong process token for this name.
    FRACTOS_ERR_AUTH_FAILED = 12,
    /// An operation before a successful attach.
    FRACTOS_ERR_NOT_ATTACHED = 13,
    /// Copy destination shorter than the source.
    FRACTOS_ERR_SIZE_MISMATCH = 14,
    /// Nothing is published under the name.
    FRACTOS_ERR_NAME_NOT_FOUND = 15,
    /// The name is already published.
    FRACTOS_ERR_NAME_TAKEN = 16,
    /// The controller refused an argument (zero length, overflow, ...).
    FRACTOS_ERR_REMOTE_INVALID_ARGUMENT = 17,
    /// The owner could not serve a memory access.
    FRACTOS_ERR_MEMORY_FAULT = 18,
    /// A socket or system error (nothing listening at the address, ...).
    FRACTOS_ERR_IO = 100,
    /// A wait ran out of time; for an operation the outcome is unknown.
    FRACTOS_ERR_TIMEOUT = 101,
    /// The channel to the controller is closed: every capability of this
    /// process is void. Attach again.
    FRACTOS_ERR_DISCONNECTED = 102,
    /// The controller sent something this SDK does not understand.
    FRACTOS_ERR_PROTOCOL = 103,
    /// A local access outside a region.
    FRACTOS_ERR_OUT_OF_RANGE = 104,
    /// An argument was refused before anything was sent (bad UTF-8, too
    /// long a name, zero length, unknown rights bits, ...).
    FRACTOS_ERR_INVALID_ARGUMENT = 105,
    /// Registered memory could not be created or shared.
    FRACTOS_ERR_SHARED_MEMORY = 106,
    /// The controller refused the local channel (rings, a region).
    FRACTOS_ERR_LOCAL_REFUSED = 107,
    /// Attaching through a shared-memory slot failed.
    FRACTOS_ERR_SLOT = 108,
    /// An invocation's capability is missing or of another kind.
    FRACTOS_ERR_UNEXPECTED_CAP = 109,
    /// A required pointer argument was NULL.
    FRACTOS_ERR_NULL_POINTER = 110,
    /// A process, region or invocation handle that is not (or no longer)
    /// valid: freed, closed, or of another type.
    FRACTOS_ERR_INVALID_HANDLE = 111,
    /// A bug: the SDK panicked inside the call. The panic was caught at the
    /// boundary; the process handle may be unusable.
    FRACTOS_ERR_PANIC = 112,
    /// Another SDK error (see the message).
    FRACTOS_ERR_OTHER = 113,
}

use fractos_status::*;

/// Every status, for `fractos_status_str` and tests.
pub(crate) const ALL: [fractos_status; 33] = [
    FRACTOS_OK,
    FRACTOS_ERR_BAD_HANDLE,
    FRACTOS_ERR_WRONG_TYPE,
    FRACTOS_ERR_MISSING_RIGHT,
    FRACTOS_ERR_OUT_OF_BOUNDS,
    FRACTOS_ERR_REVOKED,
    FRACTOS_ERR_OWNER_GONE,
    FRACTOS_ERR_PEER_UNREACHABLE,
    FRACTOS_ERR_REMOTE_TIMEOUT,
    FRACTOS_ERR_LIMIT_REACHED,
    FRACTOS_ERR_MALFORMED,
    FRACTOS_ERR_VERSION_MISMATCH,
    FRACTOS_ERR_AUTH_FAILED,
    FRACTOS_ERR_NOT_ATTACHED,
    FRACTOS_ERR_SIZE_MISMATCH,
    FRACTOS_ERR_NAME_NOT_FOUND,
    FRACTOS_ERR_NAME_TAKEN,
    FRACTOS_ERR_REMOTE_INVALID_ARGUMENT,
    FRACTOS_ERR_MEMORY_FAULT,
    FRACTOS_ERR_IO,
    FRACTOS_ERR_TIMEOUT,
    FRACTOS_ERR_DISCONNECTED,
    FRACTOS_ERR_PROTOCOL,
    FRACTOS_ERR_OUT_OF_RANGE,
    FRACTOS_ERR_INVALID_ARGUMENT,
    FRACTOS_ERR_SHARED_MEMORY,
    FRACTOS_ERR_LOCAL_REFUSED,
    FRACTOS_ERR_SLOT,
    FRACTOS_ERR_UNEXPECTED_CAP,
    FRACTOS_ERR_NULL_POINTER,
    FRACTOS_ERR_INVALID_HANDLE,
    FRACTOS_ERR_PANIC,
    FRACTOS_ERR_OTHER,
];

impl fractos_status {
    /// The remote code's status (same number).
    fn from_code(code: ErrorCode) -> fractos_status {
        ALL.iter()
            .copied()
            .find(|s| *s as i32 == code as u16 as i32)
            .unwrap_or(FRACTOS_ERR_OTHER)
    }

    /// A short, static description (NUL-terminated).
    pub(crate) fn describe(self) -> &'static CStr {
        match self {
            FRACTOS_OK => c"success",
            FRACTOS_ERR_BAD_HANDLE => c"bad handle: the process holds no capability under this handle",
            FRACTOS_ERR_WRONG_TYPE => c"wrong object type: use a Memory capability for memory operations and a Request capability for invoke",
            FRACTOS_ERR_MISSING_RIGHT => c"missing right: the capability lacks READ/WRITE needed here",
            FRACTOS_ERR_OUT_OF_BOUNDS => c"out of bounds: the window is not inside the capability's window",
            FRACTOS_ERR_REVOKED => c"revoked: the capability was revoked",
            FRACTOS_ERR_OWNER_GONE => c"owner gone: the process that owns the object exited",
            FRACTOS_ERR_PEER_UNREACHABLE => c"peer unreachable: the owner's controller is not connected",
            FRACTOS_ERR_REMOTE_TIMEOUT => c"the controller timed out the operation; its outcome is unknown",
            FRACTOS_ERR_LIMIT_REACHED => c"limit reached: drop capabilities or wait for completions",
            FRACTOS_ERR_MALFORMED => c"malformed message",
            FRACTOS_ERR_VERSION_MISMATCH => c"protocol version mismatch: upgrade the older side",
            FRACTOS_ERR_AUTH_FAILED => c"authentication failed: derive the token from the cluster key and this exact process name",
            FRACTOS_ERR_NOT_ATTACHED => c"not attached",
            FRACTOS_ERR_SIZE_MISMATCH => c"size mismatch: the copy destination is shorter than the source",
            FRACTOS_ERR_NAME_NOT_FOUND => c"name not found: nothing is published under this name (yet)",
            FRACTOS_ERR_NAME_TAKEN => c"name taken: another capability is published under this name",
            FRACTOS_ERR_REMOTE_INVALID_ARGUMENT => c"the controller refused an argument: check lengths, offsets and names",
            FRACTOS_ERR_MEMORY_FAULT => c"memory fault: the owner could not read or write the registered window",
            FRACTOS_ERR_IO => c"I/O error: check that the controller runs and listens at the given address",
            FRACTOS_ERR_TIMEOUT => c"timed out; the outcome is unknown: raise the timeout or check the other side",
            FRACTOS_ERR_DISCONNECTED => c"disconnected from the controller: every capability is void; attach again",
            FRACTOS_ERR_PROTOCOL => c"protocol violation by the controller: SDK and controller versions probably differ",
            FRACTOS_ERR_OUT_OF_RANGE => c"access outside the region",
            FRACTOS_ERR_INVALID_ARGUMENT => c"invalid argument (refused before anything was sent)",
            FRACTOS_ERR_SHARED_MEMORY => c"shared memory could not be created or shared",
            FRACTOS_ERR_LOCAL_REFUSED => c"the controller refused the local channel",
            FRACTOS_ERR_SLOT => c"attaching through the shared-memory slot failed",
            FRACTOS_ERR_UNEXPECTED_CAP => c"the invocation's capability is missing or of another kind",
            FRACTOS_ERR_NULL_POINTER => c"a required pointer argument is NULL",
            FRACTOS_ERR_INVALID_HANDLE => c"invalid handle: freed, closed, or of another type",
            FRACTOS_ERR_PANIC => c"internal error: the SDK panicked (caught at the C boundary); please report it",
            FRACTOS_ERR_OTHER => c"SDK error (see fractos_last_error_message)",
        }
    }
}

/// A failed call: its status and the message for
/// `fractos_last_error_message`.
#[derive(Debug)]
pub(crate) struct Fail {
    pub(crate) status: fractos_status,
    pub(crate) message: String,
}

impl Fail {
    pub(crate) fn new(status: fractos_status, message: impl Into<String>) -> Fail {
        Fail {
            status,
            message: message.into(),
        }
    }

    pub(crate) fn null(what: &str) -> Fail {
        Fail::new(
            FRACTOS_ERR_NULL_POINTER,
            format!("{what} is NULL; pass a valid pointer"),
        )
    }

    pub(crate) fn invalid(message: impl Into<String>) -> Fail {
        Fail::new(FRACTOS_ERR_INVALID_ARGUMENT, message)
    }
}

impl From<SdkError> for Fail {
    fn from(e: SdkError) -> Fail {
        let status = match &e {
            _ if e.code().is_some() => {
                fractos_status::from_code(e.code().unwrap_or(ErrorCode::Malformed))
            }
            SdkError::Io { .. } => FRACTOS_ERR_IO,
            SdkError::Timeout { .. } => FRACTOS_ERR_TIMEOUT,
            SdkError::Disconnected { .. } => FRACTOS_ERR_DISCONNECTED,
            SdkError::Protocol { .. } => FRACTOS_ERR_PROTOCOL,
            SdkError::OutOfRange { .. } => FRACTOS_ERR_OUT_OF_RANGE,
            SdkError::InvalidArgument(_) => FRACTOS_ERR_INVALID_ARGUMENT,
            SdkError::SharedMemory(_) => FRACTOS_ERR_SHARED_MEMORY,
            SdkError::LocalRefused { .. } => FRACTOS_ERR_LOCAL_REFUSED,
            SdkError::Slot { .. } => FRACTOS_ERR_SLOT,
            SdkError::UnexpectedCap { .. } => FRACTOS_ERR_UNEXPECTED_CAP,
            _ => FRACTOS_ERR_OTHER,
        };
        Fail::new(status, e.to_string())
    }
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(message: &str) {
    // Interior NULs cannot be represented in a C string: replace them.
    let text = CString::new(message.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|l| *l.borrow_mut() = text);
}

/// Pointer to the calling thread's last error message (valid until the
/// thread's next failing call).
pub(crate) fn last_error_ptr() -> *const c_char {
    LAST_ERROR.with(|l| l.borrow().as_ptr())
}

/// A panic payload as text.
fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".to_owned()
    }
}

/// Runs an entry point's body: a panic becomes `FRACTOS_ERR_PANIC`, an
/// error its status, and either one sets the thread's last error message.
pub(crate) fn guard(what: &str, body: impl FnOnce() -> Result<(), Fail>) -> fractos_status {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => FRACTOS_OK,
        Ok(Err(fail)) => {
            set_last_error(&format!("{what}: {}", fail.message));
            fail.status
        }
        Err(payload) => {
            set_last_error(&format!(
                "{what}: internal panic caught at the C boundary: {}; this is a bug in the FractOS SDK",
                panic_text(payload.as_ref())
            ));
            FRACTOS_ERR_PANIC
        }
    }
}

/// [`guard`] for entry points returning a plain value: `fallback` on panic.
pub(crate) fn guard_value<T>(fallback: T, body: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(body)).unwrap_or(fallback)
}
