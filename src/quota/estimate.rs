//! Token estimates: the prompt of a request before it is forwarded (from the provider-neutral
//! [`RequestFacts`] the provider layer reads), and the fallback count of text seen in a
//! response when the upstream never reported usage. Estimates are only used for admission and for responses whose real usage is
//! unknown; accounting otherwise uses the upstream's own numbers.
//!
//! Two prompt estimates exist. [`RequestFacts::prompt_bound`] is free: the prompt's length in
//! bytes, a true upper bound of its token count (every token of a byte-level BPE covers at least
//! one byte). [`prompt_tokens`] runs the tokenizer. Admission reserves the bound
//! while a user is far from the limit and tokenizes only near it, so a busy gateway whose users
//! have room never tokenizes a prompt, and never loads the tokenizer's ≈45 MB vocabulary.

use std::sync::OnceLock;

use tiktoken_rs::CoreBPE;

use crate::providers::RequestFacts;

/// Text longer than this is not tokenized whole: three samples of [`SAMPLE_BYTES`] (start,
/// middle, end) are, and the count is extrapolated. The estimate stays close while a
/// multi-megabyte prompt cannot hold up the request path (tokenizing runs on the async worker).
const EXACT_COUNT_BYTES: usize = 128 * 1024;
const SAMPLE_BYTES: usize = 32 * 1024;

/// Text up to this size is tokenized on the async worker once the tokenizer is loaded (a few
/// microseconds); larger text, and the first use (loading takes a few hundred milliseconds),
/// go to the blocking pool in [`count_tokens_async`].
const INLINE_COUNT_BYTES: usize = 16 * 1024;

static BPE: OnceLock<Option<CoreBPE>> = OnceLock::new();

/// The thread that loaded the tokenizer.
static LOADED_ON: OnceLock<std::thread::ThreadId> = OnceLock::new();

/// The tokenizer, loaded on first use. `o200k_base` is the vocabulary of current OpenAI models;
/// for Claude it is a close enough estimate (Anthropic publishes no local tokenizer).
fn bpe() -> Option<&'static CoreBPE> {
    BPE.get_or_init(|| {
        let _ = LOADED_ON.set(std::thread::current().id());
        let b = tiktoken_rs::o200k_base();
        match b {
            Ok(b) => {
                tracing::info!("tokenizer loaded (a user came near a token quota, or a response had no usage)");
                Some(b)
            }
            Err(e) => {
                tracing::error!(error = %e, "tokenizer failed to load; estimating 4 bytes per token");
                None
            }
        }
    })
    .as_ref()
}

/// Whether the tokenizer has been loaded (for tests and the benchmark's memory notes).
pub fn tokenizer_loaded() -> bool {
    BPE.get().is_some()
}

/// The thread that loaded the tokenizer, once it started loading (for tests: never a server
/// worker, see `quota::Ticket`).
pub fn loaded_on() -> Option<std::thread::ThreadId> {
    LOADED_ON.get().copied()
}

/// [`count_tokens`] without holding up an async worker: text that is large, or a first count
/// that has to load the tokenizer, is counted on the blocking pool.
pub async fn count_tokens_async(text: String) -> u64 {
    if tokenizer_loaded() && text.len() <= INLINE_COUNT_BYTES {
        return count_tokens(&text);
    }
    let bound = text.len() as u64;
    match tokio::task::spawn_blocking(move || count_tokens(&text)).await {
        Ok(n) => n,
        // The runtime is shutting down: the upper bound is a safe answer.
        Err(_) => bound,
    }
}

/// Estimated tokens of `text`.
pub fn count_tokens(text: &str) -> u64 {
    if text.is_empty() {
        return 0;
    }
    let Some(bpe) = bpe() else {
        return (text.len() as u64).div_ceil(4);
    };
    if text.len() <= EXACT_COUNT_BYTES {
        return bpe.count_ordinary(text) as u64;
    }
    let len = text.len();
    let mut sampled_bytes = 0u64;
    let mut sampled_tokens = 0u64;
    for start in [0, len / 2 - SAMPLE_BYTES / 2, len - SAMPLE_BYTES] {
        let sample = char_slice(text, start, start + SAMPLE_BYTES);
        sampled_bytes += sample.len() as u64;
        sampled_tokens += bpe.count_ordinary(sample) as u64;
    }
    sampled_tokens.saturating_mul(len as u64) / sampled_bytes.max(1)
}

/// `text[start..end]`, with both ends moved back to character boundaries.
fn char_slice(text: &str, mut start: usize, mut end: usize) -> &str {
    while !text.is_char_boundary(start) {
        start -= 1;
    }
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[start..end]
}

/// The prompt's tokens of a request, counted with the tokenizer (loads it on first use).
pub fn prompt_tokens(facts: &RequestFacts) -> u64 {
    count_tokens(&facts.prompt_text).saturating_add(facts.prompt_fixed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_text_with_the_tokenizer() {
        assert_eq!(count_tokens(""), 0);
        assert_eq!(count_tokens("hello world"), 2);
        let long = "word ".repeat(300_000);
        let n = count_tokens(&long);
        assert!(
            (250_000..=350_000).contains(&n),
            "extrapolated count {n} is close"
        );
        // Multi-byte characters at the sample edges are fine.
        let wide = "héllo wörld ünïcode ".repeat(20_000);
        let exact = bpe().expect("tokenizer").count_ordinary(&wide) as u64;
        let n = count_tokens(&wide);
        assert!(n.abs_diff(exact) * 10 < exact, "{n} vs exact {exact}");
    }

    #[test]
    fn the_byte_bound_is_never_below_the_token_count() {
        for text in [
            "hello world",
            "  spaces   and\ttabs\n\n",
            "héllo wörld ünïcode 日本語のテキスト 🎉🎉🎉",
            "a",
            "1234567890 0987654321",
            "{\"type\":\"function\",\"name\":\"f\"}",
        ] {
            assert!(count_tokens(text) <= text.len() as u64, "{text}");
        }
    }
}
