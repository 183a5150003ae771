//! A development CA and per-host certificates for mutual TLS between hosts.
//! Production fleets should use their own PKI; these are for labs and tests.
//! Each certificate carries the holder's workload identity as its one URI
//! SAN, `spiffe://mesh/host/<host>/role/<role>`: listeners authorize on it
//! (`daemon::tls::Allow`), so the role is chosen when the certificate is
//! issued, not claimed by the caller.

use std::net::IpAddr;
use std::path::Path;

use anyhow::Context;
use daemon::tls::WorkloadId;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

const CA_NAME: &str = "mesh development CA";

fn ca_params() -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_NAME);
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p
}

fn write(dir: &Path, name: &str, text: &str, secret: bool) -> anyhow::Result<()> {
    let path = dir.join(name);
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    if secret {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(())
}

/// Writes `ca.pem` and `ca.key` into `dir`.
pub fn create_ca(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let key = KeyPair::generate()?;
    let cert = ca_params().self_signed(&key)?;
    write(dir, "ca.pem", &cert.pem(), false)?;
    write(dir, "ca.key", &key.serialize_pem(), true)?;
    Ok(())
}

/// From an hour ago (hosts' clocks differ a little) for `days`; 0 days
/// gives a certificate that has already expired (to rehearse a rotation).
fn validity(days: u32) -> (time::OffsetDateTime, time::OffsetDateTime) {
    let from = time::OffsetDateTime::now_utc() - time::Duration::hours(1);
    let until = if days == 0 { from } else { from + time::Duration::hours(1) + time::Duration::days(days.into()) };
    (from, until)
}

/// Writes `{name}.pem` and `{name}.key` into `out`, signed by the CA in
/// `ca_dir`, valid for `sans` (IP addresses or DNS names) as server and
/// client, and carrying `id` as its identity.
pub fn issue(ca_dir: &Path, name: &str, id: &WorkloadId, sans: &[String], out: &Path, days: u32) -> anyhow::Result<()> {
    let ca_key_pem = std::fs::read_to_string(ca_dir.join("ca.key")).context("reading ca.key")?;
    let ca_key = KeyPair::from_pem(&ca_key_pem)?;
    let issuer = Issuer::new(ca_params(), ca_key);
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    p.distinguished_name = dn;
    p.subject_alt_names = sans
        .iter()
        .map(|s| match s.parse::<IpAddr>() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) => Ok(SanType::DnsName(s.clone().try_into()?)),
        })
        .chain(std::iter::once(Ok(SanType::URI(id.to_string().try_into()?))))
        .collect::<Result<_, rcgen::Error>>()?;
    (p.not_before, p.not_after) = validity(days);
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    let key = KeyPair::generate()?;
    let cert = p.signed_by(&key, &issuer)?;
    std::fs::create_dir_all(out)?;
    write(out, &format!("{name}.pem"), &cert.pem(), false)?;
    write(out, &format!("{name}.key"), &key.serialize_pem(), true)?;
    Ok(())
}
