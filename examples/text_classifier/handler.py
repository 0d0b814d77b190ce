"""TorchServe handler of the topic text classifier example (archive this file as is)."""

from secure_handler import SecureTextClassifier


class TopicTextHandler(SecureTextClassifier):
    """Names the topic of a sentence: sports, weather, finance or cooking.

    The word-level tokenizer (NFKC, lower case, tokens `[a-z0-9']+`, `<unk>` for unknown
    words) reads vocab.json, which build_model.py writes next to model.pt. Limits and the
    model input (`ids_mask`) come from the `handler:` section of model-config.yaml.
    """
