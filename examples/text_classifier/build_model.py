"""Train a small topic classifier on a generated corpus and save it as TorchScript.

    python examples/text_classifier/build_model.py --out build/text_classifier \
        [--contract ids_mask|bag] [--quick]

Writes `model.pt` and `vocab.json` (token -> id, `<pad>` 0, `<unk>` 1). Tokenization is the
rule in `corpus.py`: NFKC, lower case, tokens `[a-z0-9']+`, unknown tokens → `<unk>`.

Model contracts, chosen with `--contract` and named as the handler's `model_input` (the
weights are the same):

* `ids_mask` (default): `forward(input_ids: Tensor[B, T] int64, attention_mask: Tensor[B, T]
  int64) -> logits [B, 4]`. Padding positions have mask 0 (their ids are ignored).
* `bag` (EmbeddingBag style): `forward(ids: Tensor[N] int64, offsets: Tensor[B] int64)
  -> logits [B, 4]`, ids of all rows concatenated and `offsets[i]` where row i starts.

The model is an embedding, a masked mean over the tokens, one hidden layer and a linear head.
A row with no tokens gets the mean of nothing (zeros) and still yields logits.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from secure_handler.serving.loading import save_torchscript

sys.path.insert(0, str(Path(__file__).resolve().parent))
from corpus import (
    CLASSES,
    SAMPLES,
    UNK,
    build_vocab,
    corpus,
    encode,
)


class MeanPoolClassifier(nn.Module):
    """Embedding + masked mean pooling + MLP; the `ids_mask` contract."""

    def __init__(self, vocab_size: int, num_classes: int, dim: int = 48) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim, padding_idx=0)
        self.hidden = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, num_classes)

    def classify(self, pooled: Tensor) -> Tensor:
        logits: Tensor = self.head(F.relu(self.hidden(pooled)))
        return logits

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        mask = attention_mask.unsqueeze(-1).to(self.embed.weight.dtype)
        summed = (self.embed(input_ids) * mask).sum(dim=1)
        return self.classify(summed / mask.sum(dim=1).clamp(min=1.0))


class BagClassifier(nn.Module):
    """The same weights behind the EmbeddingBag-style `bag` contract."""

    def __init__(self, trained: MeanPoolClassifier) -> None:
        super().__init__()
        weight = trained.embed.weight.detach().clone()
        self.bag = nn.EmbeddingBag.from_pretrained(weight, freeze=True, mode="mean")
        self.hidden = trained.hidden
        self.head = trained.head

    def forward(self, ids: Tensor, offsets: Tensor) -> Tensor:
        logits: Tensor = self.head(F.relu(self.hidden(self.bag(ids, offsets))))
        return logits


def to_batch(rows: list[list[int]]) -> tuple[Tensor, Tensor]:
    """Pad id lists to the longest row: (input_ids, attention_mask), both int64."""
    longest = max(1, max(len(r) for r in rows))
    ids = torch.zeros(len(rows), longest, dtype=torch.int64)
    mask = torch.zeros(len(rows), longest, dtype=torch.int64)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.int64)
        mask[i, : len(row)] = 1
    return ids, mask


def _word_dropout(ids: Tensor, mask: Tensor, unk: int, gen: torch.Generator) -> Tensor:
    """Replace 10% of tokens by `<unk>` so unseen words at serving time do little harm."""
    drop = (torch.rand(ids.shape, generator=gen) < 0.1) & (mask > 0)
    return torch.where(drop, torch.full_like(ids, unk), ids)


def train(model: MeanPoolClassifier, ids: Tensor, mask: Tensor, y: Tensor, epochs: int,
          unk: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=1e-4)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(ids), generator=gen)
        for start in range(0, len(ids), 128):
            idx = order[start:start + 128]
            batch = _word_dropout(ids[idx], mask[idx], unk, gen)
            loss = F.cross_entropy(model(batch, mask[idx]), y[idx])
            opt.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
    model.eval()


@torch.inference_mode()
def accuracy(model: nn.Module, texts: list[str], labels: list[int], vocab: dict[str, int]) -> float:
    ids, mask = to_batch([encode(t, vocab) for t in texts])
    return float((model(ids, mask).argmax(1) == torch.tensor(labels)).float().mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train the topic classifier example.")
    parser.add_argument("--out", type=Path, required=True, help="folder for model.pt, vocab.json")
    parser.add_argument("--contract", choices=("ids_mask", "bag"), default="ids_mask")
    parser.add_argument("--quick", action="store_true", help="tiny run for tests (seconds)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: faster for a model this small "
                             "and no OpenMP spin-waiting when the cores are shared)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)  # this script owns its process
    torch.manual_seed(args.seed)  # this script owns its process; weights init needs the seed
    train_n, epochs = (2000, 4) if args.quick else (8000, 8)

    t0 = time.perf_counter()
    texts, labels = corpus(train_n, seed=args.seed)
    test_texts, test_labels = corpus(1000, seed=args.seed + 1)
    vocab = build_vocab(texts)
    ids, mask = to_batch([encode(t, vocab) for t in texts])
    model = MeanPoolClassifier(len(vocab), len(CLASSES))
    train(model, ids, mask, torch.tensor(labels), epochs, vocab[UNK], args.seed)
    t1 = time.perf_counter()

    held_out = accuracy(model, test_texts, test_labels, vocab)
    hand = accuracy(model, [t for t, _ in SAMPLES], [CLASSES.index(c) for _, c in SAMPLES], vocab)
    args.out.mkdir(parents=True, exist_ok=True)
    served: nn.Module = BagClassifier(model).eval() if args.contract == "bag" else model
    save_torchscript(served, args.out / "model.pt")
    (args.out / "vocab.json").write_text(json.dumps(vocab, indent=0) + "\n", encoding="utf-8")
    print(json.dumps({
        "contract": args.contract, "classes": list(CLASSES), "vocab_size": len(vocab),
        "train_sentences": train_n, "epochs": epochs,
        "held_out_accuracy": round(held_out, 4), "hand_written_accuracy": round(hand, 4),
        "train_s": round(t1 - t0, 2), "cpu_s": round(time.process_time(), 2),
        "model": str(args.out / "model.pt"),
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
