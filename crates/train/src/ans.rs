//! Order-0 range asymmetric numeral systems (rANS, Duda 2013; the byte-wise 32-bit variant of
//! ryg_rans): the lossless stage of the `int8ans` codec. The int8 values of a pseudo-gradient
//! are far from uniform, so coding them with their own frequencies saves 11-13% of the payload
//! (`plexus bench train --runs "100:int8/4096 100:int8ans/4096"`, BENCHMARKS.md). Pure integer
//! arithmetic: the same symbols give the same bytes on every machine, which commitments to a
//! contribution's bytes need.
//!
//! Layout: the frequency table (one LEB128 varint per symbol of the alphabet, scaled to sum to
//! [`SCALE`]), then the coder's final state (u32 LE), then the renormalisation bytes in the
//! order the decoder reads them. The decoder refuses what would decode wrongly or not at all:
//! a table that does not sum to the scale, running out of bytes, bytes left over, and a final
//! state other than the encoder's initial one. (A non-canonical stream that decodes to the same
//! symbols passes; a contribution's signed digest covers its bytes.)

/// Frequencies are scaled to sum to `1 << SCALE_BITS`.
const SCALE_BITS: u32 = 12;
/// The sum of the scaled frequencies.
pub const SCALE: u32 = 1 << SCALE_BITS;
/// The lower bound of the normalised state interval `[L, 256 L)`.
const L: u32 = 1 << 23;

/// Why an entropy-coded stream was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AnsError {
    #[error("the frequency table is cut short or malformed")]
    Table,
    #[error("the frequencies sum to {0}, not {SCALE}")]
    Sum(u32),
    #[error("the stream ends before its last symbol")]
    Truncated,
    #[error("{0} bytes follow the last symbol")]
    Trailing(usize),
    #[error("the stream does not return to the coder's initial state")]
    State,
}

/// Frequencies of `symbols` (each `< alphabet`) scaled to sum to [`SCALE`], every symbol that
/// occurs at least 1. Deterministic: ties go to the lower symbol.
fn scaled_frequencies(symbols: &[u8], alphabet: usize) -> Vec<u32> {
    let mut counts = vec![0u64; alphabet];
    for &s in symbols {
        counts[s as usize] += 1;
    }
    let n = symbols.len() as u64;
    if n == 0 {
        // Nothing to code: any valid table (all of it on symbol 0).
        let mut freq = vec![0u32; alphabet];
        freq[0] = SCALE;
        return freq;
    }
    let mut freq: Vec<u32> = counts
        .iter()
        .map(|&c| match c {
            0 => 0,
            c => ((c * u64::from(SCALE) + n / 2) / n).max(1) as u32,
        })
        .collect();
    // Give or take the rounding difference at the most frequent symbols (never below 1).
    let mut sum: i64 = freq.iter().map(|&f| i64::from(f)).sum();
    let mut order: Vec<usize> = (0..alphabet).filter(|&s| freq[s] > 0).collect();
    order.sort_by(|&a, &b| counts[b].cmp(&counts[a]).then(a.cmp(&b)));
    while sum != i64::from(SCALE) {
        for &s in &order {
            if sum > i64::from(SCALE) && freq[s] > 1 {
                freq[s] -= 1;
                sum -= 1;
            } else if sum < i64::from(SCALE) {
                freq[s] += 1;
                sum += 1;
            }
            if sum == i64::from(SCALE) {
                break;
            }
        }
    }
    freq
}

fn put_varint(out: &mut Vec<u8>, mut v: u32) {
    while v >= 0x80 {
        out.push((v as u8 & 0x7f) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn get_varint(bytes: &[u8], at: &mut usize) -> Result<u32, AnsError> {
    let mut v = 0u32;
    for shift in [0, 7, 14] {
        let b = *bytes.get(*at).ok_or(AnsError::Table)?;
        *at += 1;
        v |= u32::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(AnsError::Table)
}

/// Appends the coding of `symbols` (each `< alphabet`, `alphabet <= 256`) to `out`.
pub fn encode(symbols: &[u8], alphabet: usize, out: &mut Vec<u8>) {
    let freq = scaled_frequencies(symbols, alphabet);
    let mut cum = vec![0u32; alphabet];
    for s in 1..alphabet {
        cum[s] = cum[s - 1] + freq[s - 1];
    }
    freq.iter().for_each(|&f| put_varint(out, f));
    let mut x = L;
    let mut renorm: Vec<u8> = Vec::with_capacity(symbols.len());
    for &s in symbols.iter().rev() {
        let (f, c) = (freq[s as usize], cum[s as usize]);
        let x_max = ((L >> SCALE_BITS) << 8) * f;
        while x >= x_max {
            renorm.push(x as u8);
            x >>= 8;
        }
        x = ((x / f) << SCALE_BITS) + (x % f) + c;
    }
    out.extend_from_slice(&x.to_le_bytes());
    out.extend(renorm.iter().rev());
}

/// Decodes exactly `n` symbols of an alphabet of `alphabet` from `bytes` (the whole stream).
pub fn decode(bytes: &[u8], alphabet: usize, n: usize) -> Result<Vec<u8>, AnsError> {
    let mut at = 0usize;
    let mut freq = Vec::with_capacity(alphabet);
    for _ in 0..alphabet {
        let f = get_varint(bytes, &mut at)?;
        if f > SCALE {
            return Err(AnsError::Table);
        }
        freq.push(f);
    }
    let sum: u32 = freq.iter().sum();
    if sum != SCALE {
        return Err(AnsError::Sum(sum));
    }
    let mut cum = vec![0u32; alphabet];
    let mut slot_symbol = vec![0u8; SCALE as usize];
    let mut c = 0u32;
    for (s, &f) in freq.iter().enumerate() {
        cum[s] = c;
        slot_symbol[c as usize..(c + f) as usize].fill(s as u8);
        c += f;
    }
    let state = bytes.get(at..at + 4).ok_or(AnsError::Truncated)?;
    let mut x = u32::from_le_bytes([state[0], state[1], state[2], state[3]]);
    at += 4;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let slot = x & (SCALE - 1);
        let s = slot_symbol[slot as usize];
        let (f, c) = (freq[s as usize], cum[s as usize]);
        x = f * (x >> SCALE_BITS) + slot - c;
        while x < L {
            let b = *bytes.get(at).ok_or(AnsError::Truncated)?;
            at += 1;
            x = (x << 8) | u32::from(b);
        }
        out.push(s);
    }
    if at != bytes.len() {
        return Err(AnsError::Trailing(bytes.len() - at));
    }
    if x != L {
        return Err(AnsError::State);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn round_trip(symbols: &[u8], alphabet: usize) -> Vec<u8> {
        let mut out = Vec::new();
        encode(symbols, alphabet, &mut out);
        assert_eq!(decode(&out, alphabet, symbols.len()).unwrap(), symbols);
        out
    }

    #[test]
    fn a_skewed_source_codes_near_its_entropy() {
        // Symbol 0 with probability 1/2, 1 and 2 with 1/4: 1.5 bits per symbol.
        let symbols: Vec<u8> = (0..40_000u32)
            .map(|i| match i % 4 {
                0 | 1 => 0,
                2 => 1,
                _ => 2,
            })
            .collect();
        let bytes = round_trip(&symbols, 255);
        // The table takes a byte per symbol of the alphabet (frequencies under 128) and one
        // more for each of the three used ones; the state 4.
        let table = 255 + 3;
        let bits = (bytes.len() - table - 4) as f64 * 8.0 / symbols.len() as f64;
        assert!(bits < 1.505, "{bits} bits per symbol");
    }

    #[test]
    fn hostile_streams_are_refused() {
        let symbols: Vec<u8> = (0..1000u32).map(|i| (i * 7 % 13) as u8).collect();
        let mut good = Vec::new();
        encode(&symbols, 255, &mut good);
        // Cut short, with a byte more, or with a flipped byte.
        assert!(decode(&good[..good.len() - 1], 255, 1000).is_err());
        let mut longer = good.clone();
        longer.push(0);
        assert!(decode(&longer, 255, 1000).is_err());
        let mut flipped = good.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 0x40;
        assert!(decode(&flipped, 255, 1000).is_err());
        // A table that does not sum to SCALE, or is cut short.
        assert!(matches!(decode(&[0u8; 255], 255, 1), Err(AnsError::Sum(0))));
        assert_eq!(decode(&[0x80], 255, 1), Err(AnsError::Table));
        // Asking for more symbols than were coded.
        assert!(decode(&good, 255, 1001).is_err());
    }

    proptest! {
        #[test]
        fn any_symbols_round_trip(
            symbols in proptest::collection::vec(0u8..255, 0..3000),
            skew in 0u8..8,
        ) {
            // Skew some inputs towards few symbols, as pseudo-gradients are.
            let symbols: Vec<u8> = symbols.iter().map(|&s| if skew > 0 { s % (skew * 3) } else { s }).collect();
            round_trip(&symbols, 255);
        }
    }
}
