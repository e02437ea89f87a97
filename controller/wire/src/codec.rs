//! Bounds-checked primitive encoding shared by every message.
//!
//! All integers are little-endian. Variable-length fields are a `u32` length
//! followed by that many bytes (or elements). Every read checks the remaining
//! length first, so decoding never panics and never allocates more than the
//! input could possibly describe.

use alloc::vec::Vec;

use crate::{CapInfo, CapRef, DecodeError, ErrorCode, Handle, NodeId, ObjectKind, Rights};

/// Appends encoded fields to a byte vector.
pub(crate) struct Writer<'a> {
    pub(crate) out: &'a mut Vec<u8>,
}

impl Writer<'_> {
    pub(crate) fn u8(&mut self, v: u8) {
        self.out.push(v);
    }
    pub(crate) fn u16(&mut self, v: u16) {
        self.out.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn u32(&mut self, v: u32) {
        self.out.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn u64(&mut self, v: u64) {
        self.out.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn bytes(&mut self, v: &[u8]) {
        self.u32(v.len() as u32);
        self.out.extend_from_slice(v);
    }
    pub(crate) fn array<const N: usize>(&mut self, v: &[u8; N]) {
        self.out.extend_from_slice(v);
    }
    pub(crate) fn handle(&mut self, h: Handle) {
        self.u32(h.0);
    }
    pub(crate) fn opt_handle(&mut self, h: Option<Handle>) {
        match h {
            None => self.u8(0),
            Some(h) => {
                self.u8(1);
                self.handle(h);
            }
        }
    }
    pub(crate) fn handles(&mut self, hs: &[Handle]) {
        self.u32(hs.len() as u32);
        for h in hs {
            self.handle(*h);
        }
    }
    pub(crate) fn cap_ref(&mut self, c: &CapRef) {
        self.u32(c.node.0);
        self.u64(c.incarnation);
        self.u64(c.cap);
    }
    pub(crate) fn cap_refs(&mut self, cs: &[CapRef]) {
        self.u32(cs.len() as u32);
        for c in cs {
            self.cap_ref(c);
        }
    }
    pub(crate) fn cap_grants(&mut self, cs: &[(CapRef, CapInfo)]) {
        self.u32(cs.len() as u32);
        for (c, i) in cs {
            self.cap_ref(c);
            self.cap_info(i);
        }
    }
    pub(crate) fn cap_info(&mut self, i: &CapInfo) {
        self.u8(i.kind as u8);
        self.u8(i.rights.bits());
        self.u64(i.len);
    }
    pub(crate) fn error(&mut self, e: ErrorCode) {
        self.u16(e as u16);
    }
}

/// Reads fields from a byte slice, failing with [`DecodeError`] instead of
/// panicking on short or inconsistent input.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }
    pub(crate) fn remaining(&self) -> usize {
        self.buf.len()
    }
    pub(crate) fn finish(self) -> Result<(), DecodeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes(self.buf.len()))
        }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::Truncated);
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    pub(crate) fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    pub(crate) fn u16(&mut self) -> Result<u16, DecodeError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    pub(crate) fn u32(&mut self) -> Result<u32, DecodeError> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(a))
    }
    pub(crate) fn u64(&mut self) -> Result<u64, DecodeError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
    pub(crate) fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    /// A length prefix for `elem_size`-byte elements, checked against the
    /// remaining input and against `max` elements.
    fn len_prefix(&mut self, elem_size: usize, max: usize) -> Result<usize, DecodeError> {
        let n = self.u32()? as usize;
        if n > max {
            return Err(DecodeError::FieldTooLong { len: n, max });
        }
        if n.saturating_mul(elem_size) > self.remaining() {
            return Err(DecodeError::Truncated);
        }
        Ok(n)
    }
    pub(crate) fn bytes(&mut self, max: usize) -> Result<Vec<u8>, DecodeError> {
        let n = self.len_prefix(1, max)?;
        Ok(self.take(n)?.to_vec())
    }
    pub(crate) fn handle(&mut self) -> Result<Handle, DecodeError> {
        Ok(Handle(self.u32()?))
    }
    pub(crate) fn opt_handle(&mut self) -> Result<Option<Handle>, DecodeError> {
        match self.u8()? {
            0 => Ok(None),
            1 => Ok(Some(self.handle()?)),
            t => Err(DecodeError::BadField {
                field: "option tag",
                value: t as u64,
            }),
        }
    }
    pub(crate) fn handles(&mut self) -> Result<Vec<Handle>, DecodeError> {
        let n = self.len_prefix(4, crate::MAX_CAPS_PER_MESSAGE)?;
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(self.handle()?);
        }
        Ok(out)
    }
    pub(crate) fn cap_ref(&mut self) -> Result<CapRef, DecodeError> {
        Ok(CapRef {
            node: NodeId(self.u32()?),
            incarnation: self.u64()?,
            cap: self.u64()?,
        })
    }
    pub(crate) fn cap_refs(&mut self) -> Result<Vec<CapRef>, DecodeError> {
        let n = self.len_prefix(20, crate::MAX_CAPS_PER_MESSAGE)?;
        (0..n).map(|_| self.cap_ref()).collect()
    }
    pub(crate) fn cap_grants(&mut self) -> Result<Vec<(CapRef, CapInfo)>, DecodeError> {
        let n = self.len_prefix(30, crate::MAX_CAPS_PER_MESSAGE)?;
        (0..n)
            .map(|_| Ok((self.cap_ref()?, self.cap_info()?)))
            .collect()
    }
    pub(crate) fn rights(&mut self) -> Result<Rights, DecodeError> {
        let v = self.u8()?;
        Rights::from_bits(v).ok_or(DecodeError::BadField {
            field: "rights",
            value: v as u64,
        })
    }
    pub(crate) fn cap_info(&mut self) -> Result<CapInfo, DecodeError> {
        let k = self.u8()?;
        let kind = match k {
            0 => ObjectKind::Memory,
            1 => ObjectKind::Request,
            _ => {
                return Err(DecodeError::BadField {
                    field: "object kind",
                    value: k as u64,
                })
            }
        };
        Ok(CapInfo {
            kind,
            rights: self.rights()?,
            len: self.u64()?,
        })
    }
    pub(crate) fn error(&mut self) -> Result<ErrorCode, DecodeError> {
        let v = self.u16()?;
        ErrorCode::from_u16(v).ok_or(DecodeError::BadField {
            field: "error code",
            value: v as u64,
        })
    }
}
