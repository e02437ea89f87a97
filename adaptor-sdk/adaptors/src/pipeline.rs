//! The verification pipeline: storage and compute services built on the
//! SDK only, and a client that runs the same work in three modes.
//!
//! * **FractOS** — the client wires storage → compute → client once: a
//!   storage `read` Request with the compute input buffer and a compute
//!   `verify` continuation bound into it. Each verification is then one
//!   invoke; the image moves storage → compute by a device-to-device copy
//!   and the score comes back to the client. The image crosses the network
//!   once.
//! * **Centralised** — the best a CPU-centric application does over the
//!   same transport: one bulk read of the image into the client's memory,
//!   one bulk push into the compute buffer, one invoke, wait for the score.
//!   The image crosses the network twice.
//! * **Remote-device API** — the client drives each device through
//!   low-level operations, one round trip each (NVMe-oF + rCUDA style):
//!   block reads of [`REMOTE_BLOCK`] bytes into its memory, then device
//!   buffer alloc, copy-in, launch, synchronize, copy-out, free.
//!
//! Immediates are little-endian; each service documents its layout.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fractos_sdk::wire::Rights;
use fractos_sdk::{Cap, Invocation, MemoryCap, Process, Region, RequestCap};

use crate::PipelineError;

use crate::compute::{Features, VerifyBackend};
use crate::image::Image;
use crate::storage::BlockStore;

/// Storage: read `(offset u64, len u64)` (trailing immediates) into the
/// Memory capability `caps[0]`, then invoke `caps[1]` if present.
pub const TAG_READ: u64 = 0x5354_0001;
/// Compute: verify the image in input slot `(slot u32)` (leading
/// immediates) and invoke `caps[0]` with `(score f32, slot u32)`.
pub const TAG_VERIFY: u64 = 0x434f_0001;
/// Compute (remote API): allocate a device buffer of `(len u64)`; replies
/// to `caps[0]` with `(id u64)` and caps `[input buffer (WRITE), result
/// buffer (READ)]`.
pub const TAG_ALLOC: u64 = 0x434f_0010;
/// Compute (remote API): launch the kernel on buffer `(id u64)`; replies to
/// `caps[0]` once launched.
pub const TAG_LAUNCH: u64 = 0x434f_0011;
/// Compute (remote API): wait for buffer `(id u64)`'s kernel; replies to
/// `caps[0]` when its result is in the result buffer.
pub const TAG_SYNC: u64 = 0x434f_0012;
/// Compute (remote API): free buffer `(id u64)`; replies to `caps[0]`.
pub const TAG_FREE: u64 = 0x434f_0013;
/// Client: a score `(score f32, slot u32)` arrived.
pub const TAG_RESULT: u64 = 0x434c_0001;
/// Client: a step finished.
pub const TAG_DONE: u64 = 0x434c_0002;

/// Block size of the remote-device API mode (a typical NVMe-oF I/O size).
pub const REMOTE_BLOCK: u64 = 128 * 1024;
/// Bytes of a compute result buffer.
pub const RESULT_LEN: u64 = 8;

/// Published names.
pub mod names {
    /// Storage read Request.
    pub const STORAGE_READ: &str = "pipeline/storage/read";
    /// Compute verify Request.
    pub const COMPUTE_VERIFY: &str = "pipeline/compute/verify";
    /// Compute input buffer (WRITE).
    pub const COMPUTE_INPUT: &str = "pipeline/compute/input";
    /// Compute remote-API alloc Request.
    pub const COMPUTE_ALLOC: &str = "pipeline/compute/alloc";
    /// Compute remote-API launch Request.
    pub const COMPUTE_LAUNCH: &str = "pipeline/compute/launch";
    /// Compute remote-API synchronize Request.
    pub const COMPUTE_SYNC: &str = "pipeline/compute/sync";
    /// Compute remote-API free Request.
    pub const COMPUTE_FREE: &str = "pipeline/compute/free";
}

fn u64_at(imms: &[u8], at: usize) -> Result<u64, PipelineError> {
    imms.get(at..at + 8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
        .ok_or_else(|| PipelineError::Protocol(format!("expected a u64 at immediate offset {at}")))
}

fn u32_at(imms: &[u8], at: usize) -> Result<u32, PipelineError> {
    imms.get(at..at + 4)
        .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
        .ok_or_else(|| PipelineError::Protocol(format!("expected a u32 at immediate offset {at}")))
}

/// Drops every capability an invocation delivered.
fn drop_all(p: &Process, inv: &Invocation) {
    for c in &inv.caps {
        let _ = p.drop_cap(c);
    }
}

/// Starts the storage service on `p`: a `read` Request published as
/// [`names::STORAGE_READ`]. Reads go through a staging region of
/// `max_read` bytes per handler thread.
pub fn serve_storage(
    p: &Process,
    store: Arc<BlockStore>,
    max_read: u64,
) -> Result<RequestCap, PipelineError> {
    let staging = Arc::new(Mutex::new(Vec::<(Region, MemoryCap)>::new()));
    p.serve(TAG_READ, move |p, inv| {
        let run = || -> Result<(), PipelineError> {
            let n = inv.imms.len();
            if n < 16 {
                return Err(PipelineError::Protocol(
                    "read wants (offset u64, len u64)".into(),
                ));
            }
            let (offset, len) = (u64_at(&inv.imms, n - 16)?, u64_at(&inv.imms, n - 8)?);
            if len == 0 || len > max_read {
                return Err(PipelineError::Protocol(format!(
                    "read length {len} outside 1..={max_read}"
                )));
            }
            let dst = inv.memory(0)?;
            let done = inv.request(1).ok();
            // Take (or make) a staging buffer for this handler.
            let slot = staging.lock().unwrap_or_else(|e| e.into_inner()).pop();
            let (region, cap) = match slot {
                Some(s) => s,
                None => {
                    let r = p.register(max_read)?;
                    let c = p.memory_create(&r, 0, max_read, Rights::READ)?;
                    (r, c)
                }
            };
            let result = (|| -> Result<(), PipelineError> {
                region.with_bytes_mut(|b| store.read_at(offset, &mut b[..len as usize]))?;
                if len == max_read {
                    // The whole staging buffer: no window to derive.
                    return Ok(p.copy(&cap, &dst, done.as_ref())?);
                }
                let part = p.diminish(&cap, 0, len, Rights::READ)?;
                let copied = p.copy(&part, &dst, done.as_ref());
                p.drop_cap(part)?;
                Ok(copied?)
            })();
            staging
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((region, cap));
            result
        };
        if let Err(e) = run() {
            eprintln!("storage: read failed: {e}");
        }
        drop_all(p, &inv);
    });
    let read = p.request_create(TAG_READ, &[], &[])?;
    p.publish(names::STORAGE_READ, read)?;
    Ok(read)
}

/// A remote-device API operation: returns the reply's immediates and caps.
type ApiHandler =
    Arc<dyn Fn(&Process, &Invocation) -> Result<(Vec<u8>, Vec<Cap>), PipelineError> + Send + Sync>;

struct DeviceBuffer {
    input: Region,
    input_cap: MemoryCap,
    result: Region,
    result_cap: MemoryCap,
    done: Option<f32>,
}

/// Starts the compute service on `p`: `verify` over input slot 0 (published
/// with the input buffer), plus the remote-device API (alloc, launch,
/// sync, free). `reference` is the enrolled identity.
pub fn serve_compute(
    p: &Process,
    backend: Arc<dyn VerifyBackend>,
    reference: Features,
    max_image: u64,
) -> Result<(), PipelineError> {
    let reference = Arc::new(reference);
    // FractOS and centralised modes: one input slot.
    let input = p.register(max_image)?;
    let input_w = p.memory_create(&input, 0, max_image, Rights::WRITE)?;
    {
        let (backend, reference, input) = (backend.clone(), reference.clone(), input.clone());
        p.serve(TAG_VERIFY, move |p, inv| {
            let run = || -> Result<(), PipelineError> {
                let slot = u32_at(&inv.imms, 0)?;
                let reply = inv.request(0)?;
                let score = input
                    .with_bytes(|b| backend.verify(b, &reference))
                    .unwrap_or(f32::NAN);
                let mut imms = score.to_le_bytes().to_vec();
                imms.extend_from_slice(&slot.to_le_bytes());
                Ok(p.invoke(&reply, &imms, &[])?)
            };
            if let Err(e) = run() {
                eprintln!("compute: verify failed: {e}");
            }
            drop_all(p, &inv);
        });
    }
    let verify = p.request_create(TAG_VERIFY, &[], &[])?;
    p.publish(names::COMPUTE_VERIFY, verify)?;
    p.publish(names::COMPUTE_INPUT, input_w)?;

    // Remote-device API.
    let buffers: Arc<Mutex<BTreeMap<u64, DeviceBuffer>>> = Arc::default();
    let next_id = Arc::new(Mutex::new(1u64));
    let serve_api = |tag: u64, f: ApiHandler| {
        p.serve(tag, move |p, inv| {
            let result = f(p, &inv);
            match (result, inv.request(0)) {
                (Ok((imms, caps)), Ok(reply)) => {
                    if let Err(e) = p.invoke(&reply, &imms, &caps) {
                        eprintln!("compute: reply failed: {e}");
                    }
                }
                (Err(e), _) => eprintln!("compute: operation {tag:#x} failed: {e}"),
                (_, Err(e)) => eprintln!("compute: operation {tag:#x} without reply: {e}"),
            }
            drop_all(p, &inv);
        });
    };
    {
        let (buffers, next_id) = (buffers.clone(), next_id.clone());
        serve_api(
            TAG_ALLOC,
            Arc::new(move |p, inv| {
                let len = u64_at(&inv.imms, 0)?;
                if len == 0 || len > max_image {
                    return Err(PipelineError::Protocol(format!(
                        "alloc of {len} bytes outside 1..={max_image}"
                    )));
                }
                let input = p.register(len)?;
                let input_cap = p.memory_create(&input, 0, len, Rights::WRITE)?;
                let result = p.register(RESULT_LEN)?;
                let result_cap = p.memory_create(&result, 0, RESULT_LEN, Rights::READ)?;
                let id = {
                    let mut n = next_id.lock().unwrap_or_else(|e| e.into_inner());
                    *n += 1;
                    *n
                };
                let caps = vec![input_cap.into(), result_cap.into()];
                buffers.lock().unwrap_or_else(|e| e.into_inner()).insert(
                    id,
                    DeviceBuffer {
                        input,
                        input_cap,
                        result,
                        result_cap,
                        done: None,
                    },
                );
                Ok((id.to_le_bytes().to_vec(), caps))
            }),
        );
    }
    {
        let (buffers, backend, reference) = (buffers.clone(), backend.clone(), reference.clone());
        serve_api(
            TAG_LAUNCH,
            Arc::new(move |_p, inv| {
                let id = u64_at(&inv.imms, 0)?;
                let mut map = buffers.lock().unwrap_or_else(|e| e.into_inner());
                let buf = map
                    .get_mut(&id)
                    .ok_or_else(|| PipelineError::Protocol(format!("no device buffer {id}")))?;
                // The CPU "device" runs the kernel at launch; sync reports it.
                let score = buf
                    .input
                    .with_bytes(|b| backend.verify(b, &reference))
                    .unwrap_or(f32::NAN);
                buf.result.write_at(0, &score.to_le_bytes())?;
                buf.done = Some(score);
                Ok((Vec::new(), Vec::new()))
            }),
        );
    }
    {
        let buffers = buffers.clone();
        serve_api(
            TAG_SYNC,
            Arc::new(move |_p, inv| {
                let id = u64_at(&inv.imms, 0)?;
                let map = buffers.lock().unwrap_or_else(|e| e.into_inner());
                match map.get(&id).map(|b| b.done) {
                    Some(Some(_)) => Ok((Vec::new(), Vec::new())),
                    Some(None) => Err(PipelineError::Protocol(format!(
                        "buffer {id} was never launched"
                    ))),
                    None => Err(PipelineError::Protocol(format!("no device buffer {id}"))),
                }
            }),
        );
    }
    serve_api(
        TAG_FREE,
        Arc::new(move |p, inv| {
            let id = u64_at(&inv.imms, 0)?;
            let buf = buffers
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id)
                .ok_or_else(|| PipelineError::Protocol(format!("no device buffer {id}")))?;
            p.revoke(buf.input_cap)?;
            p.revoke(buf.result_cap)?;
            p.unregister(&buf.input);
            p.unregister(&buf.result);
            Ok((Vec::new(), Vec::new()))
        }),
    );
    for (tag, name) in [
        (TAG_ALLOC, names::COMPUTE_ALLOC),
        (TAG_LAUNCH, names::COMPUTE_LAUNCH),
        (TAG_SYNC, names::COMPUTE_SYNC),
        (TAG_FREE, names::COMPUTE_FREE),
    ] {
        let r = p.request_create(tag, &[], &[])?;
        p.publish(name, r)?;
    }
    Ok(())
}

/// The client of the pipeline, holding everything wired at setup.
pub struct Client {
    p: Process,
    /// FractOS: storage read with the compute input and verify-continuation bound.
    wired_read: RequestCap,
    /// Storage read with the client buffer and a DONE continuation bound.
    read_to_me: RequestCap,
    /// Verify with the client's RESULT continuation bound (slot 0).
    verify_to_me: RequestCap,
    read: RequestCap,
    compute_input: MemoryCap,
    buffer: Region,
    buffer_r: MemoryCap,
    buffer_w: MemoryCap,
    /// Write windows of the buffer, one per [`REMOTE_BLOCK`], made once.
    blocks: Vec<MemoryCap>,
    /// Write window of the buffer's first [`RESULT_LEN`] bytes, made once.
    result_w: MemoryCap,
    done: RequestCap,
    api: [RequestCap; 4],
    timeout: Duration,
}

/// What one verification returned.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Verdict {
    /// Similarity score.
    pub score: f32,
    /// Wall time.
    pub latency: Duration,
}

impl Client {
    /// Looks up the services (waiting up to `wait`) and wires the FractOS
    /// and centralised paths. `max_image` bounds the image size.
    pub fn connect(p: Process, max_image: u64, wait: Duration) -> Result<Client, PipelineError> {
        let req = |name: &str| -> Result<RequestCap, PipelineError> {
            p.lookup(name, wait)?
                .as_request()
                .ok_or_else(|| PipelineError::Protocol(format!("{name} is not a Request")))
        };
        let read = req(names::STORAGE_READ)?;
        let verify = req(names::COMPUTE_VERIFY)?;
        let compute_input = p
            .lookup(names::COMPUTE_INPUT, wait)?
            .as_memory()
            .ok_or_else(|| PipelineError::Protocol("compute input is not Memory".into()))?;
        let api = [
            req(names::COMPUTE_ALLOC)?,
            req(names::COMPUTE_LAUNCH)?,
            req(names::COMPUTE_SYNC)?,
            req(names::COMPUTE_FREE)?,
        ];
        let result = p.request_create(TAG_RESULT, &[], &[])?;
        let done = p.request_create(TAG_DONE, &[], &[])?;
        let verify_to_me = p.derive(&verify, &0u32.to_le_bytes(), &[result.into()])?;
        let wired_read = p.derive(&read, &[], &[compute_input.into(), verify_to_me.into()])?;
        let buffer = p.register(max_image.max(RESULT_LEN))?;
        let buffer_w = p.memory_create(&buffer, 0, buffer.len(), Rights::WRITE)?;
        let buffer_r = p.memory_create(&buffer, 0, buffer.len(), Rights::READ)?;
        let read_to_me = p.derive(&read, &[], &[buffer_w.into(), done.into()])?;
        // Windows the remote-API mode reuses for every request, as a
        // careful programmer would make them: once.
        let mut blocks = Vec::new();
        let mut at = 0;
        while at < buffer.len() {
            let n = REMOTE_BLOCK.min(buffer.len() - at);
            blocks.push(p.diminish(&buffer_w, at, n, Rights::WRITE)?);
            at += n;
        }
        let result_w = p.diminish(&buffer_w, 0, RESULT_LEN, Rights::WRITE)?;
        let timeout = p.timeout();
        Ok(Client {
            p,
            wired_read,
            read_to_me,
            verify_to_me,
            read,
            compute_input,
            buffer,
            buffer_r,
            buffer_w,
            blocks,
            result_w,
            done,
            api,
            timeout,
        })
    }

    /// The SDK process.
    pub fn process(&self) -> &Process {
        &self.p
    }

    fn wait(&self, tag: u64) -> Result<Invocation, PipelineError> {
        let inv = self.p.next_invocation_timeout(self.timeout)?;
        if inv.tag != tag {
            drop_all(&self.p, &inv);
            return Err(PipelineError::Protocol(format!(
                "expected invocation {tag:#x}, got {:#x}",
                inv.tag
            )));
        }
        Ok(inv)
    }

    fn score(&self) -> Result<f32, PipelineError> {
        let inv = self.wait(TAG_RESULT)?;
        drop_all(&self.p, &inv);
        let bits = u32_at(&inv.imms, 0)?;
        Ok(f32::from_bits(bits))
    }

    /// Copies the first `len` bytes of the client buffer to `dst`: the
    /// buffer's own capability when `len` covers it (no window to derive
    /// and drop), else a window derived for this copy.
    fn copy_from_buffer(&self, len: u64, dst: &MemoryCap) -> Result<(), PipelineError> {
        if len == self.buffer.len() {
            return Ok(self.p.copy(&self.buffer_r, dst, None)?);
        }
        let part = self.p.diminish(&self.buffer_r, 0, len, Rights::READ)?;
        let copied = self.p.copy(&part, dst, None);
        self.p.drop_cap(part)?;
        Ok(copied?)
    }

    fn range(offset: u64, len: u64) -> [u8; 16] {
        let mut imms = [0u8; 16];
        imms[..8].copy_from_slice(&offset.to_le_bytes());
        imms[8..].copy_from_slice(&len.to_le_bytes());
        imms
    }

    /// FractOS mode: one invoke; the image flows storage → compute.
    pub fn verify_fractos(&self, offset: u64, len: u64) -> Result<Verdict, PipelineError> {
        let t = Instant::now();
        self.p
            .invoke(&self.wired_read, &Self::range(offset, len), &[])?;
        let score = self.score()?;
        Ok(Verdict {
            score,
            latency: t.elapsed(),
        })
    }

    /// Centralised mode: bulk read into the client, bulk push to compute,
    /// invoke, wait.
    pub fn verify_centralized(&self, offset: u64, len: u64) -> Result<Verdict, PipelineError> {
        let t = Instant::now();
        self.p
            .invoke(&self.read_to_me, &Self::range(offset, len), &[])?;
        let done = self.wait(TAG_DONE)?;
        drop_all(&self.p, &done);
        self.copy_from_buffer(len, &self.compute_input)?;
        self.p.invoke(&self.verify_to_me, &[], &[])?;
        let score = self.score()?;
        Ok(Verdict {
            score,
            latency: t.elapsed(),
        })
    }

    /// One remote-API call: invoke with a reply continuation, wait for the
    /// reply.
    fn call(
        &self,
        target: &RequestCap,
        imms: &[u8],
        caps: &[Cap],
    ) -> Result<Invocation, PipelineError> {
        let mut all = vec![Cap::from(self.done)];
        all.extend_from_slice(caps);
        self.p.invoke(target, imms, &all)?;
        self.wait(TAG_DONE)
    }

    /// Remote-device API mode: block reads, alloc, copy-in, launch,
    /// synchronize, copy-out, free — one round trip each.
    pub fn verify_remote_api(&self, offset: u64, len: u64) -> Result<Verdict, PipelineError> {
        let t = Instant::now();
        let mut at = 0;
        while at < len {
            let n = REMOTE_BLOCK.min(len - at);
            let block = (at / REMOTE_BLOCK) as usize;
            // The window made at connect when it fits, else one for this read.
            let (dst, temporary) = match self.blocks.get(block) {
                Some(b) if b_len(self.buffer.len(), block) == n => (*b, false),
                _ => (self.p.diminish(&self.buffer_w, at, n, Rights::WRITE)?, true),
            };
            let imms = Self::range(offset + at, n);
            // read(range) into dst, then reply: caps [dst, done].
            self.p
                .invoke(&self.read, &imms, &[dst.into(), self.done.into()])?;
            let r = self.wait(TAG_DONE)?;
            drop_all(&self.p, &r);
            if temporary {
                self.p.drop_cap(dst)?;
            }
            at += n;
        }
        let [alloc, launch, sync, free] = &self.api;
        let a = self.call(alloc, &len.to_le_bytes(), &[])?;
        let id = u64_at(&a.imms, 0)?;
        let (dev_in, dev_out) = (a.memory(0)?, a.memory(1)?);
        self.copy_from_buffer(len, &dev_in)?;
        for op in [launch, sync] {
            let r = self.call(op, &id.to_le_bytes(), &[])?;
            drop_all(&self.p, &r);
        }
        self.p.copy(&dev_out, &self.result_w, None)?;
        let mut score = [0u8; 4];
        self.buffer.read_at(0, &mut score)?;
        drop_all(&self.p, &a);
        let r = self.call(free, &id.to_le_bytes(), &[])?;
        drop_all(&self.p, &r);
        Ok(Verdict {
            score: f32::from_le_bytes(score),
            latency: t.elapsed(),
        })
    }

    /// Checks `bytes` is an image the client could send (for tooling).
    pub fn check_image(bytes: &[u8]) -> bool {
        Image::parse(bytes).is_ok()
    }
}

/// Length of block `i` of a `total`-byte buffer cut into [`REMOTE_BLOCK`]s.
fn b_len(total: u64, i: usize) -> u64 {
    REMOTE_BLOCK.min(total - i as u64 * REMOTE_BLOCK)
}
