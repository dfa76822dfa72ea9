//! The flat parameter layout (names, shapes, offsets) and nanoGPT initialisation.
//!
//! Every parameter of the model lives in one flat `f32` vector, parameters in sorted-name
//! order, each in row-major order. Optimiser state, gradients, checkpoints and collective
//! all-reduces all use this same order.

use tenax_core::rng::SplitMix64;

use tenax_core::pipeline::StageLayers;

use crate::config::GptConfig;

/// One parameter in the flat vector.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamEntry {
    /// nanoGPT-style name, e.g. `h.01.attn.c_attn.weight`.
    pub name: String,
    /// Shape; weights of linear layers are stored `(in, out)`.
    pub shape: Vec<usize>,
    /// Index of the first element in the flat vector.
    pub offset: usize,
    /// Number of elements (product of `shape`).
    pub len: usize,
    /// Whether AdamW applies weight decay: true for 2-D weights (embeddings included),
    /// false for biases and LayerNorm parameters.
    pub decay: bool,
}

impl ParamEntry {
    /// The element range of this parameter in the flat vector.
    pub fn range(&self) -> std::ops::Range<usize> {
        self.offset..self.offset + self.len
    }
}

/// All parameters of a config, sorted by name, with their place in the flat vector.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamLayout {
    /// The parameters, sorted by name; offsets increase in this order.
    pub entries: Vec<ParamEntry>,
    /// Total number of scalars (length of the flat vector).
    pub total: usize,
}

/// Name prefix of block `i`: `h.{i}` zero-padded (at least two digits) so that sorted
/// order is numeric order.
pub(crate) fn block_prefix(config: &GptConfig, i: usize) -> String {
    let width = config.n_layer.saturating_sub(1).to_string().len().max(2);
    format!("h.{i:0width$}")
}

impl ParamLayout {
    /// The layout of every parameter of `c`.
    pub fn for_config(c: &GptConfig) -> Self {
        let e = c.n_embd;
        let mut shapes: Vec<(String, Vec<usize>)> = vec![
            ("wte.weight".into(), vec![c.vocab_size, e]),
            ("wpe.weight".into(), vec![c.block_size, e]),
            ("ln_f.weight".into(), vec![e]),
            ("ln_f.bias".into(), vec![e]),
        ];
        for i in 0..c.n_layer {
            let p = block_prefix(c, i);
            shapes.extend([
                (format!("{p}.ln_1.weight"), vec![e]),
                (format!("{p}.ln_1.bias"), vec![e]),
                (format!("{p}.attn.c_attn.weight"), vec![e, 3 * e]),
                (format!("{p}.attn.c_attn.bias"), vec![3 * e]),
                (format!("{p}.attn.c_proj.weight"), vec![e, e]),
                (format!("{p}.attn.c_proj.bias"), vec![e]),
                (format!("{p}.ln_2.weight"), vec![e]),
                (format!("{p}.ln_2.bias"), vec![e]),
                (format!("{p}.mlp.c_fc.weight"), vec![e, 4 * e]),
                (format!("{p}.mlp.c_fc.bias"), vec![4 * e]),
                (format!("{p}.mlp.c_proj.weight"), vec![4 * e, e]),
                (format!("{p}.mlp.c_proj.bias"), vec![e]),
            ]);
        }
        shapes.sort_by(|a, b| a.0.cmp(&b.0));
        let mut offset = 0;
        let entries = shapes
            .into_iter()
            .map(|(name, shape)| {
                let len = shape.iter().product();
                let entry = ParamEntry {
                    decay: shape.len() == 2,
                    name,
                    shape,
                    offset,
                    len,
                };
                offset += len;
                entry
            })
            .collect();
        Self {
            entries,
            total: offset,
        }
    }

    /// The layout of one pipeline stage's parameters: the entries of the whole model's
    /// layout that the stage holds (its blocks; the token and position embeddings on the
    /// first stage; the final layer norm and the head's weight, the token embedding it is
    /// tied to, on the last), in the same sorted-name order, packed from offset 0.
    pub fn for_stage(c: &GptConfig, stage: &StageLayers) -> Self {
        let whole = Self::for_config(c);
        let blocks: Vec<String> = (stage.blocks.start..stage.blocks.end)
            .map(|i| format!("{}.", block_prefix(c, i as usize)))
            .collect();
        let holds = |name: &str| {
            blocks.iter().any(|b| name.starts_with(b.as_str()))
                || (stage.embeddings && (name == "wte.weight" || name == "wpe.weight"))
                || (stage.head && (name == "wte.weight" || name.starts_with("ln_f.")))
        };
        let mut offset = 0;
        let entries: Vec<ParamEntry> = whole
            .entries
            .into_iter()
            .filter(|e| holds(&e.name))
            .map(|mut e| {
                e.offset = offset;
                offset += e.len;
                e
            })
            .collect();
        Self {
            entries,
            total: offset,
        }
    }

    /// The entry called `name`, if any.
    pub fn get(&self, name: &str) -> Option<&ParamEntry> {
        self.index_of(name).map(|i| &self.entries[i])
    }

    /// Position of `name` in `entries` (binary search: entries are sorted).
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.entries
            .binary_search_by(|e| e.name.as_str().cmp(name))
            .ok()
    }
}

/// How one parameter is initialised.
enum Init {
    Normal(f64),
    Const(f32),
}

fn init_for(config: &GptConfig, name: &str) -> Init {
    if name.ends_with(".bias") {
        Init::Const(0.0)
    } else if name.starts_with("ln_f.") || name.contains(".ln_") {
        Init::Const(1.0)
    } else if name.ends_with("c_proj.weight") {
        Init::Normal(0.02 / (2.0 * config.n_layer as f64).sqrt())
    } else {
        Init::Normal(0.02)
    }
}

/// nanoGPT initialisation, flat in layout order.
///
/// Linear and embedding weights are normal(0, 0.02); the residual projections
/// (`attn.c_proj.weight`, `mlp.c_proj.weight`) normal(0, 0.02/sqrt(2 * n_layer)); biases
/// 0; LayerNorm weights 1 and biases 0. All normal draws come from one
/// `SplitMix64::derive(seed, "init")` stream, parameters visited in layout (sorted-name)
/// order and elements in row-major order; constant parameters draw nothing.
pub fn init_params(config: &GptConfig, layout: &ParamLayout, seed: u64) -> Vec<f32> {
    let mut rng = SplitMix64::derive(seed, "init");
    let mut flat = vec![0f32; layout.total];
    for entry in &layout.entries {
        let dst = &mut flat[entry.range()];
        match init_for(config, &entry.name) {
            Init::Const(c) => dst.fill(c),
            Init::Normal(std) => {
                for x in dst.iter_mut() {
                    *x = (rng.next_normal() * std) as f32;
                }
            }
        }
    }
    flat
}

#[cfg(test)]
mod tests {
    use super::*;

    fn std_of(xs: &[f32]) -> f64 {
        let n = xs.len() as f64;
        let mean = xs.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
        (xs.iter()
            .map(|&x| (f64::from(x) - mean).powi(2))
            .sum::<f64>()
            / n)
            .sqrt()
    }

    #[test]
    fn layout_is_sorted_contiguous_and_counts_match() {
        for preset in GptConfig::PRESETS {
            let c = GptConfig::preset(preset, 50257).unwrap();
            let l = ParamLayout::for_config(&c);
            assert_eq!(l.total, c.num_params(), "{preset}");
            let mut off = 0;
            for w in l.entries.windows(2) {
                assert!(w[0].name < w[1].name);
            }
            for e in &l.entries {
                assert_eq!(e.offset, off);
                assert_eq!(e.len, e.shape.iter().product::<usize>());
                assert_eq!(e.decay, e.shape.len() == 2, "{}", e.name);
                off += e.len;
            }
            assert_eq!(off, l.total);
            assert_eq!(l.entries.len(), 4 + 12 * c.n_layer);
        }
        // nanoGPT's GPT-2 124M, position embeddings included.
        assert_eq!(
            GptConfig::preset("gpt2-small", 50257).unwrap().num_params(),
            124_439_808
        );
    }

    #[test]
    fn block_names_sort_numerically() {
        let c = GptConfig {
            vocab_size: 3,
            n_layer: 12,
            n_head: 1,
            n_embd: 2,
            block_size: 2,
        };
        let l = ParamLayout::for_config(&c);
        let blocks: Vec<&str> = l
            .entries
            .iter()
            .filter(|e| e.name.ends_with("ln_1.weight"))
            .map(|e| e.name.as_str())
            .collect();
        assert_eq!(blocks.first(), Some(&"h.00.ln_1.weight"));
        assert_eq!(blocks.last(), Some(&"h.11.ln_1.weight"));
        assert_eq!(blocks[2], "h.02.ln_1.weight");
        assert!(l.get("h.11.mlp.c_fc.weight").is_some());
        assert_eq!(l.get("h.03.mlp.c_fc.weight").unwrap().shape, vec![2, 8]);
        assert!(l.get("h.12.mlp.c_fc.weight").is_none());
        assert!(l.get("lm_head.weight").is_none());
    }

    #[test]
    fn init_is_deterministic_and_seed_dependent() {
        let c = GptConfig::preset("tiny", 50).unwrap();
        let l = ParamLayout::for_config(&c);
        let a = init_params(&c, &l, 7);
        let b = init_params(&c, &l, 7);
        let other = init_params(&c, &l, 8);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&a), bits(&b));
        assert_ne!(bits(&a), bits(&other));
    }

    #[test]
    fn init_statistics_follow_nanogpt() {
        let c = GptConfig::preset("nano", 512).unwrap();
        let l = ParamLayout::for_config(&c);
        let p = init_params(&c, &l, 1);
        let wte = &p[l.get("wte.weight").unwrap().range()];
        assert!(
            (std_of(wte) - 0.02).abs() < 0.0005,
            "wte std {}",
            std_of(wte)
        );
        let proj_std = 0.02 / (2.0 * c.n_layer as f64).sqrt();
        for name in ["h.00.attn.c_proj.weight", "h.03.mlp.c_proj.weight"] {
            let s = std_of(&p[l.get(name).unwrap().range()]);
            assert!(
                (s - proj_std).abs() < 0.05 * proj_std,
                "{name} std {s}, want {proj_std}"
            );
        }
        let fc = std_of(&p[l.get("h.01.mlp.c_fc.weight").unwrap().range()]);
        assert!((fc - 0.02).abs() < 0.0005, "c_fc std {fc}");
        for e in &l.entries {
            let v = &p[e.range()];
            if e.name.ends_with(".bias") {
                assert!(v.iter().all(|&x| x == 0.0), "{}", e.name);
            } else if e.shape.len() == 1 {
                assert!(v.iter().all(|&x| x == 1.0), "{}", e.name);
            }
        }
    }
}
