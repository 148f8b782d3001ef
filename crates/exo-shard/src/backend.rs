//! Choosing where tensors live. The model code never names a backend: the device it is given
//! decides. Binaries and tests pick the device with [`BackendKind::device`].

use std::str::FromStr;

use burn::tensor::Device;

use crate::error::{Error, Result};

/// The compute backends this build can use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum BackendKind {
    /// burn-flex, burn's portable CPU backend: the fastest CPU backend measured here.
    #[default]
    Flex,
    /// burn-ndarray (feature `ndarray`); kept for comparison, slower than flex.
    NdArray,
    /// A GPU through wgpu (feature `wgpu`): Vulkan, Metal or DX12.
    Wgpu,
}

impl BackendKind {
    /// Every backend compiled into this build.
    pub fn available() -> Vec<BackendKind> {
        let mut out = vec![BackendKind::Flex];
        if cfg!(feature = "ndarray") {
            out.push(BackendKind::NdArray);
        }
        if cfg!(feature = "wgpu") {
            out.push(BackendKind::Wgpu);
        }
        out
    }

    /// The backend's name as `--backend` takes it.
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Flex => "flex",
            BackendKind::NdArray => "ndarray",
            BackendKind::Wgpu => "wgpu",
        }
    }

    /// The default device of this backend.
    pub fn device(self) -> Result<Device> {
        match self {
            BackendKind::Flex => Ok(Device::flex()),
            #[cfg(feature = "ndarray")]
            #[allow(deprecated)]
            BackendKind::NdArray => Ok(Device::ndarray()),
            #[cfg(feature = "wgpu")]
            BackendKind::Wgpu => Ok(Device::wgpu(burn::tensor::DeviceKind::DefaultDevice)),
            #[allow(unreachable_patterns)]
            other => Err(Error::Backend(format!(
                "backend `{}` is not compiled into this build (rebuild with `--features {}`)",
                other.name(),
                other.name()
            ))),
        }
    }
}

impl FromStr for BackendKind {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "flex" | "cpu" => Ok(BackendKind::Flex),
            "ndarray" => Ok(BackendKind::NdArray),
            "wgpu" | "gpu" => Ok(BackendKind::Wgpu),
            other => Err(Error::Backend(format!(
                "unknown backend `{other}` (choose flex, ndarray or wgpu)"
            ))),
        }
    }
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
