//! Where the model runs: the CPU or one CUDA device, as a setting says, never
//! guessed from the hardware. A node told `cuda:N` runs there or not at all: serving on the
//! CPU instead would look healthy while answering ~35 times slower (README,
//! "GPUs": an H100 against its host's CPU).

use std::fmt;
use std::str::FromStr;

use candle_core::Device;

/// The accepted forms, for errors.
const FORMS: &str = "`cpu` or `cuda:N` (N the CUDA device number, as cuda:0)";

/// The device a node was told to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    Cpu,
    /// A CUDA device by its ordinal (as `nvidia-smi` numbers them, unless
    /// `CUDA_VISIBLE_DEVICES` renumbers them).
    Cuda(usize),
}

impl FromStr for DeviceChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "cpu" => Ok(Self::Cpu),
            other => other
                .strip_prefix("cuda:")
                .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| format!("{s:?} is not a device: expected {FORMS}")),
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// A device choice and the setting that made it, as the operator wrote it
/// (`MESH_NODE_DEVICE=cuda:0`, `--device cpu`), so that errors point at
/// the line to change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSetting {
    pub choice: DeviceChoice,
    pub said_by: String,
}

impl DeviceSetting {
    /// No device setting: the CPU, which every build has (the start log says so).
    pub fn default_cpu() -> Self {
        Self { choice: DeviceChoice::Cpu, said_by: "no --device or MESH_NODE_DEVICE (the default)".into() }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("{said_by} but this mesh-node was built without CUDA (scripts/build-cuda.sh)")]
    NotBuiltWithCuda { said_by: String },
    #[error("{said_by} but CUDA device {ordinal} cannot be opened (no fallback to the CPU): {source}")]
    Open {
        said_by: String,
        ordinal: usize,
        #[source]
        source: candle_core::Error,
    },
}

/// Opens the device `setting` names, or says why not; never another one.
pub fn open(setting: &DeviceSetting) -> Result<Device, DeviceError> {
    match setting.choice {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Cuda(_) if !cfg!(feature = "cuda") => {
            Err(DeviceError::NotBuiltWithCuda { said_by: setting.said_by.clone() })
        }
        DeviceChoice::Cuda(ordinal) => {
            open_cuda(ordinal).map_err(|source| DeviceError::Open { said_by: setting.said_by.clone(), ordinal, source })
        }
    }
}

/// CUDA device `n`. Its buffers do not track their uses with events: by
/// default every allocation creates two CUDA events (and frees them), for
/// syncing buffers across streams, and the node runs each device on one
/// stream (candle's), where the stream's order is the only sync needed; the
/// events cost host time on every one of a step's kernels. Freed buffers
/// stay in the device's memory pool (`keep_freed_memory`).
pub fn open_cuda(n: usize) -> candle_core::Result<Device> {
    let device = Device::new_cuda(n)?;
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = &device {
        // SAFETY: called before any buffer exists, and every buffer of this
        // device is used on its one stream (see above).
        unsafe { cuda.disable_event_tracking() };
        keep_freed_memory(cuda)?;
    }
    Ok(device)
}

/// Every op of a step allocates its output from the device's default
/// memory pool (stream-ordered) and frees it; with the pool's default
/// release threshold of 0, every synchronization (each step's end) hands
/// the freed memory back to the driver, and the next step maps it again.
/// The node owns its GPU, so the pool keeps what it has held.
#[cfg(feature = "cuda")]
fn keep_freed_memory(cuda: &candle_core::CudaDevice) -> candle_core::Result<()> {
    use candle_core::cuda_backend::WrapErr;
    use candle_core::cuda_backend::cudarc::driver::{result, sys};
    let stream = cuda.cuda_stream();
    let context = stream.context();
    if !context.has_async_alloc() {
        return Ok(());
    }
    let mut keep = u64::MAX;
    // SAFETY: the device handle comes from an open context, and the release
    // threshold attribute is a u64.
    unsafe {
        let pool = result::device::get_default_mem_pool(context.cu_device()).w()?;
        let attribute = sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD;
        result::mem_pool::set_attribute(pool, attribute, (&mut keep as *mut u64).cast()).w()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cpu_and_cuda_ordinals_only() {
        assert_eq!("cpu".parse(), Ok(DeviceChoice::Cpu));
        assert_eq!("CPU".parse(), Ok(DeviceChoice::Cpu));
        assert_eq!("cuda:0".parse(), Ok(DeviceChoice::Cuda(0)));
        assert_eq!("cuda:7".parse(), Ok(DeviceChoice::Cuda(7)));
        for bad in ["", "gpu", "cuda", "cuda:", "cuda:-1", "cuda:+1", "cuda:x", "0", "metal:0", "cuda:0,1"] {
            let err = bad.parse::<DeviceChoice>().unwrap_err();
            assert!(err.contains("`cpu` or `cuda:N`"), "{bad:?}: {err}");
        }
        for choice in [DeviceChoice::Cpu, DeviceChoice::Cuda(3)] {
            assert_eq!(choice.to_string().parse(), Ok(choice), "Display and FromStr agree");
        }
    }

    #[test]
    fn the_cpu_always_opens() {
        assert!(open(&DeviceSetting::default_cpu()).unwrap().is_cpu());
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_cuda_build_is_refused_not_run_on_the_cpu() {
        let setting = DeviceSetting { choice: DeviceChoice::Cuda(0), said_by: "MESH_NODE_DEVICE=cuda:0".into() };
        let err = open(&setting).unwrap_err().to_string();
        assert_eq!(err, "MESH_NODE_DEVICE=cuda:0 but this mesh-node was built without CUDA (scripts/build-cuda.sh)");
    }
}
