//! Passing file descriptors over Unix sockets (`SCM_RIGHTS`) and asking
//! who is at the other end (`SO_PEERCRED`).

use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};

use crate::ShmError;

/// Most descriptors one message may carry (more are refused on sending
/// and dropped on receiving).
pub const MAX_FDS: usize = 4;

/// Sends all of `data` on the connected Unix stream socket `sock`, with
/// `fds` attached to its first byte. Blocks if the socket is blocking;
/// on a non-blocking socket a full buffer is an `Io` error of kind
/// `WouldBlock` before the first byte (nothing sent).
pub fn send_with_fds(
    sock: BorrowedFd<'_>,
    data: &[u8],
    fds: &[BorrowedFd<'_>],
) -> Result<(), ShmError> {
    if fds.len() > MAX_FDS {
        return Err(ShmError::TooManyFds { got: fds.len() });
    }
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(ShmError::TooManyFds { got: fds.len() });
    }
    let mut sent = 0;
    while sent < data.len() {
        let iov = [IoSlice::new(&data[sent..])];
        let r = if sent == 0 {
            rustix::net::sendmsg(sock, &iov, &mut control, SendFlags::NOSIGNAL)
        } else {
            rustix::net::send(sock, &data[sent..], SendFlags::NOSIGNAL)
        };
        match r {
            Ok(n) => sent += n,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => {
                return Err(ShmError::Io {
                    what: "sending on the local socket",
                    source: e.into(),
                })
            }
        }
    }
    Ok(())
}

/// Receives at most `buf.len()` bytes from `sock`, appending the
/// descriptors that came with them to `fds` (close-on-exec). `Ok(0)`: the
/// other side closed. A message that carried more than [`MAX_FDS`]
/// descriptors is an `InvalidData` error (the kernel closed the ones that
/// did not fit; the ones that did are closed here), as is a pile of more
/// than 64 unclaimed descriptors in `fds`.
pub fn recv_with_fds(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> std::io::Result<usize> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let mut iov = [IoSliceMut::new(buf)];
    let r = loop {
        match rustix::net::recvmsg(sock, &mut iov, &mut control, RecvFlags::CMSG_CLOEXEC) {
            Err(rustix::io::Errno::INTR) => continue,
            r => break r,
        }
    }?;
    let mut got = Vec::new();
    for msg in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = msg {
            got.extend(received);
        }
    }
    // The control buffer's padding can hold a few more than `MAX_FDS`:
    // those are refused too.
    if r.flags.contains(rustix::net::ReturnFlags::CTRUNC) || got.len() > MAX_FDS {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a message carried more than {MAX_FDS} file descriptors"),
        ));
    }
    if fds.len() + got.len() > 64 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "more than 64 file descriptors received and not claimed",
        ));
    }
    fds.extend(got);
    Ok(r.bytes)
}

/// The process at the other end of a Unix socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerCred {
    /// Its process id.
    pub pid: i32,
    /// Its user id.
    pub uid: u32,
    /// Its group id.
    pub gid: u32,
}

/// Who connected to `sock` (`SO_PEERCRED`).
pub fn peer_cred(sock: impl AsFd) -> std::io::Result<PeerCred> {
    let c = rustix::net::sockopt::socket_peercred(sock)?;
    Ok(PeerCred {
        pid: c.pid.as_raw_nonzero().get(),
        uid: c.uid.as_raw(),
        gid: c.gid.as_raw(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    #[test]
    fn descriptors_cross_a_socket_pair_with_their_bytes() {
        let (a, b) = UnixStream::pair().unwrap();
        let m = crate::Mapping::create("fd", 100).unwrap();
        m.write_at(0, b"shared").unwrap();
        let e = crate::EventFd::new().unwrap();
        send_with_fds(a.as_fd(), b"hello", &[m.fd(), e.fd()]).unwrap();
        let mut buf = [0u8; 64];
        let mut fds = Vec::new();
        let n = recv_with_fds(b.as_fd(), &mut buf, &mut fds).unwrap();
        assert_eq!(&buf[..n], b"hello");
        assert_eq!(fds.len(), 2);
        let mut fds = fds.into_iter();
        let m2 = crate::Mapping::open(fds.next().unwrap(), 0, 100).unwrap();
        let mut out = [0u8; 6];
        m2.read_at(0, &mut out).unwrap();
        assert_eq!(&out, b"shared");
        assert!(crate::EventFd::from_fd(fds.next().unwrap()).is_ok());
        let cred = peer_cred(&b).unwrap();
        assert_eq!(cred.pid as u32, std::process::id());
        let too_many = [m.fd(), m.fd(), m.fd(), m.fd(), m.fd()];
        assert!(matches!(
            send_with_fds(a.as_fd(), b"x", &too_many),
            Err(ShmError::TooManyFds { got: 5 })
        ));
        drop(a);
        assert_eq!(
            recv_with_fds(b.as_fd(), &mut buf, &mut Vec::new()).unwrap(),
            0
        );
    }
}
