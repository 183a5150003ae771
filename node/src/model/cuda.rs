//! The node's own CUDA kernels (`kernels.cu`): compiled by NVRTC once per
//! process, loaded once per device, launched by the ops that need them.

use std::sync::{Arc, OnceLock};

use candle_core::cuda_backend::cudarc::driver::{CudaFunction, CudaStream, CudaView, LaunchArgs, LaunchConfig};
use candle_core::cuda_backend::{CudaDType, CudaDevice};
use candle_core::{CudaStorage, Error, Layout, Result};

const SOURCE: &str = include_str!("kernels.cu");

fn ptx() -> Result<&'static str> {
    static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();
    let ptx = PTX.get_or_init(|| {
        candle_core::cuda_backend::cudarc::nvrtc::compile_ptx(SOURCE).map(|p| p.to_src()).map_err(|e| e.to_string())
    });
    ptx.as_deref().map_err(|e| Error::Msg(format!("compiling the node's CUDA kernels: {e}")))
}

/// A kernel of `kernels.cu` and the device's stream it runs on.
pub struct Kernel {
    func: CudaFunction,
    stream: Arc<CudaStream>,
}

impl Kernel {
    pub fn builder(&self) -> LaunchArgs<'_> {
        self.stream.launch_builder(&self.func)
    }
}

/// Kernel `name` of `kernels.cu` on `dev`.
pub fn func(dev: &CudaDevice, name: &str) -> Result<Kernel> {
    let func = dev.get_or_load_custom_func(name, "mesh_node_kernels", ptx()?)?.into_cuda_function();
    Ok(Kernel { func, stream: dev.cuda_stream() })
}

/// The elements `l` covers in `s`, which must be contiguous there.
pub fn view<'a, T: CudaDType>(s: &'a CudaStorage, l: &Layout, op: &'static str) -> Result<CudaView<'a, T>> {
    let (start, end) = l.contiguous_offsets().ok_or(Error::RequiresContiguous { op })?;
    Ok(s.as_cuda_slice::<T>()?.slice(start..end))
}

/// One thread per element.
pub fn per_element(n: usize) -> LaunchConfig {
    LaunchConfig::for_num_elems(n as u32)
}
