// Compiles every kernels/NAME.cu to PTX ($OUT_DIR/NAME.ptx) with nvcc, only when the
// `cuda` feature is on: the default (CPU) build needs no CUDA toolchain. The PTX is embedded with
// include_str! and loaded through candle's CudaDevice::get_or_load_custom_func.
// Env: NVCC (default "nvcc" on PATH), GUMBEL_MOE_PTX_ARCH (default 80: PTX .target sm_80, which the
// driver JITs for sm_90 too). Metal sources are compiled at run time and need nothing here.
use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=GUMBEL_MOE_PTX_ARCH");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".to_string());
    let arch = format!("-arch=sm_{}", std::env::var("GUMBEL_MOE_PTX_ARCH").unwrap_or_else(|_| "80".into()));
    // Every kernels/*.cu becomes $OUT_DIR/<name>.ptx.
    let mut names: Vec<String> = std::fs::read_dir("kernels")
        .expect("kernels/ directory")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter_map(|f| f.strip_suffix(".cu").map(str::to_string))
        .collect();
    names.sort();
    for name in names {
        let src = format!("kernels/{name}.cu");
        let ptx = out.join(format!("{name}.ptx"));
        let st = Command::new(&nvcc)
            .args(["-O3", "-std=c++17", "--ptx", "-Ikernels", &arch, &src, "-o"])
            .arg(&ptx)
            .status()
            .unwrap_or_else(|e| {
                panic!("failed to spawn {nvcc}: {e} (feature `cuda` needs nvcc: put it on PATH or set NVCC)")
            });
        assert!(st.success(), "nvcc failed on {src}");
    }
}
