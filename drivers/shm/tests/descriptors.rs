//! Descriptors a hostile process sends: more than a message may carry,
//! and regions mapped without keeping their memfd open. One test: it
//! counts this process's open descriptors, which parallel tests would
//! disturb.

use std::io::IoSlice;
use std::mem::MaybeUninit;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;

use fractos_shm::{recv_with_fds, EventFd, Mapping, ShmError, PAGE};
use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

#[test]
fn excess_descriptors_are_refused_and_detached_mappings_hold_none() {
    let (a, b) = UnixStream::pair().unwrap();
    let e = EventFd::new().unwrap();
    let region = Mapping::create("region", PAGE).unwrap();
    let before = open_fds();

    // Five (fits the receive buffer's padding) and eight (does not)
    // descriptors in one message, sent around `send_with_fds`'s own check,
    // as a hostile process would.
    for n in [5, 8] {
        let fds = vec![e.fd(); n];
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(8))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        assert!(control.push(SendAncillaryMessage::ScmRights(&fds)));
        rustix::net::sendmsg(&a, &[IoSlice::new(b"x")], &mut control, SendFlags::empty()).unwrap();
        let mut buf = [0u8; 8];
        let mut got = Vec::new();
        let err = recv_with_fds(b.as_fd(), &mut buf, &mut got).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidData, "{n}");
        assert!(err.to_string().contains("more than 4"), "{err}");
        assert!(got.is_empty());
        assert_eq!(open_fds(), before, "every received descriptor is closed");
    }

    // A detached mapping shares the bytes and closes its descriptor.
    let dup = || region.fd().try_clone_to_owned().unwrap();
    let m = Mapping::open_detached(dup(), 0, PAGE).unwrap();
    assert_eq!(open_fds(), before, "the mapped memfd is closed");
    region.write_at(10, b"kept").unwrap();
    let mut out = [0u8; 4];
    m.read_at(10, &mut out).unwrap();
    assert_eq!(&out, b"kept");
    assert!(matches!(
        Mapping::open_detached(dup(), 0, 2 * PAGE),
        Err(ShmError::TooSmall { .. })
    ));
    drop(m);
    assert_eq!(open_fds(), before);
}
