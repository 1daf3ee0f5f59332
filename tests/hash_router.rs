//! Hash routing (Roller et al. 2021): a fixed, uniform function of the token id (against the test's
//! own hash and a chi-square test), and the ids reaching the router through the model.

use candle_core::{DType, Device, Tensor};
use gumbel_moe::model::cross_entropy;
use gumbel_moe::moe::{build_router, RouteCtx};
use gumbel_moe::nn::{Ctx, Params};
use std::collections::BTreeMap;

mod common;
use common::host::*;
use common::routing::{hash_route, tiny_gpt};

const CPU: Device = Device::Cpu;

#[test]
fn hash_routing_is_a_fixed_uniform_function_of_the_id() {
    let (e, d) = (8, 4);
    let cfg = router_config("hash", e, d, 1, 1, true);
    let router = build_router(&cfg, 0, Params::new().var_builder(1, DType::F32, &CPU)).unwrap();
    let ids: Vec<u32> = (0..40_000).collect();
    let r = hash_route(router.as_ref(), &ids, d, train_ctx(1, 0, 1.0), 0);
    assert_eq!(r.m, 1);
    let want: Vec<u32> = ids.iter().map(|&id| host_hash(id, e)).collect();
    assert_eq!(index_vec(&r.indices), want, "routing differs from the host hash");
    assert_eq!(flat(&r.weights), vec![1.0; ids.len()], "hash weights must be 1");
    // One expert per id, whatever the position, layer, step, seed or mode.
    let mut rng = Rng(3);
    let shuffled: Vec<u32> = (0..5000).map(|_| (rng.next_u64() % 300) as u32).collect();
    let mut seen: BTreeMap<u32, u32> = BTreeMap::new();
    for (ctx, layer) in [(train_ctx(2, 5, 1.0), 0), (train_ctx(9, 77, 0.5), 3), (Ctx::eval(4, 1.0), 1)] {
        let r = hash_route(router.as_ref(), &shuffled, d, ctx, layer);
        for (&id, &ex) in shuffled.iter().zip(&index_vec(&r.indices)) {
            assert_eq!(*seen.entry(id).or_insert(ex), ex, "token id {id} went to two experts");
        }
    }
    // Ids spread uniformly over the experts.
    let mut counts = vec![0usize; e];
    index_vec(&r.indices).iter().for_each(|&i| counts[i as usize] += 1);
    chi_square(&counts, &vec![1.0 / e as f64; e], "hash: ids per expert vs uniform");
    // Without ids the router says what it needs.
    let err = router.route(&Tensor::zeros((3, d), DType::F32, &CPU).unwrap(), &RouteCtx::new(Ctx::eval(1, 1.0), 0));
    assert!(err.err().unwrap().to_string().contains("token ids"), "hash without ids must ask for them");
}

#[test]
fn hash_router_gets_the_input_ids_through_the_model_and_trains() {
    let e = 4;
    let params = Params::new();
    let (_, gpt) = tiny_gpt("hash", &params, e);
    assert!(params.named().iter().all(|(n, _)| !n.contains("router")), "the hash router has no parameters");
    let ids: Vec<u32> = (0..16u32).map(|i| (i * 7 + 3) % 11).collect();
    let idx = Tensor::from_vec(ids.clone(), (2, 8), &CPU).unwrap();
    let out = gpt.forward(&idx, &train_ctx(1, 0, 1.0)).unwrap();
    let mut want = vec![0u32; e];
    ids.iter().for_each(|&id| want[host_hash(id, e) as usize] += 1);
    for (l, s) in out.moe_stats.iter().enumerate() {
        assert_eq!(s.tokens_per_expert, want, "layer {l}: tokens per expert differ from the hash of the ids");
    }
    let targets = Tensor::from_vec(ids.iter().map(|&i| (i + 1) % 11).collect::<Vec<u32>>(), (2, 8), &CPU).unwrap();
    let loss = (cross_entropy(&out.logits, &targets).unwrap() + &out.aux_loss).unwrap();
    let grads = loss.backward().unwrap();
    for (name, v) in params.named() {
        if name.contains("experts") {
            let used = want[name.split('.').nth(4).unwrap().parse::<usize>().unwrap()] > 0;
            assert_eq!(grads.get(v.as_tensor()).is_some(), used, "{name}: gradient iff its expert got tokens");
        }
    }
}
