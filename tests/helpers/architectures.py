"""Real architectures as users train them, built from transformers configs with random weights.

No download: every model is made from a config (2 layers, width 32-64, short sequences, tiny
images; EfficientNet and MobileNetV2 at a quarter and a third of their width), so a training step
takes milliseconds on a CPU. Dropout is off so that a training run is deterministic: a monitored
run can be compared with the same run unmonitored, bit for bit. Each `Arch` gives the model and a
seeded batch per step (the same batch for the same step, so a test can re-evaluate a step's loss
on its own minibatch).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import transformers
from torch import nn

NAMES = ("gpt2", "bert", "llama", "vit", "resnet", "convnext")
#: Models whose activation sites test the site readings (tests/test_site_readings.py), not in the
#: architecture matrix: EfficientNet's squeeze-excite sigmoids (inputs far from their spread) and
#: SiLUs, MobileNetV2's ReLU6s (a ReLU below 6, saturating above).
SITE_NAMES = ("efficientnet", "mobilenetv2")
VOCAB = 64
SEQ = 8
BATCH = 2
IMAGE = 32
LABELS = 4


@dataclass
class Arch:
    """A model and its data: `loss(step)` runs the forward pass on that step's batch."""

    name: str
    model: nn.Module
    batch: Callable[[int], dict[str, torch.Tensor]]

    def loss(self, step: int) -> torch.Tensor:
        return self.model(**self.batch(step)).loss

    def train(self, opt: torch.optim.Optimizer, monitor, steps: int) -> None:
        """`steps` plain monitored training steps, one batch each."""
        for step in range(steps):
            loss = self.loss(step)
            loss.backward()
            opt.step()
            opt.zero_grad()
            monitor.step(loss)


def build(name: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> Arch:
    """The tiny `name` model (one of NAMES or SITE_NAMES) in `dtype`, seeded, in training mode."""
    torch.manual_seed(seed)
    config, model_class, batch = _SPECS[name]()
    model = model_class(config).to(dtype)
    model.train()
    return Arch(name, model, lambda step: batch(step, dtype))


def _tokens(step: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(step))
    return {"input_ids": ids, "labels": ids}


def _images(step: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(step)
    pixels = torch.randn(BATCH, 3, IMAGE, IMAGE, generator=gen).to(dtype)
    return {"pixel_values": pixels, "labels": torch.randint(0, LABELS, (BATCH,), generator=gen)}


def _gpt2():
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=16, n_embd=32, n_layer=2, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return config, transformers.GPT2LMHeadModel, _tokens


def _bert():
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=16,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return config, transformers.BertForMaskedLM, _tokens


def _llama():
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16,
    )  # fmt: skip
    return config, transformers.LlamaForCausalLM, _tokens


def _vit():
    config = transformers.ViTConfig(
        image_size=IMAGE, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=64, num_labels=LABELS,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return config, transformers.ViTForImageClassification, _images


def _resnet():
    config = transformers.ResNetConfig(
        num_channels=3,
        embedding_size=16,
        hidden_sizes=[16, 32],
        depths=[1, 1],
        layer_type="basic",
        num_labels=LABELS,
    )
    return config, transformers.ResNetForImageClassification, _images


def _convnext():
    config = transformers.ConvNextConfig(
        num_channels=3,
        num_stages=2,
        hidden_sizes=[16, 32],
        depths=[1, 1],
        num_labels=LABELS,
        drop_path_rate=0.0,
    )
    return config, transformers.ConvNextForImageClassification, _images


def _efficientnet():
    config = transformers.EfficientNetConfig(
        image_size=IMAGE, num_channels=3, width_coefficient=0.25, depth_coefficient=0.2,
        hidden_dim=320, num_labels=LABELS, drop_connect_rate=0.0, dropout_rate=0.0,
    )  # fmt: skip
    return config, transformers.EfficientNetForImageClassification, _images


def _mobilenetv2():
    config = transformers.MobileNetV2Config(
        image_size=IMAGE, num_channels=3, depth_multiplier=0.35, num_labels=LABELS,
        classifier_dropout_prob=0.0,
    )  # fmt: skip
    return config, transformers.MobileNetV2ForImageClassification, _images


_SPECS = {
    "gpt2": _gpt2,
    "bert": _bert,
    "llama": _llama,
    "vit": _vit,
    "resnet": _resnet,
    "convnext": _convnext,
    "efficientnet": _efficientnet,
    "mobilenetv2": _mobilenetv2,
}


#: The Markov chain a tiny Qwen2 learns (`markov_qwen2`): MARKOV_STATES tokens, sequences of
#: MARKOV_SEQ, batches of MARKOV_BATCH; its transition logits are N(0, MARKOV_SHARPNESS^2), so
#: its entropy rate (the loss a model that learned it reaches) is about 2 nats per token.
MARKOV_STATES, MARKOV_SEQ, MARKOV_BATCH, MARKOV_SHARPNESS = 64, 64, 16, 2.5


def markov_qwen2(seed: int = 0) -> Arch:
    """A tiny Qwen2 (hidden 32, 2 layers) that learns a fixed random Markov chain: the loss falls
    from ln 64 to the chain's entropy rate within a few hundred AdamW steps, then stays on that
    plateau, so one run has a learning part and a stationary one (tests/test_temperature.py,
    tests/bench/bench_temperature.py)."""
    chain = _chain()

    def batch(step: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(1000 + step)
        ids = torch.empty(MARKOV_BATCH, MARKOV_SEQ, dtype=torch.long)
        ids[:, 0] = torch.randint(0, MARKOV_STATES, (MARKOV_BATCH,), generator=gen)
        for i in range(1, MARKOV_SEQ):
            ids[:, i] = torch.multinomial(chain[ids[:, i - 1]], 1, generator=gen)[:, 0]
        return {"input_ids": ids, "labels": ids}

    config = transformers.Qwen2Config(
        vocab_size=MARKOV_STATES, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MARKOV_SEQ,
        attention_dropout=0.0,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(config)
    model.train()
    return Arch("qwen2-markov", model, lambda step: batch(step, torch.float32))


def entropy_rate() -> float:
    """The entropy rate of `markov_qwen2`'s chain (nats per token), under its stationary law."""
    chain = _chain().double()
    law = torch.linalg.matrix_power(chain, 256)[0]
    return float(-(law[:, None] * chain * chain.log()).sum())


def _chain() -> torch.Tensor:
    """The transition matrix of `markov_qwen2`'s chain (rows: from, columns: to), seeded."""
    logits = torch.randn(MARKOV_STATES, MARKOV_STATES, generator=torch.Generator().manual_seed(0))
    return torch.softmax(MARKOV_SHARPNESS * logits, dim=-1)
