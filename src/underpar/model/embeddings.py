"""The input side and the output head: their config (`model.embeddings.*`), the logit softcap,
and the two additions to the token embedding the records used: BigramHash (a hashed
(previous, current) token pair embedding) and SmearGate (each token's embedding mixed with
the previous one's through a learned gate). Neither mixes across a document start (BOS)."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from underpar.config import bounded
from underpar.errors import ConfigError
from underpar.model.linear import CastedLinear


@dataclasses.dataclass
class EmbeddingsConfig:
    # The output head reuses the token embedding's weight.
    tied: bool = True
    # Init std of the tied token embedding; an untied embedding keeps PyTorch's N(0, 1).
    tied_init_std: float = bounded(0.005, 0.0)
    # logits = softcap * tanh(logits / softcap); 0 disables the cap.
    logit_softcap: float = bounded(30.0, 0.0)
    # Training loss: softcap + cross-entropy as one Triton kernel on CUDA (kernels/softcap_ce.py;
    # its torch reference elsewhere) that never stores the capped fp32 logits. The cap is then
    # applied in fp32 rather than in bf16, so losses are close to, not bit-equal with, the default.
    fused_ce: bool = False
    # The token that starts every document in the shards (SentencePiece bos = 1): SmearGate
    # and BigramHash never carry the token before it into it.
    bos_id: int = bounded(1, 0)
    # SmearGate (PR #1667, BOS fix of PR #1855); `smear_window`: how many leading dims of a
    # token's embedding its gate reads (the records' GATE_WINDOW = 12).
    smear_gate: bool = False
    smear_window: int = bounded(12, 1)
    # BigramHash: hashed (previous, current) pairs -> a `bigram_buckets` x `bigram_dim`
    # table, projected to model_dim; 0 = off. Records: 2048 x 128, later 3072 x 112.
    bigram_buckets: int = bounded(0, 0)
    bigram_dim: int = bounded(128, 1)

    def check(self) -> None:
        if self.bigram_buckets == 1:
            raise ConfigError(
                "model.embeddings.bigram_buckets = 1 leaves no bucket for pairs (one is the "
                "sink of first positions); use 0 (off) or at least 2"
            )

    def check_with(self, model_dim: int) -> None:
        if self.smear_gate and self.smear_window > model_dim:
            raise ConfigError(
                f"model.embeddings.smear_window = {self.smear_window} is wider than "
                f"model.model_dim = {model_dim}"
            )


def softcap(logits: Tensor, cap: float) -> Tensor:
    """cap * tanh(logits / cap), which bounds the logits to (-cap, cap); 0 leaves them as they are."""
    if cap > 0:
        return cap * torch.tanh(logits / cap)
    return logits


class SmearGate(nn.Module):
    """x_t <- x_t + lam * sigmoid(w . x_t[:window]) * x_{t-1}, except where token t is BOS
    (the cross-document leak PR #1855 fixed: the BOS of a packed document must not carry the
    previous document's last token). `proj` (w, 1 x window) and `lam` start at zero, so the
    gate starts closed and the model starts as it would without it."""

    def __init__(self, window: int, bos_id: int):
        super().__init__()
        self.window = window
        self.bos_id = bos_id
        self.proj = CastedLinear(window, 1, zero_init=True)
        self.lam = nn.Parameter(torch.zeros(1, dtype=torch.float32))

    def forward(self, x_btd: Tensor, input_ids: Tensor) -> Tensor:
        # .contiguous(): the slice feeds a matmul; fullgraph compile wants a plain layout.
        gate = self.lam.to(x_btd.dtype) * torch.sigmoid(self.proj(x_btd[:, 1:, : self.window].contiguous()))
        not_bos = (input_ids[:, 1:] != self.bos_id).to(x_btd.dtype).unsqueeze(-1)
        return torch.cat([x_btd[:, :1], x_btd[:, 1:] + gate * not_bos * x_btd[:, :-1]], dim=1)


# The records' pair hash: (36313 * current) XOR (27191 * previous) mod (buckets - 1).
HASH_CURRENT, HASH_PREVIOUS = 36313, 27191


def bigram_buckets(input_ids: Tensor, num_buckets: int, bos_id: int) -> Tensor:
    """Bucket of each (previous, current) pair [B, T]. Positions without a previous token in
    the same document (the first of a row, and every BOS) go to the last bucket, the sink.
    The records send only the first position there; the BOS rule is the same fix SmearGate
    got, so no pair spans two documents."""
    ids = input_ids.long()
    sink = num_buckets - 1
    pairs = torch.bitwise_xor(HASH_CURRENT * ids[:, 1:], HASH_PREVIOUS * ids[:, :-1]) % sink
    pairs = torch.where(ids[:, 1:] == bos_id, sink, pairs)
    return torch.cat([torch.full_like(ids[:, :1], sink), pairs], dim=1)


class BigramHash(nn.Module):
    """scale * proj(table[bucket(previous, current)]), added to the token embedding (the
    records' BigramHashEmbedding). The table starts at zero and `scale` at 0.05, so it starts
    silent; the projection is orthogonal (the records' init of every large non-zero-init
    linear; a zero projection would leave table and projection without gradient). No
    projection when `dim == model_dim`. Parameters: buckets * dim (+ dim * model_dim) + 1."""

    def __init__(self, num_buckets: int, dim: int, model_dim: int, bos_id: int):
        super().__init__()
        self.num_buckets = num_buckets
        self.bos_id = bos_id
        self.embed = nn.Embedding(num_buckets, dim)
        nn.init.zeros_(self.embed.weight)
        self.proj = None
        if dim != model_dim:
            self.proj = CastedLinear(dim, model_dim)
            nn.init.orthogonal_(self.proj.weight)
        self.scale = nn.Parameter(torch.tensor(0.05, dtype=torch.float32))

    def forward(self, input_ids: Tensor) -> Tensor:
        h = self.embed(bigram_buckets(input_ids, self.num_buckets, self.bos_id))
        if self.proj is not None:
            h = self.proj(h)
        return h * self.scale.to(h.dtype)
