//! A client of an appliance's built-in storage service (its read and write
//! Requests, a `done` and an `err` continuation), for the storage tests.

use fractos_sdk::{MemoryCap, Process, RequestCap, Rights};

use crate::APPLIANCE_WAIT as WAIT;

/// Tag of the client's `done` Request.
pub const DONE: u64 = 0xd0;
/// Tag of the client's `err` Request.
pub const ERR: u64 = 0xe0;

/// What a request ended with.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// `done` invoked.
    Done,
    /// `err` invoked with (status, wire error code).
    Err(u8, u16),
}

/// A process using node 0's storage service (`storage/0/read`, `/write`).
pub struct StorageClient {
    /// The process.
    pub p: Process,
    /// The read Request.
    pub read: RequestCap,
    /// The write Request.
    pub write: RequestCap,
    /// The `done` continuation ([`DONE`]).
    pub done: RequestCap,
    /// The `err` continuation ([`ERR`]).
    pub err: RequestCap,
}

impl StorageClient {
    /// Looks the service's Requests up for `p` and makes its continuations.
    pub fn new(p: Process) -> StorageClient {
        let look = |n: &str| {
            p.lookup(n, WAIT)
                .unwrap_or_else(|e| panic!("lookup {n}: {e}"))
                .as_request()
                .expect("a Request")
        };
        let (read, write) = (look("storage/0/read"), look("storage/0/write"));
        let done = p.request_create(DONE, &[], &[]).unwrap();
        let err = p.request_create(ERR, &[], &[]).unwrap();
        StorageClient {
            p,
            read,
            write,
            done,
            err,
        }
    }

    /// Invokes `req` for `offset+len` with `mem` and waits for the answer.
    pub fn call(&self, req: &RequestCap, mem: MemoryCap, offset: u64, len: u64) -> Outcome {
        let mut imms = offset.to_le_bytes().to_vec();
        imms.extend_from_slice(&len.to_le_bytes());
        self.p
            .invoke(req, &imms, &[mem.into(), self.done.into(), self.err.into()])
            .unwrap();
        let inv = self.p.next_invocation_timeout(WAIT).unwrap();
        match inv.tag {
            DONE => Outcome::Done,
            ERR => {
                assert_eq!(inv.imms.len(), 3, "{:?}", inv.imms);
                Outcome::Err(inv.imms[0], u16::from_le_bytes([inv.imms[1], inv.imms[2]]))
            }
            t => panic!("unexpected invocation tag {t:#x}"),
        }
    }

    /// Writes `data` at `offset` through a FractOS copy.
    pub fn write_at(&self, offset: u64, data: &[u8]) -> Outcome {
        let r = self.p.register_vec(data.to_vec()).unwrap();
        let cap = self
            .p
            .memory_create(&r, 0, data.len() as u64, Rights::READ)
            .unwrap();
        let out = self.call(&self.write, cap, offset, data.len() as u64);
        self.p.drop_cap(cap).unwrap();
        out
    }

    /// Reads `len` bytes at `offset` into fresh memory with `rights`.
    pub fn read_at(&self, offset: u64, len: u64, rights: Rights) -> (Outcome, Vec<u8>) {
        self.read_into(offset, len, 0, 0, rights)
    }

    /// Reads `len` bytes at `offset` into a window `skew` bytes into a
    /// fresh region of `skew + len + pad` bytes filled with 0xa5; the
    /// whole region comes back.
    pub fn read_into(
        &self,
        offset: u64,
        len: u64,
        skew: u64,
        pad: u64,
        rights: Rights,
    ) -> (Outcome, Vec<u8>) {
        let r = self.p.register(skew + len + pad).unwrap();
        r.with_bytes_mut(|b| b.fill(0xa5));
        let cap = self.p.memory_create(&r, skew, len, rights).unwrap();
        let out = self.call(&self.read, cap, offset, len);
        self.p.drop_cap(cap).unwrap();
        (out, r.to_vec())
    }

    /// Starts every read of `reads` (offset, len) at once, each into its
    /// own fresh region (filled with 0xa5) with its own `done` (tag 0x100 +
    /// its index); waits for every one. Their bytes, in order. Panics if a
    /// read fails or is answered twice.
    pub fn read_concurrently(&self, reads: &[(u64, u64)]) -> Vec<Vec<u8>> {
        let p = &self.p;
        let mut pending = Vec::new();
        for (k, &(offset, len)) in reads.iter().enumerate() {
            let region = p.register(len).unwrap();
            region.with_bytes_mut(|b| b.fill(0xa5));
            let cap = p.memory_create(&region, 0, len, Rights::WRITE).unwrap();
            let done = p.request_create(0x100 + k as u64, &[], &[]).unwrap();
            let mut imms = offset.to_le_bytes().to_vec();
            imms.extend_from_slice(&len.to_le_bytes());
            let caps = [cap.into(), done.into(), self.err.into()];
            pending.push((region, p.start_invoke(&self.read, &imms, &caps).unwrap()));
        }
        let mut seen = vec![false; reads.len()];
        for _ in 0..reads.len() {
            let inv = p.next_invocation_timeout(WAIT).unwrap();
            assert!(inv.tag != ERR, "a concurrent read failed: {:?}", inv.imms);
            let k = inv.tag.wrapping_sub(0x100) as usize;
            assert!(k < reads.len(), "unexpected invocation tag {:#x}", inv.tag);
            assert!(
                !std::mem::replace(&mut seen[k], true),
                "read {k} done twice"
            );
        }
        pending
            .into_iter()
            .map(|(region, ack)| {
                ack.wait().unwrap();
                region.to_vec()
            })
            .collect()
    }
}

/// `len` pseudo-random bytes from `seed` (xorshift).
pub fn random(len: usize, mut seed: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed as u8
        })
        .collect()
}

/// FNV-1a of `data`.
pub fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}
