//! A [`Tokenizer`] as files next to a Hugging Face model (`tenax ckpt export --format hf`).
//!
//! - gpt2: the GPT-2 tokenizer's own files, `vocab.json` and `merges.txt` (rebuilt from
//!   tiktoken's `r50k_base` ranks, which are GPT-2's ids), with `tokenizer_config.json`
//!   and `special_tokens_map.json`, so `AutoTokenizer.from_pretrained(DIR)` loads it.
//! - bytes and char: transformers has no such tokenizer, so `tenax_tokenizer.json` says how
//!   ids map to text: bytes, id `i` is the byte `i`; char, `id_to_char[i]` is the
//!   character of id `i`.
//!
//! Pure: returns file names and contents; the caller writes them.

use std::collections::HashMap;

use serde_json::json;

use crate::error::DataError;
use crate::tokenizer::{Tokenizer, TokenizerKind, GPT2_VOCAB_SIZE};

/// The GPT-2 end-of-text token `<|endoftext|>`, its id.
pub const GPT2_EOT_ID: u32 = 50256;

/// The files that describe a tokenizer to Hugging Face users.
#[derive(Clone, Debug, PartialEq)]
pub struct HfTokenizerFiles {
    /// (file name, contents), in the order they should be written.
    pub files: Vec<(String, String)>,
    /// The tokenizer's end-of-text id, for `config.json` (gpt2 only).
    pub eos_token_id: Option<u32>,
}

/// The Hugging Face files of `tokenizer`; `model_max_length` is the model's context.
pub fn hf_tokenizer_files(
    tokenizer: &Tokenizer,
    model_max_length: usize,
) -> Result<HfTokenizerFiles, DataError> {
    let spec = tokenizer.spec();
    let described = |what: serde_json::Value| -> HfTokenizerFiles {
        let mut v = json!({
            "tenax_tokenizer": spec,
            "vocab_size": tokenizer.vocab_size(),
            "not_a_transformers_tokenizer": "transformers has no tokenizer of this kind: encode text with tenax (or by this table) and pass the ids to the model",
        });
        v.as_object_mut()
            .expect("object")
            .extend(what.as_object().expect("object").clone());
        HfTokenizerFiles {
            files: vec![(
                "tenax_tokenizer.json".into(),
                serde_json::to_string_pretty(&v).expect("json") + "\n",
            )],
            eos_token_id: None,
        }
    };
    Ok(match tokenizer.kind() {
        TokenizerKind::Bytes => described(json!({
            "encoding": "id i is the byte of value i (0..=255) of the UTF-8 text; decode by joining the bytes and reading them as UTF-8",
        })),
        TokenizerKind::Char => {
            let chars: Vec<String> = spec
                .chars
                .as_deref()
                .unwrap_or_default()
                .chars()
                .map(String::from)
                .collect();
            described(json!({
                "encoding": "id i is the character id_to_char[i]; a text is the concatenation of its ids' characters",
                "id_to_char": chars,
            }))
        }
        TokenizerKind::Gpt2 => {
            let (vocab, merges) = gpt2_vocab_and_merges(tokenizer)?;
            let eot = "<|endoftext|>";
            let config = json!({
                "tokenizer_class": "GPT2Tokenizer",
                "model_max_length": model_max_length,
                "add_prefix_space": false,
                "bos_token": eot,
                "eos_token": eot,
                "unk_token": eot,
            });
            let special = json!({"bos_token": eot, "eos_token": eot, "unk_token": eot});
            HfTokenizerFiles {
                files: vec![
                    ("vocab.json".into(), vocab),
                    ("merges.txt".into(), merges),
                    (
                        "tokenizer_config.json".into(),
                        serde_json::to_string_pretty(&config).expect("json") + "\n",
                    ),
                    (
                        "special_tokens_map.json".into(),
                        serde_json::to_string_pretty(&special).expect("json") + "\n",
                    ),
                ],
                eos_token_id: Some(GPT2_EOT_ID),
            }
        }
    })
}

/// GPT-2's `bytes_to_unicode`: each byte's printable stand-in in `vocab.json` and
/// `merges.txt` (printable Latin-1 bytes stand for themselves, the rest for U+0100...).
fn byte_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let printable = |b: u32| {
        (u32::from('!')..=u32::from('~')).contains(&b)
            || (0xA1..=0xAC).contains(&b)
            || (0xAE..=0xFF).contains(&b)
    };
    let mut n = 0;
    for b in 0..256u32 {
        let c = if printable(b) {
            b
        } else {
            n += 1;
            255 + n
        };
        table[b as usize] = char::from_u32(c).expect("valid char");
    }
    table
}

fn gpt2_error(reason: String) -> DataError {
    DataError::Gpt2 { reason }
}

/// `vocab.json` and `merges.txt` of the GPT-2 tokenizer.
///
/// tiktoken keeps only each token's bytes and rank (= GPT-2 id). A token of rank `r` was
/// made by merging two tokens; which two is found by byte-pair encoding its bytes with the
/// ranks below `r` only, which leaves exactly those two. Merges are listed in rank order.
fn gpt2_vocab_and_merges(tokenizer: &Tokenizer) -> Result<(String, String), DataError> {
    let n = GPT2_VOCAB_SIZE as u32 - 1; // the ordinary tokens; <|endoftext|> is the last id
    let mut bytes: Vec<Vec<u8>> = Vec::with_capacity(n as usize);
    for id in 0..n {
        let b = tokenizer
            .token_bytes(id)
            .ok_or_else(|| gpt2_error(format!("token id {id} has no bytes in the GPT-2 table")))?;
        bytes.push(b);
    }
    let rank: HashMap<&[u8], u32> = bytes
        .iter()
        .enumerate()
        .map(|(i, b)| (b.as_slice(), i as u32))
        .collect();
    let table = byte_to_unicode();
    let show = |b: &[u8]| -> String { b.iter().map(|&x| table[x as usize]).collect() };
    let mut merges = String::from("#version: 0.2\n");
    for (id, token) in bytes.iter().enumerate() {
        if token.len() < 2 {
            continue;
        }
        let parts = bpe_split(token, &rank, id as u32);
        let [a, b] = parts.as_slice() else {
            return Err(gpt2_error(format!(
                "token id {id} does not split into two earlier tokens"
            )));
        };
        merges.push_str(&format!("{} {}\n", show(a), show(b)));
    }
    let mut vocab = serde_json::Map::new();
    for (id, token) in bytes.iter().enumerate() {
        vocab.insert(show(token), json!(id));
    }
    vocab.insert("<|endoftext|>".into(), json!(GPT2_EOT_ID));
    let vocab = serde_json::to_string(&vocab).expect("json");
    Ok((vocab, merges))
}

/// Byte-pair encoding of `piece` with the tokens of rank below `limit`: the parts left
/// when no adjacent pair merges into such a token (lowest rank first).
fn bpe_split<'a>(piece: &'a [u8], rank: &HashMap<&[u8], u32>, limit: u32) -> Vec<&'a [u8]> {
    let mut bounds: Vec<usize> = (0..=piece.len()).collect();
    loop {
        let best = (0..bounds.len().saturating_sub(2))
            .filter_map(|i| {
                let r = *rank.get(&piece[bounds[i]..bounds[i + 2]])?;
                (r < limit).then_some((r, i))
            })
            .min();
        match best {
            Some((_, i)) => {
                bounds.remove(i + 1);
            }
            None => break,
        }
    }
    bounds.windows(2).map(|w| &piece[w[0]..w[1]]).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file<'a>(f: &'a HfTokenizerFiles, name: &str) -> &'a str {
        &f.files.iter().find(|(n, _)| n == name).unwrap().1
    }

    #[test]
    fn gpt2_files_are_gpt2s() {
        let tok = Tokenizer::build(TokenizerKind::Gpt2, "").unwrap();
        let f = hf_tokenizer_files(&tok, 1024).unwrap();
        assert_eq!(f.eos_token_id, Some(50256));
        let vocab: HashMap<String, u32> = serde_json::from_str(file(&f, "vocab.json")).unwrap();
        assert_eq!(vocab.len(), 50257);
        assert_eq!(vocab["!"], 0);
        assert_eq!(vocab["Ġt"], 256);
        assert_eq!(vocab["Ġthe"], 262);
        assert_eq!(vocab["<|endoftext|>"], 50256);
        let merges = file(&f, "merges.txt");
        let lines: Vec<&str> = merges.lines().collect();
        assert_eq!(lines.len(), 1 + 50000);
        // The start of GPT-2's merges.txt.
        assert_eq!(
            &lines[..8],
            [
                "#version: 0.2",
                "Ġ t",
                "Ġ a",
                "h e",
                "i n",
                "r e",
                "o n",
                "Ġt he"
            ]
        );
        // Applying the merges by rank to pre-tokenized words gives tiktoken's ids.
        let merge_rank: HashMap<(String, String), usize> = lines[1..]
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let (a, b) = l.split_once(' ').unwrap();
                ((a.to_string(), b.to_string()), i)
            })
            .collect();
        let table = byte_to_unicode();
        for word in [
            " hello", " world", "Hello", " tenax", " println", "!\n", " é€",
        ] {
            let mut parts: Vec<String> = word
                .bytes()
                .map(|b| table[b as usize].to_string())
                .collect();
            while let Some((_, i)) = (0..parts.len().saturating_sub(1))
                .filter_map(|i| {
                    merge_rank
                        .get(&(parts[i].clone(), parts[i + 1].clone()))
                        .map(|r| (*r, i))
                })
                .min()
            {
                let b = parts.remove(i + 1);
                parts[i].push_str(&b);
            }
            let ids: Vec<u32> = parts.iter().map(|p| vocab[p]).collect();
            assert_eq!(ids, tok.encode(word).unwrap(), "{word:?}");
        }
    }

    #[test]
    fn bytes_and_char_are_described() {
        let bytes = Tokenizer::build(TokenizerKind::Bytes, "").unwrap();
        let f = hf_tokenizer_files(&bytes, 64).unwrap();
        assert_eq!(f.eos_token_id, None);
        let v: serde_json::Value = serde_json::from_str(file(&f, "tenax_tokenizer.json")).unwrap();
        assert_eq!(v["tenax_tokenizer"]["kind"], "bytes");
        assert_eq!(v["vocab_size"], 256);
        let chars = Tokenizer::build(TokenizerKind::Char, "ba\n").unwrap();
        let f = hf_tokenizer_files(&chars, 64).unwrap();
        let v: serde_json::Value = serde_json::from_str(file(&f, "tenax_tokenizer.json")).unwrap();
        assert_eq!(v["id_to_char"], json!(["\n", "a", "b"]));
        assert_eq!(v["vocab_size"], 3);
    }

    #[test]
    fn byte_table_is_gpt2s() {
        let t = byte_to_unicode();
        assert_eq!(t[b'!' as usize], '!');
        assert_eq!(t[b' ' as usize], 'Ġ');
        assert_eq!(t[b'\n' as usize], 'Ċ');
        assert_eq!(t[0], 'Ā');
        let mut all: Vec<char> = t.to_vec();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 256);
    }
}
