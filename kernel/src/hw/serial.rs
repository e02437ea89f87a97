//! COM1 console and the `log` backend.

use core::fmt::{self, Write};

use log::{LevelFilter, Log, Metadata, Record};
use spin::Mutex;
use uart_16550::SerialPort;

const COM1: u16 = 0x3f8;

static PORT: Mutex<Option<SerialPort>> = Mutex::new(None);

/// Initializes COM1 (115200 8N1).
pub fn init() {
    // SAFETY: 0x3F8 is COM1 on every PC-compatible machine and QEMU.
    let mut port = unsafe { SerialPort::new(COM1) };
    port.init();
    *PORT.lock() = Some(port);
}

/// Writes formatted text to the console.
pub fn print(args: fmt::Arguments<'_>) {
    if let Some(p) = PORT.lock().as_mut() {
        let _ = p.write_fmt(args);
    }
}

/// A writer for the fault and panic paths: does not take the console lock
/// (the fault may have happened while it was held).
pub fn emergency() -> SerialPort {
    // SAFETY: COM1 was initialized at boot; a second handle only writes bytes.
    unsafe { SerialPort::new(COM1) }
}

/// Prints to the serial console.
#[macro_export]
macro_rules! kprint {
    ($($arg:tt)*) => { $crate::hw::serial::print(format_args!($($arg)*)) };
}

/// Prints a line to the serial console.
#[macro_export]
macro_rules! kprintln {
    ($($arg:tt)*) => { $crate::hw::serial::print(format_args!("{}\n", format_args!($($arg)*))) };
}

struct SerialLogger;

impl Log for SerialLogger {
    fn enabled(&self, m: &Metadata<'_>) -> bool {
        m.level() <= log::max_level()
    }

    fn log(&self, r: &Record<'_>) {
        if !self.enabled(r.metadata()) {
            return;
        }
        let ns = super::time::now_ns();
        print(format_args!(
            "[{:>5}.{:06}] {:<5} {}\n",
            ns / 1_000_000_000,
            (ns / 1000) % 1_000_000,
            r.level(),
            r.args()
        ));
    }

    fn flush(&self) {}
}

static LOGGER: SerialLogger = SerialLogger;

/// Routes the `log` facade to the serial console at `level`.
pub fn init_logger(level: LevelFilter) {
    // A second call only fails because a logger is already set; keep it.
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(level);
}
