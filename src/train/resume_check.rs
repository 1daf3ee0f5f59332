//! Which config changes a resume refuses: those that make the checkpoint's weights, optimizer
//! state or tokenizer belong to another model. Everything else (steps, learning rate, intervals,
//! temperatures, loss coefficients, ...) may change with `--set` on resume.

use crate::config::{Config, TokenizerType};

/// The first key whose value differs between the checkpoint's config `old` and the resumed `new`
/// among those a resume may not change, as "KEY = NEW (the checkpoint has OLD): WHY".
pub fn refused_change(old: &Config, new: &Config) -> Option<String> {
    let (a, b) = (&old.model, &new.model);
    let bpe = old.data.tokenizer == TokenizerType::Bpe || new.data.tokenizer == TokenizerType::Bpe;
    // (key, the checkpoint's value, the resumed value, why it may not change)
    let mut fixed: Vec<(&str, String, String, &str)> = Vec::new();
    let mut rule = |key, was: &dyn std::fmt::Debug, now: &dyn std::fmt::Debug, why| {
        fixed.push((key, format!("{was:?}"), format!("{now:?}"), why));
    };
    rule(
        "model.vocab_size",
        &a.vocab_size,
        &b.vocab_size,
        "the token embedding and the output layer have one row per token",
    );
    rule(
        "model.block_size",
        &a.block_size,
        &b.block_size,
        "it is the context length the model was built and trained for (the learned position table has \
         one row per position)",
    );
    rule("model.n_layer", &a.n_layer, &b.n_layer, "each block has its own weights in the checkpoint");
    rule(
        "model.n_head",
        &a.n_head,
        &b.n_head,
        "the attention weights were trained for this split of n_embd into heads",
    );
    rule("model.n_embd", &a.n_embd, &b.n_embd, "it is the width of every weight matrix");
    rule("model.bias", &a.bias, &b.bias, "it decides whether the Linear layers and norms have bias parameters");
    rule(
        "model.positions",
        &a.positions,
        &b.positions,
        "learned positions are a parameter table, rotary ones have none",
    );
    rule("model.norm", &a.norm, &b.norm, "LayerNorm and RMSNorm have different parameters");
    rule("model.moe_every", &a.moe_every, &b.moe_every, "it decides which blocks hold experts and which a dense MLP");
    rule(
        "model.moe.num_experts",
        &a.moe.num_experts,
        &b.moe.num_experts,
        "each expert has its own weights, and the router one output per expert",
    );
    rule(
        "model.moe.expert_hidden",
        &a.moe.expert_hidden,
        &b.moe.expert_hidden,
        "it is the hidden width of every expert",
    );
    rule("model.moe.activation", &a.moe.activation, &b.moe.activation, "gelu and swiglu experts have other weights");
    rule(
        "model.router.kind",
        &a.router.kind,
        &b.router.kind,
        "the checkpoint's router weights and optimizer state were trained by that router kind, and each \
         kind has its own parameters and training rule; to train another router, start a new run with \
         --config",
    );
    rule(
        "model.router.input",
        &a.router.input,
        &b.router.input,
        "a hidden-state router has an (n_embd, E) weight, a token router a (vocab, E) table",
    );
    rule("data.tokenizer", &old.data.tokenizer, &new.data.tokenizer, "a resume keeps the checkpoint's tokenizer");
    if bpe {
        rule(
            "data.bpe_vocab_size",
            &old.data.bpe_vocab_size,
            &new.data.bpe_vocab_size,
            "a resume keeps the checkpoint's BPE tokenizer and its vocabulary",
        );
    }
    fixed
        .into_iter()
        .find(|(_, was, now, _)| was != now)
        .map(|(key, was, now, why)| format!("{key} = {now} (the checkpoint has {was}): {why}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RouterKind;

    #[test]
    fn names_the_key_and_the_reason() {
        let old = Config::default();
        assert_eq!(refused_change(&old, &old.clone()), None);
        let mut new = old.clone();
        new.train.max_iters += 1;
        new.model.router.tau_min = 0.1;
        assert_eq!(refused_change(&old, &new), None, "steps and temperatures may change");
        new.model.router.kind = RouterKind::SoftmaxTopk;
        let m = refused_change(&old, &new).unwrap();
        assert!(m.starts_with("model.router.kind = \"softmax_topk\" (the checkpoint has \"gumbel\")"), "{m}");
        assert!(m.contains("router kind") && !m.contains("shape"), "{m}");
        let mut new = old.clone();
        new.data.bpe_vocab_size = 300;
        assert_eq!(refused_change(&old, &new), None, "a char tokenizer has no BPE vocabulary");
        new.data.tokenizer = TokenizerType::Bpe;
        assert!(refused_change(&old, &new).unwrap().starts_with("data.tokenizer"));
    }
}
