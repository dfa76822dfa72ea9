//! `tenax ckpt export --format hf --out DIR`: a checkpoint as a directory that Hugging Face
//! transformers' `GPT2LMHeadModel.from_pretrained(DIR)` loads as it is.
//!
//! The mapping itself is pure and lives in `tenax_model::hf` (config.json fields, tensor
//! names) and `tenax_data::hf` (tokenizer files); this shell reads the checkpoint and
//! writes the files.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use tenax_model::hf::{to_hf, Gpt2Config};
use tenax_model::ParamLayout;
use tenax_storage::{LoadedCheckpoint, TensorData};

use super::{human, model_of, write_atomic};

/// The model config keys GPT-2 can express; a checkpoint whose model names another key
/// was written by a tenax whose architecture transformers' GPT-2 may not match.
const GPT2_MODEL_KEYS: &[&str] = &["vocab_size", "n_layer", "n_head", "n_embd", "block_size"];

/// The keys of a checkpoint's model config that GPT-2 cannot express, sorted.
fn inexpressible_keys(model: &serde_json::Value) -> Vec<&str> {
    let keys: BTreeSet<&str> = model
        .as_object()
        .map(|o| o.keys().map(String::as_str).collect())
        .unwrap_or_default();
    keys.into_iter()
        .filter(|k| !GPT2_MODEL_KEYS.contains(k))
        .collect()
}

/// Writes `out/config.json`, `out/model.safetensors` and the tokenizer's files for
/// `loaded` (whose model weights are `weights`).
pub(super) fn export(loaded: &LoadedCheckpoint, weights: &[TensorData], out: &Path) -> Result<()> {
    let model = loaded.manifest.config.get("model").ok_or_else(|| {
        anyhow!(
            "checkpoint {}: its manifest names no model config: it was not written by this version of tenax",
            loaded.url
        )
    })?;
    let unknown = inexpressible_keys(model);
    if !unknown.is_empty() {
        bail!(
            "checkpoint {}: its model has {} that transformers' GPT-2 cannot express: export --format safetensors instead",
            loaded.url,
            unknown.join(", ")
        );
    }
    let (stored, flat) = model_of(loaded)?;
    let layout = ParamLayout::for_config(&stored.model);
    let tokenizer = tenax_data::Tokenizer::from_spec(&stored.tokenizer)
        .map_err(|e| anyhow!("checkpoint {}: {e}", loaded.url))?;
    let tok_files = tenax_data::hf::hf_tokenizer_files(&tokenizer, stored.model.block_size)
        .map_err(|e| anyhow!("checkpoint {}: {e}", loaded.url))?;
    let config = Gpt2Config::of(&stored.model, tok_files.eos_token_id);
    let tensors: Vec<TensorData> = to_hf(&layout, &flat)
        .map_err(|e| anyhow!("checkpoint {}: {e}", loaded.url))?
        .into_iter()
        .map(|t| TensorData {
            name: t.name,
            shape: t.shape,
            data: t.data,
        })
        .collect();
    // transformers refuses a safetensors file whose metadata lacks format = pt.
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let bytes = tenax_storage::shard::encode_shard_with_metadata(&tensors, Some(metadata))
        .map_err(|e| anyhow!("checkpoint {}: cannot encode the weights: {e}", loaded.url))?;
    if out.is_file() {
        bail!(
            "--out {}: is a file; --format hf writes a directory: name a new or existing directory",
            out.display()
        );
    }
    std::fs::create_dir_all(out)
        .with_context(|| format!("--out {}: cannot create the directory", out.display()))?;
    let config_json = serde_json::to_string_pretty(&config).expect("config serialises") + "\n";
    write_atomic(&out.join("config.json"), config_json.as_bytes())?;
    write_atomic(&out.join("model.safetensors"), &bytes)?;
    for (name, contents) in &tok_files.files {
        write_atomic(&out.join(name), contents.as_bytes())?;
    }
    let names: Vec<&str> = tok_files.files.iter().map(|(n, _)| n.as_str()).collect();
    println!(
        "exported step {} of {} -> {} (Hugging Face GPT-2: config.json, model.safetensors {} in {} tensors, {}; tokenizer {}: {})",
        loaded.manifest.step,
        loaded.url,
        out.display(),
        human(bytes.len() as u64),
        tensors.len(),
        weights.iter().map(|t| t.data.len()).sum::<usize>().to_string() + " parameters",
        stored.tokenizer.kind.name(),
        names.join(", ")
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_model_gpt2_cannot_express_is_named() {
        let plain = serde_json::json!({"vocab_size": 256, "n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 64});
        assert!(inexpressible_keys(&plain).is_empty());
        let mut other = plain.clone();
        other["rope_theta"] = serde_json::json!(10000.0);
        other["norm"] = serde_json::json!("rms");
        assert_eq!(inexpressible_keys(&other), ["norm", "rope_theta"]);
    }
}
