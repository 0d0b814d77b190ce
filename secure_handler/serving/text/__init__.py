"""Text: normalisation, tokenizers, length-aware batching and the text classifier."""
