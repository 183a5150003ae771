//! `version = "MAJOR.MINOR"`: which config schema a file is written for,
//! and what a binary does with keys it does not know.
//!
//! During a rolling upgrade, or after a rollback, an older binary meets a
//! config written for a newer one. A newer *minor* version only adds keys,
//! so the older binary ignores them and says which (one warning line),
//! rather than exiting 2 and taking the host out of the mesh. For a file
//! written for this binary's version or an older one, an unknown key can
//! only be a typo and stays fatal. A different *major* version may change
//! what known keys mean, so it is refused outright.

use std::fmt;

use serde::Deserialize;

use super::{ConfigError, invalid};

/// The config version this binary implements. Bump the minor version with
/// every key added, the major version when a key changes meaning or goes.
pub const CONFIG_VERSION: ConfigVersion = ConfigVersion { major: 1, minor: 0 };

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(try_from = "String")]
pub struct ConfigVersion {
    pub major: u32,
    pub minor: u32,
}

/// A file without `version` was written before versions existed: 1.0.
impl Default for ConfigVersion {
    fn default() -> Self {
        Self { major: 1, minor: 0 }
    }
}

impl fmt::Display for ConfigVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

impl TryFrom<String> for ConfigVersion {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        let parsed = text.split_once('.').and_then(|(major, minor)| Some((major.parse().ok()?, minor.parse().ok()?)));
        match parsed {
            Some((major, minor)) => Ok(Self { major, minor }),
            None => Err(format!("version must be \"MAJOR.MINOR\", as \"{CONFIG_VERSION}\", not {text:?}")),
        }
    }
}

/// Only the version, read before the rest: a file of another major version
/// is refused as such, not for whichever key it changed.
#[derive(Deserialize)]
pub(super) struct VersionOnly {
    #[serde(default)]
    pub version: ConfigVersion,
}

/// Refuses a config of another major version than this binary's.
pub(super) fn check_major(version: ConfigVersion) -> Result<(), ConfigError> {
    if version.major == CONFIG_VERSION.major {
        return Ok(());
    }
    Err(invalid(
        "version",
        format!(
            "config version {version} is not read by this binary, which reads {CONFIG_VERSION} \
             (and older {}.x files): install a release for config version {}.x, or rewrite the file",
            CONFIG_VERSION.major, version.major
        ),
    ))
}

/// What becomes of the keys the binary did not know (`ignored`, as paths
/// like `routing.new_knob`): `Ok(Some(warning))` when the file is of a newer
/// minor version, which may add keys; an error naming them otherwise.
pub(super) fn unknown_keys(version: ConfigVersion, ignored: &[String]) -> Result<Option<String>, ConfigError> {
    if ignored.is_empty() {
        return Ok(None);
    }
    let keys = ignored.join(", ");
    if version > CONFIG_VERSION {
        return Ok(Some(format!(
            "ignoring keys unknown to this version (config version {version}, this binary reads {CONFIG_VERSION}): {keys}"
        )));
    }
    Err(invalid(keys, format!("unknown key (config version {version}, this binary reads {CONFIG_VERSION})")))
}

/// A key's path in the file's own terms: `routing.new_knob`,
/// `services[0].new_knob` (serde_ignored's `Display` writes `services.0`
/// and marks `Option`s with `?`).
pub(super) fn key_path(path: &serde_ignored::Path<'_>) -> String {
    use serde_ignored::Path;
    match path {
        Path::Root => String::new(),
        Path::Seq { parent, index } => format!("{}[{index}]", key_path(parent)),
        Path::Map { parent, key } => match key_path(parent) {
            p if p.is_empty() => key.clone(),
            p => format!("{p}.{key}"),
        },
        Path::Some { parent } | Path::NewtypeStruct { parent } | Path::NewtypeVariant { parent } => key_path(parent),
    }
}
