use std::path::PathBuf;
use std::time::Duration;

/// Why a process could not be started, readied or controlled. Start-up
/// errors carry the tail of the process's log: that is where the reason is.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("spawning {name} ({program}): {source}")]
    Spawn { name: String, program: String, source: std::io::Error },
    #[error("{name} exited before it was ready ({status}); its log:\n{log}")]
    Exited { name: String, status: String, log: String },
    #[error("{name} was not ready within {timeout:?}; its log:\n{log}")]
    NotReady { name: String, timeout: Duration, log: String },
    #[error("{name} did not log {text:?} within {timeout:?}; its log:\n{log}")]
    NotLogged { name: String, text: String, timeout: Duration, log: String },
    #[error("{name} announced itself as {found:?}, not {expected:?}: {line}")]
    WrongRole { name: String, expected: String, found: String, line: String },
    #[error("{name}'s ready line has no {listener:?} address: {line}")]
    MissingAddress { name: String, listener: String, line: String },
    #[error("{name}: {what}: {source}")]
    Io { name: String, what: String, source: std::io::Error },
    #[error("{name} not found in {}: build it ({hint}) or give its path", dir.display())]
    NotBuilt { name: String, dir: PathBuf, hint: String },
    #[error("{name}: {source}")]
    Connect { name: String, source: tonic::transport::Error },
    #[error("{name}: {source}")]
    Rpc { name: String, source: Box<tonic::Status> },
    #[error("{name} did not see the instances waited for within {timeout:?}; it saw: [{seen}]")]
    Instances { name: String, timeout: Duration, seen: String },
}

impl Error {
    pub(crate) fn io(name: &str, what: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io { name: name.to_string(), what: what.into(), source }
    }
}
