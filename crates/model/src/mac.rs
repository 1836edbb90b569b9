//! MAC addresses for VM interfaces.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;
use thiserror::Error;

/// A unicast Ethernet address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Mac(pub [u8; 6]);

/// A MAC address that could not be used.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum MacError {
    /// Not six hex bytes separated by ':'.
    #[error("'{0}' is not a MAC address; write six hex bytes like 52:54:00:12:34:56")]
    Syntax(String),
    /// The group bit is set.
    #[error(
        "'{0}' is a multicast address; a VM interface needs a unicast address (first byte even)"
    )]
    Multicast(String),
    /// All zeros.
    #[error("00:00:00:00:00:00 is not a usable MAC address")]
    Zero,
}

impl Mac {
    /// The prefix QEMU/KVM guests conventionally use; locally administered.
    pub const PREFIX: [u8; 3] = [0x52, 0x54, 0x00];

    /// A MAC with the conventional prefix and the given three random bytes.
    pub fn from_random(bytes: [u8; 3]) -> Mac {
        Mac([
            Self::PREFIX[0],
            Self::PREFIX[1],
            Self::PREFIX[2],
            bytes[0],
            bytes[1],
            bytes[2],
        ])
    }
}

impl FromStr for Mac {
    type Err = MacError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() != 6 {
            return Err(MacError::Syntax(s.to_string()));
        }
        let mut b = [0u8; 6];
        for (i, p) in parts.iter().enumerate() {
            if p.len() != 2 {
                return Err(MacError::Syntax(s.to_string()));
            }
            b[i] = u8::from_str_radix(p, 16).map_err(|_| MacError::Syntax(s.to_string()))?;
        }
        if b == [0; 6] {
            return Err(MacError::Zero);
        }
        if b[0] & 1 == 1 {
            return Err(MacError::Multicast(s.to_string()));
        }
        Ok(Mac(b))
    }
}

impl TryFrom<String> for Mac {
    type Error = MacError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Mac> for String {
    fn from(m: Mac) -> String {
        m.to_string()
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_table() {
        let cases: &[(&str, Result<&str, &str>)] = &[
            ("52:54:00:12:34:56", Ok("52:54:00:12:34:56")),
            ("52:54:00:AB:cd:EF", Ok("52:54:00:ab:cd:ef")),
            ("01:00:5e:00:00:01", Err("multicast")),
            ("00:00:00:00:00:00", Err("not a usable")),
            ("52:54:00:12:34", Err("six hex bytes")),
            ("52:54:00:12:34:5g", Err("six hex bytes")),
            ("525400123456", Err("six hex bytes")),
        ];
        for (input, want) in cases {
            match (input.parse::<Mac>(), want) {
                (Ok(m), Ok(s)) => assert_eq!(m.to_string(), *s),
                (Err(e), Err(msg)) => assert!(e.to_string().contains(msg), "{input}: {e}"),
                (got, _) => panic!("{input}: unexpected {got:?}"),
            }
        }
    }

    #[test]
    fn random_has_prefix() {
        assert_eq!(Mac::from_random([1, 2, 3]).to_string(), "52:54:00:01:02:03");
    }
}
