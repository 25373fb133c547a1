//! A bounds-checked byte reader and LEB128 varints, shared by the binary decoders.

use crate::Error;

/// Reads little-endian fields from a byte slice; every read is checked, none can panic.
pub(crate) struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
    what: &'static str,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(bytes: &'a [u8], what: &'static str) -> Self {
        Reader { bytes, pos: 0, what }
    }

    pub(crate) fn position(&self) -> usize {
        self.pos
    }

    pub(crate) fn remaining(&self) -> usize {
        self.bytes.len().saturating_sub(self.pos)
    }

    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], Error> {
        let end = self.pos.checked_add(n).filter(|end| *end <= self.bytes.len());
        match end.and_then(|end| self.bytes.get(self.pos..end)) {
            Some(slice) => {
                self.pos += n;
                Ok(slice)
            }
            None => Err(Error::Truncated {
                what: self.what,
                offset: self.pos,
                needed: n.saturating_sub(self.remaining()),
            }),
        }
    }

    pub(crate) fn array<const N: usize>(&mut self) -> Result<[u8; N], Error> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, Error> {
        Ok(u8::from_le_bytes(self.array()?))
    }

    pub(crate) fn u32(&mut self) -> Result<u32, Error> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    pub(crate) fn u64(&mut self) -> Result<u64, Error> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// An unsigned LEB128 varint of at most 10 bytes that fits in a `u64`.
    pub(crate) fn varint(&mut self) -> Result<u64, Error> {
        let mut value: u64 = 0;
        for i in 0..10u32 {
            let byte = self.u8()?;
            let low = u64::from(byte & 0x7f);
            if i == 9 && byte > 1 {
                return Err(Error::corrupt(self.what, "varint overflows 64 bits"));
            }
            value |= low << (7 * i);
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(Error::corrupt(self.what, "varint longer than 10 bytes"))
    }

    /// The 8-byte header of Cairn's binary objects: `magic`, a version byte that must be
    /// `version`, and three reserved zero bytes.
    pub(crate) fn header(&mut self, magic: &[u8; 4], version: u8) -> Result<(), Error> {
        self.header_of(magic, &[version]).map(|_| ())
    }

    /// Reads a header whose version is one of `versions`; returns it.
    pub(crate) fn header_of(&mut self, magic: &[u8; 4], versions: &[u8]) -> Result<u8, Error> {
        if self.take(4)? != magic {
            return Err(Error::corrupt(self.what, "bad magic"));
        }
        let found = self.u8()?;
        if !versions.contains(&found) {
            return Err(Error::Unsupported { what: self.what, detail: format!("version {found}") });
        }
        if self.take(3)? != [0, 0, 0] {
            return Err(Error::corrupt(self.what, "reserved bytes are not zero"));
        }
        Ok(found)
    }

    pub(crate) fn expect_end(&self) -> Result<(), Error> {
        if self.remaining() == 0 {
            Ok(())
        } else {
            Err(Error::corrupt(self.what, format!("{} trailing bytes", self.remaining())))
        }
    }
}

/// Appends `value` as an unsigned LEB128 varint.
pub(crate) fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn varint_round_trips(value: u64) {
            let mut out = Vec::new();
            put_varint(&mut out, value);
            let mut reader = Reader::new(&out, "test");
            prop_assert_eq!(reader.varint().unwrap(), value);
            prop_assert!(reader.expect_end().is_ok());
        }

        #[test]
        fn varint_never_panics(bytes: Vec<u8>) {
            let _ = Reader::new(&bytes, "test").varint();
        }
    }
}
