//! The ready line `mesh-node` and `mesh-sidecar` print on stdout (written
//! by `daemon::ready`):
//!
//! `{"event":"ready","role":"sidecar","addresses":{"outbound":"127.0.0.1:4000","inbound":"127.0.0.1:4001"}}`

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::Deserialize;

use crate::{Error, Result};

#[derive(Deserialize)]
struct ReadyLine {
    event: String,
    role: String,
    addresses: BTreeMap<String, SocketAddr>,
}

/// The addresses a daemon said it serves on, by listener name (`grpc`,
/// `metrics`, `outbound`, `inbound`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Addresses {
    by_name: BTreeMap<String, SocketAddr>,
    /// The line they came from, for error messages.
    line: String,
}

impl Addresses {
    /// Reads a stdout line: `Ok(None)` when it is not a ready line (a
    /// daemon's stdout carries nothing else, but a stray line must not be
    /// mistaken for one), an error when it is one from another role.
    pub(crate) fn parse(name: &str, role: &str, line: &str) -> Result<Option<Addresses>> {
        let Ok(ready) = serde_json::from_str::<ReadyLine>(line) else { return Ok(None) };
        if ready.event != "ready" {
            return Ok(None);
        }
        if ready.role != role {
            return Err(Error::WrongRole {
                name: name.to_string(),
                expected: role.to_string(),
                found: ready.role,
                line: line.to_string(),
            });
        }
        Ok(Some(Addresses { by_name: ready.addresses, line: line.to_string() }))
    }

    /// The address of `listener`, when the daemon has one.
    pub fn get(&self, listener: &str) -> Option<SocketAddr> {
        self.by_name.get(listener).copied()
    }

    /// The address of `listener`, which the daemon must have announced.
    pub fn require(&self, name: &str, listener: &str) -> Result<SocketAddr> {
        self.get(listener).ok_or_else(|| Error::MissingAddress {
            name: name.to_string(),
            listener: listener.to_string(),
            line: self.line.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_addresses_of_its_role() {
        let line = r#"{"event":"ready","role":"sidecar","addresses":{"outbound":"127.0.0.1:4000","inbound":"127.0.0.1:4001"}}"#;
        let a = Addresses::parse("sidecar", "sidecar", line).unwrap().unwrap();
        assert_eq!(a.get("outbound"), Some("127.0.0.1:4000".parse().unwrap()));
        assert_eq!(a.require("sidecar", "inbound").unwrap(), "127.0.0.1:4001".parse().unwrap());
        assert_eq!(a.get("metrics"), None);
        assert!(matches!(a.require("sidecar", "metrics"), Err(Error::MissingAddress { .. })));
    }

    #[test]
    fn other_lines_are_not_readiness() {
        assert_eq!(Addresses::parse("n", "node", "listening on 127.0.0.1:1").unwrap(), None);
        assert_eq!(
            Addresses::parse("n", "node", r#"{"event":"stopping","role":"node","addresses":{}}"#).unwrap(),
            None
        );
        let other = r#"{"event":"ready","role":"sidecar","addresses":{}}"#;
        assert!(matches!(Addresses::parse("n", "node", other), Err(Error::WrongRole { .. })));
    }
}
