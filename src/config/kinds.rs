//! The config keys that take one of a few names (router kind, norm, device, ...): one enum each.
//! Each reads and writes exactly its config string (TOML, checkpoint JSON, `--set`), prints it
//! with `Display` (quoted with `Debug`), and refuses an unknown string naming the key and the
//! known values.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::str::FromStr;

/// Why `kind = "expert_choice"` is refused.
pub const EXPERT_CHOICE_REFUSAL: &str = "model.router.kind = \"expert_choice\" is not supported: \
expert-choice routing (Zhou et al. 2022) lets each expert pick its top tokens across the whole \
sequence, so a token's routing depends on future tokens; this model is a causal LM (training and \
generation must not look ahead), so expert choice would leak the future. Use a token-choice router \
(e.g. \"sigmoid_bias\" for balanced loads without an auxiliary loss)";

/// A config string that is not one of its key's values; the message names the key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadValue(pub String);

impl fmt::Display for BadValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BadValue {}

fn unknown(key: &str, value: &str, known: &[&str]) -> BadValue {
    BadValue(format!("{key}: unknown value `{value}` (known: {})", known.join(", ")))
}

/// Serde, `Display` and `Debug` through the config string (`as_str`/`to_string` and `FromStr`).
macro_rules! as_config_string {
    ($name:ident) => {
        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:?}", self.to_string())
            }
        }
    };
}

/// A closed set of names for config key `$key`: the enum, `ALL`, `KNOWN`, `as_str`, `FromStr`,
/// `Display`, serde. `refuse` names a function that turns some strings into their own error.
macro_rules! config_enum {
    (
        $(#[$meta:meta])* $name:ident = $key:literal $(, refuse $refuse:path)? {
            $($(#[$vmeta:meta])* $var:ident = $s:literal,)+
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vmeta])* $var,)+
        }

        impl $name {
            /// The config key that takes these values.
            pub const KEY: &'static str = $key;
            /// Every value, in the order `KNOWN` lists them.
            pub const ALL: &'static [$name] = &[$($name::$var,)+];
            /// The config strings.
            pub const KNOWN: &'static [&'static str] = &[$($s,)+];

            /// The config string.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $($name::$var => $s,)+
                }
            }
        }

        impl FromStr for $name {
            type Err = BadValue;

            fn from_str(s: &str) -> Result<Self, BadValue> {
                $(if let Some(e) = $refuse(s) {
                    return Err(e);
                })?
                match s {
                    $($s => Ok($name::$var),)+
                    _ => Err(unknown($key, s, Self::KNOWN)),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        as_config_string!($name);
    };
}

fn refuse_expert_choice(s: &str) -> Option<BadValue> {
    (s == "expert_choice").then(|| BadValue(EXPERT_CHOICE_REFUSAL.to_string()))
}

config_enum! {
    /// `model.router.kind`: the routers of src/moe/routers. "expert_choice" is refused: it looks
    /// at future tokens (not causal).
    RouterKind = "model.router.kind", refuse refuse_expert_choice {
        Gumbel = "gumbel",
        SoftmaxTopk = "softmax_topk",
        Dense = "dense",
        NoisyTopk = "noisy_topk",
        SigmoidBias = "sigmoid_bias",
        Hash = "hash",
        Reinforce = "reinforce",
    }
}

config_enum! {
    /// `model.router.impl`: how the router and the MoE layer's dispatch and balance loss run.
    RouterImpl = "model.router.impl" {
        /// Custom ops with CPU/CUDA/Metal kernels (src/ops).
        Fused = "fused",
        /// Plain tensor ops, the twin the tests compare against.
        Reference = "reference",
    }
}

config_enum! {
    /// `model.router.eval_mode`: the Gumbel (and REINFORCE) router at eval and generation.
    EvalMode = "model.router.eval_mode" {
        /// No noise: the most probable experts.
        Argmax = "argmax",
        /// Noise, as in training.
        Sample = "sample",
    }
}

config_enum! {
    /// `model.router.input`: what a learned router's logits are computed from.
    RouterInput = "model.router.input" {
        /// The hidden state, x W.
        Hidden = "hidden",
        /// A learned (V, E) table looked up by the input token ids.
        Token = "token",
    }
}

config_enum! {
    /// `model.norm`.
    NormKind = "model.norm" {
        /// LayerNorm.
        Layer = "layer",
        /// RMSNorm.
        Rms = "rms",
    }
}

config_enum! {
    /// `model.moe.activation`: the experts' (and dense MLPs') nonlinearity.
    Activation = "model.moe.activation" {
        /// GPT-2's MLP.
        Gelu = "gelu",
        Swiglu = "swiglu",
    }
}

config_enum! {
    /// `model.positions`.
    Positions = "model.positions" {
        /// nanoGPT's absolute position table.
        Learned = "learned",
        /// RoPE on q and k.
        Rotary = "rotary",
    }
}

config_enum! {
    /// `data.tokenizer`.
    TokenizerType = "data.tokenizer" {
        /// One token per distinct character.
        Char = "char",
        /// Byte-level BPE trained on the training split.
        Bpe = "bpe",
    }
}

/// `train.device`: "cpu", "cuda", "cuda:N" or "metal".
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeviceKind {
    Cpu,
    /// "cuda" (None, GPU 0) or "cuda:N".
    Cuda(Option<usize>),
    Metal,
}

impl DeviceKind {
    pub const KEY: &'static str = "train.device";
    pub const KNOWN: &'static [&'static str] = &["cpu", "cuda", "cuda:N", "metal"];
}

impl FromStr for DeviceKind {
    type Err = BadValue;

    fn from_str(s: &str) -> Result<Self, BadValue> {
        Ok(match s {
            "cpu" => DeviceKind::Cpu,
            "cuda" => DeviceKind::Cuda(None),
            "metal" => DeviceKind::Metal,
            _ => match s.strip_prefix("cuda:").map(str::parse) {
                Some(Ok(n)) => DeviceKind::Cuda(Some(n)),
                _ => return Err(unknown(Self::KEY, s, Self::KNOWN)),
            },
        })
    }
}

impl fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceKind::Cpu => f.write_str("cpu"),
            DeviceKind::Cuda(None) => f.write_str("cuda"),
            DeviceKind::Cuda(Some(n)) => write!(f, "cuda:{n}"),
            DeviceKind::Metal => f.write_str("metal"),
        }
    }
}

as_config_string!(DeviceKind);
