//! Hexadecimal text to bytes and back, for datagrams given as text (the test client's stdin, the
//! shared vectors).

/// Why a text is not hex.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HexError {
    /// A character that is not a hex digit.
    #[error("not a hex digit: {0:?}")]
    NotHex(char),
    /// An odd number of digits (how many).
    #[error("{0} hex digits, an odd number")]
    OddDigits(usize),
}

/// The bytes that `text`, two hex digits a byte (either case), spells. The first character
/// that is not a hex digit is the error, before an odd count is.
pub fn decode(text: &[u8]) -> Result<Vec<u8>, HexError> {
    let digits: Vec<u8> = text
        .iter()
        .map(|&b| {
            char::from(b)
                .to_digit(16)
                .map(|d| d as u8)
                .ok_or(HexError::NotHex(char::from(b)))
        })
        .collect::<Result<_, _>>()?;
    let pairs = digits.chunks_exact(2);
    if !pairs.remainder().is_empty() {
        return Err(HexError::OddDigits(digits.len()));
    }
    Ok(pairs.map(|pair| (pair[0] << 4) | pair[1]).collect())
}

/// `bytes` as lower-case hex, two digits a byte.
pub fn encode(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_names_what_is_wrong() {
        let bytes: Vec<u8> = (0..=255).collect();
        assert_eq!(decode(encode(&bytes).as_bytes()), Ok(bytes));
        assert_eq!(decode(b"0A0b"), Ok(vec![0x0a, 0x0b]));
        assert_eq!(decode(b""), Ok(vec![]));
        assert_eq!(decode(b"0a0"), Err(HexError::OddDigits(3)));
        assert_eq!(decode(b"0g0"), Err(HexError::NotHex('g')));
        assert_eq!(decode(b"0a 0b"), Err(HexError::NotHex(' ')));
    }
}
