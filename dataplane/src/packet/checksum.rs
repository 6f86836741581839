//! Internet checksum (RFC 1071) and its incremental update (RFC 1624).

/// Adds `data` as big-endian 16-bit words to a 32-bit one's-complement
/// accumulator; an odd trailing byte is padded with zero.
pub fn accumulate(mut sum: u32, data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for pair in &mut chunks {
        sum = sum.wrapping_add(u32::from(u16::from_be_bytes([pair[0], pair[1]])));
    }
    if let [last] = chunks.remainder() {
        sum = sum.wrapping_add(u32::from(*last) << 8);
    }
    sum
}

/// Folds a 32-bit accumulator into the final (complemented) checksum.
pub fn finish(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    // The loop leaves at most 16 significant bits.
    !u16::try_from(sum).unwrap_or(u16::MAX)
}

/// The pseudo-header sum of a transport segment of `len` bytes (IPv4 or
/// IPv6 addresses as given; RFC 768 / RFC 8200 §8.1 lay out the same words).
pub fn pseudo(src: &[u8], dst: &[u8], proto: u8, len: usize) -> u32 {
    let mut s = accumulate(0, src);
    s = accumulate(s, dst);
    let len = u32::try_from(len).unwrap_or(0);
    s = accumulate(s, &len.to_be_bytes());
    accumulate(s, &[0, 0, 0, proto])
}

/// The Internet checksum of `data`.
pub fn internet_checksum(data: &[u8]) -> u16 {
    finish(accumulate(0, data))
}

/// RFC 1624 eqn. 3: the checksum after one 16-bit word of the covered data
/// changes from `old` to `new`: `HC' = ~(~HC + ~m + m')`.
// hot path: used per routed packet for the TTL decrement.
pub fn update16(checksum: u16, old: u16, new: u16) -> u16 {
    let mut sum = u32::from(!checksum) + u32::from(!old) + u32::from(new);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !u16::try_from(sum).unwrap_or(u16::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn known_ipv4_header_checksum() {
        // Example header from RFC 1071 discussions (checksum field zeroed).
        let hdr = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(internet_checksum(&hdr), 0xb861);
        let mut with = hdr;
        with[10..12].copy_from_slice(&0xb861u16.to_be_bytes());
        assert_eq!(internet_checksum(&with), 0);
    }

    #[test]
    fn odd_length_pads_with_zero() {
        assert_eq!(internet_checksum(&[0x01]), internet_checksum(&[0x01, 0x00]));
        assert_eq!(internet_checksum(&[]), 0xffff);
    }

    proptest! {
        #[test]
        fn incremental_update_matches_full_recompute(
            mut words in proptest::collection::vec(any::<u16>(), 1..40),
            idx in any::<prop::sample::Index>(),
            new in any::<u16>(),
        ) {
            let bytes = |w: &[u16]| w.iter().flat_map(|x| x.to_be_bytes()).collect::<Vec<u8>>();
            let before = internet_checksum(&bytes(&words));
            let i = idx.index(words.len());
            let old = words[i];
            words[i] = new;
            let after = internet_checksum(&bytes(&words));
            let inc = update16(before, old, new);
            // 0x0000 and 0xffff are the same value in one's complement.
            prop_assert!(inc == after || (inc ^ after) == 0xffff && (inc == 0 || inc == 0xffff),
                "inc {inc:#x} full {after:#x}");
        }
    }
}
