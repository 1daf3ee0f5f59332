//! The Metal dispatch of every custom op: a library compiled from source once per device
//! (`newLibraryWithSource` cannot follow `#include`, so the headers are pasted in), its pipelines
//! cached by function name, and [`dispatch`], which encodes one 1-D grid with its buffers (read or
//! written) and by-value arguments bound in order.

use candle_core::backend::BackendStorage;
use candle_core::metal_backend::DeviceId;
use candle_core::{DType, MetalDevice, MetalStorage, Result};
use candle_metal_kernels::metal::{Buffer, ComputeCommandEncoder, ComputePipeline, Library as MtlLibrary};
use objc2_metal::MTLSize;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// The text of `metal` with each `#include "NAME"` line of `headers` (name, text) replaced by the
/// header's text (its `#pragma once` dropped), and `#define GM_INLINED 1` in front.
pub(crate) fn inline_source(metal: &str, headers: &[(&str, &str)]) -> String {
    let mut src = metal.to_string();
    for (name, text) in headers {
        src = src.replace(&format!("#include \"{name}\""), &text.replace("#pragma once", ""));
    }
    format!("#define GM_INLINED 1\n{src}")
}

type Pipelines = HashMap<&'static str, ComputePipeline>;
type Cache = Mutex<HashMap<(DeviceId, &'static str), (MtlLibrary, Pipelines)>>;

/// The pipeline of `func` in library `lib` (compiled from `source()` on first use on `dev`).
fn pipeline(
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

/// A kernel library: its cache name, its source (the .metal file with its headers pasted in) and
/// the threads per group of its dispatches (None: the pipeline's maximum).
pub(crate) struct Library {
    pub name: &'static str,
    pub source: fn() -> String,
    pub block: Option<usize>,
}

/// One kernel argument, bound at the next buffer index.
#[derive(Clone, Copy)]
pub(crate) enum Arg<'a> {
    /// A buffer the kernel reads, from a byte offset.
    In(&'a Buffer, usize),
    /// A buffer the kernel writes, from a byte offset. Bound as an output, so that candle's encoder
    /// puts a barrier before a later dispatch that reads or writes it.
    Out(&'a Buffer, usize),
    /// Bytes passed by value: a `#[repr(C)]` kernel-args struct or a u32 count.
    Bytes(&'a [u8]),
}

impl<'a> Arg<'a> {
    /// A storage the kernel reads, from element `offset`.
    pub fn input(s: &'a MetalStorage, offset: usize) -> Self {
        Arg::In(s.buffer(), offset * s.dtype().size_in_bytes())
    }

    /// `v` by value (plain old data: the `#[repr(C)]` kernel-args structs, u32).
    pub fn value<P: Copy>(v: &'a P) -> Self {
        // SAFETY: P is Copy plain old data without padding-dependent meaning; the slice covers
        // exactly the value and lives as long as the borrow.
        Arg::Bytes(unsafe { std::slice::from_raw_parts(v as *const P as *const u8, std::mem::size_of::<P>()) })
    }
}

/// A new buffer of `n` elements of `dtype` (at least one, as Metal needs) on `dev`.
pub(crate) fn buffer(dev: &MetalDevice, n: usize, dtype: DType, label: &str) -> Result<Arc<Buffer>> {
    dev.new_buffer_builder().with_size_for(n.max(1), dtype).with_label(label).build()
}

/// A new output storage of `n` elements of `dtype` on `dev`, and its buffer for binding.
pub(crate) fn output(dev: &MetalDevice, n: usize, dtype: DType, label: &str) -> Result<(MetalStorage, Arc<Buffer>)> {
    let buf = buffer(dev, n, dtype, label)?;
    Ok((MetalStorage::new(buf.clone(), dev.clone(), n, dtype), buf))
}

/// Encodes `func` of `lib` over `threads` threads (nothing when 0), with `args` at buffer indices
/// 0.. in order. Every entry point bounds its thread index by a count in its arguments.
pub(crate) fn dispatch(
    dev: &MetalDevice,
    lib: &Library,
    func: &'static str,
    args: &[Arg],
    threads: usize,
) -> Result<()> {
    if threads == 0 {
        return Ok(());
    }
    let pipe = pipeline(dev, lib.name, lib.source, func)?;
    let guard = dev.command_encoder()?;
    let enc: &ComputeCommandEncoder = guard.as_ref();
    enc.set_compute_pipeline_state(&pipe);
    for (i, a) in args.iter().enumerate() {
        match *a {
            Arg::In(buf, off) => enc.set_input_buffer(i, Some(buf), off),
            Arg::Out(buf, off) => enc.set_output_buffer(i, Some(buf), off),
            Arg::Bytes(b) => enc.set_bytes_directly(i, b.len(), b.as_ptr() as *const std::ffi::c_void),
        }
    }
    let max = pipe.max_total_threads_per_threadgroup();
    let width = lib.block.unwrap_or(max).min(max).min(threads).max(1);
    enc.dispatch_thread_groups(
        MTLSize { width: threads.div_ceil(width), height: 1, depth: 1 },
        MTLSize { width, height: 1, depth: 1 },
    );
    Ok(())
}
