//! Where things are: the workspace's binaries, the default model, a free port.

use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// A loopback port that was free a moment ago (bound to port 0, then
/// released): for etcd, which cannot be told to pick its own and report
/// it, and for listeners a test must know before the process starts.
pub fn free_port() -> Result<u16> {
    let listener =
        std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| Error::io("free port", "binding 127.0.0.1:0", e))?;
    let addr = listener.local_addr().map_err(|e| Error::io("free port", "reading the bound address", e))?;
    Ok(addr.port())
}

/// The directory of the workspace's built binaries: the running
/// executable's, or its parent when that is `deps` (test binaries live in
/// `target/<profile>/deps`, the binaries they start one level up).
pub fn bin_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe().map_err(|e| Error::io("bin dir", "locating the running executable", e))?;
    let dir = exe.parent().unwrap_or(Path::new("."));
    Ok(match dir.file_name() {
        Some(name) if name == "deps" => dir.parent().unwrap_or(dir).to_path_buf(),
        _ => dir.to_path_buf(),
    })
}

/// The binary `name`: `explicit` when given, else the one in `bin_dir()`.
/// `build_hint` says how to build it when it is missing.
pub fn workspace_bin(name: &str, explicit: Option<&Path>, build_hint: &str) -> Result<PathBuf> {
    if let Some(bin) = explicit {
        return Ok(bin.to_path_buf());
    }
    let dir = bin_dir()?;
    let bin = dir.join(name);
    if bin.exists() {
        Ok(bin)
    } else {
        Err(Error::NotBuilt { name: name.to_string(), dir, hint: build_hint.to_string() })
    }
}

/// The default model, fetched by `scripts/fetch-model.sh`; `MESH_TEST_MODEL`
/// names another. Whether it exists is the caller's to check: a message
/// that says "run scripts/fetch-model.sh" belongs where it is needed.
pub fn default_model() -> PathBuf {
    match std::env::var_os("MESH_TEST_MODEL") {
        Some(p) => p.into(),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/SmolLM2-135M-Instruct.Q4_1.gguf"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bin_dir_skips_deps() {
        // This test binary runs from target/<profile>/deps.
        let dir = bin_dir().unwrap();
        assert_ne!(dir.file_name().unwrap(), "deps", "{}", dir.display());
        assert!(std::env::current_exe().unwrap().starts_with(&dir));
    }

    #[test]
    fn a_missing_binary_says_how_to_build_it() {
        let err = workspace_bin("no-such-binary", None, "cargo build --release -p nothing").unwrap_err();
        assert!(err.to_string().contains("cargo build --release -p nothing"), "{err}");
        let given = Path::new("/opt/etcd");
        assert_eq!(workspace_bin("etcd", Some(given), "").unwrap(), given);
    }
}
