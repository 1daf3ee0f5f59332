//! Device-parametric tests, after candle's `test_device!` (candle-core's test_utils.rs):
//! `test_device!(body, cpu_name, cuda_name, metal_name)` turns `fn body(&Device) -> Result<()>`
//! into a `#[test]` on the CPU, one on CUDA device 0 under the `cuda` feature and one on Metal
//! device 0 under the `metal` feature.

/// `#[test]` wrappers calling `$body(&Device)` on the CPU, CUDA (feature `cuda`) and Metal
/// (feature `metal`).
#[macro_export]
macro_rules! test_device {
    ($body:ident, $cpu:ident, $cuda:ident, $metal:ident) => {
        #[test]
        fn $cpu() -> candle_core::Result<()> {
            $body(&candle_core::Device::Cpu)
        }

        #[cfg(feature = "cuda")]
        #[test]
        fn $cuda() -> candle_core::Result<()> {
            $body(&candle_core::Device::new_cuda(0)?)
        }

        #[cfg(feature = "metal")]
        #[test]
        fn $metal() -> candle_core::Result<()> {
            $body(&candle_core::Device::new_metal(0)?)
        }
    };
}
