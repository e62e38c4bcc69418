//! Protocol version negotiation: each side states the range it speaks and
//! the session uses the highest version in both ranges.

/// Highest protocol version this build speaks.
pub const MAX_PROTOCOL_VERSION: u32 = 1;
/// Lowest protocol version this build still accepts.
pub const MIN_PROTOCOL_VERSION: u32 = 1;

/// The version both sides speak, or a message saying why there is none.
pub fn negotiate(peer_min: u32, peer_max: u32) -> Result<u32, String> {
    let version = peer_max.min(MAX_PROTOCOL_VERSION);
    if peer_max < peer_min || version < peer_min.max(MIN_PROTOCOL_VERSION) {
        return Err(format!(
            "the agent speaks protocol versions {peer_min}..={peer_max}, this edge speaks \
             {MIN_PROTOCOL_VERSION}..={MAX_PROTOCOL_VERSION}; upgrade the older side"
        ));
    }
    Ok(version)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_highest_common_version() {
        assert_eq!(negotiate(1, 1), Ok(1));
        assert_eq!(negotiate(1, 7), Ok(MAX_PROTOCOL_VERSION));
        assert!(negotiate(MAX_PROTOCOL_VERSION + 1, MAX_PROTOCOL_VERSION + 3).is_err());
        assert!(negotiate(0, 0).is_err());
        assert!(negotiate(3, 2).is_err());
    }
}
