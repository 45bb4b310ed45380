use zerocopy::FromBytes;

use crate::error::WireError;
use crate::ethernet::{EthernetHeader, MacAddr, ETHERNET_HEADER_LEN, ETHERTYPE_DMFABRIC};
use crate::header::{flags, Header, Kind, AUTH_TAG_LEN, HEADER_LEN, MAGIC, VERSION};

/// A checked view over the bytes of one dmfabric frame.
///
/// [`Frame::new_checked`] verifies lengths, EtherType, magic, version, kind
/// and flag bits; afterwards no accessor panics. Bytes after the frame
/// (Ethernet padding) are allowed and ignored.
#[derive(Debug, Clone, Copy)]
pub struct Frame<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Frame<T> {
    /// Validate `buffer` and wrap it.
    pub fn new_checked(buffer: T) -> Result<Self, WireError> {
        let frame = Frame { buffer };
        frame.check()?;
        Ok(frame)
    }

    fn check(&self) -> Result<(), WireError> {
        let bytes = self.buffer.as_ref();
        if bytes.len() < ETHERNET_HEADER_LEN + HEADER_LEN {
            return Err(WireError::Truncated);
        }
        let (eth, rest) = EthernetHeader::ref_from_prefix(bytes).map_err(|_| WireError::Truncated)?;
        if eth.ethertype.get() != ETHERTYPE_DMFABRIC {
            return Err(WireError::BadEtherType);
        }
        let (hdr, _) = Header::ref_from_prefix(rest).map_err(|_| WireError::Truncated)?;
        if hdr.magic.get() != MAGIC {
            return Err(WireError::BadMagic);
        }
        if hdr.version != VERSION {
            return Err(WireError::BadVersion);
        }
        if Kind::from_u8(hdr.kind).is_none() {
            return Err(WireError::UnknownKind);
        }
        let f = hdr.flags.get();
        if f & !flags::ALL != 0 {
            return Err(WireError::BadFlags);
        }
        let tag = if f & flags::AUTH_TAG != 0 { AUTH_TAG_LEN } else { 0 };
        let need = ETHERNET_HEADER_LEN + HEADER_LEN + usize::from(hdr.payload_len.get()) + tag;
        if bytes.len() < need {
            return Err(WireError::Truncated);
        }
        Ok(())
    }

    /// The wrapped buffer.
    pub fn into_inner(self) -> T {
        self.buffer
    }

    fn eth(&self) -> &EthernetHeader {
        // Cannot fail: `new_checked` verified the length.
        match EthernetHeader::ref_from_prefix(self.buffer.as_ref()) {
            Ok((eth, _)) => eth,
            Err(_) => unreachable!("length checked in new_checked"),
        }
    }

    /// The dmfabric header.
    pub fn header(&self) -> &Header {
        match Header::ref_from_prefix(&self.buffer.as_ref()[ETHERNET_HEADER_LEN..]) {
            Ok((hdr, _)) => hdr,
            Err(_) => unreachable!("length checked in new_checked"),
        }
    }

    pub fn dst(&self) -> MacAddr {
        MacAddr(self.eth().dst)
    }

    pub fn src(&self) -> MacAddr {
        MacAddr(self.eth().src)
    }

    /// The message kind (validated).
    pub fn kind(&self) -> Kind {
        match Kind::from_u8(self.header().kind) {
            Some(k) => k,
            None => unreachable!("kind checked in new_checked"),
        }
    }

    pub fn flags(&self) -> u16 {
        self.header().flags.get()
    }

    /// Bytes between the header and the optional tag.
    pub fn payload(&self) -> &[u8] {
        let start = ETHERNET_HEADER_LEN + HEADER_LEN;
        let len = usize::from(self.header().payload_len.get());
        &self.buffer.as_ref()[start..start + len]
    }

    /// The authentication tag, if the frame carries one.
    pub fn auth_tag(&self) -> Option<&[u8; AUTH_TAG_LEN]> {
        if self.flags() & flags::AUTH_TAG == 0 {
            return None;
        }
        let start = ETHERNET_HEADER_LEN + HEADER_LEN + usize::from(self.header().payload_len.get());
        self.buffer.as_ref()[start..start + AUTH_TAG_LEN].try_into().ok()
    }

    /// The bytes a tag covers and the tag, if the frame carries one.
    pub fn sealed_parts(&self) -> Option<(&[u8], &[u8; AUTH_TAG_LEN])> {
        if self.flags() & flags::AUTH_TAG == 0 {
            return None;
        }
        let end = self.frame_len() - AUTH_TAG_LEN;
        let bytes = self.buffer.as_ref();
        Some((&bytes[..end], bytes[end..end + AUTH_TAG_LEN].try_into().ok()?))
    }

    /// Length of the frame proper (headers, payload, tag), without padding.
    pub fn frame_len(&self) -> usize {
        let tag = if self.flags() & flags::AUTH_TAG != 0 { AUTH_TAG_LEN } else { 0 };
        ETHERNET_HEADER_LEN + HEADER_LEN + usize::from(self.header().payload_len.get()) + tag
    }
}

impl<'a> Frame<&'a [u8]> {
    /// [`Frame::payload`], borrowed for as long as the underlying bytes.
    pub fn payload_ref(&self) -> &'a [u8] {
        let bytes: &'a [u8] = self.buffer;
        let start = ETHERNET_HEADER_LEN + HEADER_LEN;
        let len = usize::from(self.header().payload_len.get());
        &bytes[start..start + len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minimal() -> Vec<u8> {
        let mut b = vec![0u8; ETHERNET_HEADER_LEN + HEADER_LEN];
        b[12..14].copy_from_slice(&ETHERTYPE_DMFABRIC.to_be_bytes());
        b[14..16].copy_from_slice(&MAGIC.to_be_bytes());
        b[16] = VERSION;
        b[17] = Kind::InterruptAck as u8;
        b
    }

    #[test]
    fn accepts_minimal_frame_and_padding() {
        let mut b = minimal();
        assert!(Frame::new_checked(&b[..]).is_ok());
        b.extend_from_slice(&[0; 10]);
        let f = Frame::new_checked(&b[..]).unwrap();
        assert_eq!(f.frame_len(), ETHERNET_HEADER_LEN + HEADER_LEN);
        assert_eq!(f.kind(), Kind::InterruptAck);
    }

    #[test]
    fn rejects_each_header_fault() {
        let good = minimal();
        let cases: [(usize, u8, WireError); 5] = [
            (12, 0x08, WireError::BadEtherType),
            (14, 0x00, WireError::BadMagic),
            (16, 9, WireError::BadVersion),
            (17, 0, WireError::UnknownKind),
            (18, 0x80, WireError::BadFlags),
        ];
        for (at, val, want) in cases {
            let mut b = good.clone();
            b[at] = val;
            assert_eq!(Frame::new_checked(&b[..]).err(), Some(want), "byte {at}");
        }
        assert_eq!(Frame::new_checked(&good[..good.len() - 1]).err(), Some(WireError::Truncated));
    }

    #[test]
    fn payload_and_tag_must_fit() {
        let mut b = minimal();
        b[20..22].copy_from_slice(&4u16.to_be_bytes());
        assert_eq!(Frame::new_checked(&b[..]).err(), Some(WireError::Truncated));
        b.extend_from_slice(&[1, 2, 3, 4]);
        assert_eq!(Frame::new_checked(&b[..]).unwrap().payload(), &[1, 2, 3, 4]);
        b[19] |= flags::AUTH_TAG as u8;
        assert_eq!(Frame::new_checked(&b[..]).err(), Some(WireError::Truncated));
        b.extend_from_slice(&[7; AUTH_TAG_LEN]);
        assert_eq!(Frame::new_checked(&b[..]).unwrap().auth_tag(), Some(&[7; AUTH_TAG_LEN]));
    }
}
