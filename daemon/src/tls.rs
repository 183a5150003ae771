//! Server TLS from PEM files, with errors that name the file and what it
//! was for; and workload identity: who the peer of a TLS session is
//! (`spiffe://mesh/host/<host>/role/<role>`, a URI SAN in its certificate)
//! and whether a listener lets it call. The node and the sidecar use this
//! one implementation, so a listener's rule reads the same everywhere.

use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use anyhow::Context as _;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::transport::{Certificate, CertificateDer, Identity, ServerTlsConfig};
use tonic::{Request, Status};
use x509_parser::extensions::GeneralName;

use crate::gate::{Gate, local_health};

/// Reads a PEM file; `what` says what it is for ("TLS certificate").
pub fn read_pem(what: &str, path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read the {what} {}", path.display()))
}

/// How long a client may take over its TLS handshake before the connection
/// is dropped. tonic has no default: a peer that connects and never
/// finishes (or never starts) would hold a socket and a task forever. A
/// loopback or LAN handshake takes milliseconds; 10 s leaves room for a
/// loaded host and a slow WAN link.
pub const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A server TLS config of `identity`, with the mesh's handshake timeout.
pub fn server_tls(identity: Identity) -> ServerTlsConfig {
    ServerTlsConfig::new().identity(identity).timeout(HANDSHAKE_TIMEOUT)
}

/// Serves as `cert`/`key`; with `client_ca`, also requires each client to
/// present a certificate that chains to it (mutual TLS).
pub fn server_config(cert: &Path, key: &Path, client_ca: Option<&Path>) -> anyhow::Result<ServerTlsConfig> {
    let identity = Identity::from_pem(read_pem("TLS certificate", cert)?, read_pem("TLS private key", key)?);
    let mut tls = server_tls(identity);
    if let Some(ca) = client_ca {
        tls = tls.client_ca_root(Certificate::from_pem(read_pem("TLS client CA", ca)?));
    }
    Ok(tls)
}

/// Every mesh identity starts with this; the trust domain is the mesh CA.
const PREFIX: &str = "spiffe://mesh/host/";

/// What a certificate's holder is for. A role, not a host, is what most
/// listeners care about: any sidecar may call an inbound port, no client may.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A sidecar: calls other sidecars' inbound sides and its own node.
    Sidecar,
    /// An application calling a sidecar's outbound side over TLS.
    Client,
    /// A node serving its model (its server certificate).
    Node,
    /// A person or tool (meshctl) reading status and admin surfaces.
    Operator,
}

impl Role {
    pub const NAMES: &str = "sidecar, client, node, operator";

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Sidecar => "sidecar",
            Role::Client => "client",
            Role::Node => "node",
            Role::Operator => "operator",
        }
    }
}

impl FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "sidecar" => Ok(Role::Sidecar),
            "client" => Ok(Role::Client),
            "node" => Ok(Role::Node),
            "operator" => Ok(Role::Operator),
            _ => Err(format!("unknown role {s:?} (one of {})", Role::NAMES)),
        }
    }
}

/// A host name as an identity carries it: what DNS labels allow, so an
/// identity is one unambiguous URI (no `/`, no `*`, no spaces).
fn check_host(host: &str) -> Result<(), String> {
    let ok = |b: u8| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_';
    if host.is_empty() || host.len() > 253 || !host.bytes().all(ok) {
        return Err(format!("host {host:?} must be 1-253 characters of letters, digits, '-', '.' or '_'"));
    }
    Ok(())
}

/// A workload identity: `spiffe://mesh/host/<host>/role/<role>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadId {
    pub host: String,
    pub role: Role,
}

impl WorkloadId {
    pub fn new(host: &str, role: Role) -> Result<Self, String> {
        check_host(host)?;
        Ok(Self { host: host.to_string(), role })
    }
}

impl fmt::Display for WorkloadId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}{}/role/{}", self.host, self.role.as_str())
    }
}

/// Splits `spiffe://mesh/host/<host>/role/<role>` into host and role.
fn split(s: &str) -> Result<(&str, Role), String> {
    let shape = || format!("{s:?} is not a mesh identity ({PREFIX}<host>/role/<role>)");
    let rest = s.strip_prefix(PREFIX).ok_or_else(shape)?;
    let (host, role) = rest.split_once("/role/").ok_or_else(shape)?;
    Ok((host, role.parse()?))
}

impl FromStr for WorkloadId {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (host, role) = split(s)?;
        Self::new(host, role)
    }
}

/// Who may call a listener: a mesh identity whose host may be `*` (any
/// host with that role).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerPattern {
    /// `None`: any host.
    host: Option<String>,
    role: Role,
}

impl PeerPattern {
    /// Any host with `role`.
    pub fn role(role: Role) -> Self {
        Self { host: None, role }
    }

    pub fn matches(&self, id: &WorkloadId) -> bool {
        self.role == id.role && self.host.as_ref().is_none_or(|h| *h == id.host)
    }
}

impl FromStr for PeerPattern {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match split(s)? {
            ("*", role) => Ok(Self::role(role)),
            (host, role) => Ok(Self { host: Some(WorkloadId::new(host, role)?.host), role }),
        }
    }
}

impl fmt::Display for PeerPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}{}/role/{}", self.host.as_deref().unwrap_or("*"), self.role.as_str())
    }
}

/// A listener's rule: the identities it serves. Empty means whoever
/// passed the TLS handshake (or anyone at all on a plaintext listener);
/// non-empty means only a client certificate carrying a matching identity.
#[derive(Debug, Clone, Default)]
pub struct Allow(Arc<[PeerPattern]>);

impl Allow {
    pub fn only(patterns: Vec<PeerPattern>) -> Self {
        Self(patterns.into())
    }

    /// The caller's identity, if the peer presenting `certs` may call;
    /// PERMISSION_DENIED naming who it is and who may, if not. `None`: no
    /// client certificate, or one without a mesh identity, on a listener
    /// open to that.
    fn authorize(&self, certs: Option<Arc<Vec<CertificateDer<'static>>>>) -> Result<Option<WorkloadId>, Status> {
        let peer = match certs.as_deref().and_then(|c| c.first()) {
            Some(leaf) => leaf_identity(leaf).map(Some),
            None => Ok(None),
        };
        if self.0.is_empty() {
            return Ok(peer.ok().flatten());
        }
        let denied = |who: String| Err(Status::permission_denied(format!("{who}; this listener accepts only {self}")));
        match peer {
            Ok(Some(id)) if self.0.iter().any(|p| p.matches(&id)) => Ok(Some(id)),
            Ok(Some(id)) => denied(format!("{id} may not call here")),
            Ok(None) => denied("no client certificate".into()),
            Err(problem) => denied(problem),
        }
    }
}

/// The listener's rule over every service on it (health and reflection
/// too), except health asked from loopback: a local probe needs no
/// certificate of a permitted identity. The caller's identity, when it has
/// one, is left in the request's extensions (read it with [`caller`]).
impl Gate for Allow {
    fn admit(&self, req: &mut tonic::codegen::http::Request<tonic::body::Body>) -> Result<(), Status> {
        if local_health(req) {
            return Ok(());
        }
        let tls = req.extensions().get::<TlsConnectInfo<TcpConnectInfo>>();
        if let Some(id) = self.authorize(tls.and_then(TlsConnectInfo::peer_certs))? {
            req.extensions_mut().insert(id);
        }
        Ok(())
    }
}

/// The identity an [`Allow`] gate admitted this request with; `None`: no
/// certificate, or one without a mesh identity, on a listener open to that.
pub fn caller<T>(req: &Request<T>) -> Option<&WorkloadId> {
    req.extensions().get::<WorkloadId>()
}

impl fmt::Display for Allow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("any peer");
        }
        let all: Vec<String> = self.0.iter().map(ToString::to_string).collect();
        f.write_str(&all.join(", "))
    }
}

/// The mesh identity in a certificate (DER): its one `spiffe://` URI SAN.
pub fn leaf_identity(der: &[u8]) -> Result<WorkloadId, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| format!("unreadable certificate: {e}"))?;
    let san = cert.subject_alternative_name().map_err(|e| format!("unreadable subjectAltName: {e}"))?;
    let spiffe: Vec<&str> = san
        .iter()
        .flat_map(|s| s.value.general_names.iter())
        .filter_map(|n| match n {
            GeneralName::URI(u) if u.starts_with("spiffe://") => Some(*u),
            _ => None,
        })
        .collect();
    match spiffe[..] {
        [one] => one.parse(),
        [] => {
            Err(format!("the certificate ({}) carries no mesh identity ({PREFIX}<host>/role/<role>)", cert.subject()))
        }
        _ => Err(format!(
            "the certificate ({}) carries {} SPIFFE IDs; a mesh certificate has one",
            cert.subject(),
            spiffe.len()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_file_is_named_with_its_purpose() {
        let dir = std::env::temp_dir().join(format!("daemon-tls-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cert = dir.join("cert.pem");
        std::fs::write(&cert, b"not checked until the handshake").unwrap();
        let key = dir.join("missing-key.pem");

        let err = format!("{:#}", server_config(&cert, &key, None).unwrap_err());
        assert!(err.contains("TLS private key"), "{err}");
        assert!(err.contains("missing-key.pem"), "{err}");

        let key = cert.clone();
        let ca = dir.join("missing-ca.pem");
        let err = format!("{:#}", server_config(&cert, &key, Some(&ca)).unwrap_err());
        assert!(err.contains("TLS client CA") && err.contains("missing-ca.pem"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn identities_parse_print_and_refuse_what_is_not_one() {
        let id: WorkloadId = "spiffe://mesh/host/gpu-1/role/sidecar".parse().unwrap();
        assert_eq!(id, WorkloadId { host: "gpu-1".into(), role: Role::Sidecar });
        assert_eq!(id.to_string(), "spiffe://mesh/host/gpu-1/role/sidecar");
        let bad_role = "spiffe://mesh/host/gpu-1/role/admin".parse::<WorkloadId>().unwrap_err();
        assert!(bad_role.contains("unknown role \"admin\"") && bad_role.contains(Role::NAMES), "{bad_role}");
        assert!("spiffe://other/host/a/role/node".parse::<WorkloadId>().unwrap_err().contains("not a mesh identity"));
        assert!("spiffe://mesh/host/a/b/role/node".parse::<WorkloadId>().unwrap_err().contains("host \"a/b\""));
        assert!("spiffe://mesh/host/*/role/node".parse::<WorkloadId>().is_err(), "`*` is for patterns only");
    }

    #[test]
    fn a_pattern_names_one_host_or_any_host_of_a_role() {
        let any_sidecar: PeerPattern = "spiffe://mesh/host/*/role/sidecar".parse().unwrap();
        let gpu1: PeerPattern = "spiffe://mesh/host/gpu-1/role/sidecar".parse().unwrap();
        let id = |s: &str| s.parse::<WorkloadId>().unwrap();
        assert!(any_sidecar.matches(&id("spiffe://mesh/host/gpu-2/role/sidecar")));
        assert!(!any_sidecar.matches(&id("spiffe://mesh/host/gpu-2/role/client")));
        assert!(gpu1.matches(&id("spiffe://mesh/host/gpu-1/role/sidecar")));
        assert!(!gpu1.matches(&id("spiffe://mesh/host/gpu-2/role/sidecar")));
        assert_eq!(any_sidecar.to_string(), "spiffe://mesh/host/*/role/sidecar");
    }

    fn cert_with(uris: &[&str]) -> Vec<u8> {
        let mut p = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        for u in uris {
            p.subject_alt_names.push(rcgen::SanType::URI((*u).try_into().unwrap()));
        }
        p.self_signed(&rcgen::KeyPair::generate().unwrap()).unwrap().der().to_vec()
    }

    #[test]
    fn the_identity_is_the_certificates_one_spiffe_uri() {
        let id = leaf_identity(&cert_with(&["https://example.com", "spiffe://mesh/host/h/role/client"])).unwrap();
        assert_eq!(id.to_string(), "spiffe://mesh/host/h/role/client");
        let none = leaf_identity(&cert_with(&[])).unwrap_err();
        assert!(none.contains("carries no mesh identity"), "{none}");
        let two = leaf_identity(&cert_with(&["spiffe://mesh/host/a/role/node", "spiffe://mesh/host/b/role/node"]));
        assert!(two.unwrap_err().contains("2 SPIFFE IDs"));
        assert!(leaf_identity(b"garbage").unwrap_err().contains("unreadable certificate"));
    }

    #[test]
    fn without_a_certificate_only_an_open_listener_serves() {
        assert_eq!(Allow::default().authorize(None).unwrap(), None);
        let only_sidecars = Allow::only(vec![PeerPattern::role(Role::Sidecar)]);
        let refused = only_sidecars.authorize(None).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::PermissionDenied);
        assert_eq!(
            refused.message(),
            "no client certificate; this listener accepts only spiffe://mesh/host/*/role/sidecar"
        );
    }
}
