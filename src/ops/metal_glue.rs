//! Metal launch glue shared by the custom ops: a library compiled from source once per device
//! (Metal's `newLibraryWithSource` cannot follow `#include`, so the headers are pasted in), its
//! pipelines cached by function name, and a 1-D launch that binds the input buffers, one output
//! buffer and a params struct in that order.

use candle_core::backend::BackendStorage;
use candle_core::metal_backend::DeviceId;
use candle_core::{DType, MetalDevice, MetalStorage, Result};
use candle_metal_kernels::metal::{ComputeCommandEncoder, ComputePipeline, Library};
use objc2_metal::MTLSize;
use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

/// The text of `metal` with each `#include "NAME"` line of `headers` (name, text) replaced by the
/// header's text (its `#pragma once` dropped), and `#define GM_INLINED 1` in front.
pub fn inline_source(metal: &str, headers: &[(&str, &str)]) -> String {
    let mut src = metal.to_string();
    for (name, text) in headers {
        src = src.replace(&format!("#include \"{name}\""), &text.replace("#pragma once", ""));
    }
    format!("#define GM_INLINED 1\n{src}")
}

type Pipelines = HashMap<&'static str, ComputePipeline>;
type Cache = Mutex<HashMap<(DeviceId, &'static str), (Library, Pipelines)>>;

/// The pipeline of `func` in library `lib` (compiled from `source()` on first use on `dev`).
pub fn pipeline(
    dev: &MetalDevice,
    lib: &'static str,
    source: fn() -> String,
    func: &'static str,
) -> Result<ComputePipeline> {
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let mut cache = CACHE.get_or_init(Default::default).lock().map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    let entry = match cache.entry((dev.id(), lib)) {
        std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
        std::collections::hash_map::Entry::Vacant(v) => {
            let l = dev
                .device()
                .new_library_with_source(&source(), None)
                .map_err(|e| candle_core::Error::Msg(format!("metal library {lib}: {e}")))?;
            v.insert((l, HashMap::new()))
        }
    };
    if let Some(p) = entry.1.get(func) {
        return Ok(p.clone());
    }
    let f = entry.0.get_function(func, None).map_err(|e| candle_core::Error::Msg(format!("{lib}::{func}: {e}")))?;
    let p = dev
        .device()
        .new_compute_pipeline_state_with_function(&f)
        .map_err(|e| candle_core::Error::Msg(format!("{lib}::{func}: {e}")))?;
    entry.1.insert(func, p.clone());
    Ok(p)
}

/// Launches `func` of library `lib` over `threads` threads (1-D): buffers `inputs` (storage, element
/// offset, expected dtype) at indices 0.., a new output (n, dtype) next, then `params`.
pub fn launch<P: Copy>(
    (lib, source, func): (&'static str, fn() -> String, &'static str),
    inputs: &[(&MetalStorage, usize, DType)],
    (n, dtype): (usize, DType),
    params: &P,
    threads: usize,
) -> Result<MetalStorage> {
    let dev = inputs[0].0.device();
    for (s, _, want) in inputs {
        if s.dtype() != *want {
            candle_core::bail!("{func}: Metal input must be {want:?}, got {:?}", s.dtype());
        }
    }
    let out = dev.new_buffer_builder().with_size_for(n.max(1), dtype).with_label(func).build()?;
    if threads > 0 {
        let pipe = pipeline(dev, lib, source, func)?;
        let guard = dev.command_encoder()?;
        let enc: &ComputeCommandEncoder = guard.as_ref();
        enc.set_compute_pipeline_state(&pipe);
        for (i, (s, off, dt)) in inputs.iter().enumerate() {
            enc.set_input_buffer(i, Some(s.buffer()), off * dt.size_in_bytes());
        }
        let j = inputs.len();
        enc.set_output_buffer(j, Some(&out), 0);
        enc.set_bytes(j + 1, params);
        let width = pipe.max_total_threads_per_threadgroup().min(threads).max(1);
        enc.dispatch_thread_groups(
            MTLSize { width: threads.div_ceil(width), height: 1, depth: 1 },
            MTLSize { width, height: 1, depth: 1 },
        );
    }
    Ok(MetalStorage::new(out, dev.clone(), n, dtype))
}
