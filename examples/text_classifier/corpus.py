"""A deterministic labelled corpus of short news-like sentences in four topics, and the tokenizer.

Sentences are made from templates whose slots are filled from per-topic word lists, plus words
every topic shares, plus an occasional word from another topic, so a classifier has to weigh
evidence rather than look up one keyword.

Tokenization (the handler must do exactly this to match `vocab.json`):

1. `unicodedata.normalize("NFKC", text)`,
2. `.lower()`,
3. tokens are `re.findall(r"[a-z0-9']+", text)`: runs of ASCII letters, digits and
   apostrophes; everything else separates tokens and is dropped (so "café" gives "caf"),
4. a token missing from the vocabulary maps to `<unk>` (id 1); `<pad>` is id 0.

Run `python examples/text_classifier/corpus.py` to print a few sentences per topic.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Mapping

import numpy as np

CLASSES: tuple[str, ...] = ("sports", "weather", "finance", "cooking")
PAD, UNK = "<pad>", "<unk>"
TOKEN_RE = re.compile(r"[a-z0-9']+")

# Per topic: things (nouns), doings (verbs, past tense) and qualities (adjectives).
TOPICS: dict[str, dict[str, tuple[str, ...]]] = {
    "sports": {
        "noun": ("team", "striker", "goalkeeper", "coach", "match", "league", "season",
                 "tournament", "referee", "stadium", "championship", "defender", "fans",
                 "final", "goal", "penalty", "captain", "derby", "cup", "athletes", "race",
                 "sprinter", "marathon", "club", "squad"),
        "verb": ("scored", "defeated", "won", "lost", "equalised", "trained", "tackled",
                 "qualified", "sprinted", "celebrated", "benched", "substituted"),
        "adj": ("unbeaten", "relegated", "injured", "offside", "victorious", "athletic",
                "competitive", "promoted", "fastest"),
    },
    "weather": {
        "noun": ("storm", "rain", "forecast", "temperature", "wind", "snow", "clouds",
                 "humidity", "thunderstorm", "drought", "heatwave", "fog", "hail", "frost",
                 "showers", "sunshine", "hurricane", "breeze", "pressure", "rainfall",
                 "meteorologists", "flood", "gusts", "monsoon", "blizzard"),
        "verb": ("drizzled", "poured", "froze", "flooded", "cooled", "warmed", "cleared",
                 "thawed", "gusted", "swept", "soaked", "evaporated"),
        "adj": ("sunny", "cloudy", "windy", "humid", "chilly", "freezing", "stormy",
                "overcast", "foggy"),
    },
    "finance": {
        "noun": ("market", "shares", "investors", "bank", "inflation", "stocks", "bonds",
                 "earnings", "dividend", "profit", "revenue", "economy", "currency",
                 "interest", "portfolio", "shareholders", "analysts", "budget", "debt",
                 "loan", "index", "traders", "valuation", "merger", "quarter"),
        "verb": ("rallied", "plunged", "invested", "traded", "borrowed", "audited",
                 "merged", "hedged", "rebounded", "slumped", "priced", "refinanced"),
        "adj": ("bullish", "bearish", "volatile", "profitable", "fiscal", "monetary",
                "quarterly", "insolvent", "lucrative"),
    },
    "cooking": {
        "noun": ("recipe", "oven", "garlic", "onions", "sauce", "dough", "chef", "pasta",
                 "butter", "flour", "soup", "kitchen", "spices", "tomatoes", "pan", "bread",
                 "salad", "dessert", "herbs", "broth", "noodles", "cake", "skillet",
                 "vinegar", "dumplings"),
        "verb": ("baked", "simmered", "roasted", "chopped", "whisked", "fried", "seasoned",
                 "grilled", "kneaded", "stirred", "marinated", "sauteed"),
        "adj": ("crispy", "savory", "tender", "spicy", "creamy", "delicious", "fluffy",
                "caramelized", "zesty"),
    },
}

# Words every topic uses; they carry no signal.
SHARED: dict[str, tuple[str, ...]] = {
    "who": ("officials", "the reporter", "a spokesperson", "local residents", "experts",
            "our correspondent", "the committee", "viewers", "critics", "everyone"),
    "when": ("today", "yesterday", "this morning", "on monday", "last week", "overnight",
             "this weekend", "in april", "after lunch", "since 2019"),
    "how": ("again", "suddenly", "quietly", "once more", "at last", "as expected",
            "surprisingly", "slowly", "quickly", "for hours"),
}

TEMPLATES: tuple[str, ...] = (
    "the {adj} {noun} {verb} {how} {when}",
    "{who} said the {noun} {verb} {when}",
    "{when} the {noun} and the {noun2} {verb} {how}",
    "reports say the {adj} {noun} {verb} after the {noun2}",
    "{who} expect a {adj} {noun} {when}",
    "why the {noun} {verb} {how} {when}",
    "{who} watched as the {noun} {verb} near the {noun2}",
    "a {adj} {noun} is what {who} wanted {when}",
    "the {noun2} was {adj} and the {noun} {verb}",
    "{noun} {verb} {how}: {who} react to the {adj} {noun2}",
)


def normalize(text: str) -> str:
    """NFKC then lower case: step 1 and 2 of the tokenization rule."""
    return unicodedata.normalize("NFKC", text).lower()


def tokenize(text: str) -> list[str]:
    """Tokens of `text` by the rule in the module docstring."""
    return TOKEN_RE.findall(normalize(text))


def encode(text: str, vocab: Mapping[str, int]) -> list[int]:
    """Token ids of `text`; unknown tokens become `<unk>`."""
    unk = vocab[UNK]
    return [vocab.get(token, unk) for token in tokenize(text)]


def _sentence(topic: str, rng: np.random.Generator, noise: float) -> str:
    words = TOPICS[topic]

    def pick(kind: str) -> str:
        # Sometimes a word from another topic, so single keywords can mislead.
        source = topic
        if kind in ("noun", "verb", "adj") and rng.random() < noise:
            source = CLASSES[int(rng.integers(len(CLASSES)))]
        options = TOPICS[source][kind] if kind in words else SHARED[kind]
        return str(options[int(rng.integers(len(options)))])

    template = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
    return template.format(noun=pick("noun"), noun2=pick("noun"), verb=pick("verb"),
                           adj=pick("adj"), who=pick("who"), when=pick("when"), how=pick("how"))


def corpus(count: int, seed: int, noise: float = 0.15) -> tuple[list[str], list[int]]:
    """`count` sentences with balanced topic labels."""
    rng = np.random.default_rng(seed)
    labels = [i % len(CLASSES) for i in range(count)]
    rng.shuffle(labels)
    return [_sentence(CLASSES[lab], rng, noise) for lab in labels], labels


def build_vocab(texts: Iterable[str]) -> dict[str, int]:
    """`<pad>` 0, `<unk>` 1, then every token by falling frequency (ties alphabetical)."""
    counts = Counter(token for text in texts for token in tokenize(text))
    ranked = sorted(counts, key=lambda tok: (-counts[tok], tok))
    return {PAD: 0, UNK: 1, **{tok: i + 2 for i, tok in enumerate(ranked)}}


# Hand-written sentences (not from the templates) with their topics; the tests use them.
SAMPLES: tuple[tuple[str, str], ...] = (
    ("The striker scored twice and the team won the cup final.", "sports"),
    ("Heavy rain and strong wind are in the forecast for tonight.", "weather"),
    ("Shares rallied after the bank reported higher quarterly earnings.", "finance"),
    ("Simmer the garlic and tomatoes, then season the sauce with herbs.", "cooking"),
    ("FANS CELEBRATED THE UNBEATEN SEASON!", "sports"),
    ("A chilly fog and frost are expected overnight.", "weather"),
    ("Investors fear inflation will hurt the bond market.", "finance"),
    ("Knead the dough, then bake the bread in a hot oven.", "cooking"),
)


def main() -> None:
    texts, labels = corpus(12, seed=0)
    for text, label in zip(texts, labels, strict=True):
        print(f"{CLASSES[label]:>8}  {text}")


if __name__ == "__main__":
    main()
